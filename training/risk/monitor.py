"""The risk register, live: every monitor of a finished stage, its alerts and its report.

:func:`assess` turns what a stage produced -- test metrics, per-group confusion matrices,
the model, the data it trained on and the real data it was tested on, its wall time --
into the register's figures, named ``risk/<ID>/<metric>``:

* T-01 accuracy, precision, recall, F1 on real data;
* T-02 drift between the training data and the real test data: PSI and KS per image
  statistic and per embedding dimension, chi-square and PSI on condition groups and on
  the predicted class mix;
* T-04 GPU utilisation and memory (reported as not available without a GPU, never 0);
* T-05 the job's status (1 = failed);
* S-05 mIoU under FGSM, PGD and common corruptions, with the drop from clean
  (:func:`robustness_figures`);
* T-06 batch-1 inference latency, eager and optimized, with the agreement they keep
  (:func:`latency_figures`, beside :func:`assess`: it also gives tags saying how the
  figures were taken);
* T-08 fairness across condition groups (demographic parity, equal opportunity);
* T-09 the sim-to-real gap, with the source_only / oracle references when known;
* T-10 frames dropped by sensor-noise screening;
* O-01 the stage's cost against the daily budget.

Beside :func:`assess`, called by :func:`training.stages.monitoring.assess_risk`:
T-03 throughput and scaling (:mod:`training.risk.throughput`), T-07 the datasets read and
their verification (:mod:`training.risk.integrity`), S-01/S-02 the leak scan of what the
run logged (:mod:`training.risk.leaks`); :func:`publish` adds O-03, the register's own
coverage (:func:`coverage_figures`).

:func:`publish` evaluates the alert rules, logs the figures, the register with each
risk's live status (a table), the alerts and a self-contained HTML dashboard to MLflow.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.paths import config_dir

log = logging.getLogger(__name__)

CONFIG_DIR = config_dir() / "risk"


@dataclass
class StageEvidence:
    """What a stage leaves for the monitors (plain values, no config)."""

    stage: str
    test_metrics: Mapping[str, float]
    group_confusions: Mapping[str, np.ndarray]  # real test, per condition group
    class_names: Sequence[str]
    model: torch.nn.Module | None = None
    reference: Any = None  # dataset the model trained on (Sample dicts)
    current: Any = None  # real test dataset
    wall_seconds: float = 0.0
    devices: int = 1
    extra: dict[str, float] = field(default_factory=dict)  # e.g. screening, GPU figures


def _sample(dataset: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """Up to ``n`` samples of ``dataset``, a seeded choice in index order."""
    rng = np.random.default_rng(seed)
    idx = sorted(rng.choice(len(dataset), size=min(n, len(dataset)), replace=False).tolist())
    return [dataset[i] for i in idx]


def _sample_images(dataset: Any, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    samples = _sample(dataset, n, seed)
    return torch.stack([s["image"] for s in samples]), [str(s.get("group", "")) for s in samples]


def _counts(labels: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in labels:
        out[g] = out.get(g, 0) + 1
    return out


def _aligned(a: Mapping[str, int], b: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
    keys = sorted(set(a) | set(b))
    return np.array([a.get(k, 0) for k in keys]), np.array([b.get(k, 0) for k in keys])


def drift_metrics(
    model: torch.nn.Module | None, reference: Any, current: Any, samples: int = 128, seed: int = 0
) -> dict[str, float]:
    """T-02 figures between ``reference`` (training data) and ``current`` (real data)."""
    from training.risk import drift

    ref_img, ref_groups = _sample_images(reference, samples, seed)
    cur_img, cur_groups = _sample_images(current, samples, seed + 1)
    ref_f, names = drift.image_statistics(ref_img)
    cur_f, _ = drift.image_statistics(cur_img)
    categorical = {"condition_group": _aligned(_counts(ref_groups), _counts(cur_groups))}
    out: dict[str, float] = {}
    if model is not None:
        emb_r = drift.embedding_features(model, ref_img)
        emb_c = drift.embedding_features(model, cur_img)
        emb = drift.drift_report(emb_r, emb_c, [f"e{i}" for i in range(emb_r.shape[1])])
        keep = ("psi_max", "psi_mean", "ks_stat_max", "drifted_share")
        out.update({f"risk/T-02/embedding/{k}": float(emb["summary"][k]) for k in keep})
        with torch.no_grad():  # the predicted class mix, a categorical distribution
            model.eval()
            dev = next(model.parameters()).device
            mix_r = np.bincount(
                model(ref_img.to(dev)).argmax(1).flatten().cpu().numpy(),
                minlength=model.num_classes,
            )
            mix_c = np.bincount(
                model(cur_img.to(dev)).argmax(1).flatten().cpu().numpy(),
                minlength=model.num_classes,
            )
        categorical["predicted_class_mix"] = (mix_r, mix_c)
    report = drift.drift_report(ref_f, cur_f, names, categorical=categorical)
    out.update(report.metrics(prefix="risk/T-02/"))
    return out


def assess(
    evidence: StageEvidence, settings: Mapping[str, Any], cost_tracker: Any = None, run_id: str = ""
) -> dict[str, float]:
    """Every monitor's figures for a finished stage (see the module docstring).

    Args:
        evidence: what the stage produced.
        settings: the ``risk`` config block (drift samples, latency kinds and runs, ...).
        cost_tracker: a :class:`~training.risk.cost.CostTracker`, or None to skip O-01.
        run_id: the stage's MLflow run (the cost ledger's key).
    """
    from training.risk import fairness

    m = evidence.test_metrics
    out: dict[str, float] = {"risk/T-05/job_failed": 0.0}
    for key, name in (
        ("pixel_acc", "accuracy"),
        ("macro_precision", "precision"),
        ("macro_recall", "recall"),
        ("macro_f1", "f1"),
        ("miou", "miou"),
    ):
        if f"test/real/{key}" in m:
            out[f"risk/T-01/{name}"] = float(m[f"test/real/{key}"])
    for key in ("miou", "pixel_acc", "macro_f1"):
        if f"test/gap/{key}" in m:
            out[f"risk/T-09/gap_{key}"] = float(m[f"test/gap/{key}"])
    for ref, value in (settings.get("references") or {}).items():
        out[f"risk/T-09/{ref}_real_miou"] = float(value)
    if evidence.group_confusions:
        report = fairness.fairness_report(evidence.group_confusions, evidence.class_names)
        out.update(report.metrics(prefix="risk/T-08/"))
    if evidence.reference is not None and evidence.current is not None:
        out.update(
            drift_metrics(
                evidence.model,
                evidence.reference,
                evidence.current,
                int(settings.get("drift_samples", 128)),
            )
        )
    if cost_tracker is not None:
        from training.risk.cost import device_hours

        cost_tracker.record(
            run_id or evidence.stage,
            device_hours(evidence.wall_seconds, evidence.devices),
            devices=evidence.devices,
        )
        out.update(cost_tracker.metrics(run_id=run_id or evidence.stage, prefix="risk/O-01/"))
    out.update(evidence.extra)
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float)}


def check_settings(risk: Mapping[str, Any]) -> None:
    """The ``risk`` settings the monitors read, checked before any work: S-05's
    ``robustness``, T-04's ``system_metrics`` and S-01's ``leak_scan``; a
    :class:`~core.config.ConfigError` names the key."""
    from core.config import ConfigError
    from training.risk import robustness, system

    robustness.settings_from(risk)
    system.settings_from(risk)
    if not isinstance(risk.get("leak_scan", True), bool):
        raise ConfigError(f"risk.leak_scan={risk.get('leak_scan')!r}: expected true or false")


def latency_figures(
    model: Any, height: int, width: int, settings: Mapping[str, Any]
) -> tuple[dict[str, float], dict[str, str]]:
    """T-06: ``risk/T-06/*`` metrics and tags of ``model`` at batch 1, taken as
    :mod:`training.risk.latency` describes (warm-up, interleaved rounds, best round,
    pinned threads). ``settings`` is the ``risk`` block (``latency_*`` keys); no kinds,
    no figures."""
    from training.risk import latency

    if model is None or not settings.get("latency_kinds"):
        return {}, {}
    threads = settings.get("latency_threads")
    report = latency.latency_report(
        model,
        int(height),
        int(width),
        kinds=list(settings["latency_kinds"]),
        runs=int(settings.get("latency_runs", 20)),
        warmup=int(settings.get("latency_warmup", 20)),
        rounds=int(settings.get("latency_rounds", 3)),
        threads=None if threads is None else int(threads),
    )
    return report.metrics(prefix="risk/T-06/"), report.tags(prefix="risk/T-06/")


def robustness_figures(
    model: Any, dataset: Any, class_names: Sequence[str], settings: Mapping[str, Any]
) -> dict[str, float]:
    """S-05: ``risk/S-05/*`` figures of ``model`` on ``risk.robustness.frames`` labelled
    frames of ``dataset`` (the real test set; a seeded sample), under the attacks and
    corruptions of :mod:`training.risk.robustness`. Off (``frames: 0``), without a model
    or without labelled frames: no figures."""
    from training.risk import robustness

    options = robustness.settings_from(settings)
    if options is None or model is None or dataset is None or len(dataset) == 0:
        return {}
    samples = _sample(dataset, int(options.pop("frames")), seed=0)
    if any("mask" not in s for s in samples):
        return {}
    device = next(model.parameters()).device
    images = torch.stack([s["image"] for s in samples]).to(device)
    labels = torch.stack([torch.as_tensor(s["mask"]).long() for s in samples]).to(device)
    return robustness.robustness_figures(model, images, labels, class_names, **options)


def publish(
    client: Any,
    run_id: str,
    title: str,
    metrics: Mapping[str, float],
    output_dir: str | Path,
    tags: Mapping[str, str] | None = None,
    register_path: str | Path | None = None,
    alerts_path: str | Path | None = None,
    context: Mapping[str, float] | None = None,
    tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate alerts; log figures, register table, alerts and the dashboard to MLflow.

    Returns the fired alerts as dicts. A failing notifier never breaks the run: its failure
    is logged and recorded in the ``risk/notifier_failures`` tag and ``risk/alerts.json``.
    ``context`` holds figures already logged (``test/...``) that the dashboard also plots;
    ``tables`` (name -> rows) go to the dashboard and to ``risk/<name>.json``. O-03's
    coverage figures are added here (:func:`coverage_figures`); tag values pass through
    :func:`~training.risk.leaks.redact_secrets` first.
    """
    from training.risk.alerts import AlertManager
    from training.risk.dashboard import render_dashboard
    from training.risk.leaks import redact_secrets
    from training.risk.register import RiskRegister

    output_dir = Path(output_dir)
    register = RiskRegister.load(register_path or CONFIG_DIR / "register.yaml")
    manager = AlertManager.load(alerts_path or CONFIG_DIR / "alerts.yaml", output_dir)
    finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
    finite.update(coverage_figures(register, finite))
    alerts = manager.process(finite)
    fired = [a.to_dict() for a in alerts if a.fired]
    for a in fired:
        a["message"] = a.get("message") or f"{a['metric']} {a['op']} {a['threshold']}"
    failures = [f.to_dict() for f in manager.failures]
    rows = register.live_status(finite, [a for a in alerts if a.fired])
    client.log_batch(run_id, metrics=_metric_entities(finite))
    tags = {k: redact_secrets(str(v))[:5000] for k, v in (tags or {}).items()}
    unmonitored = [r["id"] for r in rows if r["live_status"] == "not_monitored"]
    tags["risk/O-03/not_monitored"] = ",".join(unmonitored) or "none"
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_tag(run_id, "risk/alerts_fired", ",".join(a["rule"] for a in fired) or "none")
    if failures:
        client.set_tag(run_id, "risk/notifier_failures", json.dumps(failures)[:5000])
    client.log_table(run_id, data=_columns(rows), artifact_file="risk/register.json")
    for name, table in (tables or {}).items():
        if table:
            client.log_table(run_id, data=_columns(table), artifact_file=f"risk/{name}.json")
    client.log_dict(run_id, {"alerts": fired, "notifier_failures": failures}, "risk/alerts.json")
    shown = {**{k: v for k, v in (context or {}).items() if math.isfinite(v)}, **finite}
    page = render_dashboard(title, shown, rows, fired, notes=tags, tables=tables)
    path = output_dir / "risk_dashboard.html"
    path.write_text(page, encoding="utf-8")
    client.log_artifact(run_id, str(path), artifact_path="risk")
    return fired


def coverage_figures(register: Any, figures: Mapping[str, float]) -> dict[str, float]:
    """O-03 (insufficient monitoring): how much of the register this run measures.

    ``risk/O-03/coverage`` is the share of the register's rows with at least one figure,
    O-03 itself counted as measured (by this figure); ``monitored`` and
    ``not_monitored`` are the row counts (the ids are the ``risk/O-03/not_monitored``
    tag)."""
    measured = {key.split("/")[1] for key in figures if key.startswith("risk/")}
    measured.add("O-03")
    ids = list(register.ids)
    monitored = sum(1 for risk_id in ids if risk_id in measured)
    return {
        "risk/O-03/coverage": monitored / len(ids) if ids else 0.0,
        "risk/O-03/monitored": float(monitored),
        "risk/O-03/not_monitored": float(len(ids) - monitored),
    }


def _metric_entities(metrics: Mapping[str, float]) -> list[Any]:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in metrics.items()]


def _columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Rows -> MLflow table columns (nested values as JSON text)."""
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    return {
        k: [
            v if isinstance(v, str | int | float) or v is None else json.dumps(v, default=str)
            for v in (r.get(k) for r in rows)
        ]
        for k in keys
    }
