"""Task models, safe weight loading, class weights and the segmentation loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet34, resnet50

from training.losses import SegmentationLoss, class_weights_from_histogram
from training.models import (
    CheckpointError,
    CheckpointMismatchError,
    DeepLabV3Lite,
    SegmentationModel,
    UNet,
    load_checkpoint_weights,
    save_state_dict,
)

NUM_CLASSES = 11

#: Bound on the default UNet's size stated in its docs (it has 299,707 parameters).
UNET_DEFAULT_MAX_PARAMS = 500_000


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def deeplab18() -> DeepLabV3Lite:
    torch.manual_seed(0)
    return DeepLabV3Lite(NUM_CLASSES, backbone="resnet18").eval()


# ---------------------------------------------------------------------------- models


@pytest.mark.parametrize("size", [(128, 256), (64, 96), (100, 203), (17, 31)])
def test_unet_shapes_any_size(size: tuple[int, int]) -> None:
    model = UNet(NUM_CLASSES).eval()
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        logits, features = model.forward_features(x)
        plain = model(x)
    assert logits.shape == (2, NUM_CLASSES, *size)
    assert model.feature_channels == 256
    # pooling rounds up, so the bottleneck is ceil(size / 16)
    assert features.shape == (2, 256, math.ceil(size[0] / 16), math.ceil(size[1] / 16))
    assert torch.equal(plain, logits)
    assert isinstance(model, SegmentationModel)


@pytest.mark.parametrize(
    ("kwargs", "arch", "feature_channels"),
    [
        ({}, "unet-b16-d4-batch", 256),
        ({"base_channels": 8, "depth": 3, "norm": "group"}, "unet-b8-d3-group", 64),
        ({"norm": "instance", "dropout": 0.2}, "unet-b16-d4-instance", 256),
        ({"norm": "none", "in_channels": 1}, "unet-b16-d4-none", 256),
    ],
)
def test_unet_variants(kwargs: dict, arch: str, feature_channels: int) -> None:
    model = UNet(5, **kwargs).eval()
    x = torch.rand(2, kwargs.get("in_channels", 3), 32, 48)
    logits, features = model.forward_features(x)
    assert model.arch == arch
    assert model.feature_channels == feature_channels
    assert model.num_classes == 5
    depth = kwargs.get("depth", 4)
    assert logits.shape == (2, 5, 32, 48)
    assert features.shape == (2, feature_channels, 32 // 2**depth, 48 // 2**depth)


def test_unet_bad_arguments_name_the_key() -> None:
    with pytest.raises(ValueError, match="model.norm"):
        UNet(5, norm="layer")
    with pytest.raises(ValueError, match="model.depth"):
        UNet(5, depth=0)
    with pytest.raises(ValueError, match="model.dropout"):
        UNet(5, dropout=1.0)


def test_default_unet_parameter_count() -> None:
    count = num_params(UNet(NUM_CLASSES))
    assert count == 299_707  # the figure quoted in the docs; update both together
    assert count < UNET_DEFAULT_MAX_PARAMS


def test_deeplab_parameter_count_is_torchvision_backbone_plus_head(deeplab18) -> None:
    backbone = num_params(deeplab18.backbone)
    reference = resnet18(weights=None)
    assert backbone == num_params(reference) - num_params(reference.fc)
    assert num_params(deeplab18) == 13_309_515
    assert deeplab18.arch == "deeplab-resnet18-a128"
    assert deeplab18.feature_channels == 512


@pytest.mark.parametrize("size", [(128, 256), (96, 160), (100, 203)])
def test_deeplab_shapes_any_size(deeplab18, size: tuple[int, int]) -> None:
    with torch.no_grad():
        logits, features = deeplab18.forward_features(torch.rand(1, 3, *size))
    assert logits.shape == (1, NUM_CLASSES, *size)
    # each stride-2 layer of a ResNet rounds up
    assert features.shape == (1, 512, math.ceil(size[0] / 16), math.ceil(size[1] / 16))
    assert isinstance(deeplab18, SegmentationModel)


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_deeplab_output_stride(output_stride: int) -> None:
    model = DeepLabV3Lite(3, backbone="resnet18", output_stride=output_stride, aspp_channels=16)
    with torch.no_grad():
        logits, features = model.eval().forward_features(torch.rand(1, 3, 64, 128))
    assert features.shape == (1, 512, 64 // output_stride, 128 // output_stride)
    assert logits.shape == (1, 3, 64, 128)
    assert model.arch == "deeplab-resnet18-a16"  # the stride changes no weight


def test_deeplab_dilation_matches_torchvision_resnet50() -> None:
    """Our dilated ResNet-50 at output stride 8 computes torchvision's own
    ``replace_stride_with_dilation=[False, True, True]`` network, weight for weight."""
    torch.manual_seed(0)
    reference = resnet50(weights=None, replace_stride_with_dilation=[False, True, True]).eval()
    model = DeepLabV3Lite(3, backbone="resnet50", output_stride=8, aspp_channels=8).eval()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    model.backbone.load_state_dict(state)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.forward_features(x)[1]
        r = reference
        expected = (x - model.mean) / model.std
        for layer in (r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4):
            expected = layer(expected)
    assert ours.shape == (1, 2048, 8, 8)
    torch.testing.assert_close(ours, expected)


def test_deeplab_bad_arguments_name_the_key() -> None:
    with pytest.raises(ValueError, match="model.backbone"):
        DeepLabV3Lite(3, backbone="vgg16")
    with pytest.raises(ValueError, match="model.output_stride"):
        DeepLabV3Lite(3, output_stride=4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: UNet(4, base_channels=8, depth=3),
        lambda: DeepLabV3Lite(4, backbone="resnet18", aspp_channels=32),
    ],
    ids=["unet", "deeplab"],
)
def test_gradients_flow_and_one_batch_overfits(make) -> None:
    torch.manual_seed(0)
    model = make().train()
    # 16x16 blocks of 4 classes (one feature cell of DeepLab at output stride 16), each
    # class its own colour plus noise: learnable from local evidence
    y = torch.randint(0, 4, (2, 4, 4)).repeat_interleave(16, 1).repeat_interleave(16, 2)
    palette = torch.tensor([[0.1, 0.2, 0.9], [0.8, 0.1, 0.1], [0.2, 0.9, 0.2], [0.5, 0.5, 0.5]])
    x = (palette[y].permute(0, 3, 1, 2) + 0.1 * torch.rand(2, 3, 64, 64)).clamp(0, 1)
    y[:, :8] = 255  # ignored rows must not matter
    loss_fn = SegmentationLoss(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(15):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if step == 0:
            for name, param in model.named_parameters():
                assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert sum(bool(p.grad.abs().sum() > 0) for p in model.parameters()) > 0.9 * len(
                list(model.parameters())
            )
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


# ------------------------------------------------------------- pretrained backbone


def test_pretrained_backbone_loads_a_local_torchvision_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = resnet18(weights=None)
    with torch.no_grad():  # distinctive BN statistics, so buffers are checked too
        source.bn1.running_mean.uniform_()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)  # includes fc.*, which must be ignored

    model = DeepLabV3Lite(NUM_CLASSES, backbone="resnet18", pretrained_backbone=str(path))
    expected = source.state_dict()
    loaded = model.backbone.state_dict()
    assert loaded.keys() == {k for k in expected if not k.startswith("fc.")}
    for key, value in loaded.items():
        assert torch.equal(value, expected[key]), key


def test_pretrained_backbone_missing_file_names_path_and_key(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(FileNotFoundError, match="model.pretrained_backbone") as info:
        DeepLabV3Lite(3, pretrained_backbone=path)
    assert str(path) in str(info.value)


def test_pretrained_backbone_of_another_depth_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(resnet34(weights=None).state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="model.pretrained_backbone") as info:
        DeepLabV3Lite(3, backbone="resnet18", pretrained_backbone=path)
    assert "unexpected key" in str(info.value) and "layer1.2." in str(info.value)


# ------------------------------------------------------------------ checkpoints


def small_unet(num_classes: int = 5, seed: int = 0, **kwargs) -> UNet:
    torch.manual_seed(seed)
    return UNet(num_classes, base_channels=4, depth=2, **kwargs)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    source, target = small_unet(seed=0), small_unet(seed=1)
    with torch.no_grad():  # make the BN buffers differ from a fresh model's too
        source.encoder[0][1].running_var.fill_(3.0)
    path = tmp_path / "out" / "model.pt"
    save_state_dict(source, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temporary left
    saved = torch.load(path, weights_only=True)
    assert saved["arch"] == "unet-b4-d2-batch"

    load_checkpoint_weights(target, path)
    assert_same_state(source, target)


def test_load_plain_state_dict(tmp_path: Path) -> None:
    source, target = small_unet(seed=0), small_unet(seed=1)
    path = tmp_path / "plain.pt"
    torch.save(source.state_dict(), path)
    load_checkpoint_weights(target, path)
    assert_same_state(source, target)


def test_load_lightning_style_checkpoint_strips_model_prefix(tmp_path: Path) -> None:
    source, target = small_unet(seed=0), small_unet(seed=1)
    checkpoint = {
        "state_dict": {
            **{f"model.{k}": v for k, v in source.state_dict().items()},
            "loss.class_weights": torch.ones(5),  # other LightningModule parts are skipped
        },
        "hyper_parameters": {"lr": 0.003, "name": "smoke"},
        "arch": source.arch,
        "epoch": 3,
    }
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    load_checkpoint_weights(target, path, key="stages.finetune.init")
    assert_same_state(source, target)


def test_load_checkpoint_written_by_lightning(tmp_path: Path) -> None:
    """A real Trainer checkpoint (optimizer, LR scheduler, callback and loop state) is
    readable with weights_only=True and loads into the bare model."""
    pl = pytest.importorskip("pytorch_lightning")
    from torch.utils.data import DataLoader, TensorDataset

    class Task(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"lr": 1e-3})
            self.model = small_unet()
            self.loss = SegmentationLoss(5, [1.0] * 5)

        def training_step(self, batch, _):
            return self.loss(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
            return {"optimizer": optimizer, "lr_scheduler": schedule}

        def on_save_checkpoint(self, checkpoint):
            checkpoint["arch"] = self.model.arch

    data = TensorDataset(torch.rand(4, 3, 16, 16), torch.randint(0, 5, (4, 16, 16)))
    task = Task()
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, DataLoader(data, batch_size=2))
    (path,) = (tmp_path / "checkpoints").glob("*.ckpt")

    target = small_unet(seed=5)
    load_checkpoint_weights(target, path)
    assert_same_state(task.model, target)
    with pytest.raises(CheckpointMismatchError, match="unet-b4-d2-batch"):
        load_checkpoint_weights(small_unet(norm="group"), path)


def test_other_architecture_is_refused_naming_path_key_and_both(tmp_path: Path) -> None:
    path = tmp_path / "deeplab.pt"
    save_state_dict(DeepLabV3Lite(5, aspp_channels=8), path)
    model = small_unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint_weights(model, path, key="model.init_checkpoint")
    message = str(info.value)
    for part in (str(path), "model.init_checkpoint", "deeplab-resnet18-a8", "unet-b4-d2-batch"):
        assert part in message
    assert isinstance(info.value, ValueError)
    for key, value in model.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key])


def test_shape_mismatch_is_refused_before_loading(tmp_path: Path) -> None:
    # same arch name (num_classes is not part of it) but another classifier shape
    path = tmp_path / "eleven.pt"
    torch.save(small_unet(num_classes=11).state_dict(), path)
    model = small_unet(num_classes=5, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint_weights(model, path, key="stages.finetune.init")
    message = str(info.value)
    assert "stages.finetune.init" in message and str(path) in message
    assert "classifier.weight: checkpoint (11, 4, 1, 1) vs model (5, 4, 1, 1)" in message
    assert "not recorded" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    path = tmp_path / "norms.pt"
    torch.save(small_unet(norm="none").state_dict(), path)  # conv biases, no BN
    with pytest.raises(CheckpointMismatchError, match="missing key.*unexpected key"):
        load_checkpoint_weights(small_unet(norm="batch"), path)


def test_missing_checkpoint_names_path_and_key(tmp_path: Path) -> None:
    path = tmp_path / "missing.ckpt"
    with pytest.raises(FileNotFoundError, match="model.init_checkpoint") as info:
        load_checkpoint_weights(small_unet(), path)
    assert str(path) in str(info.value)


def test_compiled_model_keys_are_accepted(tmp_path: Path) -> None:
    source, target = small_unet(seed=0), small_unet(seed=1)
    path = tmp_path / "compiled.ckpt"
    state = {f"model._orig_mod.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "arch": source.arch}, path)
    load_checkpoint_weights(target, path)
    assert_same_state(source, target)


def _touch(path: str) -> None:
    Path(path).write_text("code ran")


class _Evil:
    """Unpickling this with a full unpickler calls ``_touch(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return _touch, (str(self.marker),)


def test_checkpoints_are_loaded_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": small_unet().state_dict(), "evil": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True") as info:
        load_checkpoint_weights(small_unet(), path)
    assert str(path) in str(info.value) and "model.init_checkpoint" in str(info.value)
    assert not marker.exists()  # the payload never ran
    with pytest.raises(CheckpointError, match="weights_only=True"):
        DeepLabV3Lite(3, aspp_channels=8, pretrained_backbone=path)
    assert not marker.exists()


