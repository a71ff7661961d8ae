"""Upright objects (vehicles, people, poles, signs, trees) as depth-tested sprites.

Each object is a screen rectangle filled from a small part template (body, glass,
tyres, lights, ...). All sprites of a whole batch are rasterized at once: their
pixels are enumerated with ``np.repeat``, a z-buffer keeps the nearest surface per
pixel (``np.minimum.at``), and only the winners write label and colour. Cost grows
with the number of covered pixels, not with sprites x image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulation.procedural.kernels import S_UPRIGHT

T = 32  # template resolution (T x T)

# Template parts. Part 0 is transparent.
BODY, GLASS, TYRE, TAIL, HEAD, SKIN, METAL, SIGN, CANOPY, TRUNK, LAMP, PANTS = range(1, 13)
NUM_PARTS = 13
#: Parts that emit light at night (tail lights, head lights, lamps).
EMISSIVE_PARTS = (TAIL, HEAD, LAMP)

TEMPLATE_NAMES = (
    "car_rear",
    "car_front",
    "van_rear",
    "van_front",
    "truck_rear",
    "truck_front",
    "bus_rear",
    "bus_front",
    "motorcycle",
    "bicycle",
    "pedestrian",
    "pole",
    "sign_disc",
    "sign_square",
    "tree",
    "lamp",
    # shapes added for structure randomization (ids above keep their values)
    *(
        f"car_{shape}_{side}"
        for shape in ("hatchback", "suv", "pickup", "compact")
        for side in ("rear", "front")
    ),
    *(f"pedestrian_{shape}" for shape in ("coat", "skirt", "backpack", "stride")),
    "tree_round",
    "tree_tall",
    "tree_leafless",
    *(f"distractor_{shape}" for shape in ("box", "disc", "triangle", "blob")),
)
TEMPLATE_ID = {n: i for i, n in enumerate(TEMPLATE_NAMES)}


def _grid() -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(T) + 0.5) / T
    return c[:, None], c[None, :]  # y (rows, 0 = top), x (cols)


def _box(t: np.ndarray, part: int, y0: float, y1: float, x0: float, x1: float) -> None:
    y, x = _grid()
    t[(y >= y0) & (y < y1) & (x >= x0) & (x < x1)] = part


def _ellipse(t: np.ndarray, part: int, cy: float, cx: float, ry: float, rx: float) -> None:
    y, x = _grid()
    t[((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0] = part


def _vehicle(
    cabin_top: float,
    glass: tuple[float, float],
    light: int,
    boxy: bool,
    inset: float | None = None,
    body_top: float = 0.45,
) -> np.ndarray:
    t = np.zeros((T, T), np.uint8)
    inset = (0.0 if boxy else 0.1) if inset is None else inset
    _box(t, BODY, cabin_top, 0.5, inset, 1.0 - inset)  # cabin
    _box(t, BODY, body_top, 0.88, 0.0, 1.0)  # lower body
    if glass[1] > glass[0]:
        _box(t, GLASS, glass[0], glass[1], inset + 0.08, 1.0 - inset - 0.08)
    _box(t, light, 0.52, 0.64, 0.03, 0.17)
    _box(t, light, 0.52, 0.64, 0.83, 0.97)
    _box(t, TYRE, 0.8, 1.0, 0.04, 0.2)
    _box(t, TYRE, 0.8, 1.0, 0.8, 0.96)
    return t


def _build_templates() -> np.ndarray:
    out = np.zeros((len(TEMPLATE_NAMES), T, T), np.uint8)
    for side, light in (("rear", TAIL), ("front", HEAD)):
        out[TEMPLATE_ID[f"car_{side}"]] = _vehicle(0.08, (0.14, 0.42), light, boxy=False)
        out[TEMPLATE_ID[f"van_{side}"]] = _vehicle(0.0, (0.08, 0.36), light, boxy=True)
        truck_glass = (0.0, 0.0) if side == "rear" else (0.06, 0.3)
        out[TEMPLATE_ID[f"truck_{side}"]] = _vehicle(0.0, truck_glass, light, boxy=True)
        out[TEMPLATE_ID[f"bus_{side}"]] = _vehicle(0.0, (0.08, 0.42), light, boxy=True)
    moto = np.zeros((T, T), np.uint8)
    _box(moto, BODY, 0.3, 0.72, 0.2, 0.8)
    _box(moto, TYRE, 0.6, 1.0, 0.38, 0.62)
    _box(moto, TAIL, 0.36, 0.46, 0.4, 0.6)
    out[TEMPLATE_ID["motorcycle"]] = moto
    bike = np.zeros((T, T), np.uint8)
    _box(bike, BODY, 0.3, 0.42, 0.1, 0.9)  # handlebar
    _box(bike, BODY, 0.3, 1.0, 0.44, 0.56)  # frame
    _box(bike, TYRE, 0.62, 1.0, 0.42, 0.58)
    out[TEMPLATE_ID["bicycle"]] = bike
    ped = np.zeros((T, T), np.uint8)
    _box(ped, BODY, 0.14, 0.56, 0.15, 0.85)
    _box(ped, PANTS, 0.56, 1.0, 0.24, 0.46)
    _box(ped, PANTS, 0.56, 1.0, 0.54, 0.76)
    _ellipse(ped, SKIN, 0.08, 0.5, 0.08, 0.2)
    out[TEMPLATE_ID["pedestrian"]] = ped
    out[TEMPLATE_ID["pole"]] = METAL
    disc = np.zeros((T, T), np.uint8)
    _ellipse(disc, SIGN, 0.5, 0.5, 0.5, 0.5)
    out[TEMPLATE_ID["sign_disc"]] = disc
    square = np.full((T, T), METAL, np.uint8)
    _box(square, SIGN, 0.08, 0.92, 0.08, 0.92)
    out[TEMPLATE_ID["sign_square"]] = square
    tree = np.zeros((T, T), np.uint8)
    _box(tree, TRUNK, 0.55, 1.0, 0.44, 0.56)
    _ellipse(tree, CANOPY, 0.32, 0.5, 0.32, 0.5)
    _ellipse(tree, CANOPY, 0.45, 0.3, 0.2, 0.3)
    _ellipse(tree, CANOPY, 0.45, 0.7, 0.2, 0.3)
    out[TEMPLATE_ID["tree"]] = tree
    out[TEMPLATE_ID["lamp"]] = LAMP
    _build_shapes(out)
    return out


def _line(t: np.ndarray, part: int, y0: float, x0: float, y1: float, x1: float, w: float):
    """A straight stroke of half-width ``w`` (template units) from (y0, x0) to (y1, x1)."""
    y, x = _grid()
    dy, dx = y1 - y0, x1 - x0
    u = (((y - y0) * dy + (x - x0) * dx) / (dy * dy + dx * dx)).clip(0, 1)
    t[np.hypot(y - y0 - u * dy, x - x0 - u * dx) <= w] = part


def _build_shapes(out: np.ndarray) -> None:
    """Car bodies, person silhouettes, street trees and distractor shapes."""
    for side, light in (("rear", TAIL), ("front", HEAD)):
        out[TEMPLATE_ID[f"car_hatchback_{side}"]] = _vehicle(0.02, (0.08, 0.42), light, False, 0.06)
        out[TEMPLATE_ID[f"car_suv_{side}"]] = _vehicle(0.0, (0.06, 0.34), light, True, 0.04, 0.4)
        pickup = _vehicle(0.1, (0.16, 0.4), light, False, 0.16, 0.5)
        out[TEMPLATE_ID[f"car_pickup_{side}"]] = pickup
        compact = np.zeros((T, T), np.uint8)  # photo only: a rounded small car
        _ellipse(compact, BODY, 0.5, 0.5, 0.42, 0.5)
        _box(compact, BODY, 0.5, 0.88, 0.02, 0.98)
        _ellipse(compact, GLASS, 0.32, 0.5, 0.16, 0.34)
        _box(compact, light, 0.5, 0.6, 0.06, 0.2)
        _box(compact, light, 0.5, 0.6, 0.8, 0.94)
        _box(compact, TYRE, 0.82, 1.0, 0.08, 0.24)
        _box(compact, TYRE, 0.82, 1.0, 0.76, 0.92)
        out[TEMPLATE_ID[f"car_compact_{side}"]] = compact
    for shape in ("coat", "skirt", "backpack", "stride"):
        ped = np.zeros((T, T), np.uint8)
        if shape == "coat":  # a long coat down to the knees
            _box(ped, BODY, 0.14, 0.78, 0.12, 0.88)
            _box(ped, PANTS, 0.78, 1.0, 0.28, 0.46)
            _box(ped, PANTS, 0.78, 1.0, 0.54, 0.72)
        elif shape == "skirt":  # a flared skirt
            _box(ped, BODY, 0.14, 0.5, 0.2, 0.8)
            y, x = _grid()
            flare = (y >= 0.5) & (y < 0.75) & (np.abs(x - 0.5) < 0.3 + 0.6 * (y - 0.5))
            ped[flare] = PANTS
            _box(ped, SKIN, 0.75, 1.0, 0.3, 0.42)
            _box(ped, SKIN, 0.75, 1.0, 0.58, 0.7)
        elif shape == "backpack":  # a bag on the side makes the silhouette wider
            _box(ped, BODY, 0.14, 0.56, 0.2, 0.75)
            _box(ped, PANTS, 0.3, 0.62, 0.75, 1.0)
            _box(ped, PANTS, 0.56, 1.0, 0.26, 0.46)
            _box(ped, PANTS, 0.56, 1.0, 0.52, 0.72)
        else:  # photo only: walking, legs apart, arms swinging
            _box(ped, BODY, 0.14, 0.55, 0.25, 0.75)
            _line(ped, BODY, 0.18, 0.3, 0.5, 0.05, 0.06)
            _line(ped, BODY, 0.18, 0.7, 0.5, 0.95, 0.06)
            _line(ped, PANTS, 0.55, 0.42, 1.0, 0.15, 0.09)
            _line(ped, PANTS, 0.55, 0.58, 1.0, 0.85, 0.09)
        _ellipse(ped, SKIN, 0.08, 0.5, 0.08, 0.2)
        out[TEMPLATE_ID[f"pedestrian_{shape}"]] = ped
    tree = np.zeros((T, T), np.uint8)  # trunk and a round crown
    _box(tree, TRUNK, 0.5, 1.0, 0.45, 0.55)
    _ellipse(tree, CANOPY, 0.3, 0.5, 0.3, 0.48)
    out[TEMPLATE_ID["tree_round"]] = tree
    tree = np.zeros((T, T), np.uint8)  # trunk and a tall oval crown
    _box(tree, TRUNK, 0.6, 1.0, 0.44, 0.56)
    _ellipse(tree, CANOPY, 0.35, 0.5, 0.35, 0.32)
    out[TEMPLATE_ID["tree_tall"]] = tree
    tree = np.zeros((T, T), np.uint8)  # leafless: trunk and branches (still vegetation)
    _line(tree, TRUNK, 1.0, 0.5, 0.35, 0.5, 0.045)
    for y0, x1, y1 in ((0.6, 0.12, 0.2), (0.55, 0.88, 0.15), (0.45, 0.25, 0.02), (0.4, 0.75, 0.0)):
        _line(tree, TRUNK, y0, 0.5, y1, x1, 0.025)
    _line(tree, TRUNK, 0.35, 0.5, 0.0, 0.48, 0.03)
    _line(tree, TRUNK, 0.3, 0.2, 0.05, 0.1, 0.02)
    _line(tree, TRUNK, 0.28, 0.8, 0.04, 0.92, 0.02)
    out[TEMPLATE_ID["tree_leafless"]] = tree
    out[TEMPLATE_ID["distractor_box"]] = BODY
    disc = np.zeros((T, T), np.uint8)
    _ellipse(disc, BODY, 0.5, 0.5, 0.5, 0.5)
    out[TEMPLATE_ID["distractor_disc"]] = disc
    y, x = _grid()
    out[TEMPLATE_ID["distractor_triangle"]] = np.where(np.abs(x - 0.5) <= 0.5 * y, BODY, 0)
    blob = np.zeros((T, T), np.uint8)
    for cy, cx, ry, rx in ((0.55, 0.4, 0.35, 0.35), (0.4, 0.65, 0.3, 0.3), (0.7, 0.7, 0.28, 0.25)):
        _ellipse(blob, BODY, cy, cx, ry, rx)
    out[TEMPLATE_ID["distractor_blob"]] = blob


TEMPLATES = _build_templates()


@dataclass
class Sprites:
    """``S`` screen-space sprites of a batch (all arrays have length ``S``).

    Attributes:
        frame: batch index of each sprite.
        u0, v0: top-left corner in pixels (float).
        w, h: size in pixels (float).
        depth: forward distance in metres (z-buffer value).
        template: index into :data:`TEMPLATES`.
        label: taxonomy index written for every opaque pixel.
        color: ``(S, 3)`` body colour in [0, 1].
        texture: ``(S,)`` strength of the foliage texture on canopy parts (None: none).
        decal: ``(S,)`` bool, sprites lying flat on the ground (None: none).
    """

    frame: np.ndarray
    u0: np.ndarray
    v0: np.ndarray
    w: np.ndarray
    h: np.ndarray
    depth: np.ndarray
    template: np.ndarray
    label: np.ndarray
    color: np.ndarray
    texture: np.ndarray | None = None
    decal: np.ndarray | None = None


def part_colors(style_colors: dict[int, tuple[float, float, float]]) -> np.ndarray:
    """``(NUM_PARTS, 3)`` fixed colours; parts coloured by the sprite are filled later."""
    table = np.zeros((NUM_PARTS, 3), np.float32)
    for part, col in style_colors.items():
        table[part] = col
    return table


#: Parts whose colour is the sprite's own colour times this factor.
SPRITE_COLOURED = {BODY: 1.0, SIGN: 1.0, CANOPY: 1.0, PANTS: 0.45}


def rank_in_frame(frame: np.ndarray) -> np.ndarray:
    """Each sprite's position among the sprites of its own frame (0, 1, ...), in order."""
    order = np.argsort(frame, kind="stable")
    ordered = frame[order]
    rank = np.empty(len(frame), np.int64)
    rank[order] = np.arange(len(frame)) - np.searchsorted(ordered, ordered, side="left")
    return rank


