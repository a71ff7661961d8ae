"""Self-training with a mean teacher (DACS, Tranheden et al. 2021; DAFormer, Hoyer et al.
2022; MIC, Hoyer et al. 2023) as a task-level plug-in.

On every training step, for a batch of unlabelled real images ``x_t``:

1. the **teacher** -- an exponential moving average of the student, never trained by the
   optimizer -- predicts ``p_t = softmax(teacher(x_t))`` under ``no_grad``; its pseudo-label
   is ``argmax p_t`` where ``max p_t >= threshold`` and 255 (ignored) elsewhere, and each
   image weighs by its share of confident pixels (DACS / DAFormer's quality weight);
2. **ClassMix** pastes the pixels of half the classes present in a labelled image (sim, or
   the labelled real share) onto an unlabelled real one; the label is mixed with the same
   mask (true labels where pasted, pseudo-labels elsewhere), and the student is trained on
   the mix with the quality-weighted cross-entropy;
3. **MIC** (optional): random patches of ``x_t`` are hidden from the student, which must
   still predict the teacher's pseudo-labels of the whole image;
4. after each optimizer step the teacher becomes ``m * teacher + (1 - m) * student`` with
   ``m = min(momentum, 1 - 1 / (step + 1))`` (:func:`ema_momentum`, from the step alone;
   validation never updates it).

Everything random is drawn from a generator seeded by ``(seed, step)``, so a step draws
the same masks whatever ran before it.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptation.plugin import (
    ModelInfo,
    Objective,
    StepOutputs,
    TaskAdaptation,
    unlabeled_batches,
)
from core.images import label_columns

log = logging.getLogger(__name__)

IGNORE = 255
KEY = "adaptation.self_training"
#: Steps between two measurements of teacher-student agreement (each one more forward).
AGREEMENT_EVERY = 10
#: Share of confident pixels of one class above which the teacher is said to collapse.
COLLAPSE_SHARE = 0.95


# ------------------------------------------------------------------ pure pieces
def ema_momentum(step: int, momentum: float) -> float:
    """The teacher's momentum at optimizer step ``step``: ``min(momentum, 1 - 1/(step+1))``
    (DAFormer), so the first steps follow the student closely."""
    return min(float(momentum), 1.0 - 1.0 / (int(step) + 1))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student``, parameters and float
    buffers (BatchNorm statistics); integer buffers are copied."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        if t.dtype.is_floating_point:
            t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
        else:
            t.copy_(s)


def pseudo_labels(logits: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Pseudo-labels of teacher ``logits`` ``(B, C, H, W)``.

    Returns ``(labels, confidence, quality)``: labels ``(B, H, W)`` int64 with 255 where
    the confidence is below ``threshold``; confidence ``(B, H, W)`` (max softmax); quality
    ``(B,)`` the share of confident pixels of each image.
    """
    probs = logits.float().softmax(dim=1)
    confidence, labels = probs.max(dim=1)
    confident = confidence >= threshold
    labels = torch.where(confident, labels, torch.full_like(labels, IGNORE))
    return labels, confidence, confident.float().mean(dim=(1, 2))


def classmix_masks(labels: Tensor, generator: torch.Generator, ratio: float = 0.5) -> Tensor:
    """``(B, H, W)`` bool masks: for each labelled map, the pixels of a random ``ratio``
    of the classes it holds (rounded up; ClassMix: half), ignored pixels never pasted."""
    masks = torch.zeros_like(labels, dtype=torch.bool)
    for b, label in enumerate(labels):
        classes = torch.unique(label)
        classes = classes[classes != IGNORE]
        if len(classes) == 0:
            continue
        order = torch.randperm(len(classes), generator=generator)
        count = math.ceil(ratio * len(classes) - 1e-9)
        chosen = classes[order[:count].to(classes.device)]
        masks[b] = torch.isin(label, chosen)
    return masks


