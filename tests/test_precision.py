"""``trainer.precision: auto`` and training steps under bf16 autocast."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from training.precision import Bf16Support, apply_precision, resolve_precision

AMX = Bf16Support(native=True, units=("AMX", "AVX-512 BF16"))
NONE = Bf16Support(native=False, units=())


def test_auto_on_a_cpu_with_native_bf16_trains_in_bf16_mixed():
    choice = resolve_precision("auto", "cpu", cpu_support=lambda: AMX)
    assert choice.precision == "bf16-mixed"
    assert choice.requested == "auto"
    assert "AMX" in choice.reason


def test_auto_on_a_cpu_without_bf16_units_stays_fp32():
    choice = resolve_precision("auto", "cpu", cpu_support=lambda: NONE)
    assert choice.precision == "32-true"
    assert "no native bf16" in choice.reason


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_on_a_gpu_follows_its_bf16_support(bf16, expected):
    choice = resolve_precision("auto", "gpu", cuda_bf16=lambda: bf16)
    assert choice.precision == expected


def test_an_explicit_precision_is_kept():
    assert resolve_precision("32-true", "cpu", cpu_support=lambda: AMX).precision == "32-true"
    assert resolve_precision("bf16-mixed", "cpu", cpu_support=lambda: AMX).precision == (
        "bf16-mixed"
    )


def test_forced_bf16_on_a_cpu_without_it_warns_with_the_key_and_the_slowdown(caplog):
    with caplog.at_level(logging.WARNING, logger="training.precision"):
        choice = resolve_precision(
            "bf16-mixed", "cpu", cpu_support=lambda: NONE, measure=lambda: 0.25
        )
    assert choice.precision == "bf16-mixed"  # trains anyway: a warning, not a crash
    message = caplog.text
    assert "trainer.precision=bf16-mixed" in message
    assert "4.0x slower" in message


def test_apply_precision_resolves_the_config_in_place_and_says_so_once(caplog, monkeypatch):
    import training.precision as precision

    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: AMX)
    monkeypatch.setattr(precision, "_announced", set())
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "precision": "auto"}})
    OmegaConf.set_struct(cfg, True)
    with caplog.at_level(logging.INFO, logger="training.precision"):
        apply_precision(cfg.trainer)
        again = OmegaConf.create({"accelerator": "cpu", "precision": "auto"})
        apply_precision(again)
    assert cfg.trainer.precision == "bf16-mixed"
    assert again.precision == "bf16-mixed"
    assert caplog.text.count("training in bf16-mixed") == 1


def test_the_stage_hash_follows_the_resolved_precision(monkeypatch):
    """A run that resolves ``auto`` to bf16 shares stages with one that asked for bf16,
    and none with an fp32 run: the precision changes the result."""
    import training.precision as precision
    from tests.conftest import compose_config
    from training.stages import check_config

    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: AMX)
    digests = {}
    for value in ("auto", "bf16-mixed", "32-true"):
        cfg = compose_config("train", ["experiment=smoke", f"trainer.precision={value}"])
        digests[value] = check_config(cfg).digests
    assert digests["auto"] == digests["bf16-mixed"]
    assert digests["auto"] != digests["32-true"]


def test_the_pipelines_check_leaves_auto_for_each_run_to_resolve_and_log():
    """``scripts/pipeline.py`` checks every method before any work; that check must not
    resolve the configs it runs later, or each run would log ``precision_requested`` as
    the resolved value instead of ``auto``."""
    from hydra import initialize_config_dir

    from tests.conftest import CONFIGS
    from training.pipeline import compose_methods

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        configs = compose_methods(["none"], ["experiment=smoke"])
    assert configs["none"].trainer.precision == "auto"


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    assert torch.isfinite(a) and torch.isfinite(b)
    assert abs(float(a) - float(b)) <= rel * abs(float(b)), (float(a), float(b))


def test_a_segmentation_step_under_bf16_autocast_is_close_to_fp32():
    from training.models.unet import UNet

    torch.manual_seed(0)
    model = UNet(num_classes=11, base_channels=8, depth=3)
    images = torch.rand(2, 3, 32, 64)
    labels = torch.randint(0, 11, (2, 32, 64))
    losses, grads = {}, {}
    for bf16 in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)
            loss = torch.nn.functional.cross_entropy(logits, labels)
        assert loss.dtype == torch.float32  # losses stay in fp32 under autocast
        loss.backward()
        losses[bf16] = loss.detach()
        grads[bf16] = torch.cat([p.grad.flatten() for p in model.parameters()])
    _close(losses[True], losses[False], rel=0.02)
    cosine = torch.nn.functional.cosine_similarity(grads[True], grads[False], dim=0)
    assert cosine > 0.95  # bf16 keeps ~3 significant digits: 0.97 here


def test_a_cyclegan_step_under_bf16_autocast_is_close_to_fp32():
    """Both halves of the manual-optimization step: the generators' losses and the
    discriminators' loss, in fp32 whatever the autocast."""
    from adaptation.cyclegan.module import CycleGAN

    torch.manual_seed(0)
    model = CycleGAN(g_ngf=8, g_blocks=2, d_ndf=8, d_layers=2, pool_size=0)
    sim = torch.rand(1, 3, 32, 32) * 2 - 1
    real = torch.rand(1, 3, 32, 32) * 2 - 1
    values = {}
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses, fake_real, fake_sim = model.generator_losses(sim, real)
            g_loss = model.generator_objective(losses)
            d_loss = model.discriminator_loss(sim, real, fake_sim, fake_real)
        assert g_loss.dtype == d_loss.dtype == torch.float32
        values[bf16] = (g_loss.detach(), d_loss.detach())
    for low, full in zip(values[True], values[False], strict=True):
        _close(low, full, rel=0.03)
