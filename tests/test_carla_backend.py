"""CARLA backend: the double against the real ``carla`` API, the real client on a closed
port, the episode flow against the double, synchronous mode and label conversion.

``carla_double`` imports as a top-level module: tests/ has no ``__init__.py``, so pytest
puts tests/ itself on ``sys.path``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import carla_double
import numpy as np
import pytest
from carla_double import FakeServer, WorldSettings

from simulation.carla_backend import (
    CarlaBackend,
    CarlaConnectionError,
    CarlaEpisodeError,
    CarlaError,
    CarlaSpawnError,
    SensorQueues,
    SensorSyncError,
    connect,
    image_to_rgb,
    semantic_to_ids,
    semantic_to_mask,
    synchronous_mode,
)
from simulation.randomization import Weather

try:  # the real client library; only the API-drift and closed-port tests need it
    import carla as real_carla
except ImportError:  # pragma: no cover - carla is a dev dependency
    real_carla = None

needs_carla = pytest.mark.skipif(real_carla is None, reason="the carla package is not installed")

ROOT = Path(__file__).parents[1]
SEED = 7
H, W = 12, 16  # image size (pixels) of every rendered test frame
WARMUP, TICKS_PER_FRAME = 3, 2
SEMANTIC = "sensor.camera.semantic_segmentation"


# --- fixtures -----------------------------------------------------------------------------
# ``taxonomy`` (configs/taxonomy/drive11.yaml) and ``randomizer_full``
# (configs/randomization/full.yaml) are built by conftest.py with hydra's instantiate.
@pytest.fixture(scope="module")
def randomizer(randomizer_full):
    return randomizer_full


@pytest.fixture(scope="module")
def episode(randomizer) -> int:
    """The first dataset index whose scene has traffic and pedestrians (>= 2 and >= 1)."""
    for index in range(500):
        params = randomizer.sample(SEED, index)
        if len(params.vehicles) >= 2 and len(params.pedestrians) >= 1:
            return index
    raise AssertionError("full.yaml never samples traffic and pedestrians together")


@pytest.fixture
def fake_carla(monkeypatch):
    """The double stands in for ``import carla`` inside the backend."""
    monkeypatch.setitem(sys.modules, "carla", carla_double)
    return carla_double


@pytest.fixture
def effects(monkeypatch):
    """An identity ``simulation.sensor.apply_sensor_effects_uint8`` that records its calls,
    so the tests see the pixels the cameras delivered."""
    calls = []

    def apply_sensor_effects_uint8(images, sensors, keys):
        calls.append({"shape": images.shape, "sensors": list(sensors), "keys": list(keys)})
        return images.copy()

    module = types.ModuleType("simulation.sensor")
    module.apply_sensor_effects_uint8 = apply_sensor_effects_uint8
    monkeypatch.setitem(sys.modules, "simulation.sensor", module)
    return calls


def make_backend(server, randomizer, taxonomy, **overrides) -> CarlaBackend:
    args = dict(
        seed=SEED,
        height=H,
        width=W,
        host="127.0.0.1",
        port=2000,
        timeout_s=1.0,
        retries=2,
        backoff_s=0.0,
        warmup_ticks=WARMUP,
        ticks_per_frame=TICKS_PER_FRAME,
        episode_retries=2,
        client_factory=server.client,
    )
    args.update(overrides)
    return CarlaBackend(randomizer, taxonomy, **args)


def assert_clean(server: FakeServer, sensors_stopped: bool = True) -> None:
    """Nothing left behind: no actor alive, settings and Traffic Manager as before, and
    (over a live connection) every sensor stopped before it was destroyed."""
    assert server.actors == {}
    assert server.settings == WorldSettings()
    assert server.tm_sync_history[-1] is False
    if sensors_stopped:
        assert server.destroyed_listening == []


# --- the double cannot drift from the real API ----------------------------------------
def public_names(cls: type) -> set[str]:
    """Methods, properties and annotated instance attributes a class exposes."""
    names = {n for n in dir(cls) if not n.startswith("_")}
    for klass in cls.__mro__:
        names |= {n for n in getattr(klass, "__annotations__", {}) if not n.startswith("_")}
    return names


#: What the backend calls on carla objects; each must exist on the double and the real API.
BACKEND_USES = [
    "Client.set_timeout",
    "Client.get_server_version",
    "Client.get_client_version",
    "Client.get_world",
    "Client.get_available_maps",
    "Client.load_world",
    "Client.get_trafficmanager",
    "Client.apply_batch_sync",
    "World.get_map",
    "World.get_settings",
    "World.apply_settings",
    "World.tick",
    "World.get_blueprint_library",
    "World.spawn_actor",
    "World.try_spawn_actor",
    "World.get_actors",
    "World.set_weather",
    "World.get_random_location_from_navigation",
    "World.set_pedestrians_seed",
    "Map.name",
    "Map.get_spawn_points",
    "WorldSettings.synchronous_mode",
    "WorldSettings.fixed_delta_seconds",
    "WorldSettings.substepping",
    "WorldSettings.max_substep_delta_time",
    "WorldSettings.max_substeps",
    "TrafficManager.set_synchronous_mode",
    "TrafficManager.set_random_device_seed",
    "BlueprintLibrary.filter",
    "BlueprintLibrary.find",
    "ActorBlueprint.id",
    "ActorBlueprint.has_attribute",
    "ActorBlueprint.get_attribute",
    "ActorBlueprint.set_attribute",
    "ActorAttribute.as_str",
    "Actor.id",
    "Vehicle.set_autopilot",
    "Sensor.listen",
    "Sensor.stop",
    "WalkerAIController.start",
    "WalkerAIController.stop",
    "WalkerAIController.go_to_location",
    "WalkerAIController.set_max_speed",
    "Image.frame",
    "Image.width",
    "Image.height",
    "Image.raw_data",
    "Transform.location",
    "Location.x",
    "Rotation.pitch",
    "command.SpawnActor",
    "command.DestroyActor",
    "command.SetAutopilot",
    "command.FutureActor",
    "command.SpawnActor.then",
    "command.Response.actor_id",
    "command.Response.error",
]


def _resolve(module, dotted: str):
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@needs_carla
def test_every_name_of_the_double_exists_in_real_carla():
    missing = []
    for cls in carla_double.API_CLASSES:
        real = getattr(real_carla, cls.__name__, None)
        if real is None:
            missing.append(cls.__name__)
            continue
        missing += [f"{cls.__name__}.{n}" for n in public_names(cls) if not hasattr(real, n)]
    for name, obj in vars(carla_double.command).items():
        real = getattr(real_carla.command, name, None)
        if real is None:
            missing.append(f"command.{name}")
        elif isinstance(obj, type):
            missing += [f"command.{name}.{n}" for n in public_names(obj) if not hasattr(real, n)]
    assert missing == []
    # FutureActor is the real module's placeholder actor id, not a class
    assert carla_double.command.FutureActor == real_carla.command.FutureActor == 0


@needs_carla
def test_what_the_backend_uses_exists_on_double_and_real():
    missing = []
    for dotted in BACKEND_USES:
        owner, name = dotted.rsplit(".", 1)
        if not hasattr(_resolve(real_carla, owner), name):
            missing.append(f"carla.{dotted}")
        double = _resolve(carla_double, owner)
        if name not in (public_names(double) if isinstance(double, type) else vars(double)):
            missing.append(f"carla_double.{dotted}")
    assert missing == []


@needs_carla
def test_weather_and_settings_fields_match_real_carla():
    real_weather = {
        f for f in dir(real_carla.WeatherParameters()) if not f.startswith("_") and f.islower()
    }
    assert real_weather == {f.name for f in dataclasses.fields(Weather)}
    assert real_weather == {f.name for f in dataclasses.fields(carla_double.WeatherParameters)}
    # the project's Weather must construct the real object field for field
    weather = real_carla.WeatherParameters(**dataclasses.asdict(Weather(cloudiness=42.0)))
    assert weather.cloudiness == pytest.approx(42.0)
    assert weather.fog_falloff == pytest.approx(Weather().fog_falloff)
    real_settings = {f for f in dir(real_carla.WorldSettings()) if not f.startswith("_")}
    assert real_settings == {f.name for f in dataclasses.fields(WorldSettings)}
    defaults = real_carla.WorldSettings()
    for f in dataclasses.fields(WorldSettings):
        assert getattr(defaults, f.name) == pytest.approx(f.default), f.name


def _real_overloads(func) -> list[list[str]]:
    """Parameter names (without ``self``) of each overload in a Boost.Python docstring."""
    name = func.__name__
    lines = [ln.strip() for ln in (func.__doc__ or "").splitlines()]
    sigs = [ln for ln in lines if ln.startswith(f"{name}(") and "->" in ln]
    return [[p for _, p in re.findall(r"\((\w+)\)(\w+)", s.split("->")[0])][1:] for s in sigs]


def _double_params(func) -> list[str]:
    params = list(inspect.signature(func).parameters.values())[1:]  # drop self
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY)]


def _fits(double: list[str], real: list[str]) -> bool:
    """Same arity or fewer, and each name equal (Boost leaves some unnamed as argN)."""
    return len(double) <= len(real) and all(
        d == r or re.fullmatch(r"arg\d+", r) for d, r in zip(double, real, strict=False)
    )


@needs_carla
def test_double_signatures_fit_real_carla():
    value_types = {"Location", "Rotation", "Transform", "WeatherParameters", "WorldSettings"}
    classes = [(c, getattr(real_carla, c.__name__)) for c in carla_double.API_CLASSES]
    classes += [
        (obj, getattr(real_carla.command, name))
        for name, obj in vars(carla_double.command).items()
        if isinstance(obj, type)
    ]
    checked, misfits = 0, []
    for cls, real in classes:
        methods = [n for n in public_names(cls) if inspect.isfunction(getattr(cls, n, None))]
        if cls.__name__ in value_types | {"Client", "SpawnActor", "DestroyActor", "SetAutopilot"}:
            methods.append("__init__")  # constructors the backend calls; the rest are internal
        for name in methods:
            overloads = _real_overloads(getattr(real, name))
            double = _double_params(getattr(cls, name))
            checked += 1
            if not any(_fits(double, real_params) for real_params in overloads):
                misfits.append(f"{cls.__name__}.{name}{tuple(double)} vs {overloads}")
    assert misfits == []
    assert checked >= 40  # the parser really read the real signatures


# --- connection -------------------------------------------------------------------------
@needs_carla
def test_real_client_on_a_closed_port_fails_fast_and_clearly():
    with socket.socket() as s:  # a port nobody listens on: bind, read it, release it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(CarlaConnectionError) as info:
        connect("127.0.0.1", port, timeout_s=1.0, retries=2, backoff_s=0.1)
    elapsed = time.monotonic() - start
    assert elapsed < 15.0  # a guard against hangs, not a timing target
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "2 attempt" in message and "1 s time-out" in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_connect_retries_until_the_server_answers():
    server = FakeServer()
    server.unreachable_attempts = 1
    client = connect(
        "127.0.0.1", 2000, timeout_s=1.0, retries=2, backoff_s=0.0, client_cls=server.client
    )
    assert client.get_server_version() == carla_double.SERVER_VERSION
    assert client._timeout == 1.0
    assert server.connections == 1


def test_connect_gives_up_after_its_attempts():
    server = FakeServer()
    server.unreachable_attempts = 5
    with pytest.raises(CarlaConnectionError, match=r"127\.0\.0\.1:2001 .*3 attempt"):
        connect(
            "127.0.0.1", 2001, timeout_s=0.5, retries=3, backoff_s=0.0, client_cls=server.client
        )
    assert server.unreachable_attempts == 2


@pytest.mark.parametrize(
    "kwargs, key",
    [({"timeout_s": 0}, "timeout_s"), ({"retries": 0}, "retries"), ({"backoff_s": -1}, "backoff")],
)
def test_connect_rejects_bad_arguments(kwargs, key):
    with pytest.raises(ValueError, match=key):
        connect("127.0.0.1", 2000, **kwargs)


# --- labels -------------------------------------------------------------------------------
def bgra_image(pixels: list[list[tuple[int, int, int, int]]]):
    """A hand-made camera image: rows of (B, G, R, A) byte tuples."""
    raw = bytes(v for row in pixels for px in row for v in px)
    return types.SimpleNamespace(height=len(pixels), width=len(pixels[0]), raw_data=raw)


def test_rgb_image_bgra_bytes_become_rgb():
    image = bgra_image([[(1, 2, 3, 255), (10, 20, 30, 255), (0, 0, 255, 0)]])
    rgb = image_to_rgb(image)
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    assert rgb.tolist() == [[[3, 2, 1], [30, 20, 10], [255, 0, 0]]]
    assert rgb.flags["C_CONTIGUOUS"] and rgb.flags["WRITEABLE"]  # a copy, not a view


def test_semantic_ids_come_from_the_red_byte_and_map_through_the_taxonomy(taxonomy):
    # red bytes: road 1, sky 11, car 14 / unlabeled 0, road line 24, unknown 200;
    # blue/green carry other data and must not leak into the labels
    image = bgra_image(
        [
            [(99, 98, 1, 255), (0, 0, 11, 255), (7, 7, 14, 255)],
            [(11, 11, 0, 255), (1, 1, 24, 255), (0, 0, 200, 255)],
        ]
    )
    assert semantic_to_ids(image).tolist() == [[1, 11, 14], [0, 24, 200]]
    mask = semantic_to_mask(image, taxonomy)
    road, sky, vehicle = (taxonomy.index(n) for n in ("road", "sky", "vehicle"))
    assert mask.dtype == np.uint8
    assert mask.tolist() == [[road, sky, vehicle], [255, road, 255]]


def test_a_short_buffer_is_rejected():
    image = types.SimpleNamespace(height=2, width=2, raw_data=bytes(15))
    with pytest.raises(ValueError, match="16 BGRA bytes, got 15"):
        image_to_rgb(image)


# --- synchronous mode and sensor queues ---------------------------------------------------
def _world_and_tm(server: FakeServer):
    client = server.client()
    return client.get_world(), client.get_trafficmanager(8000)


def test_synchronous_mode_applies_and_restores_settings():
    server = FakeServer()
    world, tm = _world_and_tm(server)
    with synchronous_mode(world, 0.05, tm) as previous:
        assert previous == WorldSettings()
        assert server.settings.synchronous_mode is True
        assert server.settings.fixed_delta_seconds == 0.05
        assert server.tm_sync_history == [True]
        world.tick()
    assert server.settings == WorldSettings()
    assert server.tm_sync_history == [True, False]


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()])
def test_synchronous_mode_restores_settings_on_errors_and_ctrl_c(error):
    server = FakeServer()
    world, tm = _world_and_tm(server)
    with pytest.raises(type(error)), synchronous_mode(world, 0.1, tm):
        raise error
    assert server.settings == WorldSettings()
    assert server.tm_sync_history == [True, False]


def test_synchronous_mode_keeps_the_original_error_when_restoring_fails():
    server = FakeServer()
    world, tm = _world_and_tm(server)
    server.die_after(ticks=1)
    with pytest.raises(RuntimeError, match="time-out") as info, synchronous_mode(world, 0.05, tm):
        world.tick()
    assert info.traceback[-1].name == "_check"  # raised by the tick, not by the restore
    assert server.settings.synchronous_mode is True  # the dead client could not restore


def test_synchronous_mode_rejects_a_non_positive_step():
    world, _ = _world_and_tm(FakeServer())
    with pytest.raises(ValueError, match="fixed_delta_seconds"), synchronous_mode(world, 0.0):
        pass


class _Sensor:
    def __init__(self) -> None:
        self.callback = None

    def listen(self, callback) -> None:
        self.callback = callback

    def stop(self) -> None:
        self.callback = None

    def emit(self, frame: int) -> None:
        self.callback(types.SimpleNamespace(frame=frame))


def test_sensor_queues_pair_data_by_frame_and_discard_stale_frames():
    a, b = _Sensor(), _Sensor()
    queues = SensorQueues({"a": a, "b": b})
    for frame in (10, 11, 12):
        a.emit(frame)
    b.emit(12)
    data = queues.get_frame(12, timeout_s=0.5)
    assert {k: v.frame for k, v in data.items()} == {"a": 12, "b": 12}
    a.emit(13)
    assert queues.drain() == 1
    assert queues.stop() == [] and a.callback is None and b.callback is None


def test_sensor_queues_detect_a_skipped_frame():
    a = _Sensor()
    queues = SensorQueues({"rgb": a})
    a.emit(20)
    with pytest.raises(SensorSyncError, match="frame id 20 does not match the tick's frame 19"):
        queues.get_frame(19, timeout_s=0.5)


def test_sensor_queues_time_out_when_the_frame_never_comes():
    a = _Sensor()
    queues = SensorQueues({"semantic": a})
    a.emit(18)
    start = time.monotonic()
    with pytest.raises(SensorSyncError, match="'semantic': no data for frame 19 .*last frame 18"):
        queues.get_frame(19, timeout_s=0.2)
    assert time.monotonic() - start < 2.0


# --- the episode flow against the double ------------------------------------------------
def test_render_one_episode(fake_carla, effects, randomizer, taxonomy, episode):
    server = FakeServer()
    backend = make_backend(server, randomizer, taxonomy)
    indices = [episode, episode + 1, episode + 2]
    batch = backend.render(indices)
    params = randomizer.sample(SEED, episode)
    n = len(indices)

    # frames: shapes, and masks through the taxonomy (the double's layout)
    assert batch.images.shape == (n, H, W, 3) and batch.images.dtype == np.uint8
    assert batch.masks.shape == (n, H, W) and batch.masks.dtype == np.uint8
    sky, road, vehicle, person = (taxonomy.index(c) for c in ("sky", "road", "vehicle", "person"))
    assert (batch.masks[:, : H // 2] == sky).all()
    assert (batch.masks[:, H // 2 : H - H // 4] == road).all()
    assert (batch.masks[:, H - H // 4 :, W // 4 : W // 2] == vehicle).all()
    assert (batch.masks[:, H - H // 4 :, W // 2 + 1 :] == person).all()
    # RGB: channel order and timing -- frame k is WARMUP + (k+1)*TICKS_PER_FRAME camera ticks old
    y, x = np.mgrid[0:H, 0:W]
    red = int(params.camera.fov_deg + params.weather.sun_altitude_angle + 90) % 256
    for k in range(n):
        ticks = WARMUP + (k + 1) * TICKS_PER_FRAME
        assert (batch.images[k, ..., 0] == red).all()
        np.testing.assert_array_equal(batch.images[k, ..., 1], (y * 16) % 256)
        np.testing.assert_array_equal(batch.images[k, ..., 2], (x * 8 + ticks) % 256)

    # provenance
    frame_ids = [r["frame_id"] for r in batch.records]
    assert np.diff(frame_ids).tolist() == [TICKS_PER_FRAME] * (n - 1)
    spawned = batch.records[0]["spawned"]
    for index, record in zip(indices, batch.records, strict=True):
        assert record == {
            "index": index,
            "seed": SEED,
            "backend": "carla",
            "backend_version": backend.version,
            "map": params.map,
            "group": params.group,
            "params": params.to_dict(),
            "episode": episode,
            "frame_id": record["frame_id"],
            "episode_attempt": 0,
            "spawned": spawned,
        }
    assert backend.version.endswith("(server 0.9.16)")

    # the world: map, weather, seeds, sensor effects
    assert server.loaded_maps == [params.map]
    assert server.weather == carla_double.WeatherParameters(**dataclasses.asdict(params.weather))
    assert len(server.tm_seeds) == 1 and server.pedestrian_seeds == server.tm_seeds
    assert effects == [
        {
            "shape": (n, H, W, 3),
            "sensors": [params.sensor] * n,
            "keys": [(SEED, i) for i in indices],
        }
    ]

    # actors: ego + NPCs with autopilot, colours and kinds from params, walkers walking,
    # cameras sharing one transform on the ego
    by_kind = {}
    for actor in server.spawned:
        by_kind.setdefault(type(actor).__name__, []).append(actor)
    ego, *npcs = by_kind["Vehicle"]
    assert ego.attributes["base_type"] == "car" and ego.attributes["role_name"] == "hero"
    assert spawned == {"vehicles": len(npcs), "walkers": len(by_kind["Walker"])}
    assert len(npcs) == len(params.vehicles) and len(by_kind["Walker"]) == len(params.pedestrians)
    assert server.autopilot == {v.id: 8000 for v in [ego, *npcs]}
    for spec, npc in zip(params.vehicles, npcs, strict=True):
        assert npc.attributes["base_type"] == spec.type
        if "color" in npc.attributes:
            assert npc.attributes["color"] == ",".join(map(str, spec.color))
    controllers = by_kind["WalkerAIController"]
    assert [c.parent.id for c in controllers] == [w.id for w in by_kind["Walker"]]
    assert (
        set(server.walker_destinations) == set(server.walker_speeds) == {c.id for c in controllers}
    )
    cameras = by_kind["Sensor"]
    assert sorted(c.type_id for c in cameras) == ["sensor.camera.rgb", SEMANTIC]
    assert all(c.parent is ego for c in cameras)
    assert cameras[0].get_transform() == cameras[1].get_transform()
    location = cameras[0].get_transform().location
    assert (location.y, location.z) == (params.camera.lateral_m, params.camera.height_m)
    for c in cameras:
        assert c.attributes["image_size_x"] == str(W) and c.attributes["image_size_y"] == str(H)
        assert float(c.attributes["fov"]) == params.camera.fov_deg

    # teardown: everything destroyed in one batch after controllers and sensors stopped,
    # children before parents, then the settings restored
    assert_clean(server)
    assert server.settings_history[-2].synchronous_mode is True
    assert server.settings_history[-2].fixed_delta_seconds == 0.05
    kinds = [e[0] for e in server.events]
    first_destroy = kinds.index("destroy")
    last_destroy = len(kinds) - 1 - kinds[::-1].index("destroy")
    stops = [i for i, k in enumerate(kinds) if k == "stop"]
    assert len(stops) == len(controllers) + 2 and max(stops) < first_destroy
    assert server.events[-1] == ("settings", False) and len(kinds) - 1 > last_destroy
    destroyed = [e[1] for e in server.events if e[0] == "destroy"]
    assert destroyed[:2] == [c.id for c in reversed(cameras)] and destroyed[-1] == ego.id
    backend.close()
    backend.close()  # idempotent


def test_render_is_deterministic_and_episodes_differ(
    fake_carla, effects, randomizer, taxonomy, episode
):
    a = make_backend(FakeServer(), randomizer, taxonomy).render([episode, episode + 1])
    b = make_backend(FakeServer(), randomizer, taxonomy).render([episode, episode + 1])
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.records == b.records
    c = make_backend(FakeServer(), randomizer, taxonomy).render([episode + 1, episode + 2])
    assert c.records[0]["params"] != a.records[0]["params"]


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()])
def test_an_error_mid_episode_still_destroys_everything(
    fake_carla, effects, randomizer, taxonomy, episode, error
):
    server = FakeServer()
    backend = make_backend(server, randomizer, taxonomy)
    server.raise_after(ticks=WARMUP + 1, error=error)
    with pytest.raises(type(error)):
        backend.render([episode, episode + 1])
    assert len(server.spawned) > 5  # the episode was populated before it failed
    assert_clean(server)
    assert server.connections == 1  # not a lost server: not retried
    assert effects == []
    batch = backend.render([episode])  # the backend is still usable
    assert len(batch) == 1
    assert_clean(server)


def test_a_frame_id_mismatch_is_detected(fake_carla, effects, randomizer, taxonomy, episode):
    server = FakeServer()
    server.frame_offsets[SEMANTIC] = 1  # the semantic camera reports the wrong frame
    backend = make_backend(server, randomizer, taxonomy)
    with pytest.raises(SensorSyncError, match="'semantic': frame id \\d+ does not match"):
        backend.render([episode])
    assert server.connections == 1
    assert_clean(server)


def test_a_sensor_that_never_delivers_the_frame_times_out(
    fake_carla, effects, randomizer, taxonomy, episode
):
    server = FakeServer()
    server.frame_offsets[SEMANTIC] = -1  # always one frame stale
    backend = make_backend(server, randomizer, taxonomy, timeout_s=0.2)
    with pytest.raises(SensorSyncError, match="'semantic': no data for frame"):
        backend.render([episode])
    assert_clean(server)


def test_a_server_death_mid_episode_is_retried(fake_carla, effects, randomizer, taxonomy, episode):
    indices = [episode, episode + 1, episode + 2]
    clean_server = FakeServer()
    clean = make_backend(clean_server, randomizer, taxonomy).render(indices)
    server = FakeServer()
    server.die_after(ticks=WARMUP + 2)  # during the first frame
    backend = make_backend(server, randomizer, taxonomy)
    batch = backend.render(indices)
    assert server.connections == 2
    np.testing.assert_array_equal(batch.images, clean.images)
    np.testing.assert_array_equal(batch.masks, clean.masks)
    for got, want in zip(batch.records, clean.records, strict=True):
        assert got["episode_attempt"] == 1
        assert {k: v for k, v in got.items() if k not in ("frame_id", "episode_attempt")} == {
            k: v for k, v in want.items() if k not in ("frame_id", "episode_attempt")
        }
    # the first attempt's actors (the server kept them) were destroyed after reconnecting
    assert len(server.spawned) == 2 * len(clean_server.spawned)
    # a cut-off client cannot stop its sensors; destroying them after reconnecting does
    assert_clean(server, sensors_stopped=False)
    assert len(effects) == 2  # once per successful render, never for the partial episode


def test_retries_exhausted_is_a_clear_error_and_leftovers_are_cleaned_later(
    fake_carla, effects, randomizer, taxonomy, episode
):
    server = FakeServer()
    server.die_after(ticks=2, times=None)
    backend = make_backend(server, randomizer, taxonomy, episode_retries=1)
    with pytest.raises(CarlaEpisodeError) as info:
        backend.render([episode, episode + 1])
    message = str(info.value)
    assert "127.0.0.1:2000" in message and f"episode {episode}" in message
    assert "all 2 attempt(s)" in message and "time-out" in message
    assert server.connections == 2 and effects == []
    assert server.actors  # the last attempt's actors: the server is unreachable for now
    server.heal()
    batch = backend.render([episode])  # reconnects, undoes the leftovers, then renders
    assert len(batch) == 1
    assert_clean(server, sensors_stopped=False)


def test_a_server_that_never_answers_fails_without_retrying_episodes(
    fake_carla, effects, randomizer, taxonomy
):
    server = FakeServer()
    server.unreachable_attempts = 10
    backend = make_backend(server, randomizer, taxonomy, retries=2, episode_retries=3)
    with pytest.raises(CarlaConnectionError, match=r"127\.0\.0\.1:2000 .*2 attempt"):
        backend.render([0])
    assert server.unreachable_attempts == 8  # one connect() of 2 attempts, not 4 of them


def test_traffic_that_cannot_spawn_is_skipped(fake_carla, effects, randomizer, taxonomy, episode):
    server = FakeServer(spawn_points=4)
    server.occupied = {0, 1, 2}  # the ego finds point 3; every NPC collides
    batch = make_backend(server, randomizer, taxonomy).render([episode])
    assert batch.records[0]["spawned"]["vehicles"] == 0
    assert batch.records[0]["spawned"]["walkers"] == len(
        randomizer.sample(SEED, episode).pedestrians
    )
    assert not (batch.masks == taxonomy.index("vehicle")).any()
    assert_clean(server)


def test_no_free_spawn_point_is_not_retried(fake_carla, effects, randomizer, taxonomy, episode):
    server = FakeServer()
    server.occupied = set(range(len(server.spawn_points)))
    backend = make_backend(server, randomizer, taxonomy)
    with pytest.raises(CarlaSpawnError, match=r"127\.0\.0\.1:2000: no free spawn point"):
        backend.render([episode])
    assert server.connections == 1
    assert_clean(server)


def test_a_map_missing_on_the_server_is_named(fake_carla, effects, randomizer, taxonomy, episode):
    server = FakeServer()
    server.maps = ["Town10HD_Opt"]
    backend = make_backend(server, randomizer, taxonomy)
    with pytest.raises(CarlaError, match="is not installed on the CARLA server 127.0.0.1:2000"):
        backend.render([episode])
    assert server.loaded_maps == [] and server.spawned == []


def test_real_sensor_effects_when_available(fake_carla, randomizer, taxonomy, episode):
    pytest.importorskip("simulation.sensor")
    batch = make_backend(FakeServer(), randomizer, taxonomy).render([episode, episode + 1])
    assert batch.images.shape == (2, H, W, 3) and batch.images.dtype == np.uint8


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"ticks_per_frame": 0}, "ticks_per_frame"),
        ({"height": 0}, "height"),
        ({"width": 12.5}, "width"),
        ({"timeout_s": "10"}, "timeout_s"),
        ({"episode_retries": -1}, "episode_retries"),
        ({"fixed_delta_seconds": 0.0}, "fixed_delta_seconds"),
    ],
)
def test_bad_constructor_arguments_are_named(randomizer, taxonomy, overrides, key):
    with pytest.raises(ValueError, match=f"carla backend.{key}"):
        make_backend(FakeServer(), randomizer, taxonomy, **overrides)


def test_importing_the_backend_does_not_import_carla():
    code = (
        "import sys, simulation.carla_backend as b; "
        "assert 'carla' not in sys.modules, 'carla imported'; "
        "print(b.CarlaBackend.name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "carla"