def classmix(
    source: Tensor, source_labels: Tensor, target: Tensor, target_labels: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Paste ``source`` pixels where ``mask`` ``(B, H, W)`` onto ``target`` ``(B, 3, H, W)``;
    the labels are mixed with the same mask. Returns ``(images, labels)``."""
    m = mask.unsqueeze(1)
    images = torch.where(m, source, target)
    labels = torch.where(mask, source_labels, target_labels)
    return images, labels


def patch_mask(
    shape: tuple[int, int, int], patch: int, ratio: float, generator: torch.Generator
) -> Tensor:
    """MIC's ``(B, H, W)`` keep-mask: the image cut into ``patch`` x ``patch`` cells, each
    hidden (False) with probability ``ratio``."""
    b, h, w = shape
    gh, gw = -(-h // patch), -(-w // patch)
    keep = torch.rand(b, gh, gw, generator=generator) >= ratio
    full = keep.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
    return full[:, :h, :w]


def weighted_ce(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """Cross-entropy ``(B, C, H, W)`` vs ``(B, H, W)`` (255 ignored), each image weighted
    by ``weights`` ``(B,)``, averaged over the batch's pixels."""
    per_pixel = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")
    return (per_pixel * weights.view(-1, 1, 1)).mean()


def example_grid(real: Tensor, pseudo: Tensor, mixed: Tensor, student: Tensor, palette: Any) -> Any:
    """Rows of ``[real | pseudo-label | mixed image | student]`` as ``(R * H, 4 * W, 3)``
    uint8: images ``(R, 3, H, W)`` in [0, 1], labels ``(R, H, W)`` coloured with
    ``palette`` ``(256, 3)`` (ignored pixels black)."""
    import numpy as np

    palette = np.asarray(palette, dtype=np.uint8).copy()
    palette[IGNORE] = 0

    def rgb(x: Tensor) -> Any:
        return (x.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).astype(
            np.uint8
        )

    def colour(labels: Tensor) -> Any:
        return palette[labels.detach().cpu().numpy().astype(np.int64)]

    panels = [rgb(real), colour(pseudo), rgb(mixed), colour(student)]
    return np.concatenate(
        [np.concatenate(row, axis=1) for row in zip(*panels, strict=True)], axis=0
    )


# ------------------------------------------------------------------ the objective
class SelfTrainingObjective(Objective):
    """The self-training loss terms of one stage (module doc). Logs ``self_training/*``:
    ``loss_mix``, ``loss_mic``, ``confidence``, ``confident_share``, ``agreement``
    (teacher vs student on the real images, every :data:`AGREEMENT_EVERY` steps),
    ``pseudo/<class>`` (each class's share of
    the confident pseudo-labels), ``top_class_share`` and ``collapsed``; every
    ``image_every`` steps it keeps rows of ``real | pseudo-label | mixed | student`` in
    :attr:`example` for the callback to log."""

    def __init__(
        self,
        student: nn.Module,
        unlabeled: Any,
        threshold: float,
        weight: float,
        mix: bool,
        mic_ratio: float,
        mic_patch: int,
        seed: int,
        num_classes: int,
        mix_ratio: float = 0.5,
        class_names: Sequence[str] = (),
        image_every: int = 0,
        palette: Any = None,
    ) -> None:
        super().__init__()
        self.teacher = copy.deepcopy(student).eval().requires_grad_(False)
        # a tuple keeps the student out of this module's registration (it is the task's)
        self._student: tuple[nn.Module, ...] = (student,)
        self._unlabeled, self._batches = unlabeled, None
        self.threshold, self.weight = float(threshold), float(weight)
        self.mix, self.mic_ratio, self.mic_patch = bool(mix), float(mic_ratio), int(mic_patch)
        self.seed, self.num_classes = int(seed), int(num_classes)
        self.mix_ratio, self.image_every = float(mix_ratio), int(image_every)
        self.palette = palette
        self.class_names = list(class_names) or [str(i) for i in range(self.num_classes)]
        #: the last step's pseudo-label class shares, for the collapse alert
        self.class_shares = torch.zeros(self.num_classes)
        #: ``(real, pseudo-labels, mixed, student)`` rows of the last image step, or None
        self.example: tuple[Tensor, ...] | None = None

    def train(self, mode: bool = True) -> SelfTrainingObjective:
        super().train(mode)
        self.teacher.eval()  # the teacher predicts in eval mode (BatchNorm statistics)
        return self

    def forward(  # type: ignore[override]
        self, batch: Mapping[str, Any], outputs: StepOutputs
    ) -> tuple[Tensor, dict[str, float | Tensor]]:
        device = outputs.logits.device
        if self._batches is None:
            self._batches = iter(self._unlabeled())
        real = next(self._batches)["image"].to(device)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + outputs.step)
        with torch.no_grad():
            teacher_logits, _ = self.teacher.forward_features(real)
            labels, confidence, quality = pseudo_labels(teacher_logits, self.threshold)
        logs: dict[str, float | Tensor] = {
            "self_training/confidence": confidence.mean(),
            "self_training/confident_share": quality.mean(),
        }
        loss = outputs.logits.sum() * 0.0
        if self.mix:
            source, source_labels = batch["image"], batch["mask"]
            n = min(len(source), len(real))
            masks = classmix_masks(source_labels[:n].cpu(), generator, self.mix_ratio)
            masks = masks.to(device)
            images, mixed = classmix(source[:n], source_labels[:n], real[:n], labels[:n], masks)
            # pasted pixels carry true labels: weight 1 there, the quality weight elsewhere
            mixed_logits, _ = outputs.forward_features(images)
            per_pixel = F.cross_entropy(
                mixed_logits.float(), mixed, ignore_index=IGNORE, reduction="none"
            )
            pixel_weight = torch.where(
                masks, torch.ones_like(per_pixel), quality[:n].view(-1, 1, 1)
            )
            term = (per_pixel * pixel_weight).mean()
            loss = loss + self.weight * term
            logs["self_training/loss_mix"] = term.detach()
        if self.mic_ratio > 0:
            keep = patch_mask(tuple(labels.shape), self.mic_patch, self.mic_ratio, generator)
            masked = real * keep.to(device).unsqueeze(1)
            masked_logits, _ = outputs.forward_features(masked)
            term = weighted_ce(masked_logits, labels, quality)
            loss = loss + self.weight * term
            logs["self_training/loss_mic"] = term.detach()
        with torch.no_grad():
            image_step = bool(self.image_every) and outputs.step % self.image_every == 0
            if outputs.step % AGREEMENT_EVERY == 0 or image_step:  # an extra forward pass
                student = self._student[0]
                was_training = student.training
                student.eval()  # a measurement: no BatchNorm statistics of real images taken
                try:
                    student_real, _ = outputs.forward_features(real)
                finally:
                    student.train(was_training)
                agree = (student_real.argmax(1) == teacher_logits.argmax(1)).float().mean()
                logs["self_training/agreement"] = agree
            confident = labels[labels != IGNORE]
            counts = torch.bincount(confident.flatten().cpu(), minlength=self.num_classes)
            shares = counts.float() / max(int(counts.sum()), 1)
            self.class_shares = shares
            for name, share in zip(self.class_names, shares.tolist(), strict=True):
                logs[f"self_training/pseudo/{name}"] = share
            logs["self_training/top_class_share"] = shares.max()
            logs["self_training/collapsed"] = float(shares.max() > COLLAPSE_SHARE)
            if image_step:
                rows = slice(0, 4)
                shown = images if self.mix else real
                self.example = tuple(
                    t[rows].detach().cpu() for t in (real, labels, shown, student_real.argmax(1))
                )
        return loss, logs


