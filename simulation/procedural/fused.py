"""The renderer's fused per-pixel passes: a C loop per pass (``_fused.c``), through ctypes.

``pip install`` builds ``_fused.c`` as an optional extension (``setup.py``); where no C
compiler is found the install still succeeds and :func:`available` is false, and the
renderer runs the tensor kernels of :mod:`.kernels` instead. Both compute the same
maths in float32; they differ only in the last bits of ``sin``/``exp``/``log2`` (see
``tests/test_fused.py`` for the bound), so the backend records which one rendered a
dataset (``ProceduralBackend.kernels``).

ctypes releases the GIL for the duration of each call; OpenMP splits a batch by frame
over ``threads`` (default: torch's intra-op thread count).
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
from functools import lru_cache

import numpy as np
import torch

from simulation.procedural.kernels import roll_theta
from simulation.sensor import _GAMMA, noise_bank, noise_offsets, radial_distance

#: Per-frame columns of the ``frame`` table handed to :func:`surfaces` (``_fused.c``).
FRAME_COLUMNS = (
    "cam_h",
    "c0",
    "ty",
    "a",
    "dash_phase",
    "left_edge",
    "right_edge",
    "sidewalk_width",
    "lane_width",
    "lanes",
    "frontage_left",
    "frontage_right",
    "block_len",
    "phase_left",
    "phase_right",
    "tex_off_u",
    "tex_off_v",
    "wetness",
    "deposits",
    "focal",
    "texture_strength",
    "texture_scale",
    "texture_off_a",
    "texture_off_b",
)
STREAK_SHAPE = (256, 512)  # the rain-streak fields' size in _fused.c

_P = ctypes.c_void_p
_I = ctypes.c_int
_F = ctypes.c_float


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled passes, or ``None`` where the extension was not built."""
    try:
        spec = importlib.util.find_spec("simulation.procedural._fused")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith((".so", ".pyd", ".dylib")):
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    lib.s2r_surfaces.restype = None
    lib.s2r_surfaces.argtypes = [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _F, _P, _P, _I]
    lib.s2r_surfaces.argtypes += [_I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I]
    lib.s2r_shade.restype = None
    lib.s2r_shade.argtypes = [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P]
    lib.s2r_shade.argtypes += [_P, _P, _P, _I]
    lib.s2r_sensor.restype = None
    lib.s2r_sensor.argtypes = [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _I, _I, _P, _I]
    lib.s2r_camera.restype = None
    lib.s2r_camera.argtypes = [_I, _I, _I, _P, _P, _F, _F, _F, _P, _F, _F, _F, _P, _I, _I, _P]
    lib.s2r_camera.argtypes += [_P, _P, _P, _I]
    lib.s2r_finish.restype = None
    lib.s2r_finish.argtypes = [_I, _I, _I, _P, _P, _P, _P, _P, _P, _I]
    lib.s2r_sprites.restype = None
    lib.s2r_sprites.argtypes = [_I, _I, _I, _I] + [_P] * 9 + [_P, _I, _P, _I, _P, _P, _P, _I]
    lib.s2r_sprites.argtypes += [_P, _I, _P, _P, _P, _P, _P, _P, _P]
    lib.s2r_isa.restype = _I
    lib.s2r_isa.argtypes = [_I]
    return lib


def available() -> bool:
    """Whether the compiled passes can run here."""
    return library() is not None


ISA_NAMES = ("baseline", "avx2", "avx512")


def isa(limit: str | None = None) -> str:
    """The instruction set the vectorized passes run with: the widest this CPU has
    (``baseline`` x86-64, ``avx2`` or ``avx512``), at most ``limit`` when given (for
    the rest of the process). All of them write the same bytes."""
    if limit is not None and limit not in ISA_NAMES:
        raise ValueError(f"expected one of {ISA_NAMES}, got {limit!r}")
    if library() is None:
        raise RuntimeError("the compiled passes were not built: no instruction set to choose")
    return ISA_NAMES[library().s2r_isa(-1 if limit is None else ISA_NAMES.index(limit))]


def resolve_kernels(kernels: str, compile: bool = False) -> str:
    """``backend.kernels`` (``auto``, ``fused`` or ``torch``) as the passes that will run."""
    if kernels not in ("auto", "fused", "torch"):
        raise ValueError(f"backend.kernels: expected auto, fused or torch, got {kernels!r}")
    if kernels == "fused" and compile:
        raise ValueError(
            "backend.compile: torch.compile applies to the tensor kernels only; "
            "set backend.kernels=torch with it, or drop backend.compile"
        )
    if kernels == "auto":
        return "fused" if available() and not compile else "torch"
    if kernels == "fused" and not available():
        raise ValueError(
            "backend.kernels: fused needs the compiled passes (simulation/procedural/_fused.c), "
            "which this install lacks: `pip install` found no C compiler. Use "
            "backend.kernels=auto or torch, or reinstall with a C compiler"
        )
    return kernels


