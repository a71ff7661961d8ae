"""Domain discriminators: plain ``nn.Sequential`` networks that output domain logits.

Domain labels follow the Sample contract: 0 = sim (source), 1 = real (target). A positive
logit means "real".

- :class:`DomainDiscriminator`: MLP on globally pooled features ``(B, F) -> (B, 1)``
  (DANN, Ganin et al. 2016).
- :func:`pixel_discriminator`: fully convolutional ``(B, C, h, w) -> (B, 1, h, w)``, one
  domain logit per location, for feature maps or for softmax output maps (output-space
  adaptation, AdaptSegNet, Tsai et al. 2018).

Example::

    disc = DomainDiscriminator(model.feature_channels)
    logits = disc(features.mean(dim=(2, 3)))  # (B, 1)
"""

from __future__ import annotations

from torch import nn

__all__ = ["DomainDiscriminator", "pixel_discriminator"]


class DomainDiscriminator(nn.Sequential):
    """MLP domain classifier ``(B, in_features) -> (B, 1)`` logits (0 sim, 1 real).

    ``layers`` hidden blocks of Linear -> BatchNorm -> ReLU (-> Dropout), then Linear to one
    logit. BatchNorm follows Transfer-Learning-Library's discriminator: it keeps the
    adversarial game stable when feature scales drift during training.

    Args:
        in_features: F, the feature width (``model.feature_channels``).
        hidden: width of each hidden layer.
        layers: number of hidden layers (>= 1).
        dropout: dropout probability after each hidden layer (0 disables it).
    """

    def __init__(
        self, in_features: int, hidden: int = 256, layers: int = 2, dropout: float = 0.0
    ) -> None:
        if in_features < 1 or hidden < 1 or layers < 1:
            raise ValueError(
                f"DomainDiscriminator: in_features, hidden and layers must be >= 1, got "
                f"in_features={in_features}, hidden={hidden}, layers={layers}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"DomainDiscriminator: dropout must be in [0, 1), got {dropout}")
        blocks: list[nn.Module] = []
        width = in_features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            if dropout > 0:
                blocks.append(nn.Dropout(dropout))
            width = hidden
        blocks.append(nn.Linear(width, 1))
        super().__init__(*blocks)


def pixel_discriminator(in_channels: int, hidden: int = 64) -> nn.Sequential:
    """Fully convolutional domain classifier ``(B, in_channels, h, w) -> (B, 1, h, w)`` logits.

    Three 3x3 convolutions with LeakyReLU(0.2) (as AdaptSegNet's discriminator, without its
    down-sampling, so every input location gets its own domain logit and the label map
    lines up with the input). Use it on feature maps, or on softmax output maps
    ``(B, num_classes, H, W)`` for output-space adaptation.
    """
    if in_channels < 1 or hidden < 1:
        raise ValueError(
            f"pixel_discriminator: in_channels and hidden must be >= 1, got "
            f"in_channels={in_channels}, hidden={hidden}"
        )
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(hidden, hidden, 3, padding=1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(hidden, 1, 3, padding=1),
    )
