"""Exact sim/real batch composition, reproducible real subsets, and the DDP split.

Every training batch mixes the two domains in exactly the configured ratio (batch 20 at
``sim_ratio=0.9`` is always 18 sim + 2 real, never "about 90 % on average"), so a sweep
over a stage's ``sim_ratio`` or ``real_fraction`` (``stages.<stage name>.sim_ratio``)
changes one thing only.

The draws are pure functions of ``(seed, epoch, stream, cycle)`` -- no hidden counters --
so a run is reproducible, a resumed epoch replays the same batches, and every DDP rank can
compute the same global stream and take its own share without communication.

Example:
    >>> sampler = ExactRatioBatchSampler(num_sim=1000, num_real=50, batch_size=20,
    ...                                  sim_ratio=0.9, batches_per_epoch=100, seed=0)
    >>> batch = next(iter(sampler))
    >>> sum(i < 1000 for i in batch), sum(i >= 1000 for i in batch)
    (18, 2)

Error messages name the setting behind each value. This module does not know where a
value came from, so it names each one as itself (``sim_ratio``, ``batch_size``, ...) unless
the caller passes ``keys``: a mapping from those names (:data:`KEY_NAMES`) to the config
keys a user would type, e.g. ``{"sim_ratio": "stages.finetune.sim_ratio",
"batch_size": "data.loader.batch_size"}`` (what :class:`training.datamodule.SimRealDataModule`
passes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import Sampler

from core.config import ConfigError, check_number

__all__ = [
    "KEY_NAMES",
    "EndlessShuffleSampler",
    "ExactRatioBatchSampler",
    "batch_composition",
    "group_balance_weights",
    "rank_and_world_size",
    "rare_class_weights",
    "real_subset_indices",
]

# Stream tags: each kind of draw gets its own SeedSequence branch, so e.g. the real
# subset never correlates with the sim order of epoch 0.
_SIM_STREAM = 0
_REAL_STREAM = 1
_SHUFFLE_STREAM = 2
_SUBSET_STREAM = 3
_UNLABELED_STREAM = 4


#: The names ``keys`` may map to config keys: the settings whose errors name them, and the
#: two training datasets that the "no sim / no real images" errors tell the user to provide.
KEY_NAMES: tuple[str, ...] = (
    "sim_ratio",
    "real_fraction",
    "batch_size",
    "batches_per_epoch",
    "seed",
    "sim_train",
    "real_train",
)


def _key_namer(keys: Mapping[str, str] | None) -> Callable[[str], str]:
    """``name -> keys[name]``, else ``name`` itself; a name outside :data:`KEY_NAMES` in
    ``keys`` is a caller's typo and raises TypeError rather than being ignored."""
    keys = dict(keys or {})
    unknown = sorted(set(keys) - set(KEY_NAMES))
    if unknown:
        raise TypeError(f"keys: unknown name(s) {unknown}; expected some of {list(KEY_NAMES)}")
    return lambda name: keys.get(name, name)


def batch_composition(
    batch_size: int, sim_ratio: float, *, keys: Mapping[str, str] | None = None
) -> tuple[int, int]:
    """Sim and real images per batch: ``n_sim = round(batch_size * sim_ratio)``.

    This is the single definition of the split (Python's ``round``, so an exact half goes
    to the even number: batch 10 at 0.25 -> 2 sim + 8 real); log or test against it rather
    than recomputing it.

    Args:
        batch_size: images per batch (>= 1).
        sim_ratio: fraction of each batch that is sim, in [0, 1].
        keys: config keys of ``batch_size`` and ``sim_ratio`` for the error messages (see
            the module docstring); default: those names.

    Raises:
        ConfigError: (a ValueError) naming the key: ``batch_size`` < 1, ``sim_ratio``
            outside [0, 1], or a mixed ratio (0 < sim_ratio < 1) that rounds one domain
            away (batch 4 at 0.9).

    Example:
        >>> batch_composition(20, 0.9)
        (18, 2)
    """
    key = _key_namer(keys)
    batch_size = check_number(key("batch_size"), batch_size, low=1, integer=True)
    sim_ratio = float(check_number(key("sim_ratio"), sim_ratio, low=0, high=1))
    # Float error in the product is harmless: 20 * 0.9 == 18.000000000000004 rounds to 18.
    n_sim = int(round(batch_size * sim_ratio))
    n_real = batch_size - n_sim
    if 0.0 < sim_ratio < 1.0 and (n_sim == 0 or n_real == 0):
        missing = "sim" if n_sim == 0 else "real"
        raise ConfigError(
            f"{key('batch_size')}={batch_size} with {key('sim_ratio')}={sim_ratio} gives "
            f"{n_sim} sim + {n_real} real per batch, i.e. no {missing} image in any batch; "
            f"use a larger {key('batch_size')} or a {key('sim_ratio')} further from 0 and 1 "
            "(or exactly 0 or 1 for a single domain)"
        )
    return n_sim, n_real


