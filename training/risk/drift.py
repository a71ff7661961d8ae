"""Data drift between a reference and a current sample (risk register T-02).

The register's mitigation for T-02 is drift detection with PSI and the KS test (and the
chi-square test for categorical data), with an alert. Everything here is a pure function of
numpy arrays; :func:`image_statistics` and :func:`embedding_features` turn images into the
per-frame feature table ``(N, F)`` those tests compare, and :func:`drift_report` runs every
test per feature and summarizes.

Population Stability Index. With ``B`` bins, ``r_b`` / ``c_b`` the share of the reference /
current sample in bin ``b``::

    PSI = sum_b (c_b - r_b) * ln(c_b / r_b)

Each term is >= 0 (``c - r`` and ``ln(c / r)`` have the same sign), so PSI >= 0, with 0 for
identical histograms; it is the symmetrised Kullback-Leibler divergence
``KL(c || r) + KL(r || c)``, so swapping the two samples changes it only through the bin
edges (which come from the reference). An empty bin would give ``ln 0``: shares are floored
at ``eps`` (1e-4) first, which caps one empty bin's term at about ``r * ln(r / eps)``.

Conventional reading (credit-scoring practice, e.g. Siddiqi 2006): PSI < 0.1 no significant
shift, 0.1-0.25 moderate shift, > 0.25 major shift. The register sets the operational
thresholds used here: **warn above 0.2, retraining recommended above 0.25**.

Binning: ``bins`` quantiles of the reference (deciles by default) so each reference bin holds
about ``1 / bins`` of the data; duplicate edges (a feature with ties, e.g. a share that is
often exactly 0) are merged, and the outer bins are open (``(-inf, e_1]`` and
``(e_k, inf)``) so current values outside the reference range still count. Bins are closed on
the right, ``(e_{i-1}, e_i]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats

from training.risk.screening import luminance, noise_sigma, to_nchw_float

#: Register thresholds for T-02 (``risk-matrix.md``): warn, and recommend retraining.
PSI_WARN = 0.2
PSI_RETRAIN = 0.25

#: Names of the :func:`image_statistics` columns, in order.
IMAGE_FEATURES = (
    "mean_r",
    "mean_g",
    "mean_b",
    "std_r",
    "std_g",
    "std_b",
    "lum_mean",
    "lum_std",
    "contrast",
    "saturation",
    "dark_share",
    "bright_share",
    "edge_density",
    "noise_sigma",
)


def _sample(values: Any, what: str) -> np.ndarray:
    """A finite, non-empty 1-D float64 sample."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"{what}: expected a non-empty sample, got 0 values")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: contains {int((~np.isfinite(x)).sum())} NaN/inf values")
    return x


def _counts(values: Any, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0 or not np.isfinite(x).all() or (x < 0).any():
        raise ValueError(f"{what}: expected finite non-negative counts, got {x.tolist()}")
    if x.sum() <= 0:
        raise ValueError(f"{what}: expected a positive total count, got {x.tolist()}")
    return x


def quantile_edges(reference: Any, bins: int = 10) -> np.ndarray:
    """The interior bin edges used by :func:`psi`: the ``k / bins`` quantiles of
    ``reference`` for ``k = 1 .. bins-1``, deduplicated (so possibly fewer than
    ``bins - 1``; a constant reference gives one edge, its value)."""
    if bins < 2:
        raise ValueError(f"bins: expected at least 2, got {bins}")
    ref = _sample(reference, "reference")
    return np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1]))


def psi_from_counts(ref_counts: Any, cur_counts: Any, eps: float = 1e-4) -> float:
    """PSI of two histograms over the same ``K`` bins or categories.

    Args:
        ref_counts, cur_counts: ``(K,)`` non-negative counts (or shares); each is normalized
            to sum to 1, then floored at ``eps``.
        eps: floor of a share, so an empty bin gives a large but finite term.

    Returns:
        ``sum_k (c_k - r_k) ln(c_k / r_k)`` >= 0.

    Example:
        >>> round(psi_from_counts([50, 50], [80, 20]), 4)  # 0.3 ln 1.6 + 0.3 ln 2.5
        0.4159
    """
    r = _counts(ref_counts, "ref_counts")
    c = _counts(cur_counts, "cur_counts")
    if r.shape != c.shape:
        raise ValueError(
            f"ref_counts/cur_counts: expected the same number of bins, got {r.size} and {c.size}"
        )
    r = np.maximum(r / r.sum(), eps)
    c = np.maximum(c / c.sum(), eps)
    return float(np.sum((c - r) * np.log(c / r)))


