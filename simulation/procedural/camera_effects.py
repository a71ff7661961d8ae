"""The ``photo`` style's camera pipeline: what a real camera does to a clean image.

White balance error, lens blur, chromatic aberration, vignetting, a filmic response
curve, signal-dependent sensor noise and JPEG-like 8x8 DCT compression. Each step is
vectorized over ``(N, 3, H, W)`` float images in [0, 1]; per-frame randomness comes
from the frame's ``(seed, index)`` key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from simulation.procedural.styles import Style
from simulation.sensor import gaussian_blur, noise_crops, radial_distance

# The JPEG standard's luminance and chrominance quantization tables (quality 50).
_Q_LUMA = torch.tensor(
    [
        16,
        11,
        10,
        16,
        24,
        40,
        51,
        61,
        12,
        12,
        14,
        19,
        26,
        58,
        60,
        55,
        14,
        13,
        16,
        24,
        40,
        57,
        69,
        56,
        14,
        17,
        22,
        29,
        51,
        87,
        80,
        62,
        18,
        22,
        37,
        56,
        68,
        109,
        103,
        77,
        24,
        35,
        55,
        64,
        81,
        104,
        113,
        92,
        49,
        64,
        78,
        87,
        103,
        121,
        120,
        101,
        72,
        92,
        95,
        98,
        112,
        100,
        103,
        99,
    ],
    dtype=torch.float32,
)
_Q_CHROMA = torch.tensor(
    [
        17,
        18,
        24,
        47,
        99,
        99,
        99,
        99,
        18,
        21,
        26,
        66,
        99,
        99,
        99,
        99,
        24,
        26,
        56,
        99,
        99,
        99,
        99,
        99,
        47,
        66,
        99,
        99,
        99,
        99,
        99,
        99,
    ]
    + [99] * 32,
    dtype=torch.float32,
)


@lru_cache(maxsize=1)
def dct_basis() -> torch.Tensor:
    """``(8, 8)`` orthonormal 1-D DCT-II basis ``c[frequency, position]``."""
    k = torch.arange(8, dtype=torch.float64)
    c = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16)  # (freq, pos)
    c[0] /= math.sqrt(2)
    c *= 0.5
    return c.float()


@lru_cache(maxsize=1)
def _dct_matrix() -> torch.Tensor:
    """``(64, 64)`` orthonormal 2-D DCT-II basis for 8x8 blocks (row-major)."""
    k = torch.arange(8, dtype=torch.float64)
    c = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16)  # (freq, pos)
    c[0] /= math.sqrt(2)
    c *= 0.5
    return torch.kron(c, c).float()


def jpeg_tables(quality: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(64,)`` luminance and chrominance quantization steps at ``quality``."""
    scale = _quality_scale(quality)
    return (_Q_LUMA * scale).clamp(1, 255), (_Q_CHROMA * scale).clamp(1, 255)


def _quality_scale(quality: int) -> float:
    # libjpeg's mapping from quality (1..100) to a table scale factor
    q = min(max(quality, 1), 100)
    return (5000 / q if q < 50 else 200 - 2 * q) / 100.0


