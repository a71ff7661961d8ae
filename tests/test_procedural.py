"""The embedded procedural backend: determinism, parameters reaching pixels, labels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from simulation.procedural import ProceduralBackend
from simulation.procedural.renderer import ProceduralRenderer
from simulation.procedural.sprites import TEMPLATE_ID, Sprites, part_colors, rasterize
from simulation.procedural.styles import PHOTO, SIM
from simulation.randomization import (
    Camera,
    PedestrianSpec,
    Road,
    SceneParams,
    Sensor,
    VehicleSpec,
    Weather,
)

H, W = 64, 128


def base_params() -> SceneParams:
    """A scene in which every parameter has a visible effect (rain, clouds, haze, sun)."""
    return SceneParams(
        map="Town03",
        weather=Weather(
            cloudiness=40.0,
            precipitation=50.0,
            precipitation_deposits=50.0,
            wind_intensity=10.0,
            sun_azimuth_angle=20.0,
            sun_altitude_angle=20.0,
            fog_density=20.0,
            fog_distance=5.0,
            fog_falloff=0.5,
            wetness=50.0,
            scattering_intensity=1.0,
            mie_scattering_scale=0.03,
            rayleigh_scattering_scale=0.0331,
            dust_storm=5.0,
        ),
        camera=Camera(
            fov_deg=90.0, height_m=1.6, pitch_deg=-4.0, yaw_deg=1.0, roll_deg=1.0, lateral_m=0.2
        ),
        road=Road(
            curvature=0.003,
            lanes=2,
            lane_width_m=3.5,
            sidewalk_width_m=2.5,
            building_height_m=12.0,
            building_density=0.6,
            tree_density=0.5,
        ),
        vehicles=(VehicleSpec("car", (200, 30, 30), 1.0),),
        pedestrians=(PedestrianSpec((30, 30, 200), 1.75),),
        sensor=Sensor(noise_std=0.01, blur_sigma_px=0.5, exposure_ev=0.2, vignetting=0.2),
    )


def renderer(taxonomy, style=SIM) -> ProceduralRenderer:
    return ProceduralRenderer(H, W, style, {c: i for i, c in enumerate(taxonomy.classes)})


def render_one(r: ProceduralRenderer, p: SceneParams, seed: int = 3, index: int = 0):
    image, mask = r.render([p], [(seed, index)])
    return image[0], mask[0]


def test_same_seed_same_frames_in_any_batch(taxonomy, randomizer_full):
    backend = ProceduralBackend(randomizer_full, taxonomy, seed=5, height=H, width=W)
    a = backend.render(list(range(6)))
    b = backend.render([4, 1])
    np.testing.assert_array_equal(a.images[[4, 1]], b.images)
    np.testing.assert_array_equal(a.masks[[4, 1]], b.masks)
    assert [r["index"] for r in b.records] == [4, 1]
    other = ProceduralBackend(randomizer_full, taxonomy, seed=6, height=H, width=W)
    assert not np.array_equal(other.render([4]).images[0], a.images[4])


def test_records_carry_full_provenance(taxonomy, randomizer_full):
    backend = ProceduralBackend(randomizer_full, taxonomy, seed=2, height=H, width=W, style="photo")
    batch = backend.render([0, 1])
    for i, rec in zip([0, 1], batch.records, strict=True):
        assert rec["index"] == i and rec["seed"] == 2
        assert rec["backend"] == "procedural" and rec["style"] == "photo"
        assert rec["backend_version"] == backend.version
        sampled = randomizer_full.sample(2, i)
        # the photo style renders a slightly different rig; the record says so exactly
        assert rec["params"] == PHOTO.adjust(sampled).to_dict()
        assert rec["params"]["camera"]["height_m"] == pytest.approx(sampled.camera.height_m + 0.25)
        assert rec["group"] == sampled.group and rec["map"] == sampled.map


def _perturbations(p: SceneParams):
    """(name, changed params) for every sampled parameter."""
    big = {
        "dust_storm": 60.0,
        "fog_falloff": 3.0,
        "sun_azimuth_angle": 200.0,
        "wind_intensity": 90.0,
        "sun_altitude_angle": 60.0,
        "fog_distance": 40.0,
        "mie_scattering_scale": 0.2,
        "rayleigh_scattering_scale": 0.01,
    }
    for block in ("weather", "camera", "road", "sensor"):
        obj = getattr(p, block)
        for f in dataclasses.fields(obj):
            old = getattr(obj, f.name)
            if f.name in big:
                new = big[f.name]
            elif isinstance(old, int):
                new = old + 1
            else:
                new = old * 1.6 + 0.3 if f.name != "curvature" else -0.006
            yield (
                f"{block}.{f.name}",
                dataclasses.replace(p, **{block: dataclasses.replace(obj, **{f.name: new})}),
            )
    v = p.vehicles[0]
    for name, new in (("type", "van"), ("color", (20, 200, 20)), ("scale", 1.3)):
        yield (
            f"vehicles.{name}",
            dataclasses.replace(p, vehicles=(dataclasses.replace(v, **{name: new}),)),
        )
    ped = p.pedestrians[0]
    for name, new in (("color", (220, 220, 20)), ("height_m", 1.95)):
        yield (
            f"pedestrians.{name}",
            dataclasses.replace(p, pedestrians=(dataclasses.replace(ped, **{name: new}),)),
        )
    yield "map", dataclasses.replace(p, map="Town10HD")
    yield "vehicles.count", dataclasses.replace(p, vehicles=p.vehicles * 2)
    yield "pedestrians.count", dataclasses.replace(p, pedestrians=())


def test_every_parameter_changes_the_frame(taxonomy):
    r = renderer(taxonomy)
    base = base_params()
    img0, mask0 = render_one(r, base)
    labels = set(np.unique(mask0).tolist())
    # the scene shows every class the renderer draws
    for name in ("road", "sidewalk", "building", "sky", "vehicle", "person", "pole"):
        assert taxonomy.index(name) in labels, name
    unchanged = [
        name for name, p in _perturbations(base) if np.array_equal(render_one(r, p)[0], img0)
    ]
    assert unchanged == []


def test_labels_agree_with_geometry(taxonomy):
    p = dataclasses.replace(
        base_params(),
        camera=Camera(pitch_deg=0.0, roll_deg=0.0, yaw_deg=0.0, lateral_m=0.0),
        road=Road(curvature=0.0, building_density=0.3),
        vehicles=(),
        pedestrians=(),
    )
    _, mask = render_one(renderer(taxonomy), p)
    sky, road = taxonomy.index("sky"), taxonomy.index("road")
    ground = [taxonomy.index(c) for c in ("road", "sidewalk", "terrain")]
    # pitch 0: the horizon is the middle row; looking down a straight road the centre
    # column is sky above it and road below it
    centre = mask[:, W // 2 - 1 : W // 2 + 1]
    assert (centre[: H // 2 - 2] == sky).all()
    assert (centre[H // 2 + 2 :] == road).all()
    assert not np.isin(mask[: H // 2], ground).any()  # no ground above the horizon
    assert (mask[-4:, W // 2 - 8 : W // 2 + 8] == road).all()
    assert (mask != 255).all()  # no roll, nothing outside the view


def test_roll_marks_the_corners_ignore(taxonomy):
    p = dataclasses.replace(base_params(), camera=Camera(roll_deg=10.0))
    _, mask = render_one(renderer(taxonomy), p)
    assert mask[0, 0] == 255 or mask[-1, 0] == 255
    assert (mask[H // 2 - 2 : H // 2 + 2, W // 2 - 2 : W // 2 + 2] != 255).all()


def test_weather_and_light_act_on_the_image(taxonomy):
    r = renderer(taxonomy)
    clear = dataclasses.replace(
        base_params(),
        weather=Weather(sun_altitude_angle=50.0),
        sensor=Sensor(),
    )
    img_day, _ = render_one(r, clear)
    night = dataclasses.replace(clear, weather=Weather(sun_altitude_angle=-40.0))
    img_night, _ = render_one(r, night)
    assert img_night.mean() < 0.7 * img_day.mean()
    fog = dataclasses.replace(
        clear, weather=Weather(sun_altitude_angle=50.0, fog_density=90.0, fog_distance=0.0)
    )
    img_fog, _ = render_one(r, fog)
    # fog washes out contrast, most of all far away (down the road, near the horizon)
    far = (slice(H // 4, H // 2 + 4), slice(W // 2 - W // 6, W // 2 + W // 6))
    assert img_fog[far].std() < 0.5 * img_day[far].std()


def test_photo_style_looks_different_from_sim(taxonomy):
    p = base_params()
    sim, _ = render_one(renderer(taxonomy, SIM), p)
    photo, _ = render_one(renderer(taxonomy, PHOTO), PHOTO.adjust(p))
    diff = np.abs(sim.astype(np.float32) - photo.astype(np.float32)).mean()
    assert diff > 10.0  # mean absolute difference in 0..255 grey levels


def test_sprites_nearest_wins_whatever_the_order():
    n, h, w = 1, 20, 20
    depth = np.full((n, h, w), 50.0, np.float32)
    depth[0, :, 15:] = 1.0  # a near wall on the right
    label = np.zeros((n, h, w), np.uint8)
    albedo = np.zeros((n, h, w, 3), np.float32)
    emissive = np.zeros((n, h, w), np.float32)
    pole = TEMPLATE_ID["pole"]
    sprites = Sprites(
        frame=np.array([0, 0]),
        u0=np.array([2.0, 6.0]),
        v0=np.array([2.0, 2.0]),
        w=np.array([10.0, 12.0]),
        h=np.array([10.0, 10.0]),
        depth=np.array([10.0, 5.0], np.float32),
        template=np.array([pole, pole]),
        label=np.array([3, 7], np.uint8),
        color=np.zeros((2, 3), np.float32),
    )
    rasterize(sprites, depth, label, albedo, emissive, part_colors({}))
    assert label[0, 5, 3] == 3  # only the far sprite covers column 3
    assert label[0, 5, 8] == 7  # overlap: the nearer sprite wins although drawn second
    assert label[0, 5, 16] == 0  # the wall (depth 1 m) hides both
    assert depth[0, 5, 8] == 5.0 and depth[0, 5, 3] == 10.0


@pytest.mark.parametrize(
    ("key", "kwargs"), [("image.height", {"height": 0}), ("image.width", {"width": -3})]
)
def test_bad_image_size_names_the_key(taxonomy, randomizer_full, key, kwargs):
    args = {"height": H, "width": W, **kwargs}
    with pytest.raises(ValueError, match=key):
        ProceduralBackend(randomizer_full, taxonomy, seed=0, **args)


def test_unknown_style_names_the_key(taxonomy, randomizer_full):
    with pytest.raises(ValueError, match="backend.style: unknown style 'cartoon'"):
        ProceduralBackend(randomizer_full, taxonomy, 0, H, W, style="cartoon")
