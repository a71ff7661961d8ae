"""scripts/generate.py end to end: config checks, resume, multirun split, contact sheet."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from simulation.configuration import ConfigError
from simulation.dataset import DatasetError, DatasetWriter, GeneratedDataset
from simulation.generation import run_generate
from simulation.randomization import RandomizationError
from tests.conftest import CONFIGS, ROOT

TINY = ["num_frames=12", "shard_size=4", "image.height=32", "image.width=64", "progress=false"]


def config(tmp_path, *overrides: str, name: str = "ds"):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("generate", [*TINY, f"output_dir={tmp_path / name}", *overrides])


def digests(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((root / "shards").rglob("*"))
        if p.is_file()
    }


def test_generates_a_complete_dataset(tmp_path, taxonomy):
    result = run_generate(config(tmp_path))
    root = tmp_path / "ds"
    assert result.complete and result.frames == 12 and result.frames_per_second > 0
    ds = GeneratedDataset(root, verify=True, expected_taxonomy_hash=taxonomy.hash)
    assert len(ds) == 12 and ds.image_size == (32, 64)
    assert ds.card["domain"] == 0 and ds.card["style"] == "sim"
    assert ds.card["taxonomy"]["classes"] == list(taxonomy.classes)
    assert sum(ds.card["groups"].values()) == 12
    manifest = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    assert [m["index"] for m in manifest] == list(range(12))
    assert all(m["backend"] == "procedural" and "params" in m for m in manifest)
    sheet = root / "contact_sheet.png"
    assert sheet.exists() and sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the photo stand-in is the real domain
    photo = run_generate(config(tmp_path, "backend.style=photo", "name=photo", name="photo"))
    assert GeneratedDataset(photo.root).card["domain"] == 1


def test_resume_after_a_kill_gives_identical_shards(tmp_path, monkeypatch):
    full = run_generate(config(tmp_path, name="full"))
    calls = {"n": 0}
    original = DatasetWriter.write_shard

    def dying(self, shard_id, batch):
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the user presses Ctrl-C during the third shard
        calls["n"] += 1
        original(self, shard_id, batch)

    monkeypatch.setattr(DatasetWriter, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        run_generate(config(tmp_path, name="resumed"))
    root = tmp_path / "resumed"
    assert not (root / "card.json").exists()
    with pytest.raises(DatasetError, match="incomplete"):
        GeneratedDataset(root)
    monkeypatch.setattr(DatasetWriter, "write_shard", original)
    again = run_generate(config(tmp_path, name="resumed"))
    assert again.frames == 4  # only the missing shard was rendered
    assert digests(root) == digests(full.root)


def test_parallel_jobs_split_the_shards(tmp_path):
    first = run_generate(config(tmp_path, "parallel.count=2", "parallel.index=0"))
    assert not first.complete and first.frames == 8  # shards 0 and 2 of 3
    second = run_generate(config(tmp_path, "parallel.count=2", "parallel.index=1"))
    assert second.complete and second.frames == 4
    alone = run_generate(config(tmp_path, name="alone"))
    assert digests(second.root) == digests(alone.root)


def test_changed_config_never_mixes_or_deletes(tmp_path):
    run_generate(config(tmp_path))
    before = digests(tmp_path / "ds")
    with pytest.raises(DatasetError, match=r"generation.json.*fingerprint.seed"):
        run_generate(config(tmp_path, "seed=1"))
    assert digests(tmp_path / "ds") == before
    run_generate(config(tmp_path, "seed=1", "overwrite=true"))
    assert digests(tmp_path / "ds") != before


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("num_frames=0", ConfigError, "num_frames: expected a whole number >= 1"),
        ("shard_size=-2", ConfigError, "shard_size"),
        ("image.height=0", ConfigError, "image.height"),
        ("seed=-1", ConfigError, "seed"),
        ("parallel.index=3", ConfigError, "parallel.index"),
        ("randomization.camera.fov_deg=[100,80]", RandomizationError, "camera.fov_deg: inverted"),
        ("randomization.time_of_day.day=1.2", RandomizationError, r"must lie in \[0, 1\]"),
        ("randomization.vehicles.count=-1", RandomizationError, "vehicles.count"),
        ("+randomization.maps.Gotham=0.0", RandomizationError, "maps.Gotham: unknown choice"),
        ("backend.style=cartoon", ValueError, "backend.style"),
    ],
)
def test_bad_input_stops_before_any_frame(tmp_path, override, error, match):
    with pytest.raises(error, match=match):
        run_generate(config(tmp_path, override))
    assert not (tmp_path / "ds" / "shards").exists()


def test_unreachable_carla_server_stops_before_the_folder_is_touched(tmp_path):
    import socket
    import time

    from simulation.carla_backend import CarlaConnectionError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(
        tmp_path,
        "backend=carla",
        "backend.host=127.0.0.1",
        f"backend.port={port}",
        "backend.timeout_s=0.5",
        "backend.retries=2",
        "backend.backoff_s=0.1",
    )
    start = time.monotonic()
    with pytest.raises(CarlaConnectionError, match=f"127.0.0.1:{port}"):
        run_generate(cfg)
    assert time.monotonic() - start < 15  # a guard against hangs, not a timing target
    assert not (tmp_path / "ds").exists()


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(MissingConfigException, match="randomization"):
        config(tmp_path, "randomization=extreme")


def test_script_runs_and_reports_throughput(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "scripts/generate.py",
            *TINY,
            f"output_dir={tmp_path / 'cli'}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "12 frames in" in out.stdout and "frames/s" in out.stdout
    assert (tmp_path / "cli" / "card.json").exists()
