"""Fairness of a segmenter across driving conditions (risk register T-08, model bias).

Here the "demographic" groups of the fairness literature are the **driving conditions**:
time of day x weather (``day-clear``, ``dusk-rain``, ``night-fog``, ...; the ``group`` field
of every Sample). A perception model that finds pedestrians by day but misses them at
night is biased against night driving, and the people on the road at night pay for it, so
the vulnerable classes (``person``, ``vehicle``) are the ones checked by default.

Input is one confusion matrix ``M_g`` of shape ``(C, C)`` per group ``g`` (rows = truth,
columns = prediction, labelled pixel counts; as accumulated by
:class:`training.metrics.GroupedSegmentationMetrics`). For class ``c``:

- **demographic parity** compares how often the model *predicts* ``c``:
  ``P_g(pred = c) = sum_i M_g[i, c] / sum M_g`` (over the labelled pixels of group ``g``);
  ``DPD_c = max_g P_g(pred = c) - min_g P_g(pred = c)``, over groups with labelled pixels.
  Scenes differ between conditions, so some DPD is legitimate; it is a screening signal,
  read together with EOD.
- **equal opportunity** compares the *recall* (true-positive rate):
  ``recall_g,c = TP / (TP + FN) = M_g[c, c] / sum_j M_g[c, j]``;
  ``EOD_c = max_g recall_g,c - min_g recall_g,c``, over the groups with at least
  ``min_pixels`` truth pixels of ``c`` (a group without any has no recall to compare).

Both are in [0, 1], 0 = parity, and NaN when fewer than two groups qualify (a difference
needs two sides).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def _matrix(confusion: Any, num_classes: int, group: str) -> np.ndarray:
    if isinstance(confusion, torch.Tensor):
        confusion = confusion.detach().cpu().numpy()
    m = np.asarray(confusion, dtype=np.float64)
    if m.shape != (num_classes, num_classes):
        raise ValueError(
            f"confusions[{group!r}]: expected shape ({num_classes}, {num_classes}) to match "
            f"class_names, got {m.shape}"
        )
    if not np.isfinite(m).all() or (m < 0).any():
        raise ValueError(f"confusions[{group!r}]: expected finite non-negative pixel counts")
    return m


def _spread(values: Mapping[str, float]) -> tuple[float, str | None, str | None]:
    """``(max - min, argmin group, argmax group)``; NaN and None with fewer than 2 values."""
    if len(values) < 2:
        return math.nan, None, None
    worst = min(values, key=values.__getitem__)
    best = max(values, key=values.__getitem__)
    return values[best] - values[worst], worst, best


def prediction_rates(
    confusions: Mapping[str, Any], class_names: Sequence[str], cls: str
) -> dict[str, float]:
    """``{group: P_g(pred = cls)}`` over the groups with labelled pixels."""
    c = _class_index(class_names, cls)
    out = {}
    for group, conf in confusions.items():
        m = _matrix(conf, len(class_names), group)
        total = m.sum()
        if total > 0:
            out[group] = float(m[:, c].sum() / total)
    return out


def recalls(
    confusions: Mapping[str, Any], class_names: Sequence[str], cls: str, min_pixels: int = 1
) -> dict[str, float]:
    """``{group: recall of cls}`` over the groups with ``>= min_pixels`` truth pixels of it."""
    c = _class_index(class_names, cls)
    out = {}
    for group, conf in confusions.items():
        m = _matrix(conf, len(class_names), group)
        support = m[c].sum()
        if support >= max(min_pixels, 1):
            out[group] = float(m[c, c] / support)
    return out


def demographic_parity_difference(
    confusions: Mapping[str, Any], class_names: Sequence[str], cls: str
) -> float:
    """``DPD = max_g P_g(pred = cls) - min_g P_g(pred = cls)`` (module docstring); NaN with
    fewer than two groups holding labelled pixels."""
    return _spread(prediction_rates(confusions, class_names, cls))[0]


def equal_opportunity_difference(
    confusions: Mapping[str, Any], class_names: Sequence[str], cls: str, min_pixels: int = 1
) -> float:
    """``EOD = max_g recall_g - min_g recall_g`` over groups with ``>= min_pixels`` truth
    pixels of ``cls``; NaN with fewer than two such groups."""
    return _spread(recalls(confusions, class_names, cls, min_pixels))[0]


def _class_index(class_names: Sequence[str], cls: str) -> int:
    names = list(class_names)
    if cls not in names:
        raise ValueError(f"classes: unknown class {cls!r}, expected one of {names}")
    return names.index(cls)


class FairnessReport(dict):
    """Result of :func:`fairness_report`: ``{class: {...}}`` plus :meth:`metrics`.

    Per class: ``dpd``, ``eod``, ``recall`` (``{group: recall}``), ``pred_rate``
    (``{group: P(pred = class)}``), ``worst_group`` / ``best_group`` (lowest / highest
    recall; None when EOD is NaN) and ``groups_compared`` (the number of groups in EOD).
    """

    def metrics(self, prefix: str = "risk/T-08/") -> dict[str, float]:
        """Flat MLflow-ready floats: ``<prefix>dpd/<class>``, ``<prefix>eod/<class>``, and
        ``<prefix>eod_max`` (the largest EOD over the classes that have one, NaN if none)."""
        out: dict[str, float] = {}
        for cls, r in self.items():
            out[f"{prefix}dpd/{cls}"] = float(r["dpd"])
            out[f"{prefix}eod/{cls}"] = float(r["eod"])
        eods = [r["eod"] for r in self.values() if not math.isnan(r["eod"])]
        out[f"{prefix}eod_max"] = max(eods) if eods else math.nan
        return out


def fairness_report(
    confusions: Mapping[str, Any],
    class_names: Sequence[str],
    classes: Sequence[str] = ("person", "vehicle"),
    min_pixels: int = 1,
) -> FairnessReport:
    """DPD and EOD across condition groups for each of ``classes``.

    Args:
        confusions: ``{group: (C, C) pixel counts}``, rows = truth, columns = prediction
            (numpy or torch).
        class_names: the ``C`` class names, in matrix order.
        classes: the classes to report (default the vulnerable road users and vehicles).
        min_pixels: truth pixels of a class a group needs to enter its EOD (raise it to
            ignore groups where a handful of pixels would make the recall noise).

    Returns:
        :class:`FairnessReport`.

    Example:
        >>> conf = {"day-clear": [[8, 2], [1, 9]], "night-clear": [[9, 1], [5, 5]]}
        >>> r = fairness_report(conf, ["road", "person"], classes=["person"])
        >>> round(r["person"]["eod"], 3), r["person"]["worst_group"]
        (0.4, 'night-clear')
    """
    if isinstance(classes, str):
        classes = [classes]
    report = FairnessReport()
    for cls in classes:
        rec = recalls(confusions, class_names, cls, min_pixels)
        rates = prediction_rates(confusions, class_names, cls)
        eod, worst, best = _spread(rec)
        report[cls] = {
            "dpd": _spread(rates)[0],
            "eod": eod,
            "recall": rec,
            "pred_rate": rates,
            "worst_group": worst,
            "best_group": best,
            "groups_compared": len(rec),
        }
    return report
