"""One segmentation stage through the stage store: data module, model, loss and task
built and checked, then fit, test, the register's monitors, model export and registry.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adaptation.plugin import ModelInfo
from core.seeding import seeded
from training.stages.data import class_pixel_counts, labelled_classes
from training.stages.specs import StageSpec
from training.stages.store import StageRecord, StageRun, StageStore

log = logging.getLogger(__name__)

#: The test results of a stage, kept until its done marker: a stage killed after testing
#: resumes without testing (and logging its test figures) twice.
EVALUATION = "evaluation.json"
#: The dataset roles a stage's data module reads.
ROLES = ("sim_train", "sim_val", "real_train", "real_val", "real_test", "real_unlabeled")


@dataclass
class StageResult:
    """What a finished stage leaves: its folder, best checkpoint, MLflow run, figures."""

    name: str
    run_dir: Path
    checkpoint: Path
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    alerts: list[str] = field(default_factory=list)  # risk-register alert rules that fired

    @classmethod
    def from_record(cls, name: str, record: StageRecord) -> StageResult:
        v = record.values
        return cls(
            name,
            record.run_dir,
            Path(v["checkpoint"]),
            record.run_id,
            dict(v.get("metrics") or {}),
            skipped=record.skipped,
            alerts=list(v.get("alerts") or []),
        )


@dataclass(frozen=True)
class Recipe:
    """How every segmentation stage of a run is built, as plain values and factories.

    Attributes:
        seed: seeds the model's initial weights, sampling and augmentation.
        make_model: ``num_classes -> nn.Module`` (``cfg.model``).
        make_optimizer: ``params -> Optimizer`` (``cfg.optimizer``).
        augment: the training augmentation or None.
        loader: ``data.loader`` settings (batch sizes, batches per epoch, workers).
        class_weighting, label_smoothing: ``loss.*``.
        warmup_fraction: LR warm-up share of the steps.
        image_size: ``(H, W)`` of the data.
        log_model: export the best model to MLflow.
        risk: the resolved ``risk`` settings, or None when the register is off.
        registry: the resolved ``registry`` settings when models are registered, else None.
        config: the resolved, redacted config logged with every new stage run.
        output: ``paths.output``.
        precision_requested: ``trainer.precision`` as configured (``auto``), logged as
            ``trainer.precision_requested`` beside the resolved ``trainer.precision``.
        adversarial: ``loss.adversarial`` (:class:`~training.adversarial.
            AdversarialTraining`, PGD examples in every labelled batch), or None when off.
    """

    seed: int
    make_model: Callable[..., Any]
    make_optimizer: Callable[..., Any]
    augment: Any
    loader: Mapping[str, Any]
    class_weighting: str
    label_smoothing: float
    warmup_fraction: float
    image_size: tuple[int, int]
    log_model: bool
    risk: Mapping[str, Any] | None
    registry: Mapping[str, Any] | None
    config: Mapping[str, Any]
    output: Path
    precision_requested: str = ""
    adversarial: Any = None


def condition_groups(datasets: Any) -> list[str]:
    """Every condition group the datasets hold: a generated set's card lists them, a real
    reader has one (``group``, ``unknown`` by default); wrappers (subsets, screened sets)
    are looked through. Per-group metrics then cover exactly the groups each split has."""
    found: set[str] = set()
    for ds in datasets:
        while ds is not None:
            card = getattr(ds, "card", None)
            if isinstance(card, Mapping) and card.get("groups"):
                found.update(card["groups"])
                break
            group = getattr(ds, "group", None)
            if isinstance(group, str) and group:
                found.add(group)
                break
            ds = getattr(ds, "dataset", None)
    return sorted(found)


def build_model(recipe: Recipe, num_classes: int) -> Any:
    """A task model with its initial weights drawn from the run's seed: the same seed
    gives the same model, whatever ran in the process before."""

    with seeded(recipe.seed):
        return recipe.make_model(num_classes=num_classes)


def build_stage(
    recipe: Recipe,
    spec: StageSpec,
    taxonomy: Any,
    datasets: Mapping[str, Any],
    init: Path | None,
    objectives: Sequence[Any] = (),
) -> tuple[Any, Any, list[Any]]:
    """The stage's data module, task (model, loss, objectives) and callbacks, everything
    checked: what :func:`train_segmenter` fits, and what the loop builds for every stage
    before the first one trains, so a stage that cannot run stops the run before any work
    (``init`` is None then: the weights it starts from do not exist yet)."""
    from core.weights import load_checkpoint_weights
    from training.datamodule import SimRealDataModule
    from training.losses import SegmentationLoss, class_weights_from_histogram
    from training.task import SegmentationTask

    loader = dict(recipe.loader)
    if spec.batches_per_epoch:
        loader["batches_per_epoch"] = spec.batches_per_epoch
    dm = SimRealDataModule(
        **{role: datasets.get(role) for role in ROLES},
        sim_ratio=spec.sim_ratio,
        real_fraction=spec.real_fraction,
        seed=recipe.seed,
        augment=recipe.augment,
        stage_name=spec.name,
        **loader,
    )
    model = build_model(recipe, taxonomy.num_classes)
    if init is not None:
        load_checkpoint_weights(model, init, key=f"stages.{spec.name}.init")
    counts = class_pixel_counts(
        dm.sim_train if spec.sim_ratio > 0 else None,
        dm.real_subset if spec.sim_ratio < 1 else None,
        spec.sim_ratio,
        list(taxonomy.classes),
    )
    weights = class_weights_from_histogram(counts, method=recipe.class_weighting)
    loss = SegmentationLoss(taxonomy.num_classes, weights, label_smoothing=recipe.label_smoothing)
    groups = condition_groups(datasets.values())
    has_unlabeled = any(datasets.get(r) is not None for r in ("real_unlabeled", "real_train"))
    info = ModelInfo(
        feature_channels=int(model.feature_channels),
        num_classes=taxonomy.num_classes,
        unlabeled=dm.unlabeled_dataloader if has_unlabeled else None,
        seed=recipe.seed,
        student=model,
        class_names=tuple(taxonomy.classes),
        palette=taxonomy.palette(),
    )
    built = {c.name: c.plugin.objective(info) for c in objectives}
    task = SegmentationTask(
        model,
        loss,
        taxonomy.classes,
        taxonomy.palette(),
        recipe.make_optimizer,
        warmup_fraction=recipe.warmup_fraction,
        groups=groups or None,
        val_names=dm.val_names,
        test_names=dm.test_names,
        objectives=built,
        labelled={
            "sim": labelled_classes(datasets.get("sim_val")),
            "real": labelled_classes(
                datasets["real_test"]
                if datasets.get("real_test") is not None
                else datasets.get("real_val")
            ),
        },
        real_loss_share=spec.real_loss_share,
        adversarial=recipe.adversarial,
    )
    callbacks = [cb for c in objectives for cb in c.plugin.callbacks(built[c.name])]
    if spec.bn_recalibration and not has_unlabeled:
        from core.config import ConfigError

        raise ConfigError(
            f"stages.{spec.name}.bn_recalibration: needs unlabelled real images "
            "(data.datasets.real_unlabeled or real_train); none found"
        )
    if spec.bn_recalibration and spec.sim_ratio > 0:
        from training.batchnorm import batchnorm_recalibration

        callbacks.append(
            batchnorm_recalibration(lambda: iter(dm.unlabeled_dataloader()), spec.bn_recalibration)
        )

    return dm, task, callbacks


def train_segmenter(
    store: StageStore,
    recipe: Recipe,
    spec: StageSpec,
    digest: str,
    taxonomy: Any,
    datasets: Mapping[str, Any],
    init: Path | None,
    objectives: Sequence[Any] = (),
    screening: Any = None,
    references: Mapping[str, float] | None = None,
) -> StageResult:
    """Fit, test and log one stage, resuming or skipping it by its folder's state.

    Args:
        objectives: the :class:`~adaptation.plugin.TaskAdaptation` plug-ins of this stage.
        screening: ``datasets -> (datasets, figures)`` (T-10), applied only when the stage
            trains; None: no screening.
        references: T-09's reference mIoUs (plain source_only, oracle).
    """
    record = store.finished(spec.name, digest)
    if record is not None:
        return StageResult.from_record(spec.name, record)
    figures: dict[str, float] = {}
    if screening is not None:
        datasets, figures = screening(datasets)

    dm, task, callbacks = build_stage(recipe, spec, taxonomy, datasets, init, objectives)
    with store.open(spec.name, digest) as run:
        if run.fresh:
            _describe(run, recipe, spec, dm, datasets)
        return _fit_and_evaluate(
            store,
            run,
            recipe,
            spec,
            digest,
            task,
            dm,
            datasets,
            callbacks,
            taxonomy,
            figures,
            references,
        )


def _describe(
    run: StageRun, recipe: Recipe, spec: StageSpec, dm: Any, datasets: Mapping[str, Any]
) -> None:
    """Parameters, the config file and dataset inputs of a new stage run."""
    from omegaconf import OmegaConf

    from training import tracking

    if not run.store.is_zero:
        return
    trainer = {**(recipe.config.get("trainer") or {})}
    if recipe.precision_requested:
        trainer["precision_requested"] = recipe.precision_requested
    stage = {"name": spec.name, **dm.describe()}
    run.log_params({**recipe.config, "trainer": trainer, "stage": stage})
    config_file = run.run_dir / "config.yaml"
    config_file.write_text(OmegaConf.to_yaml(OmegaConf.create(dict(recipe.config))))
    run.log_artifact(config_file)
    roles = {r: ds for r, ds in datasets.items() if ds is not None}
    tracking.log_dataset_inputs(run.client, run.run_id, roles)


def _fit_and_evaluate(
    store: StageStore,
    run: StageRun,
    recipe: Recipe,
    spec: StageSpec,
    digest: str,
    task: Any,
    dm: Any,
    datasets: Mapping[str, Any],
    callbacks: list[Any],
    taxonomy: Any,
    screening: Mapping[str, float],
    references: Mapping[str, float] | None,
) -> StageResult:
    from pytorch_lightning.callbacks import ModelCheckpoint

    from training import tracking
    from training.risk.gpu import GpuMonitor
    from training.risk.system import finish_system_metrics
    from training.risk.throughput import ThroughputMeter
    from training.stages.monitoring import assess_risk, register_and_compare

    evaluated = run.run_dir / EVALUATION
    gpu = throughput = None
    if evaluated.exists():  # tested in an earlier session, killed before the done marker
        best = _restore_evaluation(task, evaluated)
        log.info("stage %s: evaluated earlier, not tested again", spec.name)
    else:
        monitor = "val/real/miou" if "real" in dm.val_names else "val/sim/miou"
        checkpoint = ModelCheckpoint(
            dirpath=run.checkpoint_dir, filename="best", monitor=monitor, mode="max", save_last=True
        )
        gpu = GpuMonitor().start() if recipe.risk is not None else None
        throughput = ThroughputMeter() if recipe.risk is not None else None
        system = _system_metrics(store, run, recipe.risk)
        try:
            # dropout and any other draw during training follow the seed too; the
            # process's own random state is put back afterwards
            with seeded(recipe.seed):
                trainer = run.fit(
                    task,
                    datamodule=dm,
                    callbacks=[checkpoint, *callbacks, *([throughput] if throughput else [])],
                    max_epochs=spec.max_epochs,
                )
        finally:
            if gpu is not None:
                gpu.stop()
            finish_system_metrics(system)
        best = Path(checkpoint.best_model_path or run.checkpoint_dir / "last.ckpt")
        with seeded(recipe.seed):  # the caller's RNG untouched
            trainer.test(task, datamodule=dm, ckpt_path=str(best), verbose=False, weights_only=True)
        if store.is_zero:
            _save_evaluation(task, best, evaluated)
    metrics = {k: float(v) for k, v in task.results.items()}
    if not store.is_zero:
        run.logger.close("success")
        return StageResult(spec.name, run.run_dir, best, run.run_id, metrics)
    label = f"{store.experiment_name}/{spec.name}"
    run.log_artifact(best, artifact_path="checkpoints")
    h, w = recipe.image_size
    if recipe.log_model:
        tracking.log_model(run.run_id, task.model, h, w, uri=store.tracking.uri)
    registered: dict[str, float] = {}
    if recipe.registry is not None and spec.name in recipe.registry["stages"]:
        loaders = dict(zip(dm.val_names, dm.val_dataloader(), strict=True))
        registered = register_and_compare(
            store.tracking.uri,
            run.run_id,
            recipe.registry,
            loaders.get("real") or loaders.get("sim"),
            taxonomy.num_classes,
            recipe.seed,
            model=task.model,
        )
        metrics.update(registered)
    if recipe.risk is not None:  # after the export and registration: O-02 is on the register
        reference = dm.sim_train if spec.sim_ratio > 0 and dm.sim_train is not None else None
        metrics.update(
            assess_risk(
                run.client,
                run.run_id,
                label,
                run.run_dir,
                risk=recipe.risk,
                output=recipe.output,
                task=task,
                reference=reference if reference is not None else dm.real_subset,
                current=datasets.get("real_test") or datasets.get("real_val"),
                metrics=metrics,
                wall_seconds=run.wall_seconds,
                devices=store.world_size,
                gpu=gpu,
                earlier={**screening, **_risk_figures(registered)},
                references=references,
                datasets=datasets,
                throughput=throughput,
            )
        )
    published = recipe.output / "models" / f"{store.experiment_name}-{spec.name}-{digest}.ckpt"
    published.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, published)
    fired = run.client.get_run(run.run_id).data.tags.get("risk/alerts_fired", "none")
    alerts = [] if fired == "none" else fired.split(",")
    record = run.finish({"checkpoint": str(best), "metrics": metrics, "alerts": alerts})
    return StageResult.from_record(spec.name, record)


def _risk_figures(figures: Mapping[str, float]) -> dict[str, float]:
    """The register's figures (``risk/<ID>/...``) of ``figures``."""
    return {k: v for k, v in figures.items() if k.startswith("risk/")}


