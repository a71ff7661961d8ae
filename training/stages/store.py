"""The stage store: the one protocol every trained thing of a run follows.

A *stage* is anything a run trains and keeps: a segmentation stage, a CycleGAN, later a
teacher. Each lives in ``<output>/runs/<kind>-<digest>/``, named by the hash of what
decides its result (:mod:`core.hashing`), and goes through the same steps:

1. **finished?** ``done.json`` in the folder: the stage is reused as it is (and, in a
   sweep, its run is tagged for the sweep that reused it);
2. **open** the MLflow run: the same run when the folder holds its id (a resumed stage),
   else a new one, tagged and nested under the pipeline's parent run;
3. **fit** with Lightning from the folder's ``checkpoints/last.ckpt`` when there is one
   (or a newer SLURM requeue checkpoint, :func:`training.preemption.resume_checkpoint`),
   retried from the last checkpoint after a transient failure (risk T-05), the training
   seconds of every session added up (O-01);
4. **finish**: ``done.json`` written atomically with what the stage produced; any error
   before that marks the run failed (tag, the ``on_failure`` hook, ``FAILED``) and is
   raised again.

A SIGTERM while Lightning fits or tests (spot reclaim, SLURM preemption) is no failure:
the fit saves ``checkpoints/last.ckpt`` where it stopped, the run is tagged
``preempted_<n>`` and ended ``KILLED``, and :class:`training.preemption.Preempted` (exit
status 75) is raised instead; the rerun reopens the run (``RUNNING``) and resumes.

Under DDP every rank trains; only rank zero writes the folder's files and logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import ConfigError
from core.files import atomic_write_json, atomic_write_text
from training import preemption
from training.stages.specs import TrackingSpec
from training.tracking import redact_uri

log = logging.getLogger(__name__)

DONE = "done.json"
RUN_ID = "mlflow_run_id.txt"
WALL = "wall_seconds.txt"
#: Test figures named in the one console line a finished stage gets.
SUMMARY_METRICS = ("test/sim/miou", "test/real/miou")


@dataclass
class StageRecord:
    """A finished stage: its folder, MLflow run and what it left (``done.json``)."""

    kind: str
    digest: str
    run_dir: Path
    run_id: str
    values: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


def is_transient(error: BaseException) -> bool:
    """Whether a failed fit may succeed when retried from its last checkpoint: I/O and
    network errors, device and runtime errors (CUDA, NCCL, out of memory), tracking-server
    errors. A config error, a value, type, key or index error is deterministic: retrying
    it only repeats the work (and an interrupt is the user's or the scheduler's)."""
    if isinstance(error, ConfigError | NotImplementedError | RecursionError):
        return False
    if isinstance(error, OSError | RuntimeError):
        return True
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return False
    return isinstance(error, MlflowException)


class StageRun:
    """One open stage: its folder, MLflow logger and run id; see the module doc."""

    def __init__(self, store: StageStore, kind: str, digest: str, logger: Any, fresh: bool) -> None:
        self.store, self.kind, self.digest = store, kind, digest
        self.run_dir = store.folder(kind, digest)
        self.logger = logger
        self.run_id: str = logger.run_id if store.is_zero else ""
        self.fresh = fresh
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.wall_seconds = 0.0
        self.trainer: Any = None
        #: the checkpoint the last fit saved on SIGTERM (:mod:`training.preemption`)
        self.guard: Any = None

    @property
    def client(self) -> Any:
        return self.logger.experiment

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log ``params`` (nested, redacted, flattened) to a new run; rank zero only."""
        from training import tracking

        if self.store.is_zero:
            self.logger.log_hyperparams(tracking.flatten(tracking.redact(dict(params))))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.store.is_zero:
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def resume_checkpoint(self) -> Path | None:
        """The checkpoint :meth:`fit` resumes from: the newer of ``checkpoints/last.ckpt``
        and a SLURM requeue's ``hpc_ckpt_<n>.ckpt``, or None."""
        return preemption.resume_checkpoint(self.run_dir)

    def fit(
        self,
        module: Any,
        *,
        callbacks: Sequence[Any] = (),
        datamodule: Any = None,
        train_dataloaders: Any = None,
        **trainer_kwargs: Any,
    ) -> Any:
        """Fit ``module``, resuming from ``checkpoints/last.ckpt`` when present; a
        transient failure (:func:`is_transient`) is retried from the last checkpoint up to
        the store's ``retries``. Returns the trainer."""
        store = self.store
        started = time.perf_counter()
        # no layer table per stage unless the trainer config asks for one (a config of an
        # earlier run, as the monitor's retraining reads, may not say)
        if "enable_model_summary" not in getattr(store.make_trainer, "keywords", {}):
            trainer_kwargs.setdefault("enable_model_summary", False)
        if store.is_zero:
            preemption.remove_partial(self.checkpoint_dir)  # a save killed half-way
        try:
            for attempt in range(store.retries + 1):
                resume = self.resume_checkpoint()
                if resume is not None and store.is_zero:
                    where = preemption.checkpoint_position(resume)
                    log.info(
                        "%s: resuming from %s",
                        self.kind,
                        preemption.describe(resume, where, self.run_dir),
                    )
                self.guard = preemption.preemption_checkpoint(self.checkpoint_dir)
                self.trainer = store.make_trainer(
                    logger=self.logger,
                    callbacks=[*callbacks, self.guard],
                    default_root_dir=str(self.run_dir),
                    use_distributed_sampler=False,
                    enable_progress_bar=store.progress,
                    **trainer_kwargs,
                )
                try:
                    self.trainer.fit(
                        module,
                        datamodule=datamodule,
                        train_dataloaders=train_dataloaders,
                        ckpt_path=str(resume) if resume is not None else None,
                        weights_only=True,
                    )
                    break
                except Exception as exc:  # a SIGTERM stop (SystemExit) is not retried here
                    if not is_transient(exc):  # a bug or a bad input fails the same again
                        raise
                    if store.is_zero:
                        failure = redact_uri(repr(exc))[:500]  # an MLflow error may hold the URI
                        self.client.set_tag(self.run_id, f"failure_{attempt}", failure)
                    if attempt == store.retries:
                        raise
                    since = preemption.resume_checkpoint(self.run_dir) or "the start"
                    log.warning(
                        "%s failed (%s); retry %d/%d from %s",
                        self.kind,
                        exc,
                        attempt + 1,
                        store.retries,
                        since,
                    )
        finally:
            self.wall_seconds = self._add_wall_time(time.perf_counter() - started)
        return self.trainer

    def summary_line(self, values: Mapping[str, Any]) -> str:
        """The stage's one console line: time, test mIoU, alerts, run id."""
        metrics = values.get("metrics") or {}
        figures = [
            f"{key} {float(metrics[key]):.3f}"
            for key in SUMMARY_METRICS
            if isinstance(metrics.get(key), (int, float))
        ]
        alerts = ", ".join(values.get("alerts") or []) or "none"
        return (
            f"{self.kind}: finished in {self.wall_seconds:.1f} s"
            + (f", {', '.join(figures)}" if figures else "")
            + f", alerts {alerts}, run {self.run_id}"
        )

    def _add_wall_time(self, seconds: float) -> float:
        """Training seconds over all sessions of this stage (a resumed stage costs what
        every session spent, O-01)."""
        path = self.run_dir / WALL
        total = (float(path.read_text()) if path.exists() else 0.0) + seconds
        if self.store.is_zero:
            atomic_write_text(path, f"{total:.3f}")
        return total

    def finish(self, values: Mapping[str, Any]) -> StageRecord:
        """Write ``done.json`` with ``values`` (rank zero) and close the run as finished."""
        if self.store.is_zero:
            atomic_write_json(self.run_dir / DONE, {"run_id": self.run_id, **values})
            for requeued in self.run_dir.glob(preemption.HPC_GLOB):  # resume-only copies
                requeued.unlink(missing_ok=True)
            log.info("%s", self.summary_line(values))
        self.logger.close("success")
        return StageRecord(self.kind, self.digest, self.run_dir, self.run_id, dict(values))


