"""Exact sim/real batch composition, reproducible real subsets, and the DDP split.

Every training batch mixes the two domains in exactly the configured ratio (batch 20 at
``sim_ratio=0.9`` is always 18 sim + 2 real, never "about 90 % on average"), so a sweep
over ``data.sim_ratio`` or ``data.real_fraction`` changes one thing only.

The draws are pure functions of ``(seed, epoch, stream, cycle)`` -- no hidden counters --
so a run is reproducible, a resumed epoch replays the same batches, and every DDP rank can
compute the same global stream and take its own share without communication.

Example:
    >>> sampler = ExactRatioBatchSampler(num_sim=1000, num_real=50, batch_size=20,
    ...                                  sim_ratio=0.9, batches_per_epoch=100, seed=0)
    >>> batch = next(iter(sampler))
    >>> sum(i < 1000 for i in batch), sum(i >= 1000 for i in batch)
    (18, 2)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = [
    "EndlessShuffleSampler",
    "ExactRatioBatchSampler",
    "batch_composition",
    "group_balance_weights",
    "rank_and_world_size",
    "real_subset_indices",
]

# Stream tags: each kind of draw gets its own SeedSequence branch, so e.g. the real
# subset never correlates with the sim order of epoch 0.
_SIM_STREAM = 0
_REAL_STREAM = 1
_SHUFFLE_STREAM = 2
_SUBSET_STREAM = 3
_UNLABELED_STREAM = 4


def _check_seed(seed: object, key: str = "data.seed") -> int:
    # SeedSequence rejects negative entries; fail with the key instead of deep in numpy.
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"{key}: expected an integer >= 0, got {seed!r}")
    return int(seed)


def _check_unit(value: object, key: str) -> float:
    """``value`` as a float in [0, 1] (NaN and bools refused), else a ValueError naming key."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{key}: expected a number in [0, 1], got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also False for NaN
        raise ValueError(f"{key}: expected a number in [0, 1], got {value!r}")
    return value


