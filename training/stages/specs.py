"""The run's config resolved once, at the top, into small frozen specs of plain values.

:func:`stage_specs` checks every stage's keys before any work and names the key a user
would type (``stages.finetune.sim_ratio``); :func:`tracking_spec` settles where runs go.
Below these, functions take the specs' plain values, never the whole config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import ConfigError, check_number

#: The keys a stage config may hold (configs/stage/*.yaml).
STAGE_KEYS = (
    "sim_ratio",
    "real_fraction",
    "init",
    "max_epochs",
    "batches_per_epoch",
    "real_loss_share",
    "bn_recalibration",
)


@dataclass(frozen=True)
class StageSpec:
    """One stage of an experiment.

    Attributes:
        name: the stage's name (``source_only``, ``finetune``, ...).
        sim_ratio: share of sim samples in each training batch, in [0, 1].
        real_fraction: share of the real training split whose labels are used, in [0, 1].
        init: an earlier stage whose best weights start this one, or a checkpoint file,
            or None (from scratch).
        max_epochs: training epochs (>= 1).
        batches_per_epoch: training batches per epoch; None: ``data.loader``'s.
        real_loss_share: share of the task loss the batch's real samples carry, in [0, 1]
            (the sim samples carry the rest); None: every labelled pixel weighs the same,
            so a 90/10 batch gives the real labels about a tenth of the gradient.
        bn_recalibration: batches of unlabelled real images over which the BatchNorm
            running statistics are estimated again before every validation (AdaBN); 0:
            off, the statistics of the (mostly sim) training batches are kept.
    """

    name: str
    sim_ratio: float
    real_fraction: float
    init: str | None
    max_epochs: int
    batches_per_epoch: int | None
    real_loss_share: float | None = None
    bn_recalibration: int = 0


@dataclass(frozen=True)
class TrackingSpec:
    """Where runs are logged: the tracking URI (an explicit ``tracking.uri`` beats
    ``MLFLOW_TRACKING_URI``, else SQLite in the output folder), the experiment, the sweep
    id and trigger tagged on every run, and where a new experiment keeps artifacts."""

    uri: str
    experiment: str
    sweep_id: str
    trigger: str
    artifact_location: str | None


def stage_specs(stages: Any, retries: Any) -> list[StageSpec]:
    """The experiment's stages in order (``cfg.stages``), each checked: known keys,
    ratios in [0, 1], whole epochs, an ``init`` that is an earlier stage or a file."""
    if not stages:
        raise ConfigError("stages: no stage to run; pick an experiment (experiment=finetune)")
    check_number("retries", retries, low=0, integer=True)
    names = list(stages)
    specs = []
    for i, name in enumerate(names):
        node = stages[name]
        unknown = sorted(set(node) - set(STAGE_KEYS))
        if unknown:
            raise ConfigError(
                f"stages.{name}.{unknown[0]}: unknown key, expected one of {sorted(STAGE_KEYS)}"
            )
        key = f"stages.{name}"
        epochs = check_number(f"{key}.max_epochs", node.get("max_epochs"), low=1, integer=True)
        ratio = check_number(f"{key}.sim_ratio", node.get("sim_ratio"), low=0, high=1)
        fraction = check_number(f"{key}.real_fraction", node.get("real_fraction"), low=0, high=1)
        batches = check_number(
            f"{key}.batches_per_epoch",
            node.get("batches_per_epoch"),
            low=1,
            integer=True,
            optional=True,
        )
        share = check_number(
            f"{key}.real_loss_share", node.get("real_loss_share"), low=0, high=1, optional=True
        )
        recalibration = check_number(
            f"{key}.bn_recalibration", node.get("bn_recalibration", 0), low=0, integer=True
        )
        init = node.get("init") or None
        if init and init in stages and names.index(init) >= i:
            raise ConfigError(f"{key}.init: stage '{init}' must come before '{name}'")
        if init and init not in stages and not Path(init).is_file():
            raise ConfigError(
                f"{key}.init: '{init}' is neither an earlier stage ({names[:i]}) nor a "
                "checkpoint file"
            )
        specs.append(
            StageSpec(
                name,
                float(ratio),
                float(fraction),
                init,
                epochs,
                batches,
                None if share is None else float(share),
                int(recalibration),
            )
        )
    return specs


def check_run_values(seed: Any, loader: Any) -> None:
    """The seed and the loader settings, checked before any data is generated (the data
    module checks them again, with the same keys)."""
    check_number("seed", seed, low=0, integer=True)
    for name, low in (("batch_size", 1), ("val_batch_size", 1), ("batches_per_epoch", 1)):
        check_number(f"data.loader.{name}", loader.get(name), low=low, integer=True)
    check_number("data.loader.num_workers", loader.get("num_workers", 0), low=0, integer=True)


def tracking_spec(tracking: Any, output: Path, create: bool = True) -> TrackingSpec:
    """``cfg.tracking`` resolved against ``paths.output``."""
    from training import tracking as mlflow_tracking

    uri = mlflow_tracking.tracking_uri(output, tracking.get("uri"), create=create)
    return TrackingSpec(
        uri=uri,
        experiment=str(tracking.experiment),
        sweep_id=str(tracking.get("sweep_id") or ""),
        trigger=str(tracking.get("trigger") or ""),
        artifact_location=mlflow_tracking.artifact_location(output, uri),
    )


def world_size(trainer: Any) -> int:
    """Processes that train together (``trainer.devices`` x ``trainer.num_nodes``):
    ``devices`` a count, a list of device ids, or ``auto`` / ``-1`` (every visible GPU, or
    one CPU process)."""
    from collections.abc import Sequence

    from omegaconf import ListConfig

    devices = trainer.get("devices", 1)
    if isinstance(devices, Sequence | ListConfig) and not isinstance(devices, str):
        count = len(devices)
    elif isinstance(devices, int) and devices > 0:
        count = devices
    elif isinstance(devices, str) and devices.isdigit() and int(devices) > 0:
        count = int(devices)
    else:  # "auto", -1, None
        import torch

        gpu = str(trainer.get("accelerator", "auto")) in ("gpu", "cuda", "auto")
        count = torch.cuda.device_count() if gpu and torch.cuda.is_available() else 1
    return max(1, count) * int(trainer.get("num_nodes", 1) or 1)