def test_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="neither a state_dict"):
        load_checkpoint_weights(small_unet(), path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(garbage)):
        load_checkpoint_weights(small_unet(), garbage)


# ----------------------------------------------------------------- class weights

# Hand-made histogram: frequencies 0.6 / 0.3 / 0.1 and one class without pixels.
COUNTS = [600, 300, 100, 0]
FREQ = [0.6, 0.3, 0.1]


def expected_weights(raw: list[float]) -> list[float]:
    """Raw weights scaled to a pixel-weighted mean of 1; 1 for the empty class."""
    mean = sum(p * w for p, w in zip(FREQ, raw, strict=True))
    return [w / mean for w in raw] + [1.0]


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("none", [1.0, 1.0, 1.0, 1.0]),
        # 1/p = 5/3, 10/3, 10, pixel-weighted mean 3 (= number of present classes)
        ("inverse", [5 / 9, 10 / 9, 10 / 3, 1.0]),
        # median(p) / p = 0.3/p: inverse up to a constant, which normalization removes
        ("median_frequency", [5 / 9, 10 / 9, 10 / 3, 1.0]),
        ("inverse_sqrt", expected_weights([1 / math.sqrt(p) for p in FREQ])),
        ("enet", expected_weights([1 / math.log(1.02 + p) for p in FREQ])),
    ],
)
def test_class_weights_by_hand(method: str, expected: list[float]) -> None:
    weights = class_weights_from_histogram(COUNTS, method, clip=(0.2, 5.0))
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float32))


