"""The sim/real LightningDataModule: exact-ratio training batches, per-domain evaluation.

Datasets arrive already built (Hydra instantiates them through ``_target_``); this module
only decides which images go into which batch. Everything that can be checked is checked
at construction, so a bad setting stops the run before the first step, with a message
naming the key a user would type: ``data.loader.*``, ``data.datasets.<role>``, ``seed``,
and the stage's ``stages.<stage name>.sim_ratio`` / ``real_fraction`` /
``batches_per_epoch`` (given ``stage_name``).

Example:
    >>> dm = SimRealDataModule(sim_train=sim, sim_val=sim_val, real_train=cityscapes_train,
    ...                        real_val=cityscapes_val, sim_ratio=0.9, real_fraction=0.1,
    ...                        batch_size=20, augment=Augment(scale=(0.75, 1.25)),
    ...                        stage_name="finetune")
    >>> trainer = pl.Trainer(max_epochs=10, use_distributed_sampler=False)
    >>> trainer.fit(model, datamodule=dm)   # every batch: 18 sim + 2 real
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, default_collate

from core.config import ConfigError, check_number
from training.augment import Augment, AugmentedDataset
from training.sampler import (
    EndlessShuffleSampler,
    ExactRatioBatchSampler,
    batch_composition,
    group_balance_weights,
    rank_and_world_size,
    real_subset_indices,
)

__all__ = ["SimRealDataModule"]

SIM_DOMAIN = 0
REAL_DOMAIN = 1
#: Keys every Sample has (``mask`` only when labelled).
SAMPLE_KEYS = ("image", "domain", "group", "id")
#: Where the datasets are configured: ``data.datasets.<role>``.
DATASETS_KEY = "data.datasets"
#: Where the loader settings are configured: ``data.loader.<setting>``.
LOADER_KEY = "data.loader"


class _EmptyDataset(Dataset[dict[str, Any]]):
    """Stands in for an absent domain in the ``ConcatDataset``, so real indices always
    start at ``num_sim`` (0 here) and the sampler needs no special case."""

    def __len__(self) -> int:
        return 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        raise IndexError(index)


class _WithoutMask(Dataset[dict[str, Any]]):
    """Samples of ``dataset`` with their ``mask`` removed (labelled images used unlabelled)."""

    def __init__(self, dataset: Dataset[dict[str, Any]]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {k: v for k, v in self.dataset[index].items() if k != "mask"}


def _probe(
    dataset: object, key: str, domain: int, labelled: bool
) -> tuple[int, dict[str, Any] | None]:
    """Check ``dataset`` (config key ``key``, e.g. ``data.datasets.sim_train``) and read its
    first Sample.

    Returns ``(len(dataset), first Sample or None when empty)``. One item is read so that
    a wrong dataset (no masks, the other domain, not Samples at all) fails here rather than
    at the first collate, minutes into a run.
    """
    if not isinstance(dataset, Dataset):
        raise ConfigError(
            f"{key}: expected a torch Dataset of Samples, got {type(dataset).__name__}"
        )
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{key}: expected a map-style Dataset with a length") from None
    if n == 0:
        return 0, None
    sample = dataset[0]
    if not isinstance(sample, Mapping):
        raise ConfigError(f"{key}: items must be Sample dicts, got {type(sample).__name__}")
    missing = [k for k in SAMPLE_KEYS if k not in sample]
    if missing:
        raise ConfigError(f"{key}: Samples lack the keys {missing}; expected {list(SAMPLE_KEYS)}")
    image = sample["image"]
    if not (isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3):
        raise ConfigError(
            f"{key}: Sample 'image' must be a (3, H, W) tensor, got "
            f"{getattr(image, 'shape', type(image).__name__)}"
        )
    if labelled and "mask" not in sample:
        raise ConfigError(
            f"{key}: its Samples have no 'mask', so it is not a labelled dataset; pass "
            f"unlabelled images as {DATASETS_KEY}.real_unlabeled"
        )
    found = int(sample["domain"])
    if found != domain:
        names = {SIM_DOMAIN: "sim", REAL_DOMAIN: "real"}
        raise ConfigError(
            f"{key}: its Samples have domain {found}, expected {domain} "
            f"({names.get(domain)}); pass the dataset in the other slot, or build it with "
            f"the right domain (e.g. GeneratedDataset(..., domain={domain}))"
        )
    return n, dict(sample)


def frame_class_presence(dataset: Any, chunk: int = 256) -> np.ndarray:
    """``(N, 255)`` bool: frame ``i`` holds label ``c`` (255, ignore, left out). Generated
    sets are read shard-wise through ``get_batch``, masks only kept."""
    n = len(dataset)
    presence = np.zeros((n, 255), dtype=bool)
    for start in range(0, n, chunk):
        idx = range(start, min(n, start + chunk))
        if hasattr(dataset, "get_batch"):
            masks = dataset.get_batch(idx)[1]
        else:
            masks = np.stack([np.asarray(dataset[i]["mask"]) for i in idx])
        flat = masks.reshape(len(idx), -1).astype(np.int64)
        for row, labels in enumerate(flat):
            found = np.unique(labels)
            presence[start + row, found[found < 255]] = True
    return presence


class SimRealDataModule(pl.LightningDataModule):
    """Sim and labelled-real training data in an exact ratio, plus evaluation loaders.

    Training batches are drawn by :class:`training.sampler.ExactRatioBatchSampler` from
    ``ConcatDataset([sim_train, real_subset])``: every batch holds exactly
    ``round(batch_size * sim_ratio)`` sim images, the rest real. ``real_subset`` is the
    seeded ``real_fraction`` of ``real_train`` (nested across fractions, see
    :func:`training.sampler.real_subset_indices`).

    **Build the Trainer with** ``use_distributed_sampler=False``: the batch sampler splits
    the batches over DDP ranks itself (rank ``r`` takes global batches ``r, r + W, ...``),
    and Lightning cannot inject its own sampler into it. Evaluation loaders are then not
    split either: every rank evaluates the full sets, which costs time but keeps metrics
    exact (no sample is padded in or dropped).

    The epoch reaches the batch sampler through Lightning's ``set_epoch`` calls (see
    :attr:`ExactRatioBatchSampler.sampler`), and reaches the augmentation inside the
    indices: with ``augment`` the sampler yields ``(epoch, index)`` pairs, so workers --
    persistent ones included -- augment with the right epoch without any state to sync.

    Batches are collated with ``default_collate``: ``image`` ``(B, 3, H, W) float32``,
    ``mask`` ``(B, H, W) int64`` (255 = ignore), ``domain`` ``(B,) int64`` (0 sim, 1 real),
    ``group`` and ``id`` lists of ``B`` strings.

    Args:
        sim_train: sim training Samples (domain 0, labelled); needed when ``sim_ratio > 0``.
        sim_val: sim validation (and test) Samples.
        real_train: real training Samples (domain 1, labelled); ``real_fraction`` of it is
            used with labels.
        real_val: real validation Samples; the real test set when ``real_test`` is None.
        real_test: real test Samples.
        real_unlabeled: unlabelled real images for domain adaptation; default: all of
            ``real_train`` without masks.
        sim_ratio: fraction of each training batch that is sim, in [0, 1].
        real_fraction: fraction of ``real_train`` used with its labels, in [0, 1].
        batch_size: training images per batch per rank.
        batches_per_epoch: training batches per epoch per rank.
        val_batch_size: images per validation / test batch.
        num_workers: DataLoader worker processes (0: load in the main process).
        seed: seed (>= 0) of the real subset and of the batch draws.
        augment: training augmentation, or None.
        pin_memory: pin batches in page-locked memory (faster copies to a GPU).
        group_balanced: draw every condition group equally often (risk T-08).
        rare_class_temperature: draw sim frames by rare-class sampling
            (:func:`~training.sampler.rare_class_weights`) at this temperature, from the
            sim card's class histogram and each frame's classes; None: off.
        stage_name: the stage these data train, when built for one: errors then name
            ``stages.<stage_name>.sim_ratio`` and ``.real_fraction``, and
            ``data.loader.batches_per_epoch (or stages.<stage_name>.batches_per_epoch)``;
            None: plain ``sim_ratio`` / ``real_fraction``.

    Every other error names its config key: ``data.loader.batch_size``,
    ``data.loader.batches_per_epoch``, ``data.loader.val_batch_size``,
    ``data.loader.num_workers``, ``seed``, ``data.augment`` and ``data.datasets.<role>``.

    Raises:
        ConfigError: (a ValueError) naming the key, for any setting or dataset that cannot
            work.
    """

    def __init__(
        self,
        sim_train: Dataset | None = None,
        sim_val: Dataset | None = None,
        real_train: Dataset | None = None,
        real_val: Dataset | None = None,
        real_test: Dataset | None = None,
        real_unlabeled: Dataset | None = None,
        sim_ratio: float = 0.9,
        real_fraction: float = 0.1,
        batch_size: int = 16,
        batches_per_epoch: int = 50,
        val_batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        augment: Augment | None = None,
        pin_memory: bool = False,
        group_balanced: bool = False,
        rare_class_temperature: float | None = None,
        stage_name: str | None = None,
    ) -> None:
        super().__init__()
        if stage_name is not None and not (isinstance(stage_name, str) and stage_name):
            raise TypeError(f"stage_name: expected a non-empty string or None, got {stage_name!r}")
        self.stage_name = stage_name
        #: The config key of each setting (:data:`training.sampler.KEY_NAMES`), for the
        #: sampler's messages as well as ours.
        self.keys = self._config_keys(stage_name)
        k = self.keys
        self.group_balanced = bool(group_balanced)
        self._rcs_weights: np.ndarray | None = None
        self.rare_class_temperature = check_number(
            "data.loader.rare_class_temperature",
            rare_class_temperature,
            low=0,
            low_open=True,
            optional=True,
        )
        self.sim_ratio = float(check_number(k["sim_ratio"], sim_ratio, low=0, high=1))
        self.real_fraction = float(check_number(k["real_fraction"], real_fraction, low=0, high=1))
        self.batch_size = check_number(k["batch_size"], batch_size, low=1, integer=True)
        self.batches_per_epoch = check_number(
            k["batches_per_epoch"], batches_per_epoch, low=1, integer=True
        )
        self.val_batch_size = check_number(
            f"{LOADER_KEY}.val_batch_size", val_batch_size, low=1, integer=True
        )
        self.num_workers = check_number(
            f"{LOADER_KEY}.num_workers", num_workers, low=0, integer=True
        )
        self.seed = check_number(k["seed"], seed, low=0, integer=True)
        if augment is not None and not isinstance(augment, Augment):
            raise ConfigError(
                f"data.augment: expected a training.augment.Augment or null, "
                f"got {type(augment).__name__}"
            )
        self.augment = augment
        self.pin_memory = bool(pin_memory)
        self.n_sim, self.n_real = batch_composition(self.batch_size, self.sim_ratio, keys=self.keys)

        self.sim_train, self.sim_val = sim_train, sim_val
        self.real_train, self.real_val, self.real_test = real_train, real_val, real_test
        self.real_unlabeled = real_unlabeled
        sizes: dict[str, int] = {}
        firsts: dict[str, dict[str, Any] | None] = {}
        for role, ds, domain, labelled in (
            ("sim_train", sim_train, SIM_DOMAIN, True),
            ("sim_val", sim_val, SIM_DOMAIN, True),
            ("real_train", real_train, REAL_DOMAIN, True),
            ("real_val", real_val, REAL_DOMAIN, True),
            ("real_test", real_test, REAL_DOMAIN, True),
            ("real_unlabeled", real_unlabeled, REAL_DOMAIN, False),
        ):
            if ds is not None:
                sizes[role], firsts[role] = _probe(ds, f"{DATASETS_KEY}.{role}", domain, labelled)

        self.num_sim_train = sizes.get("sim_train", 0)
        self.num_real_train_total = sizes.get("real_train", 0)
        self.real_train_indices: list[int] = real_subset_indices(
            self.num_real_train_total, self.real_fraction, self.seed, keys=self.keys
        )
        self.num_real_labelled = len(self.real_train_indices)
        self.real_subset: Subset | None = (
            Subset(real_train, self.real_train_indices) if real_train is not None else None
        )
        self._check_training_sets(firsts.get("sim_train"), firsts.get("real_train"))
        # Fails now, not in train_dataloader(), for anything the sampler itself refuses.
        self._batch_sampler(rank=0, world_size=1)

    # -- checks ------------------------------------------------------------------------
    @staticmethod
    def _config_keys(stage_name: str | None) -> dict[str, str]:
        """The config key a user types for each setting the sampler checks
        (:data:`training.sampler.KEY_NAMES`)."""
        stage = f"stages.{stage_name}." if stage_name else ""
        batches = f"{LOADER_KEY}.batches_per_epoch"
        if stage_name:
            batches += f" (or {stage}batches_per_epoch)"
        return {
            "sim_ratio": f"{stage}sim_ratio",
            "real_fraction": f"{stage}real_fraction",
            "batch_size": f"{LOADER_KEY}.batch_size",
            "batches_per_epoch": batches,
            "seed": "seed",
            "sim_train": f"{DATASETS_KEY}.sim_train",
            "real_train": f"{DATASETS_KEY}.real_train",
        }

    def _check_training_sets(
        self, sim_first: dict[str, Any] | None, real_first: dict[str, Any] | None
    ) -> None:
        """The datasets the configured batch composition needs exist and collate together."""
        k = self.keys
        sim_ratio, real_fraction = k["sim_ratio"], k["real_fraction"]
        sim_train, real_train = k["sim_train"], k["real_train"]
        composition = (
            f"{sim_ratio}={self.sim_ratio} with {k['batch_size']}={self.batch_size} "
            f"needs {self.n_sim} sim + {self.n_real} real images per batch"
        )
        if self.n_sim > 0 and self.num_sim_train == 0:
            state = "is not set" if self.sim_train is None else "is empty"
            raise ConfigError(
                f"{sim_train} {state}, so there are no sim images, but {composition}; "
                f"provide {sim_train} or set {sim_ratio}=0 for real-only training"
            )
        if self.n_real > 0 and self.num_real_labelled == 0:
            if self.real_train is None:
                source = f"{real_train} is not set (0 real training images)"
            else:
                source = f"0 of {self.num_real_train_total} real training images"
            raise ConfigError(
                f"{real_fraction}={self.real_fraction} leaves no real images ({source}), "
                f"but {composition}; raise {real_fraction}, provide {real_train}, or "
                f"set {sim_ratio}=1 for sim-only training"
            )
        if self.n_sim > 0 and self.n_real > 0 and sim_first and real_first:
            # default_collate stacks tensors and zips dict keys: a mixed batch needs both
            # domains to have the same keys and image size, and would otherwise fail at
            # the first mixed batch instead of here.
            if set(sim_first) != set(real_first):
                raise ConfigError(
                    f"{sim_train} and {real_train} Samples have different keys "
                    f"({sorted(sim_first)} vs {sorted(real_first)}); mixed batches need the same"
                )
            sim_hw = tuple(sim_first["image"].shape[1:])
            real_hw = tuple(real_first["image"].shape[1:])
            if sim_hw != real_hw:
                raise ConfigError(
                    f"{sim_train} images are {sim_hw} (H, W) but {real_train} images are "
                    f"{real_hw}; resize the real dataset (its size argument) to match"
                )

    # -- training ----------------------------------------------------------------------
    def _batch_sampler(self, rank: int, world_size: int) -> ExactRatioBatchSampler:
        return ExactRatioBatchSampler(
            num_sim=self.num_sim_train,
            num_real=self.num_real_labelled,
            batch_size=self.batch_size,
            sim_ratio=self.sim_ratio,
            batches_per_epoch=self.batches_per_epoch,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            yield_epoch=self.augment is not None,
            **self._group_weights(),
            keys=self.keys,
            position=self._fit_position,
        )

    def _fit_position(self) -> tuple[int, int] | None:
        """``(epoch, training batches of it done)`` of the running fit when its batches
        are first drawn -- ``(e, 0)`` at an epoch's start, ``(e, k)`` resumed from a
        checkpoint saved after ``k`` batches -- or None outside a fit."""
        trainer = self.trainer
        if trainer is None or not getattr(trainer, "training", False):
            return None  # iterated outside a fit (a test, a check)
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        return int(trainer.current_epoch), done

    def _group_weights(self) -> dict[str, Any]:
        """Per-image sampling weights: condition groups balanced (risk T-08), from the
        datasets' ``groups`` lists (generated datasets have them; others count as one
        group), and/or rare-class sampling of the sim frames; their product when both."""
        out: dict[str, Any] = {}
        if self.group_balanced:

            def groups_of(ds: Any, indices: list[int] | None = None) -> list[str]:
                names = list(getattr(ds, "groups", None) or ["unknown"] * len(ds))
                return [names[i] for i in indices] if indices is not None else names

            if self.num_sim_train:
                out["sim_weights"] = group_balance_weights(groups_of(self.sim_train))
            if self.num_real_labelled:
                out["real_weights"] = group_balance_weights(
                    groups_of(self.real_train, self.real_train_indices)
                )
        if self.rare_class_temperature is not None and self.num_sim_train:
            weights = self._rare_class_weights()
            if "sim_weights" in out:
                weights = weights * out["sim_weights"]
                weights = weights / weights.sum()
            out["sim_weights"] = weights
        return out

    def _rare_class_weights(self) -> np.ndarray:
        if self._rcs_weights is None:
            from training.sampler import rare_class_weights

            presence = frame_class_presence(self.sim_train)
            card = getattr(self.sim_train, "card", None) or {}
            hist = card.get("class_pixel_histogram")
            if isinstance(hist, dict):
                names = card.get("class_names") or list(hist)
                freq = np.asarray([hist.get(n, 0) for n in names], dtype=np.float64)
            else:  # no card: the frames' own pixel counts
                freq = presence.sum(axis=0).astype(np.float64)
            c = min(len(freq), presence.shape[1])
            self._rcs_weights = rare_class_weights(
                presence[:, :c], freq[:c], self.rare_class_temperature
            )
        return self._rcs_weights

    def _rank_and_world_size(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return rank_and_world_size()
        world_size = int(trainer.world_size)
        connector = getattr(trainer, "_accelerator_connector", None)
        if world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            # Lightning would try to rebuild our batch sampler around a DistributedSampler
            # and fail with a TypeError far from the cause; say what to change instead.
            raise ValueError(
                "SimRealDataModule splits batches over ranks itself: build the Trainer with "
                "use_distributed_sampler=False"
            )
        return int(trainer.global_rank), world_size

    def train_dataset(self) -> Dataset[dict[str, Any]]:
        """``ConcatDataset([sim_train, real_subset])`` (augmented when ``augment`` is set);
        index ``i < num_sim_train`` is sim, the rest real."""
        concat = ConcatDataset(
            [
                self.sim_train if self.sim_train is not None else _EmptyDataset(),
                self.real_subset if self.real_subset is not None else _EmptyDataset(),
            ]
        )
        return AugmentedDataset(concat, self.augment) if self.augment is not None else concat

    def train_dataloader(self) -> DataLoader:
        """Exact-ratio training batches for this rank; ``len`` is ``batches_per_epoch``."""
        rank, world_size = self._rank_and_world_size()
        self.train_batch_sampler = self._batch_sampler(rank, world_size)
        return DataLoader(
            self.train_dataset(),
            batch_sampler=self.train_batch_sampler,
            num_workers=self.num_workers,
            collate_fn=default_collate,
            pin_memory=self.pin_memory,
            # Safe because no per-epoch state lives in the workers' dataset copies.
            persistent_workers=self.num_workers > 0,
        )

    # -- evaluation --------------------------------------------------------------------
    @property
    def val_names(self) -> list[str]:
        """Domains of :meth:`val_dataloader`'s loaders, in order (dataloader_idx -> name)."""
        return [n for n, ds in (("sim", self.sim_val), ("real", self.real_val)) if ds is not None]

    @property
    def test_names(self) -> list[str]:
        """Domains of :meth:`test_dataloader`'s loaders, in order."""
        return [n for n, ds in self._test_sets() if ds is not None]

    def _test_sets(self) -> list[tuple[str, Dataset | None]]:
        real = self.real_test if self.real_test is not None else self.real_val
        return [("sim", self.sim_val), ("real", real)]

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=default_collate,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> list[DataLoader]:
        """One sequential loader per domain, in the order of :attr:`val_names`."""
        sets = {"sim": self.sim_val, "real": self.real_val}
        return [self._eval_loader(sets[name]) for name in self.val_names]

    def test_dataloader(self) -> list[DataLoader]:
        """One sequential loader per domain, in the order of :attr:`test_names`: ``sim_val``
        and ``real_test`` (``real_val`` when there is no ``real_test``)."""
        return [self._eval_loader(ds) for _, ds in self._test_sets() if ds is not None]

    # -- domain adaptation -------------------------------------------------------------
    def unlabeled_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """An endless, shuffled loader of unlabelled real images (no ``mask`` key).

        Reads ``real_unlabeled``, else every ``real_train`` image with its mask dropped
        (the unlabelled pool of adaptation is all real training images, not only the
        labelled fraction). It has no length: draw from it with ``next``.

        Args:
            batch_size: images per batch; default ``batch_size`` (``data.loader.batch_size``).

        Returns:
            Batches with ``image`` ``(B, 3, H, W)``, ``domain`` ``(B,)`` (all 1), ``group``
            and ``id``.
        """
        batch_size = self.batch_size if batch_size is None else batch_size
        batch_size = check_number(
            "unlabeled_dataloader(batch_size=...)", batch_size, low=1, integer=True
        )
        source = self.real_unlabeled if self.real_unlabeled is not None else self.real_train
        if source is None or len(source) == 0:  # type: ignore[arg-type]
            unlabeled, real_train = f"{DATASETS_KEY}.real_unlabeled", self.keys["real_train"]
            raise ConfigError(
                f"{unlabeled}: no unlabelled real images ({unlabeled} is "
                f"{'empty' if self.real_unlabeled is not None else 'not set'} and "
                f"{real_train} does not stand in for it); domain adaptation needs one of them"
            )
        dataset = _WithoutMask(source)
        rank, _ = self._rank_and_world_size()
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EndlessShuffleSampler(len(dataset), seed=self.seed, rank=rank, keys=self.keys),
            num_workers=self.num_workers,
            collate_fn=default_collate,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    # -- logging -----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Flat counts and settings for logging (e.g. as MLflow params)."""

        def size(ds: Dataset | None) -> int:
            return len(ds) if ds is not None else 0  # type: ignore[arg-type]

        _, test_real = self._test_sets()[1]
        return {
            "num_sim_train": self.num_sim_train,
            "num_real_train_total": self.num_real_train_total,
            "num_real_labelled": self.num_real_labelled,
            "num_real_unlabeled": size(self.real_unlabeled)
            if self.real_unlabeled is not None
            else self.num_real_train_total,
            "real_fraction": self.real_fraction,
            "sim_ratio": self.sim_ratio,
            "batch_size": self.batch_size,
            "batch_sim": self.n_sim,
            "batch_real": self.n_real,
            "batches_per_epoch": self.batches_per_epoch,
            "num_sim_val": size(self.sim_val),
            "num_real_val": size(self.real_val),
            "num_sim_test": size(self.sim_val),
            "num_real_test": size(test_real),
            "val_names": ",".join(self.val_names),
            "test_names": ",".join(self.test_names),
            "augment": repr(self.augment) if self.augment is not None else "none",
            "seed": self.seed,
        }

    def __repr__(self) -> str:
        d = self.describe()
        return (
            f"SimRealDataModule(sim={d['num_sim_train']}, real={d['num_real_labelled']}/"
            f"{d['num_real_train_total']}, batch={d['batch_sim']}+{d['batch_real']}, "
            f"batches_per_epoch={d['batches_per_epoch']})"
        )
