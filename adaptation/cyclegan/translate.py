"""Translating a sim dataset with a trained generator, guarded against label corruption.

A CycleGAN generator may learn to paint sky as trees: the images look real and the labels,
copied from the sim frames, are wrong. :func:`label_corruption` measures this with a frozen
segmenter trained on sim: the share of pixels whose predicted class changes between the
source frame and its translation, per class of the source prediction. :class:`GuardLimits`
turns the figures into a go/no-go, and :func:`translate_dataset` writes the translated
frames as a new dataset (same labels, same provenance plus the translation's) that
training reads like any generated one -- or refuses with :class:`SemanticGuardError`
before a single shard is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from simulation.dataset import DatasetWriter, GeneratedDataset, shard_ranges
from simulation.frames import FrameBatch

__all__ = [
    "CorruptionStats",
    "GuardLimits",
    "SemanticGuardError",
    "label_corruption",
    "translate_dataset",
]

#: ``images (B, 3, H, W) float in [0, 1] -> (B, 3, H, W) float in [0, 1]``.
Translator = Callable[[torch.Tensor], torch.Tensor]


class SemanticGuardError(ValueError):
    """The generator changes what the sim segmenter sees too often to keep the labels."""


@dataclass
class CorruptionStats:
    """Pixel counts behind the label-corruption rate.

    Attributes:
        changed: ``(K,)`` pixels of each class (by the prediction on the *source* image)
            whose predicted class differs on the translated image.
        total: ``(K,)`` pixels of each class in the source predictions.
        frames: images compared.
    """

    changed: np.ndarray
    total: np.ndarray
    frames: int = 0

    @classmethod
    def zeros(cls, num_classes: int) -> CorruptionStats:
        return cls(np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64))

    def add(self, other: CorruptionStats) -> None:
        self.changed += other.changed
        self.total += other.total
        self.frames += other.frames

    @property
    def overall(self) -> float:
        """Share of all pixels whose predicted class changed, in [0, 1] (NaN: no pixels)."""
        total = int(self.total.sum())
        return float(self.changed.sum() / total) if total else math.nan

    def per_class(self) -> np.ndarray:
        """``(K,)`` share of each class's pixels that changed; NaN for absent classes."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.total > 0, self.changed / np.maximum(self.total, 1), np.nan)

    def metrics(self, class_names: Sequence[str], prefix: str = "guard/") -> dict[str, float]:
        """``{prefix}corruption`` and ``{prefix}corruption/<class>`` (classes present)."""
        out = {f"{prefix}corruption": self.overall, f"{prefix}frames": float(self.frames)}
        for name, rate in zip(class_names, self.per_class(), strict=True):
            if np.isfinite(rate):
                out[f"{prefix}corruption/{name}"] = float(rate)
        return out


@dataclass(frozen=True)
class GuardLimits:
    """When a translation corrupts too many labels to train on.

    Args:
        max_corruption: the largest acceptable overall label-corruption rate, in [0, 1].
        max_class_corruption: the largest acceptable rate of any one class, in [0, 1],
            whatever its share of the pixels: a translation that repaints every person
            corrupts the labels that matter most even though persons hold 1 % of pixels.
        min_class_pixels: pixels of a class (in the guard's frames) from which its rate is
            checked: below it the rate is too noisy to judge (a count, not a share, so a
            rare class is checked as soon as it has been seen enough).
    """

    max_corruption: float = 0.5
    max_class_corruption: float = 0.6
    min_class_pixels: int = 200

    def __post_init__(self) -> None:
        for name in ("max_corruption", "max_class_corruption"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"guard.{name}: expected a share in [0, 1], got {value!r}")
        if isinstance(self.min_class_pixels, bool) or not (
            isinstance(self.min_class_pixels, int) and self.min_class_pixels >= 0
        ):
            raise ValueError(
                f"guard.min_class_pixels: expected an integer >= 0, got {self.min_class_pixels!r}"
            )

    def violations(self, stats: CorruptionStats, class_names: Sequence[str]) -> list[str]:
        """Human-readable reasons to refuse the translation (empty: it passes)."""
        reasons = []
        if not stats.total.sum():
            return ["the segmenter saw no pixels"]
        if stats.overall > self.max_corruption:
            reasons.append(
                f"{100 * stats.overall:.1f}% of all pixels change class "
                f"(guard.max_corruption is {100 * self.max_corruption:.1f}%)"
            )
        share = stats.total / stats.total.sum()
        rows = zip(class_names, stats.per_class(), share, stats.total, strict=True)
        for name, rate, s, pixels in rows:
            if pixels >= max(self.min_class_pixels, 1) and rate > self.max_class_corruption:
                reasons.append(
                    f"class '{name}' ({100 * s:.2f}% of pixels, {int(pixels)} pixels): "
                    f"{100 * rate:.1f}% change class "
                    f"(guard.max_class_corruption is {100 * self.max_class_corruption:.1f}%)"
                )
        return reasons

    def check(self, stats: CorruptionStats, class_names: Sequence[str], what: str) -> None:
        """Raise :class:`SemanticGuardError` naming every violation, else return."""
        reasons = self.violations(stats, class_names)
        if reasons:
            raise SemanticGuardError(
                f"semantic guard: {what} corrupts the labels it would keep: "
                + "; ".join(reasons)
                + f" (measured on {stats.frames} frames with the frozen sim segmenter)"
            )


