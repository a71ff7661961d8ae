"""Translating a sim dataset: labels and provenance kept, the semantic guard, generator files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from adaptation.cyclegan import CycleGAN
from adaptation.cyclegan.stage import (
    UnpairedImages,
    load_generator,
    resolve_generator,
    save_generator,
    translation_grid,
)
from adaptation.cyclegan.translate import (
    CorruptionStats,
    GuardLimits,
    SemanticGuardError,
    label_corruption,
    measure_corruption,
    translate_dataset,
)
from core.config import ConfigError
from simulation.dataset import DatasetWriter, GeneratedDataset, shard_ranges
from simulation.frames import FrameBatch

CLASSES = ["dark", "red", "green"]


def make_dataset(root, n=10, shard=4, h=8, w=12, seed=0) -> GeneratedDataset:
    """A tiny sim dataset: left third dark, middle red, right green; masks to match."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, h, w, 3), np.uint8)
    masks = np.zeros((n, h, w), np.uint8)
    third = w // 3
    images[:, :, third : 2 * third, 0] = 200
    images[:, :, 2 * third :, 1] = 200
    images += rng.integers(0, 20, images.shape, dtype=np.uint8)
    masks[:, :, third : 2 * third] = 1
    masks[:, :, 2 * third :] = 2
    masks[:, 0, 0] = 255  # an ignored pixel survives translation too
    writer = DatasetWriter(
        root, n, shard, {"taxonomy_hash": "tax", "kind": "test"}, card_extra={"name": "sim_train"}
    )
    for k in writer.open():
        rng_k = shard_ranges(n, shard)[k]
        records = [
            {"index": i, "seed": 7, "group": "day_clear", "params": {"sun": i / 10}} for i in rng_k
        ]
        writer.write_shard(
            k,
            FrameBatch(images[rng_k.start : rng_k.stop], masks[rng_k.start : rng_k.stop], records),
        )
    writer.finalize(len(CLASSES), CLASSES)
    return GeneratedDataset(root)


