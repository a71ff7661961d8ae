"""CycleGAN: reference architecture, image pool, LR schedule, training and translation."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from adaptation.cyclegan import (
    CycleGAN,
    ImagePool,
    NLayerDiscriminator,
    ResnetGenerator,
    init_weights,
    linear_decay,
    semantic_consistency_loss,
)

TINY = {"g_ngf": 8, "g_blocks": 2, "d_ndf": 8, "pool_size": 4}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------ networks
def test_reference_parameter_counts():
    # Published figures of the reference implementation: 11.378 M and 2.765 M.
    assert n_params(ResnetGenerator(ngf=64, n_blocks=9)) == 11_378_179
    assert n_params(NLayerDiscriminator(ndf=64, n_layers=3)) == 2_764_737


@pytest.mark.parametrize(("h", "w", "ph", "pw"), [(64, 64, 6, 6), (128, 256, 14, 30)])
def test_patchgan_output_size(h, w, ph, pw):
    d = init_weights(NLayerDiscriminator(ndf=8, n_layers=3))
    assert d(torch.rand(2, 3, h, w) * 2 - 1).shape == (2, 1, ph, pw)


@pytest.mark.parametrize(("h", "w"), [(32, 32), (36, 52)])
def test_generator_shape_and_range(h, w):
    g = init_weights(ResnetGenerator(ngf=8, n_blocks=2), gain=0.5)
    y = g(torch.rand(2, 3, h, w) * 2 - 1)
    assert y.shape == (2, 3, h, w)
    assert y.min() >= -1 and y.max() <= 1
    assert y.std() > 0.01  # not collapsed to a constant


def test_generator_refuses_size_not_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        ResnetGenerator(ngf=4, n_blocks=1)(torch.zeros(1, 3, 30, 32))


def test_init_weights_is_normal_with_gain():
    torch.manual_seed(0)
    g = init_weights(ResnetGenerator(ngf=16, n_blocks=1), gain=0.02)
    conv = g.model[1]
    assert abs(conv.weight.std().item() - 0.02) < 0.002
    assert torch.all(conv.bias == 0)


def test_arch_strings_name_the_configuration():
    assert "blocks=9" in ResnetGenerator().arch and "ngf=64" in ResnetGenerator().arch
    assert "layers=3" in NLayerDiscriminator().arch
    assert CycleGAN(**TINY).arch != CycleGAN(**{**TINY, "g_blocks": 3}).arch


# ------------------------------------------------------------------ pool
def _numbered(start: int, n: int) -> torch.Tensor:
    # Image i is filled with the value i, so the output says which image came back.
    return torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2)


def _ids(images: torch.Tensor) -> list[int]:
    return [int(v) for v in images[:, 0, 0, 0]]


def test_pool_returns_first_images_as_given_then_swaps_deterministically():
    def run(seed: int) -> list[int]:
        pool = ImagePool(size=4, seed=seed)
        assert _ids(pool.query(_numbered(0, 3))) == [0, 1, 2]
        assert _ids(pool.query(_numbered(3, 1))) == [3]
        assert len(pool) == 4
        out = []
        for k in range(5):
            out += _ids(pool.query(_numbered(10 + 4 * k, 4)))
        return out

    first, again, other = run(0), run(0), run(1)
    assert first == again  # seeded: same swaps
    assert first != other
    new = [i for i in first if i >= 10]
    old = [i for i in first if i < 10]
    assert old and new  # some history came back, some new images passed through
    assert len(set(first)) == len(first)  # a stored image is handed out once, then replaced


def test_pool_uses_no_global_rng_and_size_zero_passes_through():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    pool = ImagePool(size=1, seed=0)
    for k in range(10):
        pool.query(_numbered(k, 1))
    assert torch.equal(torch.rand(1), expected)
    x = torch.rand(3, 3, 4, 4)
    assert torch.equal(ImagePool(size=0).query(x), x)


# ------------------------------------------------------------------ schedule
def test_linear_decay_values():
    assert linear_decay(0, 100, 0.5) == 1.0
    assert linear_decay(50, 100, 0.5) == 1.0  # decay starts here
    assert linear_decay(75, 100, 0.5) == pytest.approx(0.5)
    assert linear_decay(100, 100, 0.5) == 0.0
    assert linear_decay(150, 100, 0.5) == 0.0
    assert linear_decay(10, 0, 0.5) == 1.0  # unknown length: constant
    assert linear_decay(0, 10, 0.0) == 1.0 and linear_decay(5, 10, 0.0) == pytest.approx(0.5)


# ------------------------------------------------------------------ training
class StructuredImages(Dataset):
    """Seeded 32x32 images: a smooth colour gradient plus a bright rectangle, in [0, 1]."""

    def __init__(self, n: int, seed: int, tint: float) -> None:
        g = torch.Generator().manual_seed(seed)
        ys, xs = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
        images = []
        for _ in range(n):
            colour = torch.rand(3, 1, 1, generator=g)
            img = colour * (0.3 + 0.7 * ys) * (1 - 0.5 * xs)
            y0, x0 = (int(v) for v in torch.randint(0, 20, (2,), generator=g))
            img[:, y0 : y0 + 10, x0 : x0 + 10] = 0.9
            images.append(img * (1 - tint) + tint * torch.tensor([0.8, 0.6, 0.3]).view(3, 1, 1))
        self.images = torch.stack(images).clamp(0, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "domain": 0, "id": str(i)}


def _loaders(batch_size: int = 4) -> dict[str, DataLoader]:
    return {
        "sim": DataLoader(StructuredImages(32, seed=0, tint=0.0), batch_size=batch_size),
        "real": DataLoader(StructuredImages(32, seed=1, tint=0.4), batch_size=batch_size),
    }


def _trainer(tmp_path, batches: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=2 * batches,  # two optimizer steps (G, D) per batch in manual optimization
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
    )


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.lrs.append(pl_module.optimizers()[0].param_groups[0]["lr"])
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


class ConfidentSegmenter(nn.Module):
    """Frozen stand-in task model: 1x1 conv with large weights -> near one-hot logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.conv.weight.copy_(
                200 * torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1]]).view(4, 3, 1, 1)
            )
            self.conv.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CycleGAN trained for 15 batches, with a frozen semantic model."""
    torch.manual_seed(0)
    segmenter = ConfidentSegmenter()
    before = {k: v.clone() for k, v in segmenter.state_dict().items()}
    model = CycleGAN(**TINY, lr=1e-3, semantic_model=segmenter)
    loaders = _loaders()
    sim = next(iter(loaders["sim"]))["image"] * 2 - 1
    real = next(iter(loaders["real"]))["image"] * 2 - 1
    with torch.no_grad():
        cycle_before = model.generator_losses(sim, real)[0]["cycle"].item()
    recorder = Recorder()
    _trainer(tmp_path_factory.mktemp("cyclegan"), 15, [recorder]).fit(model, loaders)
    with torch.no_grad():
        cycle_after = model.generator_losses(sim, real)[0]["cycle"].item()
    return {
        "model": model,
        "segmenter": segmenter,
        "weights_before": before,
        "recorder": recorder,
        "cycle": (cycle_before, cycle_after),
    }


def test_training_lowers_cycle_loss(trained):
    before, after = trained["cycle"]
    assert after < 0.85 * before, (before, after)  # measured: 0.80 -> 0.60
    metrics = trained["recorder"].metrics
    assert len(metrics) == 15
    for name in ("g_adv", "cycle", "identity", "semantic", "d_loss", "lr"):
        assert f"cyclegan/{name}" in metrics[-1]
    assert metrics[-1]["cyclegan/cycle"] < metrics[0]["cyclegan/cycle"]
    assert metrics[-1]["cyclegan/semantic"] >= 0


def test_learning_rate_follows_linear_decay_per_batch(trained):
    # 15 batches, decay from batch 7.5 to 0 at batch 15; the last batch still trains.
    expected = [1e-3 * linear_decay(i, 15, 0.5) for i in range(15)]
    assert trained["recorder"].lrs == pytest.approx(expected)
    assert trained["recorder"].lrs[0] == pytest.approx(1e-3)
    assert trained["recorder"].lrs[-1] == pytest.approx(1e-3 * (1 - 6.5 / 7.5))


def test_semantic_model_stays_frozen(trained):
    segmenter = trained["segmenter"]
    for key, value in segmenter.state_dict().items():
        assert torch.equal(value, trained["weights_before"][key]), key
    assert not segmenter.training
    assert not any(p.requires_grad for p in segmenter.parameters())
    assert not any(k.startswith("_semantic") for k in trained["model"].state_dict())


def test_semantic_loss_is_zero_for_identity_translation():
    # Pure colours (or black) per pixel: every pixel is far from a decision boundary.
    labels = torch.randint(0, 4, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    images = 0.9 * nn.functional.one_hot(labels, 4)[..., :3].permute(0, 3, 1, 2).float()
    segmenter = ConfidentSegmenter().requires_grad_(False)
    assert semantic_consistency_loss(segmenter, images, images).item() < 1e-4
    # A translation that swaps colour channels changes the labels and costs a lot.
    assert semantic_consistency_loss(segmenter, images, images.flip(1)).item() > 1.0


def test_translate_shape_range_and_size_checks(trained, tmp_path):
    model = trained["model"]
    assert model.image_channels == 3 and model.image_size == (32, 32)
    images = torch.rand(2, 3, 32, 32)
    out = model.translate(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out - images).abs().mean() > 0  # it does translate
    with pytest.raises(ValueError, match="trained on"):
        model.translate(torch.rand(1, 3, 64, 64))
    assert model.translate(torch.rand(1, 3, 64, 64), check_size=False).shape == (1, 3, 64, 64)

    # The checkpoint keeps arch and image geometry; another architecture is refused.
    trainer = _trainer(tmp_path, 1)
    trainer.strategy.connect(model)
    path = tmp_path / "cyclegan.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # plain data: a resume never unpickles
    meta = ckpt["cyclegan"]
    assert {k: meta[k] for k in ("arch", "image_channels", "image_size")} == {
        "arch": model.arch,
        "image_channels": 3,
        "image_size": [32, 32],
    }
    assert set(meta["pools"]) == {"real", "sim"}  # the image pools resume too
    other = CycleGAN(**{**TINY, "g_blocks": 3})
    with pytest.raises(ValueError, match="arch"):
        other.on_load_checkpoint(ckpt)
    fresh = CycleGAN(**TINY)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    assert fresh.image_size == (32, 32)
    with pytest.raises(ValueError, match="channels"):
        fresh.translate(torch.rand(1, 1, 32, 32))
    assert torch.allclose(fresh.translate(images), out)


@pytest.mark.slow  # compiles a generator and a discriminator (about 30 s on 2 CPU cores)
def test_compiled_networks_keep_their_keys_and_compute_the_same():
    """``adaptation.cyclegan.compile=true``: the networks compiled in place give the eager
    outputs to float rounding, and the state_dict (checkpoints, the saved generator) keeps
    its keys."""
    model = CycleGAN(g_ngf=4, g_blocks=1, d_ndf=4, d_layers=2, seed=0)
    keys = list(model.state_dict())
    x = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        eager_g, eager_d = model.g_sim2real(x), model.d_real(x)
    model.compile_networks()
    nets = (model.g_sim2real, model.g_real2sim, model.d_real, model.d_sim)
    assert all(net._compiled_call_impl is not None for net in nets)  # nn.Module.compile's
    with torch.no_grad():
        compiled_g, compiled_d = model.g_sim2real(x), model.d_real(x)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(compiled_g, eager_g, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled_d, eager_d, atol=1e-4, rtol=1e-4)


def test_translate_builds_no_autograd_graph():
    """Inference only: no graph is kept (a decorator once slid off onto another method)."""
    model = CycleGAN(g_ngf=4, g_blocks=1, d_ndf=4, d_layers=2, seed=0)
    out = model.translate(torch.rand(1, 3, 32, 64), check_size=False)
    assert out.shape == (1, 3, 32, 64) and not out.requires_grad