class StageStore:
    """Stage folders, MLflow runs and training under one protocol (module doc).

    Args:
        output: ``paths.output``; stages live in ``<output>/runs/``, locks in
            ``<output>/locks/``.
        tracking: where and how runs are logged.
        experiment_name: the run's name (``cfg.name``), for run names and tags.
        make_trainer: ``**kwargs -> pl.Trainer`` (the trainer config, ``_partial_``).
        retries: reruns of a failed fit from its last checkpoint.
        progress: show Lightning's progress bar.
        world_size: processes training together (locks only when 1: DDP ranks share).
        is_zero: whether this process is rank zero.
        parent: the pipeline's parent run (``training.stages.parent.PipelineRun``).
        on_failure: ``(run, error) -> None`` reporting a failed stage (the T-05 alert);
            its own errors are logged, never allowed to hide the stage's.
    """

    def __init__(
        self,
        output: Path,
        tracking: TrackingSpec,
        experiment_name: str,
        make_trainer: Callable[..., Any],
        retries: int = 0,
        progress: bool = False,
        world_size: int = 1,
        is_zero: bool = True,
        parent: Any = None,
        on_failure: Callable[[StageRun, BaseException], None] | None = None,
    ) -> None:
        self.output = Path(output)
        self.tracking = tracking
        self.experiment_name = experiment_name
        self.make_trainer = make_trainer
        self.retries = int(retries)
        self.progress = bool(progress)
        self.world_size = int(world_size)
        self.is_zero = bool(is_zero)
        self.parent = parent
        self.on_failure = on_failure

    def folder(self, kind: str, digest: str) -> Path:
        return self.output / "runs" / f"{kind}-{digest}"

    def lock(self, name: str, what: str) -> contextlib.AbstractContextManager[None]:
        """An inter-process lock on ``<output>/locks/<name>.lock`` for work that parallel
        sweep jobs may share; none under DDP, where the ranks of one job work together."""
        from core.locks import exclusive

        if self.world_size != 1:
            return contextlib.nullcontext()
        return exclusive(self.output / "locks" / f"{name}.lock", what)

    def finished(self, kind: str, digest: str) -> StageRecord | None:
        """The record of a stage that finished earlier, else None."""
        done = self.folder(kind, digest) / DONE
        if not done.exists():
            return None
        values = json.loads(done.read_text())
        run_id = values.pop("run_id")
        log.info("%s: finished earlier in %s, skipped", kind, done.parent)
        if self.parent is not None:
            self.parent.reused(run_id)
        return StageRecord(kind, digest, done.parent, run_id, values, skipped=True)

    @contextlib.contextmanager
    def open(
        self, kind: str, digest: str, tags: Mapping[str, str] | None = None
    ) -> Iterator[StageRun]:
        """Open (or resume) the MLflow run of stage ``kind-digest``; an error inside the
        block marks it failed and is raised again."""
        run_dir = self.folder(kind, digest)
        run_dir.mkdir(parents=True, exist_ok=True)
        logger, earlier = self._logger(kind, digest, run_dir, tags)
        run = StageRun(self, kind, digest, logger, fresh=earlier is None)
        if self.is_zero:
            atomic_write_text(run_dir / RUN_ID, run.run_id)
            if not run.fresh:  # a resumed run is running again (it may show KILLED)
                run.client.update_run(run.run_id, status="RUNNING")
        try:
            yield run
        except BaseException as exc:
            if preemption.is_preemption(exc):
                raise self._preempted(run) from exc
            if isinstance(exc, Exception) and self.is_zero:  # a kill leaves it to resume
                self._mark_failed(run, exc)
            raise

    def _preempted(self, run: StageRun) -> preemption.Preempted:
        """Record a SIGTERM stop (tag ``preempted_<n>``, ``KILLED``; rank zero) and return
        the exit to raise: no T-05 alert, no ``failed`` tag."""
        guard = run.guard
        if guard is not None and guard.saved is not None:
            where = "saved " + preemption.describe(guard.saved, guard.position, run.run_dir)
        else:  # stopped after the fit (testing): its last checkpoint resumes it
            where = "after the fit; resumes from its last checkpoint"
        note = f"SIGTERM; {where}"
        if self.is_zero:
            preemption.mark_preempted(run.client, run.run_id, note, tag="preempted_")
        message = (
            f"{run.kind}: preempted by SIGTERM, {where}; exit status "
            f"{preemption.EXIT_PREEMPTED}: rerun the same command to resume"
        )
        if self.is_zero:
            log.warning("%s", message)
        return preemption.Preempted(message)

    def _logger(
        self, kind: str, digest: str, run_dir: Path, tags: Mapping[str, str] | None
    ) -> tuple[Any, str | None]:
        from training import tracking

        id_file = run_dir / RUN_ID
        run_id = id_file.read_text().strip() if id_file.exists() else None
        spec = self.tracking
        if run_id is not None and not _run_exists(spec.uri, run_id):
            log.warning("%s: run %s is not in the tracking store; starting a new run", kind, run_id)
            run_id = None
        all_tags = {
            "stage": kind,
            "experiment": self.experiment_name,
            "config_hash": digest,
            "git_commit": tracking.git_commit(),
            "sweep_id": spec.sweep_id,
            **dict(tags or {}),
        }
        if spec.trigger:
            all_tags["trigger"] = spec.trigger
        if self.parent is not None and run_id is None:
            all_tags.update(self.parent.child_tags())
        logger = _stage_logger_class()(
            experiment_name=spec.experiment,
            run_name=f"{self.experiment_name}/{kind}",
            tracking_uri=spec.uri,
            tags=all_tags,
            run_id=run_id,
            artifact_location=spec.artifact_location,
        )
        return logger, run_id

    def _mark_failed(self, run: StageRun, exc: BaseException) -> None:
        """Tag the run failed, report it (``on_failure``) and close it as failed; an error
        while reporting is logged, never allowed to hide the original one."""
        try:
            run.client.set_tag(run.run_id, "status", "failed")
            if self.on_failure is not None:
                self.on_failure(run, exc)
            run.logger.close("failed")
        except Exception as report_error:  # noqa: BLE001 - the training error matters more
            log.error("could not report the failure of %s: %s", run.kind, report_error)


def _run_exists(uri: str, run_id: str) -> bool:
    """Whether the tracking store holds run ``run_id`` (a folder may outlive its store,
    or be pointed at another one)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).get_run(run_id)
    except MlflowException:
        return False
    return True


def _stage_logger_class() -> type:
    """Lightning's MLFlowLogger whose run is closed by the stage store only.

    Lightning closes the logger's run (``FINISHED``) at the end of every ``fit``; a stage
    still tests, assesses and registers after that, and one killed then must not show as
    finished in MLflow. ``finalize`` (Lightning's call) therefore leaves the run open;
    :meth:`close` (the store's, at the done marker or a failure) ends it.
    """
    from pytorch_lightning.loggers import MLFlowLogger

    class StageLogger(MLFlowLogger):
        def finalize(self, status: str = "success") -> None:
            return  # an exception is the store's to report: failed, or left to resume

        def close(self, status: str) -> None:
            MLFlowLogger.finalize(self, status)

    return StageLogger