def rasterize(
    sprites: Sprites,
    depth: np.ndarray,
    label: np.ndarray,
    albedo: np.ndarray,
    emissive: np.ndarray,
    fixed_colors: np.ndarray,
    decal: bool = False,
    tile: np.ndarray | None = None,
    upright: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Draw ``sprites`` into the buffers in place, nearest surface winning per pixel.

    With ``decal`` the sprites lie flat on the ground: they pass the depth test but
    leave depth, label and emissive as they are (a decal takes the label of the
    surface it sits on). ``tile`` (``(S, S)`` in [0, 1], 0.5 flat) textures the canopy
    parts of sprites whose ``texture`` strength is above 0.

    Args:
        sprites: the batch's sprites.
        depth: ``(N, H, W) float32`` forward distance (m) of what is drawn so far.
        label: ``(N, H, W) uint8`` taxonomy indices.
        albedo: ``(N, H, W, 3) float32`` surface colour before lighting.
        emissive: ``(N, H, W) float32``; set to 1 where a light-emitting part wins.
        fixed_colors: ``(NUM_PARTS, 3)`` colours of the parts not coloured per sprite.
        upright: ``(surface (N, H, W) uint8, height (N, H, W) float32)``, C-contiguous:
            where an upright sprite moves the depth, ``S_UPRIGHT`` and 1.0 are written.
    """
    n, height, width = depth.shape
    x0 = np.clip(np.floor(sprites.u0), 0, width).astype(np.int64)
    x1 = np.clip(np.ceil(sprites.u0 + sprites.w), 0, width).astype(np.int64)
    y0 = np.clip(np.floor(sprites.v0), 0, height).astype(np.int64)
    y1 = np.clip(np.ceil(sprites.v0 + sprites.h), 0, height).astype(np.int64)
    cw, ch = x1 - x0, y1 - y0
    visible = (cw > 0) & (ch > 0) & (sprites.depth > 0)
    counts = np.where(visible, cw * ch, 0)
    total = int(counts.sum())
    if total == 0:
        return
    sid = np.repeat(np.arange(len(counts)), counts)
    start = np.cumsum(counts) - counts
    local = np.arange(total) - start[sid]
    cws = cw[sid]
    r = local // cws
    row = y0[sid] + r
    col = x0[sid] + (local - r * cws)
    # template coordinates of each pixel centre
    ty = ((row + 0.5 - sprites.v0[sid]) / sprites.h[sid] * T).astype(np.int64).clip(0, T - 1)
    tx = ((col + 0.5 - sprites.u0[sid]) / sprites.w[sid] * T).astype(np.int64).clip(0, T - 1)
    part = TEMPLATES[sprites.template[sid], ty, tx]
    keep = part > 0
    sid, row, col, part = sid[keep], row[keep], col[keep], part[keep]
    flat = (sprites.frame[sid].astype(np.int64) * height + row) * width + col
    d = sprites.depth[sid].astype(np.float32)
    zbuf = depth.reshape(-1)
    if decal:
        win = np.flatnonzero(d <= zbuf[flat])
        # several decals on one pixel: the nearest is written last and wins
        win = win[np.lexsort((-d[win], flat[win]))]
    else:
        old = zbuf[flat]
        np.minimum.at(zbuf, flat, d)
        if upright is not None:  # the pixels whose depth an upright sprite moved
            moved = flat[zbuf[flat] < old]
            for buf, value in zip(upright, (S_UPRIGHT, 1.0), strict=True):
                if not buf.flags.c_contiguous:
                    raise TypeError("upright: expected C-contiguous surface and height arrays")
                buf.reshape(-1)[moved] = value
        win = d <= zbuf[flat]
    flat, sid, part = flat[win], sid[win], part[win]
    if tile is not None:
        row, col = row[win], col[win]
    if not decal:
        label.reshape(-1)[flat] = sprites.label[sid]
    colors = fixed_colors[part]
    for p, factor in SPRITE_COLOURED.items():
        m = part == p
        colors[m] = sprites.color[sid[m]] * factor
    if tile is not None and sprites.texture is not None:
        m = (part == CANOPY) & (sprites.texture[sid] > 0)
        if m.any():
            # the crown spans half a tile; each sprite reads its own corner of it, chosen
            # by its rank within its frame (never its place in the batch)
            n_t, sm = tile.shape[0], sid[m]
            rank = rank_in_frame(sprites.frame)[sm]
            fy = (row[m] + 0.5 - sprites.v0[sm]) / sprites.h[sm] * (n_t / 2) + rank * 37
            fx = (col[m] + 0.5 - sprites.u0[sm]) / sprites.w[sm] * (n_t / 2) + rank * 91
            t = tile[fy.astype(np.int64) % n_t, fx.astype(np.int64) % n_t]
            colors[m] *= (1.0 + sprites.texture[sm] * (t - 0.5) * 1.6)[:, None]
    albedo.reshape(-1, 3)[flat] = colors
    if not decal:
        emissive.reshape(-1)[flat] = np.isin(part, EMISSIVE_PARTS).astype(np.float32)
