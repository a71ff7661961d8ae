"""Gradient reversal, its schedule, domain discriminators, DANN losses, proxy A-distance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adaptation.dann import dann_loss, output_space_loss
from adaptation.discriminator import DomainDiscriminator, pixel_discriminator
from adaptation.distance import proxy_a_distance
from adaptation.grl import GradientReversal, gradient_reversal, grl_lambda, progress


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- gradient reversal --------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5])
def test_grl_is_identity_forward_and_scales_gradient_by_minus_lambda(lam: float) -> None:
    x = torch.randn(4, 5, requires_grad=True)
    w = torch.randn(4, 5)
    y = gradient_reversal(x, lam)
    assert torch.equal(y, x)
    (grad_rev,) = torch.autograd.grad((y * w).sum(), x)
    (grad_plain,) = torch.autograd.grad((x * w).sum(), x)
    torch.testing.assert_close(grad_rev, -lam * grad_plain, rtol=0, atol=0)
    if lam == 0.0:
        assert torch.all(grad_rev == 0)


def test_grl_module_is_stateless() -> None:
    layer = GradientReversal()
    assert list(layer.parameters()) == [] and list(layer.buffers()) == []
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    for _ in range(3):  # repeated calls (as validation would make) change nothing
        (grad,) = torch.autograd.grad(layer(x, 0.5).sum(), x)
        torch.testing.assert_close(grad, torch.full_like(x, -0.5), rtol=0, atol=0)
    assert layer.state_dict() == {}


# --- lambda schedule ----------------------------------------------------------------------


def test_grl_lambda_schedule_values() -> None:
    assert grl_lambda(0.0) == 0.0
    assert grl_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert grl_lambda(1.0) == pytest.approx(0.99991, abs=1e-5)
    # By hand: 2 / (1 + e^-5) - 1 = tanh(2.5) = 0.986614...
    assert grl_lambda(0.5) == pytest.approx(0.9866143, abs=1e-6)
    assert grl_lambda(0.1, gamma=1.0) == pytest.approx(math.tanh(0.05))
    values = [grl_lambda(p / 100) for p in range(101)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    # Clipping: outside [0, 1] the schedule holds its end values.
    assert grl_lambda(-0.5) == 0.0
    assert grl_lambda(3.0) == grl_lambda(1.0)


def test_progress() -> None:
    assert progress(0, 200) == 0.0
    assert progress(50, 200) == 0.25
    assert progress(400, 200) == 1.0
    assert progress(10, 0) == 1.0


# --- discriminators -----------------------------------------------------------------------


def _train(disc: torch.nn.Module, src: torch.Tensor, tgt: torch.Tensor, steps: int) -> None:
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    for _ in range(steps):
        idx_s = torch.randint(len(src), (64,))
        idx_t = torch.randint(len(tgt), (64,))
        loss, _ = dann_loss(src[idx_s], tgt[idx_t], disc, lambda_=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _accuracy(disc: torch.nn.Module, src: torch.Tensor, tgt: torch.Tensor) -> float:
    disc.eval()
    with torch.no_grad():
        _, acc = dann_loss(src, tgt, disc, lambda_=1.0)
    disc.train()
    return float(acc)


def test_discriminator_separates_separable_features() -> None:
    direction = torch.randn(16)
    direction = direction / direction.norm()  # means 6 apart: Bayes accuracy 0.9987
    src = torch.randn(1000, 16) - 3.0 * direction
    tgt = torch.randn(1000, 16) + 3.0 * direction
    disc = DomainDiscriminator(16, hidden=32)
    assert isinstance(disc, torch.nn.Sequential)
    _train(disc, src[:500], tgt[:500], steps=300)
    assert _accuracy(disc, src[500:], tgt[500:]) > 0.95


def test_discriminator_is_near_chance_on_identical_distributions() -> None:
    src, tgt = torch.randn(1000, 16), torch.randn(1000, 16)
    disc = DomainDiscriminator(16, hidden=32)
    _train(disc, src[:500], tgt[:500], steps=300)
    assert _accuracy(disc, src[500:], tgt[500:]) < 0.65


def test_discriminator_shapes_and_arguments() -> None:
    disc = DomainDiscriminator(8, hidden=16, layers=3, dropout=0.1)
    assert disc(torch.randn(5, 8)).shape == (5, 1)
    assert sum(isinstance(m, torch.nn.Linear) for m in disc) == 4
    with pytest.raises(ValueError, match="dropout"):
        DomainDiscriminator(8, dropout=1.0)
    with pytest.raises(ValueError, match="layers"):
        DomainDiscriminator(8, layers=0)


def test_pixel_discriminator_shapes() -> None:
    disc = pixel_discriminator(32, hidden=8)
    assert disc(torch.randn(2, 32, 6, 10)).shape == (2, 1, 6, 10)
    assert disc(torch.randn(1, 32, 5, 7)).shape == (1, 1, 5, 7)
    with pytest.raises(ValueError, match="in_channels"):
        pixel_discriminator(0)


# --- DANN losses --------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_dann_loss_reverses_feature_gradient_not_discriminator_gradient(lam: float) -> None:
    disc = DomainDiscriminator(6, hidden=8)
    src = torch.randn(4, 6, requires_grad=True)
    tgt = torch.randn(3, 6, requires_grad=True)
    loss, acc = dann_loss(src, tgt, disc, lam)
    g_src, g_tgt, *g_disc = torch.autograd.grad(loss, [src, tgt, *disc.parameters()])

    # The discriminator's own loss, without reversal.
    logits = disc(torch.cat([src, tgt]))
    plain = 0.5 * (
        F.binary_cross_entropy_with_logits(logits[:4], torch.zeros(4, 1))
        + F.binary_cross_entropy_with_logits(logits[4:], torch.ones(3, 1))
    )
    p_src, p_tgt, *p_disc = torch.autograd.grad(plain, [src, tgt, *disc.parameters()])

    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(g_src, -lam * p_src)
    torch.testing.assert_close(g_tgt, -lam * p_tgt)
    # Features step against the discriminator: a descent step on them raises its loss.
    assert torch.sum(g_src * p_src) < 0 and torch.sum(g_tgt * p_tgt) < 0
    for g, p in zip(g_disc, p_disc, strict=True):
        torch.testing.assert_close(g, p)  # the discriminator itself is not reversed
    expected_acc = 0.5 * ((logits[:4] < 0).float().mean() + (logits[4:] > 0).float().mean())
    assert acc.requires_grad is False
    assert float(acc) == pytest.approx(float(expected_acc))


def test_dann_loss_pools_maps_and_lambda_zero_blocks_features() -> None:
    disc = DomainDiscriminator(8, hidden=8)
    src = torch.randn(2, 8, 4, 4, requires_grad=True)
    tgt = torch.randn(2, 8, 4, 4, requires_grad=True)
    loss, acc = dann_loss(src, tgt, disc, 0.0)
    pooled, _ = dann_loss(src.mean(dim=(2, 3)), tgt.mean(dim=(2, 3)), disc, 0.0)
    torch.testing.assert_close(loss, pooled)
    assert 0.0 <= float(acc) <= 1.0
    loss.backward()
    assert torch.all(src.grad == 0) and torch.all(tgt.grad == 0)
    assert all(p.grad is not None for p in disc.parameters())


def test_dann_loss_pixelwise_and_output_space() -> None:
    disc = pixel_discriminator(5, hidden=4)
    src = torch.randn(2, 5, 6, 6, requires_grad=True)
    tgt = torch.randn(1, 5, 3, 4)  # other size: fully convolutional, separate calls
    loss, acc = dann_loss(src, tgt, disc, 1.0, pool=False)
    assert loss.dim() == 0 and 0.0 <= float(acc) <= 1.0
    loss.backward()
    assert src.grad is not None and src.grad.abs().sum() > 0

    out_disc = pixel_discriminator(11, hidden=4)
    logits_s = torch.randn(2, 11, 8, 8, requires_grad=True)
    logits_t = torch.randn(2, 11, 8, 8)
    loss, acc = output_space_loss(logits_s, logits_t, out_disc, 0.5)
    ref, _ = dann_loss(logits_s.softmax(1), logits_t.softmax(1), out_disc, 0.5, pool=False)
    torch.testing.assert_close(loss, ref)
    with pytest.raises(ValueError, match="logits"):
        output_space_loss(torch.randn(2, 11), torch.randn(2, 11), out_disc, 0.5)


def test_dann_loss_rejects_mixed_layouts() -> None:
    with pytest.raises(ValueError, match="features"):
        dann_loss(torch.randn(2, 4), torch.randn(2, 4, 2, 2), DomainDiscriminator(4), 1.0)


# --- proxy A-distance ---------------------------------------------------------------------


def test_proxy_a_distance_separable_and_identical() -> None:
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(400, 8, generator=gen)
    assert proxy_a_distance(src, torch.randn(400, 8, generator=gen) + 4.0) > 1.9
    assert proxy_a_distance(src, torch.randn(400, 8, generator=gen)) < 0.3


def test_proxy_a_distance_accepts_maps_and_arrays_and_is_deterministic() -> None:
    gen = torch.Generator().manual_seed(2)
    src = torch.randn(100, 4, 2, 2, generator=gen)
    tgt = torch.randn(100, 4, 2, 2, generator=gen) + 0.5
    d = proxy_a_distance(src, tgt, seed=3)
    assert 0.0 <= d <= 2.0
    assert proxy_a_distance(src.mean(dim=(2, 3)).numpy(), tgt.mean(dim=(2, 3)).numpy(), 3) == d
    with pytest.raises(ValueError, match="widths"):
        proxy_a_distance(torch.randn(10, 3), torch.randn(10, 4))


# --- the plug-in inside the task ------------------------------------------------------------


class _Encoder(torch.nn.Module):
    """1x1 conv -> BatchNorm -> ReLU features, 1x1 conv logits: the BatchNorm is what a
    per-domain forward pass would use to hide a brightness shift."""

    feature_channels = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1)
        self.norm = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Conv2d(8, 2, 1)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.norm(self.conv(x)))
        return self.head(features), features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


def test_dann_discriminator_learns_a_shift_that_batchnorm_would_hide() -> None:
    """With lambda = 0 (gamma = 0) only the discriminator learns. Sim and real differ by
    brightness alone; the student sees both domains in one forward pass, so BatchNorm
    keeps the shift and the discriminator must separate them (two passes would normalize
    each domain on its own: chance accuracy, the bug of the issue)."""
    import numpy as np

    from adaptation.dann import DANN
    from adaptation.plugin import ModelInfo
    from training.losses import SegmentationLoss
    from training.task import SegmentationTask

    gen = torch.Generator().manual_seed(0)

    def real_batches():
        while True:
            yield {"image": 0.5 + 0.5 * torch.rand(8, 3, 8, 8, generator=gen)}

    model = _Encoder()
    plugin = DANN(
        ["source_only"],
        discriminator=lambda in_features: DomainDiscriminator(in_features, hidden=16),
        gamma=0.0,
    )
    info = ModelInfo(8, 2, unlabeled=lambda batch_size: real_batches(), seed=0, student=model)
    objective = plugin.objective(info)
    task = SegmentationTask(
        model, SegmentationLoss(2), ["a", "b"], np.zeros((256, 3), np.uint8),
        channels_last=False, objectives={"dann": objective},
    )  # fmt: skip
    logged: dict[str, float] = {}
    task.log = lambda key, value, **_: logged.__setitem__(key, float(value))  # type: ignore[method-assign]
    opt = torch.optim.Adam(objective.parameters(), lr=1e-2)
    accuracies = []
    for _ in range(60):
        batch = {
            "image": 0.5 * torch.rand(8, 3, 8, 8, generator=gen),
            "mask": torch.zeros(8, 8, 8, dtype=torch.long),
            "domain": torch.zeros(8),
        }
        loss = task.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        accuracies.append(logged["train/dann/domain_acc"])
    assert logged["train/dann/lambda"] == 0.0
    assert np.mean(accuracies[-10:]) > 0.9
    # the student saw the labelled batch and the real images in one forward pass
    assert model.norm.num_batches_tracked.item() == 60
