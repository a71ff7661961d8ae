"""Procedural surface textures (Tobin 2017, Tremblay 2018): tileable pattern families.

Every family is one fixed ``(S, S)`` tile in [0, 1] whose flat value is 0.5, built once
and cached, at :data:`TEXELS_PER_M` texels per metre (times a per-frame scale). Rows
``a`` run across the surface (lateral offset on the ground, height on a facade), columns
``b`` along the road. Each tile has :data:`LEVELS` pre-blurred levels so far surfaces
read a smooth level instead of aliasing. Lookup is one gather per pixel
(:func:`texture_lookup`), whatever the family mix of the batch.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from simulation.randomization import TEXTURE_FAMILIES

S = 256  # tile size in texels
TEXELS_PER_M = 48.0
LEVELS = 4  # level l is the tile averaged over 2^l texels
FAMILY_ID = {name: i for i, name in enumerate(TEXTURE_FAMILIES)}


def _gen(salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(0x7E7 + salt)


def _fbm(cells: tuple[int, ...], salt: int, gain: float = 0.6) -> torch.Tensor:
    """``(S, S)`` tileable fractal value noise in [0, 1] over the given cell counts."""
    gen, out, amp, total = _gen(salt), torch.zeros(S, S), 1.0, 0.0
    for c in cells:
        grid = torch.rand(1, 1, c, c, generator=gen)
        grid = torch.cat([grid, grid[..., :1, :]], 2)
        grid = torch.cat([grid, grid[..., :, :1]], 3)
        up = F.interpolate(grid, size=(S + S // c,) * 2, mode="bilinear", align_corners=True)
        out += amp * up[0, 0, :S, :S]
        total, amp = total + amp, amp * gain
    out /= total
    return (out - out.min()) / (out.max() - out.min())


def _coords() -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(S, dtype=torch.float32)
    return i.view(S, 1), i.view(1, S)  # a (rows), b (columns), texels


def _cells(cell: int, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest and second-nearest distance (texels) to jittered points, one per
    ``cell x cell`` texel cell (Worley noise), tiled; each ``(S, S)``."""
    n = S // cell
    pts = torch.rand(n, n, 2, generator=_gen(salt)) * cell  # offset inside each cell
    a, b = _coords()
    ca, cb = torch.div(a, cell, rounding_mode="floor"), torch.div(b, cell, rounding_mode="floor")
    ds = []
    for da in (-1, 0, 1):
        for db in (-1, 0, 1):
            ia, ib = (ca + da).long() % n, (cb + db).long() % n
            pa = (ca + da) * cell + pts[ia, ib, 0]
            pb = (cb + db) * cell + pts[ia, ib, 1]
            ds.append(torch.sqrt((a - pa) ** 2 + (b - pb) ** 2))
    d = torch.stack(ds).sort(dim=0).values
    return d[0], d[1]