def teacher_update(objective: SelfTrainingObjective, momentum: float, palette: Any = None) -> Any:
    """A Lightning callback: the EMA update after every training batch's optimizer step
    (validation and testing never call it); the ``real | pseudo | mixed | student`` grid
    logged when the objective kept one; and the collapse alert: the first step whose
    confident pseudo-labels are more than 95 % one class warns and tags the run
    ``alert/self_training_collapse`` (``<class> <share> at step <n>``)."""
    import pytorch_lightning as pl

    class TeacherUpdate(pl.Callback):
        def __init__(self) -> None:
            self.updated_at = -1  # the optimizer step the teacher last followed
            self.alerted = False

        def on_train_batch_end(self, trainer: Any, module: Any, *_: Any) -> None:
            step = trainer.global_step  # counts this batch's optimizer step, if it made one
            if step == 0 or step == self.updated_at:  # gradient accumulation: no step yet
                return
            self.updated_at = step
            ema_update(objective.teacher, objective._student[0], ema_momentum(step - 1, momentum))
            if objective.example is not None and palette is not None and trainer.is_global_zero:
                grid = label_columns(
                    example_grid(*objective.example, palette),
                    ("real", "pseudo-label", "mixed", "student"),
                )
                module.log_image(grid, f"self_training/examples_step{step - 1:06d}.png")
                objective.example = None
            shares = objective.class_shares
            if not self.alerted and float(shares.max()) > COLLAPSE_SHARE:
                self.alerted = True
                top = objective.class_names[int(shares.argmax())]
                message = f"{top} {float(shares.max()):.3f} at step {step - 1}"
                log.warning(
                    "self-training: the teacher's confident pseudo-labels collapsed to one "
                    "class (%s); check adaptation.self_training.threshold and the source model",
                    message,
                )
                _tag(module, "alert/self_training_collapse", message)

    return TeacherUpdate()