def _system_metrics(store: StageStore, run: StageRun, risk: Mapping[str, Any] | None) -> Any:
    """MLflow's ``system/*`` series on the stage run while it trains (T-04), rank zero
    only; None when off (:mod:`training.risk.system`)."""
    from training.risk.system import settings_from, start_system_metrics

    settings = settings_from(risk) if risk is not None and store.is_zero else None
    if settings is None:
        return None
    return start_system_metrics(run.run_id, store.tracking.uri, settings, resume=not run.fresh)


def _save_evaluation(task: Any, best: Path, path: Path) -> None:
    from core.files import atomic_write_json

    confusions = {
        domain: {group: np.asarray(m).tolist() for group, m in groups.items()}
        for domain, groups in task.test_group_confusions.items()
    }
    atomic_write_json(
        path,
        {"checkpoint": str(best), "results": task.results, "group_confusions": confusions},
    )


def _restore_evaluation(task: Any, path: Path) -> Path:
    """Load what :func:`_save_evaluation` kept into ``task``; returns the best checkpoint."""
    import json

    saved = json.loads(path.read_text())
    task.results.update({k: float(v) for k, v in saved["results"].items()})
    task.test_group_confusions = {
        domain: {group: np.asarray(m, dtype=np.int64) for group, m in groups.items()}
        for domain, groups in saved["group_confusions"].items()
    }
    # the weights the risk monitors and the export read are the tested ones
    from core.weights import load_checkpoint_weights

    best = Path(saved["checkpoint"])
    load_checkpoint_weights(task.model, best, key=f"{path.parent.name}/{EVALUATION}")
    return best
