"""Training augmentations for Samples, reproducible per (seed, epoch, index).

An augmentation is a pure function of the Sample and a key: its randomness comes from
``np.random.default_rng([seed, *key])``, not from a global or per-worker generator. With
``key = (epoch, index)`` the same image gets the same augmentation in a rerun, whatever the
number of DataLoader workers or the order in which they fetch.

Example:
    >>> aug = Augment(hflip=True, scale=(0.75, 1.25), color_jitter=0.2, seed=0)
    >>> out = aug(sample, key=(3, 17))      # epoch 3, item 17
    >>> out["image"].shape == sample["image"].shape
    True
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from simulation.taxonomy import IGNORE_INDEX

__all__ = ["Augment", "AugmentedDataset"]

# ITU-R BT.601 luma weights: the grey that saturation and contrast move towards.
_LUMA = (0.299, 0.587, 0.114)


def _grey(image: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` RGB -> ``(1, H, W)`` luma."""
    r, g, b = image.unbind(0)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(0)


def _placement(size: int, target: int, u: float) -> tuple[int, int, int]:
    """Crop or pad one axis from ``size`` to ``target`` pixels at relative position ``u``.

    Returns ``(src_start, dst_start, length)``: copy ``length`` pixels from ``src_start``
    of the rescaled image to ``dst_start`` of the output.
    """
    if size >= target:  # crop a random window
        return min(int(u * (size - target + 1)), size - target), 0, target
    return 0, min(int(u * (target - size + 1)), target - size), size  # pad around it


