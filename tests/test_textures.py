"""Appearance and structure randomization: textures, tints, light, distractors, parked cars,
street trees, shapes; condition groups; the photo domain's own camera world."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
from hydra.utils import instantiate

from core.hashing import generation_key
from core.paths import generated_root, split_randomization
from simulation.procedural import ProceduralBackend
from simulation.procedural import textures as tx
from simulation.procedural.styles import PHOTO, SIM
from simulation.randomization import (
    SURFACES,
    TEXTURE_FAMILIES,
    Appearance,
    DistractorSpec,
    DomainRandomizer,
    RandomizationError,
    SceneParams,
    Structure,
)
from tests.conftest import CONFIGS, compose_config, load_config
from tests.test_procedural import base_params, render_one, renderer

BASE = {"maps": {"Town01": 1.0}, "time_of_day": {"day": 1.0}, "condition": {"clear": 1.0}}


def textured(p: SceneParams) -> SceneParams:
    """``p`` with every new block on, so that each field has something to act on."""
    app = Appearance(
        texture_strength=0.8,
        texture_scale=1.0,
        textures=("asphalt", "bricks", "windows", "foliage", "noise", "stripes"),
        tints=((1.1, 0.9, 0.9),) * len(SURFACES),
        sun_intensity=1.1,
        ambient_intensity=0.9,
    )
    st = Structure(
        setback_scale=0.5, parked_density=0.6, street_tree_density=0.6, leafless_share=0.5
    )
    dis = (
        DistractorSpec("decal", "disc", (250, 250, 20), 1.2),
        DistractorSpec("clutter", "box", (20, 250, 250), 0.9),
    )
    return dataclasses.replace(p, appearance=app, structure=st, distractors=dis)


def _perturbations(p: SceneParams):
    a, s = p.appearance, p.structure
    for name, new in (
        ("texture_strength", 0.3),
        ("texture_scale", 2.0),
        ("sun_intensity", 0.4),
        ("ambient_intensity", 1.6),
    ):
        yield (
            f"appearance.{name}",
            dataclasses.replace(p, appearance=dataclasses.replace(a, **{name: new})),
        )
    for i, surface in enumerate(SURFACES):
        fams = list(a.textures)
        fams[i] = "noise" if fams[i] != "noise" else "stripes"
        yield (
            f"appearance.textures.{surface}",
            dataclasses.replace(p, appearance=dataclasses.replace(a, textures=tuple(fams))),
        )
        tints = list(a.tints)
        tints[i] = (0.5, 1.4, 0.7)
        yield (
            f"appearance.tints.{surface}",
            dataclasses.replace(p, appearance=dataclasses.replace(a, tints=tuple(tints))),
        )
    for f in dataclasses.fields(Structure):
        old = getattr(s, f.name)
        yield (
            f"structure.{f.name}",
            dataclasses.replace(
                p, structure=dataclasses.replace(s, **{f.name: 1.0 if old < 0.9 else 0.2})
            ),
        )
    d = p.distractors[0]
    for name, new in (
        ("kind", "clutter"),
        ("shape", "triangle"),
        ("color", (10, 10, 200)),
        ("size_m", 2.0),
    ):
        yield (
            f"distractors.{name}",
            dataclasses.replace(
                p, distractors=(dataclasses.replace(d, **{name: new}), *p.distractors[1:])
            ),
        )
    v, ped = p.vehicles[0], p.pedestrians[0]
    for name, new in (("shape", "suv"), ("aspect", 1.4)):
        yield (
            f"vehicles.{name}",
            dataclasses.replace(p, vehicles=(dataclasses.replace(v, **{name: new}),)),
        )
    for name, new in (("shape", "coat"), ("aspect", 1.4)):
        yield (
            f"pedestrians.{name}",
            dataclasses.replace(p, pedestrians=(dataclasses.replace(ped, **{name: new}),)),
        )


def near_params() -> SceneParams:
    """``base_params`` with the car and the person close enough to show their shape."""
    return dataclasses.replace(
        textured(base_params()), camera=dataclasses.replace(base_params().camera, roll_deg=0.0)
    )


def test_every_new_parameter_changes_the_frame(taxonomy):
    """Each parameter changes the image in at least one of three layouts (a distractor or a
    fence can be out of view in one of them)."""
    r = renderer(taxonomy)
    base = near_params()
    seeds = (3, 4, 5)
    before = {sd: render_one(r, base, seed=sd)[0] for sd in seeds}
    unchanged = [
        name
        for name, p in _perturbations(base)
        if all(np.array_equal(render_one(r, p, seed=sd)[0], before[sd]) for sd in seeds)
    ]
    assert unchanged == []


def test_new_blocks_off_render_exactly_as_before(taxonomy):
    """Defaults are "off": explicit default blocks give the very same pixels, and the
    shipped old presets sample only defaults."""
    r = renderer(taxonomy)
    p = base_params()
    off = dataclasses.replace(p, appearance=Appearance(), structure=Structure(), distractors=())
    np.testing.assert_array_equal(render_one(r, p)[0], render_one(r, off)[0])
    for preset in ("none", "light", "full"):
        rz = instantiate(load_config("randomization", preset))
        for i in range(5):
            s = rz.sample(1, i)
            assert s.appearance == Appearance() and s.structure == Structure()
            assert s.distractors == ()
            assert {(v.shape, v.aspect) for v in s.vehicles} <= {("classic", 1.0)}
            assert {(q.shape, q.aspect) for q in s.pedestrians} <= {("classic", 1.0)}


def test_decals_keep_the_ground_label_and_clutter_is_ignore(taxonomy):
    r = renderer(taxonomy)
    p = dataclasses.replace(
        base_params(),
        vehicles=(),
        pedestrians=(),
        camera=dataclasses.replace(base_params().camera, roll_deg=0.0),
    )
    img0, mask0 = render_one(r, p)
    decal = dataclasses.replace(
        p, distractors=(DistractorSpec("decal", "box", (255, 0, 255), 3.0),) * 6
    )
    img1, mask1 = render_one(r, decal)
    assert not np.array_equal(img0, img1)
    np.testing.assert_array_equal(mask0, mask1)  # flat decals never change a label
    clutter = dataclasses.replace(
        p, distractors=(DistractorSpec("clutter", "box", (255, 0, 255), 1.5),) * 6
    )
    _, mask2 = render_one(r, clutter)
    assert (mask2 == 255).sum() > (mask0 == 255).sum()


def test_texture_tiles_are_distinct_and_flat_is_neutral():
    t = tx.tiles()
    assert t.shape == (len(TEXTURE_FAMILIES), tx.LEVELS, tx.S, tx.S)
    assert (t[tx.FAMILY_ID["flat"]] == 0.5).all()
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    level0 = t[:, 0].reshape(len(TEXTURE_FAMILIES), -1)
    for i in range(1, len(TEXTURE_FAMILIES)):
        assert level0[i].std() > 0.05, TEXTURE_FAMILIES[i]
        for j in range(1, i):
            assert not np.allclose(level0[i], level0[j])
    # far pixels read blurred levels: less contrast than the full-resolution tile
    assert t[tx.FAMILY_ID["bricks"], -1].std() < t[tx.FAMILY_ID["bricks"], 0].std()


def camera_world():
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.load(CONFIGS / "data" / "procedural.yaml").generate.camera_world)


def test_manifest_records_every_new_parameter(taxonomy):
    r = instantiate(load_config("randomization", "appearance"))
    backend = ProceduralBackend(r, taxonomy, seed=3, height=32, width=64)
    batch = backend.render([0, 1, 2])
    for i, rec in enumerate(batch.records):
        sampled = r.sample(3, i)
        assert rec["params"] == sampled.to_dict()
        assert SceneParams.from_dict(rec["params"]) == sampled
        assert set(rec["params"]["appearance"]["textures"]) == set(SURFACES)
        assert set(rec["params"]["structure"]) == {f.name for f in dataclasses.fields(Structure)}
    # the new preset really varies the new blocks
    samples = [r.sample(3, i) for i in range(30)]
    assert len({s.appearance.textures for s in samples}) > 5
    assert any(s.distractors for s in samples) and any(s.structure.parked_density for s in samples)
    assert {v.shape for s in samples for v in s.vehicles if v.type == "car"} > {"classic"}


def test_old_manifests_read_with_the_new_blocks_off(randomizer_full):
    d = randomizer_full.sample(0, 3).to_dict()
    for key in ("appearance", "structure", "distractors"):
        d.pop(key)
    for v in d["vehicles"]:
        v.pop("shape"), v.pop("aspect")
    p = SceneParams.from_dict(d)
    assert p.appearance == Appearance() and p.structure == Structure()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"groups": {"day-snow": 1.0}}, "randomization.groups.day-snow: unknown choice"),
        ({"groups": {"day-clear": -0.1}}, "randomization.groups.day-clear: weight must be"),
        ({"groups": {"day-clear": 0.0}}, "randomization.groups: weights must sum to more than 0"),
        ({"appearance": {"texture_strength": [0, 2]}}, "appearance.texture_strength: .* outside"),
        ({"appearance": {"gloss": 1}}, "randomization.appearance.gloss: unknown key"),
        ({"appearance": {"textures": {"roof": {}}}}, "appearance.textures.roof: unknown surface"),
        (
            {"appearance": {"textures": {"road": {"lava": 1}}}},
            "randomization.appearance.textures.road.lava: unknown choice",
        ),
        (
            {"structure": {"parked_density": 2}},
            "randomization.structure.parked_density: .* outside",
        ),
        ({"distractors": {"kinds": {"floater": 1}}}, "distractors.kinds.floater: unknown choice"),
        ({"vehicles": {"shapes": {"tank": 1}}}, "randomization.vehicles.shapes.tank: unknown"),
        ({"pedestrians": {"aspect": [0.1, 1]}}, "randomization.pedestrians.aspect: .* outside"),
    ],
)
def test_bad_new_keys_are_named(override, match):
    with pytest.raises(RandomizationError, match=match):
        DomainRandomizer(**{**BASE, **override})


def test_groups_table_replaces_the_independent_draw():
    r = DomainRandomizer(
        maps={"Town01": 1.0},
        groups={"day-clear": 7, "day-rain": 1, "night-clear": 2, "dusk-fog": 0},
        weather_by_group={
            "rain": {"precipitation": [40, 90]},
            "night": {"sun_altitude_angle": [-60, -5]},
        },
    )
    assert r.group_weights == pytest.approx({"day-clear": 0.7, "day-rain": 0.1, "night-clear": 0.2})
    counts = Counter(r.sample(0, i).group for i in range(2000))
    assert set(counts) == {"day-clear", "day-rain", "night-clear"}
    assert 0.66 < counts["day-clear"] / 2000 < 0.74
    with pytest.raises(RandomizationError, match="weather_by_group.rain.precipitation"):
        DomainRandomizer(maps={"Town01": 1.0}, groups={"day-rain": 1.0})  # ClearNoon: no rain
    with pytest.raises(RandomizationError, match="randomization.condition: missing"):
        DomainRandomizer(maps={"Town01": 1.0}, time_of_day={"day": 1.0})


def test_daytime_preset_is_daytime_heavy():
    r = instantiate(load_config("randomization", "daytime"))
    counts = Counter(r.sample(5, i).group for i in range(1000))
    assert sum(v for g, v in counts.items() if g.startswith("day-")) / 1000 > 0.8


def test_photo_only_looks_are_refused_by_the_sim_style(taxonomy):
    world = camera_world()
    assert "randomization.appearance.textures.road.cobblestone" in world.photo_only_keys()
    with pytest.raises(ValueError, match="cobblestone: only the photo style"):
        ProceduralBackend(world, taxonomy, 0, 32, 64, style="sim")
    ProceduralBackend(world, taxonomy, 0, 32, 64, style="photo")  # fine
    for preset in ("none", "light", "full", "appearance", "daytime"):
        assert instantiate(load_config("randomization", preset)).photo_only_keys() == []


def test_real_splits_carry_their_own_camera_world(taxonomy):
    cfg = compose_config("train", ["randomization=light"])
    gen, image, tax = cfg.data.generate, cfg.data.image, cfg.taxonomy
    world = split_randomization(gen, "real_train")
    assert world["groups"]["day-clear"] == 0.75
    assert split_randomization(gen, "sim_train")["maps"] == dict(cfg.randomization.maps)
    other = compose_config("train", ["randomization=none"]).data.generate
    # the sim preset moves the sim folders only
    assert generated_root(gen, "real_test", image, tax) == generated_root(
        other, "real_test", image, tax
    )
    assert generated_root(gen, "sim_train", image, tax) != generated_root(
        other, "sim_train", image, tax
    )
    changed = compose_config("train", ["data.generate.camera_world.road.lanes=[1,2]"]).data.generate
    assert generated_root(changed, "real_val", image, tax) != generated_root(
        gen, "real_val", image, tax
    )


def test_procedural_v1_keeps_the_old_folders():
    """data=procedural_v1 names its splits exactly as data=procedural did before the camera
    world (same key inputs: spec and the composed preset)."""
    from omegaconf import OmegaConf

    cfg = compose_config("train", ["data=procedural_v1"])
    gen = OmegaConf.to_container(cfg.data.generate, resolve=True)
    assert "camera_world" not in gen
    tax = OmegaConf.to_container(cfg.taxonomy, resolve=True)
    for split, spec in gen["splits"].items():
        assert "randomization" not in spec
        key = generation_key(
            split=split,
            spec=spec,
            randomization=gen["randomization"],
            image=dict(cfg.data.image),
            shard_size=gen["shard_size"],
            taxonomy=tax,
        )
        assert generated_root(gen, split, cfg.data.image, tax).name == f"{split}-{key}"


def test_camera_world_differs_from_sim(taxonomy):
    """The photo domain's layout statistics: more building, less sky, mostly day."""
    world = camera_world()
    full = instantiate(load_config("randomization", "full"))
    b, s = taxonomy.index("building"), taxonomy.index("sky")
    shares = {}
    for name, rz, style in (("photo", world, "photo"), ("sim", full, "sim")):
        masks = ProceduralBackend(rz, taxonomy, 9, 48, 96, style=style).render(range(48)).masks
        shares[name] = ((masks == b).mean(), (masks == s).mean())
    assert shares["photo"][0] > shares["sim"][0] and shares["photo"][1] < shares["sim"][1]
    day = sum(world.sample(1, i).group.startswith("day-") for i in range(500)) / 500
    assert day > 0.75
    assert SIM.photo_only_looks is False and PHOTO.photo_only_looks is True
