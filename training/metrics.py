"""Semantic-segmentation metrics, overall and per condition group, and the sim-to-real gap.

Everything is derived from one confusion matrix ``M`` of shape ``(C, C)`` (rows = truth,
columns = prediction, ``M[i, j]`` = number of labelled pixels of true class ``i`` predicted as
``j``), accumulated by :class:`torchmetrics.classification.MulticlassConfusionMatrix`. Pixels
whose target is ``ignore_index`` (255) never enter ``M``. torchmetrics sums ``M`` over ranks
under DDP when it is computed, so every number below is a pure function of the synced matrix.

For class ``c``: ``TP = M[c, c]``, ``FN = sum_j M[c, j] - TP`` (missed),
``FP = sum_i M[i, c] - TP`` (false alarms), and

- ``iou/c       = TP / (TP + FP + FN)``
- ``precision/c = TP / (TP + FP)``
- ``recall/c    = TP / (TP + FN)``
- ``f1/c        = 2 TP / (2 TP + FP + FN)``  (the harmonic mean of precision and recall; Dice)
- ``pixel_acc   = trace(M) / sum(M)``

Conventions (those of the Cityscapes evaluation and of torchmetrics' ``zero_division=0``):

- A class **absent from both truth and prediction** (``TP + FP + FN = 0``) has undefined
  scores: its four per-class values are NaN and it is **excluded** from every macro mean
  (``miou``, ``macro_f1``, ``macro_precision``, ``macro_recall``), so all four means average
  over the same set of classes.
- A class present in truth but never predicted has ``precision = 0`` (and ``recall = iou =
  f1 = 0``); a class predicted but absent from truth has ``recall = 0`` (and ``precision = iou
  = f1 = 0``). Both are included in the macro means: a false alarm on a class the images do
  not contain is an error, as in Cityscapes.
- With no labelled pixel at all, every value (``pixel_acc`` included) is NaN.

Metric names follow the MLflow contract of ``DESIGN.md``: ``<split>/<domain>/<metric>`` via
the ``prefix`` of :meth:`GroupedSegmentationMetrics.compute`, and ``gap/<metric>`` = sim value
minus real value (:func:`sim_to_real_gap`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

IGNORE_INDEX = 255

#: Macro keys of :meth:`SegmentationMetrics.compute`, in order.
SUMMARY_KEYS = ("pixel_acc", "miou", "macro_f1", "macro_precision", "macro_recall")
#: Per-class families of :meth:`SegmentationMetrics.compute`: ``"<family>/<class name>"``.
PER_CLASS_KEYS = ("iou", "f1", "precision", "recall")
#: The keys reported per condition group by :class:`GroupedSegmentationMetrics`.
GROUP_KEYS = ("pixel_acc", "miou", "macro_f1")


def per_class_scores(confusion: Tensor) -> dict[str, Tensor]:
    """IoU, precision, recall and F1 of every class from a confusion matrix.

    Args:
        confusion: ``(C, C)`` integer or float counts, rows = truth, columns = prediction.

    Returns:
        ``{"iou", "precision", "recall", "f1"}`` -> ``(C,)`` float64 tensors; NaN where the
        class is absent from both truth and prediction (see the module docstring).

    Example:
        >>> m = torch.tensor([[2, 1], [0, 3]])
        >>> per_class_scores(m)["iou"].tolist()  # road: 2 / (2 + 0 + 1); sky: 3 / (3 + 1 + 0)
        [0.6666666666666666, 0.75]
    """
    m = confusion.to(torch.float64)
    tp = m.diagonal()
    fn = m.sum(dim=1) - tp
    fp = m.sum(dim=0) - tp
    union = tp + fp + fn
    absent = union == 0

    def ratio(num: Tensor, den: Tensor) -> Tensor:
        # den == 0 only happens with num == 0: 0 when the class occurs somewhere (it was
        # missed or falsely predicted), NaN when it occurs nowhere (undefined).
        out = num / den.clamp(min=1)
        return torch.where(absent, torch.full_like(out, math.nan), out)

    return {
        "iou": ratio(tp, union),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def nanmean(values: Tensor) -> float:
    """Mean over the non-NaN entries; NaN when there are none (no warning, unlike numpy)."""
    valid = values[~values.isnan()]
    return float(valid.mean()) if valid.numel() else math.nan


def summarize_confusion(
    confusion: Tensor, class_names: Sequence[str], labelled: Sequence[int] | None = None
) -> dict[str, float]:
    """All metrics of :meth:`SegmentationMetrics.compute` from a ``(C, C)`` confusion matrix.

    Args:
        confusion: ``(C, C)`` counts, rows = truth, columns = prediction.
        class_names: ``C`` names, used in the per-class keys (``iou/road``).
        labelled: indices of the classes the evaluated dataset labels (a real dataset's
            mapping may lack some, e.g. CamVid has no ``terrain``); None: all. The macro
            means and the per-class keys cover these classes only: a class the data never
            labels would count 0 whenever a model predicts it. A prediction of such a
            class is still an error of the true class (its false negative). With a
            subset, ``miou_all`` is the mean over every class beside it.

    Returns:
        ``pixel_acc``, ``miou``, ``macro_f1``, ``macro_precision``, ``macro_recall`` and
        ``iou/<name>``, ``f1/<name>``, ``precision/<name>``, ``recall/<name>`` as Python
        floats (fractions in [0, 1], or NaN as the module docstring explains), plus
        ``miou_all`` when ``labelled`` is a proper subset.
    """
    if confusion.shape != (len(class_names), len(class_names)):
        raise ValueError(
            f"confusion: expected shape ({len(class_names)}, {len(class_names)}) to match "
            f"class_names, got {tuple(confusion.shape)}"
        )
    confusion = confusion.detach().cpu()
    all_scores = per_class_scores(confusion)
    keep = sorted(set(range(len(class_names))) if labelled is None else set(labelled))
    if not keep or keep[0] < 0 or keep[-1] >= len(class_names):
        raise ValueError(
            f"labelled: expected class indices in 0..{len(class_names) - 1}, got {labelled}"
        )
    scores = {k: v[keep] for k, v in all_scores.items()}
    total = float(confusion.sum())
    out = {
        "pixel_acc": float(confusion.diagonal().sum()) / total if total > 0 else math.nan,
        "miou": nanmean(scores["iou"]),
        "macro_f1": nanmean(scores["f1"]),
        "macro_precision": nanmean(scores["precision"]),
        "macro_recall": nanmean(scores["recall"]),
    }
    if len(keep) < len(class_names):
        out["miou_all"] = nanmean(all_scores["iou"])
    names = [class_names[i] for i in keep]
    for family in PER_CLASS_KEYS:
        for name, value in zip(names, scores[family].tolist(), strict=True):
            out[f"{family}/{name}"] = value
    return out


class SegmentationMetrics(nn.Module):
    """Pixel accuracy, IoU, precision, recall and F1 (per class and macro) of a segmenter.

    Accumulates one confusion matrix over any number of :meth:`update` calls (CPU or GPU;
    move it with ``.to(device)`` like any module); :meth:`compute` returns the metrics of
    the module docstring. Under DDP, :meth:`confusion` (and so :meth:`compute`) returns the
    matrix summed over all ranks, and every rank must call it (it is a collective).

    Args:
        num_classes: ``C``, the number of classes (labels ``0 .. C-1``).
        class_names: ``C`` names for the per-class keys (``iou/<name>``); must not contain "/"
            so the MLflow key stays unambiguous.
        ignore_index: target label excluded from every count (255 in this project).
        validate_args: check shapes and label ranges on every update (one host sync each);
            turn off in hot loops once the pipeline is known to be right.
        labelled: the classes the evaluated data labels (see :func:`summarize_confusion`);
            None: all.
        sync: sum the matrix over DDP ranks on :meth:`confusion` (a collective); False for
            figures one rank computes alone (the risk monitors run on rank zero only).

    Example:
        >>> m = SegmentationMetrics(2, ["road", "sky"])
        >>> m.update(torch.tensor([[[0, 1, 1]]]), torch.tensor([[[0, 1, 255]]]))
        >>> m.compute()["miou"]
        1.0
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        ignore_index: int = IGNORE_INDEX,
        validate_args: bool = True,
        labelled: Sequence[int] | None = None,
        sync: bool = True,
    ) -> None:
        super().__init__()
        class_names = tuple(str(n) for n in class_names)
        if num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes}")
        if len(class_names) != num_classes:
            raise ValueError(
                f"class_names: expected {num_classes} names (one per class), "
                f"got {len(class_names)}: {list(class_names)}"
            )
        if len(set(class_names)) != num_classes or any(not n or "/" in n for n in class_names):
            raise ValueError(
                f"class_names: expected distinct, non-empty names without '/', got "
                f"{list(class_names)}"
            )
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index: {ignore_index} is a class label (num_classes={num_classes})"
            )
        self.num_classes = num_classes
        self.class_names = class_names
        self.ignore_index = ignore_index
        self.validate_args = validate_args
        self.labelled = None if labelled is None else tuple(int(i) for i in labelled)
        # torchmetrics' own validation only counts unique values (an out-of-range label would
        # silently land in another cell); ours checks ranges, so its (torch.unique) is skipped.
        self.confmat = MulticlassConfusionMatrix(
            num_classes, ignore_index=ignore_index, validate_args=False, sync_on_compute=sync
        )

    def to_labels(self, preds: Tensor, target: Tensor) -> Tensor:
        """Check ``preds``/``target`` and return ``(B, H, W)`` int64 predicted labels.

        Args:
            preds: ``(B, C, H, W)`` float logits or probabilities (argmax over ``C``), or
                ``(B, H, W)`` integer labels in ``0 .. C-1``.
            target: ``(B, H, W)`` integer labels in ``0 .. C-1`` or ``ignore_index``.
        """
        if preds.is_floating_point():
            if preds.ndim != 4 or preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"preds: expected float logits (B, {self.num_classes}, H, W) or integer "
                    f"labels (B, H, W), got float {tuple(preds.shape)}"
                )
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape or preds.ndim != 3:
            raise ValueError(
                f"preds/target: expected labels (B, H, W) of one shape, got preds "
                f"{tuple(preds.shape)} and target {tuple(target.shape)}"
            )
        if target.is_floating_point():
            raise ValueError(f"target: expected an integer tensor, got {target.dtype}")
        if self.validate_args:
            labelled = target != self.ignore_index
            if bool(((target < 0) | (target >= self.num_classes))[labelled].any()):
                raise ValueError(
                    f"target: labels must lie in 0..{self.num_classes - 1} or be "
                    f"{self.ignore_index} (ignore), got values {_bad_values(target, self)}"
                )
            if bool(((preds < 0) | (preds >= self.num_classes)).any()):
                raise ValueError(
                    f"preds: labels must lie in 0..{self.num_classes - 1}, got values "
                    f"{_bad_values(preds, self, ignore=False)}"
                )
        return preds.long()

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``preds`` ``(B, C, H, W)`` float or ``(B, H, W)`` int, ``target``
        ``(B, H, W)`` int (``ignore_index`` pixels are skipped)."""
        self.confmat.update(self.to_labels(preds, target), target.long())

    def confusion(self) -> Tensor:
        """``(C, C)`` int64 counts, rows = truth, columns = prediction; synced under DDP.

        The first call after an update is a collective (every rank must make it); later
        calls return the cached synced matrix until the next :meth:`update` or :meth:`reset`,
        so e.g. rank 0 alone may fetch it again for a figure after :meth:`compute`.
        """
        with warnings.catch_warnings():
            # An empty matrix is a valid state (e.g. a group never seen on this rank): its
            # metrics are NaN, which says more than torchmetrics' "compute before update".
            warnings.filterwarnings("ignore", message=r".*was called before the ``update``")
            return self.confmat.compute()

    def compute(self) -> dict[str, float]:
        """The metrics of the module docstring, as ``{key: float}`` (NaN = undefined)."""
        return summarize_confusion(self.confusion(), self.class_names, self.labelled)

    def reset(self) -> None:
        """Forget everything accumulated (call between epochs / evaluation runs)."""
        self.confmat.reset()

    def forward(self, preds: Tensor, target: Tensor) -> None:
        """Same as :meth:`update` (so the module can be called like one)."""
        self.update(preds, target)


def _bad_values(t: Tensor, m: SegmentationMetrics, ignore: bool = True) -> list[int]:
    """A few offending labels of ``t`` for an error message."""
    bad = (t < 0) | (t >= m.num_classes)
    if ignore:
        bad &= t != m.ignore_index
    return torch.unique(t[bad])[:8].tolist()


class GroupedSegmentationMetrics(nn.Module):
    """:class:`SegmentationMetrics` overall and per condition group (``"night-rain"``, ...).

    Each sample of a batch is routed to its group's metrics and to the overall ones.
    :meth:`compute` reports every overall key (macro and per class) and, per group, only
    ``pixel_acc``, ``miou`` and ``macro_f1`` (as ``"<group>/<key>"``) to keep MLflow
    readable; a group without any labelled pixel is left out.

    DDP: computing is a collective, so every rank must hold the same groups in the same
    order. Pass the full list of ``groups`` at construction when training on several
    processes (an unknown group then raises instead of silently desynchronising the ranks).
    With ``groups=None`` groups are created lazily as they are seen, which is right for a
    single process only (a group seen on one rank but not another would hang the sync).

    Args:
        num_classes, class_names, ignore_index, validate_args, labelled: as for
            :class:`SegmentationMetrics`.
        groups: known condition groups (fixed, DDP-safe) or ``None`` (lazy, one process).

    Example:
        >>> m = GroupedSegmentationMetrics(2, ["road", "sky"], groups=["day-clear", "night-fog"])
        >>> m.update(torch.tensor([[[0]], [[1]]]), torch.tensor([[[0]], [[0]]]),
        ...          ["day-clear", "night-fog"])
        >>> r = m.compute(prefix="val/real/")
        >>> r["val/real/day-clear/miou"], r["val/real/night-fog/pixel_acc"]
        (1.0, 0.0)
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        ignore_index: int = IGNORE_INDEX,
        groups: Sequence[str] | None = None,
        validate_args: bool = True,
        labelled: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self._args = (num_classes, tuple(class_names), ignore_index, validate_args, labelled)
        self.overall = SegmentationMetrics(*self._args)
        self.fixed_groups = groups is not None
        self.groups = nn.ModuleDict()
        for group in groups or ():
            if group in self.groups:
                raise ValueError(f"groups: duplicate group '{group}' in {list(groups)}")
            self._add_group(group)

    def _add_group(self, group: str) -> SegmentationMetrics:
        if not isinstance(group, str) or not group or "." in group:
            # "." is refused by nn.ModuleDict; an empty name would make "/miou" keys.
            raise ValueError(f"groups: expected non-empty names without '.', got {group!r}")
        metrics = SegmentationMetrics(*self._args)
        self.groups[group] = metrics
        return metrics

    @property
    def group_names(self) -> list[str]:
        """The groups held, in creation order."""
        return list(self.groups.keys())

    def update(self, preds: Tensor, target: Tensor, groups: Sequence[str]) -> None:
        """Add a batch whose sample ``b`` belongs to condition group ``groups[b]``.

        Args:
            preds: ``(B, C, H, W)`` float logits or ``(B, H, W)`` integer labels.
            target: ``(B, H, W)`` integer labels, ``ignore_index`` = unlabelled.
            groups: ``B`` group names (e.g. the ``group`` field of a collated batch).
        """
        if isinstance(groups, str):
            raise ValueError("groups: expected one group name per sample, got a single string")
        groups = list(groups)
        if len(groups) != target.shape[0]:
            raise ValueError(
                f"groups: expected {target.shape[0]} names (one per sample), got {len(groups)}"
            )
        unique = list(dict.fromkeys(groups))  # first-seen order
        unknown = [g for g in unique if g not in self.groups]
        if unknown and self.fixed_groups:
            raise ValueError(
                f"groups: unknown group '{unknown[0]}', expected one of {self.group_names} "
                "(the groups passed at construction)"
            )
        # Argmax (and validate) once for the whole batch, not once per group; all checks
        # happen before any count so a bad batch is never half-counted.
        labels = self.overall.to_labels(preds, target)
        target = target.long()
        for group in unknown:
            self._add_group(group).to(target.device)
        self.overall.confmat.update(labels, target)
        for group in unique:
            idx = torch.tensor(
                [b for b, g in enumerate(groups) if g == group], device=target.device
            )
            self.groups[group].confmat.update(labels[idx], target[idx])

    def compute(self, prefix: str = "") -> dict[str, float]:
        """Overall metrics plus ``<group>/{pixel_acc, miou, macro_f1}``, keys prefixed.

        Args:
            prefix: prepended to every key verbatim, e.g. ``"val/real/"`` gives
                ``val/real/miou``, ``val/real/iou/road`` and ``val/real/night-rain/miou``.
        """
        out = {f"{prefix}{k}": v for k, v in self.overall.compute().items()}
        for group, metrics in self.groups.items():
            confusion = metrics.confusion()  # every rank computes every group: a collective
            if int(confusion.sum()) == 0:
                continue  # decided on the synced matrix, so all ranks skip the same groups
            summary = summarize_confusion(confusion, metrics.class_names, metrics.labelled)
            out.update({f"{prefix}{group}/{k}": summary[k] for k in GROUP_KEYS})
        return out

    def confusion(self) -> Tensor:
        """Overall ``(C, C)`` int64 confusion matrix (rows = truth), synced under DDP."""
        return self.overall.confusion()

    def reset(self) -> None:
        """Reset every metric; lazily created groups are dropped, fixed ones kept."""
        self.overall.reset()
        if self.fixed_groups:
            for metrics in self.groups.values():
                metrics.reset()
        else:
            self.groups = nn.ModuleDict()

    def forward(self, preds: Tensor, target: Tensor, groups: Sequence[str]) -> None:
        """Same as :meth:`update`."""
        self.update(preds, target, groups)


