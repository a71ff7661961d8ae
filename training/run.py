"""Training runs: the body of ``scripts/train.py``.

An experiment is an ordered set of *stages* (``source_only``, ``real_only``, ``finetune``,
``oracle``), each a Lightning fit + test on the sim/real mix its ``sim_ratio`` and
``real_fraction`` ask for, logged as one MLflow run. A stage's folder is named by the hash
of everything that decides its result, so

* rerunning a command resumes an interrupted stage from its last checkpoint, in the same
  MLflow run (spot interruption, risk T-04), and skips finished stages;
* experiments share stages: ``finetune`` reuses the ``source_only`` stage that the
  ``benchmark`` experiment already trained, when their configs agree;
* a transient failure is retried from the last checkpoint ``retries`` times (T-05).

Everything that can be checked -- datasets, taxonomy hashes, ratios, checkpoints -- is
checked before the first step.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simulation.configuration import ConfigError, instantiate_checked
from simulation.dataset import atomic_write_json
from simulation.taxonomy import Taxonomy

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DONE = "done.json"
RUN_ID = "mlflow_run_id.txt"
STAGE_KEYS = {"sim_ratio", "real_fraction", "init", "max_epochs", "batches_per_epoch"}


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


# ----------------------------------------------------------------------------- data
def ensure_procedural_datasets(
    gen: Mapping[str, Any], image: Mapping[str, int], taxonomy_cfg: Any, progress: bool = False
) -> None:
    """Generate the procedural splits a data config names, where not complete yet."""
    from omegaconf import OmegaConf

    from simulation.generation import run_generate

    preset = CONFIGS / "randomization" / f"{gen['randomization']}.yaml"
    if not preset.exists():
        raise ConfigError(f"data.generate.randomization: unknown preset '{gen['randomization']}'")
    for split, spec in gen["splits"].items():
        root = Path(gen["root"]) / split
        # run_generate compares the folder's generation.json with this config: a complete
        # matching dataset costs nothing, a changed one is refused instead of reused stale
        log.info("dataset %s (%s, %d frames): %s", split, spec["style"], spec["num_frames"], root)
        cfg = OmegaConf.create(
            {
                "name": split,
                "seed": spec["seed"],
                "num_frames": spec["num_frames"],
                "shard_size": gen["shard_size"],
                "image": dict(image),
                "domain": None,
                "output_dir": str(root),
                "overwrite": False,
                "progress": progress,
                "parallel": {"index": 0, "count": 1, "servers": []},
                "backend": {
                    "_target_": "simulation.procedural.ProceduralBackend",
                    "style": spec["style"],
                    "batch_size": 64,
                    "compile": False,
                },
                "taxonomy": OmegaConf.to_container(taxonomy_cfg, resolve=True),
                "randomization": OmegaConf.to_container(OmegaConf.load(preset)),
            }
        )
        run_generate(cfg)


def _wait_for_datasets(gen: Mapping[str, Any], timeout_s: float = 6 * 3600) -> None:
    deadline = time.monotonic() + timeout_s
    cards = [Path(gen["root"]) / split / "card.json" for split in gen["splits"]]
    while not all(c.exists() for c in cards):
        if time.monotonic() > deadline:
            raise ConfigError(f"data.generate: rank zero did not finish {gen['root']} in time")
        time.sleep(2.0)


def build_datasets(nodes: Mapping[str, Any], taxonomy: Taxonomy) -> dict[str, Any]:
    """Instantiate the dataset nodes, giving each the taxonomy (readers) or the expected
    taxonomy hash (generated datasets), so a mismatched dataset stops the run here."""
    out: dict[str, Any] = {}
    for role, node in nodes.items():
        if node is None:
            out[role] = None
            continue
        factory = instantiate_checked(node, _partial_=True)
        params = inspect.signature(factory).parameters
        kwargs: dict[str, Any] = {}
        if "taxonomy" in params:
            kwargs["taxonomy"] = taxonomy
        if "expected_taxonomy_hash" in params:
            kwargs["expected_taxonomy_hash"] = taxonomy.hash
        try:
            out[role] = factory(**kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"data.datasets.{role}: {exc}") from exc
    return out


def class_pixel_counts(
    datasets: Mapping[str, Any], sim_ratio: float, class_names: list[str]
) -> np.ndarray:
    """Training-label pixel counts per class, from the dataset cards (no pass over data):
    the sim training set when the stage uses sim, else the real one, else uniform."""
    order = ("sim_train", "real_train") if sim_ratio > 0 else ("real_train", "sim_train")
    for role in order:
        card = getattr(datasets.get(role), "card", None)
        if card and "class_pixel_histogram" in card:
            hist = card["class_pixel_histogram"]
            return np.asarray([hist.get(c, 0) for c in class_names], dtype=np.float64)
    return np.ones(len(class_names))


# --------------------------------------------------------------------------- stages
def stage_hash(
    cfg: Any, stage: str, parent_hash: str | None, inputs: Mapping[str, str] | None = None
) -> str:
    """12 hex digits over everything that decides a stage's result; ``inputs`` names data
    made inside the run (the translated sim set's digest) that the config cannot."""
    from omegaconf import OmegaConf

    keys = ("seed", "data", "model", "optimizer", "loss", "warmup_fraction", "taxonomy")
    blob = {k: _plain(cfg.get(k)) for k in keys}
    adapted = {
        part: _plain(node)
        for part, node in adaptation_parts(cfg).items()
        if stage in (node.get("stages") or [])
    }
    # only what the stage reads: a sim-only stage without adaptation never sees the real
    # training split (a retrain on new real data reuses it), and worker counts change speed
    data = blob["data"]
    data.get("loader", {}).pop("num_workers", None)
    if float(cfg.stages[stage].sim_ratio) >= 1.0 and not adapted:
        data.get("datasets", {}).pop("real_train", None)
        data.get("datasets", {}).pop("real_unlabeled", None)
    blob["stage"] = _plain(cfg.stages[stage])
    blob["trainer"] = {
        k: v
        for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
        if k in ("precision", "accumulate_grad_batches", "gradient_clip_val")
    }
    # the global batch and the sample order depend on how many processes train
    blob["world_size"] = int(cfg.trainer.get("devices", 1) or 1) * int(
        cfg.trainer.get("num_nodes", 1) or 1
    )
    if adapted:
        blob["adaptation"] = adapted
    if inputs:
        blob["inputs"] = dict(inputs)
    blob["parent"] = parent_hash
    text = json.dumps(blob, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


#: What each ``adaptation.method`` is made of (the config nodes it needs).
METHODS: dict[str, tuple[str, ...]] = {
    "none": (),
    "dann": ("dann",),
    "cyclegan": ("cyclegan",),
    "cyclegan_dann": ("cyclegan", "dann"),
}


def adaptation_parts(cfg: Any) -> dict[str, Any]:
    """``{"dann": node, "cyclegan": node}`` for the configured method, checked: a known
    method, its nodes present, and only stages of this experiment listed."""
    ada = cfg.get("adaptation") or {}
    method = ada.get("method", "none")
    if method not in METHODS:
        raise ConfigError(f"adaptation.method: expected one of {list(METHODS)}, got {method!r}")
    parts = {}
    for part in METHODS[method]:
        node = ada.get(part)
        if not node:
            raise ConfigError(f"adaptation.{part}: missing; method '{method}' needs it")
        for name in node.get("stages") or []:
            if name not in cfg.stages:
                raise ConfigError(
                    f"adaptation.{part}.stages: '{name}' is not a stage of this experiment "
                    f"({list(cfg.stages)})"
                )
        parts[part] = node
    return parts


def _without_adaptation(cfg: Any) -> Any:
    """A copy of ``cfg`` with ``adaptation=none``: the plain stages an adapted run needs."""
    import copy

    from omegaconf import open_dict

    plain = copy.deepcopy(cfg)
    with open_dict(plain):
        plain.adaptation = {"method": "none"}
    return plain


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_stages(cfg: Any) -> list[str]:
    """Stage names in order; each stage's keys and its ``init`` checked before any work."""
    if not cfg.get("stages"):
        raise ConfigError("stages: no stage to run; pick an experiment (experiment=finetune)")
    names = list(cfg.stages)
    retries = cfg.get("retries")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"retries: expected a whole number >= 0, got {retries!r}")
    for i, name in enumerate(names):
        stage = cfg.stages[name]
        epochs = stage.get("max_epochs")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(
                f"stages.{name}.max_epochs: expected a whole number >= 1, got {epochs!r}"
            )
        unknown = sorted(set(stage) - STAGE_KEYS)
        if unknown:
            raise ConfigError(
                f"stages.{name}.{unknown[0]}: unknown key, expected one of {sorted(STAGE_KEYS)}"
            )
        for key in ("sim_ratio", "real_fraction"):
            value = stage.get(key)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
                raise ConfigError(
                    f"stages.{name}.{key}: expected a number in [0, 1], got {value!r}"
                )
        init = stage.get("init")
        if init and init in cfg.stages and names.index(init) >= i:
            raise ConfigError(f"stages.{name}.init: stage '{init}' must come before '{name}'")
        if init and init not in cfg.stages and not Path(init).is_file():
            raise ConfigError(
                f"stages.{name}.init: '{init}' is neither an earlier stage "
                f"({names[:i]}) nor a checkpoint file"
            )
    return names


def run_train(
    cfg: Any, parent_run_id: str | None = None, label: str = "pipeline"
) -> dict[str, StageResult]:
    """Run every stage of ``cfg.stages`` in order; return their results by name.

    The stages nest under one MLflow parent run (:class:`training.pipeline.PipelineRun`,
    run name ``<name>/<label>``), itself nested under ``parent_run_id`` when given.

    With pixel-level adaptation (``adaptation.cyclegan``) the plain sim segmenter, the
    CycleGAN and the translated sim set come first (:mod:`training.cyclegan_stage`); the
    plain segmenter's result is returned as ``"<stage> (no adaptation)"``.
    """
    from omegaconf import OmegaConf

    OmegaConf.resolve(cfg)
    names = check_stages(cfg)
    parts = adaptation_parts(cfg)
    taxonomy: Taxonomy = instantiate_checked(cfg.taxonomy)
    from training.tracking_server import check_tracking_config

    check_tracking_config(cfg)  # an unreachable tracking server stops the run here
    # Lightning's MLFlowLogger exports its URI to MLFLOW_TRACKING_URI: put it back after
    # this call, so the next run of the process (a sweep job) logs where it is told to
    saved_uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        return _run_train(cfg, names, parts, taxonomy, parent_run_id, label)
    finally:
        import mlflow

        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if saved_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_uri


def _run_train(
    cfg: Any,
    names: list[str],
    parts: Mapping[str, Any],
    taxonomy: Taxonomy,
    parent_run_id: str | None,
    label: str,
) -> dict[str, StageResult]:
    generator = _check_generator(cfg, parts.get("cyclegan"))
    gen = cfg.data.get("generate")
    if gen:
        from pytorch_lightning.utilities import rank_zero_only

        if rank_zero_only.rank == 0:
            with _shared_work(cfg, Path(gen["root"]) / ".generation.lock", "the datasets"):
                ensure_procedural_datasets(gen, cfg.data.image, cfg.taxonomy, bool(cfg.progress))
        else:  # torchrun / SLURM start every rank at once: only rank zero renders
            _wait_for_datasets(gen)
    datasets = build_datasets(cfg.data.datasets, taxonomy)
    parent = _open_pipeline(cfg, parent_run_id, label)
    try:
        results = _run_stages(cfg, names, parts, taxonomy, datasets, generator, parent)
    except BaseException as exc:
        if parent is not None:
            parent.fail(exc)
        raise
    if parent is not None:
        from training.report import results_table

        parent.finish(results, results_table(results))
    return results


def _open_pipeline(cfg: Any, parent_run_id: str | None, label: str) -> Any:
    """The parent MLflow run of this call (rank zero only; see :mod:`training.pipeline`)."""
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf
    from pytorch_lightning.utilities import rank_zero_only

    from training import tracking
    from training.pipeline import PARENT_TAG, PipelineRun, pipeline_hash

    if rank_zero_only.rank != 0:
        return None
    digest = pipeline_hash(OmegaConf.to_container(cfg, resolve=True))
    uri = tracking.tracking_uri(cfg.paths.output, cfg.tracking.uri)
    tags = {
        "sweep_id": str(cfg.tracking.sweep_id or ""),
        "git_commit": tracking.git_commit(),
        "adaptation": str((cfg.get("adaptation") or {}).get("method", "none")),
        PARENT_TAG: parent_run_id or "",
    }
    if cfg.tracking.get("trigger"):
        tags["trigger"] = str(cfg.tracking.trigger)
    return PipelineRun(
        MlflowClient(uri),
        str(cfg.tracking.experiment),
        str(cfg.name),
        digest,
        Path(cfg.paths.output) / "pipelines" / f"{cfg.name}-{digest}",
        tags=tags,
        artifact_location=tracking.artifact_location(cfg.paths.output, uri),
        label=label,
    )


def _run_stages(
    cfg: Any,
    names: list[str],
    parts: Mapping[str, Any],
    taxonomy: Taxonomy,
    datasets: Mapping[str, Any],
    generator: tuple[Path, str] | None,
    parent: Any,
) -> dict[str, StageResult]:
    screening = _Screening(bool(cfg.risk.enabled and cfg.risk.screening))
    results: dict[str, StageResult] = {}
    hashes: dict[str, str] = {}
    references: dict[str, float] = {}  # T-09: real mIoU of plain source_only and oracle

    def train(
        stage_cfg: Any, name: str, digest: str, data: Mapping[str, Any], init_ckpt: Path | None
    ) -> StageResult:
        folder = stage_dir(stage_cfg, name, digest)
        locks = Path(cfg.paths.output) / "locks"
        with _shared_work(cfg, locks / f"{folder.name}.lock", f"stage {name}"):
            figures: dict[str, float] = {}
            if not (folder / DONE).exists():  # it will train
                data, figures = screening.apply(data)
            return run_stage(
                stage_cfg,
                name,
                digest,
                taxonomy,
                data,
                init_ckpt,
                figures,
                references,
                parent=parent,
            )

    stage_data = {name: datasets for name in names}
    inputs: dict[str, str] = {}
    if "cyclegan" in parts:
        node = parts["cyclegan"]
        translated, plain = _pixel_adaptation(
            cfg, node, taxonomy, datasets, generator, train, parent
        )
        adapted = {s for part in parts.values() for s in part.get("stages") or []}
        if plain is not None and plain.name in adapted:  # else the loop below reuses it
            results[f"{plain.name} (no adaptation)"] = plain
            _add_reference(references, plain)
        from training.tracking import dataset_digest

        inputs = {"sim_train": dataset_digest(translated)}
        for name in node.get("stages") or []:
            stage_data[name] = {**datasets, "sim_train": translated}
    for name in names:
        stage = cfg.stages[name]
        init = stage.get("init")
        parent_hash = hashes.get(init) if init in hashes else (init or None)
        translated_here = stage_data[name] is not datasets
        hashes[name] = stage_hash(cfg, name, parent_hash, inputs if translated_here else None)
        init_ckpt = results[init].checkpoint if init in results else (Path(init) if init else None)
        results[name] = train(cfg, name, hashes[name], stage_data[name], init_ckpt)
        _add_reference(references, results[name])
    return results


def _shared_work(cfg: Any, lock: Path, what: str) -> Any:
    """A lock around work parallel sweep jobs may share (:mod:`simulation.locks`); none
    under DDP, where the ranks of one job already work together."""
    import contextlib

    from simulation.locks import exclusive

    world = int(cfg.trainer.get("devices", 1) or 1) * int(cfg.trainer.get("num_nodes", 1) or 1)
    return exclusive(lock, what) if world == 1 else contextlib.nullcontext()


def _add_reference(references: dict[str, float], result: StageResult) -> None:
    """T-09 references: the first source_only (the plain one when both exist) and oracle."""
    value = result.metrics.get("test/real/miou")
    if result.name in ("source_only", "oracle") and value is not None:
        references.setdefault(result.name, value)


class _Screening:
    """T-10, once per training set, and only for stages that actually train."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._done: dict[int, tuple[Any, dict[str, float]]] = {}

    def apply(self, datasets: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        out, figures = dict(datasets), {}
        if not self.enabled:
            return out, figures
        for role in ("sim_train", "real_train"):
            ds = datasets.get(role)
            if ds is None:
                continue
            if id(ds) not in self._done:
                self._done[id(ds)] = screen_training_set(role, ds)
            out[role], found = self._done[id(ds)]
            figures.update(found)
        return out, figures


def _check_generator(cfg: Any, node: Any) -> tuple[Path, str] | None:
    """``adaptation.cyclegan.generator`` (an earlier run's generator), resolved and checked
    against the data's image size before any work; None when one is trained here."""
    if node is None or not node.get("generator"):
        return None
    from training import tracking
    from training.cyclegan_stage import load_generator, resolve_generator

    uri = tracking.tracking_uri(cfg.paths.output, cfg.tracking.uri)
    path, run_id = resolve_generator(
        str(node.generator), uri, Path(cfg.paths.output) / "generators"
    )
    load_generator(path, (int(cfg.data.image.height), int(cfg.data.image.width)))
    return path, run_id


def _pixel_adaptation(
    cfg: Any,
    node: Any,
    taxonomy: Taxonomy,
    datasets: Mapping[str, Any],
    generator: tuple[Path, str] | None,
    train: Any,
    parent: Any = None,
) -> tuple[Any, StageResult | None]:
    """The frozen sim segmenter, the generator (trained here unless given) and the
    translated sim set, in that order; see :mod:`training.cyclegan_stage`."""
    from training import tracking
    from training.cyclegan_stage import KEY, run_cyclegan, translate_sim
    from training.models.weights import load_checkpoint_weights

    classes = list(taxonomy.classes)
    seg_name = node.get("segmenter")
    plain, segmenter, seg_digest = None, None, None
    if seg_name:
        if seg_name in cfg.stages:
            stage = cfg.stages[seg_name]
            if stage.get("init") or float(stage.sim_ratio) <= 0:
                raise ConfigError(
                    f"{KEY}.segmenter: stage '{seg_name}' must train on sim from scratch "
                    "(init null, sim_ratio > 0) to serve as the frozen sim segmenter"
                )
            plain_cfg = _without_adaptation(cfg)
            seg_digest = stage_hash(plain_cfg, seg_name, None)
            plain = train(plain_cfg, seg_name, seg_digest, datasets, None)
            checkpoint = plain.checkpoint
        else:
            checkpoint = Path(seg_name)
            if not checkpoint.is_file():
                raise ConfigError(
                    f"{KEY}.segmenter: '{seg_name}' is neither a stage of this experiment "
                    f"({list(cfg.stages)}) nor a checkpoint file"
                )
            seg_digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]
        segmenter = instantiate_checked(cfg.model, num_classes=taxonomy.num_classes)
        load_checkpoint_weights(segmenter, checkpoint, key=f"{KEY}.segmenter")
        segmenter.eval().requires_grad_(False)
    trained = None
    if generator is None:
        with _shared_work(cfg, Path(cfg.paths.output) / "locks" / "cyclegan.lock", "the CycleGAN"):
            trained = run_cyclegan(cfg, datasets, segmenter, seg_digest, classes, parent=parent)
        generator = (trained.generator, trained.run_id)
    with _shared_work(cfg, Path(cfg.paths.data) / ".translation.lock", "the translation"):
        translated, figures = translate_sim(cfg, datasets, *generator, segmenter, classes)
    if trained is not None and "translate/images_per_s" in figures:  # computed just now
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking.tracking_uri(cfg.paths.output, cfg.tracking.uri))
        for key, value in figures.items():
            client.log_metric(trained.run_id, key, float(value))
    return translated, plain


