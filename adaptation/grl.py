"""Gradient reversal (Ganin & Lempitsky, 2015) and its lambda schedule.

The gradient-reversal layer (GRL) is the identity on the forward pass and multiplies the
gradient by ``-lambda`` on the backward pass. Put between a feature extractor and a domain
discriminator, one backward pass trains the discriminator to tell the domains apart while
pushing the features to make them indistinguishable.

No hidden counters: the layer stores nothing. ``lambda`` is a pure function of training
progress, which the caller computes from the trainer's global step, so validation, sanity
checks or a resumed run never shift the schedule.

Example::

    lam = grl_lambda(progress(trainer.global_step, trainer.estimated_stepping_batches))
    domain_logits = discriminator(gradient_reversal(features, lam))
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "GradientReversal",
    "GradientReversalFunction",
    "gradient_reversal",
    "grl_lambda",
    "progress",
]


def grl_lambda(progress: float, gamma: float = 10.0) -> float:
    """GRL coefficient at training ``progress`` p (Ganin & Lempitsky, 2015, sec. 5.2.2).

    .. math:: \\lambda(p) = \\frac{2}{1 + e^{-\\gamma p}} - 1, \\quad p \\in [0, 1]

    It rises from 0 at p = 0 (the discriminator is random early on, so its gradient is
    noise that should not reach the features) towards 1; p is clipped to [0, 1].

    >>> grl_lambda(0.0), round(grl_lambda(1.0), 5)
    (0.0, 0.99991)
    """
    p = min(1.0, max(0.0, float(progress)))
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def progress(global_step: int, total_steps: int) -> float:
    """Training progress p = ``global_step / total_steps`` in [0, 1] (1 if no total is known).

    >>> progress(50, 200)
    0.25
    """
    if total_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, global_step / total_steps))


class GradientReversalFunction(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-lambda_``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lambda_: float) -> Tensor:
        ctx.lambda_ = float(lambda_)
        # view_as: an output that is a new tensor object, so autograd records this node.
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        # No gradient for lambda_: it is a schedule value, not a parameter.
        return grad_output.neg() * ctx.lambda_, None


def gradient_reversal(x: Tensor, lambda_: float) -> Tensor:
    """Return ``x`` unchanged; its gradient is multiplied by ``-lambda_`` on the way back.

    Args:
        x: any tensor, for example features ``(B, F)`` or ``(B, F, h, w)``.
        lambda_: reversal coefficient, usually :func:`grl_lambda` of the training progress.
    """
    return GradientReversalFunction.apply(x, lambda_)


class GradientReversal(nn.Module):
    """Stateless gradient-reversal layer: ``forward(x, lambda_)``.

    Unlike layers that count their own calls, ``lambda_`` is passed on every call, so the
    schedule depends only on the trainer's global step.
    """

    def forward(self, x: Tensor, lambda_: float) -> Tensor:
        """See :func:`gradient_reversal`."""
        return gradient_reversal(x, lambda_)