def test_class_weights_spot_values() -> None:
    # inverse_sqrt: 1 / (sqrt(p) * sum(sqrt(p))) with sum(sqrt(p)) = 1.638548
    weights = class_weights_from_histogram(COUNTS, "inverse_sqrt")
    torch.testing.assert_close(
        weights[:3], torch.tensor([0.78790, 1.11424, 1.92991]), atol=1e-4, rtol=0
    )
    # enet: 1 / ln(1.02 + p) = 2.07285, 3.60188, 8.82389; pixel-weighted mean 3.20666
    weights = class_weights_from_histogram(COUNTS, "enet")
    torch.testing.assert_close(
        weights[:3], torch.tensor([0.64642, 1.12325, 2.75176]), atol=1e-4, rtol=0
    )


def test_class_weights_clip_high_and_renormalize() -> None:
    # inverse gives 5/9, 10/9, 10/3; capped at 2 the rare class is clipped and the scale s
    # solves 0.6 * s * 5/3 + 0.3 * s * 10/3 + 0.1 * 2 = 1, i.e. s = 0.4
    weights = class_weights_from_histogram(COUNTS, "inverse", clip=(0.2, 2.0))
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 4 / 3, 2.0, 1.0]))


def test_class_weights_clip_low_and_renormalize() -> None:
    # inverse gives 0.741, 0.741, 3.333; floored at 0.8, s solves 0.9 * 0.8 + 0.1 * 10 s = 1
    weights = class_weights_from_histogram([45, 45, 10], "inverse", clip=(0.8, 5.0))
    torch.testing.assert_close(weights, torch.tensor([0.8, 0.8, 2.8]))


