"""Where things stand in a procedural street: lanes, building blocks and upright objects.

Pure functions of one frame's :class:`SceneParams` and its layout generator. World
coordinates follow the road: ``e`` is the lateral offset (m, right positive) from the
ego lane's centre line and ``z`` the distance (m) along the road ahead.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from simulation.procedural.sprites import TEMPLATE_ID
from simulation.randomization import SceneParams

# Block kinds of the street's two frontages.
EMPTY, BUILDING, TREES, FENCE = 0, 1, 2, 3
NUM_BLOCKS = 16


@dataclass(frozen=True)
class MapStyle:
    """What a map's streets look like: setback of the frontage from the sidewalk (m),
    block length (m), the chance of each block kind (before the road's densities
    scale them), building height factor and pole spacing (m)."""

    setback: tuple[float, float]
    block_len: tuple[float, float]
    p_building: float
    p_trees: float
    p_fence: float
    height_factor: float
    pole_spacing: float


MAP_STYLES: dict[str, MapStyle] = {
    "Town01": MapStyle((1.0, 3.0), (10, 18), 0.75, 0.5, 0.15, 0.8, 28),
    "Town02": MapStyle((0.5, 2.0), (8, 14), 0.85, 0.4, 0.1, 0.7, 24),
    "Town03": MapStyle((0.5, 2.0), (15, 30), 0.9, 0.3, 0.1, 1.2, 22),
    "Town04": MapStyle((6.0, 15.0), (20, 40), 0.2, 0.7, 0.4, 0.7, 40),
    "Town05": MapStyle((0.5, 2.0), (14, 26), 0.9, 0.3, 0.1, 1.3, 22),
    "Town06": MapStyle((4.0, 8.0), (14, 24), 0.5, 0.6, 0.3, 0.8, 32),
    "Town07": MapStyle((3.0, 10.0), (12, 24), 0.3, 0.8, 0.35, 0.6, 36),
    "Town10HD": MapStyle((0.3, 1.5), (16, 32), 1.0, 0.2, 0.05, 1.8, 20),
    "Town11": MapStyle((8.0, 20.0), (30, 60), 0.1, 0.6, 0.3, 0.6, 45),
    "Town12": MapStyle((1.0, 6.0), (12, 30), 0.7, 0.5, 0.2, 1.1, 26),
    "Town13": MapStyle((1.0, 6.0), (12, 30), 0.7, 0.5, 0.2, 1.1, 26),
    "Town15": MapStyle((0.5, 3.0), (12, 26), 0.85, 0.4, 0.1, 1.0, 24),
}


def map_style(name: str) -> MapStyle:
    return MAP_STYLES[name.removesuffix("_Opt")]


# Vehicle sizes by CARLA base_type: (width, height) in metres, and whether it has a rider.
VEHICLE_SIZES = {
    "car": (1.8, 1.45, False),
    "van": (2.0, 2.1, False),
    "truck": (2.5, 3.4, False),
    "bus": (2.55, 3.1, False),
    "motorcycle": (0.8, 1.25, True),
    "bicycle": (0.6, 1.05, True),
}


@dataclass
class Street:
    """One frame's street: road edges (m), frontage offsets (m) and blocks per side.

    ``blocks_*`` arrays have shape ``(NUM_BLOCKS,)``: kind, top height (m) and colour
    index; block ``i`` covers ``z`` in ``[i * block_len - phase, (i + 1) * block_len - phase)``.
    """

    left_edge: float
    right_edge: float
    frontage_left: float
    frontage_right: float
    block_len: float
    phase: np.ndarray  # (2,) left, right
    kind: np.ndarray  # (2, NUM_BLOCKS) int
    top: np.ndarray  # (2, NUM_BLOCKS) float
    color: np.ndarray  # (2, NUM_BLOCKS) int


@dataclass
class Objects:
    """Upright objects in world coordinates, one entry each (arrays of equal length)."""

    e: np.ndarray
    z: np.ndarray
    width: np.ndarray
    height: np.ndarray
    base: np.ndarray
    template: np.ndarray
    label: np.ndarray
    color: np.ndarray  # (K, 3) in [0, 1]
    decal: np.ndarray  # (K,) bool: flat on the ground (``width`` across, ``height`` along z)
    texture: np.ndarray  # (K,) foliage texture strength of canopies


def road_edges(lanes: int, lane_width: float) -> tuple[float, float]:
    """Left and right road edge (m) relative to the ego lane centre; ego drives in lane
    ``lanes // 2`` counted from the left, so the lanes left of it carry oncoming traffic."""
    k = lanes // 2
    return -(k + 0.5) * lane_width, (lanes - k - 0.5) * lane_width


