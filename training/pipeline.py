"""``scripts/pipeline.py``: one training pipeline per adaptation method under one MLflow
"study" run, and the summary table across them (see :mod:`training.stages.parent`)."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from training.stages.parent import PipelineRun, pipeline_hash

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ scripts/pipeline.py
SUMMARY_COLUMNS = (
    ("sim mIoU", "test/sim/miou"),
    ("real mIoU", "test/real/miou"),
    ("gap (sim - real)", "test/gap/miou"),
)


def summary_table(by_method: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per (method, stage): test mIoU on sim and real (%), their gap, the
    alert rules that fired, and whether the stage was reused from an earlier run."""
    head = ["method", "stage", *(c for c, _ in SUMMARY_COLUMNS), "alerts fired", "run"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method, results in by_method.items():
        for stage, res in results.items():
            cells = []
            for _, key in SUMMARY_COLUMNS:
                v = res.metrics.get(key, math.nan)
                cells.append(f"{100 * v:.1f}" if math.isfinite(v) else "n/a")
            alerts = ", ".join(res.alerts) or "none"
            state = "reused" if res.skipped else "trained"
            lines.append(
                f"| {method} | {stage} | " + " | ".join(cells) + f" | {alerts} | {state} |"
            )
    return "\n".join(lines)


def compose_methods(methods: Any, overrides: list[str]) -> dict[str, Any]:
    """One training config per adaptation method, composed like ``scripts/train.py`` with
    the user's overrides plus ``adaptation=<method>``; every one checked before any work
    (unknown method, bad stages, bad adaptation keys)."""
    from hydra import compose
    from hydra.errors import MissingConfigException

    from core.config import ConfigError
    from core.paths import config_dir
    from training.stages import check_config

    if not methods or isinstance(methods, str):
        raise ConfigError(f"methods: expected a list of adaptation methods, got {methods!r}")
    configs = {}
    kept = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith("methods")]
    for method in methods:
        try:
            cfg = compose("pipeline", overrides=[*kept, f"adaptation={method}"])
        except MissingConfigException:
            raise ConfigError(
                f"methods: unknown adaptation method {method!r}; expected one of the configs "
                f"in configs/adaptation/ ({', '.join(_adaptation_configs(config_dir()))})"
            ) from None
        check_config(copy.deepcopy(cfg))  # run_train resolves (and checks) its own copy
        configs[str(method)] = cfg
    return configs


def _adaptation_configs(configs: Path) -> list[str]:
    return sorted(p.stem for p in (configs / "adaptation").glob("*.yaml"))


def run_pipeline(cfg: Any, overrides: list[str]) -> tuple[dict[str, dict[str, Any]], str]:
    """Run the training pipeline of each method in ``cfg.methods`` under one MLflow parent
    run; return the results by method and the summary table."""
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from training import tracking
    from training.stages import run_train
    from training.tracking_server import check_tracking_config

    configs = compose_methods(cfg.methods, overrides)
    check_tracking_config(cfg)  # before the study's own MLflow client opens the store
    plain = OmegaConf.to_container(cfg, resolve=True)
    digest = pipeline_hash(plain)
    uri = tracking.tracking_uri(cfg.paths.output, cfg.tracking.uri)
    study = PipelineRun(
        MlflowClient(uri),
        str(cfg.tracking.experiment),
        str(cfg.name),
        digest,
        Path(cfg.paths.output) / "pipelines" / f"{cfg.name}-study-{digest}",
        tags={
            "sweep_id": str(cfg.tracking.sweep_id or ""),
            "git_commit": tracking.git_commit(),
            "methods": ",".join(configs),
        },
        artifact_location=tracking.artifact_location(cfg.paths.output, uri),
        kind="study",
    )
    by_method: dict[str, dict[str, Any]] = {}
    try:
        for method, method_cfg in configs.items():
            log.info("pipeline %s: method %s", cfg.name, method)
            by_method[method] = run_train(
                method_cfg, parent_run_id=study.run_id, label=f"pipeline-{method}"
            )
    except BaseException as exc:
        from training.preemption import end_parent

        end_parent(study, exc)  # preempted: KILLED, to be resumed; else failed
        raise
    table = summary_table(by_method)
    flat = {
        f"{m} {stage}": res for m, results in by_method.items() for stage, res in results.items()
    }
    study.finish(flat, table)
    return by_method, table
