"""Adversarial domain-adaptation losses (DANN, Ganin et al. 2016; AdaptSegNet, Tsai et al. 2018).

Both losses take features (or outputs) of any backbone and a discriminator, reverse the
gradient with :func:`adaptation.grl.gradient_reversal`, and return the discriminator's
binary cross-entropy. Minimizing it with one optimizer over backbone and discriminator
trains the discriminator to separate sim (label 0) from real (label 1) and, through the
reversed gradient, the backbone to make them inseparable:

.. math::

    \\mathcal{L}_d = \\tfrac12 \\big( \\overline{\\mathrm{BCE}}(D(R_\\lambda(f_s)), 0)
                   + \\overline{\\mathrm{BCE}}(D(R_\\lambda(f_t)), 1) \\big)

with :math:`R_\\lambda` the identity whose gradient is multiplied by :math:`-\\lambda` and
the bar a mean over samples (and pixels). Each domain weighs one half whatever its batch
size, so a 90/10 batch does not let the sim half dominate.

Example::

    logits_s, feats_s = model.forward_features(sim_images)
    _, feats_t = model.forward_features(real_images)
    lam = grl_lambda(progress(self.global_step, total_steps))
    loss_d, acc_d = dann_loss(feats_s, feats_t, discriminator, lam)
    loss = task_loss + loss_d
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptation.grl import gradient_reversal, grl_lambda, progress
from adaptation.plugin import (
    ModelInfo,
    Objective,
    StepOutputs,
    TaskAdaptation,
    unlabeled_batches,
)
from core.seeding import seeded

__all__ = ["DANN", "DannObjective", "dann_loss", "output_space_loss"]

#: Domain labels of the Sample contract.
SIM, REAL = 0.0, 1.0


def _domain_logits(src: Tensor, tgt: Tensor, discriminator: nn.Module) -> tuple[Tensor, Tensor]:
    """Discriminator logits of both domains, in one call when their shapes allow it.

    One call on the concatenation keeps BatchNorm statistics shared by both domains; two
    separate calls would normalize each domain on its own and hide a shift in the mean.
    Maps of different sizes (pixel discriminators are fully convolutional and hold no
    BatchNorm) go through separate calls.
    """
    if src.shape[1:] == tgt.shape[1:]:
        logits = discriminator(torch.cat([src, tgt], dim=0))
        return logits[: src.shape[0]], logits[src.shape[0] :]
    return discriminator(src), discriminator(tgt)


def _bce_and_accuracy(logits_src: Tensor, logits_tgt: Tensor) -> tuple[Tensor, Tensor]:
    """Domain-balanced BCE with logits and accuracy (sim label 0, real label 1)."""
    loss = 0.5 * (
        F.binary_cross_entropy_with_logits(logits_src, torch.full_like(logits_src, SIM))
        + F.binary_cross_entropy_with_logits(logits_tgt, torch.full_like(logits_tgt, REAL))
    )
    with torch.no_grad():
        acc = 0.5 * ((logits_src < 0).float().mean() + (logits_tgt > 0).float().mean())
    return loss, acc


def dann_loss(
    features_src: Tensor,
    features_tgt: Tensor,
    discriminator: nn.Module,
    lambda_: float,
    pool: bool = True,
) -> tuple[Tensor, Tensor]:
    """DANN domain loss on gradient-reversed features of both domains.

    Args:
        features_src: sim features, ``(B_s, F)`` or ``(B_s, F, h, w)``.
        features_tgt: real features, same layout (``B_t`` may differ from ``B_s``).
        discriminator: ``(N, F) -> (N, 1)`` (:class:`~adaptation.discriminator.DomainDiscriminator`)
            for vectors and pooled maps; ``(N, F, h, w) -> (N, 1, h, w)``
            (:func:`~adaptation.discriminator.pixel_discriminator`) for maps with
            ``pool=False``.
        lambda_: reversal coefficient (:func:`adaptation.grl.grl_lambda`); 0 trains the
            discriminator without touching the features.
        pool: for 4-D maps, average over ``(h, w)`` first (one logit per image); ``False``
            classifies every location (one logit per pixel). Ignored for ``(B, F)`` input.

    Returns:
        ``(loss, accuracy)``: the scalar BCE above, differentiable, and the detached
        domain-balanced accuracy of the discriminator in [0, 1] (0.5 = chance), for logging.
        A rising accuracy means the features still carry the domain.
    """
    if features_src.dim() != features_tgt.dim() or features_src.dim() not in (2, 4):
        raise ValueError(
            "dann_loss: features must both be (B, F) or (B, F, h, w), got "
            f"{tuple(features_src.shape)} and {tuple(features_tgt.shape)}"
        )
    if features_src.dim() == 4 and pool:
        features_src = features_src.mean(dim=(2, 3))
        features_tgt = features_tgt.mean(dim=(2, 3))
    logits_src, logits_tgt = _domain_logits(
        gradient_reversal(features_src, lambda_),
        gradient_reversal(features_tgt, lambda_),
        discriminator,
    )
    return _bce_and_accuracy(logits_src, logits_tgt)


def output_space_loss(
    logits_src: Tensor, logits_tgt: Tensor, discriminator: nn.Module, lambda_: float
) -> tuple[Tensor, Tensor]:
    """Output-space adversarial loss (AdaptSegNet) with gradient reversal.

    The segmentation logits ``(B, K, H, W)`` of both domains go through a softmax over
    the K classes; a pixel discriminator (``pixel_discriminator(K)``) then classifies
    the domain of every pixel of the probability maps. Structured outputs (road below
    sky, cars on road) are alike across domains even when textures are not, which makes
    this space easier to align than the features.

    Returns ``(loss, accuracy)`` as :func:`dann_loss` with ``pool=False``.
    """
    if logits_src.dim() != 4 or logits_tgt.dim() != 4:
        raise ValueError(
            "output_space_loss: logits must be (B, K, H, W), got "
            f"{tuple(logits_src.shape)} and {tuple(logits_tgt.shape)}"
        )
    return dann_loss(
        logits_src.softmax(dim=1), logits_tgt.softmax(dim=1), discriminator, lambda_, pool=False
    )


# ------------------------------------------------------------------------ the plug-in
class DannObjective(Objective):
    """DANN's domain loss for one stage: the labelled sim samples of each batch against
    its labelled real samples and a batch of unlabelled real images (all through the
    student in one forward pass), through a gradient reversal whose coefficient follows
    :func:`~adaptation.grl.grl_lambda` of the training progress (read from the step).

    Logs ``dann/loss``, ``dann/domain_acc`` and ``dann/lambda``.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        unlabeled: Callable[[], Any],
        weight: float,
        gamma: float,
    ) -> None:
        super().__init__()
        self.discriminator = discriminator
        self._unlabeled = unlabeled
        self._batches: Any = None
        self.weight, self.gamma = float(weight), float(gamma)

    def extra_images(self, batch: Mapping[str, Any], step: int) -> Tensor | None:
        """A batch of unlabelled real images, seen by the student with the labelled batch
        (one forward pass: BatchNorm statistics shared by both domains)."""
        if not bool((batch["domain"] == SIM).any()):  # a real-only batch: nothing to align
            return None
        if self._batches is None:
            self._batches = iter(self._unlabeled())
        return next(self._batches)["image"]

    def forward(  # type: ignore[override]
        self, batch: Mapping[str, Any], outputs: StepOutputs
    ) -> tuple[Tensor, dict[str, float | Tensor]]:
        if outputs.extra_features is None:
            return outputs.features.sum() * 0.0, {}
        domain = batch["domain"].to(outputs.features.device)
        sim_features = outputs.features[domain == SIM]
        # the labelled real share of the batch is real too
        real_features = torch.cat([outputs.features[domain == REAL], outputs.extra_features])
        lam = grl_lambda(progress(outputs.step, outputs.total_steps), self.gamma)
        loss, accuracy = dann_loss(sim_features, real_features, self.discriminator, lam)
        logs = {"dann/loss": loss.detach(), "dann/domain_acc": accuracy, "dann/lambda": lam}
        return self.weight * loss, logs