def stage_dir(cfg: Any, name: str, digest: str) -> Path:
    """The folder of stage ``name`` whose config hashes to ``digest``."""
    return Path(cfg.paths.output) / "runs" / f"{name}-{digest}"


def screen_training_set(role: str, dataset: Any) -> tuple[Any, dict[str, float]]:
    """T-10: screen one training set; a set that loses frames is wrapped so training never
    sees them. Returns the set and its ``risk/T-10/<role>/<reason>`` counts."""
    from training.risk.screening import ScreenedDataset

    screened = ScreenedDataset(dataset)
    figures = {
        key: float(value)
        for key, value in screened.result.metrics(prefix=f"risk/T-10/{role}/").items()
    }
    dropped = len(dataset) - len(screened)
    if not dropped:
        return dataset, figures
    if not len(screened):
        root = getattr(dataset, "root", role)
        raise ConfigError(
            f"data.datasets.{role}: T-10 screening dropped every frame of {root} "
            f"({screened.result.counts}); the set cannot be trained on (for translated sim "
            "frames: the generator needs more training, adaptation.cyclegan.max_batches)"
        )
    log.warning(
        "T-10: %d of %d %s frames dropped by screening: %s",
        dropped,
        len(dataset),
        role,
        screened.result.counts,
    )
    return screened, figures


