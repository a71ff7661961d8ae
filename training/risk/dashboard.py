"""A self-contained HTML risk dashboard, in the spirit of the register's monitoring
dashboard (section 5.1): accuracy, drift (PSI), GPU, latency, robustness (S-05), error rate
and cost, plus the register with each risk's live status, the alerts that fired and tables
such as the datasets a stage read and their verification (T-07).

One file, PNG plots embedded as base64, no scripts and no network: it opens from an
MLflow artifact view or a mail attachment alike.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

#: The dashboard's CSS, shared by the audit report (:mod:`training.risk.audit`).
STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}
.panels img{margin:4px;border:1px solid #ddd}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:3px 6px}
tr.alert td{background:#fbe3e2} tr.ok td{background:#e6f4e6} tr.not_monitored td{color:#777}
"""


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def bar_panel(
    title: str,
    values: Mapping[str, float],
    threshold: float | None = None,
    unit: str = "",
    lower_is_bad: bool = False,
) -> str:
    """An ``<img>`` tag with a bar chart of ``values`` and an optional threshold line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 2.6))
    ax = fig.add_subplot()
    names = list(values)
    vals = [values[n] for n in names]
    colors = []
    for v in vals:
        bad = threshold is not None and (v < threshold if lower_is_bad else v > threshold)
        colors.append("#d9534f" if bad else "#5b8def")
    ax.barh(names, vals, color=colors)
    if threshold is not None:
        ax.axvline(threshold, color="#333", linestyle="--", linewidth=1)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(unit, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.invert_yaxis()
    return f'<img alt="{html.escape(title)}" src="data:image/png;base64,{_png(fig)}">'


def _pick(metrics: Mapping[str, float], prefix: str, suffix: str = "") -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if key.startswith(prefix) and key.endswith(suffix) and math.isfinite(value):
            out[key[len(prefix) : len(key) - len(suffix) or None]] = float(value)
    return out


def _table(title: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """An ``<h2>`` and a table of ``rows`` (columns: every key, in first-seen order)."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(k, '')))}</td>" for k in keys) + "</tr>"
        for r in rows
    )
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


def render_dashboard(
    title: str,
    metrics: Mapping[str, float],
    register_rows: Sequence[Mapping[str, Any]],
    alerts: Sequence[Mapping[str, Any]],
    notes: Mapping[str, str] | None = None,
    tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> str:
    """The dashboard as an HTML string.

    Args:
        title: heading (run name, stage).
        metrics: the run's figures, ``risk/<ID>/<metric>`` and ``test/...`` keys.
        register_rows: the register with live status (``RiskRegister.live_status``).
        alerts: fired alerts as dicts (``name``, ``risk_id``, ``value``, ``message``).
        notes: extra key -> text lines (e.g. ``"risk/T-04/gpu": "not available: no NVML"``).
        tables: name -> rows (dicts of scalars), each shown as a table (e.g.
            ``T-07_datasets``: the datasets read and their verification).
    """
    panels = []
    acc = {k: v for k, v in _pick(metrics, "risk/T-01/").items() if "/" not in k}
    if acc:
        panels.append(bar_panel("T-01 accuracy on real data", acc, 0.85, "fraction", True))
    psi = _pick(metrics, "risk/T-02/image/", "/psi") or _pick(metrics, "risk/T-02/", "psi")
    if psi:
        panels.append(bar_panel("T-02 drift (PSI)", psi, 0.2, "PSI"))
    gpu = _pick(metrics, "risk/T-04/")
    if gpu:
        panels.append(bar_panel("T-04 GPU", gpu, 0.8, "fraction"))
    lat = _pick(metrics, "risk/T-06/", "_ms")
    if lat:
        panels.append(bar_panel("T-06 inference latency, batch 1", lat, 100.0, "ms"))
    robust = _pick(metrics, "risk/S-05/", "/miou")
    if robust:
        clean = metrics.get("risk/S-05/clean_miou", math.nan)
        line = 0.5 * clean if math.isfinite(clean) else None  # the alert: over half lost
        title = f"S-05 real mIoU under attack / corruption (clean {clean:.3f})"
        panels.append(bar_panel(title, robust, line, "mIoU", True))
    rate = _pick(metrics, "risk/T-03/", "images_per_s_per_device")
    if rate:
        effic = metrics.get("risk/T-03/scaling_efficiency", math.nan)
        note = f", scaling efficiency {effic:.2f}" if math.isfinite(effic) else ""
        title = f"T-03 training images/s per device{note}"
        panels.append(bar_panel(title, {"per device": rate[""]}, None, "images/s"))
    err = {g: 1.0 - v for g, v in _pick(metrics, "test/real/", "/pixel_acc").items() if g}
    if err:
        panels.append(bar_panel("Error rate by condition (1 - pixel acc)", err, 0.15))
    cost = _pick(metrics, "risk/O-01/")
    if cost:
        ratio = {"daily cost / budget": cost.get("daily_cost_ratio", math.nan)}
        if math.isfinite(ratio["daily cost / budget"]):
            panels.append(bar_panel("O-01 cost", ratio, 1.2, "ratio"))
    rows = "".join(
        "<tr class='{cls}'><td>{id}</td><td>{name}</td><td>{level}</td><td>{owner}</td>"
        "<td>{status}</td><td>{live}</td><td>{values}</td></tr>".format(
            cls=html.escape(str(r.get("live_status", ""))),
            id=html.escape(str(r.get("id", ""))),
            name=html.escape(f"{r.get('name_en', '')} ({r.get('name_ja', '')})"),
            level=html.escape(str(r.get("level", ""))),
            owner=html.escape(str(r.get("owner", ""))),
            status=html.escape(str(r.get("status", ""))),
            live=html.escape(str(r.get("live_status", ""))),
            values=html.escape(
                ", ".join(f"{k}={v:.3g}" for k, v in (r.get("metrics") or {}).items())
            ),
        )
        for r in register_rows
    )
    fired = (
        "".join(
            "<li><b>{}</b> {}</li>".format(
                html.escape(str(a.get("risk_id"))), html.escape(str(a.get("message")))
            )
            for a in alerts
        )
        or "<li>none</li>"
    )
    extra = "".join(
        f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in (notes or {}).items()
    )
    extra_tables = "".join(
        _table(name.replace("_", " ", 1), rows) for name, rows in (tables or {}).items() if rows
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Alerts</h2><ul>{fired}</ul>
<div class="panels">{"".join(panels)}</div>
<ul>{extra}</ul>
{extra_tables}
<h2>Risk register</h2>
<table><tr><th>ID</th><th>risk</th><th>level</th><th>owner</th><th>status</th><th>live</th>
<th>figures</th></tr>{rows}</table>
</body></html>
"""