@pytest.mark.parametrize("method", ["inverse", "inverse_sqrt", "median_frequency", "enet"])
def test_class_weights_normalized_and_within_clip(method: str) -> None:
    # a driving-like, heavily skewed histogram (road, sky ... poles, signs, a missing class)
    counts = torch.tensor([4e6, 3e6, 1.5e6, 2e5, 3e4, 1e4, 8e5, 2e5, 1.2e6, 5e3, 4e5, 0.0])
    for clip in [(0.2, 5.0), (0.5, 2.0), (1e-3, 1e3)]:
        weights = class_weights_from_histogram(counts, method, clip=clip).double()
        freq = counts.double() / counts.sum()
        assert float((freq * weights).sum()) == pytest.approx(1.0, abs=1e-6)
        assert clip[0] - 1e-6 <= float(weights.min()) and float(weights.max()) <= clip[1] + 1e-6
        assert weights[-1] == 1.0  # no pixels: the average weight
        present = weights[:-1]
        order = torch.argsort(counts[:-1])
        assert torch.all(present[order].diff() <= 1e-6)  # rarer never weighs less


def test_class_weights_bad_input() -> None:
    with pytest.raises(ValueError, match="loss.class_weighting"):
        class_weights_from_histogram(COUNTS, "focal")
    with pytest.raises(ValueError, match=r"class_weights_from_histogram\(clip="):
        class_weights_from_histogram(COUNTS, "inverse", clip=(2.0, 5.0))
    with pytest.raises(ValueError, match="all counts are 0"):
        class_weights_from_histogram([0, 0, 0], "inverse")
    with pytest.raises(ValueError, match="pixel_counts"):
        class_weights_from_histogram([10, -1], "inverse")
    assert torch.equal(class_weights_from_histogram([0, 0], "none"), torch.ones(2))


