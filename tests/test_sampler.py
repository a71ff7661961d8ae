"""Exact-ratio batch sampler, real subsets, DDP split, endless unlabelled sampler."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from core.config import ConfigError
from training.sampler import (
    KEY_NAMES,
    EndlessShuffleSampler,
    ExactRatioBatchSampler,
    batch_composition,
    rank_and_world_size,
    real_subset_indices,
)


def _epoch(sampler: ExactRatioBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def _counts(batch: list[int], num_sim: int) -> tuple[int, int]:
    sim = sum(i < num_sim for i in batch)
    return sim, len(batch) - sim


# --- composition ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("batch_size", "ratio", "expected"),
    [(20, 0.9, (18, 2)), (16, 0.9, (14, 2)), (8, 1.0, (8, 0)), (8, 0.0, (0, 8)), (2, 0.5, (1, 1))],
)
def test_batch_composition(batch_size: int, ratio: float, expected: tuple[int, int]) -> None:
    assert batch_composition(batch_size, ratio) == expected


@pytest.mark.parametrize(
    ("batch_size", "ratio", "num_sim", "num_real"),
    [(20, 0.9, 100, 7), (8, 1.0, 30, 0), (8, 0.0, 0, 30), (5, 0.6, 9, 9)],
)
def test_every_batch_has_the_exact_ratio(
    batch_size: int, ratio: float, num_sim: int, num_real: int
) -> None:
    n_sim = round(batch_size * ratio)
    sampler = ExactRatioBatchSampler(num_sim, num_real, batch_size, ratio, 12, seed=3)
    assert len(sampler) == 12
    for epoch in range(4):
        batches = _epoch(sampler, epoch)
        assert len(batches) == 12
        for batch in batches:
            assert _counts(batch, num_sim) == (n_sim, batch_size - n_sim)
            assert all(0 <= i < num_sim + num_real for i in batch)


def test_domains_are_shuffled_within_the_batch() -> None:
    sampler = ExactRatioBatchSampler(100, 50, 20, 0.9, 30, seed=0)
    real_positions = {pos for b in sampler for pos, i in enumerate(b) if i >= 100}
    # Real images land all over the batch, not in two fixed trailing slots.
    assert len(real_positions) > 10


# --- determinism ------------------------------------------------------------------------
def test_same_seed_and_epoch_give_same_batches_and_epochs_differ() -> None:
    a = ExactRatioBatchSampler(200, 40, 20, 0.9, 10, seed=7)
    b = ExactRatioBatchSampler(200, 40, 20, 0.9, 10, seed=7)
    first = _epoch(a, 0)
    assert first == _epoch(b, 0)
    second = _epoch(a, 1)
    assert second != first
    assert _epoch(a, 0) == first  # no hidden state: epoch 0 replays exactly
    assert list(a) == first  # iterating twice without set_epoch repeats the epoch
    assert _epoch(ExactRatioBatchSampler(200, 40, 20, 0.9, 10, seed=8), 0) != first


def test_indices_are_drawn_without_replacement_until_the_pool_is_exhausted() -> None:
    num_sim, num_real = 100, 7
    sampler = ExactRatioBatchSampler(num_sim, num_real, 20, 0.9, 10, seed=1)
    batches = list(sampler)
    sim = [i for b in batches for i in b if i < num_sim]
    real = [i - num_sim for b in batches for i in b if i >= num_sim]
    assert len(sim) == 180 and len(real) == 20
    # The first 5 batches take 90 of the 100 sim images: no repeat.
    first_five = [i for b in batches[:5] for i in b if i < num_sim]
    assert len(set(first_five)) == 90
    # Batches are consecutive slices of each domain's stream; the stream is made of passes
    # that each cover the pool exactly once.
    sim_stream, real_stream = (s.tolist() for s in sampler._streams(0))
    assert sorted(sim) == sorted(sim_stream) and sorted(real) == sorted(real_stream)
    assert sorted(sim_stream[:100]) == list(range(100))
    assert len(set(sim_stream[100:])) == 80
    for start in (0, 7):  # real pool of 7, 2 per batch
        assert sorted(real_stream[start : start + 7]) == list(range(7))
    assert len(set(real_stream[14:])) == 6


def test_sim_stream_passes_are_permutations() -> None:
    sampler = ExactRatioBatchSampler(30, 10, 10, 0.5, 9, seed=2)
    sim_stream, real_stream = (s.tolist() for s in sampler._streams(0))
    assert len(sim_stream) == 45 and len(real_stream) == 45
    assert sorted(sim_stream[:30]) == list(range(30))
    assert len(set(sim_stream[30:])) == 15
    assert sorted(real_stream[:10]) == list(range(10))
    assert sorted(real_stream[10:20]) == list(range(10))
    assert real_stream[:10] != real_stream[10:20]  # a fresh permutation each pass


def test_yield_epoch_pairs_carry_the_epoch() -> None:
    plain = ExactRatioBatchSampler(50, 20, 10, 0.8, 3, seed=0)
    tagged = ExactRatioBatchSampler(50, 20, 10, 0.8, 3, seed=0, yield_epoch=True)
    plain.set_epoch(4)
    tagged.set_epoch(4)
    for a, b in zip(plain, tagged, strict=True):
        assert b == [(4, i) for i in a]


def test_lightning_finds_set_epoch_through_dot_sampler() -> None:
    # lightning_fabric's _set_sampler_epoch looks at dataloader.batch_sampler.sampler.
    from lightning_fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    sampler = ExactRatioBatchSampler(50, 20, 10, 0.8, 3)
    loader = DataLoader(list(range(70)), batch_sampler=sampler)
    _set_sampler_epoch(loader, 5)
    assert sampler.epoch == 5


# --- DDP --------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_equal_disjoint_shares(world_size: int) -> None:
    num_sim, num_real, batches = 1000, 200, 10
    samplers = [
        ExactRatioBatchSampler(
            num_sim, num_real, 20, 0.9, batches, seed=5, rank=r, world_size=world_size
        )
        for r in range(world_size)
    ]
    for epoch in (0, 1):
        per_rank = [_epoch(s, epoch) for s in samplers]
        assert [len(s) for s in samplers] == [batches] * world_size
        assert [len(b) for b in per_rank] == [batches] * world_size
        for rank_batches in per_rank:
            assert all(_counts(b, num_sim) == (18, 2) for b in rank_batches)
        # Pools hold an epoch's draws (sim 1000 >= 180 * W, real 200 >= 20 * W): disjoint.
        union = [i for rank_batches in per_rank for b in rank_batches for i in b]
        assert len(union) == world_size * batches * 20
        assert len(set(union)) == len(union)
        # Rank r holds global batches r, r + W, ...
        glob = samplers[0].global_batches(epoch)
        assert len(glob) == world_size * batches
        for r, rank_batches in enumerate(per_rank):
            assert rank_batches == glob[r::world_size]


def test_ranks_keep_equal_lengths_when_pools_are_small() -> None:
    samplers = [ExactRatioBatchSampler(5, 3, 4, 0.5, 7, rank=r, world_size=3) for r in range(3)]
    assert [len(list(s)) for s in samplers] == [7, 7, 7]
    assert all(_counts(b, 5) == (2, 2) for s in samplers for b in s)


def test_rank_and_world_size_without_process_group() -> None:
    assert rank_and_world_size() == (0, 1)


# --- validation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sim_ratio": 1.5}, r"^sim_ratio: expected a number in \[0, 1\], got 1\.5"),
        ({"sim_ratio": -0.1}, r"^sim_ratio: expected a number in \[0, 1\]"),
        ({"sim_ratio": math.nan}, r"^sim_ratio: expected a number in \[0, 1\], got nan"),
        ({"sim_ratio": True}, r"^sim_ratio: expected a number"),
        ({"batch_size": 0}, r"^batch_size: expected a whole number >= 1, got 0"),
        ({"batches_per_epoch": 0}, r"^batches_per_epoch: expected a whole number >= 1"),
        ({"num_sim": 0}, r"^sim_ratio=0\.9 needs 18 sim images.*no sim images.*sim_train"),
        ({"num_real": 0}, r"^real_fraction leaves no real images.*real_train"),
        ({"batch_size": 4}, r"^batch_size=4 with sim_ratio=0\.9.*no real"),
        ({"batch_size": 4, "sim_ratio": 0.1}, r"^batch_size=4.*no sim"),
        ({"seed": -1}, r"^seed: expected a whole number >= 0, got -1"),
        ({"rank": 2, "world_size": 2}, r"rank"),
        ({"world_size": 0}, r"world_size"),
    ],
)
def test_sampler_validation_names_the_key(kwargs: dict, match: str) -> None:
    args = {
        "num_sim": 100,
        "num_real": 10,
        "batch_size": 20,
        "sim_ratio": 0.9,
        "batches_per_epoch": 5,
    } | kwargs
    with pytest.raises(ValueError, match=match):
        ExactRatioBatchSampler(**args)


#: What the data module of stage "finetune" passes: the keys a user would type.
FINETUNE_KEYS = {
    "sim_ratio": "stages.finetune.sim_ratio",
    "real_fraction": "stages.finetune.real_fraction",
    "batch_size": "data.loader.batch_size",
    "batches_per_epoch": "data.loader.batches_per_epoch",
    "seed": "seed",
    "sim_train": "data.datasets.sim_train",
    "real_train": "data.datasets.real_train",
}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sim_ratio": 1.5}, r"^stages\.finetune\.sim_ratio: expected a number in \[0, 1\]"),
        ({"batch_size": 0}, r"^data\.loader\.batch_size: expected a whole number >= 1"),
        ({"batches_per_epoch": 0}, r"^data\.loader\.batches_per_epoch: expected a whole"),
        ({"seed": -1}, r"^seed: expected a whole number >= 0"),
        (
            {"batch_size": 4},
            r"^data\.loader\.batch_size=4 with stages\.finetune\.sim_ratio=0\.9 gives 4 sim"
            r".*use a larger data\.loader\.batch_size or a stages\.finetune\.sim_ratio further",
        ),
        (
            {"num_sim": 0},
            r"^stages\.finetune\.sim_ratio=0\.9 needs 18 sim.*set stages\.finetune\.sim_ratio=0"
            r" for real-only training or provide data\.datasets\.sim_train$",
        ),
        (
            {"num_real": 0},
            r"^stages\.finetune\.real_fraction leaves no real images.*raise "
            r"stages\.finetune\.real_fraction, provide data\.datasets\.real_train, or set "
            r"stages\.finetune\.sim_ratio=1$",
        ),
    ],
)
def test_sampler_errors_name_the_keys_the_caller_passes(kwargs: dict, match: str) -> None:
    args = {
        "num_sim": 100,
        "num_real": 10,
        "batch_size": 20,
        "sim_ratio": 0.9,
        "batches_per_epoch": 5,
    } | kwargs
    with pytest.raises(ConfigError, match=match):
        ExactRatioBatchSampler(**args, keys=FINETUNE_KEYS)


def test_keys_reach_every_sampler_function() -> None:
    assert set(FINETUNE_KEYS) == set(KEY_NAMES)
    with pytest.raises(ConfigError, match=r"^stages\.finetune\.sim_ratio: "):
        batch_composition(20, 2.0, keys=FINETUNE_KEYS)
    with pytest.raises(ConfigError, match=r"^stages\.finetune\.real_fraction: "):
        real_subset_indices(100, 1.5, seed=0, keys=FINETUNE_KEYS)
    with pytest.raises(ConfigError, match=r"^seed: expected a whole number >= 0"):
        real_subset_indices(100, 0.5, seed=-3, keys={"seed": "seed"})
    with pytest.raises(ConfigError, match=r"^my\.seed: "):
        EndlessShuffleSampler(5, seed=-1, keys={"seed": "my.seed"})
    # Unmapped names are named as themselves; a mistyped name is the caller's bug.
    with pytest.raises(ConfigError, match=r"^batch_size: "):
        batch_composition(0, 0.5, keys={"sim_ratio": "stages.finetune.sim_ratio"})
    with pytest.raises(TypeError, match=r"keys: unknown name\(s\) \['sim_rati'\]"):
        batch_composition(20, 0.5, keys={"sim_rati": "stages.finetune.sim_ratio"})


def test_single_domain_ratios_need_only_their_domain() -> None:
    assert all(i < 10 for b in ExactRatioBatchSampler(10, 0, 4, 1.0, 3) for i in b)
    assert all(i < 10 for b in ExactRatioBatchSampler(0, 10, 4, 0.0, 3) for i in b)


# --- real subsets -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "fraction", "k"),
    [(100, 0.1, 10), (100, 0.05, 5), (7, 0.01, 1), (100, 0.0, 0), (40, 1.0, 40), (0, 0.5, 0)],
)
def test_real_subset_size(n: int, fraction: float, k: int) -> None:
    subset = real_subset_indices(n, fraction, seed=0)
    assert len(subset) == k
    assert subset == sorted(set(subset))
    assert all(0 <= i < n for i in subset)


def test_real_subsets_are_reproducible_nested_and_seeded() -> None:
    fractions = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0]
    subsets = [real_subset_indices(500, f, seed=11) for f in fractions]
    assert subsets == [real_subset_indices(500, f, seed=11) for f in fractions]
    for small, large in itertools.pairwise(subsets):
        assert set(small) < set(large)
    assert subsets[-1] == list(range(500))
    assert real_subset_indices(500, 0.1, seed=12) != subsets[2]


@pytest.mark.parametrize("fraction", [1.5, -0.1, math.nan])
def test_real_subset_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"^real_fraction: expected a number in \[0, 1\]"):
        real_subset_indices(100, fraction, seed=0)


# --- endless unlabelled sampler ---------------------------------------------------------
def test_endless_sampler_yields_fresh_permutations_forever() -> None:
    sampler = EndlessShuffleSampler(6, seed=0)
    draws = list(itertools.islice(iter(sampler), 30))
    passes = [draws[i : i + 6] for i in range(0, 30, 6)]
    assert all(sorted(p) == list(range(6)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1
    assert list(itertools.islice(iter(sampler), 30)) == draws
    sampler.set_epoch(1)
    assert list(itertools.islice(iter(sampler), 30)) != draws
    other_rank = EndlessShuffleSampler(6, seed=0, rank=1)
    assert list(itertools.islice(iter(other_rank), 30)) != draws


def test_group_balanced_draws_equalize_condition_groups():
    from collections import Counter

    from training.sampler import group_balance_weights

    groups = ["day-clear"] * 90 + ["night-fog"] * 10
    w = group_balance_weights(groups)
    assert w.sum() == pytest.approx(1.0)
    assert w[0] == pytest.approx(1 / 180) and w[-1] == pytest.approx(1 / 20)
    sampler = ExactRatioBatchSampler(
        num_sim=100,
        num_real=0,
        batch_size=20,
        sim_ratio=1.0,
        batches_per_epoch=200,
        seed=3,
        sim_weights=w,
    )
    drawn = Counter(groups[i] for batch in sampler for i in batch)
    share = drawn["night-fog"] / sum(drawn.values())
    assert 0.45 < share < 0.55  # 10 % of the frames, half of the draws
    again = ExactRatioBatchSampler(100, 0, 20, 1.0, 200, seed=3, sim_weights=w)
    assert list(again) == list(sampler)  # still deterministic by seed and epoch
    with pytest.raises(ValueError, match="sim sampling weights"):
        ExactRatioBatchSampler(100, 0, 20, 1.0, 5, sim_weights=w[:50])


def test_rare_class_sampling_favours_frames_with_rare_classes():
    from training.sampler import rare_class_weights

    # frames 0-7 hold road only; frame 8 also a person (1 % of pixels), frame 9 nothing known
    presence = np.zeros((10, 3), bool)
    presence[:9, 0] = True
    presence[8, 1] = True
    w = rare_class_weights(presence, np.array([0.99, 0.01, 0.0]), temperature=0.1)
    assert w.sum() == pytest.approx(1.0) and w[9] == 0.0
    # P(person) / P(road) = exp((0.99 - 0.01) / 0.1); class 2 is held by no frame: left out
    p_road, p_person = 1 / (1 + np.exp(9.8)), np.exp(9.8) / (1 + np.exp(9.8))
    assert w[8] == pytest.approx(p_road / 9 + p_person)
    assert w[0] == pytest.approx(p_road / 9)
    even = rare_class_weights(presence, np.array([0.99, 0.01, 0.0]), temperature=1e6)
    assert even[8] == pytest.approx(0.5 / 9 + 0.5, rel=1e-3)  # high T: classes drawn evenly


def test_the_datamodule_draws_rare_class_frames_more_often():
    import torch
    from torch.utils.data import Dataset

    from core.config import ConfigError
    from training.datamodule import SimRealDataModule, frame_class_presence

    class Frames(Dataset):
        card = {
            "class_pixel_histogram": {"road": 990, "person": 10},
            "class_names": ["road", "person"],
        }

        def __len__(self):
            return 20

        def __getitem__(self, i):
            mask = torch.zeros(4, 4, dtype=torch.long)
            if i == 3:
                mask[0, 0] = 1
            return {
                "image": torch.zeros(3, 4, 4),
                "mask": mask,
                "domain": 0,
                "group": "g",
                "id": str(i),
            }

    presence = frame_class_presence(Frames())
    assert presence.shape == (20, 255) and presence[3, 1] and not presence[2, 1]
    dm = SimRealDataModule(sim_train=Frames(), sim_ratio=1.0, batch_size=4, batches_per_epoch=50,
                           rare_class_temperature=0.05)  # fmt: skip
    draws = [i for batch in dm._batch_sampler(0, 1) for i in batch]
    assert draws.count(3) > 0.4 * len(draws)  # uniform would give 5 %
    with pytest.raises(ConfigError, match=r"data.loader.rare_class_temperature: expected"):
        SimRealDataModule(sim_train=Frames(), sim_ratio=1.0, rare_class_temperature=0)