def make_street(p: SceneParams, rng: np.random.Generator) -> Street:
    style = map_style(p.map)
    road = p.road
    le, re = road_edges(road.lanes, road.lane_width_m)
    setback = rng.uniform(*style.setback, size=2) * p.structure.setback_scale
    block_len = float(rng.uniform(*style.block_len))
    p_b = style.p_building * road.building_density
    p_t = (1.0 - p_b) * min(1.0, style.p_trees * (0.4 + road.tree_density))
    p_f = (1.0 - p_b - p_t) * style.p_fence
    u = rng.uniform(size=(2, NUM_BLOCKS))
    kind = np.full((2, NUM_BLOCKS), EMPTY)
    kind[u < p_b + p_t + p_f] = FENCE
    kind[u < p_b + p_t] = TREES
    kind[u < p_b] = BUILDING
    top = np.where(
        kind == BUILDING,
        road.building_height_m * style.height_factor * rng.uniform(0.5, 1.5, size=(2, NUM_BLOCKS)),
        np.where(kind == TREES, rng.uniform(5.0, 12.0, size=(2, NUM_BLOCKS)), 1.2),
    )
    return Street(
        left_edge=le,
        right_edge=re,
        frontage_left=le - road.sidewalk_width_m - setback[0],
        frontage_right=re + road.sidewalk_width_m + setback[1],
        block_len=block_len,
        phase=rng.uniform(0.0, block_len, size=2),
        kind=kind,
        top=top,
        color=rng.integers(0, 6, size=(2, NUM_BLOCKS)),
    )


