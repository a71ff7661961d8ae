"""The CARLA backend: one synchronous-mode episode per :meth:`CarlaBackend.render` call.

An episode is one scene -- map, weather, ego car with two cameras, traffic and
pedestrians -- sampled by the shared :class:`~simulation.randomization.DomainRandomizer`
at the episode's first dataset index. The world steps in synchronous mode at a fixed
time step; after ``warmup_ticks`` (vehicles settle on the road, autopilots start) every
frame is ``ticks_per_frame`` ticks later than the previous one, and its RGB and semantic
images are matched by frame id. Every actor is destroyed and the world's settings are
restored when the episode ends, however it ends.

Parts of :class:`~simulation.randomization.SceneParams` CARLA cannot apply are still
recorded in each frame's provenance but not used: road geometry (the map fixes it),
vehicle size scale, and pedestrian colour and height (walker blueprints are fixed
meshes; a walker blueprint is drawn instead).

``carla`` is imported only inside methods, so the project imports without it.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from simulation.carla_backend.connection import CarlaConnectionError, CarlaError, connect
from simulation.carla_backend.labels import image_to_rgb, semantic_to_mask
from simulation.carla_backend.sync import SensorQueues, synchronous_mode
from simulation.frames import FrameBatch
from simulation.randomization import Camera, DomainRandomizer, PedestrianSpec, VehicleSpec
from simulation.taxonomy import Taxonomy

if TYPE_CHECKING:
    import carla

    from simulation.randomization import SceneParams

log = logging.getLogger(__name__)

#: Mixed into the episode's seed sequence so its draws differ from the randomizer's.
EPISODE_RNG_KEY = 0xCA81A
#: Camera mount ahead of the vehicle's origin (m): about the windscreen of a car.
CAMERA_FORWARD_M = 0.8
#: Seconds a map load may take; far longer than an ordinary RPC.
MAP_LOAD_TIMEOUT_S = 120.0
#: Walking speed of pedestrians (m/s).
WALKER_SPEED_MPS = 1.4
#: ``(name, blueprint id)`` of the two cameras; they share one transform and intrinsics.
CAMERAS = (("rgb", "sensor.camera.rgb"), ("semantic", "sensor.camera.semantic_segmentation"))


class CarlaSpawnError(CarlaError):
    """The ego vehicle could not be spawned (no blueprint, or every spawn point taken)."""


class CarlaEpisodeError(CarlaError):
    """An episode failed on every attempt (the server kept dying or could not be reached)."""


@dataclass
class _EpisodeActors:
    """What one episode attempt put into the world, so it can be undone -- also after a
    reconnect when the attempt lost its server."""

    ids: list[int] = field(default_factory=list)  # in spawn order; destroyed in reverse
    controllers: list[Any] = field(default_factory=list)  # walker AI controllers
    queues: SensorQueues | None = None
    settings: Any = None  # carla.WorldSettings in force before the episode


@dataclass
class _Episode:
    map: str
    images: np.ndarray  # (N, H, W, 3) uint8 RGB
    masks: np.ndarray  # (N, H, W) uint8 taxonomy indices
    frame_ids: list[int]
    spawned: dict[str, int]


def _lost_server(err: BaseException) -> bool:
    """The client's own ``RuntimeError`` (time-out, connection reset): the server is gone or
    unresponsive. Our errors (:class:`CarlaError`) are decisions, not lost servers."""
    return isinstance(err, RuntimeError) and not isinstance(err, CarlaError)


def _base_type(blueprint: carla.ActorBlueprint) -> str | None:
    """A vehicle blueprint's ``base_type`` (``car``, ``van``, ...); ``None`` on servers
    older than 0.9.14, which do not define it."""
    if not blueprint.has_attribute("base_type"):
        return None
    return blueprint.get_attribute("base_type").as_str().strip().lower()


def _client_version() -> str:
    try:
        return importlib.metadata.version("carla")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class CarlaBackend:
    """Frames from a CARLA server, one episode per :meth:`render` call.

    Args:
        randomizer: samples the episode's scene at ``(seed, indices[0])``.
        taxonomy: maps CARLA ``CityObjectLabel`` ids to training indices.
        seed: dataset seed; with the episode index it seeds every choice made here.
        height, width: image size in pixels.
        host, port: the server's RPC address.
        timeout_s: seconds any RPC and any wait for sensor data may take.
        retries: connection attempts per (re)connect.
        backoff_s: seconds between connection attempts.
        fixed_delta_seconds: simulated seconds per tick (synchronous mode).
        warmup_ticks: ticks run and discarded before the first frame.
        ticks_per_frame: ticks from one captured frame to the next (>= 1).
        episode_retries: how many times an episode is rerun from scratch after the server
            died during it.
        tm_port: Traffic Manager port.
        client_factory: builds an unconnected client from ``(host, port)``;
            ``carla.Client`` by default (tests pass a double's).

    Example:
        >>> backend = CarlaBackend(randomizer, taxonomy, seed=0, height=256, width=512)
        >>> batch = backend.render(range(0, 20))  # one 20-frame episode
        >>> backend.close()
    """

    name = "carla"

    def __init__(
        self,
        randomizer: DomainRandomizer,
        taxonomy: Taxonomy,
        seed: int,
        height: int,
        width: int,
        host: str = "localhost",
        port: int = 2000,
        timeout_s: float = 10.0,
        retries: int = 3,
        fixed_delta_seconds: float = 0.05,
        warmup_ticks: int = 10,
        ticks_per_frame: int = 5,
        episode_retries: int = 2,
        tm_port: int = 8000,
        client_factory: Callable[[str, int], Any] | None = None,
        backoff_s: float = 1.0,
    ) -> None:
        whole = {
            "seed": (seed, 0),
            "height": (height, 1),
            "width": (width, 1),
            "port": (port, 1),
            "retries": (retries, 1),
            "warmup_ticks": (warmup_ticks, 0),
            "ticks_per_frame": (ticks_per_frame, 1),
            "episode_retries": (episode_retries, 0),
            "tm_port": (tm_port, 1),
        }
        for key, (value, minimum) in whole.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, int | np.integer)
                or value < minimum
            ):
                raise ValueError(
                    f"carla backend.{key}: expected a whole number >= {minimum}, got {value!r}"
                )
        seconds = {
            "timeout_s": (timeout_s, False),
            "fixed_delta_seconds": (fixed_delta_seconds, False),
            "backoff_s": (backoff_s, True),
        }
        for key, (value, zero_ok) in seconds.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (value >= 0 if zero_ok else value > 0)
            ):
                expected = "seconds >= 0" if zero_ok else "seconds > 0"
                raise ValueError(f"carla backend.{key}: expected {expected}, got {value!r}")
        self.randomizer = randomizer
        self.taxonomy = taxonomy
        self.seed = int(seed)
        self.height, self.width = int(height), int(width)
        self.host, self.port = str(host), int(port)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.fixed_delta_seconds = float(fixed_delta_seconds)
        self.warmup_ticks = int(warmup_ticks)
        self.ticks_per_frame = int(ticks_per_frame)
        self.episode_retries = int(episode_retries)
        self.tm_port = int(tm_port)
        self._client_factory = client_factory
        self._client: Any = None
        self._server_version: str | None = None
        # actors and settings of an attempt that lost its server, undone after reconnecting
        self._leftovers: _EpisodeActors | None = None

    # --- public -----------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def version(self) -> str:
        """The ``carla`` client package version, plus the server's once connected."""
        client = _client_version()
        return f"{client} (server {self._server_version})" if self._server_version else client

    def render(self, indices: Sequence[int]) -> FrameBatch:
        """Render one episode whose frames get these dataset indices.

        The scene is ``randomizer.sample(seed, indices[0])``; frame ``k`` is captured
        ``warmup_ticks + (k + 1) * ticks_per_frame`` ticks after the actors are spawned.

        Returns:
            ``len(indices)`` frames: ``(N, H, W, 3) uint8`` RGB after sensor effects,
            ``(N, H, W) uint8`` taxonomy masks, and provenance records.

        Raises:
            CarlaConnectionError: the server never answered.
            CarlaEpisodeError: the server died during every one of the
                ``1 + episode_retries`` attempts; names ``host:port`` and the episode.
            CarlaSpawnError, SensorSyncError: not retried (they would fail again).
        """
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("indices: expected at least one dataset index")
        # imported now so a missing module fails before a minute of simulation, not after
        from simulation.sensor import apply_sensor_effects_uint8

        episode = indices[0]
        params = self.randomizer.sample(self.seed, episode)
        attempts = self.episode_retries + 1
        last_error: BaseException | None = None
        for attempt in range(attempts):
            try:
                result = self._run_episode(self._ensure_client(), params, indices)
            except CarlaConnectionError as err:
                if last_error is None:  # never reached the server: nothing to retry
                    raise
                last_error = err  # reconnecting after a crash; the server may be restarting
            except BaseException as err:
                if not _lost_server(err):
                    raise
                last_error = err
                log.warning(
                    "CARLA server %s died during episode %d (attempt %d/%d): %s",
                    self.address,
                    episode,
                    attempt + 1,
                    attempts,
                    err,
                )
                self._client = None  # its connection is unusable; reconnect next attempt
            else:
                break
        else:
            raise CarlaEpisodeError(
                f"CARLA server {self.address}: episode {episode} (dataset indices "
                f"{indices[0]}..{indices[-1]}, map {params.map}) failed on all {attempts} "
                f"attempt(s); last error: {last_error}"
            ) from last_error

        n = len(indices)
        images = apply_sensor_effects_uint8(
            result.images, [params.sensor] * n, keys=[(self.seed, i) for i in indices]
        )
        version = self.version
        records = [
            {
                "index": index,
                "seed": self.seed,
                "backend": self.name,
                "backend_version": version,
                "map": result.map,
                "group": params.group,
                "params": params.to_dict(),
                "episode": episode,
                "frame_id": frame_id,
                "episode_attempt": attempt,  # 0 = first try
                "spawned": dict(result.spawned),
            }
            for index, frame_id in zip(indices, result.frame_ids, strict=True)
        ]
        return FrameBatch(images, result.masks, records)

    def prepare(self) -> None:
        """Connect now, so an unreachable server stops the run before any shard is
        written (raises :class:`CarlaConnectionError` naming ``host:port``)."""
        self._ensure_client()

    def close(self) -> None:
        """Forget the client (undoing a crashed episode's leftovers first if it can);
        safe to call twice."""
        client, self._client = self._client, None
        if client is not None and self._leftovers is not None:
            try:
                self._clean_leftovers(client)
            except RuntimeError as err:
                log.warning("CARLA %s: could not clean up on close: %s", self.address, err)
        self._server_version = None

    def __enter__(self) -> CarlaBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- connection ---------------------------------------------------------------------
    def _ensure_client(self) -> Any:
        if self._client is None:
            client = connect(
                self.host,
                self.port,
                self.timeout_s,
                self.retries,
                self.backoff_s,
                client_cls=self._client_factory,
            )
            self._server_version = str(client.get_server_version())
            if self._leftovers is not None:
                self._clean_leftovers(client)
            self._client = client
        return self._client

    def _clean_leftovers(self, client: Any) -> None:
        """Destroy the actors of an attempt that lost its server and restore the settings
        it changed. A server that kept running still has them, and a world left in
        synchronous mode would freeze. Errors about actors already gone are expected (a
        restarted server has none)."""
        import carla

        left = self._leftovers
        if left is None:
            return
        if left.ids:
            ids = list(reversed(left.ids))
            responses = client.apply_batch_sync([carla.command.DestroyActor(i) for i in ids])
            gone = sum(1 for r in responses if not r.error)
            log.info("CARLA %s: destroyed %d leftover actor(s)", self.address, gone)
            left.ids.clear()
        client.get_trafficmanager(self.tm_port).set_synchronous_mode(False)
        if left.settings is not None:
            client.get_world().apply_settings(left.settings)
        self._leftovers = None

    # --- one episode ------------------------------------------------------------------
    def _run_episode(self, client: Any, params: SceneParams, indices: list[int]) -> _Episode:
        import carla

        world, map_name = self._world_for(client, params.map)
        rng = np.random.default_rng([self.seed, indices[0], EPISODE_RNG_KEY])
        # one seed per episode for the server-side randomness (autopilot decisions,
        # pedestrian navigation), so episodes differ but each is repeatable
        episode_seed = int(rng.integers(0, 2**31 - 1))
        tm = client.get_trafficmanager(self.tm_port)
        tm.set_random_device_seed(episode_seed)
        world.set_pedestrians_seed(episode_seed)
        world.set_weather(carla.WeatherParameters(**asdict(params.weather)))

        # saved before switching, so a server lost during the switch is undone as well
        actors = _EpisodeActors(settings=world.get_settings())
        self._leftovers = actors
        try:
            with synchronous_mode(world, self.fixed_delta_seconds, tm):
                try:
                    spawned = self._populate(client, world, params, rng, actors)
                    images, masks, frame_ids = self._capture(world, actors, len(indices))
                except BaseException as err:
                    self._teardown(client, actors, strict=False, server_lost=_lost_server(err))
                    raise
                self._teardown(client, actors, strict=True, server_lost=False)
        except BaseException as err:
            if not _lost_server(err):
                # torn down over a live connection (failures were logged); nothing to undo
                self._leftovers = None
            raise
        self._leftovers = None
        return _Episode(map_name, images, masks, frame_ids, spawned)

    def _world_for(self, client: Any, map_name: str) -> tuple[Any, str]:
        """The world with ``map_name`` loaded (loading it only when another map is)."""
        world = client.get_world()
        current = world.get_map().name.rsplit("/", 1)[-1]
        if current == map_name:
            return world, current
        available = [m.rsplit("/", 1)[-1] for m in client.get_available_maps()]
        if map_name not in available:
            raise CarlaError(
                f"map '{map_name}' is not installed on the CARLA server {self.address} "
                f"(available: {sorted(available)}); drop it from randomization.maps or "
                f"install the additional maps package"
            )
        log.info("CARLA %s: loading %s (was %s)", self.address, map_name, current)
        client.set_timeout(max(self.timeout_s, MAP_LOAD_TIMEOUT_S))
        try:
            world = client.load_world(map_name)
        finally:
            client.set_timeout(self.timeout_s)
        return world, world.get_map().name.rsplit("/", 1)[-1]

    def _populate(
        self,
        client: Any,
        world: Any,
        params: SceneParams,
        rng: np.random.Generator,
        actors: _EpisodeActors,
    ) -> dict[str, int]:
        """Spawn ego (with autopilot), traffic, pedestrians and the two cameras."""
        library = world.get_blueprint_library()
        # sorted: the server's listing order is not part of its contract, our draws are
        vehicle_bps = sorted(library.filter("vehicle.*"), key=lambda bp: bp.id)
        cars = [bp for bp in vehicle_bps if _base_type(bp) == "car"]
        if not cars:
            log.warning("no vehicle blueprint has base_type=car; the ego may be any vehicle")
            cars = vehicle_bps
        if not cars:
            raise CarlaSpawnError(f"CARLA server {self.address} offers no vehicle blueprints")
        ego_bp = cars[int(rng.integers(len(cars)))]
        if ego_bp.has_attribute("role_name"):
            ego_bp.set_attribute("role_name", "hero")

        spawn_points = list(world.get_map().get_spawn_points())
        order = [int(i) for i in rng.permutation(len(spawn_points))]
        ego, used = None, 0  # the first free point in the seeded order
        while ego is None and used < len(order):
            ego = world.try_spawn_actor(ego_bp, spawn_points[order[used]])
            used += 1
        if ego is None:
            raise CarlaSpawnError(
                f"CARLA server {self.address}: no free spawn point for the ego vehicle "
                f"'{ego_bp.id}' ({len(spawn_points)} tried)"
            )
        actors.ids.append(ego.id)
        ego.set_autopilot(True, self.tm_port)

        free = [spawn_points[i] for i in order[used:]]
        vehicles = self._spawn_vehicles(client, vehicle_bps, params.vehicles, free, rng, actors)
        walkers = self._spawn_walkers(client, world, library, params.pedestrians, rng, actors)
        self._spawn_cameras(world, library, ego, params.camera, actors)
        return {"vehicles": vehicles, "walkers": walkers}

    def _spawn_batch(self, client: Any, batch: list[Any], what: str, actors: _EpisodeActors):
        """Apply spawn commands in one round trip (ticking once); returns the new ids.
        Failed spawns (usually a collision at the spawn point) are skipped, not fatal."""
        if not batch:
            return []
        ids = []
        for response in client.apply_batch_sync(batch, True):
            if response.actor_id:  # tracked even if a chained command failed: must be destroyed
                actors.ids.append(response.actor_id)
            if response.error:
                log.debug("CARLA %s: a %s did not spawn: %s", self.address, what, response.error)
            else:
                ids.append(response.actor_id)
        if len(ids) < len(batch):
            log.info("CARLA %s: %d/%d %s(s) spawned", self.address, len(ids), len(batch), what)
        return ids

    def _spawn_vehicles(
        self,
        client: Any,
        vehicle_bps: list[Any],
        specs: Sequence[VehicleSpec],
        free: list[Any],
        rng: np.random.Generator,
        actors: _EpisodeActors,
    ) -> int:
        import carla

        command = carla.command
        if len(specs) > len(free):
            log.info("%d vehicles asked for, %d spawn points free", len(specs), len(free))
        batch = []
        for spec, transform in zip(specs, free, strict=False):
            candidates = [bp for bp in vehicle_bps if _base_type(bp) == spec.type]
            if not candidates:
                log.warning("no vehicle blueprint with base_type=%s; skipped", spec.type)
                continue
            bp = candidates[int(rng.integers(len(candidates)))]
            if bp.has_attribute("color"):
                # SpawnActor copies the blueprint, so reusing it for the next vehicle is safe
                bp.set_attribute("color", ",".join(str(int(c)) for c in spec.color))
            if bp.has_attribute("role_name"):
                bp.set_attribute("role_name", "autopilot")
            batch.append(
                command.SpawnActor(bp, transform).then(
                    command.SetAutopilot(command.FutureActor, True, self.tm_port)
                )
            )
        return len(self._spawn_batch(client, batch, "vehicle", actors))

    def _spawn_walkers(
        self,
        client: Any,
        world: Any,
        library: Any,
        specs: Sequence[PedestrianSpec],
        rng: np.random.Generator,
        actors: _EpisodeActors,
    ) -> int:
        """Walkers on the navigation mesh, each with an AI controller walking it somewhere."""
        import carla

        if not specs:
            return 0
        walker_bps = sorted(library.filter("walker.pedestrian.*"), key=lambda bp: bp.id)
        if not walker_bps:
            log.warning("CARLA %s offers no walker blueprints; no pedestrians", self.address)
            return 0
        batch = []
        for _spec in specs:
            bp = walker_bps[int(rng.integers(len(walker_bps)))]
            location = world.get_random_location_from_navigation()
            if location is None:  # a map without a navigation mesh
                continue
            batch.append(carla.command.SpawnActor(bp, carla.Transform(location)))
        walker_ids = self._spawn_batch(client, batch, "walker", actors)
        if not walker_ids:
            return 0
        controller_bp = library.find("controller.ai.walker")
        controller_ids = self._spawn_batch(
            client,
            [carla.command.SpawnActor(controller_bp, carla.Transform(), w) for w in walker_ids],
            "walker controller",
            actors,
        )
        actors.controllers = list(world.get_actors(controller_ids))
        for controller in actors.controllers:
            controller.start()
            destination = world.get_random_location_from_navigation()
            if destination is not None:
                controller.go_to_location(destination)
            controller.set_max_speed(WALKER_SPEED_MPS)
        return len(walker_ids)

    def _spawn_cameras(
        self, world: Any, library: Any, ego: Any, camera: Camera, actors: _EpisodeActors
    ) -> None:
        """RGB and semantic cameras with one transform and one set of intrinsics, so their
        pixels correspond exactly. CARLA's frame: x forward, y right, z up (m, deg)."""
        import carla

        transform = carla.Transform(
            carla.Location(x=CAMERA_FORWARD_M, y=camera.lateral_m, z=camera.height_m),
            carla.Rotation(pitch=camera.pitch_deg, yaw=camera.yaw_deg, roll=camera.roll_deg),
        )
        sensors = {}
        for name, blueprint_id in CAMERAS:
            bp = library.find(blueprint_id)
            bp.set_attribute("image_size_x", str(self.width))
            bp.set_attribute("image_size_y", str(self.height))
            bp.set_attribute("fov", str(float(camera.fov_deg)))
            bp.set_attribute("sensor_tick", "0.0")  # one image per world tick
            sensor = world.spawn_actor(bp, transform, attach_to=ego)
            actors.ids.append(sensor.id)
            sensors[name] = sensor
        actors.queues = SensorQueues(sensors)

    def _capture(
        self, world: Any, actors: _EpisodeActors, n: int
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Warm up, then ``n`` frames ``ticks_per_frame`` ticks apart, matched by frame id."""
        queues = actors.queues
        assert queues is not None
        for _ in range(self.warmup_ticks):
            world.tick(self.timeout_s)
            queues.drain()
        images = np.empty((n, self.height, self.width, 3), dtype=np.uint8)
        masks = np.empty((n, self.height, self.width), dtype=np.uint8)
        frame_ids = []
        for k in range(n):
            for _ in range(self.ticks_per_frame - 1):
                world.tick(self.timeout_s)
                queues.drain()
            frame = int(world.tick(self.timeout_s))
            data = queues.get_frame(frame, self.timeout_s)
            for name, image in data.items():
                if (image.height, image.width) != (self.height, self.width):
                    raise CarlaError(
                        f"sensor '{name}' sent {image.width}x{image.height} images, "
                        f"expected {self.width}x{self.height}"
                    )
            images[k] = image_to_rgb(data["rgb"])
            masks[k] = semantic_to_mask(data["semantic"], self.taxonomy)
            frame_ids.append(frame)
        return images, masks, frame_ids

    def _teardown(
        self, client: Any, actors: _EpisodeActors, strict: bool, server_lost: bool
    ) -> None:
        """Stop walker controllers and sensors, then destroy every actor in one batch.

        ``strict``: raise the first error (after trying everything) instead of logging.
        ``server_lost``: skip the destroy round trip, which would only wait out the
        time-out; the actors stay in ``actors.ids`` and are destroyed after reconnecting.
        """
        import carla

        errors: list[Exception] = []
        for controller in actors.controllers:
            try:
                controller.stop()
            except Exception as err:  # every controller must get its chance
                errors.append(err)
        actors.controllers = []
        if actors.queues is not None:
            errors += actors.queues.stop()
            actors.queues = None
        if actors.ids and not server_lost:
            ids = list(reversed(actors.ids))  # children (sensors, controllers) first
            try:
                responses = client.apply_batch_sync(
                    [carla.command.DestroyActor(i) for i in ids], False
                )
            except Exception as err:
                errors.append(err)
            else:
                actors.ids.clear()
                pairs = zip(ids, responses, strict=False)
                failed = [f"{i}: {r.error}" for i, r in pairs if r.error]
                if failed:
                    log.warning("CARLA %s: could not destroy %s", self.address, failed)
        if errors and strict:
            raise errors[0]
        if errors:  # one line: a dead server fails every call the same way
            log.warning(
                "CARLA %s: %d teardown call(s) failed, first: %s",
                self.address,
                len(errors),
                errors[0],
            )
