from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hydra.utils import instantiate

from simulation.randomization import (
    ALL_GROUPS,
    WEATHER_LIMITS,
    DomainRandomizer,
    RandomizationError,
    SceneParams,
    Weather,
    condition_group,
)
from tests.conftest import load_config

BASE = {"maps": {"Town01": 1.0}, "time_of_day": {"day": 1.0}, "condition": {"clear": 1.0}}


def test_weather_has_exactly_carlas_fields():
    import carla

    real = {f for f in dir(carla.WeatherParameters()) if not f.startswith("_") and f.islower()}
    ours = {f.name for f in dataclasses.fields(Weather)}
    assert ours == real == set(WEATHER_LIMITS)
    carla.WeatherParameters(**dataclasses.asdict(Weather()))  # accepted as keyword arguments


@pytest.mark.parametrize("preset", ["none", "light", "full"])
def test_presets_sample_deterministically(preset):
    r = instantiate(load_config("randomization", preset))
    a = [r.sample(7, i).to_dict() for i in range(20)]
    b = [r.sample(7, i).to_dict() for i in reversed(range(20))][::-1]
    assert a == b  # frame i depends on (seed, i) only, not on sampling order
    assert a != [r.sample(8, i).to_dict() for i in range(20)] or preset == "none"
    for p in a:
        assert p["group"] in r.groups
        for name, (lo, hi) in WEATHER_LIMITS.items():
            assert lo <= p["weather"][name] <= hi


def test_full_preset_reaches_every_condition_group_in_proportion(randomizer_full):
    groups = Counter(randomizer_full.sample(0, i).group for i in range(2000))
    assert set(groups) == set(ALL_GROUPS)
    # time_of_day day 0.5 x condition clear 0.5 -> a quarter of the frames
    assert 0.21 < groups["day-clear"] / 2000 < 0.29
    assert 0.04 < groups["night-fog"] / 2000 < 0.085


def test_none_preset_is_fixed():
    r = instantiate(load_config("randomization", "none"))
    p0, p1 = r.sample(0, 0), r.sample(0, 1)
    assert p0 == p1
    assert p0.group == "day-clear" and p0.map == "Town01"
    assert len(p0.vehicles) == 4 and len(p0.pedestrians) == 2


def test_condition_group_rules():
    assert condition_group(Weather(sun_altitude_angle=45)) == "day-clear"
    assert condition_group(Weather(sun_altitude_angle=5, precipitation=50)) == "dusk-rain"
    assert condition_group(Weather(sun_altitude_angle=-20, fog_density=60)) == "night-fog"
    # rain wins over fog
    assert condition_group(Weather(precipitation=40, fog_density=90)) == "day-rain"


def test_scene_params_round_trip(randomizer_full):
    p = randomizer_full.sample(3, 11)
    assert SceneParams.from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"time_of_day": {"day": 1.5}}, r"time_of_day.day: probability must lie in \[0, 1\]"),
        ({"time_of_day": {"day": 0.5}}, "randomization.time_of_day: probabilities must sum to 1"),
        ({"condition": {"snow": 1.0}}, "randomization.condition.snow: unknown choice"),
        ({"maps": {"Atlantis": 1.0}}, "randomization.maps.Atlantis: unknown choice"),
        ({"camera": {"fov_deg": [100, 80]}}, r"camera.fov_deg: inverted range \[100, 80\]"),
        ({"weather": {"cloudiness": [0, 150]}}, "weather.cloudiness: .* outside the allowed range"),
        ({"vehicles": {"count": [-1, 3]}}, "vehicles.count: .* outside the allowed range"),
        ({"vehicles": {"count": [1.5, 3]}}, "randomization.vehicles.count: expected whole numbers"),
        ({"pedestrians": {"colour": 1}}, "randomization.pedestrians.colour: unknown key"),
        ({"road": {"lanes": "two"}}, "randomization.road.lanes: expected a number or a"),
        ({"sensor": {"iso": 100}}, "randomization.sensor.iso: unknown key"),
        (
            {"weather_by_group": {"rain": {"precipitation": [10, 50]}}, "condition": {"rain": 1.0}},
            "randomization.weather_by_group.rain.precipitation: range .* must lie in",
        ),
        (
            {
                "weather_by_group": {"night": {"sun_altitude_angle": [-10, 10]}},
                "time_of_day": {"night": 1.0},
            },
            "weather_by_group.night.sun_altitude_angle",
        ),
    ],
)
def test_bad_config_names_the_key(override, match):
    with pytest.raises(RandomizationError, match=match):
        DomainRandomizer(**{**BASE, **override})
