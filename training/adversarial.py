"""Adversarial training, the register's mitigation of risk S-05: PGD examples mixed into
each labelled training batch at ``loss.adversarial.rate``.

Of a training batch of ``B`` labelled images (sim and real alike), ``round(rate * B)``
(half up), chosen by a generator seeded from the run's seed, the step and the batch
index, are replaced by PGD examples crafted against the current weights with
:func:`training.risk.robustness.pgd` -- the attack S-05 measures with: ``steps`` signed
gradient steps from a seeded uniform start in the L-inf ball of radius ``eps``. The task
loss then treats them as any image of the batch (same loss, same domain weighting).

BatchNorm: the attack runs the model in eval mode, so BatchNorm normalizes with its
running statistics and updates none of them (in train mode each attack pass would pull
the statistics toward perturbed part-batch inputs), dropout is off, and only the images
get a gradient (``torch.autograd.grad`` with respect to them: no parameter's ``.grad`` is
touched, no DDP hook fires). The mode is restored before the training forward pass. The
attack thus targets the function that is deployed and that S-05 attacks (eval mode too);
early in training, while the running statistics lag the weights, it is a somewhat weaker
attack than one on batch statistics.

Precision: under bf16 autocast the convolutions run in bf16 as in training; the images,
the perturbation and the gradient with respect to the images are fp32, and the attack's
loss is taken on fp32 logits.

Nothing draws from the global RNG (selection and start have their own generators): with
the option on, a run is as reproducible per seed as without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

#: ``loss.adversarial`` keys and their defaults (``rate: 0`` is off).
SETTINGS = {"rate": 0.0, "eps_255": 4, "steps": 1}


@dataclass(frozen=True)
class AdversarialTraining:
    """PGD examples in each labelled batch.

    Attributes:
        rate: share of every labelled batch replaced by PGD examples, in [0, 1].
        eps: the L-inf budget in [0, 1] pixel units (``loss.adversarial.eps_255 / 255``).
        steps: PGD steps (step size ``2.5 * eps / steps``, as S-05's PGD).
        seed: the run's seed; with the step and batch index it seeds selection and start.
    """

    rate: float
    eps: float
    steps: int = 1
    seed: int = 0

    def count(self, batch_size: int) -> int:
        """Images of a ``batch_size`` batch replaced: ``rate * batch_size`` rounded half up."""
        return min(batch_size, math.floor(self.rate * batch_size + 0.5))

    def _seeds(self, step: int, batch_idx: int, rank: int) -> tuple[int, int]:
        words = np.random.SeedSequence([self.seed, step, batch_idx, rank]).generate_state(2)
        return int(words[0]), int(words[1])

    def chosen(self, batch_size: int, step: int, batch_idx: int, rank: int = 0) -> Tensor:
        """Sorted indices ``(count(batch_size),)`` int64 of the batch's images to attack."""
        gen = torch.Generator(device="cpu").manual_seed(self._seeds(step, batch_idx, rank)[0])
        perm = torch.randperm(batch_size, generator=gen)
        return perm[: self.count(batch_size)].sort().values

    def craft(
        self,
        model: nn.Module,
        images: Tensor,
        masks: Tensor,
        step: int,
        batch_idx: int,
        rank: int = 0,
        forward: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The batch with its chosen share replaced by PGD examples.

        Args:
            model: the network whose BatchNorm and dropout are put in eval mode while
                attacking (its mode is restored).
            images: ``(B, 3, H, W)`` float in [0, 1]; not modified.
            masks: ``(B, H, W)`` int64, 255 ignored.
            step, batch_idx, rank: the optimizer step, the batch index within the epoch
                and the process rank, which seed the choice and the PGD start.
            forward: ``images -> logits`` to attack (e.g. the task, which adds the memory
                layout); ``model`` itself if None.

        Returns:
            ``(images', idx)``: ``images'`` a new ``(B, 3, H, W)`` tensor equal to
            ``images`` outside ``idx`` and within ``eps`` of it (and in [0, 1]) at the
            sorted indices ``idx`` (int64, on the images' device).
        """
        from training.risk.robustness import pgd

        idx = self.chosen(images.shape[0], step, batch_idx, rank).to(images.device)
        if idx.numel() == 0:
            return images, idx
        was_training = model.training
        model.eval()
        try:
            adv = pgd(
                forward or model,
                images[idx].float(),
                masks[idx],
                self.eps,
                self.steps,
                seed=self._seeds(step, batch_idx, rank)[1],
            )
        finally:
            model.train(was_training)
        out = images.clone()
        out[idx] = adv.to(out.dtype)
        return out, idx


def adversarial_training(node: Mapping[str, Any] | None, seed: int) -> AdversarialTraining | None:
    """``loss.adversarial`` checked; None when off (no node, or ``rate: 0``).

    Raises :class:`~core.config.ConfigError` naming the key (``loss.adversarial.rate``,
    ``loss.adversarial.eps_255``, ...) for a bad value; the run calls this before any work.
    """
    from core.config import ConfigError, check_number

    if node is None:
        return None
    if not isinstance(node, Mapping):
        raise ConfigError(
            f"loss.adversarial: expected a mapping with keys {list(SETTINGS)}, got {node!r}"
        )
    unknown = sorted(set(node) - set(SETTINGS))
    if unknown:
        raise ConfigError(
            f"loss.adversarial.{unknown[0]}: unknown key, expected one of {list(SETTINGS)}"
        )
    values = {**SETTINGS, **node}
    rate = check_number("loss.adversarial.rate", values["rate"], low=0, high=1)
    eps_255 = check_number("loss.adversarial.eps_255", values["eps_255"], low=0, high=255)
    steps = check_number("loss.adversarial.steps", values["steps"], low=1, integer=True)
    if rate == 0:
        return None
    return AdversarialTraining(float(rate), float(eps_255) / 255, int(steps), int(seed))
