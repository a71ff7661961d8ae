"""Class weights: one rule for every stage of a comparison (issue: real-only stages used
equal weights, sim stages the sim histogram)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset

from training.stages.data import class_pixel_counts


class Labels(Dataset):
    """Frames whose masks hold ``pattern`` (class ids, 255 ignored); an optional card."""

    def __init__(self, pattern: list[int], n: int = 10, card: dict | None = None) -> None:
        self.mask = torch.tensor(pattern).view(1, -1)
        self.n, self.reads = n, 0
        if card is not None:
            self.card = card

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        self.reads += 1
        return {"mask": self.mask}


NAMES = ["road", "sky", "person"]


def test_shares_mix_the_domains_by_the_batch_ratio():
    sim = Labels([0, 0, 0], card={"class_pixel_histogram": {"road": 60, "sky": 40}})
    real = Subset(Labels([0, 2, 2, 255]), range(5))
    mix = class_pixel_counts(sim, real, 0.9, NAMES)
    np.testing.assert_allclose(mix, 0.9 * np.array([0.6, 0.4, 0]) + 0.1 * np.array([1, 0, 2]) / 3)
    assert sim.reads == 0  # the card is read, not the frames


def test_real_only_counts_its_labelled_frames_even_without_a_card():
    real = Subset(Labels([1, 2, 2, 2]), range(4))
    np.testing.assert_allclose(class_pixel_counts(None, real, 0.0, NAMES), [0, 0.25, 0.75])


def test_a_real_card_is_not_read_for_frames_the_stage_never_sees():
    base = Labels([1, 1], card={"class_pixel_histogram": {"road": 100}})
    np.testing.assert_allclose(class_pixel_counts(None, Subset(base, [0]), 0.0, NAMES), [0, 1, 0])


@pytest.mark.parametrize("frames", [3, 100])
def test_counting_reads_an_even_sample(frames):
    real = Labels([0], n=50)
    class_pixel_counts(None, real, 0.0, NAMES, frames=frames)
    assert real.reads == min(frames, 50)


def test_no_labelled_pixel_gives_uniform_counts():
    np.testing.assert_allclose(class_pixel_counts(None, Labels([255]), 0.0, NAMES), [1, 1, 1])
