"""Per-pixel kernels of the procedural renderer: pure functions of tensors only.

Keeping them free of Python objects lets ``torch.compile`` fuse their many
element-wise steps into a few loops (the renderer's ``compile`` option); eager mode
runs the very same code. Shapes: ``N`` frames of ``H x W`` pixels; per-frame scalars
are ``(N, 1, 1)``; ray components are ``dx (N, 1, W)``, ``yw, zw (N, H, 1)`` (camera at
the origin, x right, y up, z along the road).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

FAR = 1.0e4  # depth (m) of the sky
NUM_BLOCKS = 16
# Block kinds of the frontages (see layout.py).
BUILDING, TREES = 1, 2
# Materials: indices into each frame's palette.
M_SKY, M_ROAD, M_MARK, M_SIDEWALK, M_TERRAIN, M_FENCE, M_WINDOW = range(7)
M_BUILDING = 7  # .. 12, six facade colours
M_VEG = 13  # .. 15, three vegetation shades
NUM_MATERIALS = 16
#: The :data:`~simulation.randomization.SURFACES` index of each material (-1: none), which
#: decides its texture family and tint.
MATERIAL_SURFACE = (-1, 0, -1, 1, 4, 5, -1, 2, 2, 2, 2, 2, 2, 3, 3, 3)
# Surfaces for lighting: their normals decide the sun's contribution.
S_SKY, S_GROUND, S_LEFT, S_RIGHT, S_UPRIGHT = range(5)
#: Order of the weather columns handed to :func:`shade` (fields of ``Weather``).
WEATHER_COLUMNS = (
    "cloudiness",
    "precipitation",
    "sun_azimuth_angle",
    "sun_altitude_angle",
    "fog_density",
    "fog_distance",
    "fog_falloff",
    "scattering_intensity",
    "mie_scattering_scale",
    "rayleigh_scattering_scale",
    "dust_storm",
    "wind_intensity",
    "wetness",
    "precipitation_deposits",
)


@lru_cache(maxsize=1)
def value_noise(size: int = 256) -> torch.Tensor:
    """``(size, size)`` tileable multi-octave value noise in [0, 1] (fixed, seedless)."""
    gen = torch.Generator().manual_seed(0x7E47)
    out = torch.zeros(size, size)
    amp, total = 1.0, 0.0
    for cells in (4, 8, 16, 32, 64):
        grid = torch.rand(1, 1, cells, cells, generator=gen)
        grid = torch.cat([grid, grid[..., :1, :]], dim=2)
        grid = torch.cat([grid, grid[..., :, :1]], dim=3)  # wrap for tiling
        up = F.interpolate(
            grid, size=(size + size // cells,) * 2, mode="bilinear", align_corners=True
        )
        out += amp * up[0, 0, :size, :size]
        total += amp
        amp *= 0.6
    out /= total
    return (out - out.min()) / (out.max() - out.min())


def smoothstep(e0: float, e1: float, x: torch.Tensor) -> torch.Tensor:
    t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def rays(f: torch.Tensor, pitch: torch.Tensor, height: int, width: int):
    """Ray components for focal lengths ``f`` (px) and pitches (rad), both ``(N, 1, 1)``."""
    u = (torch.arange(width, dtype=torch.float32) + 0.5 - width / 2).view(1, 1, width)
    v = (torch.arange(height, dtype=torch.float32) + 0.5 - height / 2).view(1, height, 1)
    dx = u / f
    up = -v / f
    cp, sp = torch.cos(pitch), torch.sin(pitch)
    return dx, up * cp + sp, cp - up * sp


def roll_theta(angles: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(N, 2, 3)`` affine matrices (normalized image coordinates) rotating frames by
    their roll ``angles (N,)`` (rad), the aspect ratio kept."""
    c, s = torch.cos(angles), torch.sin(angles)
    aspect = height / width
    theta = torch.zeros(len(angles), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = c, -s * aspect
    theta[:, 1, 0], theta[:, 1, 1] = s / aspect, c
    return theta


def plane_depth(a: torch.Tensor, q: torch.Tensor, cc: torch.Tensor) -> torch.Tensor:
    """Smallest positive root ``z`` of ``a z^2 - q z + cc = 0`` (``FAR`` where none).

    The frontage plane at lateral offset ``E`` of a road bending as
    ``c(z) = c0 + ty z + a z^2`` meets a ray of lateral slope ``s`` where this holds,
    with ``q = s - ty`` and ``cc = c0 + E`` (mirrored for the left side).
    """
    disc = q * q - 4.0 * a * cc
    z = 2.0 * cc / (q + torch.sqrt(disc.clamp_min(0.0)))
    ok = (disc >= 0) & (q > 0) & (z > 0.05)
    return torch.where(ok, z, FAR)


def background(
    dx,
    yw,
    zw,
    cam_h,
    c0,
    ty,
    a,
    dash_phase,
    le,
    re,
    sw,
    lw,
    lanes,
    frontage,
    blen,
    phase,
    kind,
    top,
    color,
    classes: tuple[int, ...],
):
    """Ground and frontages: the nearest surface per pixel.

    Args:
        dx, yw, zw: ray components.
        cam_h: camera height (m); c0, ty, a: road centre ``c(z) = c0 + ty z + a z^2`` (m).
        dash_phase: lane-dash phase (m); le, re: road edges (m); sw: sidewalk width (m);
            lw: lane width (m); lanes: lane count; all ``(N, 1, 1)``.
        frontage: ``(N, 2)`` lateral offsets (m) of the left and right frontage planes.
        blen: ``(N, 1, 1)`` block length (m); phase: ``(N, 2)`` block phase (m).
        kind, top, color: ``(N, 2, NUM_BLOCKS)`` block kind, top height (m), colour index.
        classes: taxonomy indices of road, sidewalk, terrain, building, vegetation,
            fence, sky.

    Returns:
        ``depth`` (m ahead), ``label`` uint8, ``material`` long, ``surface`` uint8,
        ``height`` (m above ground), texture coordinates ``tex_u``, ``tex_v`` (m) and the
        night ``emissive`` weight of lit windows, each ``(N, H, W)``.
    """
    road, sidewalk, terrain, building, vegetation, fence, sky = classes
    n, h, w = dx.shape[0], yw.shape[1], dx.shape[2]
    # --- ground: road, markings, sidewalks, verges
    t = cam_h / (-yw).clamp_min(1e-4)
    zg_col = t * zw
    ground = ((yw < -1e-4) & (zg_col < 400.0)).expand(n, h, w)
    zg = zg_col.expand(n, h, w)
    e = t * dx - (c0 + ty * zg_col + a * zg_col * zg_col)  # lateral offset from lane centre
    on_road = (e >= le) & (e <= re)
    on_walk = ((e >= le - sw) & (e < le)) | ((e > re) & (e <= re + sw))
    frac = (e - le) / lw
    near = frac.round()
    line = ((frac - near).abs() * lw < 0.075) & (near >= 1) & (near <= lanes - 1)
    line = line & (torch.remainder(zg + dash_phase, 9.0) < 3.0)
    line = line | ((e - le).abs() < 0.1) | ((e - re).abs() < 0.1)
    mat_g = torch.where(
        on_road, torch.where(line, M_MARK, M_ROAD), torch.where(on_walk, M_SIDEWALK, M_TERRAIN)
    )
    lab_g = torch.where(on_road, road, torch.where(on_walk, sidewalk, terrain))
    depth = torch.where(ground, zg, FAR)
    label = torch.where(ground, lab_g, sky)
    material = torch.where(ground, mat_g, M_SKY)
    surface = torch.where(ground, S_GROUND, S_SKY)
    height = torch.where(ground, 0.0, 50.0)
    tex_u = torch.where(ground, e, 0.0)
    tex_v = torch.where(ground, zg, 0.0)
    emissive = torch.zeros(n, h, w)

    # --- frontages: buildings, tree lines, fences on both sides
    slope = dx / zw.clamp_min(1e-3)  # lateral metres per metre ahead
    for side in (0, 1):
        fr = frontage[:, side].view(n, 1, 1)
        if side == 1:
            z = plane_depth(a, slope - ty, c0 + fr)
        else:
            z = plane_depth(-a, ty - slope, -fr - c0)
        y = cam_h + z / zw.clamp_min(1e-3) * yw  # height of the hit (m)
        ph = phase[:, side].view(n, 1, 1)
        bi_f = torch.floor((z + ph) / blen)
        inside = (bi_f >= 0) & (bi_f < NUM_BLOCKS)
        bi = bi_f.clamp(0, NUM_BLOCKS - 1).long().view(n, -1)
        k = kind[:, side].gather(1, bi).view(n, h, w)
        tp = top[:, side].gather(1, bi).view(n, h, w)
        col = color[:, side].gather(1, bi).view(n, h, w)
        is_b, is_t = k == BUILDING, k == TREES
        tp = torch.where(is_t, tp + 1.2 * torch.sin(z * 1.7 + col), tp)  # ragged tree line
        hit = inside & (k != 0) & (y >= 0) & (y < tp) & (z < depth)
        zz = torch.remainder(z + ph, 3.2)
        yy = torch.remainder(y, 3.0)
        window = is_b & (zz > 0.7) & (zz < 2.4) & (yy > 1.0) & (yy < 2.2) & (y > 1.5)
        window = window & (y < tp - 0.8)
        mat = torch.where(
            is_b,
            torch.where(window, M_WINDOW, M_BUILDING + col),
            torch.where(is_t, M_VEG + col % 3, M_FENCE),
        )
        lab = torch.where(is_b, building, torch.where(is_t, vegetation, fence))
        depth = torch.where(hit, z, depth)
        label = torch.where(hit, lab, label)
        material = torch.where(hit, mat, material)
        surface = torch.where(hit, S_LEFT if side == 0 else S_RIGHT, surface)
        height = torch.where(hit, y, height)
        tex_u = torch.where(hit, y, tex_u)
        tex_v = torch.where(hit, z + 37.0 * side, tex_v)
        # at night some windows are lit: a fixed pseudo-random pattern per window
        cell = torch.floor((z + ph) / 3.2) * 12.9898 + torch.floor(y / 3.0) * 78.233 + col * 3.1
        lit = window & hit & (torch.frac(torch.sin(cell) * 43758.5) > 0.55)
        emissive = torch.where(lit, 1.0, emissive)
    return (
        depth,
        label.to(torch.uint8),
        material,
        surface.to(torch.uint8),
        height,
        tex_u,
        tex_v,
        emissive,
    )


def albedo(palette, material, tex_u, tex_v, tex_off, texture: float, wetness, deposits, noise):
    """Surface colour before lighting and the puddle mask.

    Args:
        palette: ``(NUM_MATERIALS, 3)`` colours; material: ``(N, H, W)`` long.
        tex_u, tex_v: texture coordinates (m); tex_off: ``(N, 2)`` per-frame offsets.
        texture: strength of the surface texture (0 = flat).
        wetness, deposits: ``(N, 1, 1)`` in [0, 1]; noise: ``(S, S)`` value noise.

    Returns:
        ``albedo (N, H, W, 3)`` and ``puddle (N, H, W) bool``.
    """
    size = noise.shape[0]
    out = palette[material]
    ou, ov = tex_off[:, 0].view(-1, 1, 1), tex_off[:, 1].view(-1, 1, 1)
    mod = torch.ones_like(tex_u)
    if texture > 0:
        fine = noise[(tex_v * 9.0 + ov).long() % size, (tex_u * 9.0 + ou).long() % size]
        coarse = noise[(tex_v * 1.3).long() % size, (tex_u * 1.3).long() % size]
        mod = 1.0 + texture * ((fine - 0.5) * 1.2 + (coarse - 0.5) * 0.8)
        mod = torch.where(material == M_SKY, 1.0, mod)
    paved = (material == M_ROAD) | (material == M_MARK) | (material == M_SIDEWALK)
    pud = noise[(tex_v * 0.7 + ov).long() % size, (tex_u * 0.7 + ou).long() % size]
    puddle = paved & (pud < deposits * 0.55)
    # wet paving darkens; puddles darken more (they reflect the sky in shade())
    mod = mod * (1.0 - 0.45 * wetness * paved - 0.35 * puddle)
    return out * mod.unsqueeze(-1), puddle


def _light_terms(wx: torch.Tensor):
    """Per-frame terms both the sky and the shading use, each ``(N,)``: the weather
    columns by name, sun altitude and azimuth (rad), cloud and rain in [0, 1], daylight
    (0 at night, 1 by day) and warmth of the light (0 at the horizon, 1 high up)."""
    col = {name: wx[:, i] for i, name in enumerate(WEATHER_COLUMNS)}
    alt = torch.deg2rad(col["sun_altitude_angle"])
    az = torch.deg2rad(col["sun_azimuth_angle"])
    day = smoothstep(-6.0, 20.0, col["sun_altitude_angle"])
    warm = smoothstep(0.0, 40.0, col["sun_altitude_angle"])
    return col, alt, az, col["cloudiness"] / 100.0, col["precipitation"] / 100.0, day, warm


def sky(dx, yw, zw, wx, noise):
    """``(N, H, W, 3)`` sky: gradient, clouds, sun glow; ``wx`` is ``(N, len(WEATHER_COLUMNS))``."""
    n, h, w = dx.shape[0], yw.shape[1], dx.shape[2]
    col, alt, az, cloud, rain, day, warm = _light_terms(wx)
    norm = torch.sqrt(dx * dx + yw * yw + zw * zw)
    el = (yw / torch.sqrt(yw * yw + zw * zw)).clamp(-1, 1)  # (N, H, 1)
    blue = (2.5 * col["rayleigh_scattering_scale"] / 0.0331).clamp_min(0.3)
    ones = torch.ones(n)
    zen_day = torch.stack([0.25 / blue, 0.45 * ones, 0.85 * ones], -1)
    hor_day = torch.stack([0.95 - 0.2 * warm, 0.68 + 0.1 * warm, 0.5 + 0.35 * warm], -1)
    night_col = torch.tensor([0.02, 0.03, 0.07])
    zen = zen_day * day[:, None] + night_col * (1 - day[:, None])
    hor = hor_day * day[:, None] + night_col * 1.5 * (1 - day[:, None])
    grey = torch.tensor([0.72, 0.73, 0.75]) * (0.15 + 0.85 * day[:, None])
    overcast = (cloud * 0.6 + rain * 0.4).clamp(0, 1)[:, None]
    zen = zen * (1 - overcast) + grey * 0.85 * overcast
    hor = hor * (1 - overcast) + grey * overcast
    tt = el.clamp_min(0).sqrt()[..., None]  # (N, H, 1, 1)
    out = hor[:, None, None, :] * (1 - tt) + zen[:, None, None, :] * tt  # (N, H, 1, 3)
    # sun glow (Mie scattering), only where the sun is up
    sx, sy, sz = torch.cos(alt) * torch.sin(az), torch.sin(alt), torch.cos(alt) * torch.cos(az)
    cos_a = (dx * sx.view(n, 1, 1) + yw * sy.view(n, 1, 1) + zw * sz.view(n, 1, 1)) / norm
    mie = (col["mie_scattering_scale"] / 0.03).view(n, 1, 1)
    glow = mie * 0.35 * torch.exp((cos_a - 1.0) * 25.0) * (1 - cloud.view(n, 1, 1) * 0.8)
    glow = glow * (sy > -0.05).float().view(n, 1, 1)
    out = out + glow[..., None] * torch.tensor([1.0, 0.85, 0.6])
    # clouds projected on a plane high up, stretched by the wind
    up = yw.clamp_min(0.02)
    wind = (1.0 + col["wind_intensity"] / 40.0).view(n, 1, 1)
    size = noise.shape[0]
    cu = ((dx / up) * 40.0 / wind).long() % size
    cv = ((zw / up) * 40.0).expand(n, h, w).long() % size
    cover = smoothstep(0.0, 0.25, noise[cv, cu] - (1.0 - cloud.view(n, 1, 1)) * 0.9) * (el > 0)
    cloud_col = torch.tensor([0.92, 0.92, 0.94]) * (0.12 + 0.88 * day.view(n, 1, 1, 1))
    out = out * (1 - cover[..., None]) + cloud_col * cover[..., None]
    return out.clamp(0.0, 1.0)


def shade(
    albedo_, surface, emissive, depth, height, puddle, dx, yw, zw, wx, streak, noise, light_k
):
    """Light, sky, reflections, night lights, fog/haze/dust and rain streaks.

    Args:
        albedo_: ``(N, H, W, 3)``; surface uint8; emissive, depth (m), height (m) and
            streak (rain-streak intensity) ``(N, H, W)``; puddle bool ``(N, H, W)``.
        wx: ``(N, len(WEATHER_COLUMNS))`` weather values.
        light_k: ``(N, 2)`` factors of the direct sun and the ambient light.

    Returns:
        ``(N, H, W, 3)`` float in [0, 1].
    """
    n, h = albedo_.shape[0], albedo_.shape[1]
    col, alt, az, cloud, rain, day, warm = _light_terms(wx)
    ones = torch.ones(n)
    sun_col = torch.stack([ones, 0.55 + 0.42 * warm, 0.3 + 0.62 * warm], -1)
    amb_col = torch.stack([0.55 + 0.2 * day, 0.62 + 0.23 * day, ones], -1)
    amb = (0.1 + 0.42 * day * (1.0 - 0.3 * cloud) * (1.0 - 0.3 * rain)) * light_k[:, 1]
    sun = 0.75 * day * (1.0 - 0.85 * cloud) * (1.0 - 0.6 * rain) * light_k[:, 0]
    sx, sy, sz = torch.cos(alt) * torch.sin(az), torch.sin(alt), torch.cos(alt) * torch.cos(az)
    zero = torch.zeros(n)
    lambert = torch.stack(
        [
            zero,
            sy.clamp_min(0),
            sx.clamp_min(0),
            (-sx).clamp_min(0),
            (-sz).clamp_min(0) * 0.8 + 0.2 * sy.clamp_min(0),
        ],
        -1,
    )  # (N, 5): sky, ground, left facade, right facade, upright objects
    light = (
        amb[:, None, None] * amb_col[:, None, :]
        + (sun[:, None] * lambert)[..., None] * (sun_col[:, None, :])
    )  # (N, 5, 3)
    light = light.reshape(n * 5, 3)
    idx = surface.long() + (torch.arange(n) * 5).view(n, 1, 1)
    lit = albedo_ * light[idx]
    sky_rgb = sky(dx, yw, zw, wx, noise)
    is_sky = (surface == S_SKY).unsqueeze(-1)
    lit = torch.where(is_sky, sky_rgb, lit)
    # wet roads and puddles mirror the sky near the horizon
    horizon = sky_rgb[:, h // 2 - 1 : h // 2].mean(dim=2, keepdim=True)  # (N, 1, 1, 3)
    wet = (col["wetness"] / 100.0).view(n, 1, 1)
    refl = (0.12 * wet * (surface == S_GROUND) + 0.25 * puddle).unsqueeze(-1)
    lit = lit * (1 - refl) + horizon * refl
    # at night lamps, vehicle lights and lit windows glow, and our headlights light the
    # road ahead: a pool fading with distance and with the angle off the axis
    night = (1.0 - day).view(n, 1, 1, 1)
    warm_light = torch.tensor([1.0, 0.85, 0.55])
    lit = lit + emissive.unsqueeze(-1) * night * warm_light * 1.1
    beam = torch.exp(-depth / 25.0) * torch.exp(-((dx * 2.5) ** 2)) * (surface != S_SKY)
    lit = lit + albedo_ * (beam.unsqueeze(-1) * night * warm_light * 1.2)
    # fog (with height falloff), haze and dust fade with distance
    d = depth.clamp_max(300.0)
    k_fog = (col["fog_density"] / 100.0 * 0.09).view(n, 1, 1)
    falloff = torch.exp(-col["fog_falloff"].view(n, 1, 1) * height.clamp_min(0) / 10.0)
    beyond = (d - col["fog_distance"].view(n, 1, 1)).clamp_min(0)
    fog = (1.0 - torch.exp(-k_fog * beyond * falloff)).unsqueeze(-1)
    haze = 1.0 - torch.exp(-(0.0015 * col["scattering_intensity"]).view(n, 1, 1) * d)
    dust = 1.0 - torch.exp(-(col["dust_storm"] / 100.0 * 0.04).view(n, 1, 1) * d)
    level = (amb + 0.5 * sun).view(n, 1, 1, 1)
    fog_col = torch.tensor([0.72, 0.74, 0.77]) * level * 1.4
    dust_col = torch.tensor([0.62, 0.48, 0.32]) * level * 1.4
    lit = lit + (horizon - lit) * haze.unsqueeze(-1)
    lit = lit + (fog_col - lit) * fog
    lit = lit + (dust_col - lit) * dust.unsqueeze(-1)
    # auto exposure: the camera gains up dark scenes (noise comes up with them later)
    luma = lit.mean(dim=(1, 2, 3))
    gain = (0.4 / luma.clamp_min(1e-3)).clamp(1.0, 2.0).view(n, 1, 1, 1)
    lit = lit * gain
    # rain streaks in front of everything
    lit = lit + (streak * rain.view(n, 1, 1) * 0.2 * (0.3 + level.view(n, 1, 1))).unsqueeze(-1)
    return lit.clamp(0.0, 1.0)
