"""Domain randomization: one seeded sampler of scene parameters, read by every backend.

A :class:`DomainRandomizer` holds *distributions* (ranges, choices, probabilities);
:meth:`DomainRandomizer.sample` turns ``(seed, frame index)`` into one
:class:`SceneParams` -- weather with exactly CARLA's ``WeatherParameters`` fields,
camera, assets, map and road geometry, and sensor effects. Sampling a frame depends
only on ``(seed, index)``, never on the order frames are generated in, so shards can
be generated in parallel or resumed and still match.

Condition groups (``day-clear``, ``night-rain``, ...) are *derived* from the weather
(:func:`condition_group`); the sampler first draws the group from configured
probabilities and then draws the weather inside that group's region, and it checks
at construction that every group's ranges really lie inside the region.
"""

from __future__ import annotations

import bisect
import colorsys
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

# --- CARLA's WeatherParameters: every field and its documented range ------------------
#: ``{field: (min, max)}`` exactly as ``carla.WeatherParameters`` (0.9.14+) defines them.
WEATHER_LIMITS: dict[str, tuple[float, float]] = {
    "cloudiness": (0.0, 100.0),
    "precipitation": (0.0, 100.0),
    "precipitation_deposits": (0.0, 100.0),
    "wind_intensity": (0.0, 100.0),
    "sun_azimuth_angle": (0.0, 360.0),
    "sun_altitude_angle": (-90.0, 90.0),
    "fog_density": (0.0, 100.0),
    "fog_distance": (0.0, math.inf),
    "fog_falloff": (0.0, math.inf),
    "wetness": (0.0, 100.0),
    "scattering_intensity": (0.0, math.inf),
    "mie_scattering_scale": (0.0, math.inf),
    "rayleigh_scattering_scale": (0.0, math.inf),
    "dust_storm": (0.0, 100.0),
}

TIMES_OF_DAY = ("day", "dusk", "night")
CONDITIONS = ("clear", "rain", "fog")
#: Sun altitude (degrees) at or above which it is ``day``; between 0 and this, ``dusk``.
DAY_MIN_ALTITUDE = 15.0
#: ``precipitation`` at or above this is ``rain``; else ``fog_density`` at or above
#: :data:`FOG_MIN_DENSITY` is ``fog``; else ``clear``.
RAIN_MIN_PRECIPITATION = 30.0
FOG_MIN_DENSITY = 30.0

#: Vehicle kinds, named as CARLA's blueprint attribute ``base_type``.
VEHICLE_TYPES = ("car", "van", "truck", "bus", "motorcycle", "bicycle")

#: Car body shapes (``VehicleSpec.shape``; other vehicle types draw ``classic``) and person
#: silhouettes (``PedestrianSpec.shape``); ``classic`` is the original template.
CAR_SHAPES = ("classic", "hatchback", "suv", "pickup", "compact")
PERSON_SHAPES = ("classic", "coat", "skirt", "backpack", "stride")
#: Surfaces that carry a texture family and a colour tint (:class:`Appearance`).
SURFACES = ("road", "sidewalk", "building", "vegetation", "terrain", "fence")
#: Procedural texture families (:mod:`simulation.procedural.textures`); ``flat`` = none.
TEXTURE_FAMILIES = (
    "flat",
    "noise",
    "stripes",
    "bricks",
    "foliage",
    "asphalt",
    "windows",
    "cobblestone",
    "plaster",
)
#: Families and shapes only the ``photo`` style renders: the camera world has looks that
#: no sim preset can sample (a sim backend refuses a randomizer that asks for them).
PHOTO_ONLY = {"textures": ("cobblestone", "plaster"), "car": ("compact",), "person": ("stride",)}
#: Distractor kinds: ``decal`` lies flat on the ground and keeps the label of the surface
#: under it; ``clutter`` stands upright (bins, crates, bollards) and is labelled ignore (255).
DISTRACTOR_KINDS = ("decal", "clutter")
DISTRACTOR_SHAPES = ("box", "disc", "triangle", "blob")

#: CARLA maps the sampler may choose (``_Opt`` layered variants are accepted too).
KNOWN_MAPS = (
    "Town01",
    "Town02",
    "Town03",
    "Town04",
    "Town05",
    "Town06",
    "Town07",
    "Town10HD",
    "Town11",
    "Town12",
    "Town13",
    "Town15",
)


class RandomizationError(ValueError):
    """A randomization config that cannot be sampled; the message names the key."""


# --- sampled parameters ---------------------------------------------------------------
@dataclass(frozen=True)
class Weather:
    """One value for every field of ``carla.WeatherParameters`` (same names, same units)."""

    cloudiness: float = 5.0
    precipitation: float = 0.0
    precipitation_deposits: float = 0.0
    wind_intensity: float = 10.0
    sun_azimuth_angle: float = 0.0
    sun_altitude_angle: float = 45.0
    fog_density: float = 2.0
    fog_distance: float = 0.75
    fog_falloff: float = 0.1
    wetness: float = 0.0
    scattering_intensity: float = 1.0
    mie_scattering_scale: float = 0.03
    rayleigh_scattering_scale: float = 0.0331
    dust_storm: float = 0.0


