"""A test double of the parts of the ``carla`` client API that ``simulation.carla_backend`` uses.

Use it as the ``carla`` module for one test and give the backend a :class:`FakeServer`'s
``client`` as its client factory::

    monkeypatch.setitem(sys.modules, "carla", carla_double)
    server = carla_double.FakeServer()
    backend = CarlaBackend(..., client_factory=server.client)

Every public name of the API classes below also exists on the real ``carla`` module
(``test_carla_backend`` checks names and call signatures against the installed
package), so the double cannot drift from the real API. What a test controls and
inspects -- failures to inject, actors alive, settings history, events in order --
lives on :class:`FakeServer`, which has no counterpart in ``carla``.

The server renders deterministic images: a semantic camera sees sky (``CityObjectLabel``
11) in the top half and road (1) in the bottom half, a car (14) block while NPC
vehicles exist and a pedestrian (12) block while walkers exist; an RGB camera's pixels
depend only on the pixel position, the camera's ticks since it spawned, its fov and the
weather. A rerun of the same episode therefore renders the same images.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import random
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SERVER_VERSION = "0.9.16"
DEFAULT_MAPS = (
    "Town01",
    "Town02",
    "Town03",
    "Town04",
    "Town05",
    "Town06",
    "Town07",
    "Town10HD",
    "Town10HD_Opt",
)

# CityObjectLabel ids the fake semantic camera draws
SKY, ROAD, CAR, PEDESTRIAN = 11, 1, 14, 12


# --- values ----------------------------------------------------------------------------
@dataclass
class Location:
    x: float = 0.0
    y: float = 0.0
    z: float = 0.0


@dataclass
class Rotation:
    pitch: float = 0.0
    yaw: float = 0.0
    roll: float = 0.0


@dataclass
class Transform:
    location: Location = field(default_factory=Location)
    rotation: Rotation = field(default_factory=Rotation)


@dataclass
class WeatherParameters:
    """Same fields, order and constructor defaults as ``carla.WeatherParameters``."""

    cloudiness: float = 0.0
    precipitation: float = 0.0
    precipitation_deposits: float = 0.0
    wind_intensity: float = 0.0
    sun_azimuth_angle: float = 0.0
    sun_altitude_angle: float = 0.0
    fog_density: float = 0.0
    fog_distance: float = 0.0
    fog_falloff: float = 0.0
    wetness: float = 0.0
    scattering_intensity: float = 0.0
    mie_scattering_scale: float = 0.0
    rayleigh_scattering_scale: float = 0.0331
    dust_storm: float = 0.0


@dataclass
class WorldSettings:
    """Same fields and defaults as ``carla.WorldSettings`` (unset time step is ``None``)."""

    synchronous_mode: bool = False
    no_rendering_mode: bool = False
    fixed_delta_seconds: float | None = None
    substepping: bool = True
    max_substep_delta_time: float = 0.01
    max_substeps: int = 10
    max_culling_distance: float = 0.0
    deterministic_ragdolls: bool = False
    tile_stream_distance: float = 3000.0
    actor_active_distance: float = 2000.0
    spectator_as_ego: bool = True


# --- blueprints ------------------------------------------------------------------------
class ActorAttribute:
    id: str
    is_modifiable: bool
    recommended_values: list[str]

    def __init__(self, id: str, value: str, modifiable: bool = True, recommended=()) -> None:
        self.id = id
        self._value = str(value)
        self.is_modifiable = modifiable
        self.recommended_values = list(recommended)

    def as_str(self) -> str:
        return self._value


class ActorBlueprint:
    id: str
    tags: list[str]

    def __init__(self, id: str, attributes: dict[str, tuple[str, bool]]) -> None:
        self.id = id
        self.tags = id.split(".")
        self._attributes = {
            k: ActorAttribute(k, v, modifiable) for k, (v, modifiable) in attributes.items()
        }

    def has_attribute(self, id: str) -> bool:
        return id in self._attributes

    def get_attribute(self, id: str) -> ActorAttribute:
        if id not in self._attributes:
            raise IndexError(f"blueprint '{self.id}' has no attribute '{id}'")
        return self._attributes[id]

    def set_attribute(self, id: str, value: str) -> None:
        attribute = self.get_attribute(id)
        if not attribute.is_modifiable:
            raise ValueError(f"attribute '{id}' of '{self.id}' is not modifiable")
        if not isinstance(value, str):  # the real binding only takes strings
            raise TypeError(f"set_attribute('{id}', ...): expected str, got {type(value)}")
        attribute._value = value

    def _snapshot(self) -> dict[str, str]:
        return {k: a.as_str() for k, a in self._attributes.items()}


class BlueprintLibrary:
    def __init__(self, blueprints: Iterable[ActorBlueprint]) -> None:
        self._blueprints = [copy.deepcopy(bp) for bp in blueprints]

    def filter(self, wildcard_pattern: str) -> BlueprintLibrary:
        return BlueprintLibrary(
            bp
            for bp in self._blueprints
            if fnmatch.fnmatch(bp.id, wildcard_pattern)
            or any(fnmatch.fnmatch(t, wildcard_pattern) for t in bp.tags)
        )

    def find(self, id: str) -> ActorBlueprint:
        for bp in self._blueprints:
            if bp.id == id:
                return copy.deepcopy(bp)
        raise IndexError(f"blueprint '{id}' not found")

    def __iter__(self) -> Iterator[ActorBlueprint]:
        return iter(self._blueprints)

    def __len__(self) -> int:
        return len(self._blueprints)

    def __getitem__(self, i: int) -> ActorBlueprint:
        return self._blueprints[i]


def _vehicle(id: str, base_type: str | None, wheels: int = 4, color: bool = True):
    attrs = {"number_of_wheels": (str(wheels), False), "role_name": ("autopilot", True)}
    if base_type is not None:
        attrs["base_type"] = (base_type, False)
    if color:
        attrs["color"] = ("0,0,0", True)
    return ActorBlueprint(id, attrs)


def _camera(id: str) -> ActorBlueprint:
    return ActorBlueprint(
        id,
        {
            "image_size_x": ("800", True),
            "image_size_y": ("600", True),
            "fov": ("90.0", True),
            "sensor_tick": ("0.0", True),
            "role_name": ("front", True),
        },
    )


def default_blueprints() -> list[ActorBlueprint]:
    """A small library shaped like CARLA 0.9.16's (ids, ``base_type``, ``color``)."""
    return [
        _vehicle("vehicle.tesla.model3", "car"),
        _vehicle("vehicle.audi.a2", "car"),
        _vehicle("vehicle.lincoln.mkz_2020", "car"),
        _vehicle("vehicle.mercedes.sprinter", "van"),
        _vehicle("vehicle.carlamotors.carlacola", "truck"),
        _vehicle("vehicle.mitsubishi.fusorosa", "bus"),
        _vehicle("vehicle.yamaha.yzf", "motorcycle", wheels=2),
        _vehicle("vehicle.bh.crossbike", "bicycle", wheels=2, color=False),
        ActorBlueprint("walker.pedestrian.0001", {"is_invincible": ("true", True)}),
        ActorBlueprint("walker.pedestrian.0002", {"is_invincible": ("true", True)}),
        ActorBlueprint("controller.ai.walker", {}),
        _camera("sensor.camera.rgb"),
        _camera("sensor.camera.semantic_segmentation"),
    ]


