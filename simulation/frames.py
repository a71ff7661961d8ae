"""What a backend hands to the dataset writer: a batch of frames with labels and provenance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass
class FrameBatch:
    """``N`` rendered frames.

    Attributes:
        images: ``(N, H, W, 3) uint8`` RGB.
        masks: ``(N, H, W) uint8`` training indices of the taxonomy, 255 = ignore.
        records: ``N`` JSON-ready provenance dicts, one per frame; each holds at least
            ``index``, ``seed``, ``backend``, ``backend_version``, ``map``, ``group`` and
            ``params`` (:meth:`SceneParams.to_dict`).
    """

    images: np.ndarray
    masks: np.ndarray
    records: list[dict[str, Any]]

    def __post_init__(self) -> None:
        n = len(self.records)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(
                f"images: expected (N, H, W, 3) uint8, got {self.images.shape} {self.images.dtype}"
            )
        if self.masks.dtype != np.uint8 or self.masks.shape != self.images.shape[:3]:
            raise ValueError(
                f"masks: expected (N, H, W) uint8 matching images, got {self.masks.shape}"
            )
        if self.images.shape[0] != n:
            raise ValueError(f"records: expected {self.images.shape[0]} records, got {n}")

    def __len__(self) -> int:
        return len(self.records)


class Backend(Protocol):
    """A source of labelled frames. Frame ``i`` of a seed must not depend on which other
    frames are rendered with it, so shards can be made in any order or in parallel."""

    name: str
    version: str

    def render(self, indices: Sequence[int]) -> FrameBatch:
        """Render the frames with these dataset indices (one shard or one episode)."""
        ...

    def prepare(self) -> None:
        """Connect or warm up before any shard is written; raise a clear error if the
        backend cannot work (for CARLA: an unreachable server, naming host:port)."""
        ...

    def close(self) -> None:
        """Release what the backend holds (connections, actors); safe to call twice."""
        ...