class ColourSegmenter(nn.Module):
    """Deterministic 'segmenter': dark / red / green by which channel dominates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, g = x[:, 0], x[:, 1]
        dark = 0.3 - (r + g)  # bright pixels are not dark
        return torch.stack([dark, r - g, g - r], dim=1)


def invert(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


def grey(x: torch.Tensor) -> torch.Tensor:  # the degenerate generator: one colour out
    return torch.full_like(x, 0.5)


# ------------------------------------------------------------------ translation
def test_translated_dataset_keeps_labels_and_provenance(tmp_path):
    source = make_dataset(tmp_path / "sim")
    provenance = {"generator_run": "run123", "generator_sha256": "ab" * 32}
    result = translate_dataset(invert, source, tmp_path / "out", provenance, batch_size=3)
    out = result.dataset
    assert result.written_frames == 10 and len(out) == 10
    src_images, src_masks = source.get_batch(range(10))
    images, masks = out.get_batch(range(10))
    np.testing.assert_array_equal(masks, src_masks)  # labels untouched, ignore included
    np.testing.assert_array_equal(images, 255 - src_images)  # the generator's output
    for before, after in zip(source.records, out.records, strict=True):
        assert after["params"] == before["params"] and after["seed"] == before["seed"]
        assert after["translation"]["generator_run"] == "run123"
        assert after["translation"]["source_index"] == before["index"]
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["translation"]["generator_run"] == "run123"
    assert card["translation"]["source"] == "sim_train"
    assert card["taxonomy_hash"] == source.card["taxonomy_hash"]
    assert card["class_pixel_histogram"] == source.card["class_pixel_histogram"]
    assert out.groups == source.groups
    out.verify()  # every checksum of the new dataset holds


def test_translation_resumes_and_refuses_another_generator(tmp_path):
    source = make_dataset(tmp_path / "sim")
    prov = {"generator_run": "a"}
    translate_dataset(invert, source, tmp_path / "out", prov)
    again = translate_dataset(invert, source, tmp_path / "out", prov)
    assert again.written_frames == 0  # complete: nothing rewritten
    # a kill after two shards: the rerun writes only the third
    import shutil

    shutil.rmtree(tmp_path / "out" / "shards" / "000002")
    (tmp_path / "out" / "card.json").unlink()
    resumed = translate_dataset(invert, source, tmp_path / "out", prov)
    assert resumed.written_frames == 2  # shard 2 holds frames 8 and 9
    with pytest.raises(Exception, match="different fingerprint"):
        translate_dataset(grey, source, tmp_path / "out", {"generator_run": "b"})


def test_translation_refuses_a_generator_that_changes_the_shape(tmp_path):
    source = make_dataset(tmp_path / "sim")

    def crop(x):
        return x[..., :4]

    with pytest.raises(ValueError, match=r"returned \(4, 3, 8, 4\)"):
        translate_dataset(crop, source, tmp_path / "out", {"generator_run": "x"})
    assert not (tmp_path / "out" / "card.json").exists()


# ------------------------------------------------------------------ the guard
def test_label_corruption_counts_changed_pixels_per_source_class():
    seg = ColourSegmenter()
    src = torch.zeros(1, 3, 2, 2)
    src[0, 0, 0, :] = 1.0  # top row red, bottom row dark
    out = src.clone()
    out[0, 0, 0, 0], out[0, 1, 0, 0] = 0.0, 1.0  # one red pixel turned green
    stats = label_corruption(seg, src, out, 3)
    np.testing.assert_array_equal(stats.total, [2, 2, 0])
    np.testing.assert_array_equal(stats.changed, [0, 1, 0])
    assert stats.overall == pytest.approx(0.25)
    assert np.isnan(stats.per_class()[2])
    metrics = stats.metrics(CLASSES)
    assert metrics["guard/corruption/red"] == pytest.approx(0.5)
    assert "guard/corruption/green" not in metrics  # absent class: no figure


def test_guard_passes_a_faithful_generator_and_refuses_a_degenerate_one(tmp_path):
    source = make_dataset(tmp_path / "sim")
    seg, limits = ColourSegmenter(), GuardLimits(max_corruption=0.3)
    fine = measure_corruption(lambda x: x, seg, source, list(range(10)), 3, batch_size=4)
    assert fine.overall == 0.0 and fine.frames == 10
    limits.check(fine, CLASSES, "identity")
    bad = measure_corruption(grey, seg, source, list(range(10)), 3)
    assert bad.overall > 0.5
    with pytest.raises(SemanticGuardError, match=r"semantic guard: the generator g corrupts") as e:
        limits.check(bad, CLASSES, "the generator g")
    assert "max_corruption is 30.0%" in str(e.value) and "class 'green'" in str(e.value)


def test_guard_checks_a_rare_class_by_its_pixel_count_not_its_share():
    # the case: 9.7 % of pixels change overall, but every person pixel (0.5 %)
    stats = CorruptionStats(np.array([45_000, 2_500, 0]), np.array([497_500, 2_500, 5]), 1)
    found = GuardLimits(0.5, 0.6, min_class_pixels=200).violations(stats, CLASSES)
    assert len(found) == 1 and "class 'red' (0.50% of pixels, 2500 pixels): 100.0%" in found[0]
    # a class seen on too few pixels to judge is not checked
    few = CorruptionStats(np.array([0, 5, 0]), np.array([990, 5, 5]), frames=1)
    assert GuardLimits(0.5, 0.6, min_class_pixels=200).violations(few, CLASSES) == []
    assert len(GuardLimits(0.5, 0.6, min_class_pixels=5).violations(few, CLASSES)) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_corruption", 1.5), ("max_class_corruption", -0.1), ("min_class_pixels", 0.5)],
)
def test_guard_limits_are_checked(field, value):
    with pytest.raises(ValueError, match=f"guard.{field}"):
        GuardLimits(**{field: value})


# ------------------------------------------------------------------ generator files
def trained_tiny_cyclegan(h=8, w=12) -> CycleGAN:
    model = CycleGAN(g_ngf=4, g_blocks=1, d_ndf=4, pool_size=2)
    model.image_channels, model.image_size = 3, (h, w)
    return model


def test_generator_file_round_trip_translates_like_the_module(tmp_path):
    model = trained_tiny_cyclegan()
    save_generator(model, tmp_path / "g.pt")
    translator = load_generator(tmp_path / "g.pt", (8, 12))
    x = torch.rand(2, 3, 8, 12)
    torch.testing.assert_close(translator(x), model.translate(x))


def test_generator_for_another_image_size_is_refused(tmp_path):
    save_generator(trained_tiny_cyclegan(16, 32), tmp_path / "g.pt")
    with pytest.raises(ConfigError, match=r"trained on 16x32 images, the data are 8x12"):
        load_generator(tmp_path / "g.pt", (8, 12))


def test_generator_for_another_channel_count_is_refused(tmp_path):
    model = trained_tiny_cyclegan()
    model.image_channels = 1
    save_generator(model, tmp_path / "g.pt")
    with pytest.raises(ConfigError, match="1-channel images"):
        load_generator(tmp_path / "g.pt", (8, 12))


def test_missing_generator_file_or_run_is_named(tmp_path):
    with pytest.raises(ConfigError, match="adaptation.cyclegan.generator: no generator file"):
        resolve_generator(str(tmp_path / "nope.pt"), "sqlite:///unused.db", tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ConfigError, match="no MLflow run 'deadbeef'"):
        resolve_generator("deadbeef", uri, tmp_path / "dl")


# ------------------------------------------------------------------ data and grids
def test_unpaired_images_cover_both_sets():
    sim = [{"image": torch.full((3, 2, 2), float(i))} for i in range(3)]
    real = [{"image": torch.full((3, 2, 2), 10.0 + i)} for i in range(5)]
    pairs = UnpairedImages(sim, real, seed=1)
    assert len(pairs) == 5
    assert {int(pairs[i]["real"][0, 0, 0]) for i in range(5)} == {10, 11, 12, 13, 14}
    assert {int(pairs[i]["sim"][0, 0, 0]) for i in range(5)} == {0, 1, 2}
    with pytest.raises(ValueError, match="empty"):
        UnpairedImages(sim, [])


def test_translation_grid_layout():
    a, b = torch.zeros(2, 3, 4, 5), torch.ones(2, 3, 4, 5)
    grid = translation_grid(a, b, a, b)
    assert grid.shape == (8, 20, 3) and grid.dtype == np.uint8
    assert grid[:, :5].max() == 0 and grid[:, 5:10].min() == 255 and grid[:, 15:].min() == 255


def test_generator_is_logged_as_an_mlflow_model_that_translates_alike(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from training import tracking

    save_generator(trained_tiny_cyclegan(16, 32), tmp_path / "g.pt")
    translator = load_generator(tmp_path / "g.pt", (16, 32))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("x", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    tracking.log_model(run.info.run_id, translator, 16, 32, uri=uri, name="generator_model")
    mlflow.set_tracking_uri(uri)
    try:
        [logged] = mlflow.search_logged_models(experiment_ids=[exp], output_format="list")
        assert logged.name == "generator_model"
        loaded = mlflow.pytorch.load_model(logged.model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    x = torch.rand(2, 3, 16, 32)
    torch.testing.assert_close(loaded(x), translator(x))


def test_translation_under_ddp_is_refused_before_work_unless_made_already(tmp_path):
    """The CycleGAN and the translation run in one process: under DDP a run must find the
    translated set made by an earlier single-process run, or stop before any stage."""
    from types import SimpleNamespace

    from adaptation.cyclegan.stage import CycleGANTranslation
    from adaptation.plugin import RunValues

    sim = make_dataset(tmp_path / "sim_train")
    run = RunValues(
        seed=0, image_size=(8, 12), class_names=tuple(CLASSES), data={"datasets": {}},
        precision="32-true", stage_key=lambda name: "x", stage_names=("source_only",),
    )  # fmt: skip
    plugin = CycleGANTranslation(["source_only"], {"_target_": "x"}, segmenter=None)
    env = SimpleNamespace(data_dir=tmp_path / "data", world_size=2)
    datasets = {"sim_train": sim, "real_train": sim}
    with pytest.raises(ConfigError, match=r"adaptation.cyclegan: the CycleGAN and the trans"):
        plugin.check(run, env, datasets)
    done = env.data_dir / "translated" / f"{sim.name}-{plugin.key(run)}" / "card.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    plugin.check(run, env, datasets)  # made already: the DDP run reuses it
    plugin.check(run, SimpleNamespace(data_dir=tmp_path / "other", world_size=1), datasets)