def jpeg_compress(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Emulate baseline JPEG: YCbCr, 4:2:0 chroma, 8x8 DCT quantization at ``quality``.

    Args:
        images: ``(N, 3, H, W)`` float in [0, 1].
    """
    n, _, h, w = images.shape
    r, g, b = images[:, 0] * 255, images[:, 1] * 255, images[:, 2] * 255
    y = 0.299 * r + 0.587 * g + 0.114 * b - 128
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2, ceil_mode=True)
    luma_table, chroma_table = jpeg_tables(quality)
    y = _quantize_blocks(y[:, None], luma_table)[:, 0]
    chroma = _quantize_blocks(chroma, chroma_table)
    chroma = F.interpolate(chroma, scale_factor=2, mode="nearest")[..., :h, :w]
    cb, cr = chroma[:, 0], chroma[:, 1]
    out = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return ((out + 128) / 255).clamp_(0, 1)


def _quantize_blocks(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """DCT, quantize with ``table`` (64,), and invert, on ``(N, C, H, W)`` 8x8 blocks."""
    n, c, h, w = x.shape
    ph, pw = (-h) % 8, (-w) % 8
    xp = F.pad(x, (0, pw, 0, ph), mode="replicate")
    hb, wb = (h + ph) // 8, (w + pw) // 8
    blocks = xp.reshape(n, c, hb, 8, wb, 8).permute(0, 1, 2, 4, 3, 5).reshape(-1, 64)
    d = _dct_matrix()
    coef = blocks @ d.T
    coef = torch.round(coef / table) * table
    blocks = coef @ d
    out = blocks.reshape(n, c, hb, wb, 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(n, c, hb * 8, wb * 8)
    return out[..., :h, :w]


def chromatic_aberration(images: torch.Tensor, shift_px: float) -> torch.Tensor:
    """Lateral chromatic aberration: red magnified, blue shrunk, by ``shift_px`` at the corners."""
    n, _, h, w = images.shape
    if shift_px <= 0:
        return images
    ys = torch.linspace(-1, 1, h)
    xs = torch.linspace(-1, 1, w)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([gx, gy], -1)  # (H, W, 2) in normalized coords
    k = shift_px / (0.5 * math.hypot(h, w))
    grids = torch.stack([base * (1 - k), base * (1 + k)])  # red, blue
    rb = images[:, [0, 2]].reshape(n * 2, 1, h, w)
    grid = grids.repeat(n, 1, 1, 1)
    rb = F.grid_sample(rb, grid, mode="bilinear", padding_mode="border", align_corners=True)
    rb = rb.reshape(n, 2, h, w)
    return torch.stack([rb[:, 0], images[:, 1], rb[:, 1]], 1)


def filmic(x: torch.Tensor) -> torch.Tensor:
    """A filmic S-curve with a lifted toe and soft shoulder (maps [0, 1] onto [0, 1])."""
    a, b, c, d, e = 2.51, 0.03, 2.43, 0.59, 0.14  # Narkowicz's ACES fit
    y = (x * 1.6) * (a * x * 1.6 + b) / ((x * 1.6) * (c * x * 1.6 + d) + e)
    return y.clamp(0, 1)


def white_balance_gains(style: Style, keys: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``(N, 3)`` per-frame RGB gains of a white-balance error drawn from each key."""
    gains = []
    for seed, index in keys:
        r = np.random.default_rng([int(seed), int(index), 0xBA1])
        t = r.normal(0.0, style.white_balance)  # warm/cool temperature error
        tint = r.normal(0.0, style.white_balance / 2)  # green/magenta
        gains.append([math.exp(t), math.exp(-tint), math.exp(-t)])
    return torch.tensor(gains, dtype=torch.float32)


def noise_keys(keys: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The keys of the camera's own noise crops (not the randomized sensor's)."""
    return [(int(s) ^ 0xC0FFEE, int(i)) for s, i in keys]


def apply(images: torch.Tensor, style: Style, keys: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Apply ``style``'s camera pipeline to ``(N, 3, H, W)`` float images in [0, 1]."""
    n, _, h, w = images.shape
    out = images
    if style.white_balance > 0:
        out = out * white_balance_gains(style, keys)[:, :, None, None]
    if style.lens_blur_px > 0:
        out = gaussian_blur(out, torch.full((n,), style.lens_blur_px))
    out = chromatic_aberration(out, style.chromatic_aberration_px)
    if style.vignetting > 0:
        out = out * (1 - style.vignetting * radial_distance(h, w) ** 2)
    if style.response > 0:
        out = out * (1 - style.response) + filmic(out.clamp(0, 1)) * style.response
    if style.shot_noise > 0 or style.read_noise > 0:
        sigma = torch.sqrt(out.clamp_min(0) * style.shot_noise**2 + style.read_noise**2)
        out = out + noise_crops(noise_keys(keys), h, w) * sigma
    out = out.clamp(0, 1)
    if style.jpeg_quality > 0:
        out = jpeg_compress(out, style.jpeg_quality)
    return out
