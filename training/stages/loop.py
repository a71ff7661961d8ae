"""The training loop of a run: the body of ``scripts/train.py``.

An experiment is an ordered set of *stages* (``source_only``, ``real_only``, ``finetune``,
``oracle``), each a Lightning fit + test on the sim/real mix its ``sim_ratio`` and
``real_fraction`` ask for, logged as one MLflow run. :func:`run_train`

1. resolves the config once and checks everything it can (:func:`make_plan`: stages,
   adaptation components, stage hashes; the tracking store; the components' own checks);
2. generates missing procedural splits and builds the datasets;
3. runs each pixel-level component's ``prepare`` (datasets into datasets) and then each
   stage through the stage store, with the task-level components of that stage as loss
   terms; all under one MLflow parent run.

Because stage folders are named by hash, rerunning a command resumes an interrupted stage
in the same MLflow run (T-04) and skips finished ones, experiments share stages whose
configs agree, and a transient failure is retried from the last checkpoint (T-05). A
SIGTERM during training saves the stage's checkpoint and ends the call with
:class:`training.preemption.Preempted` (exit status 75), the parent run ``KILLED``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from core.config import ConfigError, instantiate_checked, plain
from core.hashing import file_sha256
from training.precision import apply_precision
from training.stages.data import (
    Screening,
    build_datasets,
    ensure_procedural_datasets,
    verify_datasets,
    wait_for_datasets,
)
from training.stages.plan import Plan, make_plan
from training.stages.segmenter import (
    Recipe,
    StageResult,
    build_model,
    build_stage,
    train_segmenter,
)
from training.stages.specs import StageSpec, tracking_spec, world_size
from training.stages.store import StageStore

log = logging.getLogger(__name__)


def check_config(cfg: Any) -> Plan:
    """Every check that needs no data: stages, adaptation components and their stages, the
    taxonomy. Returns the plan (``scripts/pipeline.py`` checks every method with it)."""
    from omegaconf import OmegaConf

    OmegaConf.resolve(cfg)
    precision = apply_precision(cfg.trainer)  # before any stage hash: it changes results
    _drop_adversarial_when_off(cfg)  # before any stage hash too
    if cfg.get("risk") and cfg.risk.get("enabled"):
        from training.risk.monitor import check_settings

        check_settings(plain(cfg.risk))  # S-05, T-04 series, S-01 scan: a bad key stops here
    if cfg.get("log_model") and cfg.get("registry") and cfg.registry.get("enabled"):
        from training.risk.deploy import settings_from as deploy_settings

        deploy_settings(plain(cfg.registry))  # O-02 keys: a bad value stops the run here
    taxonomy = instantiate_checked(cfg.taxonomy)
    try:  # a model that cannot be built stops the run before any data is made
        instantiate_checked(cfg.model, num_classes=taxonomy.num_classes)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra wraps the model's own error: show that one
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        raise ConfigError(f"model ({cfg.model.get('_target_')}): {cause}") from None
    plan = make_plan(cfg, tuple(taxonomy.classes))
    plan.precision_requested = precision.requested
    return plan


def _drop_adversarial_when_off(cfg: Any) -> None:
    """Check ``loss.adversarial`` and remove it from ``cfg`` when off (``rate: 0``): a run
    without adversarial training then hashes, names and logs its stages exactly as before
    the option existed (the stage hash covers the whole ``loss`` section)."""
    from omegaconf import open_dict

    from training.adversarial import adversarial_training

    loss = cfg.get("loss")
    if loss is None or "adversarial" not in loss:
        return
    if adversarial_training(plain(loss.adversarial), seed=0) is None:
        with open_dict(loss):
            del loss["adversarial"]


def run_train(
    cfg: Any, parent_run_id: str | None = None, label: str = "pipeline"
) -> dict[str, StageResult]:
    """Run every stage of ``cfg.stages`` in order; return their results by name.

    The stages nest under one MLflow parent run (run name ``<name>/<label>``), itself
    nested under ``parent_run_id`` when given. A pixel-level component that trains the
    plain version of one of its stages first (CycleGAN's frozen segmenter) adds that
    stage's result as ``"<stage> (no adaptation)"``.
    """
    from training.tracking_server import check_tracking_config

    plan = check_config(cfg)
    taxonomy = instantiate_checked(cfg.taxonomy)
    check_tracking_config(cfg)  # an unreachable tracking server stops the run here
    with mlflow_scope():
        return _run(cfg, plan, taxonomy, parent_run_id, label)


@contextlib.contextmanager
def mlflow_scope() -> Iterator[None]:
    """Put MLflow's process-wide URI and ``MLFLOW_TRACKING_URI`` back as they were:
    Lightning's MLFlowLogger exports its URI, and the next run of the process (a sweep
    job) must log where it is told to."""
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _run(
    cfg: Any, plan: Plan, taxonomy: Any, parent_run_id: str | None, label: str
) -> dict[str, StageResult]:
    from pytorch_lightning.utilities import rank_zero_only

    output, data_dir = Path(cfg.paths.output), Path(cfg.paths.data)
    tracking = tracking_spec(cfg.tracking, output)
    world, is_zero = world_size(cfg.trainer), rank_zero_only.rank == 0
    risk = plain(cfg.risk) if cfg.risk.enabled else None
    recipe = make_recipe(cfg, risk, output, plan.precision_requested)
    store = StageStore(
        output,
        tracking,
        str(cfg.name),
        instantiate_checked(cfg.trainer, _partial_=True),
        retries=int(cfg.retries),
        progress=bool(cfg.progress),
        world_size=world,
        is_zero=is_zero,
        on_failure=_failure_reporter(risk) if risk is not None else None,
    )
    env = RunEnv(store, recipe, plan, taxonomy, data_dir, int(cfg.data.loader.num_workers))
    env.label = str((cfg.get("adaptation") or {}).get("method", "none"))
    for component in plan.pixel:  # what can be checked before any data is made
        component.plugin.check(plan.run, env, None)

    gen = cfg.data.get("generate")
    if gen:
        if is_zero:
            with _generation_lock(Path(gen["root"]), world):
                ensure_procedural_datasets(gen, cfg.data.image, cfg.taxonomy, bool(cfg.progress))
        else:  # torchrun / SLURM start every rank at once: only rank zero renders
            wait_for_datasets(gen, cfg.data.image, cfg.taxonomy)
    datasets = build_datasets(cfg.data.datasets, taxonomy)
    verify_datasets(datasets)  # shard checksums, once per dataset version
    for component in plan.pixel:
        component.plugin.check(plan.run, env, datasets)
    for spec in plan.stages:  # every stage built once, so none stops after another trained
        build_stage(recipe, spec, taxonomy, datasets, None, plan.objectives_for(spec.name))
    env.datasets = datasets
    env.screening = Screening(bool(risk is not None and cfg.risk.screening))

    store.parent = _open_parent(cfg, tracking, parent_run_id, label) if is_zero else None
    try:
        results = _run_stages(plan, env, datasets)
    except BaseException as exc:
        if store.parent is not None:
            from training.preemption import end_parent

            end_parent(store.parent, exc)  # preempted: KILLED, to be resumed; else failed
        raise
    if store.parent is not None:
        from training.report import results_table

        store.parent.finish(results, results_table(results))
    return results


def _run_stages(plan: Plan, env: RunEnv, datasets: Mapping[str, Any]) -> dict[str, StageResult]:
    stage_data = {spec.name: dict(datasets) for spec in plan.stages}
    for component in plan.pixel:
        prepared = component.plugin.prepare(plan.run, env, datasets)
        for name in component.stages:
            stage_data[name].update(prepared.datasets)
    adapted = {n for c in plan.pixel + plan.task for n in c.stages}
    results: dict[str, StageResult] = {
        f"{name} (no adaptation)": res for name, res in env.plain.items() if name in adapted
    }
    for spec in plan.stages:
        init = results[spec.init].checkpoint if spec.init in results else None
        if spec.init and init is None:
            init = Path(spec.init)
        results[spec.name] = env.train(
            spec,
            plan.digests[spec.name],
            stage_data[spec.name],
            init,
            plan.objectives_for(spec.name),
        )
    return results


class RunEnv:
    """The run's side of the plug-in contract (:class:`adaptation.plugin.PrepareEnv`):
    the stage store, frozen segmenters, locks and model export, plus stage training with
    T-10 screening and the T-09 references."""

    def __init__(
        self,
        store: StageStore,
        recipe: Recipe,
        plan: Plan,
        taxonomy: Any,
        data_dir: Path,
        num_workers: int,
    ) -> None:
        self.store, self.recipe, self.plan, self.taxonomy = store, recipe, plan, taxonomy
        self.data_dir = data_dir
        self.output_dir = store.output
        self.tracking_uri = store.tracking.uri
        self.log_model = recipe.log_model
        self.num_workers = num_workers
        self.world_size = store.world_size
        self.label = "none"
        self.datasets: Mapping[str, Any] = {}
        self.screening: Screening | None = None
        self.references: dict[str, float] = {}  # T-09: real mIoU of source_only, oracle
        #: stages trained without adaptation for a component (its frozen segmenter)
        self.plain: dict[str, StageResult] = {}
        self._specs = {s.name: s for s in plan.stages}

    # ---------------------------------------------------------------- stages
    def train(
        self,
        spec: StageSpec,
        digest: str,
        datasets: Mapping[str, Any],
        init: Path | None,
        objectives: list[Any],
    ) -> StageResult:
        with self.store.lock(f"{spec.name}-{digest}", f"stage {spec.name}"):
            result = train_segmenter(
                self.store,
                self.recipe,
                spec,
                digest,
                self.taxonomy,
                datasets,
                init,
                objectives,
                screening=self.screening.apply if self.screening else None,
                references=self.references,
            )
        value = result.metrics.get("test/real/miou")
        if spec.name in ("source_only", "oracle") and value is not None:
            self.references.setdefault(spec.name, value)
        return result

    def finished(self, kind: str, digest: str) -> Any:
        return self.store.finished(kind, digest)

    def open(self, kind: str, digest: str, tags: Mapping[str, str] | None = None) -> Any:
        return self.store.open(kind, digest, tags={"adaptation": self.label, **dict(tags or {})})

    def check_segmenter(self, source: str, key: str) -> None:
        spec = self._specs.get(source)
        if spec is not None:
            if spec.init or spec.sim_ratio <= 0:
                raise ConfigError(
                    f"{key}: stage '{source}' must train on sim from scratch (init null, "
                    "sim_ratio > 0) to serve as the frozen sim segmenter"
                )
        elif not Path(source).is_file():
            raise ConfigError(
                f"{key}: '{source}' is neither a stage of this experiment "
                f"({list(self._specs)}) nor a checkpoint file"
            )

    def segmenter(self, source: str, key: str) -> tuple[Any, str]:
        from core.weights import load_checkpoint_weights

        self.check_segmenter(source, key)
        if source in self._specs:
            digest = self.plan.run.stage_key(source)
            result = self.train(self._specs[source], digest, self.datasets, None, [])
            self.plain[source] = result
            checkpoint = result.checkpoint
        else:
            checkpoint = Path(source)
            digest = file_sha256(checkpoint)[:12]
        model = build_model(self.recipe, self.taxonomy.num_classes)
        load_checkpoint_weights(model, checkpoint, key=key)
        return model.eval().requires_grad_(False), digest

    # ------------------------------------------------------------- plumbing
    def lock(self, name: str, what: str, data: bool = False) -> Any:
        if not data:
            return self.store.lock(name, what)
        if self.store.world_size != 1:
            return contextlib.nullcontext()
        from core.locks import exclusive

        return exclusive(self.data_dir / ".locks" / f"{name}.lock", what)

    def export_model(self, run_id: str, model: Any, name: str) -> None:
        from training import tracking

        h, w = self.recipe.image_size
        tracking.log_model(run_id, model, h, w, uri=self.tracking_uri, name=name)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float]) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value))


def _generation_lock(root: Path, world: int) -> Any:
    """Parallel sweep jobs generate a shared dataset root one at a time."""
    from core.locks import exclusive

    if world != 1:
        return contextlib.nullcontext()
    return exclusive(root / ".generation.lock", "the datasets")


def make_recipe(
    cfg: Any, risk: Mapping[str, Any] | None, output: Path, precision_requested: str = ""
) -> Recipe:
    from training import tracking
    from training.adversarial import adversarial_training

    registry = None
    if cfg.log_model and cfg.registry.enabled:
        registry = plain(cfg.registry)
    return Recipe(
        seed=int(cfg.seed),
        make_model=instantiate_checked(cfg.model, _partial_=True),
        make_optimizer=instantiate_checked(cfg.optimizer),
        augment=(
            instantiate_checked(cfg.data.augment, key="data.augment")
            if cfg.data.get("augment")
            else None
        ),
        loader=dict(plain(cfg.data.loader)),
        class_weighting=str(cfg.loss.class_weighting),
        label_smoothing=float(cfg.loss.label_smoothing),
        adversarial=adversarial_training(plain(cfg.loss.get("adversarial")), int(cfg.seed)),
        warmup_fraction=float(cfg.warmup_fraction),
        image_size=(int(cfg.data.image.height), int(cfg.data.image.width)),
        log_model=bool(cfg.log_model),
        risk=risk,
        registry=registry,
        config=tracking.redact(plain(cfg)),
        output=output,
        precision_requested=precision_requested,
    )


def _failure_reporter(risk: Mapping[str, Any]) -> Any:
    from training.stages.monitoring import job_failed

    def report(run: Any, error: BaseException) -> None:
        label = f"{run.store.experiment_name}/{run.kind}"
        job_failed(run.client, run.run_id, label, run.run_dir, risk, error)

    return report


def _open_parent(cfg: Any, tracking: Any, parent_run_id: str | None, label: str) -> Any:
    """The parent MLflow run of this call (see :mod:`training.stages.parent`)."""
    from mlflow.tracking import MlflowClient

    from training import tracking as mlflow_tracking
    from training.stages.parent import PARENT_TAG, PipelineRun, pipeline_hash

    digest = pipeline_hash(plain(cfg))
    tags = {
        "sweep_id": tracking.sweep_id,
        "git_commit": mlflow_tracking.git_commit(),
        "adaptation": str((cfg.get("adaptation") or {}).get("method", "none")),
        PARENT_TAG: parent_run_id or "",
    }
    if tracking.trigger:
        tags["trigger"] = tracking.trigger
    return PipelineRun(
        MlflowClient(tracking.uri),
        tracking.experiment,
        str(cfg.name),
        digest,
        Path(cfg.paths.output) / "pipelines" / f"{cfg.name}-{digest}",
        tags=tags,
        artifact_location=tracking.artifact_location,
        label=label,
    )