def run_stage(
    cfg: Any,
    name: str,
    digest: str,
    taxonomy: Taxonomy,
    datasets: Mapping[str, Any],
    init_ckpt: Path | None,
    screening: Mapping[str, float] | None = None,
    references: Mapping[str, float] | None = None,
    parent: Any = None,
) -> StageResult:
    """Fit, test and log one stage, resuming or skipping it by its folder's state;
    ``parent`` (a :class:`~training.pipeline.PipelineRun`) nests a new stage run."""
    from omegaconf import OmegaConf
    from pytorch_lightning.callbacks import ModelCheckpoint

    from training import tracking
    from training.datamodule import SimRealDataModule
    from training.losses import SegmentationLoss, class_weights_from_histogram
    from training.models.weights import load_checkpoint_weights
    from training.task import SegmentationTask

    stage = cfg.stages[name]
    run_dir = stage_dir(cfg, name, digest)
    done = run_dir / DONE
    if done.exists():
        info = json.loads(done.read_text())
        log.info("stage %s: finished earlier in %s, skipped", name, run_dir)
        if parent is not None:
            parent.reused(info["run_id"])
        return StageResult(
            name,
            run_dir,
            Path(info["checkpoint"]),
            info["run_id"],
            info["metrics"],
            skipped=True,
            alerts=info.get("alerts", []),
        )

    # --- everything checked before the first step
    dm_kwargs = dict(cfg.data.loader)
    if stage.get("batches_per_epoch"):
        dm_kwargs["batches_per_epoch"] = stage.batches_per_epoch
    augment = instantiate_checked(cfg.data.augment) if cfg.data.get("augment") else None
    dm = SimRealDataModule(
        **{
            k: datasets.get(k)
            for k in (
                "sim_train",
                "sim_val",
                "real_train",
                "real_val",
                "real_test",
                "real_unlabeled",
            )
        },
        sim_ratio=float(stage.sim_ratio),
        real_fraction=float(stage.real_fraction),
        seed=int(cfg.seed),
        augment=augment,
        **dm_kwargs,
    )
    model = instantiate_checked(cfg.model, num_classes=taxonomy.num_classes)
    if init_ckpt is not None:
        load_checkpoint_weights(model, init_ckpt, key=f"stages.{name}.init")
    counts = class_pixel_counts(datasets, float(stage.sim_ratio), list(taxonomy.classes))
    weights = class_weights_from_histogram(counts, method=cfg.loss.class_weighting)
    loss = SegmentationLoss(
        taxonomy.num_classes, weights, label_smoothing=float(cfg.loss.label_smoothing)
    )
    groups = sorted(
        {
            g
            for ds in datasets.values()
            if ds is not None
            for g in (getattr(ds, "card", None) or {}).get("groups", {})
        }
    )
    adaptation = _adaptation(cfg, name, model, dm)
    task = SegmentationTask(
        model,
        loss,
        taxonomy.classes,
        taxonomy.palette(),
        instantiate_checked(cfg.optimizer),
        warmup_fraction=float(cfg.warmup_fraction),
        groups=groups or None,
        val_names=dm.val_names,
        test_names=dm.test_names,
        **adaptation,
    )

    # --- tracking: the same MLflow run when resuming; rank zero only under DDP
    from pytorch_lightning.utilities import rank_zero_only

    is_zero = rank_zero_only.rank == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking.tracking_uri(cfg.paths.output, cfg.tracking.uri)
    logger, run_id = stage_logger(cfg, name, digest, run_dir, parent)
    fresh = run_id is None
    run_id = logger.run_id if is_zero else run_id
    if is_zero:
        (run_dir / RUN_ID).write_text(run_id)
    if fresh and is_zero:
        logged_cfg = tracking.redact(OmegaConf.to_container(cfg, resolve=True))
        params = tracking.flatten(logged_cfg)
        params.update(tracking.flatten({"stage": {"name": name, **dm.describe()}}))
        logger.log_hyperparams(params)
        config_file = run_dir / "config.yaml"
        config_file.write_text(OmegaConf.to_yaml(OmegaConf.create(logged_cfg)))
        logger.experiment.log_artifact(run_id, str(config_file))
        roles = {r: ds for r, ds in datasets.items() if ds is not None}
        tracking.log_dataset_inputs(logger.experiment, run_id, roles)

    monitor = "val/real/miou" if "real" in dm.val_names else "val/sim/miou"
    ckpt_dir = run_dir / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor=monitor, mode="max", save_last=True
    )
    make_trainer = instantiate_checked(cfg.trainer, _partial_=True)
    retries = int(cfg.retries)
    from training.risk.gpu import GpuMonitor

    gpu = GpuMonitor().start() if cfg.risk.enabled else None
    started = time.perf_counter()
    try:
        for attempt in range(retries + 1):
            trainer = make_trainer(
                max_epochs=int(stage.max_epochs),
                logger=logger,
                callbacks=[checkpoint],
                default_root_dir=str(run_dir),
                use_distributed_sampler=False,
                enable_progress_bar=bool(cfg.progress),
            )
            last = ckpt_dir / "last.ckpt"
            try:
                trainer.fit(
                    task,
                    datamodule=dm,
                    ckpt_path=str(last) if last.exists() else None,
                    weights_only=True,
                )
                break
            except (KeyboardInterrupt, ConfigError):
                raise
            except Exception as exc:  # a transient failure: resume from the last checkpoint
                if is_zero:
                    logger.experiment.set_tag(run_id, f"failure_{attempt}", repr(exc)[:500])
                if attempt == retries:
                    if is_zero:
                        _mark_failed(cfg, logger, run_id, name, run_dir, exc)
                    raise
                since = last if last.exists() else "the start"
                log.warning(
                    "stage %s failed (%s); retry %d/%d from %s",
                    name,
                    exc,
                    attempt + 1,
                    retries,
                    since,
                )
    finally:
        if gpu is not None:
            gpu.stop()
        wall = _add_wall_time(run_dir, time.perf_counter() - started)
    try:
        best = Path(checkpoint.best_model_path or ckpt_dir / "last.ckpt")
        trainer.test(task, datamodule=dm, ckpt_path=str(best), verbose=False, weights_only=True)
        metrics = {k: float(v) for k, v in task.results.items()}
        if trainer.is_global_zero and cfg.risk.enabled:
            metrics.update(
                _assess_risk(
                    cfg,
                    logger,
                    run_id,
                    name,
                    run_dir,
                    task,
                    dm,
                    datasets,
                    metrics,
                    wall,
                    trainer.world_size,
                    gpu,
                    screening,
                    references,
                )
            )
        if trainer.is_global_zero:
            logger.experiment.log_artifact(run_id, str(best), artifact_path="checkpoints")
            if cfg.log_model:
                tracking.log_model(
                    run_id,
                    task.model,
                    int(cfg.data.image.height),
                    int(cfg.data.image.width),
                    uri=uri,
                )
            if cfg.log_model and cfg.registry.enabled and name in cfg.registry.stages:
                decision = register_and_compare(cfg, uri, run_id, dm, taxonomy.num_classes)
                metrics.update(decision)
            published = Path(cfg.paths.output) / "models" / f"{cfg.name}-{name}-{digest}.ckpt"
            published.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(best, published)
            fired = logger.experiment.get_run(run_id).data.tags.get("risk/alerts_fired", "none")
            alerts = [] if fired == "none" else fired.split(",")
            atomic_write_json(
                done,
                {"checkpoint": str(best), "run_id": run_id, "metrics": metrics, "alerts": alerts},
            )
    except Exception as exc:  # evaluation, risk or registry failed: the run is not done
        if trainer.is_global_zero:
            _mark_failed(cfg, logger, run_id, name, run_dir, exc)
        raise
    logger.finalize("success")
    return StageResult(
        name, run_dir, best, run_id, metrics, alerts=alerts if trainer.is_global_zero else []
    )


