"""The plan: stage and derived-data names from the config alone (no training)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from core.config import ConfigError
from tests.conftest import compose_config
from training.compare import sweep_job_hashes
from training.stages import check_config


def plan(tmp_path, *overrides):
    from tests.test_train import smoke_config

    return check_config(smoke_config(tmp_path, *overrides))


def cyclegan_keys(p):
    [component] = p.pixel
    gen = component.plugin._generator_identity(p.run)
    return gen, component.plugin.key(p.run), dict(p.digests)


def test_a_tighter_guard_reruns_the_translation_but_not_the_cyclegan(tmp_path):
    gen, key, digests = cyclegan_keys(plan(tmp_path, "adaptation=cyclegan"))
    gen2, key2, digests2 = cyclegan_keys(
        plan(tmp_path, "adaptation=cyclegan", "adaptation.cyclegan.guard.max_corruption=0.3")
    )
    assert gen2 == gen  # the same generator: the CycleGAN is reused
    assert key2 != key  # a new translated set: the guard runs again
    # the adapted stages read another dataset, so they are other stages
    assert digests2["source_only"] != digests["source_only"]


@pytest.mark.parametrize(
    "override",
    [
        "adaptation.cyclegan.image_every=3",
        "adaptation.cyclegan.translate_batch_size=2",
        "adaptation.cyclegan.compile=true",
        "data.loader.num_workers=2",
        "progress=true",
        "retries=3",
    ],
)
def test_logging_and_speed_settings_rerun_nothing(tmp_path, override):
    before = cyclegan_keys(plan(tmp_path, "adaptation=cyclegan"))
    after = cyclegan_keys(plan(tmp_path, "adaptation=cyclegan", override))
    assert after == before


def test_a_cyclegan_setting_retrains_the_generator_and_what_follows(tmp_path):
    gen, key, digests = cyclegan_keys(plan(tmp_path, "adaptation=cyclegan"))
    gen2, key2, digests2 = cyclegan_keys(
        plan(tmp_path, "adaptation=cyclegan", "adaptation.cyclegan.max_batches=7")
    )
    assert gen2 != gen and key2 != key
    assert all(digests2[s] != digests[s] for s in ("source_only", "finetune"))


def test_the_plain_segmenter_is_adaptation_none_s_stage(tmp_path):
    none = plan(tmp_path)
    cyclegan = plan(tmp_path, "adaptation=cyclegan")
    assert cyclegan.run.stage_key("source_only") == none.digests["source_only"]
    dann = plan(tmp_path, "adaptation=dann")
    assert dann.digests["source_only"] != none.digests["source_only"]
    assert [c.name for c in dann.objectives_for("source_only")] == ["dann"]
    assert dann.objectives_for("finetune") == []


def test_a_sim_only_stage_ignores_the_real_training_split(tmp_path):
    a = plan(tmp_path, "experiment=source_only")
    b = plan(tmp_path, "experiment=source_only", f"data.datasets.real_train.root={tmp_path}")
    assert a.digests["source_only"] == b.digests["source_only"]


def test_compare_finds_cyclegan_adapted_stages_by_hash(tmp_path):
    cfg = compose_config(
        "train",
        ["experiment=smoke", "adaptation=cyclegan", f"paths.data={tmp_path / 'data'}",
         f"paths.output={tmp_path / 'out'}"],
    )  # fmt: skip
    job = tmp_path / "sweep" / "0" / ".hydra"
    job.mkdir(parents=True)
    OmegaConf.save(cfg, job / "config.yaml")  # as Hydra saves it: unresolved
    expected = dict(check_config(cfg).digests)
    assert sweep_job_hashes(tmp_path / "sweep") == {"0": expected}


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (
            "stages.finetune.sim_ratio=1.5",
            r"stages.finetune.sim_ratio: expected a number in \[0, 1\]",
        ),
        ("stages.source_only.real_fraction=-0.1", r"stages.source_only.real_fraction: expected"),
        (
            "stages.finetune.max_epochs=0",
            r"stages.finetune.max_epochs: expected a whole number >= 1",
        ),
        ("retries=-1", r"retries: expected a whole number >= 0"),
        ("seed=-1", r"^seed: expected a whole number >= 0, got -1"),
        ("seed=0.5", r"^seed: expected a whole number >= 0"),
        ("data.loader.batch_size=0", r"data.loader.batch_size: expected a whole number >= 1"),
        (
            "adaptation=cyclegan adaptation.cyclegan.max_batches=0",
            r"adaptation.cyclegan.max_batches: expected a whole number >= 1",
        ),
        (
            "adaptation=cyclegan adaptation.cyclegan.guard.max_corruption=1.5",
            r"adaptation.cyclegan.guard.max_corruption: expected a number in \[0, 1\], got 1.5",
        ),
        ("adaptation=dann adaptation.dann.gamma=-1", r"adaptation.dann.gamma: expected"),
        (
            "adaptation=cyclegan adaptation.cyclegan.compile=maybe",
            r"adaptation.cyclegan.compile: expected true or false, got 'maybe'",
        ),
        (
            "adaptation=cyclegan adaptation.cyclegan.guard.max_corruption=half",
            r"adaptation.cyclegan.guard.max_corruption: expected a number in \[0, 1\], got 'half'",
        ),
        (
            "adaptation=cyclegan +adaptation.cyclegan.guard.strict=1",
            r"adaptation.cyclegan.guard.strict: unknown key",
        ),
        ("data.loader.num_workers=-2", r"data.loader.num_workers: expected a whole number >= 0"),
        ("+stages.finetune.lr=0.1", r"stages.finetune.lr: unknown key"),
        ("stages.finetune.init=nowhere.ckpt", r"stages.finetune.init: 'nowhere.ckpt' is neither"),
    ],
)
def test_bad_stage_settings_name_the_key(tmp_path, override, match):
    """Refused when the plan is made: before any data is generated or any stage trains."""
    with pytest.raises(ConfigError, match=match):
        plan(tmp_path, *override.split())


def test_the_smoke_experiment_takes_any_model(tmp_path):
    """smoke's small U-Net width used to leak into model=deeplab (a TypeError after the
    data checks)."""
    assert plan(tmp_path, "model=deeplab").digests
    with pytest.raises(ConfigError, match=r"^model \(training.models.UNet\): .*width"):
        plan(tmp_path, "+model.width=3")


def test_initial_weights_follow_the_seed_not_the_process_state(tmp_path):
    """Same seed, same model: whatever drew from torch's RNG before (issue: two runs of one
    stage in two output folders trained from different weights)."""
    import torch

    from training.stages.loop import make_recipe

    cfg = compose_config("train", ["experiment=smoke", f"paths.output={tmp_path}"])
    recipe = make_recipe(cfg, None, tmp_path)
    from training.stages.segmenter import build_model

    torch.manual_seed(1)
    a = build_model(recipe, 11).state_dict()
    torch.rand(100)  # the process draws something else first
    b = build_model(recipe, 11).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.random.get_rng_state()
    build_model(recipe, 11)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    other = build_model(
        make_recipe(compose_config("train", ["experiment=smoke", "seed=1"]), None, tmp_path), 11
    )
    assert not all(torch.equal(a[k], other.state_dict()[k]) for k in a)


def test_the_dann_discriminator_follows_the_seed():
    import torch

    from adaptation.dann import DANN
    from adaptation.discriminator import DomainDiscriminator
    from adaptation.plugin import ModelInfo

    def make(seed):
        dann = DANN(["source_only"], lambda in_features: DomainDiscriminator(in_features, 8, 1))
        info = ModelInfo(16, 11, lambda size: iter(()), seed=seed)
        return dann.objective(info).discriminator.state_dict()

    torch.manual_seed(5)
    a = make(0)
    torch.rand(10)
    b, c = make(0), make(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("data.augment.scale=[1.2,0.8]", r"^data.augment.scale: expected 0 < low <= high"),
        ("data.augment.color_jitter=2", r"^data.augment.color_jitter: expected a number"),
    ],
)
def test_augmentation_errors_name_the_full_key(tmp_path, override, match):
    from training.stages.loop import make_recipe

    cfg = compose_config("train", ["experiment=smoke", override])
    with pytest.raises(ConfigError, match=match):
        make_recipe(cfg, None, tmp_path)


def test_a_stage_started_from_a_file_is_named_by_its_content(tmp_path):
    ckpt = tmp_path / "start.ckpt"
    ckpt.write_bytes(b"one")
    first = plan(tmp_path, "experiment=finetune", f"stages.finetune.init={ckpt}").digests
    ckpt.write_bytes(b"two")
    second = plan(tmp_path, "experiment=finetune", f"stages.finetune.init={ckpt}").digests
    assert first["finetune"] != second["finetune"]
    assert first["source_only"] == second["source_only"]


def test_screening_is_part_of_what_a_stage_trains_on(tmp_path):
    on = plan(tmp_path).digests
    off = plan(tmp_path, "risk.screening=false").digests
    assert on["source_only"] != off["source_only"]
    assert plan(tmp_path, "risk.drift_samples=10").digests == on  # a monitor setting: not
