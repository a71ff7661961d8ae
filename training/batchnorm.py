"""BatchNorm statistics of the target domain (AdaBN, Li et al. 2016).

A network trained on batches that are 90 % sim normalizes with running statistics that
are mostly sim; evaluated on real images it then shifts every activation by the sim-real
difference of their means. Re-estimating the running statistics on unlabelled real images
(forward passes in train mode, no gradient, no weight changes) removes that shift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["batchnorm_recalibration", "recalibrate_batchnorm"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable[Tensor], forward: Callable[[Tensor], Any] | None = None
) -> int:
    """Set every BatchNorm's running mean and variance to their plain average over
    ``batches`` (``(B, 3, H, W)`` images), run through ``forward`` (default ``model``) in
    train mode; weights, modes and momenta are restored. Returns the batches seen (0:
    the statistics are left as they were)."""
    norms = [m for m in model.modules() if isinstance(m, _NORMS) and m.track_running_stats]
    if not norms:
        return 0
    saved = [(m, m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in norms]
    modes = {m: m.training for m in model.modules()}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    forward = forward or model
    seen = 0
    try:
        for images in batches:
            forward(images)
            seen += 1
    finally:
        for m, momentum, mean, var in saved:
            m.momentum = momentum
            if seen == 0:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        for m, mode in modes.items():
            m.train(mode)
    return seen


def batchnorm_recalibration(images: Callable[[], Iterable[Tensor]], batches: int) -> Any:
    """A Lightning callback: before every validation (the sanity check aside), the task
    model's BatchNorm statistics re-estimated on ``batches`` batches of ``images()``
    (unlabelled real images), so the checkpoints hold target statistics; the training
    batches keep normalizing with their own batch statistics."""
    import itertools

    import pytorch_lightning as pl

    class BatchNormRecalibration(pl.Callback):
        def on_validation_epoch_start(self, trainer: Any, module: Any) -> None:
            if trainer.sanity_checking:
                return
            stream = (b["image"].to(module.device) for b in images())
            recalibrate_batchnorm(
                module.model, itertools.islice(stream, batches), forward=module.forward
            )

    return BatchNormRecalibration()
