"""T-10 sensor-noise screening: bad frames are dropped with the right reason, valid ones kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from simulation.procedural import ProceduralBackend
from training.risk.screening import (
    REASONS,
    FrameScreen,
    ScreenedDataset,
    invisible_labels,
    noise_sigma,
    screen_frames,
)

H, W = 48, 64


def scene(rng: np.random.Generator, level: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """A street-like ``(3, H, W)`` frame: sky gradient, grey road, coloured blocks, a little
    sensor noise; ``level``/``offset`` scale it toward night (dark) or fog (flat)."""
    yy, xx = np.mgrid[:H, :W] / np.array([H, W])[:, None, None]
    img = np.empty((3, H, W), np.float32)
    img[:] = np.where(yy < 0.45, 0.7 - 0.3 * yy, 0.35)  # sky over road
    img[:, int(0.75 * H) :, ::8] = 0.9  # lane marks
    img[0, 10:30, 5:20], img[2, 20:40, 40:55] = 0.8, 0.7  # a car, a building
    img = offset + level * img
    img = img + rng.normal(0, 0.01, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def night(rng: np.random.Generator) -> np.ndarray:
    """Dark but textured: the scene at 5 % brightness with lamps and headlights (a third of
    its pixels are below the underexposure level 0.02)."""
    img = scene(rng, level=0.05)
    img[:, 5:8, 10:13] = img[:, 5:8, 40:43] = 1.0  # street lamps
    img[:, 30:34, 8:12] = img[:, 30:34, 16:20] = 0.9  # headlights
    return img


def fog(rng: np.random.Generator) -> np.ndarray:
    """Low contrast: 15 % of the scene's contrast on a bright haze."""
    return scene(rng, level=0.15, offset=0.6)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_valid_frames_are_kept_including_night_and_fog(rng):
    frames = np.stack([scene(rng), night(rng), fog(rng)])
    res = screen_frames(frames)
    assert res.keep.tolist() == [True, True, True], res.reasons
    assert res.reasons == [[], [], []]
    assert res.counts == dict.fromkeys(REASONS, 0)
    # they are what they claim: dark and flat, not just ordinary frames
    lum_std = res.stats["lum_std"]
    assert lum_std[2] < 0.05 and lum_std[1] < lum_std[0]
    assert res.stats["dark_share"][1] > 0.3 and frames[1].mean() < 0.05


def test_bad_frames_are_flagged_with_the_right_reason(rng):
    grey = np.full((3, H, W), 0.4, np.float32)
    white = np.ones((3, H, W), np.float32)
    blown = scene(rng)
    blown[:, : int(0.7 * H)] = 1.0  # sun flare: 70 % saturated, texture below
    black = np.zeros((3, H, W), np.float32)
    dark = scene(rng)
    dark[:, : int(0.9 * H)] = 0.0  # 90 % black, a textured strip left
    noisy = np.clip(scene(rng) + rng.normal(0, 0.15, (3, H, W)), 0, 1).astype(np.float32)
    nan = scene(rng)
    nan[1, 3, 3] = np.nan
    out_of_range = scene(rng) * 1.5
    frames = np.stack([grey, white, blown, black, dark, noisy, nan, out_of_range, scene(rng)])
    res = FrameScreen()(frames)
    assert res.reasons[0] == ["blank"]
    assert res.reasons[1] == ["blank", "overexposed"]
    assert res.reasons[2] == ["overexposed"]
    assert res.reasons[3] == ["blank", "underexposed"]
    assert res.reasons[4] == ["underexposed"]
    assert res.reasons[5] == ["noisy"]
    assert res.reasons[6] == ["corrupt"] and res.reasons[7] == ["corrupt"]
    assert res.reasons[8] == []
    assert res.keep.tolist() == [False] * 8 + [True]
    assert res.kept_indices.tolist() == [8]
    assert res.counts == {
        "corrupt": 2,
        "blank": 3,
        "overexposed": 2,
        "underexposed": 2,
        "noisy": 1,
    }
    m = res.metrics()
    assert m["risk/T-10/dropped"] == 8.0
    assert m["risk/T-10/dropped_share"] == pytest.approx(8 / 9)
    assert m["risk/T-10/blank"] == 3.0 and m["risk/T-10/corrupt"] == 2.0
    assert set(m) == {"risk/T-10/dropped", "risk/T-10/dropped_share"} | {
        f"risk/T-10/{r}" for r in REASONS
    }
    assert np.isnan(res.stats["noise_sigma"][6])  # corrupt frames get no other measurement


def test_noise_estimate_recovers_sigma_and_ignores_edges(rng):
    planes = rng.normal(0, 0.05, (4, 128, 128))
    assert noise_sigma(planes) == pytest.approx([0.05] * 4, rel=0.05)
    # a hard edge and a ramp add no "noise" (the operator cancels linear structure)
    edge = np.zeros((64, 64))
    edge[:, 32:] = 1.0
    ramp = np.tile(np.linspace(0, 1, 64), (64, 1))
    assert noise_sigma(np.stack([edge, ramp])) == pytest.approx([0.0, 0.0], abs=1e-6)


