"""Nothing lost, nothing leaked: corrupted shards, edited cards, unusable labels, huge
images, a full disk, concurrent generation and dataset names that escape ``data/``."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.config import ConfigError
from simulation import dataset as dataset_module
from simulation.dataset import DatasetError, DatasetWriter, GeneratedDataset
from simulation.generation import run_generate
from simulation.real_data import CamVidDataset, CityscapesDataset, RealDataError
from simulation.taxonomy import Taxonomy
from tests.conftest import ROOT
from tests.test_dataset import generate
from tests.test_generate import config as generate_config
from tests.test_real_data import CV_BANDS, H, W, _bands, _make_camvid, _make_cityscapes, _save
from training.stages.data import VERIFIED_ROLES, verify_datasets


def _flip(path: Path, count: int = 64, at: int = 200) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, at + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture()
def sim_root(tmp_path: Path) -> Path:
    root = tmp_path / "sim_train"
    generate(root)
    return root


@pytest.fixture()
def hash_calls(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    original = dataset_module._sha256_file

    def counting(path: Path) -> str:
        calls.append(Path(path))
        return original(path)

    monkeypatch.setattr(dataset_module, "_sha256_file", counting)
    return calls


# ----------------------------------------------------------------- 5/6: corrupted shards
@pytest.mark.parametrize("damage", ["flip-images", "overwrite-masks"])
def test_corrupted_shard_stops_training_naming_file_and_key(sim_root: Path, damage: str) -> None:
    if damage == "flip-images":
        bad = sim_root / "shards" / "000001" / "images.npy"
        _flip(bad)
    else:
        bad = sim_root / "shards" / "000001" / "masks.npy"
        arr = np.load(bad)
        np.save(bad, np.zeros_like(arr))  # a well-formed file with other labels
    datasets = {"sim_train": GeneratedDataset(sim_root), "sim_val": None}
    assert len(datasets["sim_train"]) == 10  # construction alone does not see it
    with pytest.raises(ConfigError) as err:
        verify_datasets(datasets)
    msg = str(err.value)
    assert msg.startswith("data.datasets.sim_train: ")
    assert str(bad) in msg and "corrupted" in msg


def test_verification_is_cached_per_dataset_version(sim_root: Path, hash_calls) -> None:
    ds = GeneratedDataset(sim_root)
    assert verify_datasets({"sim_train": ds}) == {"sim_train": True}
    hashed = len(hash_calls)
    assert hashed == 4 * 3 + 1  # every shard file and the manifest
    markers = list(sim_root.glob(".verified-*.json"))
    assert len(markers) == 1
    # a rerun (a new process: a new dataset object) hashes nothing
    again = {"sim_train": GeneratedDataset(sim_root), "real_train": GeneratedDataset(sim_root)}
    assert verify_datasets(again) == {"sim_train": False, "real_train": False}
    assert len(hash_calls) == hashed
    # a file changed after it was verified is hashed again, and caught
    bad = sim_root / "shards" / "000002" / "images.npy"
    _flip(bad)
    with pytest.raises(ConfigError, match=f"data.datasets.sim_train: .*{bad}"):
        verify_datasets({"sim_train": GeneratedDataset(sim_root)})
    assert len(hash_calls) > hashed


def test_every_generated_role_is_verified_readers_are_skipped(sim_root: Path, hash_calls) -> None:
    assert set(VERIFIED_ROLES) == {
        "sim_train",
        "sim_val",
        "real_train",
        "real_val",
        "real_test",
        "real_unlabeled",
    }
    # readers without checksums (here a list) and unknown roles are left alone
    assert verify_datasets({"real_train": [1, 2], "extra": GeneratedDataset(sim_root)}) == {}
    assert hash_calls == []
    _flip(sim_root / "shards" / "000000" / "images.npy")
    # an evaluation split is checked too: a damaged test set would report made-up figures
    for role in ("real_test", "sim_val", "real_unlabeled"):
        with pytest.raises(ConfigError, match=f"data.datasets.{role}"):
            verify_datasets({role: GeneratedDataset(sim_root)})


def test_verification_says_whether_and_when(sim_root: Path, hash_calls) -> None:
    ds = GeneratedDataset(sim_root)
    files = sum(len(s["files"]) for s in ds.card["shards"]) + 1  # shard files + manifest
    assert ds.verification() == {"verified": False, "verified_at": None, "files": files}
    assert verify_datasets({"sim_train": ds}) == {"sim_train": True}
    first = ds.verification()
    assert first["verified"] and first["files"] == files
    assert first["verified_at"].endswith("+00:00")  # UTC, ISO 8601
    again = GeneratedDataset(sim_root).verification()  # a new process reads the marker
    assert again == first
    _flip(sim_root / "shards" / "000000" / "masks.npy")
    assert GeneratedDataset(sim_root).verification()["verified"] is False


def test_read_only_dataset_is_verified_without_a_marker(sim_root: Path, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(dataset_module, "atomic_write_json", refuse)
    assert verify_datasets({"sim_train": GeneratedDataset(sim_root)}) == {"sim_train": True}
    assert not list(sim_root.glob(".verified-*"))


def test_generated_splits_of_a_run_are_verified_after_build_datasets(
    tmp_path: Path, taxonomy: Taxonomy
) -> None:
    from tests.test_generate import train_config
    from training.stages.data import build_datasets, ensure_procedural_datasets

    cfg = train_config(tmp_path)
    roots = ensure_procedural_datasets(cfg.data.generate, cfg.data.image, cfg.taxonomy)
    datasets = build_datasets(cfg.data.datasets, taxonomy)
    out = verify_datasets(datasets)
    # every generated split is hashed once: a folder shared by two roles counts once
    assert set(out) == {r for r in VERIFIED_ROLES if datasets.get(r) is not None}
    assert out["sim_train"] and out["real_train"]
    roots_hashed = {datasets[r].root.resolve() for r, hashed in out.items() if hashed}
    assert roots_hashed == {datasets[r].root.resolve() for r in out}
    bad = roots["real_train"] / "shards" / "000000" / "masks.npy"
    _flip(bad, at=150)
    datasets = build_datasets(cfg.data.datasets, taxonomy)  # the next run
    with pytest.raises(ConfigError, match=f"^data.datasets.real_train: {bad} \\(corrupted"):
        verify_datasets(datasets)


# ---------------------------------------------------------------------- card self-checksum
def test_card_edited_by_hand_is_detected_naming_the_card(sim_root: Path) -> None:
    card_path = sim_root / "card.json"
    card = json.loads(card_path.read_text())
    assert card["card_sha256"] == dataset_module.card_checksum(card)
    GeneratedDataset(sim_root)  # as written: fine
    card["class_pixel_histogram"]["road"] += 1000  # a "fix" by hand
    card_path.write_text(json.dumps(card, indent=2))
    with pytest.raises(DatasetError) as err:
        GeneratedDataset(sim_root)
    msg = str(err.value)
    assert msg.startswith(f"{card_path}:") and "card_sha256" in msg and "manifest" not in msg


def test_card_without_self_checksum_still_reads_and_says_so(sim_root: Path, caplog) -> None:
    card_path = sim_root / "card.json"
    card = json.loads(card_path.read_text())
    del card["card_sha256"]  # a card written before cards carried one
    card_path.write_text(json.dumps(card, indent=2))
    with caplog.at_level(logging.INFO, logger="simulation.dataset"):
        ds = GeneratedDataset(sim_root, verify=True)
    assert len(ds) == 10
    assert any(
        str(card_path) in r.getMessage() and "card_sha256" in r.getMessage() for r in caplog.records
    )


def test_deleted_card_is_rewritten_by_the_generate_command(tmp_path: Path) -> None:
    first = run_generate(generate_config(tmp_path))
    card = json.loads((first.root / "card.json").read_text())
    (first.root / "card.json").unlink()
    again = run_generate(generate_config(tmp_path))
    assert again.complete and again.frames == 0
    rewritten = json.loads((first.root / "card.json").read_text())
    assert rewritten["shards"] == card["shards"]
    GeneratedDataset(first.root, verify=True)


# ------------------------------------------------------------------ labels with no usable id
def test_label_without_any_taxonomy_class_warns_naming_the_file(
    tmp_path: Path, taxonomy: Taxonomy, caplog
) -> None:
    root = _make_camvid(tmp_path, splits=("train",))
    label = root / "trainannot" / "0001TP_006690.png"
    _save(label, np.full((H, W), 11, np.uint8))  # 11 = unlabelled: nothing to learn from
    with caplog.at_level(logging.WARNING, logger="simulation.real_data"):
        CamVidDataset(root, "train", taxonomy, (H, W))  # the scan: 1 of 2 frames, allowed
        assert [r.getMessage().split(":")[0] for r in caplog.records] == [str(label)]
        caplog.clear()
        ds = CamVidDataset(root, "train", taxonomy, (H, W), label_scan=0)
        assert not caplog.records
        sample = ds[ds.ids.index("train/0001TP_006690.png")]
        ds[ds.ids.index("train/0001TP_006690.png")]  # named once, not every epoch
    assert (sample["mask"] == 255).all()
    assert len(caplog.records) == 1
    assert str(label) in caplog.records[0].getMessage()
    assert "no pixel of any taxonomy class" in caplog.records[0].getMessage()
    assert (ds[ds.ids.index("train/0016E5_07959.png")]["mask"] != 255).any()


def test_split_with_mostly_unusable_labels_is_refused_naming_the_root(
    tmp_path: Path, taxonomy: Taxonomy
) -> None:
    root = _make_cityscapes(tmp_path / "cs")
    # train ids (0..18) written where label ids are expected: most map to "ignore"
    for label in (root / "gtFine" / "train").rglob("*_labelIds.png"):
        _save(label, np.full((H, W), 3, np.uint8))
    with pytest.raises(RealDataError) as err:
        CityscapesDataset(root, "train", taxonomy, (H, W))
    msg = str(err.value)
    assert str(root) in msg and "3 of 3" in msg and "cityscapes" in msg
    # the check can be switched off (and costs nothing then)
    assert len(CityscapesDataset(root, "train", taxonomy, (H, W), label_scan=0)) == 3


def test_label_scan_samples_at_most_n_frames(
    tmp_path: Path, taxonomy: Taxonomy, monkeypatch
) -> None:
    root = tmp_path / "cv"
    for i in range(10):
        _save(root / "train" / f"f{i:02d}.png", np.zeros((H, W, 3), np.uint8))
        _save(root / "trainannot" / f"f{i:02d}.png", _bands([cv for cv, _ in CV_BANDS]))
    from simulation import real_data

    opened: list[Path] = []
    original = real_data._open_label
    monkeypatch.setattr(real_data, "_open_label", lambda p: opened.append(p) or original(p))
    CamVidDataset(root, "train", taxonomy, (H, W), label_scan=4)
    assert len(opened) == 4 and len(set(opened)) == 4


# ----------------------------------------------------------------------- decompression bombs
def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that *claims* ``width x height`` (1-bit grey) without the pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def test_huge_image_is_refused_naming_file_and_limit(tmp_path: Path, taxonomy: Taxonomy) -> None:
    root = _make_camvid(tmp_path, splits=("train",))
    image = _png_header_only(root / "train" / "0016E5_07959.png", 20000, 20000)
    ds = CamVidDataset(root, "train", taxonomy, (H, W))
    with pytest.raises(RealDataError) as err:
        ds[ds.ids.index("train/0016E5_07959.png")]
    msg = str(err.value)
    assert msg.startswith(f"{image}:") and f"{2 * Image.MAX_IMAGE_PIXELS}" in msg
    assert "400000000" in msg and "MAX_IMAGE_PIXELS" in msg  # its own size, the knob
    label = _png_header_only(root / "trainannot" / "0001TP_006690.png", 20000, 20000)
    with pytest.raises(RealDataError, match=f"^{label}: .*{2 * Image.MAX_IMAGE_PIXELS}"):
        ds[ds.ids.index("train/0001TP_006690.png")]


# ----------------------------------------------------------------------------- a full disk
def test_disk_full_names_the_folder_and_rerun_resumes(tmp_path: Path, monkeypatch) -> None:
    calls = {"n": 0}
    original = DatasetWriter._write_npy

    def filling(path, array):
        calls["n"] += 1
        if calls["n"] > 3:  # the first shard and a half fit on the disk
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, array)

    monkeypatch.setattr(DatasetWriter, "_write_npy", staticmethod(filling))
    root = tmp_path / "ds"
    with pytest.raises(DatasetError) as err:
        run_generate(generate_config(tmp_path))
    msg = str(err.value)
    assert msg.startswith(f"{root}: no space left")
    assert "rerun" in msg and "resume" in msg
    assert sorted(p.name for p in (root / "shards").iterdir()) == ["000000"]
    monkeypatch.setattr(DatasetWriter, "_write_npy", staticmethod(original))
    again = run_generate(generate_config(tmp_path))
    assert again.complete and again.frames == 8
    GeneratedDataset(root, verify=True)


def test_other_os_errors_are_not_called_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    def failing(path, array):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(DatasetWriter, "_write_npy", staticmethod(failing))
    with pytest.raises(OSError, match="Input/output error") as err:
        run_generate(generate_config(tmp_path))
    assert not isinstance(err.value, DatasetError)


# ------------------------------------------------------------------ two identical commands
# A generate command whose shards after the first wait for the file ``release``, so the
# test can start a second identical command while the first is mid-way.
_GATED_GENERATE = """
import sys, time
from pathlib import Path
from simulation.dataset import DatasetWriter
from simulation.generation import run_generate
from tests.test_generate import config

