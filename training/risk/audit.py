"""The audit report of a registered model for the register's review cycle (T-08, 5.3).

``shared/risk-matrix.md`` asks for a quarterly bias report (T-08: 四半期ごとにバイアス評価
レポートを作成) and monthly / quarterly reviews of the register (section 5.3: risk levels,
mitigation effectiveness, new risks, matrix update). Everything they need is already in the
MLflow store; this module reads it and writes one self-contained HTML page:

- per model version: stage, registration date, the registry's decision (with the A/B
  interval), real test mIoU and pixel accuracy, fairness over condition groups (per-group
  real test mIoU and pixel accuracy, the worst group, the gaps, ``risk/T-08/*`` DPD and
  EOD), and the alerts that fired in its run;
- the register with levels and live status as the champion's run logged it
  (``risk/register.json``);
- the period's history: alerts fired by every run of the store (``risk/alerts.json``),
  notifier failures, champion changes and the champion checks of ``scripts/monitor.py``.

:func:`build_report` gathers plain data (a JSON-ready dict); :func:`render_audit` turns it
into HTML with :mod:`training.risk.dashboard`'s panels and style; the helpers in between are
pure. Alerts are read from MLflow, not from the stage folders' ``alerts.jsonl`` (copies of
the same records, absent with a remote tracking server).
"""

from __future__ import annotations

import html
import json
import math
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

#: Review kinds of section 5.3 and their default period (days back from the report date).
REVIEW_DAYS: Mapping[str, int] = {"monthly": 31, "quarterly": 92}
#: Section 5.3's rows (項目, 頻度, 担当者, アクション), plus T-08's quarterly bias audit.
REVIEW_ITEMS: tuple[tuple[str, str, str, str], ...] = (
    ("リスク評価レビュー (risk assessment review)", "monthly", "Project Manager",
     "リスクレベルの再評価 (re-evaluate risk levels)"),
    ("緩和策効果測定 (mitigation effectiveness)", "monthly", "Team Lead",
     "緩和策の有効性を確認 (check the mitigations work)"),
    ("新規リスク識別 (new risk identification)", "quarterly", "全チーム (all teams)",
     "ブレインストーミングセッション (brainstorming session)"),
    ("リスク管理マトリクス更新 (matrix update)", "quarterly", "Project Manager",
     "ドキュメント更新 (update the document)"),
    ("T-08 バイアス評価レポート (bias audit)", "quarterly", "Data Scientist",
     "四半期ごとに作成、ステークホルダーレビュー (this report; stakeholder review)"),
)  # fmt: skip
#: Per-group metrics a stage logs as ``test/real/<group>/<metric>``.
GROUP_METRICS = ("miou", "pixel_acc", "macro_f1")
#: Per-class families logged as ``test/real/<family>/<class>`` (not condition groups).
CLASS_FAMILIES = frozenset({"iou", "f1", "precision", "recall"})
REGISTER_ARTIFACT = "risk/register.json"
ALERTS_ARTIFACT = "risk/alerts.json"
ALERTS_TAG = "risk/alerts_fired"


# --------------------------------------------------------------------------- pure helpers
def period_start(now: datetime, review: str, since_days: int | None = None) -> datetime:
    """``now`` minus ``since_days`` (or the review's default period, :data:`REVIEW_DAYS`)."""
    if review not in REVIEW_DAYS:
        raise ValueError(f"review: expected one of {', '.join(REVIEW_DAYS)}, got {review!r}")
    return now - timedelta(days=int(since_days or REVIEW_DAYS[review]))


