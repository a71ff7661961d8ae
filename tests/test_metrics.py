"""Segmentation metrics (hand-computed), condition groups, DDP sync, sim-to-real gap, figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.figures import (
    LABEL_BAND_PX,
    TITLE_BAND_PX,
    bar_chart_image,
    confusion_matrix_image,
    normalize_confusion,
    prediction_grid,
)
from training.metrics import (
    GroupedSegmentationMetrics,
    SegmentationMetrics,
    sim_to_real_gap,
    summarize_confusion,
)

NAMES3 = ["road", "car", "sky"]

# The hand-computed example: one 2x3 image, 3 classes (0 road, 1 car, 2 sky).
TARGET = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
PRED = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
# Confusion (rows = truth, cols = prediction):
#   truth road: (0,0)->road, (0,1)->car  -> [1, 1, 0]
#   truth car:  (0,2)->car,  (1,0)->car  -> [0, 2, 0]
#   truth sky:  (1,1)->sky,  (1,2)->road -> [1, 0, 1]
CONFUSION = [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
# TP = diag = [1, 2, 1]; row sums = [2, 2, 2]; column sums = [2, 3, 1]
# FN = row - TP = [1, 0, 1]; FP = column - TP = [1, 1, 0]
EXPECTED = {
    "pixel_acc": 4 / 6,  # 1 + 2 + 1 correct of 6 labelled pixels
    "iou/road": 1 / 3,  # 1 / (1 + 1 + 1)
    "iou/car": 2 / 3,  # 2 / (2 + 1 + 0)
    "iou/sky": 1 / 2,  # 1 / (1 + 0 + 1)
    "miou": 0.5,  # (1/3 + 2/3 + 1/2) / 3 = 1.5 / 3
    "precision/road": 1 / 2,  # TP / (TP + FP) = 1 / 2
    "precision/car": 2 / 3,  # 2 / 3
    "precision/sky": 1.0,  # 1 / 1
    "macro_precision": 13 / 18,  # (1/2 + 2/3 + 1) / 3 = (9 + 12 + 18) / 54
    "recall/road": 1 / 2,  # TP / (TP + FN) = 1 / 2
    "recall/car": 1.0,  # 2 / 2
    "recall/sky": 1 / 2,  # 1 / 2
    "macro_recall": 2 / 3,  # (1/2 + 1 + 1/2) / 3
    "f1/road": 1 / 2,  # 2TP / (2TP + FP + FN) = 2 / (2 + 1 + 1)
    "f1/car": 4 / 5,  # 4 / (4 + 1 + 0)
    "f1/sky": 2 / 3,  # 2 / (2 + 0 + 1)
    "macro_f1": (1 / 2 + 4 / 5 + 2 / 3) / 3,  # = 59/90 = 0.6556
}


def assert_metrics_equal(a: dict[str, float], b: dict[str, float]) -> None:
    """Same keys, values equal to 1e-12 with NaN == NaN."""
    assert a.keys() == b.keys()
    for k in a:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], abs=1e-12), k


def test_hand_computed_example():
    m = SegmentationMetrics(3, NAMES3)
    m.update(PRED, TARGET)
    assert m.confusion().tolist() == CONFUSION
    assert m.confusion().dtype == torch.int64
    out = m.compute()
    expected_keys = {"pixel_acc", "miou", "macro_f1", "macro_precision", "macro_recall"} | {
        f"{fam}/{n}" for fam in ("iou", "f1", "precision", "recall") for n in NAMES3
    }
    assert set(out) == expected_keys
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
    assert all(isinstance(v, float) for v in out.values())


def test_ignore_index_pixels_are_excluded():
    # An extra column whose truth is 255; its (wrong) predictions must not count.
    target = torch.cat([TARGET, torch.full((1, 2, 1), 255)], dim=2)
    pred = torch.cat([PRED, torch.tensor([[[2], [0]]])], dim=2)
    m = SegmentationMetrics(3, NAMES3)
    m.update(pred, target)
    assert m.confusion().tolist() == CONFUSION
    assert m.compute()["miou"] == pytest.approx(0.5)
    assert m.compute()["pixel_acc"] == pytest.approx(4 / 6)


def test_logits_give_the_same_as_argmax_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 7, generator=g)
    target = torch.randint(0, 3, (2, 5, 7), generator=g)
    target[0, 0, :3] = 255
    a, b = SegmentationMetrics(3, NAMES3), SegmentationMetrics(3, NAMES3)
    a.update(logits, target)
    b.update(logits.argmax(dim=1), target)
    assert torch.equal(a.confusion(), b.confusion())
    assert_metrics_equal(a.compute(), b.compute())


def test_class_absent_everywhere_is_nan_and_excluded_from_means():
    names = [*NAMES3, "person"]  # class 3 never occurs in truth or prediction
    m = SegmentationMetrics(4, names)
    m.update(PRED, TARGET)
    out = m.compute()
    for fam in ("iou", "f1", "precision", "recall"):
        assert math.isnan(out[f"{fam}/person"])
    # The means are those of the 3-class example, not diluted by a 0 or poisoned by NaN.
    for key in ("miou", "macro_f1", "macro_precision", "macro_recall", "pixel_acc"):
        assert out[key] == pytest.approx(EXPECTED[key], abs=1e-12), key


def test_missed_and_false_alarm_classes_score_zero():
    # truth [road, road, car]; prediction [road, car, sky]
    m = SegmentationMetrics(3, NAMES3)
    m.update(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0, 0, 1]]]))
    out = m.compute()
    # car: in truth (1 px) and predicted once, but on a road pixel: TP 0, FP 1, FN 1
    assert out["precision/car"] == 0.0 and out["recall/car"] == 0.0 and out["iou/car"] == 0.0
    # sky: predicted once, never in truth -> recall 0/0 := 0, precision 0/1, IoU 0/1; it counts
    assert out["recall/sky"] == 0.0 and out["precision/sky"] == 0.0 and out["f1/sky"] == 0.0
    # road: TP 1, FN 1, FP 0 -> IoU 1/2; mIoU = (1/2 + 0 + 0) / 3
    assert out["iou/road"] == pytest.approx(0.5)
    assert out["miou"] == pytest.approx(1 / 6)

    # A class in truth but never predicted: precision 0 (0/0 := 0 since the class occurs).
    m = SegmentationMetrics(3, NAMES3)
    m.update(torch.tensor([[[1, 1]]]), torch.tensor([[[0, 1]]]))
    out = m.compute()
    assert out["precision/road"] == 0.0 and out["recall/road"] == 0.0
    assert math.isnan(out["iou/sky"])


def test_no_labelled_pixels_gives_nan():
    m = SegmentationMetrics(3, NAMES3)
    m.update(PRED, torch.full_like(TARGET, 255))
    out = m.compute()
    assert math.isnan(out["pixel_acc"]) and math.isnan(out["miou"])
    fresh = SegmentationMetrics(3, NAMES3).compute()  # never updated: NaN, no crash
    assert math.isnan(fresh["miou"])


def test_two_updates_equal_one_update_on_the_concatenation_and_reset():
    g = torch.Generator().manual_seed(1)
    p1, t1 = torch.randint(0, 3, (2, 2, 4, 6), generator=g)
    p2, t2 = torch.randint(0, 3, (2, 3, 4, 6), generator=g)
    t2[1] = 255
    split, whole = SegmentationMetrics(3, NAMES3), SegmentationMetrics(3, NAMES3)
    split.update(p1, t1)
    first = split.compute()  # computing in between must not disturb accumulation
    split.update(p2, t2)
    whole.update(torch.cat([p1, p2]), torch.cat([t1, t2]))
    assert torch.equal(split.confusion(), whole.confusion())
    assert_metrics_equal(split.compute(), whole.compute())
    assert split.compute() != first

    split.reset()
    assert int(split.confusion().sum()) == 0
    split.update(PRED, TARGET)
    assert split.compute()["miou"] == pytest.approx(0.5)


def test_bad_input_is_rejected_with_a_message():
    m = SegmentationMetrics(3, NAMES3)
    with pytest.raises(ValueError, match="target: labels must lie in 0..2"):
        m.update(PRED, torch.tensor([[[0, 0, 3], [1, 2, 2]]]))
    with pytest.raises(ValueError, match="preds: labels must lie"):
        m.update(torch.tensor([[[0, 1, 7], [1, 2, 0]]]), TARGET)
    with pytest.raises(ValueError, match="expected float logits"):
        m.update(torch.zeros(1, 4, 2, 3), TARGET)
    with pytest.raises(ValueError, match="one shape"):
        m.update(PRED[:, :1], TARGET)
    with pytest.raises(ValueError, match="class_names"):
        SegmentationMetrics(3, ["road", "car"])
    assert int(m.confusion().sum()) == 0  # nothing half-counted


def test_summarize_confusion_is_the_pure_core():
    out = summarize_confusion(torch.tensor(CONFUSION), NAMES3)
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key


def test_grouped_metrics_route_samples_to_their_groups():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 3, 4, 5, generator=g)
    target = torch.randint(0, 3, (3, 4, 5), generator=g)
    target[1, 0] = 255
    groups = ["day-clear", "night-rain", "day-clear"]

    grouped = GroupedSegmentationMetrics(3, NAMES3)  # lazy groups (single process)
    grouped.update(logits, target, groups)
    out = grouped.compute(prefix="val/real/")

    overall = SegmentationMetrics(3, NAMES3)
    overall.update(logits, target)
    day, night = SegmentationMetrics(3, NAMES3), SegmentationMetrics(3, NAMES3)
    day.update(logits[[0, 2]], target[[0, 2]])
    night.update(logits[[1]], target[[1]])

    # Overall keys: every macro and per-class key, prefixed.
    for k, v in overall.compute().items():
        assert out[f"val/real/{k}"] == pytest.approx(v, nan_ok=True), k
    # Per group: only pixel_acc, miou and macro_f1.
    for name, ref in (("day-clear", day.compute()), ("night-rain", night.compute())):
        for k in ("pixel_acc", "miou", "macro_f1"):
            assert out[f"val/real/{name}/{k}"] == pytest.approx(ref[k]), (name, k)
        assert f"val/real/{name}/iou/road" not in out
    assert {"val/real/miou", "val/real/day-clear/miou", "val/real/iou/road"} <= out.keys()
    assert len(out) == 5 + 4 * 3 + 2 * 3
    assert torch.equal(grouped.confusion(), overall.confusion())
    assert grouped.group_names == ["day-clear", "night-rain"]

    grouped.reset()  # lazy groups are dropped
    assert grouped.group_names == []


def test_grouped_metrics_with_fixed_groups():
    known = ["day-clear", "day-fog", "night-rain"]
    grouped = GroupedSegmentationMetrics(3, NAMES3, groups=known)
    grouped.update(PRED, TARGET, ["night-rain"])
    out = grouped.compute()
    assert out["night-rain/miou"] == pytest.approx(0.5)
    assert out["miou"] == pytest.approx(0.5)
    # Groups without labelled pixels are not reported (no NaN series in MLflow).
    assert not any(k.startswith(("day-clear/", "day-fog/")) for k in out)
    with pytest.raises(ValueError, match="unknown group 'dusk-rain'"):
        grouped.update(PRED, TARGET, ["dusk-rain"])
    with pytest.raises(ValueError, match="one per sample"):
        grouped.update(PRED, TARGET, ["day-clear", "day-fog"])
    assert grouped.compute()["pixel_acc"] == pytest.approx(4 / 6)  # rejected batches not counted
    grouped.reset()  # fixed groups are kept, emptied
    assert grouped.group_names == known
    assert "night-rain/miou" not in grouped.compute()


def _ddp_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Rank 0 sees only day-clear samples, rank 1 only night-rain ones: with the fixed
        # group list both ranks still hold (and sync) the same states.
        m = GroupedSegmentationMetrics(3, NAMES3, groups=["day-clear", "night-rain"])
        if rank == 0:
            m.update(PRED, TARGET, ["day-clear"])
        else:
            m.update(torch.tensor([[[2, 2, 2]]]), torch.tensor([[[2, 2, 1]]]), ["night-rain"])
        results[rank] = m.compute()
    finally:
        dist.destroy_process_group()


def test_compute_uses_the_state_synced_over_ddp_ranks(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
        results = dict(results)
    single = GroupedSegmentationMetrics(3, NAMES3)
    single.update(PRED, TARGET, ["day-clear"])
    single.update(torch.tensor([[[2, 2, 2]]]), torch.tensor([[[2, 2, 1]]]), ["night-rain"])
    expected = single.compute()
    assert_metrics_equal(results[0], expected)
    assert_metrics_equal(results[1], expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_matches_cpu():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3, 16, 16, generator=g)
    target = torch.randint(0, 3, (4, 16, 16), generator=g)
    cpu = GroupedSegmentationMetrics(3, NAMES3)
    gpu = GroupedSegmentationMetrics(3, NAMES3).cuda()
    groups = ["a", "b", "a", "c"]
    cpu.update(logits, target, groups)
    gpu.update(logits.cuda(), target.cuda(), groups)
    assert gpu.confusion().is_cuda
    assert_metrics_equal(cpu.compute(), gpu.compute())


def test_sim_to_real_gap():
    sim = {"miou": 0.8, "pixel_acc": 0.95, "macro_f1": 0.7, "iou/road": 0.9, "iou/sky": 0.6}
    real = {"miou": 0.5, "pixel_acc": 0.85, "macro_f1": math.nan, "iou/road": 0.7}
    real["iou/sky"] = math.nan  # e.g. no sky in the real split
    gap = sim_to_real_gap(sim, real)
    assert gap == pytest.approx({"gap/miou": 0.3, "gap/pixel_acc": 0.1, "gap/iou/road": 0.2})
    # NaN on either side or a key missing on one side is skipped, never reported as NaN.
    assert "gap/macro_f1" not in gap and "gap/iou/sky" not in gap
    assert sim_to_real_gap({"miou": 0.4}, {}) == {}
    # Sign: sim minus real, so a model better on real data has a negative gap.
    assert sim_to_real_gap({"miou": 0.4}, {"miou": 0.6})["gap/miou"] == pytest.approx(-0.2)
    assert sim_to_real_gap(sim, real, keys=("pixel_acc",), prefix="test/gap/") == pytest.approx(
        {"test/gap/pixel_acc": 0.1, "test/gap/iou/road": 0.2}
    )


def _palette() -> np.ndarray:
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[0], palette[1], palette[2] = (128, 64, 128), (0, 0, 142), (70, 130, 180)
    palette[255] = (255, 255, 0)  # must NOT be used: ignore pixels are drawn black
    return palette


def test_prediction_grid_layout_and_colours():
    n, h, w = 3, 4, 5
    images = torch.full((n, 3, h, w), 0.5)
    images[:, 0, 0, 0] = 1.0  # a red-channel marker at the top-left of each image
    targets = torch.zeros(n, h, w, dtype=torch.long)
    targets[:, 1, 2] = 2
    targets[:, 3, 4] = 255
    preds = torch.ones(n, h, w, dtype=torch.long)
    palette = _palette()

    grid = prediction_grid(images, targets, preds, palette, max_rows=2, columns=None)
    assert grid.dtype == np.uint8 and grid.shape == (2 * h, 3 * w, 3)
    for r in range(2):
        top = r * h
        assert grid[top, 0].tolist() == [255, 128, 128]  # round(0.5 * 255) = 128
        assert grid[top + 1, w + 2].tolist() == palette[2].tolist()  # truth class 2
        assert grid[top, w].tolist() == palette[0].tolist()  # truth class 0
        assert grid[top + 3, w + 4].tolist() == [0, 0, 0]  # ignore -> black
        assert (grid[top : top + h, 2 * w :] == palette[1]).all()  # prediction class 1

    titled = prediction_grid(
        images, targets, preds, palette, titles=["a/day-clear", "b", "c"], columns=None
    )
    band = TITLE_BAND_PX
    assert titled.shape == (n * (h + band), 3 * w, 3)
    assert titled[band + 1, w + 2].tolist() == palette[2].tolist()
    assert titled[(h + band) + band + 3, w + 4].tolist() == [0, 0, 0]
    assert titled[:band].max() > 200  # the caption was drawn (anti-aliased white on black)
    with pytest.raises(ValueError, match="titles"):
        prediction_grid(images, targets, preds, palette, titles=["only one"])


def test_prediction_grid_names_its_columns_by_default():
    """The logged grid says which column is the image, the truth and the prediction."""
    n, h, w = 2, 20, 60
    images = torch.zeros(n, 3, h, w)
    masks = torch.zeros(n, h, w, dtype=torch.long)
    plain = prediction_grid(images, masks, masks, _palette(), columns=None)
    labelled = prediction_grid(images, masks, masks, _palette())
    assert labelled.shape == (LABEL_BAND_PX + n * h, 3 * w, 3)
    assert (labelled[LABEL_BAND_PX:] == plain).all()  # the grid itself unchanged
    for c in range(3):  # a caption drawn over each column
        assert labelled[:LABEL_BAND_PX, c * w : (c + 1) * w].max() > 200
    with pytest.raises(ValueError, match="columns"):
        prediction_grid(images, masks, masks, _palette(), columns=["a", "b"])


def test_confusion_matrix_image_is_a_varied_rgb_image():
    names = [
        "road",
        "sidewalk",
        "building",
        "fence",
        "pole",
        "traffic_sign",
        "vegetation",
        "terrain",
        "sky",
        "person",
        "vehicle",
    ]
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 50, (11, 11)) + np.diag(rng.integers(100, 1000, 11))
    img = confusion_matrix_image(torch.as_tensor(confusion), names, title="val/real")
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] > 300 and img.shape[1] > 300
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20  # heatmap, text: not blank
    counts = confusion_matrix_image(confusion, names, normalize=None)
    assert counts.dtype == np.uint8 and counts.std() > 0

    rows = normalize_confusion(np.array([[1, 3], [0, 0]]))
    assert rows.tolist() == [[0.25, 0.75], [0.0, 0.0]]  # an empty row stays 0, not NaN


def test_bar_chart_image():
    img = bar_chart_image({"day-clear": 0.71, "night-rain": 0.42, "dusk-fog": math.nan}, "mIoU")
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 5
    gaps = bar_chart_image({"gap/miou": 0.3, "gap/iou/sky": -0.1}, "gap")
    assert gaps.dtype == np.uint8 and gaps.std() > 0
    assert bar_chart_image({}, "empty").dtype == np.uint8


def test_miou_averages_over_the_classes_the_dataset_labels():
    # 3 classes; the data never labels class 2, but the model predicts it on a class-0 pixel
    m = torch.tensor([[3, 0, 1], [0, 2, 0], [0, 0, 0]])
    every = summarize_confusion(m, ["road", "sky", "terrain"])
    assert every["miou"] == pytest.approx((0.75 + 1.0 + 0.0) / 3)
    assert "miou_all" not in every
    own = summarize_confusion(m, ["road", "sky", "terrain"], labelled=[0, 1])
    assert own["miou"] == pytest.approx((0.75 + 1.0) / 2)  # the miss still costs road
    assert own["miou_all"] == pytest.approx(every["miou"])
    assert "iou/terrain" not in own and own["iou/road"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="labelled: expected class indices in 0..2"):
        summarize_confusion(m, ["road", "sky", "terrain"], labelled=[3])
    grouped = GroupedSegmentationMetrics(3, ["road", "sky", "terrain"], labelled=[0, 1])
    grouped.update(torch.tensor([[[0, 2, 1]]]), torch.tensor([[[0, 0, 1]]]), ["unknown"])
    out = grouped.compute(prefix="test/real/")
    assert out["test/real/miou"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["test/real/unknown/miou"] == pytest.approx((0.5 + 1.0) / 2)