def _tag(module: Any, key: str, value: str) -> None:
    """Set an MLflow tag on the module's run, when its logger is MLflow's."""
    logger = getattr(module, "logger", None)
    experiment, run_id = getattr(logger, "experiment", None), getattr(logger, "run_id", None)
    if experiment is not None and run_id is not None and hasattr(experiment, "set_tag"):
        experiment.set_tag(run_id, key, value)


class SelfTraining(TaskAdaptation):
    """Mean-teacher self-training (module doc) for the listed stages.

    Args:
        stages: the stages that add the self-training terms.
        momentum: EMA momentum of the teacher, in [0, 1).
        threshold: pseudo-label confidence threshold, in (0, 1).
        weight: weight of each self-training term.
        mix: ClassMix cross-domain mixing on (a labelled image pasted on a real one).
        mix_ratio: share of a labelled image's classes ClassMix pastes, in [0, 1] (0.5).
        mic_ratio: share of patches MIC hides from the student, in [0, 1] (0: MIC off).
        mic_patch: MIC's patch size, pixels.
        unlabeled_batch_size: unlabelled real images per step; None: the labelled batch.
        image_every: steps between ``real | pseudo | mixed | student`` grids (0: none).
    """

    def __init__(
        self,
        stages: Sequence[str],
        momentum: float = 0.999,
        threshold: float = 0.968,
        weight: float = 1.0,
        mix: bool = True,
        mic_ratio: float = 0.0,
        mic_patch: int = 16,
        unlabeled_batch_size: int | None = None,
        mix_ratio: float = 0.5,
        image_every: int = 100,
    ) -> None:
        from core.config import check_number

        self.stages = list(stages)
        self.momentum = check_number(f"{KEY}.momentum", momentum, low=0, high=1, high_open=True)
        self.threshold = check_number(
            f"{KEY}.threshold", threshold, low=0, high=1, low_open=True, high_open=True
        )
        self.weight = check_number(f"{KEY}.weight", weight, low=0)
        self.mix = bool(mix)
        self.mix_ratio = check_number(f"{KEY}.mix_ratio", mix_ratio, low=0, high=1)
        self.image_every = check_number(f"{KEY}.image_every", image_every, low=0, integer=True)
        self.mic_ratio = check_number(f"{KEY}.mic_ratio", mic_ratio, low=0, high=1)
        self.mic_patch = check_number(f"{KEY}.mic_patch", mic_patch, low=1, integer=True)
        self.unlabeled_batch_size = check_number(
            f"{KEY}.unlabeled_batch_size",
            unlabeled_batch_size,
            low=1,
            integer=True,
            optional=True,
        )

    def objective(self, model: ModelInfo) -> SelfTrainingObjective:

        if model.student is None:
            raise ValueError("SelfTraining.objective: ModelInfo.student is needed (the task model)")
        batches = unlabeled_batches(model, self.unlabeled_batch_size, "self-training")
        return SelfTrainingObjective(
            model.student,
            batches,
            self.threshold,
            self.weight,
            self.mix,
            self.mic_ratio,
            self.mic_patch,
            model.seed,
            model.num_classes,
            mix_ratio=self.mix_ratio,
            class_names=model.class_names,
            image_every=self.image_every if model.palette is not None else 0,
            palette=model.palette,
        )

    def callbacks(self, objective: Objective) -> list[Any]:
        assert isinstance(objective, SelfTrainingObjective)
        return [teacher_update(objective, self.momentum, objective.palette)]
