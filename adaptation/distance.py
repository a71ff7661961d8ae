"""Proxy A-distance: how separable sim and real features are (Ben-David et al., 2007/2010).

The A-distance between two distributions bounds how much a classifier trained on one can
lose on the other. Its proxy replaces the supremum over a hypothesis class with a linear
domain classifier trained on held-in features and tested on held-out ones:

.. math:: \\hat d_A = 2 \\, (1 - 2 \\, \\epsilon)

with :math:`\\epsilon` the classifier's test error. Identical distributions give
:math:`\\epsilon \\approx 0.5` and :math:`\\hat d_A \\approx 0`; perfectly separable ones give
:math:`\\epsilon = 0` and :math:`\\hat d_A = 2`. A falling value during DANN training means
the features are becoming domain-invariant.

Example::

    d = proxy_a_distance(pooled_sim_features, pooled_real_features)
    mlflow.log_metric("gap/proxy_a_distance", d)
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike

__all__ = ["proxy_a_distance"]


def _as_matrix(features: ArrayLike | torch.Tensor, name: str) -> np.ndarray:
    """``(N, F)`` or ``(N, F, h, w)`` (globally average-pooled) -> float64 ``(N, F)``."""
    if isinstance(features, torch.Tensor):
        features = features.detach().float().cpu().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim == 4:
        x = x.mean(axis=(2, 3))
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(
            f"proxy_a_distance: {name} must be (N, F) or (N, F, h, w) with N >= 2, "
            f"got shape {x.shape}"
        )
    return x


def proxy_a_distance(
    features_src: ArrayLike | torch.Tensor,
    features_tgt: ArrayLike | torch.Tensor,
    seed: int = 0,
    test_size: float = 0.5,
) -> float:
    """Proxy A-distance ``2 (1 - 2 err)`` between two feature sets, clipped to [0, 2].

    A standardized logistic-regression domain classifier (sim 0, real 1) is fitted on a
    stratified ``1 - test_size`` share of the pooled samples and ``err`` is its error on
    the rest. Deterministic given ``seed``.

    Args:
        features_src: sim features ``(N_s, F)`` or ``(N_s, F, h, w)``, tensor or array.
        features_tgt: real features ``(N_t, F)`` or ``(N_t, F, h, w)``.
        seed: seed of the train/test split.
        test_size: held-out share in (0, 1).

    Returns:
        The proxy A-distance in [0, 2] (0: indistinguishable, 2: perfectly separable).
    """
    # Lazy: scikit-learn is only needed for this measure, not for training.
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not 0.0 < test_size < 1.0:
        raise ValueError(f"proxy_a_distance: test_size must be in (0, 1), got {test_size}")
    src = _as_matrix(features_src, "features_src")
    tgt = _as_matrix(features_tgt, "features_tgt")
    if src.shape[1] != tgt.shape[1]:
        raise ValueError(
            f"proxy_a_distance: feature widths differ, {src.shape[1]} (src) vs {tgt.shape[1]} (tgt)"
        )
    x = np.concatenate([src, tgt])
    y = np.concatenate([np.zeros(len(src)), np.ones(len(tgt))])
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    # Standardizing makes the default L2 strength mean the same for any feature scale.
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    clf.fit(x_train, y_train)
    err = float(np.mean(clf.predict(x_test) != y_test))
    # err > 0.5 is chance noise (a classifier worse than chance), hence the clip at 0.
    return float(np.clip(2.0 * (1.0 - 2.0 * err), 0.0, 2.0))