def make_objects(
    p: SceneParams,
    street: Street,
    rng: np.random.Generator,
    labels: dict[str, int],
    sign_colors: np.ndarray,
    vegetation_colors: np.ndarray,
    extra_rng: np.random.Generator | None = None,
) -> Objects:
    """Place the frame's vehicles, pedestrians, poles, signs, lamps and trees; then, from
    ``extra_rng`` (so the first draws stay those of before), parked cars, street trees
    and distractors."""
    road = p.road
    le, re, w = street.left_edge, street.right_edge, road.lane_width_m
    sw = road.sidewalk_width_m
    ego_lane = road.lanes // 2
    rows: list[tuple] = []  # (e, z, width, height, base, template, label, color)

    for v in p.vehicles:
        width, height, ridden = VEHICLE_SIZES[v.type]
        width, height = width * v.scale * v.aspect, height * v.scale
        color = np.asarray(v.color, np.float32) / 255.0
        if rng.uniform() < 0.25:  # parked at a kerb, facing our way of travel
            e = re - 0.5 * width - 0.3 if rng.uniform() < 0.7 else le + 0.5 * width + 0.3
            z, oncoming = rng.uniform(6.0, 60.0), False
        else:
            lane = int(rng.integers(0, road.lanes))
            e = le + (lane + 0.5) * w + rng.uniform(-0.25, 0.25) * (w - width)
            oncoming = lane < ego_lane
            z = rng.uniform(10.0 if lane == ego_lane else 5.0, 80.0)
        if v.type in ("motorcycle", "bicycle"):
            template = TEMPLATE_ID[v.type]
        else:
            template = _vehicle_template(v.type, v.shape, oncoming)
        rows.append((e, z, width, height, 0.0, template, labels["vehicle"], color))
        if ridden:  # the rider is a person, as in CARLA and Cityscapes
            rider = rng.uniform(0.1, 0.8, size=3).astype(np.float32)
            rows.append(
                (
                    e,
                    z - 0.05,
                    0.55,
                    1.0,
                    height * 0.55,
                    TEMPLATE_ID["pedestrian"],
                    labels["person"],
                    rider,
                )
            )

    for ped in p.pedestrians:
        color = np.asarray(ped.color, np.float32) / 255.0
        if rng.uniform() < 0.1:  # crossing the road
            e, z = rng.uniform(le, re), rng.uniform(8.0, 30.0)
        else:
            off = rng.uniform(0.3, max(0.31, sw - 0.3))
            e = re + off if rng.uniform() < 0.5 else le - off
            z = rng.uniform(4.0, 45.0)
        width = 0.55 * ped.height_m / 1.75 * ped.aspect
        template = TEMPLATE_ID[
            "pedestrian" if ped.shape == "classic" else f"pedestrian_{ped.shape}"
        ]
        rows.append((e, z, width, ped.height_m, 0.0, template, labels["person"], color))

    spacing = map_style(p.map).pole_spacing
    for side, e_pole in ((1, re + max(sw - 0.3, 0.15)), (-1, le - max(sw - 0.3, 0.15))):
        z = rng.uniform(3.0, spacing)
        while z < 110.0:
            height = rng.uniform(5.0, 8.0)
            grey = np.full(3, 0.5, np.float32)
            rows.append((e_pole, z, 0.18, height, 0.0, TEMPLATE_ID["pole"], labels["pole"], grey))
            kind = rng.uniform()
            if kind < 0.35:  # a traffic sign on the pole, facing traffic
                template = TEMPLATE_ID["sign_disc" if rng.uniform() < 0.5 else "sign_square"]
                color = sign_colors[rng.integers(0, len(sign_colors))]
                rows.append(
                    (
                        e_pole - side * 0.1,
                        z - 0.1,
                        0.7,
                        0.7,
                        2.2,
                        template,
                        labels["traffic_sign"],
                        color,
                    )
                )
            elif kind < 0.75:  # a street lamp head
                rows.append(
                    (
                        e_pole - side * 0.4,
                        z - 0.1,
                        0.8,
                        0.25,
                        height - 0.25,
                        TEMPLATE_ID["lamp"],
                        labels["pole"],
                        grey,
                    )
                )
            z += spacing * rng.uniform(0.8, 1.2)

    n_trees = rng.poisson(8.0 * road.tree_density)
    for _ in range(n_trees):
        right = rng.uniform() < 0.5
        verge = (street.frontage_right - re - sw) if right else (le - sw - street.frontage_left)
        off = sw + rng.uniform(0.2, max(0.25, verge - 0.5)) if verge > 1.0 else sw - 0.4
        e = re + off if right else le - off
        height = rng.uniform(4.0, 9.0)
        color = vegetation_colors[rng.integers(0, len(vegetation_colors))]
        rows.append(
            (
                e,
                rng.uniform(5.0, 90.0),
                0.55 * height,
                height,
                0.0,
                TEMPLATE_ID["tree"],
                labels["vegetation"],
                color,
            )
        )

    texture = [0.0] * len(rows)
    strength = p.appearance.texture_strength
    for i, row in enumerate(rows):
        if row[5] == TEMPLATE_ID["tree"]:
            texture[i] = strength
    decal = [False] * len(rows)
    if extra_rng is not None:
        extra = structure_rows(p, street, extra_rng, labels, vegetation_colors)
        rows += [r[:8] for r in extra]
        decal += [r[8] for r in extra]
        texture += [r[9] for r in extra]
    if not rows:
        empty = np.zeros(0, np.float32)
        return Objects(
            empty,
            empty,
            empty,
            empty,
            empty,
            empty.astype(np.int64),
            empty.astype(np.uint8),
            np.zeros((0, 3), np.float32),
            np.zeros(0, bool),
            empty,
        )
    cols = list(zip(*rows, strict=True))
    return Objects(
        e=np.asarray(cols[0], np.float32),
        z=np.asarray(cols[1], np.float32),
        width=np.asarray(cols[2], np.float32),
        height=np.asarray(cols[3], np.float32),
        base=np.asarray(cols[4], np.float32),
        template=np.asarray(cols[5], np.int64),
        label=np.asarray(cols[6], np.uint8),
        color=np.stack(cols[7]).astype(np.float32),
        decal=np.asarray(decal, bool),
        texture=np.asarray(texture, np.float32),
    )