# --- actors ------------------------------------------------------------------------------
class Actor:
    id: int
    type_id: str
    attributes: dict[str, str]

    def __init__(self, server: FakeServer, session: int, id: int, bp, transform, parent):
        self._server, self._session = server, session
        self.id = id
        self.type_id = bp.id
        self.attributes = bp._snapshot()
        self._transform = transform
        self._parent = parent
        self._alive = True

    @property
    def parent(self) -> Actor | None:
        return self._parent

    @property
    def is_alive(self) -> bool:
        return self._alive

    def get_transform(self) -> Transform:
        return self._transform

    def get_location(self) -> Location:
        return self._transform.location

    def destroy(self) -> bool:
        self._server._check(self._session)
        return self._server._destroy(self.id)


class Vehicle(Actor):
    def set_autopilot(self, enabled: bool = True, tm_port: int = 8000) -> None:
        self._server._check(self._session)
        self._server._set_autopilot(self.id, enabled, tm_port)


class Walker(Actor):
    pass


class WalkerAIController(Actor):
    def start(self) -> None:
        self._server._check(self._session)
        self._server.events.append(("start", self.id))

    def stop(self) -> None:
        self._server._check(self._session)
        self._server.events.append(("stop", self.id))

    def go_to_location(self, destination: Location) -> None:
        self._server._check(self._session)
        self._server.walker_destinations[self.id] = destination

    def set_max_speed(self, speed: float) -> None:
        self._server._check(self._session)
        self._server.walker_speeds[self.id] = speed