@torch.no_grad()
def label_corruption(
    segmenter: nn.Module, source01: torch.Tensor, translated01: torch.Tensor, num_classes: int
) -> CorruptionStats:
    """Compare a frozen segmenter's predictions on source and translated images.

    Args:
        segmenter: ``(B, 3, H, W)`` in [0, 1] -> logits ``(B, K, H, W)``; used as is (put
            it in eval mode first).
        source01, translated01: ``(B, 3, H, W)`` float in [0, 1], pixel-aligned.
        num_classes: ``K``.
    """
    before = segmenter(source01).argmax(dim=1).flatten()
    after = segmenter(translated01).argmax(dim=1).flatten()
    total = torch.bincount(before, minlength=num_classes)
    changed = torch.bincount(before[before != after], minlength=num_classes)
    as_np = [t.cpu().numpy().astype(np.int64) for t in (changed, total)]
    return CorruptionStats(as_np[0], as_np[1], int(source01.shape[0]))


def measure_corruption(
    translate: Translator,
    segmenter: nn.Module,
    dataset: GeneratedDataset,
    indices: Sequence[int],
    num_classes: int,
    batch_size: int = 16,
) -> CorruptionStats:
    """Label-corruption figures of ``translate`` over ``dataset[indices]``."""
    stats = CorruptionStats.zeros(num_classes)
    for start in range(0, len(indices), batch_size):
        images, _ = dataset.get_batch(indices[start : start + batch_size])
        source = _to_tensor(images)
        stats.add(label_corruption(segmenter, source, translate(source), num_classes))
    return stats


@dataclass
class TranslationResult:
    """A translated dataset and the guard's figures over all of its frames."""

    dataset: GeneratedDataset
    corruption: CorruptionStats | None = None
    written_frames: int = 0


def translate_dataset(
    translate: Translator,
    source: GeneratedDataset,
    root: str | Path,
    provenance: Mapping[str, Any],
    batch_size: int = 16,
    segmenter: nn.Module | None = None,
    card_extra: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TranslationResult:
    """Write ``translate(source)`` as a new dataset at ``root``, shard by shard.

    The new dataset keeps the source's shard layout, masks, taxonomy hash and every
    provenance record; each record gains ``translation`` (``provenance`` plus the source
    dataset and index) and the card gains ``translation`` (``provenance`` plus the source
    card's fingerprint), so a model trained on it names the generator run that made its
    images. The writer is atomic and resumable: a rerun after a kill writes only the missing
    shards; a folder holding another translation (other ``provenance``) is refused.

    Args:
        translate: the generator, ``(B, 3, H, W)`` in [0, 1] -> same shape in [0, 1].
        source: the sim dataset.
        root: the new dataset's folder.
        provenance: JSON-ready; identifies the generator (its MLflow run id, checkpoint
            digest, architecture, image size). Part of the dataset's fingerprint.
        batch_size: images per generator call.
        card_extra: more JSON-ready keys for the card (e.g. the guard's figures).
        segmenter: when given, label-corruption figures of every written frame are
            returned (frames of shards written by an earlier, killed run are not counted).
        progress: called with ``(shards done, shards total)``.
    """
    num_classes = len(source.class_names)
    fingerprint = {
        "taxonomy_hash": source.card.get("taxonomy_hash"),
        "image_size": list(source.image_size),
        "source": {
            "root": str(Path(source.root).resolve()),
            "fingerprint": source.card.get("fingerprint"),
            "shards": [s["files"] for s in source.card["shards"]],
        },
        "translation": dict(provenance),
    }
    extra = {
        "name": f"{source.name}-translated",
        "domain": int(source.card.get("domain") or 0),
        "translation": {
            **dict(provenance),
            "source": source.name,
            "source_root": str(Path(source.root).resolve()),
        },
        **dict(card_extra or {}),
    }
    writer = DatasetWriter(
        root, source.num_frames, source.shard_size, fingerprint, card_extra=extra
    )
    todo = writer.open()
    stats = CorruptionStats.zeros(num_classes) if segmenter is not None else None
    ranges = shard_ranges(source.num_frames, source.shard_size)
    records = source.records
    for done, shard_id in enumerate(todo):
        rng = ranges[shard_id]
        images, masks = source.get_batch(rng)
        out = np.empty_like(images)
        for start in range(0, len(rng), batch_size):
            src = _to_tensor(images[start : start + batch_size])
            fake = translate(src)
            if fake.shape != src.shape:
                raise ValueError(
                    f"translate: the generator returned {tuple(fake.shape)} for images "
                    f"{tuple(src.shape)}"
                )
            if stats is not None:
                stats.add(label_corruption(segmenter, src, fake, num_classes))
            out[start : start + len(src)] = _to_uint8(fake)
        shard_records = []
        for i in rng:
            rec = {k: v for k, v in records[i].items() if k not in ("shard", "offset")}
            rec["translation"] = {**dict(provenance), "source": source.name, "source_index": i}
            shard_records.append(rec)
        writer.write_shard(shard_id, FrameBatch(out, np.ascontiguousarray(masks), shard_records))
        if progress is not None:
            progress(done + 1, len(todo))
    if todo or not (Path(root) / "card.json").exists():
        writer.finalize(num_classes, source.class_names)
    dataset = GeneratedDataset(root, expected_taxonomy_hash=source.card.get("taxonomy_hash"))
    return TranslationResult(dataset, stats, sum(len(ranges[k]) for k in todo))


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """``(B, H, W, 3) uint8`` -> ``(B, 3, H, W) float32`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def _to_uint8(images01: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, H, W, 3) uint8``."""
    out = images01.detach().float().clamp(0, 1).mul(255.0).round().to(torch.uint8)
    return out.permute(0, 2, 3, 1).cpu().numpy()
