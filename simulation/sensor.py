"""Sensor effects sampled by the randomizer, applied the same way to every backend.

Order follows the light path: lens blur, vignetting, exposure, then sensor noise.
Everything is vectorized over the batch; per-frame randomness (the noise pattern)
depends only on the frame's ``(seed, index)`` key, never on the batch it is in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from simulation.randomization import Sensor

# Gamma of the display-referred images we produce; exposure acts on linear light.
_GAMMA = 2.2
_NOISE_MARGIN = 64


@lru_cache(maxsize=8)
def noise_bank(height: int, width: int) -> torch.Tensor:
    """A fixed ``(3, H + 64, W + 64)`` standard-normal field; frames take shifted crops."""
    gen = torch.Generator().manual_seed(0x5E4503)
    return torch.randn(3, height + _NOISE_MARGIN, width + _NOISE_MARGIN, generator=gen)


def noise_offsets(keys: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Per ``(seed, index)`` key, the row and column of its crop of the noise bank and
    whether the crop is flipped left-right (1) or not (0)."""
    out = []
    for seed, index in keys:
        rng = np.random.default_rng([int(seed), int(index), 0x5E45])
        dy, dx = (int(v) for v in rng.integers(0, _NOISE_MARGIN, size=2))
        out.append((dy, dx, int(rng.integers(0, 2))))
    return out


def noise_crops(keys: Sequence[tuple[int, int]], height: int, width: int) -> torch.Tensor:
    """``(N, 3, H, W)`` unit Gaussian noise, a deterministic crop per ``(seed, index)`` key."""
    bank = noise_bank(height, width).numpy()
    # numpy copies the strided (and flipped) crops about 15x faster than tensor indexing
    out = np.empty((len(keys), 3, height, width), np.float32)
    for i, (dy, dx, flip) in enumerate(noise_offsets(keys)):
        crop = bank[:, dy : dy + height, dx : dx + width]
        out[i] = crop[..., ::-1] if flip else crop
    return torch.from_numpy(out)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own Gaussian, truncated at its own radius ``ceil(3 sigma)``
    (so a frame's result never depends on the other frames of its batch).

    Args:
        images: ``(N, C, H, W)`` float.
        sigmas: ``(N,)`` standard deviations in pixels; ``< 0.05`` leaves a frame unchanged.
    """
    n, c, h, w = images.shape
    out = images
    radii = [max(1, math.ceil(3.0 * s)) if s >= 0.05 else 0 for s in sigmas.tolist()]
    for radius in sorted(set(radii) - {0}):
        idx = torch.tensor([i for i, r in enumerate(radii) if r == radius])
        x = torch.arange(-radius, radius + 1, dtype=images.dtype)
        s = sigmas[idx].to(images.dtype).clamp_min(1e-3)[:, None]
        k = torch.exp(-0.5 * (x[None] / s) ** 2)
        k = k / k.sum(dim=1, keepdim=True)  # (M, K)
        k = k.repeat_interleave(c, dim=0)  # (M*C, K), one kernel per channel of each frame
        m = len(idx)
        flat = images[idx].reshape(1, m * c, h, w)
        flat = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
        flat = F.conv2d(flat, k[:, None, None, :], groups=m * c)
        flat = F.conv2d(flat, k[:, None, :, None], groups=m * c)
        if out is images:
            out = images.clone()
        out[idx] = flat.reshape(m, c, h, w)
    return out


def radial_distance(height: int, width: int) -> torch.Tensor:
    """``(H, W)`` distance from the image centre, 1 at the corners."""
    y = torch.linspace(-1.0, 1.0, height)[:, None]
    x = torch.linspace(-1.0, 1.0, width)[None, :]
    return torch.sqrt(x * x + y * y) / math.sqrt(2.0)


def apply_sensor_effects(
    images: torch.Tensor, sensors: Sequence[Sensor], keys: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """Apply each frame's :class:`Sensor` effects.

    Args:
        images: ``(N, 3, H, W)`` float in [0, 1] (display-referred, gamma 2.2).
        sensors: ``N`` sampled sensor parameters.
        keys: ``N`` ``(seed, index)`` pairs that fix each frame's noise pattern.

    Returns:
        ``(N, 3, H, W)`` float in [0, 1].
    """
    n, _, h, w = images.shape
    if len(sensors) != n or len(keys) != n:
        raise ValueError(f"expected {n} sensors and keys, got {len(sensors)} and {len(keys)}")
    col = lambda name: torch.tensor([getattr(s, name) for s in sensors], dtype=images.dtype)  # noqa: E731
    out = gaussian_blur(images, col("blur_sigma_px"))
    vig, ev = col("vignetting"), col("exposure_ev")
    if bool((vig > 0).any()) or bool((ev != 0).any()):
        # one (N, 1, H, W) gain: vignetting times exposure. Images are display-referred
        # (x = lin^(1/g)), so scaling linear light by 2^ev scales x by 2^(ev/g).
        gain = 1.0 - vig[:, None, None, None] * (radial_distance(h, w) ** 2)
        gain = gain * torch.pow(2.0, ev / _GAMMA)[:, None, None, None]
        out = out * gain
    std = col("noise_std")
    if bool((std > 0).any()):
        out = out + noise_crops(keys, h, w) * std[:, None, None, None]
    return out.clamp_(0.0, 1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` float in [0, 1] -> ``(N, H, W, 3) uint8``."""
    return (images.permute(0, 2, 3, 1) * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8).numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3) uint8`` -> ``(N, 3, H, W)`` float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def apply_sensor_effects_uint8(
    images: np.ndarray, sensors: Sequence[Sensor], keys: Sequence[tuple[int, int]]
) -> np.ndarray:
    """:func:`apply_sensor_effects` on ``(N, H, W, 3) uint8`` frames (the CARLA path)."""
    return to_uint8(apply_sensor_effects(from_uint8(images), sensors, keys))
