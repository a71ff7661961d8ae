"""The embedded procedural simulator: the default backend wherever no CARLA server runs."""

from simulation.procedural.backend import ProceduralBackend
from simulation.procedural.styles import PHOTO, SIM, STYLES, Style, get_style

__all__ = ["PHOTO", "SIM", "STYLES", "ProceduralBackend", "Style", "get_style"]
