"""DeepLabV3-style segmentation: a dilated torchvision ResNet with a light ASPP head.

::

    image (B, 3, H, W) in [0, 1]
      -> ImageNet normalization (fixed buffers, so a pretrained backbone sees what it expects)
      -> ResNet stem + layer1..layer4, last stage(s) dilated instead of strided
         = features (B, 512 | 2048, H/os, W/os)                   os = output_stride
      -> ASPP: 1x1, three 3x3 atrous convs (rates 6, 12, 18 at os 16; scaled by 16/os),
         image pooling; concatenated, projected to ``aspp_channels``
      -> 3x3 conv, 1x1 classifier -> bilinear upsample to (H, W)

Dilation follows torchvision's ``replace_stride_with_dilation`` exactly (the first block
of a dilated stage keeps the previous dilation), so a ResNet-50 here computes the same
features as torchvision's dilated ResNet-50 with the same weights. torchvision refuses
dilation for the BasicBlock of ResNet-18/34, so the strides and dilations are set on the
built convolutions instead; the parameters, and therefore the state_dict keys, are those
of torchvision's ResNet, which is what lets ``pretrained_backbone`` load its files.

Example:
    >>> model = DeepLabV3Lite(num_classes=11, backbone="resnet18")
    >>> model(torch.rand(2, 3, 128, 256)).shape
    torch.Size([2, 11, 128, 256])
    >>> model.forward_features(torch.rand(2, 3, 128, 256))[1].shape   # output stride 16
    torch.Size([2, 512, 8, 16])
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.weights import (
    CheckpointMismatchError,
    describe_mismatches,
    read_checkpoint,
    state_dict_mismatches,
)

__all__ = ["BACKBONES", "OUTPUT_STRIDES", "DeepLabV3Lite"]

#: torchvision ResNets accepted as ``backbone``, with the channels of their last stage.
BACKBONES: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}

#: Accepted ``output_stride`` values -> the stages (layer3, layer4) that are dilated.
OUTPUT_STRIDES: dict[int, tuple[bool, bool]] = {
    32: (False, False),
    16: (False, True),
    8: (True, True),
}

#: ASPP atrous rates at output stride 16 (DeepLabV3); scaled by 16 / output_stride so the
#: receptive field in input pixels does not depend on the stride.
_ASPP_RATES_OS16 = (6, 12, 18)

#: ImageNet statistics that torchvision's ResNet weights were trained with.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_PRETRAINED_KEY = "model.pretrained_backbone"


def _conv_bn_relu(
    in_channels: int, out_channels: int, kernel: int, dilation: int = 1
) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel, padding=padding, dilation=dilation, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _ImagePooling(nn.Module):
    """ASPP's global branch: average pool, 1x1 conv + ReLU, broadcast back to (h, w).

    No BatchNorm here, unlike torchvision's ASPP: on a ``(B, C, 1, 1)`` input it fails
    for ``B = 1`` in training and is noisy for small batches; a bias does its job.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.relu(self.conv(F.adaptive_avg_pool2d(x, 1)))
        return pooled.expand(-1, -1, x.shape[-2], x.shape[-1])


