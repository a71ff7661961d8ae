"""Semantic-segmentation task models and safe weight loading.

Every model here is a plain ``nn.Module`` with explicit constructor arguments (Hydra
builds it from ``configs/model/*.yaml`` via ``_target_``) and shares one interface,
written down as the :class:`SegmentationModel` protocol:

- ``forward(x) -> logits``: ``x`` is ``(B, 3, H, W)`` float images in [0, 1], exactly as
  in the Sample contract (a model that wants other input statistics, such as ImageNet
  normalization for a ResNet backbone, applies them itself, so data pipelines never
  do); ``logits`` are ``(B, num_classes, H, W)``, at the input resolution, for any
  ``H, W`` (multiples of 16 give exactly aligned feature maps).
- ``forward_features(x) -> (logits, features)``: the same logits plus the encoder
  bottleneck ``(B, feature_channels, h, w)``, the input of a domain classifier (DANN).
- ``num_classes: int``, ``feature_channels: int``, and ``arch: str``, a short name
  such as ``"unet-b16-d4-batch"`` or ``"deeplab-resnet18-a128"`` that is stored with
  saved weights so that a checkpoint of another architecture is refused before training.

Models:

- :class:`UNet`: compact U-Net, 0.30 M parameters by default, trains on a CPU.
- :class:`DeepLabV3Lite`: ASPP head on a dilated torchvision ResNet-18/34/50.

Weights: :func:`load_checkpoint_weights` (plain state_dict, our saved format, or a
Lightning checkpoint; always ``weights_only=True``; checked before loading) and
:func:`save_state_dict` (atomic).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from core.weights import (
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint_weights,
    save_state_dict,
)
from training.models.deeplab import DeepLabV3Lite
from training.models.unet import UNet

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "DeepLabV3Lite",
    "SegmentationModel",
    "UNet",
    "load_checkpoint_weights",
    "save_state_dict",
]


@runtime_checkable
class SegmentationModel(Protocol):
    """What the task module, DANN and evaluation rely on (see the module docstring)."""

    num_classes: int
    feature_channels: int
    arch: str

    def __call__(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` float in [0, 1] -> ``(B, num_classes, H, W)`` logits."""
        ...

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """-> ``(logits (B, num_classes, H, W), features (B, feature_channels, h, w))``."""
        ...
