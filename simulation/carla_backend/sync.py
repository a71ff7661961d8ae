"""Synchronous mode: the client ticks the world, and every sensor's data is matched to
the tick that produced it.

In CARLA's default asynchronous mode the server runs as fast as it can and sensor
data arrives whenever it arrives; RGB and semantic images of "the same" moment can
then come from different simulation steps. In synchronous mode with a fixed time
step the server waits for ``world.tick()``, which returns the frame id of the step it
ran, and each sensor's data carries that frame id. :class:`SensorQueues` uses it to
pair the images of one step exactly.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from simulation.carla_backend.connection import CarlaError

if TYPE_CHECKING:
    import carla

log = logging.getLogger(__name__)


class SensorSyncError(CarlaError):
    """A sensor's data never matched the frame id of the tick it was waited for."""


@contextmanager
def synchronous_mode(
    world: carla.World,
    fixed_delta_seconds: float,
    traffic_manager: carla.TrafficManager | None = None,
) -> Iterator[carla.WorldSettings]:
    """Run the ``with`` block with the world in synchronous mode at a fixed time step.

    Saves ``world.get_settings()``, applies ``synchronous_mode=True`` and
    ``fixed_delta_seconds`` (seconds of simulated time per tick), and switches the
    Traffic Manager to synchronous mode when one is given (its autopilot must step with
    the world, or vehicles stall). On exit -- normal, exception or ``KeyboardInterrupt``
    -- the Traffic Manager goes back to asynchronous mode and the saved settings are
    applied again: a world left in synchronous mode freezes for every other client.

    Yields:
        The settings in force before, so a caller that loses the connection mid-block
        can restore them after reconnecting.

    Raises:
        ValueError: for ``fixed_delta_seconds <= 0``.
        RuntimeError: from the client when restoring fails after a clean block; when the
            block itself raised, a failed restore is logged and the block's error wins.
    """
    if not fixed_delta_seconds > 0:
        raise ValueError(f"fixed_delta_seconds: expected seconds > 0, got {fixed_delta_seconds!r}")
    previous = world.get_settings()
    settings = world.get_settings()
    settings.synchronous_mode = True
    settings.fixed_delta_seconds = float(fixed_delta_seconds)
    if settings.substepping and fixed_delta_seconds > (
        settings.max_substep_delta_time * settings.max_substeps
    ):
        # CARLA's physics needs fixed_delta_seconds <= max_substep_delta_time * max_substeps,
        # otherwise vehicles jitter or fall through the road.
        log.warning(
            "fixed_delta_seconds=%g exceeds max_substep_delta_time*max_substeps=%g; "
            "physics will be unstable",
            fixed_delta_seconds,
            settings.max_substep_delta_time * settings.max_substeps,
        )
    world.apply_settings(settings)
    try:
        if traffic_manager is not None:
            traffic_manager.set_synchronous_mode(True)
        yield previous
    except BaseException:
        _restore(world, previous, traffic_manager, strict=False)
        raise
    else:
        _restore(world, previous, traffic_manager, strict=True)


def _restore(
    world: carla.World,
    previous: carla.WorldSettings,
    traffic_manager: carla.TrafficManager | None,
    strict: bool,
) -> None:
    """Traffic Manager back to asynchronous, then the previous world settings; both are
    attempted even if the first fails."""
    errors: list[Exception] = []
    if traffic_manager is not None:
        try:
            traffic_manager.set_synchronous_mode(False)
        except Exception as err:  # best effort: reported below
            errors.append(err)
    try:
        world.apply_settings(previous)
    except Exception as err:
        errors.append(err)
    if errors and strict:
        raise errors[0]
    for err in errors:
        log.warning("could not restore CARLA settings after synchronous mode: %s", err)


class SensorQueues:
    """One queue per sensor, filled by ``sensor.listen``; :meth:`get_frame` pairs them.

    Args:
        sensors: ``{name: carla.Sensor}``; each starts listening at construction.

    Example:
        >>> queues = SensorQueues({"rgb": rgb_camera, "semantic": semantic_camera})
        >>> frame = world.tick()
        >>> data = queues.get_frame(frame, timeout_s=2.0)  # {"rgb": Image, "semantic": Image}
    """

    def __init__(self, sensors: Mapping[str, carla.Sensor]) -> None:
        self._sensors = dict(sensors)
        self._queues: dict[str, queue.Queue] = {}
        for name, sensor in self._sensors.items():
            q: queue.Queue = queue.Queue()
            # CARLA calls the callback on its own thread; Queue.put is thread-safe.
            sensor.listen(q.put)
            self._queues[name] = q

    @property
    def names(self) -> list[str]:
        return list(self._queues)

    def get_frame(self, frame_id: int, timeout_s: float) -> dict[str, Any]:
        """Each sensor's data for simulation frame ``frame_id`` (from ``world.tick()``).

        Data of older frames (warm-up ticks, ticks between captures) is discarded.

        Args:
            frame_id: the frame to collect.
            timeout_s: seconds to wait in total for all sensors.

        Raises:
            SensorSyncError: a sensor's next data is for a later frame (it skipped
                ``frame_id``), or no data for ``frame_id`` arrived within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        out: dict[str, Any] = {}
        for name, q in self._queues.items():
            last_seen: int | None = None
            while True:
                try:
                    data = q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    seen = "no data at all" if last_seen is None else f"last frame {last_seen}"
                    raise SensorSyncError(
                        f"sensor '{name}': no data for frame {frame_id} within "
                        f"{timeout_s:g} s ({seen}); is the world in synchronous mode?"
                    ) from None
                last_seen = int(data.frame)
                if last_seen == frame_id:
                    out[name] = data
                    break
                if last_seen > frame_id:
                    raise SensorSyncError(
                        f"sensor '{name}': frame id {last_seen} does not match the tick's "
                        f"frame {frame_id} (the sensor skipped it or the tick was not ours)"
                    )
                # an older frame: stale data from a tick nobody asked for
        return out

    def drain(self) -> int:
        """Discard everything queued so far (data of ticks that are not captured, so
        full-size images do not pile up during warm-up); returns how many items."""
        dropped = 0
        for q in self._queues.values():
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
                dropped += 1
        return dropped

    def stop(self) -> list[Exception]:
        """Stop every sensor listening (before destroying it, so no callback runs on a
        dying actor); returns the errors instead of raising, so all are tried."""
        errors: list[Exception] = []
        for sensor in self._sensors.values():
            try:
                sensor.stop()
            except Exception as err:  # teardown must try every sensor
                errors.append(err)
        return errors