class DANN(TaskAdaptation):
    """Feature-level adaptation (Ganin and Lempitsky 2015) as a plug-in.

    Args:
        stages: the stages whose training adds the domain loss.
        discriminator: ``in_features -> nn.Module`` (a ``_partial_`` node of
            :class:`~adaptation.discriminator.DomainDiscriminator`).
        weight: weight of the adversarial term in the loss.
        gamma: steepness of the GRL schedule (10 in Ganin and Lempitsky).
        unlabeled_batch_size: unlabelled real images per step; None: the labelled batch
            size.
    """

    def __init__(
        self,
        stages: Sequence[str],
        discriminator: Callable[..., nn.Module],
        weight: float = 1.0,
        gamma: float = 10.0,
        unlabeled_batch_size: int | None = None,
    ) -> None:
        from core.config import check_number

        self.stages = list(stages)
        self.make_discriminator = discriminator
        self.weight = check_number("adaptation.dann.weight", weight, low=0)
        self.gamma = check_number("adaptation.dann.gamma", gamma, low=0)
        self.unlabeled_batch_size = check_number(
            "adaptation.dann.unlabeled_batch_size",
            unlabeled_batch_size,
            low=1,
            integer=True,
            optional=True,
        )

    def objective(self, model: ModelInfo) -> DannObjective:
        batches = unlabeled_batches(model, self.unlabeled_batch_size, "DANN")
        with seeded(model.seed):  # the same seed, the same discriminator
            discriminator = self.make_discriminator(in_features=model.feature_channels)
        return DannObjective(
            discriminator,
            batches,
            self.weight,
            self.gamma,
        )