def iso(ms: int | float | None) -> str | None:
    """Milliseconds since the epoch -> ``2026-12-01T18:18:20+00:00`` (UTC), None for None."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def fairness_summary(metrics: Mapping[str, float]) -> dict[str, Any]:
    """Fairness over condition groups from one run's metrics.

    Args:
        metrics: the run's figures: ``test/real/<group>/{miou,pixel_acc,macro_f1}`` per
            condition group and ``risk/T-08/{dpd,eod}/<class>``, ``risk/T-08/eod_max``.

    Returns:
        ``groups`` (``{group: {metric: value}}``), ``worst_group`` / ``best_group`` (lowest /
        highest real mIoU; None without groups), ``miou_gap`` and ``pixel_acc_gap`` (best
        minus worst group, in [0, 1]; None with fewer than two groups), ``classes``
        (``{class: {"dpd", "eod"}}``) and ``eod_max``; NaN figures become None.
    """
    groups: dict[str, dict[str, float]] = {}
    classes: dict[str, dict[str, float | None]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[:2] == ["test", "real"] and parts[3] in GROUP_METRICS:
            if parts[2] not in CLASS_FAMILIES and _finite(value) is not None:
                groups.setdefault(parts[2], {})[parts[3]] = float(value)
        elif len(parts) == 4 and parts[:2] == ["risk", "T-08"] and parts[2] in ("dpd", "eod"):
            classes.setdefault(parts[3], {})[parts[2]] = _finite(value)
    scored = {g: m["miou"] for g, m in groups.items() if "miou" in m}
    worst = min(scored, key=scored.__getitem__) if scored else None
    best = max(scored, key=scored.__getitem__) if scored else None

    def gap(metric: str) -> float | None:
        values = [m[metric] for m in groups.values() if metric in m]
        return max(values) - min(values) if len(values) >= 2 else None

    return {
        "groups": dict(sorted(groups.items())),
        "worst_group": worst,
        "best_group": best,
        "miou_gap": gap("miou"),
        "pixel_acc_gap": gap("pixel_acc"),
        "classes": dict(sorted(classes.items())),
        "eod_max": _finite(metrics.get("risk/T-08/eod_max")),
    }


def decision_text(tags: Mapping[str, str]) -> str:
    """A model version's registry decision in words, from its tags (``decision``,
    ``compare.*``, ``superseded_by``, ``rollback_reason``); ``"pending"`` without one."""
    text = tags.get("decision") or "pending"
    if "compare.diff" in tags:
        diff, low, high = (_finite(tags.get(f"compare.{k}")) for k in ("diff", "ci_low", "ci_high"))
        if None not in (diff, low, high):
            text += f" (diff {diff:+.4f}, CI [{low:+.4f}, {high:+.4f}]"
            text += f", margin {tags.get('compare.margin', '?')})"
    if tags.get("rollback_reason"):
        text += f"; rolled back: {tags['rollback_reason']}"
    if tags.get("superseded_by"):
        text += f"; superseded by v{tags['superseded_by']}"
    return text


def register_rows(table: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of a ``risk/register.json`` table artifact (``{"columns", "data"}``, as
    ``MlflowClient.log_table`` writes it), with ``metrics`` and ``alert_messages`` parsed
    back from their JSON text."""
    columns = list(table.get("columns") or [])
    rows = []
    for values in table.get("data") or []:
        row = dict(zip(columns, values, strict=False))
        for key, empty in (("metrics", {}), ("alert_messages", [])):
            value = row.get(key)
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    value = empty
            row[key] = value if isinstance(value, type(empty)) else empty
        rows.append(row)
    return rows


def register_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts for the review: ``live`` (``{live_status: n}``), ``levels`` (``{level: n}``)
    and ``high_in_alert`` (ids of high-level risks whose live status is ``alert``)."""
    return {
        "live": dict(Counter(str(r.get("live_status")) for r in rows)),
        "levels": dict(Counter(str(r.get("level")) for r in rows)),
        "high_in_alert": [
            str(r.get("id"))
            for r in rows
            if r.get("level") == "high" and r.get("live_status") == "alert"
        ],
    }


def alert_records(
    alerts_json: Mapping[str, Any] | None, run: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(alerts, notifier failures)`` of one run, each record stamped with the run's
    ``time`` (its end, else its start), ``run_id``, ``run_name`` and ``stage``. Without the
    ``risk/alerts.json`` artifact the rule names of the ``risk/alerts_fired`` tag remain."""
    stamp = {
        "time": run.get("end") or run.get("start"),
        "run_id": run.get("run_id"),
        "run_name": run.get("name"),
        "stage": (run.get("tags") or {}).get("stage"),
    }
    if alerts_json is None:
        names = [n for n in str((run.get("tags") or {}).get(ALERTS_TAG, "")).split(",") if n]
        fired = [{"rule": n, "message": "(no risk/alerts.json)"} for n in names if n != "none"]
        return [{**stamp, **a} for a in fired], []
    fired = [a for a in alerts_json.get("alerts") or [] if isinstance(a, Mapping)]
    failures = [f for f in alerts_json.get("notifier_failures") or [] if isinstance(f, Mapping)]
    return [{**stamp, **a} for a in fired], [{**stamp, **f} for f in failures]