def real_subset_indices(
    n: int, fraction: float, seed: int, *, keys: Mapping[str, str] | None = None
) -> list[int]:
    """The labelled-real subset: ``k`` of ``n`` real images, sorted, reproducible by seed.

    ``k = max(1, round(n * fraction))`` for ``fraction > 0`` (at most ``n``), ``0`` for
    ``fraction == 0``. The subset is the first ``k`` entries of one permutation of
    ``range(n)`` fixed by ``seed``, so subsets are *nested*: with the same seed the 5 %
    subset is contained in the 10 % one, and a sweep over a stage's ``real_fraction`` adds
    images instead of swapping them.

    Args:
        n: number of real training images (>= 0).
        fraction: the stage's ``real_fraction``, in [0, 1].
        seed: the run's ``seed`` (>= 0).
        keys: config keys of ``real_fraction`` and ``seed`` for the error messages (see the
            module docstring); default: those names.

    Returns:
        Sorted indices into the real training dataset.

    Example:
        >>> small, large = real_subset_indices(100, 0.05, 0), real_subset_indices(100, 0.1, 0)
        >>> len(small), len(large), set(small) <= set(large)
        (5, 10, True)
    """
    key = _key_namer(keys)
    n = check_number("n (number of real images)", n, low=0, integer=True)
    fraction = float(check_number(key("real_fraction"), fraction, low=0, high=1))
    seed = check_number(key("seed"), seed, low=0, integer=True)
    if fraction == 0.0 or n == 0:
        return []
    k = min(n, max(1, int(round(n * fraction))))
    perm = np.random.default_rng([seed, _SUBSET_STREAM]).permutation(n)
    return sorted(int(i) for i in perm[:k])


def _check_weights(weights: np.ndarray | None, n: int, domain: str) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"{domain} sampling weights: expected {n} non-negative numbers")
    return w / w.sum()


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized default process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def group_balance_weights(groups: list[str]) -> np.ndarray:
    """Sampling weights that give every condition group the same share of draws:
    ``w_i = 1 / count(group_i)``, normalized (risk T-08's group-balanced sampling)."""
    if not groups:
        return np.empty(0)
    names, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse]
    return w / w.sum()


def rare_class_weights(
    presence: np.ndarray, frequencies: np.ndarray, temperature: float
) -> np.ndarray:
    """Rare-class sampling (DAFormer, Hoyer et al. 2022): a class ``c`` is drawn with
    ``P(c) ~ exp((1 - f_c) / T)``, then a frame holding it uniformly, so frames with rare
    classes (poles, persons, signs) come up far more often than their share.

    Args:
        presence: ``(N, C)`` bool, frame ``i`` holds class ``c``.
        frequencies: ``(C,)`` pixel share of each class (the card's histogram, normalized).
        temperature: ``T`` > 0; small: rare classes dominate (0.01 in DAFormer), large: even.

    Returns:
        ``(N,)`` per-frame probabilities ``w_i = sum_c presence[i, c] P(c) / n_c`` with
        ``n_c`` the frames holding ``c`` (classes no frame holds are left out).

    >>> rare_class_weights(np.array([[1, 0], [1, 1]], bool), np.array([0.9, 0.1]), 1.0).round(3)
    array([0.155, 0.845])
    """
    presence = np.asarray(presence, dtype=bool)
    f = np.asarray(frequencies, dtype=np.float64)
    f = f / f.sum() if f.sum() > 0 else np.full_like(f, 1.0 / len(f))
    held = presence.sum(axis=0)
    logits = np.where(held > 0, (1.0 - f) / float(temperature), -np.inf)
    p = np.exp(logits - logits[held > 0].max())
    p /= p.sum()
    w = presence @ (p / np.maximum(held, 1))
    return w / w.sum()