def _ptr(t: torch.Tensor, dtype: torch.dtype) -> int:
    if t.dtype != dtype or not t.is_contiguous():
        raise TypeError(f"expected a contiguous {dtype} tensor, got {t.dtype}")
    return t.data_ptr()


def surfaces(
    dx: torch.Tensor,
    yw: torch.Tensor,
    zw: torch.Tensor,
    frame: torch.Tensor,
    kind: torch.Tensor,
    top: torch.Tensor,
    color: torch.Tensor,
    classes: torch.Tensor,
    palette: torch.Tensor,
    texture: float,
    noise: torch.Tensor,
    tiles: torch.Tensor,
    appearance: bool,
    family: torch.Tensor,
    tints: torch.Tensor,
    threads: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pass 1: ground, frontages, albedo, puddles and appearance textures.

    Args:
        dx: ``(N, W)``; yw, zw: ``(N, H)`` ray components (float32).
        frame: ``(N, len(FRAME_COLUMNS))`` float32 per-frame scalars.
        kind, color: ``(N, 2, NUM_BLOCKS)`` int32; top: the same shape, float32 (m).
        classes: ``(7,)`` int32 taxonomy indices (road, sidewalk, terrain, building,
            vegetation, fence, sky); palette: ``(NUM_MATERIALS, 3)``.
        noise: ``(256, 256)`` value noise; tiles: ``(F, LEVELS, 256, 256)`` texture tiles.
        appearance: apply ``family`` ``(N, NUM_MATERIALS)`` int32 and ``tints``
            ``(N, NUM_MATERIALS, 3)``.

    Returns:
        ``depth``, ``height``, ``emissive`` float32 and ``label``, ``surface``,
        ``puddle`` uint8, each ``(N, H, W)``, and ``albedo (N, H, W, 3)``.
    """
    n, h, w = dx.shape[0], yw.shape[1], dx.shape[1]
    f32, u8, i32 = torch.float32, torch.uint8, torch.int32
    out = {k: torch.empty(n, h, w) for k in ("depth", "height", "emissive")}
    out.update({k: torch.empty(n, h, w, dtype=u8) for k in ("label", "surface", "puddle")})
    out["albedo"] = torch.empty(n, h, w, 3)
    library().s2r_surfaces(
        n,
        h,
        w,
        _ptr(dx, f32),
        _ptr(yw, f32),
        _ptr(zw, f32),
        _ptr(frame, f32),
        _ptr(kind, i32),
        _ptr(top, f32),
        _ptr(color, i32),
        _ptr(classes, i32),
        _ptr(palette, f32),
        float(texture),
        _ptr(noise, f32),
        _ptr(tiles, f32),
        int(tiles.shape[1]),
        int(bool(appearance)),
        _ptr(family, i32),
        _ptr(tints, f32),
        *(out[k].data_ptr() for k in ("depth", "label", "surface", "height", "emissive")),
        out["albedo"].data_ptr(),
        out["puddle"].data_ptr(),
        threads or torch.get_num_threads(),
    )
    return out


def shade(
    dx: torch.Tensor,
    yw: torch.Tensor,
    zw: torch.Tensor,
    wx: torch.Tensor,
    light_k: torch.Tensor,
    noise: torch.Tensor,
    buffers: dict[str, torch.Tensor],
    streaks: torch.Tensor,
    streak: torch.Tensor,
    threads: int | None = None,
) -> torch.Tensor:
    """Pass 2: light, sky, reflections, night lights, fog, exposure and rain streaks.

    Args:
        dx, yw, zw: as :func:`surfaces`; wx: ``(N, len(WEATHER_COLUMNS))``;
            light_k: ``(N, 2)`` sun and ambient factors.
        buffers: :func:`surfaces`'s output after the sprites were drawn into it.
        streaks: ``(3, 256, 512)`` rain-streak fields; streak: ``(N, 3)`` int32 field
            index (-1 without rain), row and column offset.

    Returns:
        ``(N, 3, H, W)`` float32 in [0, 1].
    """
    n, h, w = dx.shape[0], yw.shape[1], dx.shape[1]
    f32, u8 = torch.float32, torch.uint8
    if tuple(streaks.shape[1:]) != STREAK_SHAPE:
        raise ValueError(f"expected rain-streak fields of {STREAK_SHAPE}, got {streaks.shape}")
    out = torch.empty(n, 3, h, w)
    library().s2r_shade(
        n,
        h,
        w,
        _ptr(dx, f32),
        _ptr(yw, f32),
        _ptr(zw, f32),
        _ptr(wx, f32),
        _ptr(light_k, f32),
        _ptr(noise, f32),
        _ptr(buffers["albedo"], f32),
        _ptr(buffers["surface"], u8),
        _ptr(buffers["emissive"], f32),
        _ptr(buffers["depth"], f32),
        _ptr(buffers["height"], f32),
        _ptr(buffers["puddle"], u8),
        _ptr(streaks, f32),
        _ptr(streak, torch.int32),
        out.data_ptr(),
        threads or torch.get_num_threads(),
    )
    return out


def sensor(images: torch.Tensor, sensors, keys, threads: int | None = None) -> torch.Tensor:
    """:func:`simulation.sensor.apply_sensor_effects` in one pass, in place.

    Each frame is blurred with its own kernel radius (``ceil(3 sigma)``; the tensor
    version uses the batch's largest), so a frame never depends on its batch.

    Args:
        images: ``(N, 3, H, W)`` contiguous float32 in [0, 1], overwritten.
        sensors: ``N`` :class:`~simulation.randomization.Sensor`; keys: ``N`` ``(seed,
            index)`` pairs that fix each frame's noise crop.
    """
    n, _, h, w = images.shape
    col = lambda name: torch.tensor([getattr(s, name) for s in sensors], dtype=torch.float32)  # noqa: E731
    exposure = torch.pow(2.0, col("exposure_ev") / _GAMMA).contiguous()
    rd2 = (radial_distance(h, w) ** 2).contiguous()
    bank = noise_bank(h, w)
    crop = torch.tensor(noise_offsets(keys), dtype=torch.int32).view(n, 3)
    sigma, vig, std = col("blur_sigma_px"), col("vignetting"), col("noise_std")
    library().s2r_sensor(
        n,
        h,
        w,
        _ptr(images, torch.float32),
        _ptr(sigma, torch.float32),
        _ptr(vig, torch.float32),
        _ptr(exposure, torch.float32),
        _ptr(std, torch.float32),
        _ptr(rd2, torch.float32),
        _ptr(bank, torch.float32),
        int(bank.shape[1]),
        int(bank.shape[2]),
        _ptr(crop, torch.int32),
        threads or torch.get_num_threads(),
    )
    return images


def finish(
    images: torch.Tensor, labels: torch.Tensor, angles: torch.Tensor, threads: int | None = None
):
    """The last pass: the camera's roll and the image as bytes.

    Frames are rotated by ``angles (N,)`` (rad), the image bilinearly, the labels by
    nearest neighbour with 255 where the rotated view leaves the original one; then the
    image, clamped to [0, 1], is stored as ``round(255 v)``.

    Args:
        images: ``(N, 3, H, W)`` float32; labels: ``(N, H, W)`` uint8.

    Returns:
        ``(images (N, H, W, 3) uint8, labels (N, H, W) uint8)``, new tensors.
    """
    n, _, h, w = images.shape
    theta = roll_theta(angles, h, w)
    rolled = (angles != 0).to(torch.uint8).contiguous()
    out = torch.empty(n, h, w, 3, dtype=torch.uint8)
    out_labels = torch.empty_like(labels)
    library().s2r_finish(
        n,
        h,
        w,
        _ptr(images, torch.float32),
        _ptr(labels, torch.uint8),
        _ptr(theta, torch.float32),
        _ptr(rolled, torch.uint8),
        out.data_ptr(),
        out_labels.data_ptr(),
        threads or torch.get_num_threads(),
    )
    return out, out_labels


def sprites(
    sprites,
    depth: np.ndarray,
    label: np.ndarray,
    albedo: np.ndarray,
    emissive: np.ndarray,
    fixed_colors: np.ndarray,
    decal: bool = False,
    tile: np.ndarray | None = None,
    upright: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """:func:`simulation.procedural.sprites.rasterize` as one compiled loop, in place:
    the same arguments, the same arithmetic and the same bytes.

    ``upright``: the ``(surface (N, H, W) uint8, height (N, H, W) float32)`` buffers of
    :func:`surfaces`; where an upright sprite moves the depth, ``S_UPRIGHT`` and 1.0 are
    written there (what the renderer otherwise derives by comparing the depth).
    """
    from simulation.procedural import sprites as sp

    n, h, w = depth.shape
    surface, height = upright if upright is not None else (None, None)
    for name, buf, dtype in (
        ("depth", depth, np.float32),
        ("label", label, np.uint8),
        ("albedo", albedo, np.float32),
        ("emissive", emissive, np.float32),
        ("surface", surface, np.uint8),
        ("height", height, np.float32),
    ):
        if buf is None:
            continue
        if buf.dtype != dtype or not buf.flags.c_contiguous:
            raise TypeError(f"{name}: expected a C-contiguous {np.dtype(dtype)} array")
    count = len(sprites.frame)
    if count == 0:
        return

    def arr(values, dtype):
        return np.ascontiguousarray(values, dtype=dtype)

    cols = {
        "frame": arr(sprites.frame, np.int64),
        "u0": arr(sprites.u0, np.float64),
        "v0": arr(sprites.v0, np.float64),
        "w": arr(sprites.w, np.float64),
        "h": arr(sprites.h, np.float64),
        "depth": arr(sprites.depth, np.float32),
        "template": arr(sprites.template, np.int64),
        "label": arr(sprites.label, np.uint8),
        "color": arr(sprites.color, np.float32).reshape(count, 3),
    }
    texture = None if sprites.texture is None else arr(sprites.texture, np.float32)
    tile = None if tile is None else arr(tile, np.float32)
    best = np.empty((n, h, w), np.float32) if decal else None
    tables = _sprite_tables()
    ptr = lambda a: None if a is None else a.ctypes.data  # noqa: E731
    library().s2r_sprites(
        n,
        h,
        w,
        count,
        *(ptr(cols[k]) for k in ("frame", "u0", "v0", "w", "h", "depth", "template", "label")),
        ptr(cols["color"]),
        ptr(texture),
        int(bool(decal)),
        ptr(tables["templates"]),
        sp.T,
        ptr(tables["coloured"]),
        ptr(tables["emits"]),
        ptr(arr(fixed_colors, np.float32)),
        sp.CANOPY,
        ptr(tile),
        0 if tile is None else int(tile.shape[0]),
        *(ptr(b) for b in (depth, label, albedo, emissive, best, surface, height)),
    )


@lru_cache(maxsize=1)
def _sprite_tables() -> dict[str, np.ndarray]:
    """The sprite module's templates and part tables as the C loop reads them."""
    from simulation.procedural import sprites as sp

    coloured = np.full(sp.NUM_PARTS, -1.0, np.float32)
    for part, factor in sp.SPRITE_COLOURED.items():
        coloured[part] = factor
    emits = np.zeros(sp.NUM_PARTS, np.uint8)
    emits[list(sp.EMISSIVE_PARTS)] = 1
    templates = np.ascontiguousarray(sp.TEMPLATES, dtype=np.uint8)
    if templates.shape[1:] != (sp.T, sp.T) or int(sp.TEMPLATES.max()) >= sp.NUM_PARTS:
        raise ValueError(f"expected (K, {sp.T}, {sp.T}) templates of parts < {sp.NUM_PARTS}")
    return {"coloured": coloured, "emits": emits, "templates": templates}


def has_camera_effects(style) -> bool:
    """Whether ``style`` has any camera step (the ``sim`` style has none)."""
    steps = ("white_balance", "lens_blur_px", "chromatic_aberration_px", "vignetting")
    steps += ("response", "shot_noise", "read_noise", "jpeg_quality")
    return any(getattr(style, k) > 0 for k in steps)


def camera(images: torch.Tensor, style, keys, threads: int | None = None) -> torch.Tensor:
    """:func:`simulation.procedural.camera_effects.apply` in one pass, in place.

    Args:
        images: ``(N, 3, H, W)`` contiguous float32 in [0, 1], overwritten.
        style: the :class:`~simulation.procedural.styles.Style`; keys: ``N`` ``(seed,
            index)`` pairs (white balance error, noise crop).
    """
    from simulation.procedural import camera_effects as ce

    n, _, h, w = images.shape
    if not has_camera_effects(style):
        return images
    gains = ce.white_balance_gains(style, keys) if style.white_balance > 0 else None
    shift = style.chromatic_aberration_px
    ca_k = shift / (0.5 * math.hypot(h, w)) if shift > 0 else 0.0
    bank = noise_bank(h, w)
    crop = torch.tensor(noise_offsets(ce.noise_keys(keys)), dtype=torch.int32).view(n, 3)
    rd2 = (radial_distance(h, w) ** 2).contiguous()
    luma = chroma = None
    if style.jpeg_quality > 0:
        luma, chroma = (t.contiguous() for t in ce.jpeg_tables(style.jpeg_quality))
    basis = ce.dct_basis().contiguous()
    library().s2r_camera(
        n,
        h,
        w,
        _ptr(images, torch.float32),
        None if gains is None else _ptr(gains, torch.float32),
        float(style.lens_blur_px),
        float(ca_k),
        float(style.vignetting),
        _ptr(rd2, torch.float32),
        float(style.response),
        float(style.shot_noise**2),
        float(style.read_noise**2),
        _ptr(bank, torch.float32),
        int(bank.shape[1]),
        int(bank.shape[2]),
        _ptr(crop, torch.int32),
        None if luma is None else _ptr(luma, torch.float32),
        None if chroma is None else _ptr(chroma, torch.float32),
        _ptr(basis, torch.float32),
        threads or torch.get_num_threads(),
    )
    return images