# ------------------------------------------------------------------------- loss


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_segmentation_loss_equals_cross_entropy(weighted: bool, smoothing: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, requires_grad=True)
    target = torch.randint(0, 5, (2, 6, 7))
    target[0, :2] = 255
    weights = torch.rand(5) + 0.1 if weighted else None
    loss_fn = SegmentationLoss(5, weights, ignore_index=255, label_smoothing=smoothing)
    expected = F.cross_entropy(
        logits, target, weight=weights, ignore_index=255, label_smoothing=smoothing
    )
    loss = loss_fn(logits, target)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad)


def test_segmentation_loss_all_ignored_is_zero_with_finite_grad() -> None:
    logits = torch.randn(2, 4, 5, 5, requires_grad=True)
    target = torch.full((2, 5, 5), 255)
    loss_fn = SegmentationLoss(4, [1.0, 2.0, 3.0, 4.0])
    loss = loss_fn(logits, target)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))
    assert SegmentationLoss(4)(logits, target).item() == 0.0


def test_segmentation_loss_weights_are_a_buffer_that_follows_the_module() -> None:
    loss_fn = SegmentationLoss(3, [1.0, 2.0, 3.0])
    assert "class_weights" in dict(loss_fn.named_buffers())
    assert "class_weights" not in loss_fn.state_dict()  # recomputed from config, not saved
    assert loss_fn.double().class_weights.dtype == torch.float64  # .to() reaches it
    half = torch.randn(1, 3, 2, 2).bfloat16()
    assert loss_fn(half, torch.zeros(1, 2, 2, dtype=torch.long)).dtype == torch.float32
    with pytest.raises(ValueError, match="one per class"):
        SegmentationLoss(4, [1.0, 2.0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_models_and_loss_on_gpu(tmp_path: Path) -> None:
    model = UNet(4, base_channels=8, depth=3).cuda()
    loss_fn = SegmentationLoss(4, [1.0, 2.0, 3.0, 4.0]).cuda()
    logits = model(torch.rand(2, 3, 32, 32, device="cuda"))
    loss = loss_fn(logits, torch.randint(0, 4, (2, 32, 32), device="cuda"))
    loss.backward()
    assert loss.device.type == "cuda" and torch.isfinite(loss)
    path = tmp_path / "gpu.pt"
    save_state_dict(model, path)
    target = UNet(4, base_channels=8, depth=3).cuda()
    load_checkpoint_weights(target, path)
    assert all(v.device.type == "cuda" for v in target.state_dict().values())