def _check_count(value: object, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def batch_composition(batch_size: int, sim_ratio: float) -> tuple[int, int]:
    """Sim and real images per batch: ``n_sim = round(batch_size * sim_ratio)``.

    This is the single definition of the split (Python's ``round``, so an exact half goes
    to the even number: batch 10 at 0.25 -> 2 sim + 8 real); log or test against it rather
    than recomputing it.

    Raises:
        ValueError: ``data.batch_size`` < 1, ``data.sim_ratio`` outside [0, 1], or a mixed
            ratio (0 < sim_ratio < 1) that rounds one domain away (batch 4 at 0.9).

    Example:
        >>> batch_composition(20, 0.9)
        (18, 2)
    """
    batch_size = _check_count(batch_size, "data.batch_size", 1)
    sim_ratio = _check_unit(sim_ratio, "data.sim_ratio")
    # Float error in the product is harmless: 20 * 0.9 == 18.000000000000004 rounds to 18.
    n_sim = int(round(batch_size * sim_ratio))
    n_real = batch_size - n_sim
    if 0.0 < sim_ratio < 1.0 and (n_sim == 0 or n_real == 0):
        missing = "sim" if n_sim == 0 else "real"
        raise ValueError(
            f"data.batch_size={batch_size} with data.sim_ratio={sim_ratio} gives "
            f"{n_sim} sim + {n_real} real per batch, i.e. no {missing} image in any batch; "
            "use a larger data.batch_size or a sim_ratio further from 0 and 1 "
            "(or exactly 0 or 1 for a single domain)"
        )
    return n_sim, n_real


def real_subset_indices(n: int, fraction: float, seed: int) -> list[int]:
    """The labelled-real subset: ``k`` of ``n`` real images, sorted, reproducible by seed.

    ``k = max(1, round(n * fraction))`` for ``fraction > 0`` (at most ``n``), ``0`` for
    ``fraction == 0``. The subset is the first ``k`` entries of one permutation of
    ``range(n)`` fixed by ``seed``, so subsets are *nested*: with the same seed the 5 %
    subset is contained in the 10 % one, and a sweep over ``data.real_fraction`` adds
    images instead of swapping them.

    Args:
        n: number of real training images (>= 0).
        fraction: ``data.real_fraction`` in [0, 1].
        seed: ``data.seed`` (>= 0).

    Returns:
        Sorted indices into the real training dataset.

    Example:
        >>> small, large = real_subset_indices(100, 0.05, 0), real_subset_indices(100, 0.1, 0)
        >>> len(small), len(large), set(small) <= set(large)
        (5, 10, True)
    """
    n = _check_count(n, "n (number of real images)", 0)
    fraction = _check_unit(fraction, "data.real_fraction")
    seed = _check_seed(seed)
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
        batch_size: images per batch on this rank (``data.batch_size``).
        sim_ratio: fraction of each batch that is sim, in [0, 1] (``data.sim_ratio``).
        batches_per_epoch: batches per epoch on this rank (``data.batches_per_epoch``).
        seed: ``data.seed`` (>= 0).
        rank: this process's global rank.
        world_size: number of processes.
        yield_epoch: yield ``(epoch, index)`` pairs instead of plain indices, for datasets
            whose items depend on the epoch (:class:`training.augment.AugmentedDataset`).
            The epoch then travels with each index into DataLoader workers, which never see
            a ``set_epoch`` made in the main process once they are running.

    Raises:
        ValueError: naming the config key: ``data.batch_size`` < 1, ``data.sim_ratio``
            outside [0, 1], ``data.batches_per_epoch`` < 1, a mixed ratio that rounds one
            domain away, sim needed but no sim images, real needed but ``data.real_fraction``
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
    ) -> None:
        self.n_sim, self.n_real = batch_composition(batch_size, sim_ratio)
        self.batch_size = int(batch_size)
        self.sim_ratio = float(sim_ratio)
        self.batches_per_epoch = _check_count(batches_per_epoch, "data.batches_per_epoch", 1)
        self.num_sim = _check_count(num_sim, "num_sim (sim training images)", 0)
        self.num_real = _check_count(num_real, "num_real (labelled real images)", 0)
        self.seed = _check_seed(seed)
        self.world_size = _check_count(world_size, "world_size", 1)
        self.rank = _check_count(rank, "rank", 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        if self.n_sim > 0 and self.num_sim == 0:
            raise ValueError(
                f"data.sim_ratio={self.sim_ratio} needs {self.n_sim} sim images per batch, "
                "but there are no sim images (the sim training set is missing or empty); "
                "set data.sim_ratio=0 for real-only training or provide data.sim_train"
            )
        if self.n_real > 0 and self.num_real == 0:
            raise ValueError(
                f"data.real_fraction leaves no real images (0 labelled real images), but "
                f"data.sim_ratio={self.sim_ratio} needs {self.n_real} real images per batch; "
                "raise data.real_fraction, provide data.real_train, or set data.sim_ratio=1"
            )
        self.yield_epoch = bool(yield_epoch)
        self.epoch = 0
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
        self.epoch = _check_count(epoch, "epoch", 0)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All ``batches_per_epoch * world_size`` batches of an epoch, across all ranks.

        Args:
            epoch: the epoch; default the one set by :meth:`set_epoch`.

        Returns:
            Global batch ``g`` (taken by rank ``g % world_size``) as a list of indices.
        """
        epoch = self.epoch if epoch is None else _check_count(epoch, "epoch", 0)
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
        sim, real = self._streams(epoch)
        for g in range(self.rank, self._num_global, self.world_size):
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
        seed: ``data.seed`` (>= 0).
        rank: this process's global rank (>= 0).
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0) -> None:
        self.n = _check_count(n, "n (number of unlabelled images)", 1)
        self.seed = _check_seed(seed)
        self.rank = _check_count(rank, "rank", 0)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose passes :meth:`__iter__` yields."""
        self.epoch = _check_count(epoch, "epoch", 0)

    def __iter__(self) -> Iterator[int]:
        epoch, c = self.epoch, 0
        while True:
            key = [self.seed, _UNLABELED_STREAM, self.rank, epoch, c]
            yield from (int(i) for i in np.random.default_rng(key).permutation(self.n))
            c += 1
