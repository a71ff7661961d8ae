"""Figures reviewers look at in MLflow: confusion matrix, prediction grid, bar chart.

Every function returns an ``(H, W, 3) uint8`` RGB numpy array, the form MLflow's
``log_image`` takes. matplotlib is imported lazily inside the functions and drawn on its
Agg canvas directly (no ``pyplot``), so no global backend or figure state is touched and the
functions are safe in headless workers. :func:`prediction_grid` needs only numpy and PIL.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from core.images import LABEL_BAND_PX, label_columns

IGNORE_INDEX = 255
#: Height in pixels of the title band above each row of :func:`prediction_grid`.
TITLE_BAND_PX = 16
#: The column captions of :func:`prediction_grid`.
PREDICTION_COLUMNS = ("image", "truth", "prediction")

__all__ = [
    "LABEL_BAND_PX",
    "PREDICTION_COLUMNS",
    "bar_chart_image",
    "confusion_matrix_image",
    "label_columns",
    "normalize_confusion",
    "prediction_grid",
]


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy view of a numpy array or (CPU/GPU, possibly grad-tracking) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _render(fig: Any) -> np.ndarray:
    """Draw a matplotlib ``Figure`` on an Agg canvas -> ``(H, W, 3) uint8``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def normalize_confusion(confusion: np.ndarray, normalize: str | None = "true") -> np.ndarray:
    """Normalize a ``(C, C)`` confusion matrix (rows = truth, columns = prediction).

    Args:
        confusion: ``(C, C)`` counts.
        normalize: ``"true"`` divides each row by its sum (row ``i`` = where the pixels of
            true class ``i`` went; the diagonal is the recall), ``"pred"`` each column
            (diagonal = precision), ``"all"`` the total; ``None`` keeps the counts.

    Returns:
        ``(C, C)`` float64; rows/columns with no pixel are 0, not NaN.
    """
    m = np.asarray(confusion, dtype=np.float64)
    if normalize is None:
        return m
    if normalize == "true":
        den = m.sum(axis=1, keepdims=True)
    elif normalize == "pred":
        den = m.sum(axis=0, keepdims=True)
    elif normalize == "all":
        den = np.full((1, 1), m.sum())
    else:
        raise ValueError(f"normalize: expected 'true', 'pred', 'all' or None, got {normalize!r}")
    return np.divide(m, den, out=np.zeros_like(m), where=den > 0)


def confusion_matrix_image(
    confusion: Any,
    class_names: Sequence[str],
    normalize: str | None = "true",
    title: str | None = None,
) -> np.ndarray:
    """Heatmap of a confusion matrix with class names on both axes and annotated cells.

    Args:
        confusion: ``(C, C)`` counts (numpy array or tensor), rows = truth, columns =
            prediction, e.g. :meth:`training.metrics.SegmentationMetrics.confusion`.
        class_names: ``C`` names for the axes.
        normalize: see :func:`normalize_confusion`; ``"true"`` (default) shows, per true
            class, the fraction of its pixels given each label.
        title: drawn above the matrix.

    Returns:
        ``(H, W, 3) uint8`` image, about 70 px per class plus margins (11 classes: about
        1,070 x 970 px, 8 pt digits).
    """
    from matplotlib.figure import Figure

    counts = _to_numpy(confusion)
    c = len(class_names)
    if counts.shape != (c, c):
        raise ValueError(
            f"confusion: expected shape ({c}, {c}) to match class_names, got {counts.shape}"
        )
    values = normalize_confusion(counts, normalize)
    vmax = 1.0 if normalize is not None else max(float(values.max()), 1.0)

    side = max(4.0, 0.7 * c + 2.0)  # inches at 100 dpi: room for rotated names and digits
    fig = Figure(figsize=(side + 1.0, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    mesh = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.02)
    ax.set_xticks(range(c), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(c), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)

    fontsize = 8 if c <= 12 else 6 if c <= 20 else 0  # beyond ~20 classes, digits only clutter
    if fontsize:
        for i in range(c):
            for j in range(c):
                v = values[i, j]
                text = f"{v:.2f}" if normalize is not None else f"{int(v)}"
                # White on dark cells, black on light ones, so every value stays legible.
                color = "white" if v > 0.6 * vmax else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=color)
    return _render(fig)


