"""Sensor-noise screening before training (risk register T-10: filtering, outlier removal).

A camera stream contains frames that teach a segmenter nothing or teach it wrong: a lens cap
or a dropped frame (black, uniform), a sensor saturated by the sun or a flash (white), a
frame drowned in read/shot noise, and frames corrupted in transit (NaN, values out of
range, wrong size). :class:`FrameScreen` flags each frame with the reasons it fails;
:class:`ScreenedDataset` drops the flagged frames from a dataset once, before training.

Per frame, with ``Y = 0.2126 R + 0.7152 G + 0.0722 B`` the luminance (Rec. 709 weights on
the display-referred values in [0, 1]):

- ``corrupt``: NaN/inf, values outside ``[0, 1]`` (beyond ``range_tolerance``), or a shape
  that is not ``(3, H, W)`` (float) / ``(H, W, 3)`` (uint8) with ``H, W >= 3`` (or not
  ``expected_size``). A corrupt frame gets no other check.
- ``blank``: ``std(Y) < blank_std``: no structure at all (lens cap, test pattern fill).
- ``overexposed``: ``mean(Y > 0.98) > overexposed_share``: the sensor is saturated.
- ``underexposed``: ``mean(Y < 0.02) > underexposed_share``: the frame is (almost) black.
- ``noisy``: ``sigma_n > noisy_sigma``, where ``sigma_n`` is the per-channel noise estimate
  of :func:`noise_sigma` (a robust Immerkaer estimate), averaged over ``R, G, B``.

Why these defaults keep night and fog frames: a night frame is dark but still has lit
structure (lamps, lane marks, headlights), so its luminance std stays well above
``blank_std`` and far fewer than 80 % of its pixels are below 0.02 (about 5/255, darker than
any sky or road the renderer draws at night). A fog frame is low-contrast (the haze
compresses luminance toward the airlight) but not uniform. ``blank_std = 0.004`` is about
one 8-bit grey level (1/255 = 0.0039): a frame whose luminance varies by less than one level
holds no scene. Sensor noise in the procedural data reaches ``noise_std = 0.03`` per
channel; ``noisy_sigma = 0.08`` lies well above it and below the sigma of frames whose
content is drowned (at sigma 0.1 the noise spans about +-25 grey levels).

Labels the image no longer shows (a note, never a drop): a camera's blur, fog or
compression can wash thin objects (poles, signs, people) out of the image while their labels
stay, so the segmenter is taught to find what is not there. :func:`invisible_labels` flags,
per frame and thin class (:data:`THIN_CLASSES`), a labelled region whose mean luminance
differs from the 2-pixel ring around it by less than :data:`INVISIBLE_CONTRAST` (about five
8-bit grey levels). :class:`ScreenedDataset` counts those frames beside the drop reasons:
``risk/T-10/<role>/label_not_visible`` (frames with any such class), ``..._share`` and
``.../label_not_visible/<class>``, logged with the stage's other T-10 figures, with one log
line per training set when any frame is flagged. One pass over the frames already read for
screening: cheap.

Calibration (900 procedural frames, 64x128 and 128x256, ``sim`` and ``photo`` styles, full
randomization, every condition group; all kept): luminance std >= 0.048 (night-rain is the
lowest, fog frames >= 0.083), dark share <= 0.081 (night), bright share <= 0.21, noise
estimate <= 0.025. So each default has a margin of 3x or more on the valid side, while the
synthetic blank, saturated, black and noise-dominated frames of ``tests/test_screening.py``
are dropped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

#: Rec. 709 luma weights for R, G, B.
LUMA_WEIGHTS = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
#: The reasons a frame can be dropped, in report order.
REASONS = ("corrupt", "blank", "overexposed", "underexposed", "noisy")
#: Classes (taxonomy names) of the thin objects that blur away first.
THIN_CLASSES = ("pole", "traffic_sign", "person")
#: A labelled region whose mean luminance is this close to its surroundings is not shown.
INVISIBLE_CONTRAST = 0.02
#: Regions smaller than this (pixels in the frame) are not judged.
MIN_REGION_PIXELS = 4
#: Width in pixels of the ring a region is compared with.
RING_PX = 2

# Immerkaer's 3x3 operator: the difference of two Laplacians, which cancels any locally
# linear (and most locally smooth) image structure while white noise passes with a gain of
# sqrt(sum(N^2)) = sqrt(36) = 6.
_IMMERKAER = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], np.float32)
# MAD -> sigma for a Gaussian: sigma = median(|x|) / Phi^-1(3/4) = 1.4826 * median(|x|).
_MAD_TO_SIGMA = 1.482602218505602


def to_nchw_float(images: Any) -> np.ndarray:
    """``(N, 3, H, W)`` float32 numpy in [0, 1] from a float ``(N, 3, H, W)`` batch or a uint8
    ``(N, H, W, 3)`` one (torch or numpy); values are not range-checked here.

    Raises:
        ValueError: naming the shape when it is neither layout.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(
            f"images: expected a batch (N, 3, H, W) float or (N, H, W, 3) uint8, got shape "
            f"{images.shape}"
        )
    if images.dtype == np.uint8:
        if images.shape[-1] != 3:
            raise ValueError(f"images: expected uint8 (N, H, W, 3), got shape {images.shape}")
        return images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(images.dtype, np.floating) or images.shape[1] != 3:
        raise ValueError(
            f"images: expected float (N, 3, H, W) in [0, 1], got {images.dtype} {images.shape}"
        )
    return images.astype(np.float32, copy=False)


