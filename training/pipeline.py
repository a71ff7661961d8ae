"""The MLflow parent run of a whole pipeline: every stage run nests under it.

One call of :func:`training.run.run_train` is one pipeline -- generate, (train the
CycleGAN and translate), pretrain, adapt and fine-tune, evaluate, assess the risk register,
register the model. :class:`PipelineRun` opens a parent run for it, named by the hash of
the resolved config, so a rerun of the same command (after a kill, or to add nothing)
resumes the same parent; the stage runs carry ``mlflow.parentRunId`` and show nested in
MLflow's UI. A stage reused from an earlier pipeline keeps its own parent; the new parent
lists it in ``pipeline/stages.json`` and, in a sweep, it gains the tag ``sweep/<id>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Config keys that never change a pipeline's result (where it writes, how it reports).
NOT_RESULT_KEYS = ("paths", "tracking", "progress", "hydra")
PARENT_TAG = "mlflow.parentRunId"


def pipeline_hash(config: Mapping[str, Any]) -> str:
    """12 hex digits over a plain resolved config, minus :data:`NOT_RESULT_KEYS`, plus the
    sweep id: each sweep job gets a parent run of its own (its stages may still be reused),
    and rerunning the sweep resumes them."""
    blob = {k: v for k, v in config.items() if k not in NOT_RESULT_KEYS}
    blob["sweep_id"] = (config.get("tracking") or {}).get("sweep_id")
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


class PipelineRun:
    """The parent MLflow run of one pipeline, created or resumed.

    Args:
        client: an ``MlflowClient`` on the tracking store.
        experiment: MLflow experiment name (created with ``artifact_location`` if absent).
        name: the pipeline's name (``cfg.name``), for the run name and the tags.
        digest: :func:`pipeline_hash` of its config.
        folder: where the parent's run id is kept (``<output>/pipelines/<name>-<digest>``).
        tags: more tags for a new parent run (sweep id, git commit, trigger).
        artifact_location: for a new experiment (the local store keeps artifacts in the
            output folder).
        kind: the ``stage`` tag: ``pipeline`` (one run_train call) or ``study`` (the runs
            of scripts/pipeline.py, one pipeline per adaptation method, nest under it).
        label: the run name's suffix (default ``kind``).
    """

    def __init__(
        self,
        client: Any,
        experiment: str,
        name: str,
        digest: str,
        folder: Path,
        tags: Mapping[str, str] | None = None,
        artifact_location: str | None = None,
        kind: str = "pipeline",
        label: str | None = None,
    ) -> None:
        self.client = client
        self.folder = Path(folder)
        exp = client.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else client.create_experiment(experiment, artifact_location=artifact_location)
        )
        id_file = self.folder / "run_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        if run_id is not None and not self._exists(run_id):
            run_id = None  # the store was reset: start a new parent
        if run_id is None:
            run = client.create_run(
                exp_id,
                run_name=f"{name}/{label or kind}",
                tags={
                    "stage": kind,
                    "experiment": name,
                    "config_hash": digest,
                    **{k: v for k, v in (tags or {}).items() if v},
                },
            )
            run_id = run.info.run_id
            self.folder.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
        else:
            client.update_run(run_id, status="RUNNING")
            log.info("pipeline %s: resuming parent run %s", name, run_id)
        self.run_id: str = run_id
        self.sweep_id = str((tags or {}).get("sweep_id") or "")

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def child_tags(self) -> dict[str, str]:
        """Tags that nest a new stage run under this parent."""
        return {PARENT_TAG: self.run_id}

    def reused(self, run_id: str) -> None:
        """A finished stage run reused by this pipeline: findable from the sweep too."""
        if self.sweep_id:
            self.client.set_tag(run_id, f"sweep/{self.sweep_id}", "reused")

    def finish(self, results: Mapping[str, Any], table: str, prefix: str = "") -> None:
        """Log each stage's ``test/*`` figures as ``<stage>/<metric>``, the stage runs and
        the summary table, and mark the parent finished."""
        from mlflow.entities import Metric

        stages = {}
        metrics = []
        for key, res in results.items():
            stages[prefix + key] = {
                "run_id": res.run_id,
                "reused": bool(res.skipped),
                "alerts": list(getattr(res, "alerts", []) or []),
            }
            slug = prefix + key.replace(" ", "_").replace("(", "").replace(")", "")
            for metric, value in res.metrics.items():
                if metric.startswith("test/") and math.isfinite(value):
                    metrics.append(Metric(f"{slug}/{metric}", float(value), 0, 0))
        for start in range(0, len(metrics), 900):  # MLflow's batch limit is 1000
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 900])
        self.client.log_dict(self.run_id, stages, "pipeline/stages.json")
        self.client.log_text(self.run_id, table + "\n", "pipeline/summary.md")
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, error: BaseException) -> None:
        """Mark the parent failed with the error; never raises (the error matters more)."""
        try:
            self.client.set_tag(self.run_id, "failure", repr(error)[:500])
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception as report_error:  # noqa: BLE001
            log.error("could not mark pipeline run %s failed: %s", self.run_id, report_error)


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
    from omegaconf import OmegaConf

    from simulation.configuration import ConfigError
    from training.run import adaptation_parts, check_stages

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
                "in configs/adaptation/ (none, dann, cyclegan, cyclegan_dann)"
            ) from None
        OmegaConf.resolve(cfg)
        check_stages(cfg)
        adaptation_parts(cfg)
        configs[str(method)] = cfg
    return configs


def run_pipeline(cfg: Any, overrides: list[str]) -> tuple[dict[str, dict[str, Any]], str]:
    """Run the training pipeline of each method in ``cfg.methods`` under one MLflow parent
    run; return the results by method and the summary table."""
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from training import tracking
    from training.run import run_train

    configs = compose_methods(cfg.methods, overrides)
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
        study.fail(exc)
        raise
    table = summary_table(by_method)
    flat = {
        f"{m} {stage}": res for m, results in by_method.items() for stage, res in results.items()
    }
    study.finish(flat, table)
    return by_method, table
