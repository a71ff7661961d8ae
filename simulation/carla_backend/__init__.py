"""CARLA backend: frames from a CARLA server in synchronous mode, with matched labels.

Importing this package does not import ``carla``; only connecting to a server does.
"""

from simulation.carla_backend.backend import CarlaBackend, CarlaEpisodeError, CarlaSpawnError
from simulation.carla_backend.connection import CarlaConnectionError, CarlaError, connect
from simulation.carla_backend.labels import (
    bgra_view,
    image_to_rgb,
    semantic_to_ids,
    semantic_to_mask,
)
from simulation.carla_backend.sync import SensorQueues, SensorSyncError, synchronous_mode

__all__ = [
    "CarlaBackend",
    "CarlaConnectionError",
    "CarlaEpisodeError",
    "CarlaError",
    "CarlaSpawnError",
    "SensorQueues",
    "SensorSyncError",
    "bgra_view",
    "connect",
    "image_to_rgb",
    "semantic_to_ids",
    "semantic_to_mask",
    "synchronous_mode",
]