def in_period(when: str | None, since: datetime, until: datetime) -> bool:
    """Whether ISO time ``when`` lies in ``[since, until]`` (False for None)."""
    if not when:
        return False
    at = datetime.fromisoformat(when)
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return since <= at <= until


# --------------------------------------------------------------------------- the store
def check_model(tracking_uri: str, name: str | None, key: str = "registry.name") -> str:
    """The registered model to report on (:func:`~training.risk.retrain.resolve_model`),
    refused with a :class:`~core.config.ConfigError` naming ``key`` when the store has no
    registered model, lacks ``name``, or the model has no version."""
    from mlflow.tracking import MlflowClient

    from core.config import ConfigError
    from training.risk.retrain import resolve_model
    from training.tracking import redact_uri

    model = resolve_model(tracking_uri, name, key)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if not client.search_model_versions(f"name = '{model}'", max_results=1):
        raise ConfigError(
            f"{key}: registered model {model!r} in {redact_uri(tracking_uri)} has no version "
            "to report on: register one first (python scripts/pipeline.py)"
        )
    return model


def build_report(
    tracking_uri: str, model: str, review: str, since: datetime, now: datetime
) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-ready data.

    Args:
        tracking_uri: the MLflow store (also the registry).
        model: the registered model (:func:`check_model`).
        review: ``monthly`` or ``quarterly`` (section 5.3).
        since, now: the period (timezone-aware). Versions registered in it and every
            version holding an alias are reported; alerts, notifier failures, champion
            changes and champion checks are those of the period.
    """
    from mlflow.tracking import MlflowClient

    from training.risk.registry import ModelRegistry
    from training.tracking import redact_uri

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    reader = _Reader(client)
    info = ModelRegistry(tracking_uri, name=model).describe()
    versions, older = [], 0
    for v in reversed(info["versions"]):  # newest first
        registered = v["tags"].get("registered_at")
        if not (v["aliases"] or in_period(registered, since, now)):
            older += 1
            continue
        run = reader.run(v["run_id"])
        alerts, _ = alert_records(reader.json(v["run_id"], ALERTS_ARTIFACT), run or {})
        metrics = (run or {}).get("metrics", {})
        versions.append(
            {
                "version": v["version"],
                "aliases": v["aliases"],
                "run_id": v["run_id"],
                "run_found": run is not None,
                "stage": v["tags"].get("stage") or (run or {}).get("tags", {}).get("stage"),
                "registered_at": registered,
                "decision": decision_text(v["tags"]),
                "test_miou": _finite(metrics.get("test/real/miou")),
                "test_pixel_acc": _finite(metrics.get("test/real/pixel_acc")),
                "fairness": fairness_summary(metrics),
                "alerts": [str(a.get("rule")) for a in alerts],
            }
        )
    champion = info["aliases"].get("champion")
    champion_run = next((v["run_id"] for v in versions if v["version"] == champion), None)
    table = reader.json(champion_run, REGISTER_ARTIFACT) if champion_run else None
    rows = register_rows(table) if table else _static_register()
    alerts, failures = _history(reader, since, now)
    return {
        "title": f"Risk audit ({review}): {model}",
        "model": model,
        "review": review,
        "store": redact_uri(tracking_uri),
        "generated_at": now.isoformat(timespec="seconds"),
        "period": {
            "since": since.isoformat(timespec="seconds"),
            "until": now.isoformat(timespec="seconds"),
        },
        "aliases": info["aliases"],
        "versions": versions,
        "older_versions": older,
        "register": {
            "source": f"run {champion_run} (champion v{champion})"
            if table
            else "configs/risk/register.yaml (the champion's run logged no register)",
            "rows": rows,
            "summary": register_summary(rows),
        },
        "alerts": alerts,
        "notifier_failures": failures,
        "alert_counts": dict(Counter(str(a.get("risk_id", "?")) for a in alerts)),
        "champion_changes": [h for h in info["history"] if in_period(h.get("at"), since, now)],
        "checks": _checks(client, model, since, now),
    }


class _Reader:
    """Runs and JSON artifacts of the store, each read once."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._runs: dict[str, dict[str, Any] | None] = {}
        self._json: dict[tuple[str, str], Any] = {}

    def run(self, run_id: str) -> dict[str, Any] | None:
        if run_id not in self._runs:
            from mlflow.exceptions import MlflowException

            try:
                self._runs[run_id] = _plain_run(self.client.get_run(run_id))
            except MlflowException:
                self._runs[run_id] = None  # deleted, or another store's run
        return self._runs[run_id]

    def json(self, run_id: str | None, path: str) -> Any:
        if not run_id:
            return None
        if (run_id, path) not in self._json:
            from mlflow.exceptions import MlflowException

            try:
                with tempfile.TemporaryDirectory(prefix="audit-") as tmp:
                    local = self.client.download_artifacts(run_id, path, tmp)
                    self._json[run_id, path] = json.loads(Path(local).read_text("utf-8"))
            except (MlflowException, OSError, ValueError):
                self._json[run_id, path] = None
        return self._json[run_id, path]


