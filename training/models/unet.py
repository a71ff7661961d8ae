"""A compact U-Net for semantic segmentation that trains on a CPU in minutes.

Shape of the network (defaults: ``base_channels=16``, ``depth=4``)::

    level  width  resolution  block
    0      16     1           conv3x3-norm-ReLU x2                     ──skip──┐
    1      32     1/2         conv3x3-norm-ReLU x2                     ──skip─┐│
    2      64     1/4         sepconv3x3-norm-ReLU x2                  ──skip┐││
    3      128    1/8         sepconv3x3-norm-ReLU x2                  ─skip┐│││
    4      256    1/16        sepconv3x3-norm-ReLU x2  (bottleneck = features)
    decoder, from level 3 up to 0: 1x1 conv to the skip's width, bilinear upsample to
    the skip's size, concatenate, block of the level; then a 1x1 classifier.

Going down is a 2x2 max-pool. Blocks at level 2 and deeper use depthwise-separable
3x3 convolutions (depthwise 3x3 then pointwise 1x1): that is where the channel count,
and with it the parameter count of a full 3x3 conv, explodes (a full-conv U-Net of the
same widths has 1.8 M parameters; this one 0.30 M). Levels 0 and 1 keep full convs:
they have few parameters, hold most of the pixels, and full convs run faster per FLOP
on CPUs than depthwise ones.

The channel reduction of the decoder runs *before* the upsampling, at the low
resolution: a 1x1 conv commutes with bilinear interpolation, so this is the same
function at a quarter of the cost.

Any input size works: pooling rounds up (``ceil_mode``) and each upsampling goes to
the exact size of its skip, so nothing is padded or cropped; the logits always have
the input's height and width.

Example:
    >>> model = UNet(num_classes=11)
    >>> model(torch.rand(2, 3, 128, 256)).shape
    torch.Size([2, 11, 128, 256])
    >>> logits, features = model.forward_features(torch.rand(2, 3, 128, 256))
    >>> features.shape                                   # (B, feature_channels, H/16, W/16)
    torch.Size([2, 256, 8, 16])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NORMS", "UNet", "norm_layer"]

#: Values accepted by the ``norm`` argument.
NORMS: tuple[str, ...] = ("batch", "group", "instance", "none")

#: Blocks at this level and deeper use depthwise-separable convolutions.
_SEPARABLE_FROM_LEVEL = 2

#: Largest number of groups used by ``norm="group"`` (32 is the GroupNorm paper's
#: default; our widths are small, so fewer channels per group would be too few).
_MAX_GROUPS = 8


def norm_layer(norm: str, channels: int) -> nn.Module:
    """Normalization layer ``norm`` in :data:`NORMS` for ``channels`` feature maps.

    ``"group"`` uses up to 8 groups (the largest divisor of ``channels`` that is <= 8):
    unlike batch norm it does not depend on the batch size, which matters for small
    per-GPU batches under DDP. ``"instance"`` is learnable-affine instance norm.
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        groups = max(g for g in range(1, _MAX_GROUPS + 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"model.norm: expected one of {list(NORMS)}, got {norm!r}")


def _conv3x3(in_channels: int, out_channels: int, separable: bool, bias: bool) -> nn.Module:
    if not separable:
        return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
    # No norm/activation between depthwise and pointwise (Xception-style): cheaper, and
    # the pair still ends in the block's norm + ReLU.
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
        nn.Conv2d(in_channels, out_channels, 1, bias=bias),
    )


class _Block(nn.Sequential):
    """(conv3x3 -> norm -> ReLU) x 2, ``(B, in, h, w) -> (B, out, h, w)``."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, separable: bool):
        bias = norm == "none"  # a norm layer's shift makes a conv bias redundant
        super().__init__(
            _conv3x3(in_channels, out_channels, separable, bias),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
            _conv3x3(out_channels, out_channels, separable, bias),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Compact U-Net: ``(B, in_channels, H, W)`` image -> ``(B, num_classes, H, W)`` logits.

    Args:
        num_classes: number of output classes (logit channels).
        in_channels: image channels (3 for RGB).
        base_channels: width of level 0; level ``i`` has ``base_channels * 2**i``.
        depth: number of 2x down-samplings; the bottleneck is at ``1 / 2**depth`` of the
            input resolution and has ``base_channels * 2**depth`` channels.
        norm: one of :data:`NORMS`; ``"group"`` for small batches (or per-GPU batches
            under DDP), ``"none"`` gives the convs a bias instead.
        dropout: channel dropout (``Dropout2d``) probability applied to the bottleneck
            features during training; 0 disables it.

    Attributes:
        num_classes: as given.
        feature_channels: channels of the bottleneck returned by :meth:`forward_features`.
        arch: short architecture name, e.g. ``"unet-b16-d4-batch"``; two models with the
            same ``arch`` (and ``num_classes``/``in_channels``) can exchange weights.

    With the defaults: 0.30 M parameters.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        base_channels: int = 16,
        depth: int = 4,
        norm: str = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("num_classes", num_classes, 1),
            ("in_channels", in_channels, 1),
            ("base_channels", base_channels, 1),
            ("depth", depth, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"model.{name}: expected an integer >= {low}, got {value!r}")
        if norm not in NORMS:
            raise ValueError(f"model.norm: expected one of {list(NORMS)}, got {norm!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout: expected a probability in [0, 1), got {dropout!r}")

        self.num_classes = num_classes
        self.in_channels = in_channels
        self.depth = depth
        self.arch = f"unet-b{base_channels}-d{depth}-{norm}"
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.feature_channels = widths[-1]

        self.encoder = nn.ModuleList(
            _Block(
                in_channels if level == 0 else widths[level - 1],
                widths[level],
                norm,
                separable=level >= _SEPARABLE_FROM_LEVEL,
            )
            for level in range(depth + 1)
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        # reduce[i] maps level i+1 to level i's width; decoder[i] fuses it with skip i.
        self.reduce = nn.ModuleList(
            nn.Conv2d(widths[level + 1], widths[level], 1) for level in range(depth)
        )
        self.decoder = nn.ModuleList(
            _Block(2 * widths[level], widths[level], norm, level >= _SEPARABLE_FROM_LEVEL)
            for level in range(depth)
        )
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and bottleneck features of images ``x``.

        Args:
            x: ``(B, in_channels, H, W)`` float images (any ``H, W >= 1``).

        Returns:
            ``(logits, features)``: logits ``(B, num_classes, H, W)``; features
            ``(B, feature_channels, ceil(H / 2**depth), ceil(W / 2**depth))`` -- the
            bottleneck before dropout, for feature-level domain adaptation.
        """
        skips: list[Tensor] = []
        for level, block in enumerate(self.encoder):
            if level > 0:
                # ceil_mode: odd sizes keep their last row/column instead of losing it.
                x = F.max_pool2d(x, 2, ceil_mode=True)
            x = block(x)
            skips.append(x)
        features = skips.pop()
        x = self.dropout(features)
        for level in reversed(range(self.depth)):
            skip = skips[level]
            x = F.interpolate(
                self.reduce[level](x), size=skip.shape[-2:], mode="bilinear", align_corners=False
            )
            x = self.decoder[level](torch.cat([x, skip], dim=1))
        return self.classifier(x), features

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` float images -> ``(B, num_classes, H, W)`` logits."""
        return self.forward_features(x)[0]