def stage_logger(
    cfg: Any,
    stage: str,
    digest: str,
    run_dir: Path,
    parent: Any = None,
    tags: Mapping[str, str] | None = None,
) -> tuple[Any, str | None]:
    """The MLflow logger of a stage's run and the run id kept in its folder: the same run
    when resuming, else a new one tagged (stage, experiment, config hash, commit, sweep id,
    trigger, ``tags``) and nested under ``parent``. Returns ``(logger, earlier run id or
    None)``."""
    from pytorch_lightning.loggers import MLFlowLogger

    from training import tracking

    uri = tracking.tracking_uri(cfg.paths.output, cfg.tracking.uri)
    run_id_file = run_dir / RUN_ID
    run_id = run_id_file.read_text().strip() if run_id_file.exists() else None
    all_tags = {
        "stage": stage,
        "experiment": str(cfg.name),
        "config_hash": digest,
        "git_commit": tracking.git_commit(),
        "sweep_id": str(cfg.tracking.sweep_id or ""),
        **dict(tags or {}),
    }
    if cfg.tracking.get("trigger"):
        all_tags["trigger"] = str(cfg.tracking.trigger)
    if parent is not None and run_id is None:
        all_tags.update(parent.child_tags())
    logger = MLFlowLogger(
        experiment_name=cfg.tracking.experiment,
        run_name=f"{cfg.name}/{stage}",
        tracking_uri=uri,
        tags=all_tags,
        run_id=run_id,
        artifact_location=tracking.artifact_location(cfg.paths.output, uri),
    )
    return logger, run_id