def _plain_run(run: Any) -> dict[str, Any]:
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "start": iso(run.info.start_time),
        "end": iso(run.info.end_time),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
    }


def _search(client: Any, filter_string: str) -> list[Any]:
    """Every run of every experiment matching ``filter_string`` (all pages)."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs(experiments, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _history(
    reader: _Reader, since: datetime, now: datetime
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Alerts and notifier failures of the period over the whole store, in the order the
    runs ended (and each run's alerts in rule order)."""
    found = _search(
        reader.client,
        f"attributes.end_time >= {_ms(since)} AND attributes.start_time <= {_ms(now)} "
        f"AND tags.`{ALERTS_TAG}` != 'none'",
    )
    alerts: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for run in sorted(found, key=lambda r: (r.info.end_time or 0, r.info.run_id)):
        plain = _plain_run(run)
        if not in_period(plain["end"], since, now):
            continue
        fired, failed = alert_records(reader.json(plain["run_id"], ALERTS_ARTIFACT), plain)
        alerts.extend(fired)
        failures.extend(failed)
    return alerts, failures


def _checks(client: Any, model: str, since: datetime, now: datetime) -> list[dict[str, Any]]:
    """The champion checks of ``scripts/monitor.py`` on ``model`` in the period."""
    found = _search(
        client,
        f"tags.stage = 'monitor' AND tags.registry_name = '{model}' "
        f"AND attributes.start_time >= {_ms(since)} AND attributes.start_time <= {_ms(now)}",
    )
    out = []
    for run in sorted(found, key=lambda r: r.info.start_time):
        tags, metrics = run.data.tags, run.data.metrics
        out.append(
            {
                "time": iso(run.info.start_time),
                "run_id": run.info.run_id,
                "champion_version": tags.get("champion_version"),
                "data": tags.get("current_data"),
                "accuracy": _finite(metrics.get("risk/T-01/accuracy")),
                "psi": _finite(metrics.get("risk/T-02/psi")),
                "decision": tags.get("decision"),
                "trigger": tags.get("trigger"),
                "status": run.info.status,
            }
        )
    return out


def _static_register() -> list[dict[str, Any]]:
    from core.paths import config_dir
    from training.risk.register import RiskRegister

    rows = RiskRegister.load(config_dir() / "risk" / "register.yaml").to_rows()
    return [{**r, "live_status": "not_logged", "metrics": {}, "alert_messages": []} for r in rows]


# --------------------------------------------------------------------------- HTML
#: The audit's cells beside the dashboard's CSS (:data:`training.risk.dashboard.STYLE`).
_EXTRA_STYLE = (
    "table{margin-bottom:1em} td.worst{background:#fbe3e2;font-weight:bold} .muted{color:#777}\n"
)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, digits: int = 3) -> str:
    number = _finite(value)
    return "n/a" if number is None else f"{number:.{digits}f}"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] = ()) -> str:
    """An HTML table; ``head`` is escaped, cells are HTML already, or ``(css class, html)``;
    ``classes`` are the rows' css classes."""
    if not rows:
        return "<p class='muted'>none in the period</p>"

    def td(cell: Any) -> str:
        if isinstance(cell, tuple):
            return f"<td class='{_e(cell[0])}'>{cell[1]}</td>"
        return f"<td>{cell}</td>"

    tr = "".join(
        f"<tr class='{_e(classes[i]) if i < len(classes) else ''}'>"
        + "".join(td(c) for c in row)
        + "</tr>"
        for i, row in enumerate(rows)
    )
    return "<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + f"</tr>{tr}</table>"