class Sensor(Actor):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._callback: Callable[[Image], None] | None = None
        self._ticks = 0  # ticks since spawn: the fake image depends on it, not on the frame id

    @property
    def is_listening(self) -> bool:
        return self._callback is not None

    def listen(self, callback: Callable[[Image], None]) -> None:
        self._server._check(self._session)
        self._callback = callback

    def stop(self) -> None:
        self._server._check(self._session)
        self._callback = None
        self._server.events.append(("stop", self.id))


class ActorList:
    def __init__(self, actors: Iterable[Actor]) -> None:
        self._actors = list(actors)

    def find(self, id: int) -> Actor | None:
        return next((a for a in self._actors if a.id == id), None)

    def filter(self, wildcard_pattern: str) -> ActorList:
        return ActorList(a for a in self._actors if fnmatch.fnmatch(a.type_id, wildcard_pattern))

    def __iter__(self) -> Iterator[Actor]:
        return iter(self._actors)

    def __len__(self) -> int:
        return len(self._actors)

    def __getitem__(self, i: int) -> Actor:
        return self._actors[i]


@dataclass
class Image:
    """Sensor data of a camera: ``raw_data`` is ``height * width`` BGRA pixels."""

    frame: int
    timestamp: float
    width: int
    height: int
    fov: float
    raw_data: bytes


# --- carla.command ---------------------------------------------------------------------
class _SpawnActor:
    transform: Transform
    parent_id: int
    attachment_type: Any
    socket_name: str

    def __init__(self, blueprint: ActorBlueprint, transform: Transform, parent=None) -> None:
        # the real command copies the blueprint's description at construction
        self._blueprint = copy.deepcopy(blueprint)
        self.transform = transform
        self.parent_id = parent.id if isinstance(parent, Actor) else int(parent or 0)
        self.attachment_type = None
        self.socket_name = ""
        self._then: list[Any] = []

    def then(self, command: Any) -> _SpawnActor:
        self._then.append(command)
        return self


class _DestroyActor:
    actor_id: int

    def __init__(self, actor: Actor | int) -> None:
        self.actor_id = actor.id if isinstance(actor, Actor) else int(actor)


class _SetAutopilot:
    actor_id: int
    enabled: bool
    tm_port: int

    def __init__(self, actor: Actor | int, enabled: bool, tm_port: int = 8000) -> None:
        self.actor_id = actor.id if isinstance(actor, Actor) else int(actor)
        self.enabled = bool(enabled)
        self.tm_port = int(tm_port)


class _Response:
    actor_id: int
    error: str

    def __init__(self, actor_id: int, error: str = "") -> None:
        self.actor_id = actor_id
        self.error = error

    def has_error(self) -> bool:
        return bool(self.error)