class Augment:
    """Random horizontal flip, rescale + crop/pad, and colour jitter of a Sample.

    The geometric transform is applied identically to ``image`` (bilinear, antialiased
    when shrinking) and ``mask`` (nearest, so no label is invented between two classes);
    the photometric one only to ``image``. Output sizes equal input sizes: a rescaled image
    larger than the input is cropped at a random window, a smaller one is placed at a
    random position and padded with 0 (image, black) and 255 (mask, ignore), so padding is
    never learned as a class.

    Args:
        hflip: flip left-right with probability 0.5. Driving scenes are mirror-plausible
            (both road sides look alike); turn it off for left/right-specific labels.
        scale: ``(low, high)`` range of the uniform rescale factor, ``0 < low <= high``;
            ``(1.0, 1.0)`` disables rescaling.
        color_jitter: strength ``j`` in [0, 1] of brightness, contrast and saturation
            jitter, each factor uniform in ``[1 - j, 1 + j]``; 0 disables it.
        seed: base seed (>= 0) of every draw.

    Call ``augment(sample, key)`` with a Sample (``image`` ``(3, H, W) float32`` in
    [0, 1], optional ``mask`` ``(H, W) int64`` with 255 = ignore) and a key of
    non-negative integers, usually ``(epoch, index)``. It returns a new dict with
    ``image`` and ``mask`` replaced and every other key unchanged; the input is not
    modified (a dataset may cache it).
    """

    def __init__(
        self,
        hflip: bool = True,
        scale: Sequence[float] = (1.0, 1.0),
        color_jitter: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not isinstance(hflip, bool):
            raise ValueError(f"hflip: expected true or false, got {hflip!r}")
        try:
            low, high = (float(s) for s in scale)
        except (TypeError, ValueError):
            raise ValueError(f"scale: expected a (low, high) pair, got {scale!r}") from None
        if not (0.0 < low <= high and math.isfinite(high)):
            raise ValueError(f"scale: expected 0 < low <= high, got {tuple(scale)!r}")
        if (
            isinstance(color_jitter, bool)
            or not isinstance(color_jitter, numbers.Real)
            or not 0.0 <= color_jitter <= 1.0
        ):
            raise ValueError(f"color_jitter: expected a number in [0, 1], got {color_jitter!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
        self.hflip = hflip
        self.scale = (low, high)
        self.color_jitter = float(color_jitter)
        self.seed = int(seed)

    def __call__(self, sample: dict[str, Any], key: Sequence[int]) -> dict[str, Any]:
        """Augment one Sample; see the class docstring for the contract."""
        if any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0 for k in key):
            raise ValueError(f"key: expected non-negative integers, got {tuple(key)!r}")
        rng = np.random.default_rng([self.seed, *(int(k) for k in key)])
        # Every draw is made in a fixed order whether or not its option is on, so turning
        # on colour jitter does not change the flips and crops of the same key.
        flip = bool(rng.random() < 0.5) and self.hflip
        factor = float(rng.uniform(*self.scale))
        u_y, u_x = (float(u) for u in rng.random(2))
        j = self.color_jitter
        brightness, contrast, saturation = (float(f) for f in rng.uniform(1 - j, 1 + j, 3))

        image = sample["image"]
        if not (isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3):
            raise ValueError(
                f"sample['image']: expected a (3, H, W) tensor, got "
                f"{getattr(image, 'shape', type(image).__name__)}"
            )
        image = image.to(torch.float32)
        mask = sample.get("mask")
        if mask is not None and tuple(mask.shape) != tuple(image.shape[1:]):
            raise ValueError(
                f"sample['mask']: shape {tuple(mask.shape)} differs from the image's "
                f"{tuple(image.shape[1:])}"
            )

        # Photometric first, on the original pixels, so padding added below stays exactly 0.
        if j > 0:
            image = self._jitter(image, brightness, contrast, saturation)
        if flip:
            image = image.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
        if self.scale != (1.0, 1.0):
            image, mask = self._rescale(image, mask, factor, u_y, u_x)

        out = dict(sample)
        out["image"] = image.contiguous()
        if mask is not None:
            out["mask"] = mask.to(torch.int64).contiguous()
        return out

    @staticmethod
    def _jitter(
        image: torch.Tensor, brightness: float, contrast: float, saturation: float
    ) -> torch.Tensor:
        """Brightness (scale), contrast (towards the mean grey) and saturation (towards
        each pixel's grey) of a ``(3, H, W)`` image in [0, 1]; clamped to [0, 1]."""
        image = (image * brightness).clamp_(0.0, 1.0)
        mean = _grey(image).mean()
        image = ((image - mean) * contrast + mean).clamp_(0.0, 1.0)
        grey = _grey(image)
        return ((image - grey) * saturation + grey).clamp_(0.0, 1.0)

    @staticmethod
    def _rescale(
        image: torch.Tensor, mask: torch.Tensor | None, factor: float, u_y: float, u_x: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Resize by ``factor``, then crop or pad back to the input ``(H, W)``."""
        _, height, width = image.shape
        new_h, new_w = max(1, round(height * factor)), max(1, round(width * factor))
        if (new_h, new_w) == (height, width):
            return image, mask
        scaled = F.interpolate(
            image[None],
            size=(new_h, new_w),
            mode="bilinear",
            align_corners=False,
            antialias=factor < 1.0,
        )[0].clamp_(0.0, 1.0)
        sy, dy, ly = _placement(new_h, height, u_y)
        sx, dx, lx = _placement(new_w, width, u_x)
        out_image = image.new_zeros(image.shape)
        out_image[:, dy : dy + ly, dx : dx + lx] = scaled[:, sy : sy + ly, sx : sx + lx]
        if mask is None:
            return out_image, None
        # "nearest-exact" samples pixel centres like align_corners=False bilinear does;
        # plain "nearest" is shifted by up to a pixel and would misalign labels and image.
        scaled_mask = F.interpolate(
            mask[None, None].to(torch.float32), size=(new_h, new_w), mode="nearest-exact"
        )[0, 0].to(torch.int64)
        out_mask = torch.full(mask.shape, IGNORE_INDEX, dtype=torch.int64)
        out_mask[dy : dy + ly, dx : dx + lx] = scaled_mask[sy : sy + ly, sx : sx + lx]
        return out_image, out_mask

    def __repr__(self) -> str:
        return (
            f"Augment(hflip={self.hflip}, scale={self.scale}, "
            f"color_jitter={self.color_jitter}, seed={self.seed})"
        )


class AugmentedDataset(Dataset[dict[str, Any]]):
    """``dataset`` with ``augment`` applied to every item, keyed by ``(epoch, index)``.

    Items can be fetched two ways:

    - ``ds[(epoch, i)]``: the epoch travels with the index. This is what the training
      loader uses (``ExactRatioBatchSampler(yield_epoch=True)``), because DataLoader
      workers hold their own copy of this object and never see a later ``set_epoch``
      made in the main process (persistent workers keep that copy for the whole run).
    - ``ds[i]``: uses the epoch of the last :meth:`set_epoch` (0 by default), for use
      outside that loader.

    Args:
        dataset: a map-style dataset of Samples.
        augment: the augmentation.
    """

    def __init__(self, dataset: Dataset[dict[str, Any]], augment: Augment) -> None:
        self.dataset = dataset
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain integer indices."""
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"epoch: expected an integer >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(index, tuple):
            epoch, i = index
        else:
            epoch, i = self.epoch, index
        i = int(i)
        if i < 0:  # the key must not depend on how an index was spelled
            i += len(self)
        return self.augment(self.dataset[i], key=(int(epoch), i))