def _family(name: str) -> torch.Tensor:
    a, b = _coords()
    grain = _fbm((64, 128), 1, 0.8)
    if name == "flat":
        return torch.full((S, S), 0.5)
    if name == "noise":  # blotchy wear and dirt
        return _fbm((4, 8, 16, 32, 64), 2)
    if name == "stripes":  # siding, planks, corrugation: bands across the surface
        phase = a * (2 * math.pi / 12.0) + 1.5 * _fbm((8, 16), 3)
        return 0.5 + 0.35 * torch.sin(phase) + 0.15 * (grain - 0.5)
    if name == "bricks":  # 0.25 m x 0.0625 m bricks (12 x 3 texels), running bond
        row = torch.floor(a / 4.0)
        shift = (row % 2) * 6.0
        col = torch.floor((b + shift) / 12.0)
        mortar = ((a % 4.0) < 0.9) | (((b + shift) % 12.0) < 0.9)
        tone = torch.frac(torch.sin(row * 12.9898 + col * 78.233) * 43758.5453)
        out = 0.55 + 0.25 * (tone - 0.5) + 0.15 * (grain - 0.5)
        return torch.where(mortar, 0.25, out)
    if name == "foliage":  # leaf clusters with dark gaps
        d1, _ = _cells(8, 4)
        leaves = (1.0 - (d1 / 6.0).clamp(0, 1)) ** 0.7
        return (0.15 + 0.7 * leaves + 0.3 * (grain - 0.5)).clamp(0, 1)
    if name == "asphalt":  # fine grain, light aggregate speckles, a few dark cracks
        speck = (torch.rand(S, S, generator=_gen(5)) > 0.97).float()
        crack = (_fbm((8, 16), 6) - 0.5).abs() < 0.012
        out = 0.5 + 0.45 * (grain - 0.5) + 0.3 * speck
        return torch.where(crack, 0.15, out)
    if name == "windows":  # a facade grid: 1.3 m x 1.6 m windows every 2.7 m x 3.2 m
        wa, wb = a % 128.0, b % 128.0
        glass = (wa > 40) & (wa < 117) & ((wb % 64.0) > 12) & ((wb % 64.0) < 52)
        frame = (wa > 37) & (wa < 120) & ((wb % 64.0) > 9) & ((wb % 64.0) < 55)
        out = 0.6 + 0.1 * (grain - 0.5)
        return torch.where(glass, 0.2, torch.where(frame, 0.78, out))
    if name == "cobblestone":  # photo only: rounded setts with dark joints
        d1, d2 = _cells(16, 7)
        joint = (d2 - d1) < 1.6
        tone = _fbm((32, 64), 8)
        out = 0.45 + 0.35 * (tone - 0.5) + 0.15 * (1.0 - (d1 / 10.0).clamp(0, 1))
        return torch.where(joint, 0.18, out)
    if name == "plaster":  # photo only: stained render, vertical rain streaks, patches
        stains = _fbm((2, 4, 8), 9)
        streaks = _fbm((32,), 10)[:1].expand(S, S)  # varies along the facade only
        patches = _fbm((4, 8), 11) > 0.72
        out = 0.5 + 0.35 * (stains - 0.5) - 0.2 * (streaks - 0.5) + 0.1 * (grain - 0.5)
        return torch.where(patches, out - 0.18, out)
    raise KeyError(name)


@lru_cache(maxsize=1)
def tiles() -> torch.Tensor:
    """``(F, LEVELS, S, S)`` float tiles of every family in :data:`TEXTURE_FAMILIES`."""
    out = torch.empty(len(TEXTURE_FAMILIES), LEVELS, S, S)
    for f, name in enumerate(TEXTURE_FAMILIES):
        t = _family(name).clamp(0, 1)
        for lvl in range(LEVELS):
            k = 2**lvl
            pooled = t if k == 1 else F.avg_pool2d(t[None, None], k)[0, 0]
            out[f, lvl] = pooled.repeat_interleave(k, 0).repeat_interleave(k, 1)
    out[FAMILY_ID["flat"]] = 0.5
    return out


def texture_lookup(
    family: torch.Tensor,
    tex_a: torch.Tensor,
    tex_b: torch.Tensor,
    footprint: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
) -> torch.Tensor:
    """Texture value per pixel, 0.5 where the family is ``flat``.

    Args:
        family: ``(N, H, W)`` long family index.
        tex_a, tex_b: ``(N, H, W)`` surface coordinates (m).
        footprint: ``(N, H, W)`` size of a pixel on the surface (m).
        scale: ``(N, 1, 1)`` texels-per-metre multiplier; offset: ``(N, 2)`` texels.
    """
    t = tiles()
    density = TEXELS_PER_M * scale
    level = torch.log2((footprint * density).clamp_min(1.0)).long().clamp_(0, LEVELS - 1)
    # S is a power of two: "& (S - 1)" is the (non-negative) modulo, and cheaper
    a = (tex_a * density + offset[:, 0].view(-1, 1, 1)).long() & (S - 1)
    b = (tex_b * density + offset[:, 1].view(-1, 1, 1)).long() & (S - 1)
    flat = ((family * LEVELS + level) * S + a) * S + b
    return t.view(-1)[flat]