_SpawnActor.__name__ = "SpawnActor"
_DestroyActor.__name__ = "DestroyActor"
_SetAutopilot.__name__ = "SetAutopilot"
_Response.__name__ = "Response"

#: ``carla.command``: ``FutureActor`` is the real module's placeholder id 0 for "the actor
#: the enclosing SpawnActor creates".
command = types.SimpleNamespace(
    SpawnActor=_SpawnActor,
    DestroyActor=_DestroyActor,
    SetAutopilot=_SetAutopilot,
    Response=_Response,
    FutureActor=0,
)


# --- world, map, traffic manager, client -------------------------------------------------
class Map:
    name: str

    def __init__(self, name: str, spawn_points: list[Transform]) -> None:
        self.name = name
        self._spawn_points = spawn_points

    def get_spawn_points(self) -> list[Transform]:
        return [copy.deepcopy(t) for t in self._spawn_points]


class TrafficManager:
    def __init__(self, server: FakeServer, session: int, port: int) -> None:
        self._server, self._session, self._port = server, session, port

    def get_port(self) -> int:
        return self._port

    def set_synchronous_mode(self, mode_switch: bool) -> None:
        self._server._check(self._session)
        self._server.tm_sync_history.append(bool(mode_switch))

    def set_random_device_seed(self, value: int) -> None:
        self._server._check(self._session)
        self._server.tm_seeds.append(int(value))


class World:
    id: int

    def __init__(self, server: FakeServer, session: int) -> None:
        self._server, self._session = server, session
        self.id = server._world_id

    def get_map(self) -> Map:
        self._server._check(self._session)
        return Map(self._server.map_name, self._server.spawn_points)

    def get_settings(self) -> WorldSettings:
        self._server._check(self._session)
        return dataclasses.replace(self._server.settings)

    def apply_settings(self, settings: WorldSettings, seconds: float = 0.0) -> int:
        self._server._check(self._session)
        self._server._apply_settings(settings)
        return self._server.frame

    def tick(self, seconds: float = 0.0) -> int:
        return self._server._world_tick(self._session)

    def get_blueprint_library(self) -> BlueprintLibrary:
        self._server._check(self._session)
        return BlueprintLibrary(self._server.blueprints)

    def spawn_actor(self, blueprint, transform, attach_to=None, attachment_type=None) -> Actor:
        actor = self.try_spawn_actor(blueprint, transform, attach_to, attachment_type)
        if actor is None:
            raise RuntimeError("Spawn failed because of collision at spawn position")
        return actor

    def try_spawn_actor(self, blueprint, transform, attach_to=None, attachment_type=None):
        self._server._check(self._session)
        actor, _error = self._server._spawn(self._session, blueprint, transform, attach_to)
        return actor

    def get_actors(self, actor_ids: Iterable[int] | None = None) -> ActorList:
        self._server._check(self._session)
        alive = self._server.actors
        ids = sorted(alive) if actor_ids is None else [i for i in actor_ids if i in alive]
        return ActorList(alive[i] for i in ids)

    def set_weather(self, weather: WeatherParameters) -> None:
        self._server._check(self._session)
        self._server.weather = dataclasses.replace(weather)

    def get_weather(self) -> WeatherParameters:
        self._server._check(self._session)
        return dataclasses.replace(self._server.weather)

    def get_random_location_from_navigation(self) -> Location | None:
        self._server._check(self._session)
        rng = self._server._navigation
        return Location(rng.uniform(-100, 100), rng.uniform(-100, 100), 0.5)

    def set_pedestrians_seed(self, seed: int) -> None:
        self._server._check(self._session)
        self._server.pedestrian_seeds.append(int(seed))
        self._server._navigation = random.Random(int(seed))