def psi(reference: Any, current: Any, bins: int = 10, eps: float = 1e-4) -> float:
    """Population Stability Index of a continuous feature (module docstring for the maths).

    Args:
        reference: ``(N,)`` values of the reference sample (e.g. sim training frames);
            the bins are its quantiles.
        current: ``(M,)`` values of the current sample (e.g. real or new frames).
        bins: number of quantile bins (fewer when the reference has ties).
        eps: share floor for empty bins.

    Returns:
        PSI >= 0; > 0.2 warns and > 0.25 recommends retraining (register T-02).
    """
    ref = _sample(reference, "reference")
    cur = _sample(current, "current")
    edges = quantile_edges(ref, bins)
    k = edges.size + 1
    # side="left" puts x in bin i with edges[i-1] < x <= edges[i]: right-closed bins.
    ref_counts = np.bincount(np.searchsorted(edges, ref, side="left"), minlength=k)
    cur_counts = np.bincount(np.searchsorted(edges, cur, side="left"), minlength=k)
    return psi_from_counts(ref_counts, cur_counts, eps)


def ks_test(reference: Any, current: Any) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``, two-sided).

    The statistic ``D = sup_x |F_ref(x) - F_cur(x)|`` in [0, 1] is a distance between the
    empirical CDFs that does not depend on binning; the p-value is that of "same
    distribution". With thousands of frames tiny shifts are significant, so read ``D`` (an
    effect size) alongside ``p``.

    Returns:
        ``(statistic, p_value)`` as floats.
    """
    res = stats.ks_2samp(_sample(reference, "reference"), _sample(current, "current"))
    return float(res.statistic), float(res.pvalue)


def chi_square(ref_counts: Any, cur_counts: Any) -> tuple[float, float, int]:
    """Pearson chi-square test of homogeneity of two categorical distributions.

    Builds the ``2 x K`` table ``O`` (row 0 = reference counts, row 1 = current counts),
    drops categories empty in both rows (they carry no information and would give zero
    expected counts), and computes ``chi2 = sum (O - E)^2 / E`` with
    ``E_ij = row_i * col_j / total`` and ``dof = K' - 1`` (``K'`` the categories left), via
    ``scipy.stats.chi2_contingency(..., correction=False)``: Yates' continuity correction
    (scipy's default when ``dof = 1``) is off so the statistic is the same Pearson sum for
    every ``K``; with the counts of pixels or frames compared here it would change little.

    Args:
        ref_counts, cur_counts: ``(K,)`` non-negative counts per category (condition
            groups, predicted-class pixel counts, ...), same category order.

    Returns:
        ``(statistic, p_value, dof)``; ``(0.0, 1.0, 0)`` when only one category is left.
    """
    r = _counts(ref_counts, "ref_counts")
    c = _counts(cur_counts, "cur_counts")
    if r.shape != c.shape:
        raise ValueError(
            f"ref_counts/cur_counts: expected the same number of categories, got {r.size} "
            f"and {c.size}"
        )
    table = np.stack([r, c])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 0.0, 1.0, 0
    res = stats.chi2_contingency(table, correction=False)
    return float(res.statistic), float(res.pvalue), int(res.dof)


def image_statistics(images: Any, chunk: int = 256) -> tuple[np.ndarray, list[str]]:
    """Per-frame photometric statistics, the feature table for image drift.

    Columns (:data:`IMAGE_FEATURES`), with ``Y`` the Rec. 709 luminance:

    - ``mean_r, mean_g, mean_b``, ``std_r, std_g, std_b``: per-channel mean and std;
    - ``lum_mean``, ``lum_std``: of ``Y``;
    - ``contrast``: ``p95(Y) - p5(Y)`` (robust to a few specular or black pixels);
    - ``saturation``: mean HSV saturation ``(max - min) / max`` (0 where ``max = 0``);
    - ``dark_share``: share of pixels with ``Y < 0.05``; ``bright_share``: ``Y > 0.95``;
    - ``edge_density``: mean gradient magnitude ``sqrt(dx^2 + dy^2)`` of ``Y`` (forward
      differences), 0 for a uniform frame, about 1.4 for a 1-pixel black/white checkerboard;
    - ``noise_sigma``: robust Immerkaer noise estimate, mean over channels
      (:func:`training.risk.screening.noise_sigma`).

    Args:
        images: ``(N, 3, H, W)`` float in [0, 1] (or ``(N, H, W, 3)`` uint8), torch or numpy,
            ``H, W >= 3``.
        chunk: frames processed together (bounds the float32 temporaries).

    Returns:
        ``(features, names)``: ``(N, 14)`` float64 and the 14 column names.
    """
    x_all = to_nchw_float(images)
    n, _, h, w = x_all.shape
    if n == 0:
        raise ValueError("images: expected at least one frame, got an empty batch")
    if h < 3 or w < 3:
        raise ValueError(f"images: expected H, W >= 3, got {x_all.shape}")
    out = np.empty((n, len(IMAGE_FEATURES)), dtype=np.float64)
    for start in range(0, n, chunk):
        x = x_all[start : start + chunk]
        b = len(x)
        flat = x.reshape(b, 3, -1)
        lum = luminance(x)
        lum_flat = lum.reshape(b, -1)
        p5, p95 = np.quantile(lum_flat, [0.05, 0.95], axis=1)
        mx, mn = x.max(axis=1), x.min(axis=1)
        sat = np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)
        dx = lum[:, :-1, 1:] - lum[:, :-1, :-1]
        dy = lum[:, 1:, :-1] - lum[:, :-1, :-1]
        cols = [
            *flat.mean(axis=2, dtype=np.float64).T,
            *flat.std(axis=2, dtype=np.float64).T,
            lum_flat.mean(axis=1, dtype=np.float64),
            lum_flat.std(axis=1, dtype=np.float64),
            p95 - p5,
            sat.reshape(b, -1).mean(axis=1, dtype=np.float64),
            (lum_flat < 0.05).mean(axis=1),
            (lum_flat > 0.95).mean(axis=1),
            np.sqrt(dx * dx + dy * dy).reshape(b, -1).mean(axis=1, dtype=np.float64),
            noise_sigma(x).mean(axis=1),
        ]
        out[start : start + b] = np.stack(cols, axis=1)
    return out, list(IMAGE_FEATURES)


@torch.no_grad()
def embedding_features(model: torch.nn.Module, images: Any, batch_size: int = 32) -> np.ndarray:
    """Global-average-pooled bottleneck features of a task model, for feature drift.

    Args:
        model: exposes ``forward_features(x) -> (logits, features)`` with features
            ``(B, F, h, w)``; run in eval mode on its own device (its mode is restored).
        images: ``(N, 3, H, W)`` float in [0, 1], torch or numpy.
        batch_size: frames per forward pass.

    Returns:
        ``(N, F)`` float64: the mean of each feature map over ``h x w``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    x_all = torch.as_tensor(images)
    if x_all.ndim != 4 or x_all.shape[1] != 3:
        raise ValueError(f"images: expected (N, 3, H, W), got {tuple(x_all.shape)}")
    if len(x_all) == 0:
        raise ValueError("images: expected at least one frame, got an empty batch")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        parts = []
        for start in range(0, len(x_all), batch_size):
            x = x_all[start : start + batch_size].to(device=device, dtype=dtype)
            _, feats = model.forward_features(x)
            if feats.ndim != 4:
                raise ValueError(
                    f"forward_features: expected features (B, F, h, w), got {tuple(feats.shape)}"
                )
            parts.append(feats.float().mean(dim=(2, 3)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(parts).double().numpy()


def drift_status(psi_value: float, warn: float = PSI_WARN, retrain: float = PSI_RETRAIN) -> str:
    """``"retrain"`` if ``psi > retrain``, ``"warn"`` if ``psi > warn``, else ``"ok"``
    (NaN -> ``"ok"``: no evidence of drift)."""
    if psi_value > retrain:
        return "retrain"
    if psi_value > warn:
        return "warn"
    return "ok"


class DriftReport(dict):
    """Result of :func:`drift_report`: a plain dict with three entries, plus :meth:`metrics`.

    - ``"features"``: ``{name: {"psi", "ks_stat", "ks_p"}}`` per continuous feature;
    - ``"categorical"``: ``{name: {"psi", "chi2", "p", "dof"}}`` per categorical variable;
    - ``"summary"``: ``psi_max``, ``psi_mean``, ``ks_stat_max``, ``drifted_share``,
      ``categorical_psi_max`` (NaN without categorical data), ``status`` (``"ok"``,
      ``"warn"`` or ``"retrain"``), ``psi_warn``, ``psi_retrain``.
    """

    def metrics(self, prefix: str = "risk/T-02/", group: str = "image") -> dict[str, float]:
        """Flat MLflow-ready floats.

        - ``<prefix>psi``: the **maximum** PSI over continuous and categorical features (one
          drifted feature is enough to act on, and it is what the status is decided on);
        - ``<prefix>psi_mean``, ``<prefix>ks_stat_max``, ``<prefix>drifted_share``
          (share of continuous features with PSI > warn);
        - ``<prefix>status``: 0 ok, 1 warn, 2 retrain;
        - ``<prefix><group>/<feature>/psi`` and ``.../ks_stat`` per continuous feature
          (``group`` names the feature table, e.g. ``image`` or ``embedding``);
        - ``<prefix>categorical/<name>/psi`` and ``.../chi2_p`` per categorical variable.
        """
        s = self["summary"]
        out = {
            f"{prefix}psi": float(s["psi_max"]),
            f"{prefix}psi_mean": float(s["psi_mean"]),
            f"{prefix}ks_stat_max": float(s["ks_stat_max"]),
            f"{prefix}drifted_share": float(s["drifted_share"]),
            f"{prefix}status": float(("ok", "warn", "retrain").index(s["status"])),
        }
        for name, f in self["features"].items():
            out[f"{prefix}{group}/{name}/psi"] = f["psi"]
            out[f"{prefix}{group}/{name}/ks_stat"] = f["ks_stat"]
        for name, c in self["categorical"].items():
            out[f"{prefix}categorical/{name}/psi"] = c["psi"]
            out[f"{prefix}categorical/{name}/chi2_p"] = c["p"]
        return out


def drift_report(
    reference: Any,
    current: Any,
    names: Sequence[str],
    categorical: Mapping[str, tuple[Any, Any]] | None = None,
    psi_warn: float = PSI_WARN,
    psi_retrain: float = PSI_RETRAIN,
    bins: int = 10,
) -> DriftReport:
    """PSI and KS per feature, PSI and chi-square per categorical variable, and a status.

    Args:
        reference: ``(N, F)`` feature table of the reference sample (e.g.
            :func:`image_statistics` of sim training frames).
        current: ``(M, F)`` the same features of the current sample.
        names: ``F`` feature names (no "/"; they become MLflow key parts).
        categorical: ``{name: (ref_counts, cur_counts)}``, e.g. the condition-group mix.
        psi_warn, psi_retrain: the register's thresholds (0.2, 0.25).
        bins: quantile bins of :func:`psi`.

    Returns:
        :class:`DriftReport`; ``status`` is decided on the maximum PSI over all continuous
        and categorical features.

    Raises:
        ValueError: tables of different widths, names that do not match, empty tables.
    """
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    names = [str(n) for n in names]
    if ref.ndim != 2 or cur.ndim != 2 or ref.shape[1] != cur.shape[1]:
        raise ValueError(
            f"reference/current: expected feature tables (N, F) and (M, F) with the same F, got "
            f"reference {ref.shape} and current {cur.shape}"
        )
    if len(names) != ref.shape[1] or len(set(names)) != len(names):
        raise ValueError(
            f"names: expected {ref.shape[1]} distinct names (one per column of reference "
            f"{ref.shape} and current {cur.shape}), got {len(names)}: {names}"
        )
    if ref.shape[0] == 0 or cur.shape[0] == 0:
        raise ValueError(
            f"reference/current: expected at least one row each, got reference {ref.shape} and "
            f"current {cur.shape}"
        )
    if not psi_retrain >= psi_warn >= 0:
        raise ValueError(
            f"psi_warn/psi_retrain: expected 0 <= warn <= retrain, got {psi_warn} and {psi_retrain}"
        )
    features: dict[str, dict[str, float]] = {}
    for j, name in enumerate(names):
        stat, p = ks_test(ref[:, j], cur[:, j])
        features[name] = {"psi": psi(ref[:, j], cur[:, j], bins), "ks_stat": stat, "ks_p": p}
    cats: dict[str, dict[str, float]] = {}
    for name, (rc, cc) in (categorical or {}).items():
        chi2, p, dof = chi_square(rc, cc)
        cats[str(name)] = {"psi": psi_from_counts(rc, cc), "chi2": chi2, "p": p, "dof": dof}
    cont = np.array([f["psi"] for f in features.values()])
    all_psi = np.concatenate([cont, [c["psi"] for c in cats.values()]])
    psi_max = float(all_psi.max()) if all_psi.size else math.nan
    summary: dict[str, Any] = {
        "psi_max": psi_max,
        "psi_mean": float(cont.mean()) if cont.size else math.nan,
        "ks_stat_max": max((f["ks_stat"] for f in features.values()), default=math.nan),
        "drifted_share": float((cont > psi_warn).mean()) if cont.size else math.nan,
        "categorical_psi_max": max((c["psi"] for c in cats.values()), default=math.nan),
        "status": drift_status(psi_max, psi_warn, psi_retrain),
        "psi_warn": psi_warn,
        "psi_retrain": psi_retrain,
    }
    return DriftReport(features=features, categorical=cats, summary=summary)