def test_uint8_layout_list_input_and_wrong_shapes(rng):
    frames = np.stack([scene(rng), np.zeros((3, H, W), np.float32)])
    u8 = (frames * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    assert (
        screen_frames(u8).reasons
        == screen_frames(frames).reasons
        == [[], ["blank", "underexposed"]]
    )
    assert screen_frames(torch.from_numpy(frames)).keep.tolist() == [True, False]
    bad_channels, too_small = np.zeros((4, H, W), np.float32), np.zeros((3, 2, 2), np.float32)
    mixed = [frames[0], bad_channels, too_small, u8[0], scene(rng)[:, :32]]
    res = screen_frames(mixed)
    assert res.reasons[:4] == [[], ["corrupt"], ["corrupt"], []]
    assert res.keep.tolist() == [True, False, False, True, True]  # any size is fine by default
    sized = FrameScreen(expected_size=(H, W)).screen(mixed)
    assert sized.reasons[4] == ["corrupt"]
    assert FrameScreen(expected_size=(H, 10)).screen(frames).reasons == [["corrupt"]] * 2
    with pytest.raises(ValueError, match="expected a batch"):
        screen_frames(frames[0])
    with pytest.raises(ValueError, match="overexposed_share"):
        FrameScreen(overexposed_share=1.5)


def test_thresholds_are_constructor_arguments(rng):
    frame = fog(rng)[None]
    assert screen_frames(frame).keep.all()
    assert FrameScreen(blank_std=0.5).screen(frame).reasons == [["blank"]]
    assert FrameScreen(noisy_sigma=0.001).screen(frame).reasons == [["noisy"]]


def test_procedural_night_and_fog_frames_are_kept(taxonomy, randomizer_full):
    # pick the darkest and flattest conditions the sampler draws, render only those
    picked = [i for i in range(200) if randomizer_full.sample(7, i).group.startswith("night")][:4]
    picked += [i for i in range(200) if randomizer_full.sample(7, i).group.endswith("fog")][:4]
    assert len(picked) == 8
    for style in ("sim", "photo"):
        backend = ProceduralBackend(randomizer_full, taxonomy, 7, 32, 64, style=style)
        batch = backend.render(picked)
        res = screen_frames(batch.images)
        assert res.keep.all(), [
            (r["group"], why) for r, why in zip(batch.records, res.reasons, strict=True)
        ]


class Samples(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": torch.zeros(H, W, dtype=torch.long), "id": i}


def test_screened_dataset_behaves_like_a_subset_of_kept_frames(rng):
    images = [torch.from_numpy(scene(rng)) for _ in range(7)]
    images[1] = torch.zeros(3, H, W)  # lens cap
    images[4] = torch.full((3, H, W), float("nan"))
    images[5] = torch.zeros(3, H, W + 1)[:2]  # wrong channel count
    ds = ScreenedDataset(Samples(images), batch_size=3)
    assert ds.kept_indices == [0, 2, 3, 6]
    assert len(ds) == 4
    assert [ds[k]["id"] for k in range(len(ds))] == [0, 2, 3, 6]
    assert ds.result.reasons[1] == ["blank", "underexposed"]
    assert ds.result.reasons[4] == ["corrupt"] and ds.result.reasons[5] == ["corrupt"]
    assert ds.result.metrics()["risk/T-10/dropped"] == 3.0
    assert len(ds.result.keep) == 7
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    assert next(iter(loader))["id"].tolist() == [0, 2, 3, 6]
    empty = ScreenedDataset(Samples([]))
    assert len(empty) == 0 and np.isnan(empty.result.metrics()["risk/T-10/dropped_share"])


def _pole_frames(blur: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two frames with a labelled dark pole (class 4) on a bright wall (class 2); the pole
    is washed into the wall when ``blur``."""
    images = torch.full((2, 3, H, W), 0.7)
    masks = torch.full((2, H, W), 2, dtype=torch.long)
    images[:, :, 42:], masks[:, 42:] = 0.3, 0  # a road: the frame is not blank
    masks[:, 5:40, 30:32] = 4
    if not blur:
        images[:, :, 5:40, 30:32] = 0.1
    else:  # what a strong blur leaves of a 2-pixel pole: almost the wall's grey
        images[:, :, 5:40, 26:36] = 0.69
    masks[1, :42] = 2  # the second frame labels no pole
    return images, masks


def test_invisible_thin_labels_are_counted_not_dropped():
    sharp, masks = _pole_frames(blur=False)
    blurred, _ = _pole_frames(blur=True)
    assert invisible_labels(sharp, masks, {"pole": 4})["pole"].tolist() == [False, False]
    assert invisible_labels(blurred, masks, {"pole": 4})["pole"].tolist() == [True, False]

    class Labelled(Dataset):
        class_names = ["road", "sidewalk", "building", "fence", "pole"]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": blurred[i], "mask": masks[i]}

    ds = ScreenedDataset(Labelled())
    assert len(ds) == 2  # a note, never a drop
    m = ds.result.metrics(prefix="risk/T-10/real_train/")
    assert m["risk/T-10/real_train/label_not_visible"] == 1.0
    assert m["risk/T-10/real_train/label_not_visible/pole"] == 1.0
    assert m["risk/T-10/real_train/label_not_visible_share"] == 0.5
    assert m["risk/T-10/real_train/dropped"] == 0.0