def time_of_day(sun_altitude_angle: float) -> str:
    """``day`` / ``dusk`` / ``night`` from the sun's altitude in degrees."""
    if sun_altitude_angle >= DAY_MIN_ALTITUDE:
        return "day"
    return "dusk" if sun_altitude_angle >= 0.0 else "night"


def condition(weather: Weather) -> str:
    """``rain`` / ``fog`` / ``clear`` from precipitation and fog density (rain first)."""
    if weather.precipitation >= RAIN_MIN_PRECIPITATION:
        return "rain"
    return "fog" if weather.fog_density >= FOG_MIN_DENSITY else "clear"


def condition_group(weather: Weather) -> str:
    """The slice used for per-condition metrics, e.g. ``"night-rain"``."""
    return f"{time_of_day(weather.sun_altitude_angle)}-{condition(weather)}"


ALL_GROUPS = tuple(f"{t}-{c}" for t in TIMES_OF_DAY for c in CONDITIONS)


@dataclass(frozen=True)
class Camera:
    """Ego camera: horizontal field of view (deg), mounting height (m), pitch (deg,
    negative looks down), yaw and roll jitter (deg), lateral offset in the lane (m)."""

    fov_deg: float = 90.0
    height_m: float = 1.6
    pitch_deg: float = -3.0
    yaw_deg: float = 0.0
    roll_deg: float = 0.0
    lateral_m: float = 0.0


@dataclass(frozen=True)
class Road:
    """Road geometry: curvature (1/m, positive bends right), total lanes, lane and
    sidewalk width (m), mean building height (m), building and tree density in [0, 1]."""

    curvature: float = 0.0
    lanes: int = 2
    lane_width_m: float = 3.5
    sidewalk_width_m: float = 2.5
    building_height_m: float = 12.0
    building_density: float = 0.7
    tree_density: float = 0.4


@dataclass(frozen=True)
class VehicleSpec:
    """One vehicle asset: CARLA ``base_type``, body colour (r, g, b in 0..255), size scale,
    body shape (:data:`CAR_SHAPES`, cars only) and width-to-height aspect factor."""

    type: str
    color: tuple[int, int, int]
    scale: float
    shape: str = "classic"
    aspect: float = 1.0


@dataclass(frozen=True)
class PedestrianSpec:
    """One pedestrian: clothing colour (r, g, b in 0..255), height (m), silhouette
    (:data:`PERSON_SHAPES`) and width factor."""

    color: tuple[int, int, int]
    height_m: float
    shape: str = "classic"
    aspect: float = 1.0


@dataclass(frozen=True)
class Appearance:
    """Surface appearance and light (procedural backend only; CARLA ignores it).

    ``texture_strength`` in [0, 1] (0: untextured, as before), ``texture_scale`` the
    texels-per-metre factor of the patterns, ``textures`` one family per surface of
    :data:`SURFACES`, ``tints`` one (r, g, b) colour multiplier per surface,
    ``sun_intensity`` and ``ambient_intensity`` factors of direct and ambient light.
    """

    texture_strength: float = 0.0
    texture_scale: float = 1.0
    textures: tuple[str, ...] = ("flat",) * len(SURFACES)
    tints: tuple[tuple[float, float, float], ...] = ((1.0, 1.0, 1.0),) * len(SURFACES)
    sun_intensity: float = 1.0
    ambient_intensity: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "texture_strength": self.texture_strength,
            "texture_scale": self.texture_scale,
            "textures": dict(zip(SURFACES, self.textures, strict=True)),
            "tints": {s: list(t) for s, t in zip(SURFACES, self.tints, strict=True)},
            "sun_intensity": self.sun_intensity,
            "ambient_intensity": self.ambient_intensity,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Appearance:
        return cls(
            texture_strength=d["texture_strength"],
            texture_scale=d["texture_scale"],
            textures=tuple(d["textures"][s] for s in SURFACES),
            tints=tuple(tuple(d["tints"][s]) for s in SURFACES),
            sun_intensity=d["sun_intensity"],
            ambient_intensity=d["ambient_intensity"],
        )


@dataclass(frozen=True)
class Structure:
    """Street structure beyond :class:`Road`: ``setback_scale`` multiplies the map's
    frontage setback (0: buildings flush with the sidewalk), ``parked_density`` the share
    of 6 m kerb slots holding a parked car, ``street_tree_density`` the share of 9 m
    sidewalk slots holding a street tree, ``leafless_share`` the share of those without
    leaves (all in [0, 1])."""

    setback_scale: float = 1.0
    parked_density: float = 0.0
    street_tree_density: float = 0.0
    leafless_share: float = 0.0