def _adaptation(cfg: Any, stage: str, model: Any, dm: Any) -> dict[str, Any]:
    """The task's DANN arguments for ``stage`` (none unless ``adaptation.dann`` lists it)."""
    dann = adaptation_parts(cfg).get("dann")
    if dann is None or stage not in (dann.get("stages") or []):
        return {}
    discriminator = instantiate_checked(dann.discriminator, in_features=model.feature_channels)
    size = dann.get("unlabeled_batch_size")
    dm.unlabeled_dataloader(size)  # checks now that unlabelled real images exist
    return {
        "discriminator": discriminator,
        "unlabeled": lambda: dm.unlabeled_dataloader(size),
        "dann_weight": float(dann.weight),
        "grl_gamma": float(dann.gamma),
    }


def _mark_failed(
    cfg: Any, logger: Any, run_id: str, name: str, run_dir: Path, exc: BaseException
) -> None:
    """Tag the run failed and raise the job-failure alert (T-05) with the error; an error
    while reporting is logged, never allowed to hide the original one."""
    try:
        logger.experiment.set_tag(run_id, "status", "failed")
        if cfg.risk.enabled:
            _publish_risk(
                cfg,
                logger,
                run_id,
                name,
                run_dir,
                {"risk/T-05/job_failed": 1.0},
                {"error": repr(exc)[:500]},
            )
        logger.finalize("failed")
    except Exception as report_error:  # noqa: BLE001 - the training error matters more
        log.error("could not report the failure of stage %s: %s", name, report_error)


