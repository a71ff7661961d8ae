"""The project's label taxonomy and its mappings from other label sets.

One ordered list of classes (Cityscapes-aligned), a colour palette, and mappings
from CARLA ``CityObjectLabel`` ids, Cityscapes label ids and CamVid's 11 classes.
Mappings become 256-entry lookup tables, so converting a label image is a single
indexing operation. The taxonomy's hash is stored in every dataset card so that a
changed mapping is detected instead of silently mixed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = 255

#: Label sets a taxonomy can map from; each one is a ``{source id: class name}`` mapping.
SOURCES = ("carla", "cityscapes", "camvid")


class TaxonomyError(ValueError):
    """A taxonomy definition that cannot be used (unknown class, bad colour, bad id)."""


@dataclass(frozen=True)
class Taxonomy:
    """Ordered classes with colours and mappings from other label sets.

    Args:
        classes: class names in training-index order (index ``i`` is ``classes[i]``).
        colors: one ``(r, g, b)`` triple in ``0..255`` per class.
        mappings: ``{source: {source_id: class_name or None}}`` for the sources in
            :data:`SOURCES`; ``None`` (or an absent id) maps to :data:`IGNORE_INDEX`.

    Example:
        >>> tax = Taxonomy(["road", "sky"], [(128, 64, 128), (70, 130, 180)],
        ...                {"carla": {1: "road", 11: "sky"}})
        >>> tax.convert(np.array([[1, 11, 3]]), "carla").tolist()
        [[0, 1, 255]]
    """

    classes: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    mappings: Mapping[str, Mapping[int, str | None]] = field(default_factory=dict)

    def __init__(
        self,
        classes: Sequence[str],
        colors: Sequence[Sequence[int]],
        mappings: Mapping[str, Mapping[int, str | None]] | None = None,
    ) -> None:
        classes = tuple(str(c) for c in classes)
        if not classes:
            raise TaxonomyError("taxonomy.classes: expected at least one class")
        if len(set(classes)) != len(classes):
            raise TaxonomyError(f"taxonomy.classes: duplicate names in {list(classes)}")
        if len(classes) >= IGNORE_INDEX:
            raise TaxonomyError(f"taxonomy.classes: at most {IGNORE_INDEX - 1} classes")
        if len(colors) != len(classes):
            raise TaxonomyError(
                f"taxonomy.colors: expected {len(classes)} colours (one per class), "
                f"got {len(colors)}"
            )
        cols = []
        for name, col in zip(classes, colors, strict=True):
            col = tuple(int(v) for v in col)
            if len(col) != 3 or not all(0 <= v <= 255 for v in col):
                raise TaxonomyError(
                    f"taxonomy.colors[{name}]: expected an (r, g, b) triple in 0..255, got {col}"
                )
            cols.append(col)
        maps: dict[str, dict[int, str | None]] = {}
        for source, table in (mappings or {}).items():
            if source not in SOURCES:
                raise TaxonomyError(
                    f"taxonomy.mappings.{source}: unknown source, expected one of {SOURCES}"
                )
            clean: dict[int, str | None] = {}
            for key, name in table.items():
                sid = int(key)
                if not 0 <= sid <= 255:
                    raise TaxonomyError(
                        f"taxonomy.mappings.{source}.{key}: source id must be in 0..255"
                    )
                if name is not None and name not in classes:
                    raise TaxonomyError(
                        f"taxonomy.mappings.{source}.{key}: unknown class '{name}', "
                        f"expected one of {list(classes)} or null"
                    )
                clean[sid] = name
            maps[source] = dict(sorted(clean.items()))
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "colors", tuple(cols))
        object.__setattr__(self, "mappings", maps)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, name: str) -> int:
        """Training index of class ``name``."""
        try:
            return self.classes.index(name)
        except ValueError:
            raise TaxonomyError(
                f"unknown class '{name}', expected one of {list(self.classes)}"
            ) from None

    def palette(self) -> np.ndarray:
        """``(256, 3) uint8`` colour lookup table; ignore and unused ids are black."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = np.asarray(self.colors, dtype=np.uint8)
        return lut

    def colorize(self, mask: np.ndarray) -> np.ndarray:
        """``(..., H, W)`` integer mask -> ``(..., H, W, 3) uint8`` colour image."""
        return self.palette()[np.asarray(mask, dtype=np.uint8)]

    def lut(self, source: str) -> np.ndarray:
        """``(256,) uint8`` table from ``source`` ids to training indices (255 = ignore)."""
        if source not in self.mappings:
            raise TaxonomyError(
                f"taxonomy.mappings.{source}: no mapping defined (defined: {sorted(self.mappings)})"
            )
        table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        for sid, name in self.mappings[source].items():
            if name is not None:
                table[sid] = self.classes.index(name)
        return table

    def convert(self, labels: np.ndarray, source: str) -> np.ndarray:
        """Map a label image of ``source`` ids (any int dtype, values 0..255) to indices."""
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise TaxonomyError(f"{source} label ids must lie in 0..255")
        return self.lut(source)[labels.astype(np.uint8, copy=False)]

    def to_dict(self) -> dict:
        """Plain, JSON-ready form (the input of :meth:`hash`)."""
        return {
            "classes": list(self.classes),
            "colors": [list(c) for c in self.colors],
            "mappings": {
                src: {str(k): v for k, v in sorted(table.items())}
                for src, table in sorted(self.mappings.items())
            },
        }

    @property
    def hash(self) -> str:
        """16 hex digits of SHA-256 over the canonical JSON of classes, colours, mappings."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