def prediction_grid(
    images: Any,
    targets: Any,
    preds: Any,
    palette: np.ndarray,
    max_rows: int = 8,
    titles: Sequence[str] | None = None,
    columns: Sequence[str] | None = PREDICTION_COLUMNS,
) -> np.ndarray:
    """Rows of ``[image | truth | prediction]``, labels coloured with ``palette``, under a
    band naming the columns.

    Args:
        images: ``(N, 3, H, W)`` float in [0, 1] (numpy array or tensor).
        targets: ``(N, H, W)`` integer labels, ``255`` = ignore (drawn black).
        preds: ``(N, H, W)`` integer predicted labels.
        palette: ``(256, 3) uint8`` colour of each label, e.g. ``Taxonomy.palette()``.
        max_rows: at most this many samples (the first ones) are drawn.
        titles: one caption per sample (e.g. its id and group), drawn in a
            :data:`TITLE_BAND_PX`-high black band above its row with PIL's default font.
        columns: the three column captions, drawn in a :data:`core.images.LABEL_BAND_PX`
            band on top (:func:`core.images.label_columns`); None: no band.

    Returns:
        ``(head + R * (H + band), 3 * W, 3) uint8`` with ``R = min(N, max_rows)``, ``band``
        = :data:`TITLE_BAND_PX` when ``titles`` are given, else 0, and ``head`` =
        :data:`core.images.LABEL_BAND_PX` with ``columns``, else 0.
    """
    imgs, tgts, prds = _to_numpy(images), _to_numpy(targets), _to_numpy(preds)
    palette = np.asarray(palette, dtype=np.uint8)
    if imgs.ndim != 4 or imgs.shape[1] != 3:
        raise ValueError(f"images: expected (N, 3, H, W), got {imgs.shape}")
    n, _, h, w = imgs.shape
    for name, arr in (("targets", tgts), ("preds", prds)):
        if arr.shape != (n, h, w):
            raise ValueError(f"{name}: expected {(n, h, w)} to match images, got {arr.shape}")
    if palette.shape != (256, 3):
        raise ValueError(f"palette: expected (256, 3) uint8, got {palette.shape}")
    if max_rows < 1:
        raise ValueError(f"max_rows: expected a positive integer, got {max_rows}")
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles: expected {n} captions (one per sample), got {len(titles)}")

    rows = min(n, max_rows)
    band = TITLE_BAND_PX if titles is not None else 0

    def colorize(mask: np.ndarray) -> np.ndarray:
        # Out-of-range labels are clipped into the table rather than crashing a figure.
        rgb = palette[np.clip(mask, 0, 255).astype(np.uint8)]
        rgb[mask == IGNORE_INDEX] = 0  # black whatever the palette says for 255
        return rgb

    grid = np.zeros((rows * (h + band), 3 * w, 3), dtype=np.uint8)
    for r in range(rows):
        top = r * (h + band) + band
        image = np.clip(imgs[r].transpose(1, 2, 0), 0.0, 1.0)
        grid[top : top + h, :w] = np.round(image * 255.0).astype(np.uint8)
        grid[top : top + h, w : 2 * w] = colorize(tgts[r])
        grid[top : top + h, 2 * w :] = colorize(prds[r])
    if titles is not None:
        _draw_titles(grid, [str(t) for t in titles[:rows]], h, band)
    if columns is not None:
        if len(columns) != 3:
            raise ValueError(f"columns: expected 3 captions, got {len(columns)}")
        grid = label_columns(grid, columns)
    return grid


def _draw_titles(grid: np.ndarray, titles: Sequence[str], h: int, band: int) -> None:
    """Write ``titles[r]`` in white into the band above row ``r`` of ``grid`` (in place)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    for r, text in enumerate(titles):
        strip = Image.new("RGB", (grid.shape[1], band))
        ImageDraw.Draw(strip).text((2, 1), text, fill=(255, 255, 255), font=font)
        top = r * (h + band)
        grid[top : top + band] = np.asarray(strip)


def bar_chart_image(
    values: Mapping[str, float],
    title: str,
    xlabel: str | None = None,
) -> np.ndarray:
    """Horizontal bar chart of named values (e.g. mIoU per condition group), annotated.

    Bars keep the mapping's order (top to bottom). NaN values get no bar and the label
    "n/a". When every value lies in [0, 1] (fractions such as IoU) the axis spans [0, 1], so
    charts of different runs compare at a glance; otherwise it fits the data (gaps can be
    negative).

    Args:
        values: ``{name: value}``.
        title: drawn above the chart.
        xlabel: optional axis label (e.g. ``"mIoU"``).

    Returns:
        ``(H, W, 3) uint8`` image; ``H`` grows with the number of bars.
    """
    from matplotlib.figure import Figure

    names = [str(k) for k in values]
    vals = np.array([float(v) for v in values.values()], dtype=np.float64)
    finite = vals[np.isfinite(vals)]

    fig = Figure(figsize=(7.0, max(2.5, 0.35 * len(names) + 1.5)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    if not names:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _render(fig)

    y = np.arange(len(names))
    ax.barh(y, np.nan_to_num(vals, nan=0.0), color="tab:blue")
    ax.set_yticks(y, labels=names)
    ax.invert_yaxis()  # first key on top, as it reads
    if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        lo, hi = 0.0, 1.0
    else:
        lo = min(0.0, float(finite.min())) if finite.size else 0.0
        hi = max(0.0, float(finite.max())) if finite.size else 1.0
    pad = 0.12 * (hi - lo or 1.0)  # room for the value labels
    ax.set_xlim(lo - (pad if lo < 0 else 0.0), hi + pad)
    ax.axvline(0.0, color="black", linewidth=0.8)
    for yi, v in zip(y, vals, strict=True):
        label = "n/a" if math.isnan(v) else f"{v:.3f}"
        x = 0.0 if math.isnan(v) else v
        ax.text(x, yi, f" {label} ", va="center", ha="left" if x >= 0 else "right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _render(fig)