class _ASPP(nn.Module):
    """Atrous spatial pyramid pooling, ``(B, in, h, w) -> (B, out, h, w)``."""

    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels, 1)]
            + [_conv_bn_relu(in_channels, out_channels, 3, rate) for rate in rates]
            + [_ImagePooling(in_channels, out_channels)]
        )
        self.project = nn.Sequential(
            _conv_bn_relu(len(self.branches) * out_channels, out_channels, 1),
            nn.Dropout(0.1),  # DeepLabV3 uses 0.5 with 256 channels; our head is narrower
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


def _dilate_stage(stage: nn.Sequential, previous_dilation: int, dilation: int) -> None:
    """Turn a stride-2 ResNet stage into a stride-1 stage with dilated 3x3 convs, in place.

    Mirrors torchvision's ``_make_layer(dilate=True)``: the first block keeps
    ``previous_dilation``, later blocks use ``dilation``; padding equals dilation.
    """
    for index, block in enumerate(stage):
        rate = previous_dilation if index == 0 else dilation
        for module in block.modules():
            if not isinstance(module, nn.Conv2d):
                continue
            if module.stride == (2, 2):
                module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = (rate, rate)
                module.padding = (rate, rate)


def _build_backbone(name: str, output_stride: int) -> nn.Sequential:
    """torchvision ResNet ``name`` (random init) without its pooling/fc head, dilated for
    ``output_stride``; children keep torchvision's names (``conv1``, ``layer1``, ...)."""
    from torchvision import models  # lazy: importing torchvision costs about a second

    resnet = getattr(models, name)(weights=None)
    dilate3, dilate4 = OUTPUT_STRIDES[output_stride]
    if dilate3:
        _dilate_stage(resnet.layer3, 1, 2)
    if dilate4:
        _dilate_stage(resnet.layer4, 2 if dilate3 else 1, 4 if dilate3 else 2)
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(OrderedDict((n, getattr(resnet, n)) for n in names))


class DeepLabV3Lite(nn.Module):
    """DeepLabV3-style model: ``(B, 3, H, W)`` images in [0, 1] -> ``(B, C, H, W)`` logits.

    Args:
        num_classes: number of output classes ``C``.
        backbone: one of :data:`BACKBONES` (torchvision ResNet, built with
            ``weights=None``; nothing is downloaded).
        output_stride: input size / feature size, one of 8, 16, 32: 16 dilates layer4, 8
            dilates layer3 too (finer features at several times the compute of layer3-4
            and the head). It changes no parameter, so weights move freely between
            output strides (e.g. train at 16, evaluate at 8).
        aspp_channels: width of the ASPP branches and of the head.
        pretrained_backbone: optional local path of a torchvision ResNet state_dict of
            the same depth (e.g. a saved ``resnet18(weights=...).state_dict()``), loaded
            with ``weights_only=True``; every backbone key must match, ``fc.*`` is ignored.

    Attributes:
        num_classes: as given.
        feature_channels: channels of the backbone output returned by
            :meth:`forward_features` (512 for resnet18/34, 2048 for resnet50).
        arch: ``"deeplab-<backbone>-a<aspp_channels>"``, e.g. ``"deeplab-resnet18-a128"``
            (the output stride is not part of it: it does not change the weights).

    Raises:
        ValueError: unknown backbone or output stride, non-positive sizes.
        FileNotFoundError: ``pretrained_backbone`` does not exist (names the config key).
        CheckpointMismatchError: its keys or shapes do not fit the backbone.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        output_stride: int = 16,
        aspp_channels: int = 128,
        pretrained_backbone: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"model.backbone: expected one of {list(BACKBONES)}, got {backbone!r}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(
                f"model.output_stride: expected one of {sorted(OUTPUT_STRIDES)}, "
                f"got {output_stride!r}"
            )
        for name, value in (("num_classes", num_classes), ("aspp_channels", aspp_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name}: expected an integer >= 1, got {value!r}")

        self.num_classes = num_classes
        self.output_stride = output_stride
        self.feature_channels = BACKBONES[backbone]
        self.arch = f"deeplab-{backbone}-a{aspp_channels}"

        # Non-persistent: constants, not weights; keeps the state_dict torchvision-shaped.
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), False)
        self.backbone = _build_backbone(backbone, output_stride)
        rates = tuple(rate * 16 // output_stride for rate in _ASPP_RATES_OS16)
        self.aspp = _ASPP(self.feature_channels, aspp_channels, rates)
        self.head = _conv_bn_relu(aspp_channels, aspp_channels, 3)
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)

        if pretrained_backbone is not None:
            self.load_backbone(pretrained_backbone)

    def load_backbone(self, path: str | os.PathLike[str]) -> None:
        """Load a torchvision ResNet state_dict from local file ``path`` into the backbone.

        ``fc.*`` (the ImageNet classifier) is dropped; every other key must match the
        backbone's names and shapes, else :class:`CheckpointMismatchError` names them.
        """
        path = Path(path)
        state = read_checkpoint(path, _PRETRAINED_KEY)
        if isinstance(state, dict) and not all(isinstance(v, Tensor) for v in state.values()):
            state = None
        if not isinstance(state, dict):
            raise CheckpointMismatchError(
                f"{_PRETRAINED_KEY}: {path} is not a torchvision ResNet state_dict "
                "({name: tensor}, as saved by torch.save(resnet.state_dict(), path))"
            )
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        problems = state_dict_mismatches(self.backbone.state_dict(), state)
        if any(problems):
            raise CheckpointMismatchError(
                f"{_PRETRAINED_KEY}: {path} does not fit the {self.arch} backbone: "
                f"{describe_mismatches(*problems)}"
            )
        self.backbone.load_state_dict(state, strict=True)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and backbone features of images ``x``.

        Args:
            x: ``(B, 3, H, W)`` float images in [0, 1] (any ``H, W``; multiples of the
                output stride give exactly aligned features).

        Returns:
            ``(logits, features)``: logits ``(B, num_classes, H, W)``; features
            ``(B, feature_channels, ~H / output_stride, ~W / output_stride)``, the
            layer4 output, for feature-level domain adaptation.
        """
        size = x.shape[-2:]
        features = self.backbone((x - self.mean) / self.std)
        logits = self.classifier(self.head(self.aspp(features)))
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits, features

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` float images in [0, 1] -> ``(B, num_classes, H, W)`` logits."""
        return self.forward_features(x)[0]
