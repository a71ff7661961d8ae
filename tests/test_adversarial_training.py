"""Adversarial training (S-05's mitigation): the crafted share, the budget, BatchNorm left
alone, rate 0 as today, same seed same weights, bf16, and the config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core.config import ConfigError
from training.adversarial import AdversarialTraining, adversarial_training
from training.losses import SegmentationLoss
from training.task import SegmentationTask

EPS = 4 / 255


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)
    )


def _batch(n: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(n, 3, 8, 8, generator=gen),
        "mask": torch.randint(0, 2, (n, 8, 8), generator=gen),
        "domain": torch.tensor([0, 1] * (n // 2)),
    }


def _task(model: nn.Module, adversarial: AdversarialTraining | None) -> SegmentationTask:
    task = SegmentationTask(
        model, SegmentationLoss(2), ["a", "b"], np.zeros((256, 3), np.uint8),
        channels_last=False, adversarial=adversarial,
    )  # fmt: skip
    logged: dict[str, float] = {}

    def log(key, value, **_):
        logged[key] = float(torch.as_tensor(value).detach())

    task.logged = logged  # type: ignore[attr-defined]
    task.log = log  # type: ignore[method-assign]
    return task


@pytest.mark.parametrize(("rate", "expected"), [(0.5, 5), (0.25, 3), (0.04, 0), (1.0, 10)])
def test_the_crafted_share_is_exact_and_the_rest_untouched(rate, expected):
    batch = _batch()
    settings = AdversarialTraining(rate, EPS, steps=2, seed=0)
    out, idx = settings.craft(_model(), batch["image"], batch["mask"], step=3, batch_idx=1)
    assert idx.numel() == expected == settings.count(10)  # rate * 10 rounded half up
    assert idx.unique().numel() == expected
    changed = (out != batch["image"]).flatten(1).any(1)
    others = torch.ones(10, dtype=torch.bool)
    others[idx] = False
    assert not changed[others].any()  # the clean share is left as it was
    assert changed[idx].all()
    # the choice follows seed, step and batch index, and only them
    assert torch.equal(idx, settings.chosen(10, 3, 1))
    if 0 < expected < 10:
        picks = {tuple(settings.chosen(10, s, 0).tolist()) for s in range(8)}
        assert len(picks) > 1


def test_the_perturbation_stays_in_the_budget_and_raises_the_loss():
    batch = _batch()
    model = _model().eval()
    settings = AdversarialTraining(1.0, EPS, steps=3, seed=0)
    out, _ = settings.craft(model, batch["image"], batch["mask"], step=0, batch_idx=0)
    assert float((out - batch["image"]).abs().max()) <= EPS + 1e-6
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    ce = nn.functional.cross_entropy
    with torch.no_grad():
        clean = float(ce(model(batch["image"]), batch["mask"]))
        assert float(ce(model(out), batch["mask"])) > clean


def test_crafting_moves_no_batchnorm_statistic_nor_the_rng_and_restores_the_mode():
    model = _model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    batch = _batch()
    AdversarialTraining(0.5, EPS, steps=3, seed=0).craft(
        model, batch["image"], batch["mask"], step=0, batch_idx=0
    )
    assert model.training and model[1].training
    for key, value in model.state_dict().items():  # running_mean/var, num_batches_tracked
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())  # gradients to the input only
    assert torch.equal(rng, torch.random.get_rng_state())


def test_the_training_step_trains_on_the_crafted_batch_and_logs_its_loss():
    batch = _batch()
    settings = AdversarialTraining(0.5, EPS, steps=2, seed=0)
    task = _task(_model(), settings)
    loss = task.training_step(batch, 2)
    assert task.model[1].num_batches_tracked.item() == 1  # the training pass alone
    # the same loss as the plain task on the batch the attack makes
    crafted, idx = settings.craft(_model(), batch["image"], batch["mask"], step=0, batch_idx=2)
    plain = _task(_model(), None).training_step({**batch, "image": crafted}, 2)
    torch.testing.assert_close(loss, plain)
    expected = task.loss(task(crafted)[idx], batch["mask"][idx])
    assert task.logged["train/adv_loss"] == pytest.approx(float(expected.detach()), rel=1e-6)


def test_rate_zero_is_the_training_step_of_today():
    batch = _batch()
    today = _task(_model(), None)
    off = _task(_model(), AdversarialTraining(0.0, EPS, steps=1, seed=0))
    torch.testing.assert_close(off.training_step(batch, 0), today.training_step(batch, 0))
    assert "train/adv_loss" not in off.logged
    assert adversarial_training({"rate": 0.0, "eps_255": 8, "steps": 3}, seed=0) is None


def _train(adversarial: AdversarialTraining | None, steps: int = 4) -> dict[str, torch.Tensor]:
    task = _task(_model(), adversarial)
    opt = torch.optim.Adam(task.parameters(), lr=1e-2)
    for i in range(steps):
        loss = task.training_step(_batch(seed=i), i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return task.model.state_dict()


def test_same_seed_same_weights():
    a = _train(AdversarialTraining(0.5, EPS, steps=2, seed=0))
    b = _train(AdversarialTraining(0.5, EPS, steps=2, seed=0))
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = _train(AdversarialTraining(0.5, EPS, steps=2, seed=1))  # another choice and start
    clean = _train(None)
    assert not all(torch.equal(a[k], other[k]) for k in a)
    assert not all(torch.equal(a[k], clean[k]) for k in a)


def test_under_bf16_autocast_the_input_gradient_is_fp32():
    batch = _batch()
    task = _task(_model(), AdversarialTraining(0.5, EPS, steps=2, seed=0))
    seen: list[torch.dtype] = []
    original = task.forward

    def forward(x):
        seen.append(x.dtype)
        return original(x)

    task.forward = forward  # type: ignore[method-assign]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = task.training_step(batch, 0)
        crafted, _ = task.adversarial.craft(
            task.model, batch["image"], batch["mask"], 0, 0, forward=task
        )
    assert torch.isfinite(loss)
    assert seen and all(d == torch.float32 for d in seen)  # the attacked images: fp32
    assert crafted.dtype == torch.float32
    assert float((crafted - batch["image"]).abs().max()) <= EPS + 1e-6
    assert torch.isfinite(torch.tensor(task.logged["train/adv_loss"]))


def test_settings_turn_grey_levels_into_a_budget_and_carry_the_seed():
    settings = adversarial_training({"rate": 0.5, "eps_255": 8, "steps": 3}, seed=7)
    assert settings == AdversarialTraining(0.5, 8 / 255, 3, 7)
    assert adversarial_training({"rate": 0.25}, seed=0) == AdversarialTraining(
        0.25, 4 / 255, 1, 0
    )  # defaults for the rest
    assert adversarial_training(None, seed=0) is None


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"rate": 1.5}, r"^loss.adversarial.rate: expected a number in \[0, 1\], got 1.5"),
        ({"rate": -0.1}, r"^loss.adversarial.rate: expected"),
        ({"rate": 0.5, "eps_255": 300}, r"^loss.adversarial.eps_255: expected .*\[0, 255\]"),
        ({"rate": 0.5, "eps_255": -1}, r"^loss.adversarial.eps_255: expected"),
        ({"rate": 0.5, "steps": 0}, r"^loss.adversarial.steps: expected a whole number >= 1"),
        ({"rate": 0.5, "eps": 4}, r"^loss.adversarial.eps: unknown key"),
        ([0.5], r"^loss.adversarial: expected a mapping"),
        ({"rate": 0.0, "eps_255": 1000}, r"^loss.adversarial.eps_255: expected"),  # off, still
    ],
)
def test_bad_settings_name_the_key(node, message):
    with pytest.raises(ConfigError, match=message):
        adversarial_training(node, seed=0)


def _plan(tmp_path, *overrides):
    from tests.test_train import smoke_config
    from training.stages import check_config

    cfg = smoke_config(tmp_path, *overrides)
    return cfg, check_config(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.adversarial.rate=2", r"^loss.adversarial.rate: expected"),
        ("loss.adversarial.eps_255=256", r"^loss.adversarial.eps_255: expected"),
    ],
)
def test_a_bad_setting_stops_the_run_before_any_work(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _plan(tmp_path, override)
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_off_leaves_the_stage_hashes_and_logged_config_as_without_the_option(tmp_path):
    from training.stages.loop import make_recipe

    cfg_off, off = _plan(tmp_path)
    _, absent = _plan(tmp_path, "~loss.adversarial")  # the config before the option existed
    _, other_eps = _plan(tmp_path, "loss.adversarial.eps_255=8")  # off: eps changes nothing
    cfg_on, on = _plan(tmp_path, "loss.adversarial.rate=0.5")
    assert off.digests == absent.digests == other_eps.digests
    assert all(on.digests[s] != off.digests[s] for s in off.digests)
    assert "adversarial" not in cfg_off.loss
    recipe_off = make_recipe(cfg_off, None, tmp_path)
    recipe_on = make_recipe(cfg_on, None, tmp_path)
    assert recipe_off.adversarial is None
    assert "adversarial" not in recipe_off.config["loss"]
    assert recipe_on.adversarial == AdversarialTraining(0.5, 4 / 255, 1, 0)
    assert recipe_on.config["loss"]["adversarial"]["rate"] == 0.5


def test_a_lightning_fit_in_bf16_logs_the_adversarial_loss(tmp_path):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    batch = _batch(40)
    samples = [{k: v[i] for k, v in batch.items()} for i in range(40)]
    task = SegmentationTask(
        _model(), SegmentationLoss(2), ["a", "b"], np.zeros((256, 3), np.uint8),
        channels_last=True, adversarial=AdversarialTraining(0.5, EPS, 1, 0),
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(task, DataLoader(samples, batch_size=10))
    assert trainer.global_step == 3
    assert np.isfinite(float(trainer.callback_metrics["train/adv_loss"]))
    assert task.model[1].num_batches_tracked.item() == 3  # training passes only
