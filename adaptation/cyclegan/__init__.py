"""CycleGAN pixel-level adaptation: sim->real image translation (Zhu et al. 2017, CyCADA)."""

from adaptation.cyclegan.module import CycleGAN, linear_decay, semantic_consistency_loss
from adaptation.cyclegan.networks import (
    NLayerDiscriminator,
    ResnetBlock,
    ResnetGenerator,
    init_weights,
    norm_layer,
)
from adaptation.cyclegan.pool import ImagePool

__all__ = [
    "CycleGAN",
    "ImagePool",
    "NLayerDiscriminator",
    "ResnetBlock",
    "ResnetGenerator",
    "init_weights",
    "linear_decay",
    "norm_layer",
    "semantic_consistency_loss",
]
