"""CycleGAN networks: the ResNet generator and the PatchGAN discriminator.

Layer for layer the architectures of Zhu et al. (2017) as in the reference implementation
(junyanz/pytorch-CycleGAN-and-pix2pix, ``networks.py``), written as plain modules with
explicit constructor arguments. Both are fully convolutional, so they accept any image size
whose height and width are divisible by ``2 ** n_downsampling`` (4 by default).

>>> g = ResnetGenerator(ngf=8, n_blocks=2)
>>> g(torch.zeros(1, 3, 32, 48)).shape
torch.Size([1, 3, 32, 48])
>>> NLayerDiscriminator(ndf=8)(torch.zeros(1, 3, 64, 64)).shape
torch.Size([1, 1, 6, 6])
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

NormFactory = Callable[[int], nn.Module]


def norm_layer(norm: str | NormFactory) -> NormFactory:
    """Return a factory ``channels -> nn.Module`` for ``norm``.

    ``norm`` is ``"instance"`` (no affine, no running statistics, as the reference),
    ``"batch"``, ``"none"``, or a callable taking the channel count (injected as is).
    """
    if callable(norm):
        return norm
    if norm == "instance":
        return partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if norm == "batch":
        return partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if norm == "none":
        return lambda channels: nn.Identity()
    raise ValueError(f"norm: expected 'instance', 'batch', 'none' or a callable, got {norm!r}")


def _uses_bias(norm: str | NormFactory) -> bool:
    # A convolution followed by batch norm gets its shift from the norm's affine term; instance
    # norm without affine (and no norm) needs the convolution's own bias, as in the reference.
    return norm != "batch"


def _norm_name(norm: str | NormFactory) -> str:
    return norm if isinstance(norm, str) else getattr(norm, "__name__", "custom")


def _padded_conv3x3(channels: int, padding: str, bias: bool) -> list[nn.Module]:
    if padding == "reflect":
        return [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias)]
    if padding == "replicate":
        return [nn.ReplicationPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias)]
    if padding == "zero":
        return [nn.Conv2d(channels, channels, 3, padding=1, bias=bias)]
    raise ValueError(f"padding: expected 'reflect', 'replicate' or 'zero', got {padding!r}")


class ResnetBlock(nn.Module):
    """``x + conv-norm-relu-(dropout)-conv-norm(x)``; shape-preserving ``(B, C, H, W)``."""

    def __init__(
        self, channels: int, padding: str, norm: NormFactory, dropout: float, bias: bool
    ) -> None:
        super().__init__()
        layers = [*_padded_conv3x3(channels, padding, bias), norm(channels), nn.ReLU(True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [*_padded_conv3x3(channels, padding, bias), norm(channels)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """Image-to-image generator: 7x7 conv, strided downsamplings, ResNet blocks, upsamplings.

    Input ``(B, in_channels, H, W)`` in [-1, 1]; output ``(B, out_channels, H, W)`` in
    [-1, 1] (tanh). ``H`` and ``W`` must be divisible by ``2 ** n_downsampling``.
    ``dropout`` is the probability inside each block (the reference's ``--no_dropout``
    default is 0; its ``use_dropout`` means 0.5).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ngf: int = 64,
        n_blocks: int = 9,
        n_downsampling: int = 2,
        norm: str | NormFactory = "instance",
        padding: str = "reflect",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if n_blocks < 0 or n_downsampling < 0 or ngf < 1:
            raise ValueError(
                f"ResnetGenerator: n_blocks={n_blocks}, n_downsampling={n_downsampling}, "
                f"ngf={ngf}: expected n_blocks >= 0, n_downsampling >= 0, ngf >= 1"
            )
        make_norm, bias = norm_layer(norm), _uses_bias(norm)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.n_downsampling = n_downsampling
        self.arch = (
            f"resnet_generator(in={in_channels},out={out_channels},ngf={ngf},blocks={n_blocks},"
            f"down={n_downsampling},norm={_norm_name(norm)},pad={padding})"
        )
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7, bias=bias),
            make_norm(ngf),
            nn.ReLU(True),
        ]
        for i in range(n_downsampling):
            c = ngf * 2**i
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=bias)]
            layers += [make_norm(2 * c), nn.ReLU(True)]
        c = ngf * 2**n_downsampling
        layers += [ResnetBlock(c, padding, make_norm, dropout, bias) for _ in range(n_blocks)]
        for i in range(n_downsampling):
            c = ngf * 2 ** (n_downsampling - i)
            # output_padding=1 makes each upsampling exactly double H and W again.
            layers += [
                nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1, bias=bias)
            ]
            layers += [make_norm(c // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` in [-1, 1] -> ``(B, out_channels, H, W)`` in [-1, 1]."""
        factor = 2**self.n_downsampling
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResnetGenerator: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"ResnetGenerator: image size {tuple(x.shape[-2:])} must be divisible by {factor}"
            )
        return self.model(x)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator: one real/fake logit per overlapping patch.

    With ``n_layers=3`` each output cell sees a 70x70 input patch. Input
    ``(B, in_channels, H, W)`` in [-1, 1]; output ``(B, 1, h, w)`` of unbounded scores (the
    LSGAN loss regresses them to 1 for real, 0 for fake); for 3 layers ``h = H/8 - 2``
    (64 -> 6, 256 -> 30).
    """

    def __init__(
        self,
        in_channels: int = 3,
        ndf: int = 64,
        n_layers: int = 3,
        norm: str | NormFactory = "instance",
    ) -> None:
        super().__init__()
        if n_layers < 1 or ndf < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers={n_layers}, ndf={ndf}: expected >= 1")
        make_norm, bias = norm_layer(norm), _uses_bias(norm)
        self.arch = (
            f"patchgan(in={in_channels},ndf={ndf},layers={n_layers},norm={_norm_name(norm)})"
        )
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            # The last of these keeps the resolution (stride 1), widening the receptive field.
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=bias),
                make_norm(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` in [-1, 1] -> ``(B, 1, h, w)`` patch scores."""
        return self.model(x)


def init_weights(module: nn.Module, gain: float = 0.02) -> nn.Module:
    """Normal initialisation of the reference (``init_type='normal'``), in place.

    Conv / transposed-conv / linear weights ~ N(0, gain), their biases 0; batch-norm weights
    ~ N(1, gain), biases 0. Returns ``module`` for chaining.
    """

    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)

    module.apply(_init)
    return module
