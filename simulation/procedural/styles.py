"""Appearance styles of the procedural renderer: ``sim`` (clean synthetic) and ``photo``
(the embedded stand-in for a real camera).

A style fixes the surface colours, how much texture surfaces carry, the camera
pipeline applied after lighting, and small shifts of the scene statistics (a real
rig sits a little higher, looks a little further down, and drives through taller
and greener streets than the simulator's defaults). The shifts are applied to the
sampled :class:`SceneParams` *before* rendering and the shifted values are what the
manifest records, so provenance stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from simulation.randomization import Camera, Road, SceneParams

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class Style:
    """Everything that differs between the simulated and the camera-like look.

    Colours are linear-ish RGB in [0, 1] before lighting. ``texture`` scales the
    multi-scale noise modulating surfaces (0 = flat). The camera pipeline fields are
    strengths: ``response`` blends in a filmic S-curve, ``white_balance`` is the std of
    a per-frame colour-temperature error, ``lens_blur_px`` a Gaussian sigma,
    ``chromatic_aberration_px`` the red/blue shift at the corners, ``vignetting`` the
    corner darkening, ``shot_noise`` / ``read_noise`` the sensor noise, and
    ``jpeg_quality`` the quality of an 8x8 DCT compression pass (0 = off).
    """

    name: str
    road: RGB
    marking: RGB
    sidewalk: RGB
    terrain: RGB
    vegetation: tuple[RGB, ...]
    buildings: tuple[RGB, ...]
    window: RGB
    fence: RGB
    pole: RGB
    sign: tuple[RGB, ...]
    skin: RGB
    glass: RGB
    tyre: RGB
    texture: float
    response: float
    white_balance: float
    lens_blur_px: float
    chromatic_aberration_px: float
    vignetting: float
    shot_noise: float
    read_noise: float
    jpeg_quality: int
    camera_height_offset_m: float = 0.0
    pitch_offset_deg: float = 0.0
    fov_scale: float = 1.0
    building_height_scale: float = 1.0
    tree_density_offset: float = 0.0
    sidewalk_offset_m: float = 0.0
    #: Whether this style renders the looks of :data:`~simulation.randomization.PHOTO_ONLY`.
    photo_only_looks: bool = False

    def adjust(self, params: SceneParams) -> SceneParams:
        """The scene this style actually renders for ``params`` (recorded in the manifest)."""
        cam, road = params.camera, params.road
        if not any(
            (
                self.camera_height_offset_m,
                self.pitch_offset_deg,
                self.fov_scale != 1.0,
                self.building_height_scale != 1.0,
                self.tree_density_offset,
                self.sidewalk_offset_m,
            )
        ):
            return params
        cam = replace(
            cam,
            height_m=cam.height_m + self.camera_height_offset_m,
            pitch_deg=cam.pitch_deg + self.pitch_offset_deg,
            fov_deg=cam.fov_deg * self.fov_scale,
        )
        road = replace(
            road,
            building_height_m=road.building_height_m * self.building_height_scale,
            tree_density=min(1.0, max(0.0, road.tree_density + self.tree_density_offset)),
            sidewalk_width_m=road.sidewalk_width_m + self.sidewalk_offset_m,
        )
        return replace(params, camera=Camera(**vars(cam)), road=Road(**vars(road)))


SIM = Style(
    name="sim",
    road=(0.30, 0.30, 0.33),
    marking=(0.95, 0.95, 0.95),
    sidewalk=(0.62, 0.60, 0.62),
    terrain=(0.45, 0.62, 0.30),
    vegetation=((0.18, 0.55, 0.18), (0.25, 0.60, 0.15), (0.15, 0.45, 0.22)),
    buildings=(
        (0.75, 0.55, 0.45),
        (0.60, 0.62, 0.70),
        (0.80, 0.78, 0.65),
        (0.55, 0.50, 0.60),
        (0.70, 0.70, 0.72),
        (0.82, 0.66, 0.52),
    ),
    window=(0.35, 0.50, 0.65),
    fence=(0.55, 0.45, 0.35),
    pole=(0.50, 0.50, 0.52),
    sign=((0.90, 0.10, 0.10), (0.10, 0.30, 0.85), (0.95, 0.80, 0.10)),
    skin=(0.85, 0.65, 0.52),
    glass=(0.20, 0.28, 0.36),
    tyre=(0.06, 0.06, 0.06),
    texture=0.0,
    response=0.0,
    white_balance=0.0,
    lens_blur_px=0.0,
    chromatic_aberration_px=0.0,
    vignetting=0.0,
    shot_noise=0.0,
    read_noise=0.0,
    jpeg_quality=0,
)

PHOTO = Style(
    name="photo",
    road=(0.23, 0.22, 0.21),
    marking=(0.78, 0.76, 0.68),
    sidewalk=(0.50, 0.47, 0.43),
    terrain=(0.40, 0.40, 0.24),
    vegetation=((0.16, 0.26, 0.10), (0.22, 0.30, 0.12), (0.12, 0.20, 0.09)),
    buildings=(
        (0.48, 0.30, 0.24),
        (0.55, 0.52, 0.47),
        (0.40, 0.38, 0.36),
        (0.62, 0.55, 0.44),
        (0.33, 0.30, 0.30),
        (0.58, 0.45, 0.36),
    ),
    window=(0.16, 0.19, 0.22),
    fence=(0.38, 0.36, 0.33),
    pole=(0.36, 0.36, 0.35),
    sign=((0.70, 0.12, 0.10), (0.12, 0.25, 0.60), (0.80, 0.68, 0.15)),
    skin=(0.72, 0.55, 0.45),
    glass=(0.10, 0.12, 0.14),
    tyre=(0.04, 0.04, 0.04),
    texture=0.35,
    response=1.0,
    white_balance=0.06,
    lens_blur_px=0.7,
    chromatic_aberration_px=1.0,
    vignetting=0.35,
    shot_noise=0.025,
    read_noise=0.008,
    jpeg_quality=55,
    camera_height_offset_m=0.25,
    pitch_offset_deg=-1.5,
    fov_scale=0.92,
    building_height_scale=1.3,
    tree_density_offset=0.15,
    sidewalk_offset_m=0.5,
    photo_only_looks=True,
)

STYLES = {s.name: s for s in (SIM, PHOTO)}


def get_style(name: str) -> Style:
    """The style called ``name``; a clear error for an unknown one."""
    try:
        return STYLES[name]
    except KeyError:
        raise ValueError(
            f"style: unknown style '{name}', expected one of {sorted(STYLES)}"
        ) from None