class Client:
    """A client of a :class:`FakeServer`; one built directly (no server) never connects."""

    def __init__(self, host: str = "127.0.0.1", port: int = 2000, worker_threads: int = 0):
        self._host, self._port = host, int(port)
        self._server: FakeServer | None = None
        self._session = -1
        self._timeout = 5.0

    def set_timeout(self, seconds: float) -> None:
        self._timeout = float(seconds)

    def _check(self) -> FakeServer:
        if self._server is None:
            raise RuntimeError(
                f"time-out of {int(self._timeout * 1000)}ms while waiting for the simulator, "
                f"make sure the simulator is ready and connected to {self._host}:{self._port}"
            )
        self._server._check(self._session)
        return self._server

    def get_server_version(self) -> str:
        return self._check().version

    def get_client_version(self) -> str:
        return SERVER_VERSION

    def get_world(self) -> World:
        return World(self._check(), self._session)

    def get_available_maps(self) -> list[str]:
        return [f"/Game/Carla/Maps/{m}" for m in self._check().maps]

    def load_world(self, map_name: str, reset_settings: bool = True, map_layers=None) -> World:
        server = self._check()
        server._load_world(map_name, reset_settings)
        return World(server, self._session)

    def get_trafficmanager(self, port: int = 8000) -> TrafficManager:
        return TrafficManager(self._check(), self._session, int(port))

    def apply_batch_sync(self, commands: Iterable[Any], do_tick: bool = False) -> list[_Response]:
        server = self._check()
        responses = [server._apply_command(self._session, c) for c in commands]
        if do_tick:
            server._tick()
        return responses

    def apply_batch(self, commands: Iterable[Any], do_tick: bool = False) -> None:
        self.apply_batch_sync(commands, do_tick)


#: The double's classes that mirror ``carla.<name>``; ``command`` mirrors ``carla.command``.
API_CLASSES = (
    Location,
    Rotation,
    Transform,
    WeatherParameters,
    WorldSettings,
    ActorAttribute,
    ActorBlueprint,
    BlueprintLibrary,
    Actor,
    Vehicle,
    Walker,
    WalkerAIController,
    Sensor,
    ActorList,
    Image,
    Map,
    TrafficManager,
    World,
    Client,
)


