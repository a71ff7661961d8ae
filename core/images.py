"""Captions on image grids: every grid the project logs names its columns.

:func:`label_columns` puts a black band with one white caption per column above an
``(H, W, 3) uint8`` grid whose columns have equal width (``image | truth | prediction``,
``sim | translated | cycle | real``, ...). numpy and PIL only, so ``adaptation/`` and
``training/`` both use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Height in pixels of the caption band (PIL's default font is about 11 px high).
LABEL_BAND_PX = 16


def label_columns(grid: np.ndarray, labels: Sequence[str], band: int = LABEL_BAND_PX) -> np.ndarray:
    """``grid`` with a ``band``-high black strip on top naming each of its columns.

    Args:
        grid: ``(H, W, 3) uint8``; its width is split into ``len(labels)`` equal columns.
        labels: one caption per column, left to right (cut to fit its column).
        band: strip height in pixels.

    Returns:
        ``(band + H, W, 3) uint8``: a new array, ``grid`` is not changed.

    Example:
        >>> label_columns(np.zeros((4, 30, 3), np.uint8), ["a", "b", "c"]).shape
        (20, 30, 3)
    """
    from PIL import Image, ImageDraw, ImageFont

    grid = np.asarray(grid)
    if grid.ndim != 3 or grid.shape[2] != 3 or grid.dtype != np.uint8:
        raise ValueError(f"grid: expected (H, W, 3) uint8, got {grid.shape} {grid.dtype}")
    if not labels:
        raise ValueError("labels: expected one caption per column, got none")
    width = grid.shape[1]
    column = width // len(labels)
    if column < 1:
        raise ValueError(f"labels: {len(labels)} columns do not fit a grid {width} px wide")
    font = ImageFont.load_default()
    strip = Image.new("RGB", (width, band))
    draw = ImageDraw.Draw(strip)
    for i, text in enumerate(str(t) for t in labels):
        while text and draw.textlength(text, font=font) > column - 4:
            text = text[:-1]  # cut what does not fit its column
        draw.text((i * column + 2, max(0, (band - 11) // 2)), text, fill=(255, 255, 255), font=font)
        if i:  # a thin grey rule between captions
            draw.line([(i * column, 0), (i * column, band - 1)], fill=(96, 96, 96))
    return np.concatenate([np.asarray(strip, dtype=np.uint8), grid], axis=0)


__all__ = ["LABEL_BAND_PX", "label_columns"]