def luminance(images: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` Rec. 709 luminance of ``(N, 3, H, W)`` float images."""
    return np.einsum("c,nchw->nhw", LUMA_WEIGHTS, images, dtype=np.float32)


def _immerkaer_response(planes: np.ndarray) -> np.ndarray:
    """``(..., H-2, W-2)`` response of ``(..., H, W)`` planes to the Immerkaer operator
    (valid part only, so borders never invent structure)."""
    h, w = planes.shape[-2:]
    out = np.zeros((*planes.shape[:-2], h - 2, w - 2), dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            out += _IMMERKAER[dy, dx] * planes[..., dy : dy + h - 2, dx : dx + w - 2]
    return out


def noise_sigma(planes: np.ndarray) -> np.ndarray:
    """Robust white-noise standard deviation of each plane (Immerkaer's fast estimate).

    J. Immerkaer, "Fast Noise Variance Estimation", CVIU 64(2), 1996, convolves the image
    with ``N = [[1, -2, 1], [-2, 4, -2], [1, -2, 1]]`` and estimates
    ``sigma = sqrt(pi / 2) * mean(|I * N|) / 6``. We use the median instead of the mean,
    ``sigma = 1.4826 * median(|I * N|) / 6``: edges and fine texture give large but sparse
    responses that would inflate the mean, while the median follows the noise that covers
    every pixel. For pure Gaussian noise of std ``s`` both give ``s``.

    Args:
        planes: ``(..., H, W)`` float, ``H, W >= 3``.

    Returns:
        ``(...)`` float64 estimates, in the units of the input.
    """
    if planes.shape[-1] < 3 or planes.shape[-2] < 3:
        raise ValueError(f"planes: expected H, W >= 3 for a 3x3 operator, got {planes.shape}")
    resp = np.abs(_immerkaer_response(planes.astype(np.float32, copy=False)))
    flat = resp.reshape(*resp.shape[:-2], -1)
    return np.median(flat, axis=-1).astype(np.float64) * (_MAD_TO_SIGMA / 6.0)


@dataclass
class ScreenResult:
    """Outcome of screening ``N`` frames.

    Attributes:
        keep: ``(N,)`` bool, True for frames that pass every check.
        reasons: ``N`` lists of the reasons (from :data:`REASONS`) each frame fails; empty for
            kept frames.
        counts: ``{reason: number of frames failing it}`` for every reason in
            :data:`REASONS` (a frame can count under several).
        stats: per-frame measurements behind the decisions, each ``(N,)`` float64
            (``lum_std``, ``bright_share``, ``dark_share``, ``noise_sigma``; NaN for corrupt
            frames), for calibration and reports.
    """

    keep: np.ndarray
    reasons: list[list[str]]
    counts: dict[str, int]
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    #: figures noted but not acted on (``label_not_visible``...), published by metrics()
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def kept_indices(self) -> np.ndarray:
        """``(K,)`` int64 indices of the kept frames, ascending."""
        return np.flatnonzero(self.keep).astype(np.int64)

    def metrics(self, prefix: str = "risk/T-10/") -> dict[str, float]:
        """Flat MLflow-ready floats: ``<prefix>dropped`` (frames), ``<prefix>dropped_share``
        (fraction of all frames, NaN with no frame) and ``<prefix><reason>`` (frames per
        reason)."""
        n = len(self.keep)
        dropped = float(n - int(self.keep.sum()))
        out = {
            f"{prefix}dropped": dropped,
            f"{prefix}dropped_share": dropped / n if n else math.nan,
        }
        out.update({f"{prefix}{r}": float(self.counts.get(r, 0)) for r in REASONS})
        out.update({f"{prefix}{k}": float(v) for k, v in self.notes.items()})
        return out


class FrameScreen:
    """Flag frames that are corrupt, blank, over/underexposed or noise-dominated.

    The module docstring gives each test and why its default keeps night and fog frames.

    Args:
        blank_std: luminance std (in [0, 1] units) below which a frame is ``blank``.
            Default 0.004, about one 8-bit grey level.
        overexposed_share: share of pixels with luminance > ``overexposed_level`` above which
            a frame is ``overexposed``. Default 0.5.
        overexposed_level: default 0.98.
        underexposed_share: share of pixels with luminance < ``underexposed_level`` above
            which a frame is ``underexposed``. Default 0.8 (night frames stay below it).
        underexposed_level: default 0.02.
        noisy_sigma: per-channel noise std (:func:`noise_sigma`) above which a frame is
            ``noisy``. Default 0.08 (the procedural sensor adds at most 0.03).
        range_tolerance: how far outside [0, 1] a float value may lie (resampling and
            colour jitter overshoot slightly) before the frame is ``corrupt``. Default 1e-3.
        expected_size: ``(H, W)`` every frame must have, or None to accept any size.
    """

    def __init__(
        self,
        blank_std: float = 0.004,
        overexposed_share: float = 0.5,
        overexposed_level: float = 0.98,
        underexposed_share: float = 0.8,
        underexposed_level: float = 0.02,
        noisy_sigma: float = 0.08,
        range_tolerance: float = 1e-3,
        expected_size: tuple[int, int] | None = None,
    ) -> None:
        for key, value in (
            ("overexposed_share", overexposed_share),
            ("overexposed_level", overexposed_level),
            ("underexposed_share", underexposed_share),
            ("underexposed_level", underexposed_level),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key}: expected a value in [0, 1], got {value}")
        for key, value in (
            ("blank_std", blank_std),
            ("noisy_sigma", noisy_sigma),
            ("range_tolerance", range_tolerance),
        ):
            if not value >= 0.0:
                raise ValueError(f"{key}: expected a non-negative number, got {value}")
        if expected_size is not None:
            expected_size = tuple(int(v) for v in expected_size)  # type: ignore[assignment]
            if len(expected_size) != 2 or min(expected_size) < 3:
                raise ValueError(f"expected_size: expected (H, W) >= 3, got {expected_size}")
        self.blank_std = blank_std
        self.overexposed_share = overexposed_share
        self.overexposed_level = overexposed_level
        self.underexposed_share = underexposed_share
        self.underexposed_level = underexposed_level
        self.noisy_sigma = noisy_sigma
        self.range_tolerance = range_tolerance
        self.expected_size = expected_size

    def __call__(self, images: Any) -> ScreenResult:
        """Same as :meth:`screen`."""
        return self.screen(images)

    def _frame_chw(self, frame: Any) -> np.ndarray | None:
        """One frame as ``(3, H, W)`` float32, or None when its shape/dtype is wrong."""
        if isinstance(frame, torch.Tensor):
            frame = frame.detach().cpu().numpy()
        frame = np.asarray(frame)
        if frame.ndim != 3:
            return None
        if frame.dtype == np.uint8:
            if frame.shape[-1] != 3:
                return None
            frame = frame.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
        elif np.issubdtype(frame.dtype, np.floating):
            if frame.shape[0] != 3:
                return None
            frame = frame.astype(np.float32, copy=False)
        else:
            return None
        h, w = frame.shape[1:]
        if min(h, w) < 3 or (self.expected_size is not None and (h, w) != self.expected_size):
            return None
        return frame

    def screen(self, images: Any) -> ScreenResult:
        """Screen ``N`` frames.

        Args:
            images: ``(N, 3, H, W)`` float in [0, 1] or ``(N, H, W, 3)`` uint8 (torch or
                numpy), or a sequence of single frames in either layout (frames of another
                shape are then flagged ``corrupt`` instead of failing the whole batch).

        Returns:
            :class:`ScreenResult` with one entry per frame, in input order.
        """
        if isinstance(images, (np.ndarray, torch.Tensor)):
            # A batch has one shape: a wrong one is a caller error, not a sensor fault.
            batch = to_nchw_float(images)
            frames: list[np.ndarray | None] = list(batch)
        else:
            frames = [self._frame_chw(f) for f in images]
        n = len(frames)
        reasons: list[list[str]] = [[] for _ in range(n)]
        stats = {k: np.full(n, np.nan) for k in ("lum_std", "bright_share", "dark_share")}
        stats["noise_sigma"] = np.full(n, np.nan)

        # Group same-shaped frames so every check below runs vectorized over a group.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, frame in enumerate(frames):
            if frame is None:
                reasons[i].append("corrupt")
            else:
                groups.setdefault(frame.shape, []).append(i)
        for shape, idx in groups.items():
            size = shape[1:]
            if min(size) < 3 or (self.expected_size is not None and size != self.expected_size):
                for i in idx:
                    reasons[i].append("corrupt")
                continue
            self._screen_group(np.stack([frames[i] for i in idx]), idx, reasons, stats)

        keep = np.array([not r for r in reasons], dtype=bool)
        counts = {r: sum(r in rs for rs in reasons) for r in REASONS}
        return ScreenResult(keep=keep, reasons=reasons, counts=counts, stats=stats)

    def _screen_group(
        self,
        batch: np.ndarray,
        idx: Sequence[int],
        reasons: list[list[str]],
        stats: dict[str, np.ndarray],
    ) -> None:
        """Check a ``(B, 3, H, W)`` float32 batch whose frame ``b`` is input ``idx[b]``."""
        flat = batch.reshape(len(batch), -1)
        tol = self.range_tolerance
        with np.errstate(invalid="ignore"):
            corrupt = ~np.isfinite(flat).all(axis=1) | (flat < -tol).any(axis=1)
            corrupt |= (flat > 1.0 + tol).any(axis=1)
        good = np.flatnonzero(~corrupt)
        for b in np.flatnonzero(corrupt):
            reasons[idx[b]].append("corrupt")
        if good.size == 0:
            return
        # Clip the tolerated overshoot so it cannot count as saturation or darkness.
        x = np.clip(batch[good], 0.0, 1.0)
        lum = luminance(x).reshape(len(good), -1)
        lum_std = lum.std(axis=1, dtype=np.float64)
        bright = (lum > self.overexposed_level).mean(axis=1)
        dark = (lum < self.underexposed_level).mean(axis=1)
        sigma = noise_sigma(x).mean(axis=1)  # (B, 3) -> mean over channels
        checks = (
            ("blank", lum_std < self.blank_std),
            ("overexposed", bright > self.overexposed_share),
            ("underexposed", dark > self.underexposed_share),
            ("noisy", sigma > self.noisy_sigma),
        )
        for j, b in enumerate(good):
            i = idx[b]
            reasons[i].extend(name for name, flags in checks if flags[j])
            stats["lum_std"][i] = lum_std[j]
            stats["bright_share"][i] = bright[j]
            stats["dark_share"][i] = dark[j]
            stats["noise_sigma"][i] = sigma[j]


def screen_frames(images: Any, screen: FrameScreen | None = None) -> ScreenResult:
    """Screen frames with ``screen`` (default thresholds when None); see
    :meth:`FrameScreen.screen` for the accepted layouts."""
    return (screen or FrameScreen()).screen(images)


class ScreenedDataset(Dataset):
    """A dataset of Sample dicts without the frames that fail :class:`FrameScreen`.

    Every frame is screened once, at construction, in batches of ``batch_size`` (so memory
    stays bounded for large datasets); the wrapper then behaves like
    ``torch.utils.data.Subset(dataset, kept_indices)``.

    Args:
        dataset: map-style dataset whose items are dicts with ``image`` ``(3, H, W)`` float
            in [0, 1] (the project's Sample contract).
        screen: the thresholds; default :class:`FrameScreen` ``()``.
        batch_size: frames screened together.

    Attributes:
        result: the :class:`ScreenResult` over all ``len(dataset)`` frames.
        kept_indices: ``list[int]`` indices into ``dataset`` of the kept frames, ascending.
    """

    def __init__(
        self, dataset: Dataset, screen: FrameScreen | None = None, batch_size: int = 64
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
        self.dataset = dataset
        self.screen = screen or FrameScreen()
        n = len(dataset)  # type: ignore[arg-type]
        parts: list[ScreenResult] = []
        thin = _thin_class_ids(dataset)
        hidden = dict.fromkeys(thin, 0)
        any_hidden = 0
        for start in range(0, n, batch_size):
            samples = [dataset[i] for i in range(start, min(n, start + batch_size))]
            # A list of frames, so one malformed frame is flagged rather than fatal.
            frames = [_sample_image(sample, start + k) for k, sample in enumerate(samples)]
            parts.append(self.screen.screen(frames))
            if thin:
                flags = _label_visibility(samples, thin)
                if flags:
                    for name, flagged in flags.items():
                        hidden[name] += int(flagged.sum())
                    any_hidden += int(np.logical_or.reduce(list(flags.values())).sum())
        self.result = _concat(parts)
        if thin and n:
            self.result.notes = {
                "label_not_visible": float(any_hidden),
                "label_not_visible_share": any_hidden / n,
                **{f"label_not_visible/{name}": float(c) for name, c in hidden.items()},
            }
            if any_hidden:
                where = getattr(dataset, "root", type(dataset).__name__)
                log.info(
                    "T-10 note: %d of %d frames of %s label thin objects the image does not "
                    "show (contrast < %g; %s); labels kept",
                    any_hidden,
                    n,
                    where,
                    INVISIBLE_CONTRAST,
                    ", ".join(f"{k} {v}" for k, v in hidden.items() if v),
                )
        self.kept_indices: list[int] = self.result.kept_indices.tolist()

    def __len__(self) -> int:
        return len(self.kept_indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.kept_indices[index]]

    @property
    def groups(self) -> list[str]:
        """Condition group of each kept frame (when the wrapped dataset lists them)."""
        names = getattr(self.dataset, "groups", None)
        if names is None:
            raise AttributeError("groups")
        return [names[i] for i in self.kept_indices]

    def __getattr__(self, name: str) -> Any:
        # the wrapped dataset's card, root, name ... stay visible (lineage, class weights)
        if name.startswith("_") or name in ("dataset", "kept_indices", "result"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def invisible_labels(
    images: Any,
    masks: Any,
    classes: Mapping[str, int],
    contrast: float = INVISIBLE_CONTRAST,
    min_pixels: int = MIN_REGION_PIXELS,
    ring: int = RING_PX,
) -> dict[str, np.ndarray]:
    """Per class, the frames that label it where the image shows (almost) nothing.

    A class's region in a frame (all its pixels there, at least ``min_pixels``) is *not
    visible* when its mean luminance differs from that of the ``ring``-pixel band around it
    (labelled pixels of other classes) by less than ``contrast``: a pole blurred into the
    wall behind it, a person washed out by fog.

    Args:
        images: ``(N, 3, H, W)`` float in [0, 1] (torch or numpy).
        masks: ``(N, H, W)`` integer labels, 255 = ignore.
        classes: ``{name: class id}`` of the classes to judge (e.g. :data:`THIN_CLASSES`).

    Returns:
        ``{name: (N,) bool}``: True where the frame labels the class and does not show it.
    """
    import torch.nn.functional as F

    x = torch.as_tensor(to_nchw_float(images))
    y = torch.as_tensor(np.asarray(_to_numpy(masks)), dtype=torch.int64)
    lum = torch.einsum("nchw,c->nhw", x, torch.as_tensor(LUMA_WEIGHTS))
    labelled = y != 255
    out = {}
    for name, cid in classes.items():
        region = (y == cid).float()
        grown = F.max_pool2d(region[:, None], 2 * ring + 1, stride=1, padding=ring)[:, 0]
        band = (grown > 0) & (region == 0) & labelled
        n_in, n_band = region.sum((1, 2)), band.sum((1, 2)).float()
        mean_in = (lum * region).sum((1, 2)) / n_in.clamp(min=1)
        mean_band = (lum * band).sum((1, 2)) / n_band.clamp(min=1)
        flat = (mean_in - mean_band).abs() < contrast
        out[name] = ((n_in >= min_pixels) & (n_band > 0) & flat).numpy()
    return out


def _to_numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def _thin_class_ids(dataset: Any) -> dict[str, int]:
    """``{name: id}`` of the :data:`THIN_CLASSES` the dataset's class list names."""
    names = list(getattr(dataset, "class_names", None) or [])
    return {n: names.index(n) for n in THIN_CLASSES if n in names}


def _label_visibility(
    samples: Sequence[Any], classes: Mapping[str, int]
) -> dict[str, np.ndarray] | None:
    """:func:`invisible_labels` of the labelled, well-formed samples of one batch."""
    good = [
        s
        for s in samples
        if isinstance(s, Mapping)
        and s.get("mask") is not None
        and getattr(s["image"], "shape", None) is not None
        and tuple(s["image"].shape[-2:]) == tuple(s["mask"].shape[-2:])
        and len(s["image"].shape) == 3
    ]
    if not good:
        return None
    shapes = {tuple(s["image"].shape) for s in good}
    if len(shapes) != 1:
        return None
    try:
        images = torch.stack([torch.as_tensor(s["image"]).float() for s in good])
        masks = torch.stack([torch.as_tensor(s["mask"]) for s in good])
        if not torch.isfinite(images).all():
            return None
        return invisible_labels(images, masks, classes)
    except (TypeError, ValueError, RuntimeError):
        return None  # a frame the screen flags as corrupt: no note on it


def _sample_image(sample: Any, index: int) -> Any:
    if not isinstance(sample, Mapping) or "image" not in sample:
        raise ValueError(f"dataset[{index}]: expected a Sample dict with an 'image' entry")
    return sample["image"]


def _concat(parts: Sequence[ScreenResult]) -> ScreenResult:
    """One :class:`ScreenResult` from consecutive parts."""
    if not parts:
        empty = np.zeros(0)
        stats = {k: empty for k in ("lum_std", "bright_share", "dark_share", "noise_sigma")}
        return ScreenResult(np.zeros(0, bool), [], dict.fromkeys(REASONS, 0), stats)
    return ScreenResult(
        keep=np.concatenate([p.keep for p in parts]),
        reasons=[r for p in parts for r in p.reasons],
        counts={r: sum(p.counts[r] for p in parts) for r in REASONS},
        stats={k: np.concatenate([p.stats[k] for p in parts]) for k in parts[0].stats},
    )
