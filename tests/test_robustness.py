"""Risk S-05: FGSM and PGD against hand-computed gradients, corruptions, the figures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.config import ConfigError
from training.risk.robustness import (
    CORRUPTIONS,
    corrupt,
    fgsm,
    pgd,
    robustness_figures,
    settings_from,
)


def _linear_model() -> nn.Conv2d:
    """Per-pixel logits ``W x + b`` (a 1x1 convolution, 3 channels -> 2 classes)."""
    model = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-1.0, 1.0, 2.0]]).view(2, 3, 1, 1))
        model.bias.copy_(torch.tensor([0.1, -0.2]))
    return model.eval()


def _hand_gradient(model: nn.Conv2d, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d mean-CE / d x for per-pixel logits ``W x + b``: ``W^T (softmax - onehot) / N``
    at every counted pixel (ignored ones give 0)."""
    w = model.weight.detach().view(2, 3)
    logits = torch.einsum("kc,bchw->bkhw", w, x) + model.bias.detach().view(1, 2, 1, 1)
    p = logits.softmax(1)
    onehot = torch.zeros_like(p)
    keep = y != 255
    onehot.scatter_(1, y.clamp(max=1).unsqueeze(1), 1.0)
    delta = (p - onehot) * keep.unsqueeze(1)
    return torch.einsum("kc,bkhw->bchw", w, delta) / keep.sum()


def test_fgsm_steps_along_the_sign_of_the_hand_computed_gradient():
    torch.manual_seed(0)
    model = _linear_model()
    x = torch.rand(2, 3, 4, 5) * 0.8 + 0.1  # away from 0 and 1: no clamping
    y = torch.randint(0, 2, (2, 4, 5))
    y[0, 0, :] = 255  # ignored pixels contribute nothing
    eps = 4 / 255
    expected = x + eps * _hand_gradient(model, x, y).sign()
    assert torch.allclose(fgsm(model, x, y, eps), expected, atol=1e-6)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy
        assert float(ce(model(expected), y, ignore_index=255)) > float(
            ce(model(x), y, ignore_index=255)
        )


def test_pgd_stays_in_the_ball_and_the_image_range_raises_the_loss_and_is_seeded():
    torch.manual_seed(1)
    model = _linear_model()
    x, y = torch.rand(2, 3, 6, 6), torch.randint(0, 2, (2, 6, 6))
    eps = 8 / 255
    adv = pgd(model, x, y, eps, steps=4, seed=3)
    assert float((adv - x).abs().max()) <= eps + 1e-6
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert float(ce(model(adv), y)) > float(ce(model(x), y))
    assert torch.equal(adv, pgd(model, x, y, eps, steps=4, seed=3))
    with pytest.raises(ValueError, match="steps"):
        pgd(model, x, y, eps, steps=0)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_keeps_shape_and_range_and_grows_with_severity(name):
    x = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    distances = []
    for severity in (1, 3, 5):
        out = corrupt(x, name, severity, seed=0)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.min()) >= 0 and float(out.max()) <= 1
        distances.append(float((out - x).abs().mean()))
    assert distances[0] < distances[1] < distances[2], distances


def test_unknown_corruption_or_severity_is_refused():
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="corruption: expected one of"):
        corrupt(x, "snow", 1)
    with pytest.raises(ValueError, match="severity: expected 1..5"):
        corrupt(x, "noise", 6)


def test_figures_report_drops_from_clean_and_leave_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 1)
    )
    model.train()
    images = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        labels = model.eval()(images).argmax(1)  # the clean prediction: clean mIoU 1
    model.train()
    figures = robustness_figures(
        model,
        images,
        labels,
        ["a", "b", "c"],
        fgsm_eps=(8 / 255,),
        pgd_eps=(8 / 255,),
        corruptions=("noise", "fog"),
        severities=(5,),
        batch_size=3,
    )
    assert figures["risk/S-05/clean_miou"] == pytest.approx(1.0)
    names = ["fgsm_eps8", "pgd_eps8", "noise_s5", "fog_s5"]
    for name in names:
        miou = figures[f"risk/S-05/{name}/miou"]
        assert figures[f"risk/S-05/{name}/drop"] == pytest.approx(1.0 - miou)
    drops = [figures[f"risk/S-05/{n}/drop"] for n in names]
    assert figures["risk/S-05/max_drop"] == pytest.approx(max(drops))
    assert figures["risk/S-05/max_drop_share"] == pytest.approx(max(drops))  # clean is 1
    assert figures["risk/S-05/pgd_eps8/drop"] > 0  # an attack on its own prediction bites
    assert model.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"frame": 4}, r"risk\.robustness\.frame: unknown key"),
        ({"frames": -1}, r"risk\.robustness\.frames=-1: expected an integer >= 0"),
        ({"corruptions": ["snow"]}, r"risk\.robustness\.corruptions=\['snow'\]: expected names"),
        ({"severities": [0]}, r"risk\.robustness\.severities=\[0\]: expected a list of integers"),
        ({"fgsm_eps_255": 4}, r"risk\.robustness\.fgsm_eps_255=4: expected a list"),
        ({"pgd_steps": 0}, r"risk\.robustness\.pgd_steps=0: expected an integer >= 1"),
    ],
)
def test_bad_settings_name_the_key(node, message):
    with pytest.raises(ConfigError, match=message):
        settings_from({"robustness": node})


def test_settings_turn_grey_levels_into_budgets_and_zero_frames_off():
    options = settings_from({"robustness": {"frames": 4, "fgsm_eps_255": [1, 4]}})
    assert options["frames"] == 4
    assert options["fgsm_eps"] == pytest.approx([1 / 255, 4 / 255])
    assert settings_from({"robustness": {"frames": 0}}) is None


def test_a_bad_robustness_setting_stops_the_run_before_any_work():
    from tests.conftest import compose_config
    from training.stages import check_config

    cfg = compose_config("train", ["experiment=smoke", "risk.robustness.corruptions=[snow]"])
    with pytest.raises(ConfigError, match=r"risk\.robustness\.corruptions"):
        check_config(cfg)
