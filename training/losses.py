"""Segmentation loss: class-weighted cross-entropy, and class weights from a pixel histogram.

Class weighting is the config-level mitigation of risk T-08 (model bias): rare classes
(poles, signs, people) cover few pixels, so an unweighted loss learns them last and
worst. ``loss.class_weighting`` picks a method; the dataset card's class pixel
histogram supplies the counts. The clip bounds are an argument of
:func:`class_weights_from_histogram` only (no config key sets them: the stages use the
default ``(0.2, 5.0)``).

Example:
    >>> counts = card["class_pixel_histogram"]                # (C,) pixel counts
    >>> weights = class_weights_from_histogram(counts, "inverse_sqrt", clip=(0.2, 5.0))
    >>> loss_fn = SegmentationLoss(num_classes=len(counts), class_weights=weights)
    >>> loss = loss_fn(logits, batch["mask"])                 # scalar
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CLASS_WEIGHTINGS", "ENET_C", "SegmentationLoss", "class_weights_from_histogram"]

#: Methods accepted by :func:`class_weights_from_histogram` (config ``loss.class_weighting``).
CLASS_WEIGHTINGS: tuple[str, ...] = ("none", "inverse", "inverse_sqrt", "median_frequency", "enet")

#: The constant ``c`` of ENet's weighting ``1 / ln(c + p)`` (Paszke et al., 2016): it
#: bounds the weights to [1 / ln(c + 1), 1 / ln(c)] = [1.42, 50.5].
ENET_C = 1.02

#: Bisection steps for the normalizing scale; each halves a log-interval that starts
#: at most ~80 wide, so 100 steps reach float64 precision.
_BISECTION_STEPS = 100


def _as_counts(pixel_counts: Sequence[float] | Tensor) -> Tensor:
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64).detach().cpu()
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(
            f"pixel_counts: expected a 1-D sequence of per-class pixel counts, "
            f"got shape {tuple(counts.shape)}"
        )
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"pixel_counts: expected finite counts >= 0, got {counts.tolist()}")
    return counts


def class_weights_from_histogram(
    pixel_counts: Sequence[float] | Tensor,
    method: str = "inverse_sqrt",
    clip: tuple[float, float] = (0.2, 5.0),
) -> Tensor:
    """Per-class loss weights from per-class pixel counts.

    With ``p_c = n_c / sum(n)`` the pixel frequency of class ``c``, the raw weights are

    - ``"none"``: 1 (returned as ones; ``clip`` is not applied);
    - ``"inverse"``: ``1 / p_c``;
    - ``"inverse_sqrt"``: ``1 / sqrt(p_c)`` (gentler: the usual choice for driving data,
      where road and sky cover ~60 % of pixels and poles < 1 %);
    - ``"median_frequency"``: ``median(p) / p_c`` (SegNet; the median is taken over the
      classes present). SegNet's ``p_c`` counts only images containing ``c``; a global
      histogram does not have that, and then this is ``"inverse"`` up to a constant
      factor, which the normalization below removes: both give the same weights;
    - ``"enet"``: ``1 / ln(1.02 + p_c)`` (ENet).

    The weights are then scaled by the one factor ``s`` for which the clipped weights
    ``clamp(s * w_c, low, high)`` have a pixel-weighted mean ``sum_c p_c * weight_c`` of
    exactly 1, so the loss keeps the scale of an unweighted loss (learning rates carry
    over) and no class weighs more than ``high`` / less than ``low`` times an average pixel.

    A class with no pixels gets weight 1, the average: it adds nothing to the loss on
    this data, and if it shows up later (a histogram taken on sim data, fine-tuning on
    real) it is neither amplified -- ``high`` on a class the histogram never saw could
    dominate a batch -- nor ignored.

    Args:
        pixel_counts: ``(C,)`` pixel counts per class (>= 0, not all 0), e.g. the dataset
            card's class histogram.
        method: one of :data:`CLASS_WEIGHTINGS` (config ``loss.class_weighting``).
        clip: ``(low, high)`` bounds relative to the average pixel weight, with
            ``0 < low <= 1 <= high``. Not a config key: the training stages use this
            default.

    Returns:
        ``(C,)`` float32 weights.

    Raises:
        ValueError: unknown method (names ``loss.class_weighting``), bad counts, or a bad
            clip (names ``class_weights_from_histogram(clip=...)``).

    Example:
        >>> class_weights_from_histogram([90, 10], "inverse", clip=(0.2, 5.0))
        tensor([0.5556, 5.0000])
    """
    if method not in CLASS_WEIGHTINGS:
        raise ValueError(
            f"loss.class_weighting: expected one of {list(CLASS_WEIGHTINGS)}, got {method!r}"
        )
    counts = _as_counts(pixel_counts)
    if method == "none":
        return torch.ones(counts.numel(), dtype=torch.float32)
    try:
        low, high = (float(v) for v in clip)
    except (TypeError, ValueError):
        low = high = math.nan  # not two numbers: refused just below
    if not (0.0 < low <= 1.0 <= high and math.isfinite(high)):
        raise ValueError(
            "class_weights_from_histogram(clip=...): expected (low, high) with "
            f"0 < low <= 1 <= high, got {clip!r}"
        )
    total = counts.sum()
    if total <= 0:
        raise ValueError(
            f"pixel_counts: all counts are 0, no class frequency to weight by "
            f"(loss.class_weighting={method!r}; use 'none' for unlabelled data)"
        )

    present = counts > 0
    freq = counts[present] / total
    if method == "inverse":
        raw = 1.0 / freq
    elif method == "inverse_sqrt":
        raw = freq.rsqrt()
    elif method == "median_frequency":
        raw = freq.median() / freq  # torch's median of an even count is the lower middle
    else:  # "enet"
        raw = 1.0 / torch.log(ENET_C + freq)

    def mean_weight(scale: float) -> float:
        return float((freq * (scale * raw).clamp(low, high)).sum())

    # mean_weight is continuous and non-decreasing in the scale, equal to `low` (<= 1) when
    # every scaled weight is clipped low and to `high` (>= 1) when all are clipped high:
    # bisect (in log space, the weights span orders of magnitude) for mean_weight == 1.
    scale = 1.0 / float((freq * raw).sum())  # exact when nothing is clipped
    if abs(mean_weight(scale) - 1.0) > 1e-12:
        lo_log, hi_log = math.log(low / float(raw.max())), math.log(high / float(raw.min()))
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo_log + hi_log)
            if mean_weight(math.exp(mid)) < 1.0:
                lo_log = mid
            else:
                hi_log = mid
        scale = math.exp(0.5 * (lo_log + hi_log))

    weights = torch.ones(counts.numel(), dtype=torch.float64)
    weights[present] = (scale * raw).clamp(low, high)
    return weights.float()


class SegmentationLoss(nn.Module):
    """Class-weighted pixel cross-entropy with an ignore label.

    ``loss = sum_i w[y_i] * ce_i / sum_i w[y_i]`` over the pixels ``i`` whose label is not
    ``ignore_index`` -- the same value as ``F.cross_entropy(..., weight=w,
    ignore_index=..., label_smoothing=...)`` with mean reduction -- except that a batch in
    which every pixel is ignored gives 0 (with a gradient of zeros) instead of NaN, so one
    unlabelled batch cannot poison the weights.

    Args:
        num_classes: number of classes ``C``.
        class_weights: ``(C,)`` non-negative weights (e.g. from
            :func:`class_weights_from_histogram`); ``None`` weighs all classes 1.
        ignore_index: label value that contributes nothing (255 in the Sample contract).
        label_smoothing: in [0, 1), as in ``F.cross_entropy``.

    The weights are a non-persistent buffer: they follow ``.to(device)`` but are not
    saved in checkpoints, since they are recomputed from the config and dataset (and a
    run with other weights can still load the checkpoint).

    Shapes:
        ``forward(logits (B, C, H, W) float, target (B, H, W) int64) -> ()`` float32
        (float64 for float64 logits).
    """

    class_weights: Tensor | None

    def __init__(
        self,
        num_classes: int,
        class_weights: Sequence[float] | Tensor | None = None,
        ignore_index: int = 255,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected an integer >= 1, got {num_classes!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"loss.label_smoothing: expected [0, 1), got {label_smoothing!r}")
        weights = None
        if class_weights is not None:
            weights = torch.as_tensor(class_weights, dtype=torch.float32).detach().clone()
            if weights.shape != (num_classes,):
                raise ValueError(
                    f"class_weights: expected {num_classes} weights (one per class), "
                    f"got shape {tuple(weights.shape)}"
                )
            if not torch.isfinite(weights).all() or (weights < 0).any():
                raise ValueError(f"class_weights: expected finite weights >= 0, got {weights}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean weighted cross-entropy of ``logits`` ``(B, C, H, W)`` against ``target``
        ``(B, H, W)`` int64 labels; a 0-dim tensor, float32 (float64 for float64 logits)."""
        # At least float32: the log-softmax of bf16/fp16 logits is too coarse for a loss.
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logits = logits.to(dtype)
        weights = None if self.class_weights is None else self.class_weights.to(dtype)
        per_pixel = F.cross_entropy(
            logits,
            target,
            weight=weights,
            ignore_index=self.ignore_index,
            reduction="none",
            label_smoothing=self.label_smoothing,
        )  # (B, H, W), already multiplied by w[target], 0 where ignored
        valid = target != self.ignore_index
        if self.class_weights is None:
            denominator = valid.sum().to(per_pixel.dtype)
        else:
            # Ignored pixels index class 0 here and are then zeroed by `valid`.
            safe_target = torch.where(valid, target, torch.zeros_like(target))
            denominator = (weights[safe_target] * valid).sum()
        # No `if valid.any()`: that would synchronise with the GPU on every step. With no
        # valid pixel the numerator is an exact 0 (with a graph), and so is the result.
        return per_pixel.sum() / denominator.clamp_min(torch.finfo(per_pixel.dtype).tiny)