def _add_wall_time(run_dir: Path, seconds: float) -> float:
    """Training seconds of this stage over all its sessions (a resumed stage costs what
    every session spent, O-01); kept in the stage folder."""
    path = run_dir / "wall_seconds.txt"
    total = (float(path.read_text()) if path.exists() else 0.0) + seconds
    path.write_text(f"{total:.3f}")
    return total


def _assess_risk(
    cfg: Any,
    logger: Any,
    run_id: str,
    name: str,
    run_dir: Path,
    task: Any,
    dm: Any,
    datasets: Mapping[str, Any],
    metrics: Mapping[str, float],
    wall: float,
    devices: int,
    gpu: Any,
    screening: Mapping[str, float] | None,
    references: Mapping[str, float] | None,
) -> dict[str, float]:
    """The register's monitors for a finished stage, published to its MLflow run."""
    from training.risk.cost import CostTracker
    from training.risk.monitor import StageEvidence, assess

    risk = cfg.risk
    sim_ratio = float(cfg.stages[name].sim_ratio)
    reference = dm.sim_train if sim_ratio > 0 and dm.sim_train is not None else dm.real_subset
    current = datasets.get("real_test") or datasets.get("real_val")
    extra = dict(screening or {})
    tags: dict[str, str] = {}
    if gpu is not None:
        extra.update(gpu.metrics())
        tags.update(gpu.tags())
    cost = CostTracker(
        Path(cfg.paths.output) / "cost_ledger.json",
        float(risk.cost.price_per_device_hour),
        float(risk.cost.daily_budget),
        currency=str(risk.cost.currency),
    )
    evidence = StageEvidence(
        stage=name,
        test_metrics=metrics,
        group_confusions=task.test_group_confusions.get("real", {}),
        class_names=task.class_names,
        model=task.model,
        reference=reference,
        current=current,
        wall_seconds=wall,
        devices=devices,
        extra=extra,
    )
    settings = {**dict(risk), "references": dict(references or {})}
    figures = assess(evidence, settings, cost_tracker=cost, run_id=run_id)
    _publish_risk(cfg, logger, run_id, name, run_dir, figures, tags, context=metrics)
    return figures