tmp = Path(sys.argv[1])
original = DatasetWriter.write_shard
def gated(self, shard_id, batch):
    deadline = time.monotonic() + 120
    while shard_id > 0 and not (tmp / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    original(self, shard_id, batch)
DatasetWriter.write_shard = gated
print("READY", flush=True)
result = run_generate(config(tmp))
print("FRAMES", result.frames, result.complete, flush=True)
"""


def _locked(path: Path) -> bool:
    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


@pytest.mark.slow  # a subprocess each: the full suite runs it
def test_two_identical_generate_commands_wait_for_each_other(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", _GATED_GENERATE, str(tmp_path)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    first = start()
    root = tmp_path / "ds"
    deadline = time.monotonic() + 120
    try:
        # the first is mid-way: shard 0 written, shards 1 and 2 held at the gate
        while not (root / "shards" / "000000").is_dir():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = start()
        try:
            assert second.stdout.readline().strip() == "READY"
            time.sleep(1.5)  # the second reaches the dataset folder while shards are missing
            (tmp_path / "release").touch()
            outs = [p.communicate(timeout=300) for p in (first, second)]
        finally:
            second.kill()
    finally:
        first.kill()
    for p, (_out, err) in zip((first, second), outs, strict=True):
        assert p.returncode == 0, err
    assert "FRAMES 12 True" in outs[0][0]
    assert "FRAMES 0 True" in outs[1][0]  # it waited, then found the shards done
    GeneratedDataset(root, verify=True)
    assert not _locked(root / ".generation.lock")


def test_parallel_jobs_do_not_wait_for_each_other(tmp_path: Path) -> None:
    from simulation.generation import generation_lock_path

    a = generation_lock_path(tmp_path / "ds", index=0, count=2)
    b = generation_lock_path(tmp_path / "ds", index=1, count=2)
    assert a != b and a.parent == b.parent == tmp_path / "ds"
    assert generation_lock_path(tmp_path / "ds", 0, 1) == tmp_path / "ds" / ".generation.lock"


def test_overwrite_keeps_the_lock_file(tmp_path: Path) -> None:
    run_generate(generate_config(tmp_path))
    lock = tmp_path / "ds" / ".generation.lock"
    assert lock.exists()
    inode = lock.stat().st_ino
    run_generate(generate_config(tmp_path, "seed=3", "overwrite=true"))
    assert lock.stat().st_ino == inode  # a lock file deleted while held locks nothing


# ------------------------------------------------------------------------ names outside data/
@pytest.mark.parametrize("name", ["../../../x", "a/b", "..", "a\\b", ""])
def test_dataset_name_with_path_parts_is_refused(tmp_path: Path, name: str) -> None:
    cfg = generate_config(tmp_path)
    cfg.name = name
    with pytest.raises(ConfigError, match=r"^name: "):
        run_generate(cfg)
    assert not (tmp_path / "ds").exists()


@pytest.mark.slow  # a subprocess each: the full suite runs it
def test_script_refuses_a_name_that_escapes_data(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "generate.py"),
            "num_frames=2",
            "shard_size=2",
            "image.height=16",
            "image.width=32",
            "progress=false",
            "name=../../../x",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=tmp_path,  # output_dir is relative to where it runs: data/${name}
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "name: " in out.stderr and "../../../x" in out.stderr
    assert not (tmp_path.parents[1] / "x").exists()
    assert not (tmp_path / "data").exists()
