"""CycleGAN sim->real translation as a LightningModule (manual optimization).

Domains: ``sim`` (A) and ``real`` (B). ``g_sim2real`` maps A -> B, ``g_real2sim`` B -> A;
``d_real`` judges B images, ``d_sim`` A images. Losses (Zhu et al. 2017, LSGAN form):

- generators: ``g_adv = MSE(D_real(G(a)), 1) + MSE(D_sim(F(b)), 1)``,
  ``cycle = |F(G(a)) - a|_1 + |G(F(b)) - b|_1`` weighted by ``lambda_cycle``,
  ``identity = |G(b) - b|_1 + |F(a) - a|_1`` weighted by ``lambda_cycle * lambda_identity``,
  optionally the CyCADA semantic-consistency loss weighted by ``lambda_semantic``;
- discriminators: ``0.5 * (MSE(D(real), 1) + MSE(D(pooled fake), 0))`` per domain.

**Batch format**: a dict ``{"sim": batch, "real": batch}`` -- what Lightning's
``CombinedLoader`` yields for a dict of two dataloaders (``trainer.fit(model,
{"sim": sim_loader, "real": real_loader})``). Each value is a collated Sample batch (a dict
whose ``image`` is ``(B, 3, H, W)`` float in [0, 1]) or that image tensor itself. Images are
mapped to [-1, 1] inside.

**Steps**: each batch performs two optimizer steps (generators, then discriminators), and in
manual optimization Lightning counts both in ``trainer.global_step``: ``max_steps=30`` is 15
batches. The learning-rate schedule therefore runs on ``batch_step = global_step // 2``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from adaptation.cyclegan.networks import NLayerDiscriminator, ResnetGenerator, init_weights
from adaptation.cyclegan.pool import ImagePool

#: Optimizer steps per training batch (generators + discriminators).
STEPS_PER_BATCH = 2


def linear_decay(step: int, total_steps: int, decay_start_fraction: float = 0.5) -> float:
    """Multiplier of the base learning rate at batch ``step`` (pure function).

    1 for the first ``decay_start_fraction * total_steps`` steps, then linear to 0 at
    ``total_steps`` (0 afterwards). ``total_steps <= 0`` (unknown length) means constant 1.

    >>> [linear_decay(s, 10, 0.5) for s in (0, 5, 6, 10, 12)]
    [1.0, 1.0, 0.8, 0.0, 0.0]
    """
    if total_steps <= 0:
        return 1.0
    start = decay_start_fraction * total_steps
    if step <= start:
        return 1.0
    return max(0.0, 1.0 - (step - start) / max(total_steps - start, 1e-12))


def semantic_consistency_loss(
    task_model: nn.Module, source01: torch.Tensor, translated01: torch.Tensor
) -> torch.Tensor:
    """CyCADA semantic-consistency loss: the translation must not change the task's labels.

    ``task_model`` maps ``(B, 3, H, W)`` in [0, 1] to logits ``(B, K, H, W)`` and is used
    frozen; its argmax on ``source01`` is the target of a cross-entropy on its logits for
    ``translated01`` (both ``(B, 3, H, W)`` in [0, 1]). Gradients reach ``translated01``
    only. Scalar, in nats per pixel; near 0 when the translation keeps the labels and the
    model is confident.
    """
    with torch.no_grad():
        target = _logits(task_model(source01)).argmax(dim=1)
    return F.cross_entropy(_logits(task_model(translated01)).float(), target)


def _logits(output: Any) -> torch.Tensor:
    # Task models may return a dict (torchvision segmentation style) instead of a tensor.
    return output["out"] if isinstance(output, Mapping) else output


def _images(part: Any, key: str) -> torch.Tensor:
    images = part["image"] if isinstance(part, Mapping) else part
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"CycleGAN batch[{key!r}]: expected images (B, C, H, W), got {images!r}")
    return images


class CycleGAN(pl.LightningModule):
    """Unpaired sim->real translation with optional semantic consistency (CyCADA).

    ``semantic_model`` (a task model: ``(B, 3, H, W)`` in [0, 1] -> logits ``(B, K, H, W)``)
    is frozen here -- put in eval mode and ``requires_grad_(False)`` in place -- and kept
    out of the module tree, so it is neither trained, nor switched to train mode by
    Lightning, nor saved in the CycleGAN's checkpoints.
    """

    def __init__(
        self,
        g_ngf: int = 64,
        g_blocks: int = 9,
        d_ndf: int = 64,
        d_layers: int = 3,
        lambda_cycle: float = 10.0,
        lambda_identity: float = 0.5,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        pool_size: int = 50,
        decay_start_fraction: float = 0.5,
        semantic_model: nn.Module | None = None,
        lambda_semantic: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay_start_fraction <= 1.0:
            raise ValueError(
                f"CycleGAN: decay_start_fraction={decay_start_fraction}, expected in [0, 1]"
            )
        self.save_hyperparameters(ignore=["semantic_model"])
        self.automatic_optimization = False
        self.g_sim2real = init_weights(ResnetGenerator(ngf=g_ngf, n_blocks=g_blocks))
        self.g_real2sim = init_weights(ResnetGenerator(ngf=g_ngf, n_blocks=g_blocks))
        self.d_real = init_weights(NLayerDiscriminator(ndf=d_ndf, n_layers=d_layers))
        self.d_sim = init_weights(NLayerDiscriminator(ndf=d_ndf, n_layers=d_layers))
        self.arch = f"cyclegan[{self.g_sim2real.arch}|{self.d_real.arch}]"
        # Different seeds: the two pools must not make the same swap decisions.
        self.pool_real = ImagePool(pool_size, seed=seed)
        self.pool_sim = ImagePool(pool_size, seed=seed + 1)
        if semantic_model is not None:
            semantic_model.eval().requires_grad_(False)
        # A tuple hides the frozen model from nn.Module registration (see class docstring).
        self._semantic: tuple[nn.Module, ...] = () if semantic_model is None else (semantic_model,)
        self.image_channels: int | None = None
        self.image_size: tuple[int, int] | None = None

    @property
    def semantic_model(self) -> nn.Module | None:
        return self._semantic[0] if self._semantic else None

    # ---------------------------------------------------------------- schedule
    def total_batches(self) -> int:
        """Training batches of the whole fit (0 when unknown), for the LR schedule."""
        trainer = self.trainer
        total = trainer.estimated_stepping_batches  # min(batches * epochs, max_steps)
        if trainer.max_steps is not None and trainer.max_steps > 0:
            total = min(total, math.ceil(trainer.max_steps / STEPS_PER_BATCH))
        return int(total) if math.isfinite(total) else 0

    def lr_factor(self) -> float:
        """LR multiplier for the current batch, from ``global_step`` alone (resume-safe)."""
        batch_step = self.trainer.global_step // STEPS_PER_BATCH
        return linear_decay(batch_step, self.total_batches(), self.hparams.decay_start_fraction)

    # ---------------------------------------------------------------- training
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        betas = tuple(hp.betas)
        generators = [*self.g_sim2real.parameters(), *self.g_real2sim.parameters()]
        discriminators = [*self.d_real.parameters(), *self.d_sim.parameters()]
        return [
            torch.optim.Adam(generators, lr=hp.lr, betas=betas),
            torch.optim.Adam(discriminators, lr=hp.lr, betas=betas),
        ]

    def on_fit_start(self) -> None:
        if self.semantic_model is not None:
            self.semantic_model.to(self.device)

    def generator_losses(
        self, sim: torch.Tensor, real: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Unweighted generator losses for images in [-1, 1], and the two fakes.

        Returns ``(losses, fake_real, fake_sim)``: ``losses`` has ``g_adv``, ``cycle``,
        ``identity`` and ``semantic`` (0 without a semantic model or weight).
        """
        hp = self.hparams
        fake_real = self.g_sim2real(sim)
        fake_sim = self.g_real2sim(real)
        pred_real, pred_sim = self.d_real(fake_real), self.d_sim(fake_sim)
        g_adv = F.mse_loss(pred_real, torch.ones_like(pred_real)) + F.mse_loss(
            pred_sim, torch.ones_like(pred_sim)
        )
        cycle = F.l1_loss(self.g_real2sim(fake_real), sim) + F.l1_loss(
            self.g_sim2real(fake_sim), real
        )
        zero = sim.new_zeros(())
        identity = zero
        if hp.lambda_identity > 0:
            identity = F.l1_loss(self.g_sim2real(real), real) + F.l1_loss(self.g_real2sim(sim), sim)
        semantic = zero
        if self.semantic_model is not None and hp.lambda_semantic > 0:
            semantic = semantic_consistency_loss(
                self.semantic_model, (sim + 1) / 2, (fake_real + 1) / 2
            )
        losses = {"g_adv": g_adv, "cycle": cycle, "identity": identity, "semantic": semantic}
        return losses, fake_real, fake_sim

    def generator_objective(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The generators' loss: ``losses`` of :meth:`generator_losses`, weighted."""
        hp = self.hparams
        return (
            losses["g_adv"]
            + hp.lambda_cycle * losses["cycle"]
            + hp.lambda_cycle * hp.lambda_identity * losses["identity"]
            + hp.lambda_semantic * losses["semantic"]
        )

    def discriminator_loss(
        self, sim: torch.Tensor, real: torch.Tensor, fake_sim: torch.Tensor, fake_real: torch.Tensor
    ) -> torch.Tensor:
        """LSGAN discriminator loss of both domains; fakes are detached and pooled here."""
        loss = sim.new_zeros(())
        for disc, pool, true, fake in (
            (self.d_real, self.pool_real, real, fake_real),
            (self.d_sim, self.pool_sim, sim, fake_sim),
        ):
            pred_true, pred_fake = disc(true), disc(pool.query(fake))
            loss = loss + 0.5 * (
                F.mse_loss(pred_true, torch.ones_like(pred_true))
                + F.mse_loss(pred_fake, torch.zeros_like(pred_fake))
            )
        return loss

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        sim01, real01 = _images(batch["sim"], "sim"), _images(batch["real"], "real")
        if self.image_size is None:
            self.image_channels = int(sim01.shape[1])
            self.image_size = (int(sim01.shape[-2]), int(sim01.shape[-1]))
        sim, real = sim01 * 2 - 1, real01 * 2 - 1
        opt_g, opt_d = self.optimizers()
        lr = hp.lr * self.lr_factor()
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = lr

        # Generators; toggling freezes the discriminators so g_adv does not reach them.
        self.toggle_optimizer(opt_g)
        losses, fake_real, fake_sim = self.generator_losses(sim, real)
        g_loss = self.generator_objective(losses)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        self.toggle_optimizer(opt_d)
        d_loss = self.discriminator_loss(sim, real, fake_sim, fake_real)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

        logged: dict[str, Any] = {f"cyclegan/{k}": v.detach() for k, v in losses.items()}
        logged |= {"cyclegan/g_loss": g_loss.detach(), "cyclegan/d_loss": d_loss.detach()}
        logged["cyclegan/lr"] = lr
        self.log_dict(logged, on_step=True, prog_bar=False, batch_size=sim.shape[0])

    def compile_networks(self) -> None:
        """``torch.compile`` both generators and both discriminators in place
        (``nn.Module.compile``): their ``state_dict`` keys stay, so checkpoints, resume and
        the saved generator are as without it. The first steps compile (about 100 s at the
        small config on 2 CPU cores, 145 s at the reference size)."""
        for net in (self.g_sim2real, self.g_real2sim, self.d_real, self.d_sim):
            net.compile()

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def translate(self, images01: torch.Tensor, check_size: bool = True) -> torch.Tensor:
        """Translate sim images to the real domain.

        ``images01``: ``(B, 3, H, W)`` float in [0, 1] -> ``(B, 3, H, W)`` in [0, 1], same
        dtype and device. Refuses another channel count than seen in training and, with
        ``check_size``, another ``(H, W)`` (the generator would run, but was never trained
        at that scale).
        """
        if self.image_channels is not None and images01.shape[1] != self.image_channels:
            raise ValueError(
                f"CycleGAN.translate: images have {images01.shape[1]} channels, the model was "
                f"trained on {self.image_channels}"
            )
        size = tuple(images01.shape[-2:])
        if check_size and self.image_size is not None and size != tuple(self.image_size):
            raise ValueError(
                f"CycleGAN.translate: image size {size}, the model was trained on "
                f"{tuple(self.image_size)} (pass check_size=False to force)"
            )
        was_training = self.g_sim2real.training
        self.g_sim2real.eval()  # dropout off; instance norm behaves the same either way
        try:
            out = self.g_sim2real(images01 * 2 - 1)
        finally:
            self.g_sim2real.train(was_training)
        return ((out + 1) / 2).clamp(0, 1).to(images01.dtype)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cyclegan"] = {
            "arch": self.arch,
            "image_channels": self.image_channels,
            "image_size": list(self.image_size) if self.image_size else None,
            # the image pools, so a resumed fit makes the discriminators' choices again
            "pools": {"real": self.pool_real.state_dict(), "sim": self.pool_sim.state_dict()},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("cyclegan")
        if meta is None:
            raise ValueError("CycleGAN checkpoint: missing key 'cyclegan' (arch, image size)")
        if meta["arch"] != self.arch:
            raise ValueError(
                f"CycleGAN checkpoint: 'cyclegan.arch' is {meta['arch']!r}, this model is "
                f"{self.arch!r}"
            )
        self.image_channels = meta["image_channels"]
        self.image_size = tuple(meta["image_size"]) if meta["image_size"] else None
        pools = meta.get("pools")
        if pools is not None:  # older checkpoints resume with empty pools
            self.pool_real.load_state_dict(pools["real"])
            self.pool_sim.load_state_dict(pools["sim"])