def _publish_risk(
    cfg: Any,
    logger: Any,
    run_id: str,
    name: str,
    run_dir: Path,
    figures: Mapping[str, float],
    tags: Mapping[str, str],
    context: Mapping[str, float] | None = None,
) -> None:
    from training.risk.monitor import publish

    fired = publish(
        logger.experiment,
        run_id,
        f"{cfg.name}/{name}",
        figures,
        run_dir,
        tags=tags,
        register_path=cfg.risk.register,
        alerts_path=cfg.risk.alerts,
        context=context,
    )
    for alert in fired:
        log.warning("ALERT %s (%s): %s", alert["rule"], alert["risk_id"], alert["message"])


def register_and_compare(
    cfg: Any, uri: str, run_id: str, dm: Any, num_classes: int
) -> dict[str, float]:
    """Register the stage's model; a challenger is A/B-compared with the champion on the
    real validation images and promoted only if it wins by the margin (T-01)."""
    from mlflow.tracking import MlflowClient

    from training.risk.registry import CHALLENGER, ModelRegistry, per_image_scores

    reg = cfg.registry
    registry = ModelRegistry(uri, name=str(reg.name))
    client = MlflowClient(uri)
    if "registry/version" in client.get_run(run_id).data.tags:
        return {}  # a rerun after a crash past registration: never register twice
    version = registry.register(run_id)
    client.set_tag(run_id, "registry/version", version)
    if registry.aliases().get(CHALLENGER) != version:
        client.set_tag(run_id, "registry/decision", "first_champion")
        return {"registry/promoted": 1.0}
    loaders = dict(zip(dm.val_names, dm.val_dataloader(), strict=True))
    loader = loaders.get("real") or loaders.get("sim")
    comparison = registry.compare(
        lambda model: per_image_scores(
            model, loader, num_classes, metric=str(reg.metric), batch_forward=True
        ),
        margin=float(reg.margin),
        confidence=float(reg.confidence),
        seed=int(cfg.seed),
    )
    promoted = registry.promote(comparison)
    client.set_tag(run_id, "registry/decision", "promoted" if promoted else "kept_champion")
    log.info(
        "registry %s: challenger v%s %s (diff %.4f, CI [%.4f, %.4f], margin %.3f)",
        reg.name,
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
    }
