"""The Lightning module for semantic segmentation on mixed sim/real batches.

Training batches come from :class:`~training.datamodule.SimRealDataModule` with an
exact sim:real ratio; the loss is logged overall and per domain. Validation and test
run on one loader per domain (``sim``, ``real``) and log, per domain and condition group,
the metrics of :mod:`training.metrics` under ``<split>/<domain>/<metric>`` plus the
sim-to-real gap ``gap/<metric>`` (validation) and ``test/gap/<metric>`` (test), with a
confusion matrix and a prediction grid per domain as images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from adaptation.plugin import StepOutputs
from training.adversarial import AdversarialTraining
from training.figures import confusion_matrix_image, prediction_grid
from training.metrics import GroupedSegmentationMetrics, sim_to_real_gap
from training.schedules import warmup_cosine

#: Metrics whose sim-minus-real gap is logged.
GAP_KEYS = ("miou", "pixel_acc", "macro_f1")


class SegmentationTask(pl.LightningModule):
    """Segmentation training, evaluation and logging.

    Args:
        model: a task model (:mod:`training.models`): ``(B, 3, H, W) -> (B, C, H, W)``.
        loss: ``(logits, target) -> scalar``; target ``(B, H, W)`` int64, 255 ignored.
        class_names: the taxonomy's classes in index order.
        palette: ``(256, 3) uint8`` label colours for prediction grids.
        optimizer: ``params -> Optimizer`` (Hydra ``_partial_: true``); AdamW(lr=2e-3) if None.
        warmup_fraction: share of the training steps spent warming up the LR; the LR
            then follows a cosine to zero (:func:`~training.schedules.warmup_cosine`).
        groups: condition groups known in advance (all ranks then hold the same metric
            states under DDP); others are added as they appear.
        val_names, test_names: domain name of each validation / test loader, in order.
        image_rows: rows of the prediction grids logged per domain.
        channels_last: run convolutions in NHWC memory layout (about 1.5x faster training
            on CPU here, and what tensor cores want on GPU).
        objectives: loss terms of task-level adaptation (:class:`~adaptation.plugin.
            Objective`, e.g. DANN's domain loss) by name: each is called as ``loss, logs =
            objective(batch, outputs)`` on every training batch and its ``logs`` are
            logged as ``train/<key>``; their parameters join the optimizer.
        real_loss_share: share of the task loss the batch's real samples carry (the sim
            samples the rest), in [0, 1]; None: one mean over every labelled pixel.
        labelled: ``{domain: class indices}`` the evaluated data of a domain labels (a
            real dataset may lack classes of the taxonomy): its mIoU averages over them,
            with ``miou_all`` over every class beside it; a domain not named: all.
        adversarial: adversarial training (risk S-05's mitigation, ``loss.adversarial``):
            a seeded share of every training batch replaced by PGD examples crafted
            against the current weights (:class:`~training.adversarial.
            AdversarialTraining`), their loss logged as ``train/adv_loss``; None: off.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        class_names: Sequence[str],
        palette: np.ndarray,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        warmup_fraction: float = 0.05,
        groups: Sequence[str] | None = None,
        val_names: Sequence[str] = ("sim", "real"),
        test_names: Sequence[str] = ("sim", "real"),
        image_rows: int = 6,
        channels_last: bool = True,
        objectives: Mapping[str, nn.Module] | None = None,
        labelled: Mapping[str, Sequence[int] | None] | None = None,
        real_loss_share: float | None = None,
        adversarial: AdversarialTraining | None = None,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.loss = loss
        self.class_names = list(class_names)
        self.palette = np.asarray(palette, dtype=np.uint8)
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=2e-3)
        self.warmup_fraction = float(warmup_fraction)
        self.val_names, self.test_names = list(val_names), list(test_names)
        self.image_rows = image_rows
        n = len(self.class_names)
        names = sorted(set(self.val_names) | set(self.test_names))
        self.metrics = nn.ModuleDict(
            {
                d: GroupedSegmentationMetrics(
                    n, self.class_names, groups=groups, labelled=(labelled or {}).get(d)
                )
                for d in names
            }
        )
        self._examples: dict[str, tuple[torch.Tensor, ...]] = {}
        #: Latest computed figures by key (``val/real/miou``, ``test/gap/miou``, ...).
        self.results: dict[str, float] = {}
        #: ``{domain: {group: (C, C) confusion}}`` of the last test run (fairness, T-08).
        self.test_group_confusions: dict[str, dict[str, np.ndarray]] = {}
        self.objectives = nn.ModuleDict(dict(objectives or {}))
        self.real_loss_share = None if real_loss_share is None else float(real_loss_share)
        self.adversarial = adversarial
        # pooled encoder features of the first validation images of each domain, for the
        # proxy A-distance (a gap measure independent of the labels)
        self._pad_features: dict[str, list[torch.Tensor]] = {}
        self.pad_samples = 256

    # ------------------------------------------------------------------ train
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self._layout(x))

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        bs = batch["image"].shape[0]
        attacked = None
        if self.adversarial is not None:
            batch, attacked = self._adversarial_batch(batch, batch_idx)
        if not self.objectives:
            logits = self(batch["image"])
            loss = self.task_loss(logits, batch)
        else:
            loss, logits = self._adapted_step(batch, bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        with torch.no_grad():  # per-domain loss, for watching the two halves of the mix
            for name, dom in (("sim", 0), ("real", 1)):
                sel = batch["domain"] == dom
                if bool(sel.any()):
                    part = self.loss(logits[sel], batch["mask"][sel])
                    self.log(f"train/{name}/loss", part, batch_size=int(sel.sum()))
            if attacked is not None and attacked.numel():
                adv = self.loss(logits[attacked], batch["mask"][attacked])
                self.log("train/adv_loss", adv, batch_size=int(attacked.numel()))
        return loss

    def _adversarial_batch(
        self, batch: dict[str, Any], batch_idx: int
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """The batch with :attr:`adversarial`'s share of images replaced by PGD examples
        (crafted with the model in eval mode: no BatchNorm statistic moves), and the
        indices replaced."""
        assert self.adversarial is not None
        images, attacked = self.adversarial.craft(
            self.model,
            batch["image"],
            batch["mask"],
            step=int(self.global_step),
            batch_idx=batch_idx,
            rank=int(self.global_rank),
            forward=self,  # the task's forward adds the memory layout
        )
        return {**batch, "image": images}, attacked

    def task_loss(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """The segmentation loss of a labelled batch: one mean over its pixels, or with
        ``real_loss_share`` = w, ``(1 - w) * loss(sim samples) + w * loss(real samples)``
        (a batch of one domain: that domain's loss)."""
        if self.real_loss_share is None:
            return self.loss(logits, batch["mask"])
        real = batch["domain"] == 1
        n_real = int(real.sum())
        if n_real in (0, real.numel()):
            return self.loss(logits, batch["mask"])
        w = self.real_loss_share
        sim_loss = self.loss(logits[~real], batch["mask"][~real])
        return (1.0 - w) * sim_loss + w * self.loss(logits[real], batch["mask"][real])

    def _adapted_step(self, batch: dict[str, Any], bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The task loss plus every objective's term; the labelled batch and the images
        the objectives ask for go through the student in one forward pass."""
        step = int(self.global_step)
        extras = {name: obj.extra_images(batch, step) for name, obj in self.objectives.items()}
        images = [batch["image"], *(x.to(batch["image"]) for x in extras.values() if x is not None)]
        all_logits, all_features = self.model.forward_features(self._layout(torch.cat(images)))
        logits, features = all_logits[:bs], all_features[:bs]
        loss = self.task_loss(logits, batch)
        total = self._total_steps() if self._trainer else 1
        start = bs
        for name, objective in self.objectives.items():
            extra_logits = extra_features = None
            if extras[name] is not None:
                n = extras[name].shape[0]
                extra_logits = all_logits[start : start + n]
                extra_features = all_features[start : start + n]
                start += n
            outputs = StepOutputs(
                logits=logits,
                features=features,
                forward_features=lambda x: self.model.forward_features(self._layout(x)),
                step=step,
                total_steps=total,
                extra_logits=extra_logits,
                extra_features=extra_features,
            )
            term, logs = objective(batch, outputs)
            loss = loss + term
            for key, value in logs.items():
                self.log(f"train/{key}", value, batch_size=bs)
        return loss, logits

    def _total_steps(self) -> int:
        """The fit's optimizer steps, as ``trainer.estimated_stepping_batches`` counts them,
        from the data module's ``batches_per_epoch`` when it has one: Lightning's estimate
        builds the training loader, and one with workers, built before a checkpoint is
        restored, prefetches epoch 0's batches into the resumed epoch."""
        trainer = self.trainer
        per_epoch = getattr(getattr(trainer, "datamodule", None), "batches_per_epoch", None)
        limited = trainer.limit_train_batches not in (None, 1.0) or trainer.max_steps != -1
        if not isinstance(per_epoch, int) or limited or (trainer.max_epochs or 0) < 1:
            return int(trainer.estimated_stepping_batches)
        return math.ceil(per_epoch / trainer.accumulate_grad_batches) * int(trainer.max_epochs)

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        total = self._total_steps()
        warmup = int(self.warmup_fraction * total)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, partial(warmup_cosine, total_steps=total, warmup_steps=warmup)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -------------------------------------------------------------- evaluate
    def _eval_step(self, batch: dict[str, Any], names: list[str], idx: int) -> None:
        name = names[idx]
        logits, features = self.model.forward_features(self._layout(batch["image"]))
        preds = logits.argmax(dim=1)
        kept = self._pad_features.setdefault(name, [])
        if sum(f.shape[0] for f in kept) < self.pad_samples:
            kept.append(features.float().mean(dim=(2, 3)).detach().cpu())
        self.metrics[name].update(preds, batch["mask"], list(batch["group"]))
        if name not in self._examples:  # the first batch of each domain, for the grid
            k = self.image_rows
            self._examples[name] = (
                batch["image"][:k].detach().cpu(),
                batch["mask"][:k].detach().cpu(),
                preds[:k].detach().cpu(),
                [f"{i} {g}" for i, g in zip(batch["id"][:k], batch["group"][:k], strict=True)],
            )

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.val_names, dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.test_names, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val", self.val_names, gap_prefix="gap/")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test", self.test_names, gap_prefix="test/gap/")

    def _eval_epoch_end(self, split: str, names: list[str], gap_prefix: str) -> None:
        per_domain: dict[str, dict[str, float]] = {}
        logged: dict[str, float] = {}
        for name in names:
            values = self.metrics[name].compute(prefix="")
            per_domain[name] = values
            logged.update({f"{split}/{name}/{k}": v for k, v in values.items()})
            self._log_figures(split, name, self.metrics[name])
            if split == "test":
                groups = self.metrics[name].groups
                self.test_group_confusions[name] = {
                    g: m.confusion().cpu().numpy() for g, m in groups.items()
                }
            self.metrics[name].reset()
        if "sim" in per_domain and "real" in per_domain:
            gap = sim_to_real_gap(per_domain["sim"], per_domain["real"], keys=GAP_KEYS)
            logged.update({gap_prefix + k.removeprefix("gap/"): v for k, v in gap.items()})
            logged[f"{gap_prefix}proxy_a_distance"] = self._proxy_a_distance()
        self._pad_features.clear()
        # NaN (a class absent from a split) is not a number MLflow can plot
        finite = {k: float(v) for k, v in logged.items() if np.isfinite(v)}
        self.log_dict(finite, sync_dist=False)  # metric states are already synced
        self.results.update(logged)
        self._examples.clear()

    def _proxy_a_distance(self) -> float:
        """Proxy A-distance between the sim and real encoder features of this evaluation
        (0: indistinguishable, 2: separable); NaN with too few samples."""
        from adaptation.distance import proxy_a_distance

        sim, real = self._pad_features.get("sim"), self._pad_features.get("real")
        if not sim or not real:
            return float("nan")
        sim_f, real_f = torch.cat(sim), torch.cat(real)
        if min(len(sim_f), len(real_f)) < 8:
            return float("nan")
        return float(proxy_a_distance(sim_f.numpy(), real_f.numpy(), seed=0))

    # ---------------------------------------------------------------- images
    def _log_figures(self, split: str, name: str, metrics: GroupedSegmentationMetrics) -> None:
        if self.trainer is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        step = f"epoch{self.current_epoch:03d}" if split == "val" else "final"
        cm = metrics.confusion().cpu().numpy()
        self.log_image(
            confusion_matrix_image(cm, self.class_names, title=f"{split}/{name}"),
            f"{split}/{name}/confusion_{step}.png",
        )
        if name in self._examples:
            images, masks, preds, titles = self._examples[name]
            grid = prediction_grid(images, masks, preds, self.palette, self.image_rows, titles)
            self.log_image(grid, f"{split}/{name}/predictions_{step}.png")

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """Log an ``(H, W, 3) uint8`` image: to MLflow when it is the logger, else as a PNG
        under the trainer's ``default_root_dir``."""
        logger = self.logger
        experiment = getattr(logger, "experiment", None)
        run_id = getattr(logger, "run_id", None)
        if experiment is not None and run_id is not None and hasattr(experiment, "log_image"):
            experiment.log_image(run_id, image, artifact_file=artifact_file)
            return
        from PIL import Image

        path = Path(self.trainer.default_root_dir) / "images" / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # lets a later stage refuse a checkpoint of another architecture before training
        checkpoint["arch"] = getattr(self.model, "arch", type(self.model).__name__)