def _versions_table(versions: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for v in versions:
        f = v["fairness"]
        worst = f["worst_group"]
        worst_miou = f["groups"].get(worst, {}).get("miou") if worst else None
        rows.append(
            [
                _e(f"v{v['version']}")
                + (f" <b>{_e(', '.join(v['aliases']))}</b>" * bool(v["aliases"])),
                _e(v["stage"]),
                _e(v["registered_at"]),
                _e(v["decision"]),
                _num(v["test_miou"]),
                _num(v["test_pixel_acc"]),
                f"{_e(worst)} ({_num(worst_miou)})" if worst else "n/a",
                _num(f["miou_gap"]),
                _num(f["eod_max"]),
                _e(", ".join(v["alerts"]) or "none")
                + ("" if v["run_found"] else " <span class='muted'>(run not found)</span>"),
            ]
        )
    head = ["version", "stage", "registered", "decision", "test real mIoU", "pixel acc",
            "worst group (mIoU)", "group mIoU gap", "EOD max", "alerts in its run"]  # fmt: skip
    return _table(head, rows)


def _fairness_tables(v: Mapping[str, Any]) -> str:
    f = v["fairness"]
    groups = f["groups"]
    if not groups and not f["classes"]:
        return f"<h3>v{_e(v['version'])}</h3><p class='muted'>no fairness figures logged</p>"
    metric_rows = []
    for metric in GROUP_METRICS:
        if any(metric in m for m in groups.values()):
            cells = [_e(metric)]
            for g, m in groups.items():
                worst = g == f["worst_group"] and metric == "miou"
                cells.append(("worst", _num(m.get(metric))) if worst else _num(m.get(metric)))
            metric_rows.append(cells)
    group_table = _table(["real test", *groups], metric_rows)
    class_rows = [[_e(c), _num(r.get("dpd")), _num(r.get("eod"))] for c, r in f["classes"].items()]
    gaps = (
        f"worst group <b>{_e(f['worst_group'])}</b>, best {_e(f['best_group'])}; gap (best -"
        f" worst): mIoU {_num(f['miou_gap'])}, pixel acc {_num(f['pixel_acc_gap'])}; "
        f"EOD max {_num(f['eod_max'])}"
    )
    return (
        f"<h3>v{_e(v['version'])} ({_e(v['stage'])}, run {_e(v['run_id'])})</h3>"
        f"<p>{gaps}</p>{group_table}"
        + _table(
            ["class", "demographic parity diff (DPD)", "equal opportunity diff (EOD)"], class_rows
        )
    )


def _figures(metrics: Mapping[str, Any], shown: int = 6) -> str:
    """A risk's figures as ``name=value`` text; more than ``shown`` fold into a
    ``<details>`` element (plain HTML, no script)."""
    items = [f"{k}={v:.3g}" for k, v in metrics.items() if isinstance(v, int | float)]
    if len(items) <= shown:
        return _e(", ".join(items))
    return f"<details><summary>{len(items)} figures</summary>{_e(', '.join(items))}</details>"


def _register_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The register with live status: the dashboard's columns and row classes."""
    cells = [
        [
            _e(r.get("id")),
            _e(f"{r.get('name_en', '')} ({r.get('name_ja', '')})"),
            _e(r.get("level")),
            _e(f"{r.get('probability')} x {r.get('impact')}"),
            _e(r.get("owner")),
            _e(r.get("status")),
            _e(r.get("live_status")),
            _figures(r.get("metrics") or {}),
            _e("; ".join(r.get("alert_messages") or [])),
        ]
        for r in rows
    ]
    head = ["ID", "risk", "level", "probability x impact", "owner", "status", "live",
            "figures", "alerts"]  # fmt: skip
    return _table(head, cells, [str(r.get("live_status", "")) for r in rows])


def _trend_panels(versions: Sequence[Mapping[str, Any]]) -> str:
    from training.risk.dashboard import bar_panel

    oldest_first = list(reversed(versions))
    panels = []
    for title, pick in (
        (
            "T-08 worst condition group, real test mIoU",
            lambda f: f["groups"].get(f["worst_group"], {}).get("miou"),
        ),
        ("T-08 group mIoU gap (best - worst)", lambda f: f["miou_gap"]),
        ("T-08 equal opportunity difference, max", lambda f: f["eod_max"]),
    ):
        values = {f"v{v['version']}": pick(v["fairness"]) for v in oldest_first}
        values = {k: x for k, x in values.items() if _finite(x) is not None}
        if values:
            panels.append(bar_panel(title, values, unit="fraction"))
    return f"<div class='panels'>{''.join(panels)}</div>"


#: The history tables: heading, then (column, record key) pairs.
_HISTORY: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("h2", "Alerts in the period", (("time", "time"), ("risk", "risk_id"), ("rule", "rule"),
     ("message", "message"), ("stage", "stage"), ("run", "run_name"))),
    ("h3", "Notifier failures", (("time", "time"), ("notifier", "notifier"), ("rule", "rule"),
     ("error", "error"), ("run", "run_name"))),
    ("h3", "Champion changes", (("at", "at"), ("champion", "version"),
     ("previous", "previous"), ("reason", "reason"))),
    ("h3", "Champion checks (scripts/monitor.py)", (("time", "time"),
     ("champion", "champion_version"), ("data", "data"), ("accuracy", "accuracy"),
     ("PSI", "psi"), ("decision", "decision"), ("why", "trigger"), ("status", "status"))),
)  # fmt: skip
_HISTORY_KEYS = ("alerts", "notifier_failures", "champion_changes", "checks")