def _vehicle_template(kind: str, shape: str, oncoming: bool) -> int:
    side = "front" if oncoming else "rear"
    if kind == "car" and shape != "classic":
        return TEMPLATE_ID[f"car_{shape}_{side}"]
    return TEMPLATE_ID[f"{kind}_{side}"]


def structure_rows(
    p: SceneParams,
    street: Street,
    rng: np.random.Generator,
    labels: dict[str, int],
    vegetation_colors: np.ndarray,
) -> list[tuple]:
    """Parked cars along the kerbs, street trees on the sidewalks and distractors, as rows
    ``(e, z, width, height, base, template, label, colour, decal, texture)``."""
    st, road = p.structure, p.road
    le, re, sw = street.left_edge, street.right_edge, road.sidewalk_width_m
    rows: list[tuple] = []
    # parked cars take the body shapes the preset gives its cars (photo-only shapes stay photo)
    shapes = [v.shape for v in p.vehicles if v.type == "car"] or ["classic"]
    sides = (1, -1) if road.lanes >= 2 else (1,)
    for side in sides:
        if st.parked_density <= 0:
            break
        z = rng.uniform(3.0, 9.0)
        while z < 75.0:
            if rng.uniform() < st.parked_density:
                kind = "car" if rng.uniform() < 0.85 else "van"
                width, height, _ = VEHICLE_SIZES[kind]
                scale = rng.uniform(0.92, 1.08)
                width, height = width * scale * rng.uniform(0.92, 1.08), height * scale
                e = re - 0.5 * width - 0.2 if side == 1 else le + 0.5 * width + 0.2
                shape = shapes[int(rng.integers(0, len(shapes)))] if kind == "car" else "classic"
                color = np.asarray(
                    colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.8), rng.uniform(0.1, 0.95)),
                    np.float32,
                )
                template = _vehicle_template(kind, shape, oncoming=side == -1)
                rows.append(
                    (e, z, width, height, 0.0, template, labels["vehicle"], color, False, 0.0)
                )
            z += rng.uniform(5.5, 7.0)
    for side in (1, -1):
        if st.street_tree_density <= 0:
            break
        z = rng.uniform(2.0, 9.0)
        while z < 85.0:
            if rng.uniform() < st.street_tree_density:
                off = min(0.7, 0.4 * sw) if sw > 0.3 else sw + 0.4
                e = re + off if side == 1 else le - off
                height = rng.uniform(5.0, 10.0)
                leafless = rng.uniform() < st.leafless_share
                name = (
                    "tree_leafless" if leafless else ("tree_round", "tree_tall")[rng.integers(0, 2)]
                )
                color = vegetation_colors[rng.integers(0, len(vegetation_colors))]
                texture = 0.0 if leafless else p.appearance.texture_strength
                width = (0.7 if leafless else 0.55) * height
                rows.append(
                    (
                        e,
                        z,
                        width,
                        height,
                        0.0,
                        TEMPLATE_ID[name],
                        labels["vegetation"],
                        color,
                        False,
                        texture,
                    )
                )
            z += rng.uniform(7.5, 10.5)
    for d in p.distractors:
        color = np.asarray(d.color, np.float32) / 255.0
        template = TEMPLATE_ID[f"distractor_{d.shape}"]
        if d.kind == "decal":  # flat on the road or sidewalk: the surface keeps its label
            e, z = rng.uniform(le - sw, re + sw), rng.uniform(4.0, 40.0)
            rows.append((e, z, d.size_m, d.size_m, 0.0, template, 255, color, True, 0.0))
        else:  # upright clutter on a sidewalk: ignore, not a class of the taxonomy
            off = rng.uniform(0.2, max(0.25, sw - 0.2))
            e = re + off if rng.uniform() < 0.5 else le - off
            z = rng.uniform(4.0, 50.0)
            rows.append((e, z, d.size_m, d.size_m, 0.0, template, 255, color, False, 0.0))
    return rows
