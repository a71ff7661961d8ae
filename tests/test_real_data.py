"""Real-data readers: Cityscapes, CamVid and plain folders, on tiny fixtures in tmp_path."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Subset

from simulation.real_data import (
    REAL_DOMAIN,
    CamVidDataset,
    CityscapesDataset,
    ImageFolderDataset,
    RealDataError,
    build_real_dataset,
)
from simulation.taxonomy import Taxonomy

H, W = 16, 32  # fixture resolution (height, width) in pixels

# Cityscapes label ids laid out as vertical bands, and what drive11 maps them to:
# 7 road -> 0, 26 car -> vehicle 10, 0 unlabeled -> 255, 23 sky -> 8.
CS_BANDS = [(7, 0), (26, 10), (0, 255), (23, 8)]
# CamVid indices: 3 road -> 0, 8 car -> vehicle 10, 11 unlabelled -> 255, 0 sky -> 8.
CV_BANDS = [(3, 0), (8, 10), (11, 255), (0, 8)]


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs/taxonomy/drive11.yaml")
    return instantiate(cfg)


def _bands(values: list[int], height: int = H, width: int = W) -> np.ndarray:
    """``(height, width) uint8``: ``len(values)`` equal vertical bands of the given values."""
    cols = np.repeat(np.asarray(values, dtype=np.uint8), width // len(values))
    return np.tile(cols, (height, 1))


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


CS_FRAMES = [
    ("bonn", "bonn_000000_000019"),
    ("aachen", "aachen_000001_000019"),
    ("aachen", "aachen_000000_000019"),
]


def _make_cityscapes(root: Path, split: str = "train") -> Path:
    """Two cities, three frames; frame ``i`` has image ``_rgb(i)`` and the CS_BANDS labels."""
    for i, (city, name) in enumerate(CS_FRAMES):
        _save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", _rgb(i))
        labels = _bands([cs for cs, _ in CS_BANDS])
        _save(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", labels)
    # Other gtFine files sit next to the label ids in the real dataset and must not matter.
    colour = np.zeros((H, W, 3), np.uint8)
    _save(root / "gtFine" / split / "bonn" / "bonn_000000_000019_gtFine_color.png", colour)
    return root


def _make_camvid(root: Path, splits: tuple[str, ...] = ("train", "val")) -> Path:
    for split in splits:
        for i, name in enumerate(["0016E5_07959", "0001TP_006690"]):
            _save(root / split / f"{name}.png", _rgb(10 + i))
            _save(root / f"{split}annot" / f"{name}.png", _bands([cv for cv, _ in CV_BANDS]))
    return root


# --- Cityscapes ---------------------------------------------------------------------------


def test_cityscapes_sample_contract_at_native_size(tmp_path: Path, taxonomy: Taxonomy) -> None:
    ds = CityscapesDataset(_make_cityscapes(tmp_path), "train", taxonomy, size=(H, W))
    assert len(ds) == 3
    s = ds[0]
    assert set(s) == {"image", "mask", "domain", "group", "id"}
    assert s["image"].shape == (3, H, W) and s["image"].dtype == torch.float32
    assert s["mask"].shape == (H, W) and s["mask"].dtype == torch.int64
    assert s["image"].min() >= 0.0 and s["image"].max() <= 1.0
    assert s["domain"] == REAL_DOMAIN == 1
    assert s["group"] == "unknown"
    assert s["id"] == "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    # Frame aachen_000000 was written third (seed 2); without resizing pixels are exact.
    expected = torch.from_numpy(_rgb(2)).permute(2, 0, 1).float() / 255.0
    assert torch.equal(s["image"], expected)


def test_cityscapes_label_ids_map_to_taxonomy(tmp_path: Path, taxonomy: Taxonomy) -> None:
    ds = CityscapesDataset(_make_cityscapes(tmp_path), "train", taxonomy, size=(H, W))
    mask = ds[1]["mask"]
    expected = torch.from_numpy(_bands([idx for _, idx in CS_BANDS]).astype(np.int64))
    assert torch.equal(mask, expected)
    # The bands the brief names: id 7 -> road 0, id 26 -> vehicle 10, id 0 -> ignore.
    assert mask[0, 0].item() == 0 and taxonomy.classes[0] == "road"
    assert mask[0, W // 4].item() == 10 and taxonomy.classes[10] == "vehicle"
    assert mask[0, W // 2].item() == 255


def test_cityscapes_order_and_ids_are_sorted_and_stable(tmp_path: Path, taxonomy: Taxonomy) -> None:
    root = _make_cityscapes(tmp_path)
    a = CityscapesDataset(root, "train", taxonomy, size=(H, W))
    b = CityscapesDataset(str(root), "train", taxonomy, size=(H, W))
    assert (
        a.ids
        == b.ids
        == [
            "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
            "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png",
            "leftImg8bit/train/bonn/bonn_000000_000019_leftImg8bit.png",
        ]
    )
    assert [a[i]["id"] for i in range(len(a))] == a.ids
    assert torch.equal(a[2]["image"], b[2]["image"])


def test_resize_uses_bilinear_for_images_and_nearest_for_masks(
    tmp_path: Path, taxonomy: Taxonomy
) -> None:
    root = _make_cityscapes(tmp_path)
    # A label image with every mapped and unmapped id scattered at random, so any
    # interpolation between neighbours would produce values outside the mapped set.
    ids = np.random.default_rng(0).choice([0, 7, 26, 23, 21, 4], size=(H, W)).astype(np.uint8)
    name = "aachen_000000_000019"
    _save(root / "gtFine/train/aachen" / f"{name}_gtFine_labelIds.png", ids)
    _save(
        root / "leftImg8bit/train/aachen" / f"{name}_leftImg8bit.png",
        np.full((H, W, 3), (255, 0, 128), np.uint8),
    )
    allowed = set(taxonomy.convert(ids, "cityscapes").ravel().tolist())
    assert allowed == {0, 10, 8, 6, 255}
    for size in [(7, 13), (8, 16), (40, 80)]:
        s = CityscapesDataset(root, "train", taxonomy, size=size)[0]
        assert s["image"].shape == (3, *size) and s["mask"].shape == size
        assert set(s["mask"].unique().tolist()) <= allowed
        # A constant image stays that constant through bilinear resizing.
        colour = torch.tensor([1.0, 0.0, 128 / 255]).view(3, 1, 1).expand(3, *size)
        assert torch.allclose(s["image"], colour, atol=1 / 255)
    # Upsampling by an integer factor with NEAREST repeats every label pixel exactly.
    up = CityscapesDataset(root, "train", taxonomy, size=(2 * H, 2 * W))[0]["mask"]
    native = torch.from_numpy(taxonomy.convert(ids, "cityscapes").astype(np.int64))
    assert torch.equal(up, native.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_group_is_configurable(tmp_path: Path, taxonomy: Taxonomy) -> None:
    ds = CityscapesDataset(_make_cityscapes(tmp_path), "train", taxonomy, (H, W), group="day")
    assert {ds[i]["group"] for i in range(len(ds))} == {"day"}


def test_dataloader_batches_and_subset(tmp_path: Path, taxonomy: Taxonomy) -> None:
    ds = CityscapesDataset(_make_cityscapes(tmp_path), "train", taxonomy, size=(8, 16))
    sub = Subset(ds, [2, 0])
    batch = next(iter(DataLoader(sub, batch_size=2)))
    assert batch["image"].shape == (2, 3, 8, 16) and batch["mask"].dtype == torch.int64
    assert batch["id"] == [ds.ids[2], ds.ids[0]]
    assert batch["domain"].tolist() == [1, 1]


# --- CamVid -------------------------------------------------------------------------------


def test_camvid_maps_indices_and_unlabelled(tmp_path: Path, taxonomy: Taxonomy) -> None:
    ds = CamVidDataset(_make_camvid(tmp_path), "val", taxonomy, (H, W))
    assert ds.ids == ["val/0001TP_006690.png", "val/0016E5_07959.png"]
    s = ds[0]
    assert s["image"].shape == (3, H, W) and s["domain"] == 1 and s["group"] == "unknown"
    expected = torch.from_numpy(_bands([idx for _, idx in CV_BANDS]).astype(np.int64))
    assert torch.equal(s["mask"], expected)
    assert s["mask"][0, W // 2].item() == 255  # CamVid 11 (unlabelled) -> ignore
    assert torch.equal(s["image"], torch.from_numpy(_rgb(11)).permute(2, 0, 1) / 255.0)


def test_camvid_resize_keeps_valid_labels(tmp_path: Path, taxonomy: Taxonomy) -> None:
    ds = CamVidDataset(_make_camvid(tmp_path), "train", taxonomy, size=(5, 11), group="city")
    s = ds[1]
    assert s["mask"].shape == (5, 11) and s["image"].shape == (3, 5, 11)
    assert set(s["mask"].unique().tolist()) <= {0, 10, 255, 8}
    assert s["group"] == "city" and s["id"] == "train/0016E5_07959.png"


def test_camvid_accepts_palette_index_png(tmp_path: Path, taxonomy: Taxonomy) -> None:
    root = _make_camvid(tmp_path, splits=("test",))
    label = Image.fromarray(_bands([cv for cv, _ in CV_BANDS])).convert("P")
    label.save(root / "testannot" / "0001TP_006690.png")
    with Image.open(root / "testannot" / "0001TP_006690.png") as saved:
        assert saved.mode == "P"
    mask = CamVidDataset(root, "test", taxonomy, (H, W))[0]["mask"]
    assert mask[0].unique().tolist() == [0, 8, 10, 255]


# --- plain folders ------------------------------------------------------------------------


def _make_folder(root: Path) -> Path:
    _save(root / "b.png", _rgb(20))
    _save(root / "a" / "z.jpg", _rgb(21))
    _save(root / "a" / "deep" / "x.PNG", np.full((H, W), 200, np.uint8))  # grayscale
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "labels.txt").write_text("not an image either")
    return root


def test_folder_reads_nested_images_without_masks(tmp_path: Path) -> None:
    ds = ImageFolderDataset(_make_folder(tmp_path), size=(8, 16), group="dashcam")
    assert ds.ids == ["a/deep/x.PNG", "a/z.jpg", "b.png"]
    for i in range(len(ds)):
        s = ds[i]
        assert "mask" not in s
        assert s["image"].shape == (3, 8, 16) and s["image"].dtype == torch.float32
        assert s["image"].min() >= 0.0 and s["image"].max() <= 1.0
        assert s["domain"] == 1 and s["group"] == "dashcam" and s["id"] == ds.ids[i]
    # The grayscale image is expanded to three equal channels of 200/255.
    assert torch.allclose(ds[0]["image"], torch.full((3, 8, 16), 200 / 255), atol=1e-6)


def test_folder_extensions_filter(tmp_path: Path) -> None:
    ds = ImageFolderDataset(_make_folder(tmp_path), (H, W), extensions=["jpg"])
    assert ds.ids == ["a/z.jpg"]


def test_factory_builds_each_kind(tmp_path: Path, taxonomy: Taxonomy) -> None:
    cs = build_real_dataset(
        "cityscapes", _make_cityscapes(tmp_path / "cs"), "train", taxonomy, (H, W)
    )
    cv = build_real_dataset("camvid", _make_camvid(tmp_path / "cv"), "val", taxonomy, (H, W))
    folder = build_real_dataset("folder", _make_folder(tmp_path / "f"), None, None, (H, W))
    sub = build_real_dataset("folder", tmp_path / "f", "a", None, (H, W), group="g")
    assert isinstance(cs, CityscapesDataset) and len(cs) == 3
    assert isinstance(cv, CamVidDataset) and len(cv) == 2
    assert isinstance(folder, ImageFolderDataset) and len(folder) == 3
    assert sub.ids == ["deep/x.PNG", "z.jpg"] and sub[0]["group"] == "g"
    assert torch.equal(
        cs[0]["mask"], CityscapesDataset(tmp_path / "cs", "train", taxonomy, (H, W))[0]["mask"]
    )


# --- errors -------------------------------------------------------------------------------


def _m(path: Path | str) -> str:
    return re.escape(str(path))


def test_missing_root_and_split_folders(tmp_path: Path, taxonomy: Taxonomy) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(RealDataError, match=_m(missing) + ".*leftImg8bit"):
        CityscapesDataset(missing, "train", taxonomy, (H, W))
    root = _make_cityscapes(tmp_path / "cs")
    with pytest.raises(RealDataError, match=_m(root / "leftImg8bit" / "val") + ".*expected"):
        CityscapesDataset(root, "val", taxonomy, (H, W))
    (root / "leftImg8bit" / "test").mkdir()
    with pytest.raises(RealDataError, match=_m(root / "gtFine" / "test")):
        CityscapesDataset(root, "test", taxonomy, (H, W))
    cv = _make_camvid(tmp_path / "cv", splits=("train",))
    (cv / "val").mkdir()
    with pytest.raises(RealDataError, match=_m(cv / "valannot") + ".*annot"):
        CamVidDataset(cv, "val", taxonomy, (H, W))
    with pytest.raises(RealDataError, match=_m(missing)):
        ImageFolderDataset(missing, (H, W))


def test_image_without_label_names_the_label(tmp_path: Path, taxonomy: Taxonomy) -> None:
    root = _make_cityscapes(tmp_path / "cs")
    label = root / "gtFine/train/bonn/bonn_000000_000019_gtFine_labelIds.png"
    label.unlink()
    with pytest.raises(RealDataError, match=_m(label) + ".*not found"):
        CityscapesDataset(root, "train", taxonomy, (H, W))
    cv = _make_camvid(tmp_path / "cv", splits=("train",))
    (cv / "trainannot" / "0016E5_07959.png").unlink()
    with pytest.raises(RealDataError, match=_m(cv / "trainannot" / "0016E5_07959.png")):
        CamVidDataset(cv, "train", taxonomy, (H, W))


def test_zero_images_names_the_folder(tmp_path: Path, taxonomy: Taxonomy) -> None:
    (tmp_path / "cs" / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    (tmp_path / "cs" / "gtFine" / "train").mkdir(parents=True)
    with pytest.raises(RealDataError, match=_m(tmp_path / "cs/leftImg8bit/train") + ": no"):
        CityscapesDataset(tmp_path / "cs", "train", taxonomy, (H, W))
    for sub in ("cv/train", "cv/trainannot"):
        (tmp_path / sub).mkdir(parents=True)
    with pytest.raises(RealDataError, match=_m(tmp_path / "cv/train") + ": no images"):
        CamVidDataset(tmp_path / "cv", "train", taxonomy, (H, W))
    (tmp_path / "f" / "nested").mkdir(parents=True)
    (tmp_path / "f" / "nested" / "readme.txt").write_text("x")
    with pytest.raises(RealDataError, match=_m(tmp_path / "f") + ": no images"):
        ImageFolderDataset(tmp_path / "f", (H, W))


def test_corrupt_files_fail_at_getitem_naming_the_file(tmp_path: Path, taxonomy: Taxonomy) -> None:
    root = _make_cityscapes(tmp_path / "cs")
    image = root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    image.write_bytes(b"not a png at all")
    ds = CityscapesDataset(root, "train", taxonomy, (H, W))  # discovery only checks paths
    with pytest.raises(RealDataError, match=_m(image) + ": cannot read image"):
        ds[0]
    assert ds[1]["mask"].shape == (H, W)  # the other frames stay readable
    label = root / "gtFine/train/bonn/bonn_000000_000019_gtFine_labelIds.png"
    label.write_bytes(label.read_bytes()[:60])  # truncated PNG
    with pytest.raises(RealDataError, match=_m(label) + ": cannot read label"):
        ds[2]
    folder = _make_folder(tmp_path / "f")
    (folder / "a" / "z.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    with pytest.raises(RealDataError, match=_m(folder / "a" / "z.jpg")):
        ImageFolderDataset(folder, (H, W))[1]


def test_colour_label_is_rejected(tmp_path: Path, taxonomy: Taxonomy) -> None:
    root = _make_camvid(tmp_path, splits=("train",))
    label = root / "trainannot" / "0001TP_006690.png"
    _save(label, np.zeros((H, W, 3), np.uint8))  # an RGB colour-coded label
    ds = CamVidDataset(root, "train", taxonomy, (H, W))
    with pytest.raises(RealDataError, match=_m(label) + r".*'RGB'.*index/label-id PNG"):
        ds[0]


def test_label_size_mismatch_is_rejected(tmp_path: Path, taxonomy: Taxonomy) -> None:
    root = _make_camvid(tmp_path, splits=("train",))
    label = root / "trainannot" / "0001TP_006690.png"
    _save(label, np.zeros((H // 2, W), np.uint8))
    with pytest.raises(RealDataError, match=_m(label) + ".*expected the same size"):
        CamVidDataset(root, "train", taxonomy, (H, W))[0]


@pytest.mark.parametrize("size", [(0, 32), (16, -1), (16,), (16, 32, 3), (16.0, 32), "ab", 7])
def test_bad_size_is_rejected(tmp_path: Path, taxonomy: Taxonomy, size: object) -> None:
    root = _make_camvid(tmp_path, splits=("train",))
    with pytest.raises(ValueError, match=r"^size: ") as info:
        CamVidDataset(root, "train", taxonomy, size)  # type: ignore[arg-type]
    assert not isinstance(info.value, RealDataError)
    with pytest.raises(ValueError, match=r"^size: "):
        ImageFolderDataset(root, size)  # type: ignore[arg-type]


def test_factory_rejects_unknown_kind_and_missing_split(tmp_path: Path, taxonomy: Taxonomy) -> None:
    with pytest.raises(ValueError, match=r"unknown real dataset kind 'kitti'.*cityscapes"):
        build_real_dataset("kitti", tmp_path, "train", taxonomy, (H, W))
    with pytest.raises(ValueError, match=r"split: a camvid dataset needs a split"):
        build_real_dataset("camvid", tmp_path, None, taxonomy, (H, W))
    with pytest.raises(TypeError, match="taxonomy"):
        build_real_dataset("cityscapes", tmp_path, "train", None, (H, W))
