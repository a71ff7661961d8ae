"""The two kinds of adaptation plug-in, and what the run hands them.

An ``adaptation`` config lists its components, each a node with ``_target_`` and a
``stages`` list (the stages it adapts). Orchestration builds every component, asks which
interface it implements, and never names a method:

* :class:`PixelAdaptation` turns datasets into datasets before the stages it lists train
  (CycleGAN translation of the sim training set). Its :meth:`~PixelAdaptation.key` names
  what it will produce from plain run values alone, so a stage trained on its output is
  identified (and found by ``scripts/compare.py``) without running anything;
  :meth:`~PixelAdaptation.prepare` produces it through the run's stage store.
* :class:`TaskAdaptation` adds an :class:`Objective` to the task's loss for the stages it
  lists (DANN's domain loss), with optional per-step Lightning callbacks (an EMA teacher).

Adding a method is one module with one such class plus one ``configs/adaptation/*.yaml``.
This package never imports ``training``: what a plug-in needs from the run (the stage
store, a frozen segmenter, model export) arrives through :class:`PrepareEnv`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class RunValues:
    """Plain values of the run a component adapts.

    Attributes:
        seed: the run's seed.
        image_size: ``(H, W)`` of the data, pixels.
        class_names: the taxonomy's classes in index order.
        data: what identifies the source data: the dataset nodes and generation settings,
            plain and resolved (no worker counts).
        precision: the trainer's precision (``32-true``, ``bf16-mixed``, ...).
        stage_key: ``name -> hash`` of a stage of this experiment trained without
            adaptation (pure: nothing is trained to answer).
        stage_names: the experiment's stages, in order.
    """

    seed: int
    image_size: tuple[int, int]
    class_names: tuple[str, ...]
    data: Mapping[str, Any]
    precision: str
    stage_key: Callable[[str], str]
    stage_names: tuple[str, ...]


class StageRun(Protocol):
    """One open stage of the store (see ``training.stages.store``)."""

    run_dir: Path
    checkpoint_dir: Path
    run_id: str
    fresh: bool
    logger: Any

    def fit(self, module: Any, *, callbacks: Sequence[Any] = (), **kwargs: Any) -> Any:
        """Fit ``module`` (resuming from the folder's last checkpoint, with retries)."""

    def resume_checkpoint(self) -> Path | None:
        """The checkpoint :meth:`fit` resumes from (``last.ckpt`` or a newer SLURM one)."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (flattened, redacted) parameters of a new run."""

    def finish(self, values: Mapping[str, Any]) -> Any:
        """Publish the done marker with ``values``; returns the stage record."""


class PrepareEnv(Protocol):
    """What the run lends a pixel-level component (implemented by ``training.stages``)."""

    data_dir: Path
    output_dir: Path
    tracking_uri: str
    log_model: bool
    num_workers: int
    world_size: int

    def finished(self, kind: str, digest: str) -> Any | None:
        """The record of stage ``kind-digest`` if it finished earlier, else None."""

    def open(self, kind: str, digest: str, tags: Mapping[str, str] | None = None) -> Any:
        """A context manager yielding a :class:`StageRun`; marks it failed on error."""

    def check_segmenter(self, source: str, key: str) -> None:
        """Refuse a segmenter that is neither a stage trained on sim from scratch nor a
        checkpoint file, before any work."""

    def segmenter(self, source: str, key: str) -> tuple[nn.Module, str]:
        """A frozen sim segmenter (``(B, 3, H, W) -> (B, C, H, W)`` logits) and its hash:
        ``source`` is a stage of the experiment (trained without adaptation if needed) or
        a checkpoint file; ``key`` names the config key in errors."""

    def lock(self, name: str, what: str, data: bool = False) -> AbstractContextManager[None]:
        """An inter-process lock for work that parallel sweep jobs may share; ``data``:
        one kept with the datasets (``paths.data``), shared by every output folder."""

    def export_model(self, run_id: str, model: nn.Module, name: str) -> None:
        """Log ``model`` (images in [0, 1]) to the MLflow run as a model named ``name``."""

    def log_metrics(self, run_id: str, metrics: Mapping[str, float]) -> None:
        """Log figures to an MLflow run."""


@dataclass
class Prepared:
    """What a pixel-level component produced: datasets by role that replace those of its
    stages, its identity, figures, and the records of the stages it ran (for the results
    of the run, by name)."""

    datasets: Mapping[str, Any]
    key: str
    figures: Mapping[str, float]
    records: Mapping[str, Any]


class PixelAdaptation(abc.ABC):
    """Datasets into datasets, before the listed stages train."""

    stages: Sequence[str] = ()

    @abc.abstractmethod
    def key(self, run: RunValues) -> str:
        """12 hex digits naming the datasets :meth:`prepare` would produce."""

    @abc.abstractmethod
    def prepare(self, run: RunValues, env: PrepareEnv, datasets: Mapping[str, Any]) -> Prepared:
        """Produce (or reuse) the adapted datasets; checks everything before work."""

    def check(  # noqa: B027
        self, run: RunValues, env: PrepareEnv, datasets: Mapping[str, Any] | None
    ) -> None:
        """Refuse bad settings before any work (default: nothing to check): called with
        ``datasets=None`` before any data is generated, then with the built datasets
        before the first stage."""


@dataclass(frozen=True)
class ModelInfo:
    """What an objective may know of the task model.

    Attributes:
        feature_channels: width of the pooled encoder features
            (``model.forward_features`` returns ``(logits, (B, F, h, w) features)``).
        num_classes: C, the logits' channels.
        unlabeled: ``batch_size -> iterable`` of unlabelled real batches (``{"image":
            (B, 3, H, W)}``; ``None``: the labelled batch size), or None when the run has
            none.
        seed: the run's seed: an objective draws its initial weights (a discriminator,
            a teacher) from it, so the same seed gives the same run.
        student: the task model itself, with its initial weights (a mean teacher starts as
            its copy); an objective must not register it as its own submodule.
        class_names: the taxonomy's classes in index order (names of per-class logs).
        palette: ``(256, 3) uint8`` label colours, for image grids; None: none drawn.
    """

    feature_channels: int
    num_classes: int
    unlabeled: Callable[[int | None], Any] | None
    seed: int = 0
    student: nn.Module | None = None
    class_names: tuple[str, ...] = ()
    palette: Any = None


def unlabeled_batches(model: ModelInfo, batch_size: int | None, method: str) -> Callable[[], Any]:
    """``() -> iterable`` of unlabelled real batches of ``batch_size`` for an objective,
    checked now: a run without unlabelled real images is a config error naming the key."""
    from core.config import ConfigError

    if model.unlabeled is None:
        raise ConfigError(
            f"data.datasets.real_unlabeled: {method} needs unlabelled real images "
            "(real_unlabeled, or real_train standing in for it); none found"
        )
    model.unlabeled(batch_size)  # checks now that the images exist
    return lambda: model.unlabeled(batch_size)


@dataclass
class StepOutputs:
    """What the task computed for a training batch, handed to each objective.

    Attributes:
        logits: ``(B, C, H, W)``.
        features: ``(B, F, h, w)`` encoder features.
        forward_features: ``images -> (logits, features)`` through the student model.
        step: the global step (no hidden counters: schedules read it).
        total_steps: the steps of the whole fit.
        extra_logits, extra_features: the student's outputs on the images the objective
            asked for with :meth:`Objective.extra_images`, computed in the same forward
            pass as the labelled batch (so BatchNorm normalizes both with one set of
            batch statistics); None when it asked for none.
    """

    logits: torch.Tensor
    features: torch.Tensor
    forward_features: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    step: int
    total_steps: int
    extra_logits: torch.Tensor | None = None
    extra_features: torch.Tensor | None = None


class Objective(nn.Module):
    """A loss term: ``loss, logs = objective(batch, outputs)``; its parameters (a
    discriminator) join the task's optimizer. ``logs`` are scalars logged as
    ``train/<name>``."""

    def extra_images(self, batch: Mapping[str, Any], step: int) -> torch.Tensor | None:
        """Images ``(N, 3, H, W)`` the student should see in the same forward pass as the
        labelled ``batch`` (unlabelled real images for a domain loss); their outputs reach
        :meth:`forward` as ``outputs.extra_logits`` / ``extra_features``. Default: none.

        One pass matters in train mode: two passes would normalize each domain with its
        own BatchNorm batch statistics, hiding the very shift a domain loss must see."""
        return None

    def forward(  # type: ignore[override]
        self, batch: Mapping[str, Any], outputs: StepOutputs
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        raise NotImplementedError


class TaskAdaptation(abc.ABC):
    """A loss term (and per-step hooks) added to the listed stages."""

    stages: Sequence[str] = ()

    @abc.abstractmethod
    def objective(self, model: ModelInfo) -> Objective:
        """A fresh objective for one stage; checks what it needs (unlabelled images)."""

    def callbacks(self, objective: Objective) -> list[Any]:
        """Lightning callbacks for per-step hooks of ``objective`` (the one
        :meth:`objective` built for the stage), e.g. an EMA teacher; default: none."""
        return []
