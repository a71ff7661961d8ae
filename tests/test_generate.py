"""scripts/generate.py end to end: config checks, resume, multirun split, contact sheet."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from core.config import ConfigError
from core.hashing import content_hash, generation_key
from core.paths import generated_root
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


# ----------------------------------------------------------------------------- training's splits
def test_content_hash_is_canonical_and_generation_keys_see_every_input():
    assert content_hash({"b": 1, "a": [1, 2]}) == content_hash({"a": [1, 2], "b": 1})
    assert len(content_hash({})) == 12 and int(content_hash({}), 16) >= 0
    parts = {
        "split": "sim_train",
        "spec": {"style": "sim", "seed": 1, "num_frames": 8},
        "randomization": {"maps": {"Town01": 1.0}},
        "image": {"height": 32, "width": 64},
        "shard_size": 4,
        "taxonomy": {"classes": ["road", "sky"]},
    }
    keys = {generation_key(**parts)}
    for name, other in [
        ("split", "sim_val"),
        ("spec", {"style": "sim", "seed": 2, "num_frames": 8}),
        ("randomization", {"maps": {"Town02": 1.0}}),
        ("image", {"height": 32, "width": 32}),
        ("shard_size", 8),
        ("taxonomy", {"classes": ["road"]}),
    ]:
        keys.add(generation_key(**{**parts, name: other}))
    assert len(keys) == 7


def train_config(tmp_path, *overrides: str):
    """``experiment=smoke`` on 4-frame splits of 32x64 in ``tmp_path``."""
    tiny = [f"data.generate.splits.{s}.num_frames=4" for s in SPLITS]
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(
            "train",
            [
                "experiment=smoke",
                f"paths.data={tmp_path}",
                "data.image.height=32",
                "data.image.width=64",
                "data.generate.shard_size=4",
                "progress=false",
                *tiny,
                *overrides,
            ],
        )


SPLITS = ("sim_train", "sim_val", "real_train", "real_val", "real_test")


def test_generated_splits_live_in_folders_named_by_their_config(tmp_path, taxonomy):
    from training.stages.data import build_datasets, ensure_procedural_datasets, wait_for_datasets

    cfg = train_config(tmp_path)
    data = cfg.data
    roots = ensure_procedural_datasets(data.generate, data.image, cfg.taxonomy)
    assert set(roots) == set(SPLITS)
    resolved = OmegaConf.to_container(data.datasets, resolve=True)
    for split, root in roots.items():
        assert root.parent == tmp_path / "smoke" and root.name.startswith(f"{split}-")
        assert resolved[split]["root"] == str(root)  # ${generated:<split>}
        assert root == generated_root(data.generate, split, data.image, cfg.taxonomy)
    datasets = build_datasets(data.datasets, taxonomy)
    assert {r: len(d) for r, d in datasets.items() if d is not None} == dict.fromkeys(SPLITS, 4)
    assert datasets["sim_train"].card["randomization_groups"]
    cards = {s: (r / "card.json").stat().st_mtime_ns for s, r in roots.items()}
    assert ensure_procedural_datasets(data.generate, data.image, cfg.taxonomy) == roots
    assert {s: (r / "card.json").stat().st_mtime_ns for s, r in roots.items()} == cards
    assert wait_for_datasets(data.generate, data.image, cfg.taxonomy, timeout_s=0) == roots

    # one field of the preset changed: new folders beside the old ones, which stay as they are
    dusty = train_config(tmp_path, "+randomization.weather.dust_storm=[0,5]")
    assert dusty.data.generate.randomization.weather.dust_storm == [0, 5]
    again = ensure_procedural_datasets(dusty.data.generate, dusty.data.image, dusty.taxonomy)
    # the sim splits follow the preset; the real splits render their own camera world
    for split in SPLITS:
        assert (again[split] == roots[split]) == split.startswith("real_"), split
    assert {s: (r / "card.json").stat().st_mtime_ns for s, r in roots.items()} == cards
    # plain values (a caller outside Hydra) name the same folders as the config nodes
    plain = OmegaConf.to_container(dusty, resolve=True)
    gen, image = plain["data"]["generate"], plain["data"]["image"]
    assert ensure_procedural_datasets(gen, image, plain["taxonomy"]) == again


def test_a_preset_name_in_data_generate_is_refused_with_the_new_syntax(tmp_path):
    from training.stages.data import ensure_procedural_datasets

    cfg = train_config(tmp_path, "data.generate.randomization=light")
    with pytest.raises(ConfigError, match=r"got 'light'; pick a preset with randomization=light"):
        ensure_procedural_datasets(cfg.data.generate, cfg.data.image, cfg.taxonomy)
    with pytest.raises(ValueError, match=r"data\.datasets\.sim_train\.root: .*randomization=light"):
        OmegaConf.to_container(cfg.data.datasets, resolve=True)
    assert not (tmp_path / "smoke").exists()
