from __future__ import annotations

import numpy as np
import pytest

from simulation.taxonomy import IGNORE_INDEX, Taxonomy, TaxonomyError


def test_drive11_classes_and_mappings(taxonomy):
    assert taxonomy.classes == (
        "road",
        "sidewalk",
        "building",
        "fence",
        "pole",
        "traffic_sign",
        "vegetation",
        "terrain",
        "sky",
        "person",
        "vehicle",
    )
    carla = taxonomy.lut("carla")
    # CARLA CityObjectLabel ids: 1 Roads, 24 RoadLines, 11 Sky, 12 Pedestrians, 13 Rider,
    # 14..19 vehicles, 0 unlabeled, 22 Other
    assert carla[1] == carla[24] == taxonomy.index("road")
    assert carla[11] == taxonomy.index("sky")
    assert carla[12] == carla[13] == taxonomy.index("person")
    assert set(carla[14:20]) == {taxonomy.index("vehicle")}
    assert carla[0] == carla[22] == IGNORE_INDEX
    cityscapes = taxonomy.lut("cityscapes")
    assert cityscapes[7] == taxonomy.index("road")
    assert cityscapes[26] == taxonomy.index("vehicle")
    assert cityscapes[0] == IGNORE_INDEX
    camvid = taxonomy.lut("camvid")
    assert camvid[0] == taxonomy.index("sky") and camvid[11] == IGNORE_INDEX


def test_convert_and_colorize(taxonomy):
    ids = np.array([[1, 11], [14, 0]], dtype=np.int32)
    out = taxonomy.convert(ids, "carla")
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 8], [10, 255]]
    rgb = taxonomy.colorize(out)
    assert rgb.shape == (2, 2, 3)
    assert tuple(rgb[0, 0]) == (128, 64, 128)
    assert tuple(rgb[1, 1]) == (0, 0, 0)


def test_hash_is_stable_and_changes_with_mapping(taxonomy):
    same = Taxonomy(taxonomy.classes, taxonomy.colors, taxonomy.mappings)
    assert same.hash == taxonomy.hash and len(taxonomy.hash) == 16
    changed = {**taxonomy.mappings, "carla": {**taxonomy.mappings["carla"], 4: "fence"}}
    assert Taxonomy(taxonomy.classes, taxonomy.colors, changed).hash != taxonomy.hash


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classes": ["a", "a"], "colors": [[0, 0, 0]] * 2}, "duplicate"),
        ({"classes": ["a"], "colors": [[0, 0, 0], [1, 1, 1]]}, "taxonomy.colors"),
        ({"classes": ["a"], "colors": [[0, 0, 300]]}, r"taxonomy.colors\[a\]"),
        ({"classes": ["a"], "colors": [[0, 0, 0]], "mappings": {"kitti": {}}}, "kitti"),
        (
            {"classes": ["a"], "colors": [[0, 0, 0]], "mappings": {"carla": {1: "b"}}},
            r"taxonomy.mappings.carla.1: unknown class 'b'",
        ),
    ],
)
def test_bad_taxonomy_names_the_key(kwargs, match):
    with pytest.raises(TaxonomyError, match=match):
        Taxonomy(**kwargs)


def test_missing_mapping_is_named(taxonomy):
    tax = Taxonomy(["a"], [[1, 2, 3]])
    with pytest.raises(TaxonomyError, match="taxonomy.mappings.carla"):
        tax.lut("carla")
