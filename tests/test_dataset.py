"""Dataset writer/reader: layout, card, manifest, resume, fingerprints, checksums."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from core.files import atomic_write_json, atomic_write_text
from simulation.dataset import (
    DatasetError,
    DatasetWriter,
    GeneratedDataset,
    shard_ranges,
)
from simulation.frames import FrameBatch

H, W = 8, 12
NUM_CLASSES = 5
CLASS_NAMES = ["road", "sidewalk", "building", "sky", "vehicle"]
GROUPS = ("day-clear", "night-rain", "dusk-fog")
SEED = 7
NUM_FRAMES, SHARD_SIZE = 10, 3  # 4 shards: 3 + 3 + 3 + 1
FINGERPRINT = {
    "seed": SEED,
    "backend": {"name": "fake", "version": "1.0"},
    "image_size": [H, W],
    "taxonomy_hash": "0123456789abcdef",
}


def render(indices: range | list[int], seed: int = SEED) -> FrameBatch:
    """Fake deterministic backend: frame ``i`` depends only on ``(seed, i)``."""
    images, masks, records = [], [], []
    for i in indices:
        rng = np.random.default_rng([seed, i])
        images.append(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        mask = rng.integers(0, NUM_CLASSES + 1, (H, W), dtype=np.uint8)
        mask[mask == NUM_CLASSES] = 255  # some ignore pixels
        masks.append(mask)
        records.append(
            {
                "index": i,
                "seed": seed,
                "backend": "fake",
                "backend_version": "1.0",
                "map": "Town01",
                "group": GROUPS[i % len(GROUPS)],
                "params": {"weather": {"fog_density": float(rng.uniform(0, 100))}},
            }
        )
    return FrameBatch(np.stack(images), np.stack(masks), records)


def make_writer(root: Path, **kwargs) -> DatasetWriter:
    args = {
        "num_frames": NUM_FRAMES,
        "shard_size": SHARD_SIZE,
        "fingerprint": FINGERPRINT,
        "card_extra": {"name": "fake-sim"},
    }
    args.update(kwargs)
    return DatasetWriter(root, **args)


def generate(root: Path, **kwargs) -> dict:
    writer = make_writer(root, **kwargs)
    ranges = shard_ranges(NUM_FRAMES, SHARD_SIZE)
    for k in writer.open():
        writer.write_shard(k, render(ranges[k]))
    return writer.finalize(NUM_CLASSES, CLASS_NAMES)


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def dataset_root(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    generate(root)
    return root


def test_shard_ranges_cover_every_frame_once() -> None:
    assert shard_ranges(10, 3) == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    assert shard_ranges(6, 3) == [range(0, 3), range(3, 6)]
    assert shard_ranges(0, 3) == []
    with pytest.raises(ValueError, match="shard_size"):
        shard_ranges(10, 0)


def test_atomic_writes_replace_and_leave_no_temporaries(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    atomic_write_text(path, "old")
    atomic_write_json(path, {"k": [1, 2]})
    assert json.loads(path.read_text()) == {"k": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_card_and_manifest_describe_what_was_written(dataset_root: Path) -> None:
    full = render(range(NUM_FRAMES))
    card = json.loads((dataset_root / "card.json").read_text())

    assert card["format_version"] == 1
    assert card["fingerprint"] == FINGERPRINT
    assert (card["num_frames"], card["shard_size"], card["num_shards"]) == (10, 3, 4)
    assert card["image_size"] == [H, W]
    assert card["taxonomy_hash"] == FINGERPRINT["taxonomy_hash"]
    assert card["name"] == "fake-sim"  # card_extra lands at the top level
    assert card["class_names"] == CLASS_NAMES
    hist = np.bincount(full.masks.ravel(), minlength=256)
    assert card["class_pixel_histogram"] == {n: int(hist[i]) for i, n in enumerate(CLASS_NAMES)}
    assert card["ignore_pixels"] == int(hist[255]) > 0
    assert sum(card["class_pixel_histogram"].values()) + card["ignore_pixels"] == 10 * H * W
    assert card["groups"] == {"day-clear": 4, "dusk-fog": 3, "night-rain": 3}

    assert [s["frames"] for s in card["shards"]] == [3, 3, 3, 1]
    for shard in card["shards"]:
        sdir = dataset_root / "shards" / f"{shard['id']:06d}"
        assert set(shard["files"]) == {"images.npy", "masks.npy", "records.jsonl"}
        for name, digest in shard["files"].items():
            assert hashlib.sha256((sdir / name).read_bytes()).hexdigest() == digest
    # The stored arrays are exactly what the backend produced.
    np.testing.assert_array_equal(
        np.load(dataset_root / "shards/000001/images.npy"), full.images[3:6]
    )
    np.testing.assert_array_equal(np.load(dataset_root / "shards/000003/masks.npy"), full.masks[9:])

    manifest = [
        json.loads(line) for line in (dataset_root / "manifest.jsonl").read_text().splitlines()
    ]
    assert [r["index"] for r in manifest] == list(range(NUM_FRAMES))
    assert [(r["shard"], r["offset"]) for r in manifest][2:5] == [(0, 2), (1, 0), (1, 1)]
    assert manifest[4]["params"] == full.records[4]["params"]
    assert (
        card["manifest"]["sha256"]
        == hashlib.sha256((dataset_root / "manifest.jsonl").read_bytes()).hexdigest()
    )


def test_reader_returns_the_sample_contract(dataset_root: Path) -> None:
    full = render(range(NUM_FRAMES))
    ds = GeneratedDataset(dataset_root, verify=True, expected_taxonomy_hash="0123456789abcdef")
    assert len(ds) == NUM_FRAMES
    assert ds.class_names == CLASS_NAMES
    assert ds.card["num_shards"] == 4
    assert ds.groups == [GROUPS[i % 3] for i in range(NUM_FRAMES)]
    assert ds.records[7]["index"] == 7 and ds.records[7]["shard"] == 2

    s = ds[7]
    assert set(s) == {"image", "mask", "domain", "group", "id"}
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, H, W)
    assert s["image"].min() >= 0.0 and s["image"].max() <= 1.0
    assert s["mask"].dtype == torch.int64 and s["mask"].shape == (H, W)
    expected = torch.from_numpy(full.images[7]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(s["image"], expected)
    assert torch.equal(s["mask"], torch.from_numpy(full.masks[7]).long())
    assert (s["domain"], s["group"], s["id"]) == (0, GROUPS[1], "fake-sim/000007")
    assert ds[-1]["id"] == "fake-sim/000009"
    with pytest.raises(IndexError):
        ds[NUM_FRAMES]

    images, masks = ds.get_batch([9, 0, 4, 4])
    assert images.dtype == np.uint8 and images.shape == (4, H, W, 3)
    np.testing.assert_array_equal(images, full.images[[9, 0, 4, 4]])
    np.testing.assert_array_equal(masks, full.masks[[9, 0, 4, 4]])

    assert GeneratedDataset(dataset_root, domain=1)[0]["domain"] == 1


def test_reader_pickles_without_open_maps_and_works_in_workers(dataset_root: Path) -> None:
    ds = GeneratedDataset(dataset_root)
    first = ds[4]  # opens shard 1's memory maps in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone._arrays) == 0 and clone._records is None
    assert torch.equal(clone[4]["image"], first["image"])

    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    batches = list(loader)
    assert [b["id"][0] for b in batches] == ["fake-sim/000000", "fake-sim/000005"]
    assert torch.equal(batches[0]["mask"][4], first["mask"])


def test_resume_after_kill_gives_identical_bytes(tmp_path: Path) -> None:
    ranges = shard_ranges(NUM_FRAMES, SHARD_SIZE)
    resumed = tmp_path / "resumed"
    writer = make_writer(resumed)
    assert writer.open() == [0, 1, 2, 3]
    writer.write_shard(2, render(ranges[2]))
    writer.write_shard(0, render(ranges[0]))
    # A run killed in the middle of shard 1 leaves its temporary folder behind.
    leftover = resumed / "shards" / ".tmp-000001-99999-deadbeef"
    leftover.mkdir()
    (leftover / "images.npy").write_bytes(b"partial")
    with pytest.raises(DatasetError, match="incomplete"):
        GeneratedDataset(resumed)

    writer = make_writer(resumed)  # a fresh process
    assert writer.open() == [1, 3]
    assert not leftover.exists()
    for k in (3, 1):
        writer.write_shard(k, render(ranges[k]))
    writer.finalize(NUM_CLASSES, CLASS_NAMES)
    assert make_writer(resumed).open() == []  # complete: nothing left to do

    straight = tmp_path / "straight"
    generate(straight)
    a, b = file_digests(resumed), file_digests(straight)
    assert set(a) == set(b)
    assert len(a) == 3 + 4 * 4  # generation, manifest, card + 4 files per shard
    # card.json differs only by its creation time.
    assert {k: v for k, v in a.items() if k != "card.json"} == {
        k: v for k, v in b.items() if k != "card.json"
    }
    card_a = json.loads((resumed / "card.json").read_text())
    card_b = json.loads((straight / "card.json").read_text())
    card_a.pop("created_at"), card_b.pop("created_at")
    assert card_a == card_b


def test_changed_fingerprint_is_refused_and_nothing_deleted(dataset_root: Path) -> None:
    before = file_digests(dataset_root)
    changed = {**FINGERPRINT, "backend": {"name": "fake", "version": "2.0"}}
    with pytest.raises(DatasetError) as err:
        make_writer(dataset_root, fingerprint=changed).open()
    msg = str(err.value)
    assert "generation.json" in msg and "fingerprint.backend.version" in msg
    assert "overwrite" in msg
    with pytest.raises(DatasetError, match="shard_size"):
        make_writer(dataset_root, shard_size=5).open()
    assert file_digests(dataset_root) == before


def test_overwrite_regenerates_with_the_new_fingerprint(dataset_root: Path) -> None:
    (dataset_root / "contact_sheet.png").write_bytes(b"stale")
    changed = {**FINGERPRINT, "seed": 8}
    writer = make_writer(dataset_root, fingerprint=changed, overwrite=True)
    assert writer.open() == [0, 1, 2, 3]
    assert not (dataset_root / "card.json").exists()
    assert not (dataset_root / "contact_sheet.png").exists()
    assert json.loads((dataset_root / "generation.json").read_text())["fingerprint"]["seed"] == 8
    for k, rng in enumerate(shard_ranges(NUM_FRAMES, SHARD_SIZE)):
        writer.write_shard(k, render(rng, seed=8))
    card = writer.finalize(NUM_CLASSES, CLASS_NAMES)
    assert card["fingerprint"]["seed"] == 8
    np.testing.assert_array_equal(
        GeneratedDataset(dataset_root).get_batch([5])[0], render([5], seed=8).images
    )
    # Same fingerprint + overwrite resumes instead of deleting a finished dataset.
    assert make_writer(dataset_root, fingerprint=changed, overwrite=True).open() == []


def test_reader_errors_name_the_problem(tmp_path: Path, dataset_root: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        GeneratedDataset(tmp_path / "nope")
    with pytest.raises(DatasetError) as err:
        GeneratedDataset(dataset_root, expected_taxonomy_hash="ffffffffffffffff")
    msg = str(err.value)
    assert "ffffffffffffffff" in msg and "0123456789abcdef" in msg and "card.json" in msg
    (dataset_root / "card.json").unlink()
    with pytest.raises(DatasetError, match="incomplete.*rerun the same generate command"):
        GeneratedDataset(dataset_root)


def test_verify_names_corrupted_and_missing_shard_files(dataset_root: Path) -> None:
    ds = GeneratedDataset(dataset_root, verify=True)
    corrupted = dataset_root / "shards" / "000002" / "masks.npy"
    data = bytearray(corrupted.read_bytes())
    data[-1] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    with pytest.raises(DatasetError) as err:
        ds.verify()
    assert str(corrupted) in str(err.value) and "corrupted" in str(err.value)

    missing = dataset_root / "shards" / "000000" / "records.jsonl"
    missing.unlink()
    with pytest.raises(DatasetError) as err:
        GeneratedDataset(dataset_root, verify=True)
    msg = str(err.value)
    assert msg.startswith(f"{missing} (missing)")  # first bad file comes first
    assert str(corrupted) in msg and "2 bad file(s)" in msg


def test_write_shard_rejects_wrong_frames(tmp_path: Path) -> None:
    writer = make_writer(tmp_path / "ds")
    writer.open()
    with pytest.raises(DatasetError, match="expected 3 frames"):
        writer.write_shard(1, render(range(3, 5)))
    with pytest.raises(DatasetError, match=r"records\[0\]\['index'\] should be 3"):
        writer.write_shard(1, render(range(0, 3)))
    with pytest.raises(DatasetError, match="shard id"):
        writer.write_shard(4, render(range(12, 13)))
    writer.write_shard(3, render(range(9, 10)))
    with pytest.raises(DatasetError, match="already written"):
        writer.write_shard(3, render(range(9, 10)))
    with pytest.raises(DatasetError, match="3 of 4 shards missing"):
        writer.finalize(NUM_CLASSES, CLASS_NAMES)
    assert sorted(p.name for p in (tmp_path / "ds" / "shards").iterdir()) == ["000003"]


def test_failed_write_leaves_no_shard_folder(tmp_path: Path, monkeypatch) -> None:
    writer = make_writer(tmp_path / "ds")
    writer.open()
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        writer.write_shard(0, render(range(3)))
    assert calls and list((tmp_path / "ds" / "shards").iterdir()) == []
    monkeypatch.undo()
    assert writer.open() == [0, 1, 2, 3]


def test_mask_values_outside_the_taxonomy_are_refused(tmp_path: Path) -> None:
    writer = make_writer(tmp_path / "ds", num_frames=3)
    writer.open()
    batch = render(range(3))
    batch.masks[0, 0, 0] = 9  # neither a class index (0..4) nor ignore
    writer.write_shard(0, batch)
    with pytest.raises(DatasetError, match=r"masks\.npy: mask values \[9\]"):
        writer.finalize(NUM_CLASSES, CLASS_NAMES)
    assert not (tmp_path / "ds" / "card.json").exists()