def _cell(value: Any) -> str:
    return _num(value) if isinstance(value, float) else _e(value)


def render_audit(report: Mapping[str, Any]) -> str:
    """The report of :func:`build_report` as one self-contained HTML page (PNG panels
    embedded as base64, no scripts, no network)."""
    from training.risk.dashboard import STYLE

    review, period, versions = report["review"], report["period"], report["versions"]
    items = [i for i in REVIEW_ITEMS if review == "quarterly" or i[1] == "monthly"]
    summary = report["register"]["summary"]
    live = ", ".join(f"{k} {n}" for k, n in sorted(summary["live"].items()))
    counts = ", ".join(f"{k} {n}" for k, n in sorted(report["alert_counts"].items()))
    aliases = ", ".join(f"{k}=v{v}" for k, v in sorted(report["aliases"].items()))
    older = report["older_versions"]
    history = "".join(
        f"<{level}>{_e(heading)}</{level}>"
        + _table([c for c, _ in columns], [[_cell(r.get(k)) for _, k in columns] for r in rows])
        for (level, heading, columns), rows in zip(
            _HISTORY, (report[k] for k in _HISTORY_KEYS), strict=True
        )
    )
    title = _e(report["title"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{STYLE}{_EXTRA_STYLE}</style></head><body>
<h1>{title}</h1>
<p>Period {_e(period["since"])} to {_e(period["until"])}; store {_e(report["store"])};
aliases {_e(aliases or "none")}.</p>
<h2>Review (risk-matrix.md 5.3)</h2>
{_table(["item", "frequency", "owner", "action"], [[_e(x) for x in i] for i in items])}
<p>Register: {_e(live)}; high-level risks in alert:
{_e(", ".join(summary["high_in_alert"]) or "none")}.
Alerts in the period by risk: {_e(counts or "none")}.</p>
<h2>Model versions</h2>
<p class="muted">Versions registered in the period and every version holding an alias;
{older} older version(s) not shown.</p>
{_versions_table(versions)}
<h2>T-08 fairness over condition groups</h2>
{_trend_panels(versions)}
{"".join(_fairness_tables(v) for v in versions)}
<h2>Risk register</h2>
<p class="muted">Levels and live status from {_e(report["register"]["source"])}.</p>
{_register_table(report["register"]["rows"])}
{history}
<p class="muted">Generated {_e(report["generated_at"])} by scripts/report.py.</p>
</body></html>
"""


__all__ = [
    "REVIEW_DAYS",
    "REVIEW_ITEMS",
    "alert_records",
    "build_report",
    "check_model",
    "decision_text",
    "fairness_summary",
    "in_period",
    "iso",
    "period_start",
    "register_rows",
    "register_summary",
    "render_audit",
]