@dataclass(frozen=True)
class DistractorSpec:
    """A random shape (Tremblay 2018): kind (:data:`DISTRACTOR_KINDS`), shape
    (:data:`DISTRACTOR_SHAPES`), colour (r, g, b in 0..255) and size (m)."""

    kind: str
    shape: str
    color: tuple[int, int, int]
    size_m: float


@dataclass(frozen=True)
class Sensor:
    """Sensor effects: Gaussian noise std (intensity in [0, 1]), blur sigma (px),
    exposure offset (EV stops), vignetting strength (corner darkening in [0, 1])."""

    noise_std: float = 0.0
    blur_sigma_px: float = 0.0
    exposure_ev: float = 0.0
    vignetting: float = 0.0


@dataclass(frozen=True)
class SceneParams:
    """Everything sampled for one frame; :meth:`to_dict` is what the manifest records."""

    map: str
    weather: Weather
    camera: Camera
    road: Road
    vehicles: tuple[VehicleSpec, ...]
    pedestrians: tuple[PedestrianSpec, ...]
    sensor: Sensor
    appearance: Appearance = Appearance()
    structure: Structure = Structure()
    distractors: tuple[DistractorSpec, ...] = ()

    @property
    def group(self) -> str:
        return condition_group(self.weather)

    def to_dict(self) -> dict[str, Any]:
        # vars() copies of flat frozen dataclasses: asdict's deep copy is 10x slower here
        return {
            "map": self.map,
            "weather": dict(vars(self.weather)),
            "camera": dict(vars(self.camera)),
            "road": dict(vars(self.road)),
            "vehicles": [
                {
                    "type": v.type,
                    "color": list(v.color),
                    "scale": v.scale,
                    "shape": v.shape,
                    "aspect": v.aspect,
                }
                for v in self.vehicles
            ],
            "pedestrians": [
                {
                    "color": list(p.color),
                    "height_m": p.height_m,
                    "shape": p.shape,
                    "aspect": p.aspect,
                }
                for p in self.pedestrians
            ],
            "sensor": dict(vars(self.sensor)),
            "appearance": self.appearance.to_dict(),
            "structure": dict(vars(self.structure)),
            "distractors": [
                {"kind": d.kind, "shape": d.shape, "color": list(d.color), "size_m": d.size_m}
                for d in self.distractors
            ],
            "group": self.group,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SceneParams:
        return cls(
            map=d["map"],
            weather=Weather(**d["weather"]),
            camera=Camera(**d["camera"]),
            road=Road(**d["road"]),
            vehicles=tuple(
                VehicleSpec(
                    v["type"],
                    tuple(v["color"]),
                    v["scale"],
                    v.get("shape", "classic"),
                    v.get("aspect", 1.0),
                )
                for v in d["vehicles"]
            ),
            pedestrians=tuple(
                PedestrianSpec(
                    tuple(p["color"]),
                    p["height_m"],
                    p.get("shape", "classic"),
                    p.get("aspect", 1.0),
                )
                for p in d["pedestrians"]
            ),
            sensor=Sensor(**d["sensor"]),
            # manifests written before these blocks existed read as "off"
            appearance=Appearance.from_dict(d["appearance"]) if "appearance" in d else Appearance(),
            structure=Structure(**d.get("structure", {})),
            distractors=tuple(
                DistractorSpec(x["kind"], x["shape"], tuple(x["color"]), x["size_m"])
                for x in d.get("distractors", ())
            ),
        )


# --- distributions --------------------------------------------------------------------
@dataclass(frozen=True)
class Uniform:
    """A value drawn uniformly from ``[lo, hi]`` (a constant when ``lo == hi``);
    integer-valued when ``integer`` (both ends inclusive)."""

    lo: float
    hi: float
    integer: bool = False

    def sample(self, rng: np.random.Generator) -> float | int:
        if self.integer:
            return int(rng.integers(int(self.lo), int(self.hi) + 1))
        if self.lo == self.hi:
            return float(self.lo)
        # what rng.uniform(lo, hi) computes (lo + (hi - lo) * the next double), draw for
        # draw, without its argument handling: a third of the time
        return float(self.lo) + (float(self.hi) - float(self.lo)) * rng.random()


def parse_range(
    value: Any,
    key: str,
    limits: tuple[float, float] = (-math.inf, math.inf),
    integer: bool = False,
) -> Uniform:
    """A config value -- a number or a ``[lo, hi]`` pair -- as a checked :class:`Uniform`.

    Raises:
        RandomizationError: naming ``key`` for a non-number, an inverted range, or a
            value outside ``limits``.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        lo = hi = value
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        lo, hi = value
    else:
        raise RandomizationError(f"{key}: expected a number or a [lo, hi] pair, got {value!r}")
    for v in (lo, hi):
        if not isinstance(v, int | float) or isinstance(v, bool) or math.isnan(v):
            raise RandomizationError(f"{key}: expected numbers, got {value!r}")
        if integer and float(v) != int(v):
            raise RandomizationError(f"{key}: expected whole numbers, got {value!r}")
    if lo > hi:
        raise RandomizationError(f"{key}: inverted range [{lo}, {hi}] (expected lo <= hi)")
    if lo < limits[0] or hi > limits[1]:
        raise RandomizationError(
            f"{key}: [{lo}, {hi}] lies outside the allowed range [{limits[0]}, {limits[1]}]"
        )
    return Uniform(float(lo), float(hi), integer)


def parse_probabilities(value: Any, key: str, allowed: Sequence[str]) -> dict[str, float]:
    """A ``{name: probability}`` mapping, each in [0, 1], summing to 1, names in ``allowed``."""
    if not isinstance(value, Mapping) or not value:
        raise RandomizationError(f"{key}: expected a mapping of {list(allowed)} to probabilities")
    probs: dict[str, float] = {}
    for name, p in value.items():
        if name not in allowed:
            raise RandomizationError(
                f"{key}.{name}: unknown choice, expected one of {list(allowed)}"
            )
        if not isinstance(p, int | float) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            raise RandomizationError(f"{key}.{name}: probability must lie in [0, 1], got {p!r}")
        probs[str(name)] = float(p)
    total = sum(probs.values())
    if abs(total - 1.0) > 1e-6:
        raise RandomizationError(f"{key}: probabilities must sum to 1, got {total:g}")
    return probs


def parse_weights(value: Any, key: str, allowed: Sequence[str]) -> dict[str, float]:
    """A ``{name: weight}`` mapping: names in ``allowed``, weights non-negative numbers
    summing to more than 0; returned normalized to probabilities."""
    if not isinstance(value, Mapping) or not value:
        raise RandomizationError(f"{key}: expected a mapping of {list(allowed)} to weights")
    weights: dict[str, float] = {}
    for name, w in value.items():
        if name not in allowed:
            raise RandomizationError(
                f"{key}.{name}: unknown choice, expected one of {list(allowed)}"
            )
        if not isinstance(w, int | float) or isinstance(w, bool) or not w >= 0 or w == math.inf:
            raise RandomizationError(f"{key}.{name}: weight must be a number >= 0, got {w!r}")
        weights[str(name)] = float(w)
    total = sum(weights.values())
    if total <= 0:
        raise RandomizationError(f"{key}: weights must sum to more than 0, got {total:g}")
    return {n: w / total for n, w in weights.items()}


def _choose(rng: np.random.Generator, probs: Mapping[str, float]) -> str:
    # the draw of ``rng.choice(len(names), p=...)`` (one ``random()`` against the normalized
    # cumulative sum), without its argument checks: same values, a fraction of the time
    names, cum = _cumulative(probs)
    cdf = [c / cum[-1] for c in cum]
    return names[min(bisect.bisect_right(cdf, rng.random()), len(names) - 1)]


_CUMULATIVE: dict[int, tuple[Mapping[str, float], list[str], list[float]]] = {}


def _cumulative(probs: Mapping[str, float]) -> tuple[list[str], list[float]]:
    """``probs``' names and running sums (float64, summed in order, as ``np.cumsum``),
    cached per mapping: the randomizer's tables never change after construction."""
    hit = _CUMULATIVE.get(id(probs))
    if hit is None or hit[0] is not probs:
        names = list(probs)
        hit = (probs, names, list(itertools.accumulate(float(probs[n]) for n in names)))
        if len(_CUMULATIVE) > 4096:
            _CUMULATIVE.clear()
        _CUMULATIVE[id(probs)] = hit
    return hit[1], hit[2]


# The region each group's weather must lie in: {group: {field: (lo, hi)}} with hi exclusive
# where the rule is strict; used to check configured ranges at construction.
_GROUP_REGIONS: dict[str, dict[str, tuple[float, float]]] = {
    "day": {"sun_altitude_angle": (DAY_MIN_ALTITUDE, 90.0)},
    "dusk": {"sun_altitude_angle": (0.0, DAY_MIN_ALTITUDE - 1e-9)},
    "night": {"sun_altitude_angle": (-90.0, -1e-9)},
    "rain": {"precipitation": (RAIN_MIN_PRECIPITATION, 100.0)},
    "fog": {
        "precipitation": (0.0, RAIN_MIN_PRECIPITATION - 1e-9),
        "fog_density": (FOG_MIN_DENSITY, 100.0),
    },
    "clear": {
        "precipitation": (0.0, RAIN_MIN_PRECIPITATION - 1e-9),
        "fog_density": (0.0, FOG_MIN_DENSITY - 1e-9),
    },
}

_CAMERA_LIMITS = {
    "fov_deg": (10.0, 170.0),
    "height_m": (0.3, 10.0),
    "pitch_deg": (-45.0, 30.0),
    "yaw_deg": (-30.0, 30.0),
    "roll_deg": (-15.0, 15.0),
    "lateral_m": (-2.0, 2.0),
}
_ROAD_LIMITS = {
    "curvature": (-0.02, 0.02),
    "lanes": (1, 8),
    "lane_width_m": (2.0, 5.0),
    "sidewalk_width_m": (0.0, 8.0),
    "building_height_m": (3.0, 120.0),
    "building_density": (0.0, 1.0),
    "tree_density": (0.0, 1.0),
}
_SENSOR_LIMITS = {
    "noise_std": (0.0, 0.5),
    "blur_sigma_px": (0.0, 10.0),
    "exposure_ev": (-5.0, 5.0),
    "vignetting": (0.0, 1.0),
}


def _parse_block(
    values: Mapping[str, Any] | None,
    key: str,
    limits: Mapping[str, tuple[float, float]],
    defaults: Any,
    integers: Sequence[str] = (),
) -> dict[str, Uniform]:
    values = dict(values or {})
    unknown = sorted(set(values) - set(limits))
    if unknown:
        raise RandomizationError(
            f"{key}.{unknown[0]}: unknown key, expected one of {sorted(limits)}"
        )
    out = {}
    for name in limits:
        default = getattr(defaults, name)
        out[name] = parse_range(
            values.get(name, default), f"{key}.{name}", limits[name], integer=name in integers
        )
    return out


class DomainRandomizer:
    """Seeded sampler of :class:`SceneParams`; both backends read it.

    Args:
        maps: ``{map name: probability}`` over :data:`KNOWN_MAPS`.
        time_of_day: ``{day|dusk|night: probability}``.
        condition: ``{clear|rain|fog: probability}``.
        groups: optional joint ``{group: weight}`` table over :data:`ALL_GROUPS` (e.g.
            ``{"day-clear": 0.7, "night-clear": 0.1}``, normalized); when given it replaces
            the independent ``time_of_day`` x ``condition`` draw.
        weather: base ranges for any ``WeatherParameters`` field (number or ``[lo, hi]``);
            fields not given keep CARLA's ``ClearNoon`` value.
        weather_by_group: per time-of-day / condition overrides of ``weather``, e.g.
            ``{"night": {"sun_altitude_angle": [-60, -5]}}``; checked against the group.
        camera, road, sensor: ranges for the fields of :class:`Camera`, :class:`Road`,
            :class:`Sensor`.
        vehicles: ``{"count": [lo, hi], "types": {type: prob}, "saturation": [lo, hi],
            "value": [lo, hi], "scale": [lo, hi]}``; hue is uniform over the circle.
            ``"shapes": {shape: weight}`` (cars, :data:`CAR_SHAPES`), ``"aspect": [lo, hi]``.
        pedestrians: ``{"count": [lo, hi], "height_m": [lo, hi], "saturation": ..., "value": ...,
            "shapes": {shape: weight}, "aspect": [lo, hi]}``.
        appearance: ``texture_strength``, ``texture_scale``, ``sun_intensity``,
            ``ambient_intensity`` (ranges), ``textures: {surface: {family: weight}}``,
            ``color_jitter`` (range, std of the log tint), ``random_color`` (chance a
            surface gets a random colour). See :class:`Appearance`.
        structure: ranges for the fields of :class:`Structure`.
        distractors: ``{"count": [lo, hi], "kinds": {kind: weight}, "shapes": {shape: weight},
            "size_m": [lo, hi], "saturation": ..., "value": ...}``.

    Every new block defaults to "off", so a preset without it samples and renders exactly
    as before.
    """

    def __init__(
        self,
        maps: Mapping[str, float],
        time_of_day: Mapping[str, float] | None = None,
        condition: Mapping[str, float] | None = None,
        weather: Mapping[str, Any] | None = None,
        weather_by_group: Mapping[str, Mapping[str, Any]] | None = None,
        camera: Mapping[str, Any] | None = None,
        road: Mapping[str, Any] | None = None,
        vehicles: Mapping[str, Any] | None = None,
        pedestrians: Mapping[str, Any] | None = None,
        sensor: Mapping[str, Any] | None = None,
        groups: Mapping[str, float] | None = None,
        appearance: Mapping[str, Any] | None = None,
        structure: Mapping[str, Any] | None = None,
        distractors: Mapping[str, Any] | None = None,
    ) -> None:
        k = "randomization"
        known_maps = set(KNOWN_MAPS) | {f"{m}_Opt" for m in KNOWN_MAPS}
        self.maps = parse_probabilities(maps, f"{k}.maps", sorted(known_maps))
        self.joint = None if groups is None else parse_weights(groups, f"{k}.groups", ALL_GROUPS)
        if self.joint is None and (time_of_day is None or condition is None):
            raise RandomizationError(
                f"{k}.{'time_of_day' if time_of_day is None else 'condition'}: missing; give "
                f"time_of_day and condition probabilities, or a joint {k}.groups table"
            )
        self.time_of_day = parse_probabilities(
            time_of_day or {"day": 1.0}, f"{k}.time_of_day", TIMES_OF_DAY
        )
        self.condition = parse_probabilities(
            condition or {"clear": 1.0}, f"{k}.condition", CONDITIONS
        )
        self.weather = _parse_block(weather, f"{k}.weather", WEATHER_LIMITS, Weather())
        self.weather_by_group: dict[str, dict[str, Uniform]] = {}
        for group, block in (weather_by_group or {}).items():
            if group not in _GROUP_REGIONS:
                raise RandomizationError(
                    f"{k}.weather_by_group.{group}: unknown group, expected one of "
                    f"{list(TIMES_OF_DAY + CONDITIONS)}"
                )
            unknown = sorted(set(block) - set(WEATHER_LIMITS))
            if unknown:
                raise RandomizationError(
                    f"{k}.weather_by_group.{group}.{unknown[0]}: not a WeatherParameters field"
                )
            self.weather_by_group[group] = {
                f: parse_range(v, f"{k}.weather_by_group.{group}.{f}", WEATHER_LIMITS[f])
                for f, v in block.items()
            }
        self._check_group_regions()
        self.extras = _Extras(
            dict(vehicles or {}), dict(pedestrians or {}), appearance, structure, distractors
        )
        self.camera = _parse_block(camera, f"{k}.camera", _CAMERA_LIMITS, Camera())
        self.road = _parse_block(road, f"{k}.road", _ROAD_LIMITS, Road(), integers=("lanes",))
        self.sensor = _parse_block(sensor, f"{k}.sensor", _SENSOR_LIMITS, Sensor())

        vehicles = {n: v for n, v in (vehicles or {}).items() if n not in _EXTRA_KEYS}
        pedestrians = {n: v for n, v in (pedestrians or {}).items() if n not in _EXTRA_KEYS}
        self.vehicle_types = parse_probabilities(
            vehicles.pop("types", {"car": 1.0}), f"{k}.vehicles.types", VEHICLE_TYPES
        )
        v = _pop_ranges(
            vehicles,
            f"{k}.vehicles",
            {
                "count": ([0, 6], (0, 64), True),
                "scale": (1.0, (0.5, 2.0), False),
                "saturation": ([0.0, 1.0], (0.0, 1.0), False),
                "value": ([0.1, 1.0], (0.0, 1.0), False),
            },
        )
        self.vehicle_count, self.vehicle_scale = v["count"], v["scale"]
        self.vehicle_sat, self.vehicle_val = v["saturation"], v["value"]
        p = _pop_ranges(
            dict(pedestrians or {}),
            f"{k}.pedestrians",
            {
                "count": ([0, 4], (0, 64), True),
                "height_m": ([1.55, 1.9], (0.8, 2.3), False),
                "saturation": ([0.0, 0.8], (0.0, 1.0), False),
                "value": ([0.1, 0.9], (0.0, 1.0), False),
            },
        )
        self.ped_count, self.ped_height = p["count"], p["height_m"]
        self.ped_sat, self.ped_val = p["saturation"], p["value"]

    def _weather_range(self, tod: str, cond: str, name: str) -> Uniform:
        # condition overrides win over time-of-day overrides, which win over the base
        for g in (cond, tod):
            if name in self.weather_by_group.get(g, {}):
                return self.weather_by_group[g][name]
        return self.weather[name]

    def _check_group_regions(self) -> None:
        for name in self.groups:
            tod, cond = name.split("-")
            for group in (tod, cond):
                for field, (lo, hi) in _GROUP_REGIONS[group].items():
                    r = self._weather_range(tod, cond, field)
                    if r.lo < lo or r.hi > hi:
                        raise RandomizationError(
                            f"randomization.weather_by_group.{group}.{field}: range "
                            f"[{r.lo:g}, {r.hi:g}] must lie in [{lo:g}, {hi:g}] for "
                            f"'{tod}-{cond}' frames to be classified as {group}"
                        )

    @property
    def group_weights(self) -> dict[str, float]:
        """``{group: probability}`` of every group this randomizer can produce (> 0): the
        joint ``groups`` table, or the product of the independent probabilities."""
        if self.joint is not None:
            return {g: p for g, p in self.joint.items() if p > 0}
        return {
            f"{t}-{c}": pt * pc
            for t, pt in self.time_of_day.items()
            for c, pc in self.condition.items()
            if pt > 0 and pc > 0
        }

    @property
    def groups(self) -> list[str]:
        """Condition groups this randomizer can produce (probability > 0)."""
        return list(self.group_weights)

    def photo_only_keys(self) -> list[str]:
        """The config keys that ask for looks only the ``photo`` style renders."""
        return self.extras.photo_only_keys()

    def sample(self, seed: int, index: int) -> SceneParams:
        """The parameters of frame ``index`` of a dataset generated with ``seed``."""
        rng = np.random.default_rng([int(seed), int(index), 0x5CE9E])
        map_name = _choose(rng, self.maps)
        if self.joint is not None:
            tod, cond = _choose(rng, self.joint).split("-")
        else:
            tod = _choose(rng, self.time_of_day)
            cond = _choose(rng, self.condition)
        weather = Weather(
            **{f.name: self._weather_range(tod, cond, f.name).sample(rng) for f in fields(Weather)}
        )
        camera = Camera(**{n: r.sample(rng) for n, r in self.camera.items()})
        road = Road(**{n: r.sample(rng) for n, r in self.road.items()})
        vehicles = tuple(
            VehicleSpec(
                type=_choose(rng, self.vehicle_types),
                color=_hsv_color(rng, self.vehicle_sat, self.vehicle_val),
                scale=self.vehicle_scale.sample(rng),
            )
            for _ in range(self.vehicle_count.sample(rng))
        )
        pedestrians = tuple(
            PedestrianSpec(
                color=_hsv_color(rng, self.ped_sat, self.ped_val),
                height_m=self.ped_height.sample(rng),
            )
            for _ in range(self.ped_count.sample(rng))
        )
        sensor = Sensor(**{n: r.sample(rng) for n, r in self.sensor.items()})
        # the new blocks draw from their own stream: old presets sample exactly as before
        extra = np.random.default_rng([int(seed), int(index), 0xA99E])
        return SceneParams(
            map_name,
            weather,
            camera,
            road,
            self.extras.vehicles(extra, vehicles),
            self.extras.pedestrians(extra, pedestrians),
            sensor,
            self.extras.appearance(extra),
            self.extras.structure(extra),
            self.extras.distractors(extra),
        )


def _pop_ranges(
    values: dict[str, Any], key: str, spec: Mapping[str, tuple[Any, tuple[float, float], bool]]
) -> dict[str, Uniform]:
    """Parse ``spec``'s keys (default, limits, integer) out of ``values``; reject the rest."""
    out = {
        name: parse_range(values.pop(name, default), f"{key}.{name}", limits, integer)
        for name, (default, limits, integer) in spec.items()
    }
    if values:
        raise RandomizationError(
            f"{key}.{sorted(values)[0]}: unknown key, expected one of {sorted(spec)}"
        )
    return out


def _hsv_color(rng: np.random.Generator, sat: Uniform, val: Uniform) -> tuple[int, int, int]:
    h = float(rng.uniform(0.0, 1.0))
    r, g, b = colorsys.hsv_to_rgb(h, sat.sample(rng), val.sample(rng))
    return (round(r * 255), round(g * 255), round(b * 255))


# --- appearance, structure, distractors, shapes -----------------------------------------
_EXTRA_KEYS = ("shapes", "aspect")
_APPEARANCE_RANGES = {
    "texture_strength": (0.0, (0.0, 1.0), False),
    "texture_scale": (1.0, (0.25, 4.0), False),
    "sun_intensity": (1.0, (0.0, 3.0), False),
    "ambient_intensity": (1.0, (0.0, 3.0), False),
    "color_jitter": (0.0, (0.0, 1.0), False),
    "random_color": (0.0, (0.0, 1.0), False),
}
_STRUCTURE_RANGES = {
    "setback_scale": (1.0, (0.0, 1.0), False),
    "parked_density": (0.0, (0.0, 1.0), False),
    "street_tree_density": (0.0, (0.0, 1.0), False),
    "leafless_share": (0.0, (0.0, 1.0), False),
}
_DISTRACTOR_RANGES = {
    "count": (0, (0, 64), True),
    "size_m": ([0.3, 1.2], (0.05, 5.0), False),
    "saturation": ([0.0, 1.0], (0.0, 1.0), False),
    "value": ([0.1, 1.0], (0.0, 1.0), False),
}


def _pick(rng: np.random.Generator, probs: Mapping[str, float]) -> str:
    """One name drawn by ``probs`` with a single uniform (faster than :func:`_choose`, which
    the original draws keep so that old presets sample exactly as before)."""
    names, cum = _cumulative(probs)
    return names[min(bisect.bisect_right(cum, rng.uniform() * cum[-1]), len(names) - 1)]


class _Extras:
    """Parser and sampler of the blocks added for appearance and structure randomization."""

    def __init__(self, vehicles, pedestrians, appearance, structure, distractors) -> None:
        k = "randomization"
        self.car_shapes = parse_weights(
            vehicles.get("shapes", {"classic": 1.0}), f"{k}.vehicles.shapes", CAR_SHAPES
        )
        self.car_aspect = parse_range(
            vehicles.get("aspect", 1.0), f"{k}.vehicles.aspect", (0.6, 1.6)
        )
        self.person_shapes = parse_weights(
            pedestrians.get("shapes", {"classic": 1.0}), f"{k}.pedestrians.shapes", PERSON_SHAPES
        )
        self.person_aspect = parse_range(
            pedestrians.get("aspect", 1.0), f"{k}.pedestrians.aspect", (0.6, 1.6)
        )
        a = dict(appearance or {})
        textures = a.pop("textures", None) or {}
        if not isinstance(textures, Mapping):
            raise RandomizationError(
                f"{k}.appearance.textures: expected {{surface: {{family: weight}}}}, "
                f"got {textures!r}"
            )
        unknown = sorted(set(textures) - set(SURFACES))
        if unknown:
            raise RandomizationError(
                f"{k}.appearance.textures.{unknown[0]}: unknown surface, expected one of "
                f"{list(SURFACES)}"
            )
        self.textures = {
            s: parse_weights(
                textures.get(s) or {"flat": 1.0}, f"{k}.appearance.textures.{s}", TEXTURE_FAMILIES
            )
            for s in SURFACES
        }
        self.look = _pop_ranges(a, f"{k}.appearance", _APPEARANCE_RANGES)
        self.layout = _pop_ranges(dict(structure or {}), f"{k}.structure", _STRUCTURE_RANGES)
        d = dict(distractors or {})
        self.kinds = parse_weights(
            d.pop("kinds", {"decal": 1.0, "clutter": 1.0}),
            f"{k}.distractors.kinds",
            DISTRACTOR_KINDS,
        )
        self.shapes = parse_weights(
            d.pop("shapes", dict.fromkeys(DISTRACTOR_SHAPES, 1.0)),
            f"{k}.distractors.shapes",
            DISTRACTOR_SHAPES,
        )
        self.clutter = _pop_ranges(d, f"{k}.distractors", _DISTRACTOR_RANGES)

    def photo_only_keys(self) -> list[str]:
        k = "randomization"
        out = [
            f"{k}.appearance.textures.{s}.{f}"
            for s, w in self.textures.items()
            for f in PHOTO_ONLY["textures"]
            if w.get(f, 0) > 0
        ]
        out += [f"{k}.vehicles.shapes.{c}" for c in PHOTO_ONLY["car"] if self.car_shapes.get(c)]
        out += [
            f"{k}.pedestrians.shapes.{c}" for c in PHOTO_ONLY["person"] if self.person_shapes.get(c)
        ]
        return out

    def vehicles(self, rng, vehicles):
        out = []
        for v in vehicles:
            shape = _pick(rng, self.car_shapes)
            aspect = self.car_aspect.sample(rng)
            out.append(
                VehicleSpec(
                    v.type, v.color, v.scale, shape if v.type == "car" else "classic", aspect
                )
            )
        return tuple(out)

    def pedestrians(self, rng, pedestrians):
        return tuple(
            PedestrianSpec(
                p.color,
                p.height_m,
                _pick(rng, self.person_shapes),
                self.person_aspect.sample(rng),
            )
            for p in pedestrians
        )

    def appearance(self, rng) -> Appearance:
        look = {n: r.sample(rng) for n, r in self.look.items()}
        textures = tuple(_pick(rng, self.textures[s]) for s in SURFACES)
        tints = []
        for _ in SURFACES:
            if look["random_color"] > 0 and rng.uniform() < look["random_color"]:
                c = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 0.9), rng.uniform(0.4, 1.0))
                tints.append(tuple(round(2.0 * x, 4) for x in c))
            elif look["color_jitter"] > 0:
                j = look["color_jitter"]
                t = np.exp(rng.normal(0.0, j) + rng.normal(0.0, j / 2, size=3))
                tints.append(tuple(round(float(x), 4) for x in np.clip(t, 0.2, 3.0)))
            else:
                tints.append((1.0, 1.0, 1.0))
        return Appearance(
            look["texture_strength"],
            look["texture_scale"],
            textures,
            tuple(tints),
            look["sun_intensity"],
            look["ambient_intensity"],
        )

    def structure(self, rng) -> Structure:
        return Structure(**{n: r.sample(rng) for n, r in self.layout.items()})

    def distractors(self, rng) -> tuple[DistractorSpec, ...]:
        c = self.clutter
        return tuple(
            DistractorSpec(
                _pick(rng, self.kinds),
                _pick(rng, self.shapes),
                _hsv_color(rng, c["saturation"], c["value"]),
                c["size_m"].sample(rng),
            )
            for _ in range(c["count"].sample(rng))
        )