def _domain_stream(
    n: int, count: int, seed: int, epoch: int, stream: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """The first ``count`` draws of one domain in one epoch, ``(count,) int64`` in [0, n).

    Concatenated permutations of ``range(n)``: permutation ``c`` (the ``c``-th pass over the
    pool) depends only on ``(seed, epoch, stream, c)``, so no index repeats before the pool
    is exhausted and every rank builds the identical stream. With ``weights`` (group
    balancing) the draws are instead i.i.d. with those probabilities -- balancing rare
    groups means repeating their frames within an epoch.
    """
    if count == 0:
        return np.empty(0, dtype=np.int64)
    if weights is not None:
        rng = np.random.default_rng([seed, epoch, stream, 0])
        return rng.choice(n, size=count, replace=True, p=weights).astype(np.int64)
    cycles = math.ceil(count / n)
    perms = [np.random.default_rng([seed, epoch, stream, c]).permutation(n) for c in range(cycles)]
    return np.concatenate(perms)[:count].astype(np.int64, copy=False)


class ExactRatioBatchSampler(Sampler[list[int]]):
    """Batches of indices into ``ConcatDataset([sim, real])`` with an exact sim/real count.

    Index ``i < num_sim`` is sim image ``i``; index ``num_sim + j`` is real image ``j``.
    Every batch holds exactly ``n_sim = round(batch_size * sim_ratio)`` sim and
    ``batch_size - n_sim`` real indices, shuffled within the batch (so neither domain sits
    at a fixed position, which matters for BatchNorm-free models that slice batches too).

    Within an epoch each domain is drawn without replacement from a permutation fixed by
    ``(seed, epoch, domain)``; when a pool is exhausted the next pass uses a fresh
    permutation. (At such a pass boundary one batch can, rarely, hold the same small-pool
    image twice: the draw is over the pool, not per batch.) :meth:`set_epoch` selects the
    epoch; the same ``(seed, epoch)`` always gives the same batches.

    DDP: all ranks compute the same global stream of ``batches_per_epoch * world_size``
    batches, and rank ``r`` takes global batches ``r, r + world_size, ...``. Ranks therefore
    get disjoint images whenever each pool holds at least one epoch's draws, and every rank
    yields exactly ``batches_per_epoch`` batches (no rank waits on a collective another
    rank never reaches). Build the Trainer with ``use_distributed_sampler=False``: this
    sampler does the split itself.

    Args:
        num_sim: sim images (indices ``0 .. num_sim - 1``).
        num_real: labelled real images (indices ``num_sim .. num_sim + num_real - 1``).
        batch_size: images per batch on this rank (``data.loader.batch_size``).
        sim_ratio: fraction of each batch that is sim, in [0, 1] (the stage's
            ``sim_ratio``).
        batches_per_epoch: batches per epoch on this rank (``data.loader.batches_per_epoch``,
            or the stage's ``batches_per_epoch``).
        seed: the run's ``seed`` (>= 0).
        rank: this process's global rank.
        world_size: number of processes.
        yield_epoch: yield ``(epoch, index)`` pairs instead of plain indices, for datasets
            whose items depend on the epoch (:class:`training.augment.AugmentedDataset`).
            The epoch then travels with each index into DataLoader workers, which never see
            a ``set_epoch`` made in the main process once they are running.
        sim_weights: per-sim-image sampling probabilities (group balancing), or None.
        real_weights: per-real-image sampling probabilities, or None.
        position: ``() -> (epoch, batches done) or None``, read when an epoch's batches
            are first drawn: the fit's own position (a fit resumed from a mid-epoch
            checkpoint draws the batches after those it trained on, of the right epoch,
            even where DataLoader workers draw before the fit sets the epoch); None (or
            returning None): :meth:`set_epoch`'s epoch from its first batch.
        keys: config keys of ``batch_size``, ``sim_ratio``, ``batches_per_epoch``, ``seed``,
            ``real_fraction``, ``sim_train`` and ``real_train`` for the error messages (see
            the module docstring); default: those names.

    Raises:
        ConfigError: (a ValueError) naming the key: ``batch_size`` < 1, ``sim_ratio``
            outside [0, 1], ``batches_per_epoch`` < 1, a mixed ratio that rounds one
            domain away, sim needed but no sim images, real needed but ``real_fraction``
            leaves no real images, or a bad rank / world size.
    """

    def __init__(
        self,
        num_sim: int,
        num_real: int,
        batch_size: int,
        sim_ratio: float,
        batches_per_epoch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        yield_epoch: bool = False,
        sim_weights: np.ndarray | None = None,
        real_weights: np.ndarray | None = None,
        *,
        keys: Mapping[str, str] | None = None,
        position: Callable[[], tuple[int, int] | None] | None = None,
    ) -> None:
        key = _key_namer(keys)
        self.n_sim, self.n_real = batch_composition(batch_size, sim_ratio, keys=keys)
        self.batch_size = self.n_sim + self.n_real
        self.sim_ratio = float(sim_ratio)
        self.batches_per_epoch = check_number(
            key("batches_per_epoch"), batches_per_epoch, low=1, integer=True
        )
        self.num_sim = check_number("num_sim (sim training images)", num_sim, low=0, integer=True)
        self.num_real = check_number(
            "num_real (labelled real images)", num_real, low=0, integer=True
        )
        self.seed = check_number(key("seed"), seed, low=0, integer=True)
        self.world_size = check_number("world_size", world_size, low=1, integer=True)
        self.rank = check_number("rank", rank, low=0, integer=True)
        if self.rank >= self.world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        ratio = f"{key('sim_ratio')}={self.sim_ratio}"
        if self.n_sim > 0 and self.num_sim == 0:
            raise ConfigError(
                f"{ratio} needs {self.n_sim} sim images per batch, but there are no sim "
                "images (the sim training set is missing or empty); set "
                f"{key('sim_ratio')}=0 for real-only training or provide {key('sim_train')}"
            )
        if self.n_real > 0 and self.num_real == 0:
            raise ConfigError(
                f"{key('real_fraction')} leaves no real images (0 labelled real images), but "
                f"{ratio} needs {self.n_real} real images per batch; raise "
                f"{key('real_fraction')}, provide {key('real_train')}, or set "
                f"{key('sim_ratio')}=1"
            )
        self.yield_epoch = bool(yield_epoch)
        self.epoch = 0
        self.position = position
        self.sim_weights = _check_weights(sim_weights, self.num_sim, "sim")
        self.real_weights = _check_weights(real_weights, self.num_real, "real")

    @property
    def sampler(self) -> ExactRatioBatchSampler:
        """This sampler itself: the hook through which Lightning's epoch reaches it.

        Lightning (``lightning_fabric.utilities.data._set_sampler_epoch``) calls
        ``set_epoch`` on ``dataloader.sampler`` and on ``dataloader.batch_sampler.sampler``,
        never on the batch sampler itself; exposing ``self`` as ``.sampler`` makes its
        per-epoch call land here.
        """
        return self

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches :meth:`__iter__` yields (Lightning calls this)."""
        self.epoch = check_number("epoch", epoch, low=0, integer=True)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All ``batches_per_epoch * world_size`` batches of an epoch, across all ranks.

        Args:
            epoch: the epoch; default the one set by :meth:`set_epoch`.

        Returns:
            Global batch ``g`` (taken by rank ``g % world_size``) as a list of indices.
        """
        epoch = self.epoch if epoch is None else check_number("epoch", epoch, low=0, integer=True)
        return [self._batch(g, *self._streams(epoch), epoch) for g in range(self._num_global)]

    @property
    def _num_global(self) -> int:
        return self.batches_per_epoch * self.world_size

    def _streams(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        # Built once per epoch for the whole global stream: its size is what all ranks
        # draw together (batches * world * batch_size), small next to the images.
        total = self._num_global
        sim = _domain_stream(
            self.num_sim, total * self.n_sim, self.seed, epoch, _SIM_STREAM, self.sim_weights
        )
        real = _domain_stream(
            self.num_real, total * self.n_real, self.seed, epoch, _REAL_STREAM, self.real_weights
        )
        return sim, real

    def _batch(self, g: int, sim: np.ndarray, real: np.ndarray, epoch: int) -> list[int]:
        """Global batch ``g``: its slice of each domain stream, shuffled together."""
        batch = np.concatenate(
            [
                sim[g * self.n_sim : (g + 1) * self.n_sim],
                real[g * self.n_real : (g + 1) * self.n_real] + self.num_sim,
            ]
        )
        order = np.random.default_rng([self.seed, epoch, _SHUFFLE_STREAM, g]).permutation(
            len(batch)
        )
        return [int(i) for i in batch[order]]

    def __iter__(self) -> Iterator[list[int] | list[tuple[int, int]]]:
        epoch = self.epoch  # read once: a set_epoch during iteration must not mix epochs
        skip = 0
        where = self.position() if self.position is not None else None
        if where is not None:  # a fit's own count: a resumed fit goes on mid-epoch
            epoch, skip = int(where[0]), int(where[1])
        sim, real = self._streams(epoch)
        for g in range(self.rank + skip * self.world_size, self._num_global, self.world_size):
            batch = self._batch(g, sim, real, epoch)
            yield [(epoch, i) for i in batch] if self.yield_epoch else batch

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sim={self.n_sim}/{self.num_sim}, "
            f"real={self.n_real}/{self.num_real}, batch_size={self.batch_size}, "
            f"batches_per_epoch={self.batches_per_epoch}, seed={self.seed}, "
            f"rank={self.rank}/{self.world_size}, epoch={self.epoch})"
        )


class EndlessShuffleSampler(Sampler[int]):
    """Indices ``0 .. n - 1`` in shuffled passes, forever: the unlabelled-real stream of
    domain adaptation, which is drawn alongside the training batches rather than ending
    an epoch of its own.

    Pass ``c`` is a permutation fixed by ``(seed, rank, epoch, c)``: ranks draw different
    orders, and :meth:`set_epoch` (called by Lightning when the loader is part of the
    training loaders) starts each epoch from a fresh one instead of replaying epoch 0.

    Args:
        n: number of items (>= 1).
        seed: the run's ``seed`` (>= 0).
        rank: this process's global rank (>= 0).
        keys: config key of ``seed`` for the error message (see the module docstring);
            default: ``seed``.
    """

    def __init__(
        self, n: int, seed: int = 0, rank: int = 0, *, keys: Mapping[str, str] | None = None
    ) -> None:
        key = _key_namer(keys)
        self.n = check_number("n (number of unlabelled images)", n, low=1, integer=True)
        self.seed = check_number(key("seed"), seed, low=0, integer=True)
        self.rank = check_number("rank", rank, low=0, integer=True)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose passes :meth:`__iter__` yields."""
        self.epoch = check_number("epoch", epoch, low=0, integer=True)

    def __iter__(self) -> Iterator[int]:
        epoch, c = self.epoch, 0
        while True:
            key = [self.seed, _UNLABELED_STREAM, self.rank, epoch, c]
            yield from (int(i) for i in np.random.default_rng(key).permutation(self.n))
            c += 1