# --- the fake simulator (test control; not part of the carla API) ----------------------
class FakeServer:
    """The simulator behind the double's clients: state, failures to inject, records.

    Args:
        map_name: the map loaded at start (CARLA 0.9.16 starts in ``Town10HD_Opt``).
        spawn_points: how many vehicle spawn points every map has.

    Records (read by tests): ``settings_history`` (a copy per ``apply_settings``),
    ``tm_sync_history``, ``tm_seeds``, ``pedestrian_seeds``, ``loaded_maps``, ``actors``
    (alive, by id), ``spawned`` (every actor ever), ``autopilot`` (id -> TM port),
    ``walker_destinations``, ``walker_speeds``, ``connections``, ``destroyed_listening``
    (sensors destroyed while still listening), and ``events``: ordered
    ``("spawn" | "destroy" | "stop" | "start" | "tick" | "settings", value)`` pairs.
    """

    def __init__(self, map_name: str = "Town10HD_Opt", spawn_points: int = 12) -> None:
        self.version = SERVER_VERSION
        self.maps = list(DEFAULT_MAPS)
        self.map_name = f"Carla/Maps/{map_name}"
        self.spawn_points = [
            Transform(Location(10.0 * i, 5.0 * (i % 3), 0.3), Rotation(yaw=90.0 * (i % 4)))
            for i in range(spawn_points)
        ]
        self.blueprints = default_blueprints()
        self.settings = WorldSettings()
        self.weather = WeatherParameters()
        self.frame = 5000  # CARLA frame ids count from server start, never from 0 here
        self.actors: dict[int, Actor] = {}
        self.spawned: list[Actor] = []
        self.settings_history: list[WorldSettings] = []
        self.tm_sync_history: list[bool] = []
        self.tm_seeds: list[int] = []
        self.pedestrian_seeds: list[int] = []
        self.loaded_maps: list[str] = []
        self.autopilot: dict[int, int] = {}
        self.walker_destinations: dict[int, Location] = {}
        self.walker_speeds: dict[int, float] = {}
        self.events: list[tuple[str, Any]] = []
        self.destroyed_listening: list[int] = []  # sensors destroyed without stop() first
        self.connections = 0
        # failure injection
        self.unreachable_attempts = 0  # the next N connection attempts time out
        self.occupied: set[int] = set()  # spawn point indices where every spawn collides
        self.frame_offsets: dict[str, int] = {}  # sensor blueprint id -> frame id error
        self._death: tuple[int, int | None] | None = None  # (after ticks, times left)
        self._raise: tuple[int, BaseException] | None = None
        self._session = 0  # bumped when the server "dies": older clients are cut off
        self._session_ticks = 0  # world.tick() calls on the current session
        self._world_id = 1
        self._next_id = 100
        self._navigation = random.Random(0)

    # -- test controls
    def client(self, host: str = "127.0.0.1", port: int = 2000) -> Client:
        """The client factory handed to the backend: a client of this server."""
        client = Client(host, port)
        if self.unreachable_attempts > 0:  # left unbound: it times out like a dead port
            self.unreachable_attempts -= 1
            return client
        client._server, client._session = self, self._session
        self._session_ticks = 0
        self.connections += 1
        return client

    def die_after(self, ticks: int, times: int | None = 1) -> None:
        """Cut every client off at its session's ``ticks``-th ``world.tick()`` (raising the
        client's time-out ``RuntimeError``), ``times`` times (``None``: always). Actors and
        settings survive, as when the server hangs or the network drops."""
        self._death = (ticks, times)

    def raise_after(self, ticks: int, error: BaseException) -> None:
        """Raise ``error`` once from the ``ticks``-th ``world.tick()`` of the session."""
        self._raise = (ticks, error)

    def heal(self) -> None:
        """Cancel scheduled deaths and raises."""
        self._death = self._raise = None

    # -- server side of the API
    def _check(self, session: int) -> None:
        if session != self._session:
            raise RuntimeError(
                "time-out of 10000ms while waiting for the simulator, make sure the "
                "simulator is ready and connected to 127.0.0.1:2000"
            )

    def _apply_settings(self, settings: WorldSettings) -> None:
        self.settings = dataclasses.replace(settings)
        self.settings_history.append(dataclasses.replace(settings))
        self.events.append(("settings", settings.synchronous_mode))

    def _load_world(self, map_name: str, reset_settings: bool) -> None:
        if map_name not in self.maps:
            raise RuntimeError(f"map '{map_name}' not found")
        for actor_id in list(self.actors):  # a new world has none of the old actors
            self.actors.pop(actor_id)._alive = False
        self.map_name = f"Carla/Maps/{map_name}"
        self.loaded_maps.append(map_name)
        self._world_id += 1
        if reset_settings:
            self._apply_settings(WorldSettings())

    def _world_tick(self, session: int) -> int:
        self._check(session)
        self._session_ticks += 1
        if self._death is not None and self._session_ticks >= self._death[0]:
            after, times = self._death
            if times is not None:
                self._death = None if times <= 1 else (after, times - 1)
            self._session += 1
            self._check(session)  # raises: this client is cut off now
        if self._raise is not None and self._session_ticks >= self._raise[0]:
            error, self._raise = self._raise[1], None
            raise error
        # a misuse of the API, not a server failure: must not look like the client's errors
        assert self.settings.synchronous_mode, "world.tick() called in asynchronous mode"
        return self._tick()

    def _tick(self) -> int:
        self.frame += 1
        self.events.append(("tick", self.frame))
        for actor in list(self.actors.values()):
            if isinstance(actor, Sensor):
                actor._ticks += 1
                if actor._callback is not None:
                    actor._callback(self._render(actor))
        return self.frame

    def _spawn(self, session, blueprint, transform, parent) -> tuple[Actor | None, str]:
        parent_id = parent.id if isinstance(parent, Actor) else int(parent or 0)
        if parent_id and parent_id not in self.actors:
            return None, f"parent actor {parent_id} not found"
        kind = blueprint.id.split(".")[0]
        if kind == "vehicle":
            taken = [self.spawn_points[i].location for i in self.occupied] + [
                a.get_location() for a in self.actors.values() if isinstance(a, Vehicle)
            ]
            if transform.location in taken:
                return None, "Spawn failed because of collision at spawn position"
        cls = {"vehicle": Vehicle, "walker": Walker, "sensor": Sensor}.get(kind, Actor)
        if blueprint.id == "controller.ai.walker":
            cls = WalkerAIController
        actor = cls(self, session, self._next_id, blueprint, transform, self.actors.get(parent_id))
        self._next_id += 1
        self.actors[actor.id] = actor
        self.spawned.append(actor)
        self.events.append(("spawn", actor.id))
        return actor, ""

    def _destroy(self, actor_id: int) -> bool:
        actor = self.actors.pop(actor_id, None)
        if actor is None:
            return False
        actor._alive = False
        if isinstance(actor, Sensor) and actor.is_listening:
            self.destroyed_listening.append(actor_id)
            actor._callback = None  # a destroyed sensor streams nothing
        self.events.append(("destroy", actor_id))
        return True

    def _set_autopilot(self, actor_id: int, enabled: bool, tm_port: int) -> None:
        if enabled:
            self.autopilot[actor_id] = tm_port
        else:
            self.autopilot.pop(actor_id, None)

    def _apply_command(self, session: int, cmd: Any) -> _Response:
        if isinstance(cmd, _SpawnActor):
            actor, error = self._spawn(session, cmd._blueprint, cmd.transform, cmd.parent_id)
            if actor is None:
                return _Response(0, error)
            for then in cmd._then:
                if then.actor_id == command.FutureActor:
                    then.actor_id = actor.id
                self._apply_command(session, then)
            return _Response(actor.id)
        if isinstance(cmd, _DestroyActor):
            if self._destroy(cmd.actor_id):
                return _Response(cmd.actor_id)
            return _Response(cmd.actor_id, f"actor {cmd.actor_id} not found")
        if isinstance(cmd, _SetAutopilot):
            self._set_autopilot(cmd.actor_id, cmd.enabled, cmd.tm_port)
            return _Response(cmd.actor_id)
        raise TypeError(f"the double does not model command {type(cmd).__name__}")

    def _render(self, sensor: Sensor) -> Image:
        w = int(sensor.attributes["image_size_x"])
        h = int(sensor.attributes["image_size_y"])
        fov = float(sensor.attributes["fov"])
        bgra = np.zeros((h, w, 4), dtype=np.uint8)
        bgra[..., 3] = 255
        if sensor.type_id == "sensor.camera.semantic_segmentation":
            red = np.full((h, w), ROAD, dtype=np.uint8)
            red[: h // 2] = SKY
            others = [a for a in self.actors.values() if a is not sensor.parent]
            if any(isinstance(a, Vehicle) for a in others):
                red[h - h // 4 :, w // 4 : w // 2] = CAR
            if any(isinstance(a, Walker) for a in others):
                red[h - h // 4 :, w // 2 + 1 :] = PEDESTRIAN
            bgra[..., 2] = red
            bgra[..., 0], bgra[..., 1] = 0x5A, 0x37  # not labels: must be ignored
        else:
            y, x = np.mgrid[0:h, 0:w]
            bgra[..., 0] = (x * 8 + sensor._ticks) % 256
            bgra[..., 1] = (y * 16) % 256
            bgra[..., 2] = int(fov + self.weather.sun_altitude_angle + 90) % 256
        return Image(
            frame=self.frame + self.frame_offsets.get(sensor.type_id, 0),
            timestamp=self.frame * (self.settings.fixed_delta_seconds or 0.0),
            width=w,
            height=h,
            fov=fov,
            raw_data=bgra.tobytes(),
        )
