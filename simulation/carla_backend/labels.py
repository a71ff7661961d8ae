"""CARLA camera images as numpy arrays: RGB pixels and taxonomy masks.

CARLA cameras deliver ``carla.Image`` objects whose ``raw_data`` holds ``height * width``
pixels of 4 bytes in **BGRA** order. A ``sensor.camera.semantic_segmentation`` image
carries the ``carla.CityObjectLabel`` id of each pixel in the *red* byte (index 2 of
BGRA); its other bytes are not labels. These functions are pure: they read only
``width``, ``height`` and ``raw_data``, so they are tested on hand-made byte buffers.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from simulation.taxonomy import Taxonomy

#: Byte order of a CARLA camera pixel.
BGRA_RED = 2


class CarlaImageLike(Protocol):
    """What these functions read from a ``carla.Image``."""

    width: int
    height: int
    raw_data: Any  # bytes-like, ``height * width * 4`` bytes


def bgra_view(image: CarlaImageLike) -> np.ndarray:
    """``(H, W, 4) uint8`` read-only view of the image's BGRA bytes (no copy).

    Raises:
        ValueError: when ``raw_data`` is not ``height * width * 4`` bytes long.
    """
    h, w = int(image.height), int(image.width)
    buf = np.frombuffer(image.raw_data, dtype=np.uint8)
    if h <= 0 or w <= 0 or buf.size != h * w * 4:
        raise ValueError(
            f"CARLA image: expected {h}x{w}x4 = {h * w * 4} BGRA bytes, got {buf.size}"
        )
    return buf.reshape(h, w, 4)


def image_to_rgb(image: CarlaImageLike) -> np.ndarray:
    """An RGB camera image as ``(H, W, 3) uint8`` RGB (a contiguous copy; alpha dropped)."""
    # BGR -> RGB by reversing the first three channels; copy so the array outlives the
    # sensor's buffer, which CARLA may reuse once the callback returns.
    return np.ascontiguousarray(bgra_view(image)[..., 2::-1])


def semantic_to_ids(image: CarlaImageLike) -> np.ndarray:
    """A semantic-segmentation image as ``(H, W) uint8`` ``CityObjectLabel`` ids (red byte)."""
    return bgra_view(image)[..., BGRA_RED].copy()


def semantic_to_mask(image: CarlaImageLike, taxonomy: Taxonomy) -> np.ndarray:
    """A semantic-segmentation image as ``(H, W) uint8`` taxonomy training indices.

    CARLA ids the taxonomy does not map become 255 (ignore).
    """
    return taxonomy.convert(semantic_to_ids(image), "carla")
