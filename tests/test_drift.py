"""T-02 data drift: PSI, KS, chi-square, image statistics, embeddings and the report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from training.risk.drift import (
    IMAGE_FEATURES,
    chi_square,
    drift_report,
    embedding_features,
    image_statistics,
    ks_test,
    psi,
    psi_from_counts,
)

# Reference 1..10 with 5 quantile bins: np.quantile's linear interpolation puts the edges at
# 1 + 9 * (0.2, 0.4, 0.6, 0.8) = 2.8, 4.6, 6.4, 8.2, so the bins (-inf, 2.8], (2.8, 4.6],
# (4.6, 6.4], (6.4, 8.2], (8.2, inf) hold {1,2} {3,4} {5,6} {7,8} {9,10}: 0.2 each.
REF = np.arange(1.0, 11.0)
# Current: {1,1,2} {3,3,4} {5} {7} {9,20} -> shares 0.3, 0.3, 0.1, 0.1, 0.2.
CUR = np.array([1, 1, 2, 3, 3, 4, 5, 7, 9, 20], dtype=float)
# PSI = 2 * (0.3 - 0.2) ln(0.3 / 0.2) + 2 * (0.1 - 0.2) ln(0.1 / 0.2) + 0
#     = 0.2 ln 1.5 + 0.2 ln 2 = 0.2 * 0.405465 + 0.2 * 0.693147 = 0.219722
HAND_PSI = 0.2 * math.log(1.5) + 0.2 * math.log(2.0)


def naive_psi(ref: np.ndarray, cur: np.ndarray, bins: int = 10, eps: float = 1e-4) -> float:
    """A loop-by-loop PSI: edges, counts by comparison, floor, sum."""
    cuts = sorted(set(np.percentile(ref, [100.0 * k / bins for k in range(1, bins)]).tolist()))
    lows = [-math.inf, *cuts]
    highs = [*cuts, math.inf]
    total = 0.0
    for lo, hi in zip(lows, highs, strict=True):
        r = sum(1 for v in ref if lo < v <= hi) / len(ref)
        c = sum(1 for v in cur if lo < v <= hi) / len(cur)
        r, c = max(r, eps), max(c, eps)
        total += (c - r) * math.log(c / r)
    return total


def test_psi_hand_worked_example():
    assert psi(REF, CUR, bins=5) == pytest.approx(HAND_PSI, abs=1e-12)
    assert abs(HAND_PSI - 0.219722) < 1e-6
    # the same example from counts
    assert psi_from_counts([2, 2, 2, 2, 2], [3, 3, 1, 1, 2]) == pytest.approx(HAND_PSI)


def test_psi_from_counts_floors_empty_bins():
    # ref (0.5, 0.5, 0), cur (0.5, 0.25, 0.25): the empty ref bin is floored at eps
    eps = 1e-4
    expected = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.25 - eps) * math.log(0.25 / eps)
    assert psi_from_counts([2, 2, 0], [2, 1, 1], eps=eps) == pytest.approx(expected)
    assert psi_from_counts([1, 1, 0], [1, 1, 0]) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psi_matches_an_independent_implementation(seed):
    rng = np.random.default_rng(seed)
    ref = rng.gamma(2.0, size=500)
    cur = rng.gamma(2.5, size=300) + 0.1
    assert psi(ref, cur) == pytest.approx(naive_psi(ref, cur), rel=1e-12)
    # ties: a share that is often exactly 0 gives duplicate quantile edges, merged
    ref_t = np.where(rng.random(400) < 0.5, 0.0, rng.random(400))
    cur_t = np.where(rng.random(400) < 0.3, 0.0, rng.random(400))
    assert psi(ref_t, cur_t) == pytest.approx(naive_psi(ref_t, cur_t), rel=1e-12)


def test_psi_same_distribution_is_near_zero_and_a_shift_is_large():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=50_000)
    same = rng.normal(size=50_000)
    assert psi(ref, same) < 0.01
    assert psi(ref, ref) == 0.0
    shifted = rng.normal(loc=1.0, size=50_000)
    assert psi(ref, shifted) > 0.25
    # roughly symmetric: swapping changes only the binning (the reference's quantiles)
    a, b = psi(ref, shifted), psi(shifted, ref)
    assert abs(a - b) / max(a, b) < 0.25
    # monotone in the size of the shift
    values = [psi(ref, rng.normal(loc=mu, size=20_000)) for mu in (0.1, 0.3, 0.6, 1.0)]
    assert values == sorted(values)


def test_psi_current_outside_reference_range_counts_in_open_outer_bins():
    ref = np.linspace(0, 1, 1000)
    cur = np.full(100, 5.0)  # all above the reference's maximum: the last bin
    # ref shares 0.1 everywhere; cur: 1.0 in the last bin, eps elsewhere
    eps = 1e-4
    expected = 9 * (eps - 0.1) * math.log(eps / 0.1) + (1.0 - 0.1) * math.log(1.0 / 0.1)
    assert psi(ref, cur) == pytest.approx(expected, rel=1e-3)


def test_psi_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="reference: expected a non-empty"):
        psi([], [1.0])
    with pytest.raises(ValueError, match="current: contains 1 NaN"):
        psi([1.0, 2.0], [np.nan])
    with pytest.raises(ValueError, match="same number of bins"):
        psi_from_counts([1, 2], [1, 2, 3])


def test_ks_equals_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=400), rng.normal(0.3, size=250)
    expected = stats.ks_2samp(a, b)
    stat, p = ks_test(a, b)
    assert stat == pytest.approx(expected.statistic) and p == pytest.approx(expected.pvalue)
    assert ks_test(a, a) == (0.0, 1.0)


def test_chi_square_hand_computed_and_scipy():
    ref = np.array([30, 10, 0, 60])
    cur = np.array([20, 20, 0, 10])
    # the empty category is dropped: table [[30, 10, 60], [20, 20, 10]]
    # row totals 100, 50; column totals 50, 30, 70; total 150
    # expected = row * col / 150: [[33.33, 20, 46.67], [16.67, 10, 23.33]]
    obs = np.array([[30, 10, 60], [20, 20, 10]], dtype=float)
    exp = np.array([[100 * 50, 100 * 30, 100 * 70], [50 * 50, 50 * 30, 50 * 70]]) / 150
    hand = float(((obs - exp) ** 2 / exp).sum())
    # (30-33.33)^2/33.33 + (10-20)^2/20 + (60-46.67)^2/46.67 + ... = 20.0 + 0.333 + ...
    assert hand == pytest.approx(0.3333 + 5.0 + 3.8095 + 0.6667 + 10.0 + 7.6190, abs=1e-3)
    stat, p, dof = chi_square(ref, cur)
    assert stat == pytest.approx(hand)
    assert dof == 2
    assert p == pytest.approx(stats.chi2.sf(hand, 2))
    scipy_res = stats.chi2_contingency(obs, correction=False)
    assert (stat, p, dof) == pytest.approx((scipy_res.statistic, scipy_res.pvalue, scipy_res.dof))
    # same proportions -> no evidence
    assert chi_square([10, 20, 30], [20, 40, 60])[0] == pytest.approx(0.0)
    assert chi_square([5, 0], [7, 0]) == (0.0, 1.0, 0)


def test_chi_square_two_categories_has_no_yates_correction():
    obs = np.array([[40, 60], [60, 40]], dtype=float)
    exp = np.full((2, 2), 50.0)
    hand = float(((obs - exp) ** 2 / exp).sum())  # 4 * 100 / 50 = 8
    assert hand == 8.0
    assert chi_square([40, 60], [60, 40])[0] == pytest.approx(8.0)


def checkerboard(h: int = 16, w: int = 16) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.repeat(((yy + xx) % 2).astype(np.float32)[None], 3, axis=0)


def test_image_statistics_on_constructed_images():
    grey = np.full((3, 16, 16), 0.5, np.float32)
    red = np.zeros((3, 16, 16), np.float32)
    red[0] = 1.0
    feats, names = image_statistics(np.stack([grey, checkerboard(), red]))
    assert names == list(IMAGE_FEATURES) and feats.shape == (3, len(IMAGE_FEATURES))
    assert feats.dtype == np.float64
    g, c, r = (dict(zip(names, row, strict=True)) for row in feats)
    assert g["mean_r"] == pytest.approx(0.5) and g["lum_mean"] == pytest.approx(0.5)
    for key in ("std_r", "lum_std", "contrast", "edge_density", "noise_sigma", "saturation"):
        assert g[key] == pytest.approx(0.0, abs=1e-7), key
    assert g["dark_share"] == 0.0 and g["bright_share"] == 0.0
    # 1-pixel checkerboard: every forward difference is +-1 in x and y -> |grad| = sqrt(2)
    assert c["edge_density"] == pytest.approx(math.sqrt(2.0))
    assert c["lum_std"] == pytest.approx(0.5, abs=1e-6)
    assert c["contrast"] == pytest.approx(1.0)
    assert c["dark_share"] == pytest.approx(0.5) and c["bright_share"] == pytest.approx(0.5)
    assert c["saturation"] == 0.0  # grey levels only
    # pure red: saturation 1, luminance = the red weight
    assert r["saturation"] == pytest.approx(1.0)
    assert r["lum_mean"] == pytest.approx(0.2126)
    assert (r["mean_r"], r["mean_g"], r["mean_b"]) == (1.0, 0.0, 0.0)


def test_image_statistics_accepts_torch_and_uint8_and_chunks():
    rng = np.random.default_rng(0)
    x = rng.random((5, 3, 12, 20)).astype(np.float32)
    ref, _ = image_statistics(x)
    assert np.allclose(image_statistics(torch.from_numpy(x))[0], ref)
    assert np.allclose(image_statistics(x, chunk=2)[0], ref)
    u8 = (x * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.allclose(image_statistics(u8)[0], ref, atol=0.01)
    # noise estimate of pure Gaussian noise recovers its sigma
    noisy = np.clip(0.5 + rng.normal(0, 0.05, (2, 3, 64, 64)), 0, 1)
    feats, names = image_statistics(noisy)
    assert feats[:, names.index("noise_sigma")] == pytest.approx([0.05, 0.05], rel=0.08)
    with pytest.raises(ValueError, match="expected a batch"):
        image_statistics(np.zeros((3, 8, 8)))


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Conv2d(4, 2, 1)

    def forward_features(self, x):
        f = self.drop(torch.relu(self.enc(x)))
        return self.head(f), f


def test_embedding_features_pools_bottleneck_in_eval_mode():
    torch.manual_seed(0)
    model = TinyModel().train()
    x = torch.rand(5, 3, 8, 8)
    feats = embedding_features(model, x, batch_size=2)
    assert feats.shape == (5, 4) and feats.dtype == np.float64
    with torch.no_grad():
        expected = torch.relu(model.enc(x)).mean(dim=(2, 3)).double().numpy()
    # eval mode: dropout off, so the result equals the deterministic pooled features
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)
    assert model.training  # mode restored
    np.testing.assert_allclose(embedding_features(model, x.numpy()), feats, rtol=1e-6)


def test_drift_report_status_transitions_and_metric_names():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(4000, 2))
    names = ["lum_mean", "contrast"]
    ok = drift_report(ref, rng.normal(size=(4000, 2)), names)
    assert ok["summary"]["status"] == "ok" and ok["summary"]["drifted_share"] == 0.0
    # the hand-worked example: PSI 0.2197 is above the warn line, below the retrain line
    warn = drift_report(REF[:, None], CUR[:, None], ["x"], bins=5)
    assert warn["summary"]["psi_max"] == pytest.approx(HAND_PSI)
    assert warn["summary"]["status"] == "warn" and warn["summary"]["drifted_share"] == 1.0
    cur = rng.normal(size=(4000, 2))
    cur[:, 1] += 1.5  # only contrast drifts, strongly
    bad = drift_report(ref, cur, names)
    s = bad["summary"]
    assert s["status"] == "retrain" and s["drifted_share"] == 0.5
    assert s["psi_max"] == bad["features"]["contrast"]["psi"] > 0.25
    assert s["psi_mean"] == pytest.approx(
        (bad["features"]["contrast"]["psi"] + bad["features"]["lum_mean"]["psi"]) / 2
    )
    assert bad["features"]["contrast"]["ks_p"] < 1e-10
    m = bad.metrics()
    assert m["risk/T-02/psi"] == s["psi_max"]
    assert m["risk/T-02/status"] == 2.0
    assert m["risk/T-02/drifted_share"] == 0.5
    assert m["risk/T-02/ks_stat_max"] == bad["features"]["contrast"]["ks_stat"]
    assert m["risk/T-02/image/contrast/psi"] == bad["features"]["contrast"]["psi"]
    assert "risk/T-02/image/lum_mean/ks_stat" in m and "risk/T-02/psi_mean" in m
    assert all(isinstance(v, float) for v in m.values())
    assert set(ok.metrics(prefix="p/", group="embedding")) >= {"p/psi", "p/embedding/contrast/psi"}


def test_drift_report_categorical_decides_status_too():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(2000, 1))
    rep = drift_report(
        ref,
        rng.normal(size=(2000, 1)),
        ["lum_mean"],
        categorical={"group": ([50, 50], [80, 20])},  # PSI 0.4159
    )
    c = rep["categorical"]["group"]
    assert c["psi"] == pytest.approx(0.3 * math.log(1.6) + 0.3 * math.log(2.5))
    assert c["dof"] == 1 and c["p"] < 1e-4
    assert rep["summary"]["status"] == "retrain"
    assert rep["summary"]["drifted_share"] == 0.0  # continuous features only
    assert rep.metrics()["risk/T-02/categorical/group/psi"] == c["psi"]


def test_drift_report_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"reference \(10, 2\) and current \(10, 3\)"):
        drift_report(np.zeros((10, 2)), np.zeros((10, 3)), ["a", "b"])
    with pytest.raises(ValueError, match=r"expected 2 distinct names"):
        drift_report(np.zeros((10, 2)), np.zeros((10, 2)), ["a"])
    with pytest.raises(ValueError, match="at least one row"):
        drift_report(np.zeros((0, 2)), np.zeros((10, 2)), ["a", "b"])
