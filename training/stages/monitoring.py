"""After a stage: the risk register's monitors, the job-failure alert, the model registry.

Each function takes plain settings (the resolved ``risk`` and ``registry`` sections as
dicts) and what the stage produced; nothing here reads the whole config.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from training.tracking import redact_uri

log = logging.getLogger(__name__)


def publish_risk(
    client: Any,
    run_id: str,
    label: str,
    run_dir: Path,
    figures: Mapping[str, float],
    tags: Mapping[str, str],
    risk: Mapping[str, Any],
    context: Mapping[str, float] | None = None,
    tables: Mapping[str, list[dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """Publish register figures to a stage's run and evaluate the alert rules (every alert
    that fired goes to the log once, through the alert manager); returns them."""
    from training.risk.monitor import publish

    fired = publish(
        client,
        run_id,
        label,
        figures,
        run_dir,
        tags=tags,
        register_path=risk.get("register"),
        alerts_path=risk.get("alerts"),
        context=context,
        tables=tables,
    )
    # each alert is logged once, by the alert manager's log notifier ("ALERT [T-01] ...")
    return fired


def job_failed(
    client: Any, run_id: str, label: str, run_dir: Path, risk: Mapping[str, Any], error: Any
) -> None:
    """T-05: the job-failure alert of a failed stage, with the error."""
    publish_risk(
        client,
        run_id,
        label,
        run_dir,
        {"risk/T-05/job_failed": 1.0},
        {"error": redact_uri(repr(error))[:500]},
        risk,
    )


def assess_risk(
    client: Any,
    run_id: str,
    label: str,
    run_dir: Path,
    *,
    risk: Mapping[str, Any],
    output: Path,
    task: Any,
    reference: Any,
    current: Any,
    metrics: Mapping[str, float],
    wall_seconds: float,
    devices: int,
    gpu: Any,
    earlier: Mapping[str, float] | None,
    references: Mapping[str, float] | None,
    datasets: Mapping[str, Any] | None = None,
    throughput: Any = None,
) -> dict[str, float]:
    """The register's monitors for a finished stage, published to its MLflow run.

    Args:
        risk: the resolved ``risk`` settings.
        output: ``paths.output`` (the cost ledger lives there).
        task: the fitted :class:`~training.task.SegmentationTask` (model, test confusions).
        reference, current: the training-side and the real test (else validation) sets
            compared for drift (T-02).
        metrics: the stage's test figures.
        wall_seconds, devices: training time over all sessions and processes (O-01).
        gpu: the stage's GPU monitor (T-04) or None.
        earlier: figures measured before, published with these (T-10 screening, O-02).
        references: T-09's reference mIoUs.
        datasets: the datasets the stage read, by role (T-07).
        throughput: the stage's :class:`~training.risk.throughput.ThroughputMeter` (T-03),
            None when it did not train in this session.
    """
    from training.risk.cost import CostTracker
    from training.risk.monitor import (
        StageEvidence,
        assess,
        latency_figures,
        robustness_figures,
    )

    extra = dict(earlier or {})
    tags: dict[str, str] = {}
    if gpu is not None:
        extra.update(gpu.metrics())
        tags.update(gpu.tags())
    cost_cfg = risk["cost"]
    cost = CostTracker(
        Path(output) / "cost_ledger.json",
        float(cost_cfg["price_per_device_hour"]),
        float(cost_cfg["daily_budget"]),
        currency=str(cost_cfg["currency"]),
    )
    evidence = StageEvidence(
        stage=label.rsplit("/", 1)[-1],
        test_metrics=metrics,
        group_confusions=task.test_group_confusions.get("real", {}),
        class_names=task.class_names,
        model=task.model,
        reference=reference,
        current=current,
        wall_seconds=wall_seconds,
        devices=devices,
        extra=extra,
    )
    settings = {**dict(risk), "references": dict(references or {})}
    figures = assess(evidence, settings, cost_tracker=cost, run_id=run_id)
    height, width = current[0]["image"].shape[-2:] if current else (128, 256)
    latency, latency_tags = latency_figures(task.model, height, width, risk)
    figures.update(latency)
    figures.update(robustness_figures(task.model, current, task.class_names, risk))
    tags.update(latency_tags)
    tables: dict[str, list[dict[str, Any]]] = {}
    if datasets:
        from training.risk.integrity import dataset_rows, integrity_figures

        rows = dataset_rows(datasets)
        integrity, integrity_tags = integrity_figures(rows)
        figures.update(integrity)
        tags.update(integrity_tags)
        tables["T-07_datasets"] = rows
    if throughput is not None:
        from training.risk.throughput import ScalingLedger, throughput_figures, workload_key

        key = workload_key(label.rsplit("/", 1)[-1], throughput.work, throughput.batch_size)
        scaling, scaling_tags = throughput_figures(
            throughput.images,
            throughput.seconds,
            devices,
            key,
            ScalingLedger(Path(output) / "throughput_ledger.json"),
            run_id=run_id,
        )
        figures.update(scaling)
        tags.update(scaling_tags)
    if risk.get("leak_scan", True):
        from training.risk.leaks import scan_run

        scan = scan_run(client, run_id, pending_tags=tags, folders=[run_dir])
        figures.update(scan.figures())
        tags.update(scan.tags())
    publish_risk(
        client, run_id, label, run_dir, figures, tags, risk, context=metrics, tables=tables
    )
    return figures


def register_and_compare(
    uri: str,
    run_id: str,
    registry: Mapping[str, Any],
    val_loader: Any,
    num_classes: int,
    seed: int,
    model: Any = None,
) -> dict[str, float]:
    """Register the stage's model; a challenger is A/B-compared with the champion on the
    validation images of ``val_loader`` (real when the stage has them) and promoted only
    if it wins by the margin (T-01).

    First (O-02) the new version's exported program, loaded in a fresh process, must
    predict what ``model`` (the in-memory checkpoint) predicts on the first
    ``registry.deploy_images`` validation images (:mod:`training.risk.deploy`). A version
    that fails is tagged ``decision=not_deployable`` (run and version) and loses its alias:
    a challenger is never compared nor promoted (the champion stays); a first version does
    not become champion (deployment finds no champion rather than a wrong one; the next
    deployable version becomes the first champion). Without ``model`` the check is skipped
    with a warning."""
    from mlflow.tracking import MlflowClient

    from training.risk import deploy
    from training.risk.registry import CHALLENGER, ModelRegistry, per_image_scores

    deploy_settings = deploy.settings_from(registry)  # a bad registry.deploy_* key: stop here
    models = ModelRegistry(uri, name=str(registry["name"]))
    client = MlflowClient(uri)
    if "registry/version" in client.get_run(run_id).data.tags:
        return {}  # a rerun after a crash past registration: never register twice
    version = models.register(run_id)
    client.set_tag(run_id, "registry/version", version)
    first = models.aliases().get(CHALLENGER) != version
    figures: dict[str, float] = {}
    if deploy_settings is None:
        log.info("registry %s: deployability check off (deploy_images: 0)", models.name)
    elif model is None:
        log.warning("registry %s v%s: no in-memory model, O-02 not checked", models.name, version)
    else:
        check = deploy.check_deployable(
            uri,
            models.name,
            version,
            model,
            deploy.probe_images(val_loader, deploy_settings.images),
            min_agreement=deploy_settings.min_agreement,
            timeout_s=deploy_settings.timeout_s,
        )
        figures = check.figures()
        for key, value in figures.items():
            client.log_metric(run_id, key, value)
        client.set_tag(run_id, "risk/O-02/reason", check.reason[:5000])
        for key, value in check.tags().items():
            models.client.set_model_version_tag(models.name, version, key, value)
        if not check.deployable:
            client.set_tag(run_id, "registry/decision", "not_deployable")
            # the version keeps its artifacts but no alias: never served, never promoted
            models.withdraw(version, "not_deployable", check.reason[:5000])
            log.error(
                "registry %s v%s NOT DEPLOYABLE: %s; %s",
                models.name,
                version,
                check.reason,
                "no champion until a deployable version is registered"
                if first
                else "the champion stays",
            )
            return {"registry/promoted": 0.0, **figures}
    if first:
        client.set_tag(run_id, "registry/decision", "first_champion")
        return {"registry/promoted": 1.0, **figures}
    comparison = models.compare(
        lambda candidate: per_image_scores(
            candidate, val_loader, num_classes, metric=str(registry["metric"]), batch_forward=True
        ),
        margin=float(registry["margin"]),
        confidence=float(registry["confidence"]),
        seed=int(seed),
    )
    promoted = models.promote(comparison)
    client.set_tag(run_id, "registry/decision", "promoted" if promoted else "kept_champion")
    log.info(
        "registry %s: challenger v%s %s (diff %.4f, CI [%.4f, %.4f], margin %.3f)",
        registry["name"],
        version,
        "promoted" if promoted else "not promoted",
        comparison.diff,
        comparison.ci_low,
        comparison.ci_high,
        comparison.margin,
    )
    return {
        "registry/promoted": float(promoted),
        "registry/diff": comparison.diff,
        "registry/ci_low": comparison.ci_low,
        "registry/ci_high": comparison.ci_high,
        **figures,
    }
