"""The MLflow parent run of a whole pipeline: every stage run nests under it.

One call of :func:`training.stages.run_train` is one pipeline -- generate, adapt (train
the CycleGAN and translate), pretrain and fine-tune, evaluate, assess the risk register,
register the model. :class:`PipelineRun` opens a parent run for it, named by the hash of
the resolved config, so a rerun of the same command (after a kill, or to add nothing)
resumes the same parent; the stage runs carry ``mlflow.parentRunId`` and show nested in
MLflow's UI. A stage reused from an earlier pipeline keeps its own parent; the new parent
lists it in ``pipeline/stages.json`` and, in a sweep, it gains the tag ``sweep/<id>``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.hashing import content_hash
from training.tracking import redact_uri

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
    return content_hash(blob)


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
            self.client.set_tag(self.run_id, "failure", redact_uri(repr(error))[:500])
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception as report_error:  # noqa: BLE001
            log.error("could not mark pipeline run %s failed: %s", self.run_id, report_error)