def sim_to_real_gap(
    sim: Mapping[str, float],
    real: Mapping[str, float],
    keys: Sequence[str] = ("miou", "pixel_acc", "macro_f1"),
    prefix: str = "gap/",
) -> dict[str, float]:
    """The sim-to-real gap: ``gap/<metric> = sim[metric] - real[metric]``.

    Positive means the model does better on simulated data than on real data (the usual
    case); 0 means no gap. Besides ``keys``, every per-class IoU ``iou/<name>`` present in
    both mappings gives ``gap/iou/<name>``. Keys missing from either side, or NaN on either
    side (e.g. a class absent from the real split), are skipped rather than reported as NaN.

    Args:
        sim, real: un-prefixed metrics of the same model on the sim and the real split, such
            as the output of :meth:`SegmentationMetrics.compute`.
        keys: summary metrics to compare (group keys like ``"night-rain/miou"`` work too).
        prefix: prepended to each compared key.

    Example:
        >>> sim_to_real_gap({"miou": 0.8, "iou/sky": 0.9}, {"miou": 0.5, "iou/sky": 0.7})
        {'gap/miou': 0.30000000000000004, 'gap/iou/sky': 0.20000000000000007}
    """
    per_class = [k for k in sim if k.startswith("iou/") and k in real]
    out: dict[str, float] = {}
    for key in dict.fromkeys([*keys, *per_class]):
        if key not in sim or key not in real:
            continue
        s, r = float(sim[key]), float(real[key])
        if math.isnan(s) or math.isnan(r):
            continue
        out[f"{prefix}{key}"] = s - r
    return out
