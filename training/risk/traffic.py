"""The T-01 A/B on traffic: a share of the incoming frames to the challenger, the rest to
the champion, each arm scored by the model it was routed to (``scripts/monitor.py
action=ab``).

``risk-matrix.md`` T-01: run the new model beside the old one and "test the new model on
10 % of the traffic". :meth:`~training.risk.registry.ModelRegistry.compare` scores both
models on the *same* validation images (paired); here every frame is seen by one model
only, as in serving, so the comparison is between two *different* samples of frames:

- :func:`split_traffic`: a seeded permutation of the ``N`` frames; its first
  :func:`challenger_count` frames go to the challenger, the rest to the champion;
- :func:`score_frames`: one score per routed frame (mIoU or pixel accuracy,
  :func:`~training.risk.registry.per_image_scores`), labelled frames needed;
- :func:`ab_result`: per-arm mean with a Student-t interval, and the difference
  (challenger - champion) with Welch's two-sample interval;
- :func:`recommend`: ``promote`` / ``keep_champion`` / ``reject_challenger``;
- :func:`record_ab` and :func:`apply_ab`: the result as ``ab.*`` tags on the challenger's
  model version and a JSON report; acting on it only when asked.

Why Welch and not a bootstrap: the challenger's arm is small by design (10 % of 100 frames
is 10), and the percentile bootstrap under-covers on small samples while Welch's t with
Satterthwaite's degrees of freedom does not assume equal spreads and stays close to its
nominal level on skewed, bounded [0, 1] scores. 2000 simulated A/Bs a case, beta-distributed
per-frame scores, 95 % intervals (2-core Xeon CPU, 2026-12-01): Welch covered the true
difference 94.8 % (90 vs 10 frames, Beta(2, 3)), 93.3 % (45 vs 5), 91.8 % (90 vs 10, the
skewed Beta(0.5, 2)); the two-sample percentile bootstrap 91.2 %, 86.7 % and 88.9 %. The
interval needs no seed: the seed only decides which frames each model sees.

What the recommendations mean (the champion is what serves the remaining traffic):

- ``promote``: the challenger beats the champion by more than ``margin`` with the stated
  confidence (the interval's lower bound is above ``margin``, the registry's own rule for a
  win): the challenger becomes the champion (:meth:`ModelRegistry.promote`);
- ``reject_challenger``: the challenger is worse (the interval's upper bound is below 0):
  the challenger is pulled off its share of the traffic (its ``challenger`` alias is
  removed, the version is tagged ``decision=rejected``); the champion, which this test
  says nothing against, keeps serving all frames. This is the A/B's "rollback": the
  *candidate* is rolled back; ``action=rollback`` (the champion back to the previous
  champion) is a different decision, for a champion found bad on its own;
- ``keep_champion``: neither: the champion stays, the challenger keeps its share, and more
  frames are needed to decide (a repeated test on new frames, not on the same ones).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import numpy as np

from core.config import ConfigError, check_number

PROMOTE = "promote"
KEEP_CHAMPION = "keep_champion"
REJECT_CHALLENGER = "reject_challenger"
RECOMMENDATIONS = (PROMOTE, KEEP_CHAMPION, REJECT_CHALLENGER)
#: Per-frame scores :func:`score_frames` computes (higher is better, in [0, 1]).
METRICS = ("miou", "pixel_acc")
#: Frames an arm needs for an interval (a sample variance).
MIN_FRAMES = 2


# --------------------------------------------------------------------------- config
def check_traffic(
    share: Any,
    seed: Any,
    confidence: Any = None,
    margin: Any = None,
    metric: Any = None,
    apply: Any = False,
    prefix: str = "traffic",
) -> None:
    """Raise :class:`~core.config.ConfigError` naming ``<prefix>.<key>`` for a value the
    A/B cannot run with: ``share`` in (0, 1), ``seed`` a whole number >= 0, ``confidence``
    in (0, 1), ``margin`` >= 0, ``metric`` one of :data:`METRICS` (the last three may be
    None: not decided yet), ``apply`` a boolean."""
    check_number(f"{prefix}.share", share, low=0, high=1, low_open=True, high_open=True)
    check_number(f"{prefix}.seed", seed, low=0, integer=True)
    check_number(
        f"{prefix}.confidence",
        confidence,
        low=0,
        high=1,
        low_open=True,
        high_open=True,
        optional=True,
    )
    check_number(f"{prefix}.margin", margin, low=0, optional=True)
    if metric is not None and metric not in METRICS:
        raise ConfigError(f"{prefix}.metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    if not isinstance(apply, bool):
        raise ConfigError(f"{prefix}.apply: expected true or false, got {apply!r}")


# --------------------------------------------------------------------------- the split
def challenger_count(n: int, share: float) -> int:
    """Frames of ``n`` routed to the challenger: ``round(share * n)``, halves rounded up.

    The product is taken on the decimal value of ``share`` as written (``repr``), so binary
    floating point never moves a frame: ``0.1`` of 25 frames is 2.5 -> 3, ``0.3`` of 5 is
    1.5 -> 2, ``0.1`` of 24 is 2.4 -> 2. It may be 0 or ``n`` for tiny ``n``
    (:func:`check_arms` refuses an arm too small to test).
    """
    check_number("n", n, low=0, integer=True)
    check_number("share", share, low=0, high=1, low_open=True, high_open=True)
    exact = Decimal(repr(float(share))) * int(n)
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


@dataclass(frozen=True)
class TrafficSplit:
    """Which of ``n`` frames each model sees: sorted, disjoint index arrays covering
    ``range(n)``; ``challenger.size == challenger_count(n, share)``."""

    n: int
    share: float
    seed: int
    challenger: np.ndarray
    champion: np.ndarray


def split_traffic(n: int, share: float, seed: int = 0) -> TrafficSplit:
    """Route ``challenger_count(n, share)`` of ``n`` frames to the challenger, the rest to
    the champion, by a seeded permutation (numpy ``default_rng(seed).permutation(n)``: its
    first frames go to the challenger). The same ``(n, share, seed)`` gives the same split;
    for one ``(n, seed)`` a larger share only adds frames to the challenger's arm."""
    seed = check_number("seed", seed, low=0, integer=True)
    k = challenger_count(n, share)
    order = np.random.default_rng(seed).permutation(int(n))
    return TrafficSplit(
        n=int(n),
        share=float(share),
        seed=seed,
        challenger=np.sort(order[:k]),
        champion=np.sort(order[k:]),
    )


def check_arms(split: TrafficSplit, share_key: str = "traffic.share", data_key: str = "") -> None:
    """A :class:`~core.config.ConfigError` naming ``share_key`` (and ``data_key``, the
    frames' folder) when an arm has fewer than :data:`MIN_FRAMES` frames to test."""
    arms = {"challenger": split.challenger.size, "champion": split.champion.size}
    small = {arm: k for arm, k in arms.items() if k < MIN_FRAMES}
    if small:
        where = f" of {data_key}" if data_key else ""
        raise ConfigError(
            f"{share_key}: {split.share} of the {split.n} frames{where} routes "
            f"{arms['challenger']} to the challenger and {arms['champion']} to the champion; "
            f"each arm needs at least {MIN_FRAMES} frames for an interval: choose another "
            "share or more frames"
        )


# --------------------------------------------------------------------------- statistics
def mean_interval(scores: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the Student-t interval of the mean of ``(n,)`` finite scores
    (``n >= 2``): ``mean -+ t_{n-1} * sd / sqrt(n)``."""
    from scipy import stats

    x = _finite(scores, "scores")
    mean = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(x.size))
    half = float(stats.t.ppf((1 + confidence) / 2, x.size - 1)) * se if se > 0 else 0.0
    return mean, mean - half, mean + half


def welch_interval(
    champion_scores: np.ndarray, challenger_scores: np.ndarray, confidence: float = 0.95
) -> tuple[float, float, float, float | None]:
    """``(diff, low, high, df)`` of ``diff = mean(challenger) - mean(champion)`` over two
    independent samples (``(n_a,)``, ``(n_b,)``, each ``>= 2`` finite scores): Welch's
    interval ``diff -+ t_df * sqrt(s_a^2/n_a + s_b^2/n_b)`` with Satterthwaite's ``df``
    (None when both samples have no spread: the interval is the point)."""
    from scipy import stats

    a = _finite(champion_scores, "champion_scores")
    b = _finite(challenger_scores, "challenger_scores")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    diff = float(b.mean() - a.mean())
    if va + vb == 0:
        return diff, diff, diff, None
    df = float((va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1)))
    half = float(stats.t.ppf((1 + confidence) / 2, df) * math.sqrt(va + vb))
    return diff, diff - half, diff + half, df


def _finite(scores: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    if x.size < MIN_FRAMES:
        raise ValueError(f"{name}: need at least {MIN_FRAMES} scores, got {x.size}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: expected finite values (drop unscored frames first)")
    return x


def recommend(ci_low: float, ci_high: float, margin: float) -> str:
    """``promote`` when ``ci_low > margin``, ``reject_challenger`` when ``ci_high < 0``,
    else ``keep_champion`` (bounds of the interval of challenger - champion)."""
    if ci_low > margin:
        return PROMOTE
    if ci_high < 0:
        return REJECT_CHALLENGER
    return KEEP_CHAMPION


# --------------------------------------------------------------------------- the result
@dataclass(frozen=True)
class Arm:
    """One model's share of the traffic: ``routed`` frames, ``n`` of them scored (frames
    without a labelled pixel have no score), their ``mean`` and its interval."""

    version: str | None
    routed: int
    n: int
    mean: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class TrafficResult:
    """An A/B on traffic: both arms, ``diff`` = challenger mean - champion mean with its
    Welch interval ``[ci_low, ci_high]`` at ``confidence`` (``df`` its degrees of freedom)
    and the :func:`recommend` -ation against ``margin``; ``metric`` the per-frame score,
    ``frames`` the frames split at ``share`` with ``seed``."""

    champion: Arm
    challenger: Arm
    diff: float
    ci_low: float
    ci_high: float
    df: float | None
    margin: float
    confidence: float
    metric: str
    share: float
    seed: int
    frames: int
    recommendation: str

    def reason(self) -> str:
        """One sentence: the recommendation and why."""
        ci = f"{self.confidence:.0%} CI of the difference [{self.ci_low:+.4f}, {self.ci_high:+.4f}]"
        if self.recommendation == PROMOTE:
            return f"promote: the challenger is better by more than {self.margin} ({ci})"
        if self.recommendation == REJECT_CHALLENGER:
            return (
                f"reject_challenger: the challenger is worse ({ci} below 0): pull it off its "
                "share; the champion serves all frames"
            )
        return (
            f"keep_champion: inconclusive ({ci} neither above the margin {self.margin} nor "
            "below 0): keep the champion, test the challenger on more frames"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def as_tags(self) -> dict[str, str]:
        """The result as ``ab.<field>`` / ``ab.<arm>.<field>`` tag values."""
        tags: dict[str, str] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                tags.update({f"ab.{key}.{k}": str(v) for k, v in value.items()})
            else:
                tags[f"ab.{key}"] = str(value)
        return tags

    def to_comparison(self) -> Any:
        """The result as the registry's :class:`~training.risk.registry.Comparison`, for
        :meth:`ModelRegistry.promote` (its ``wins`` is ``ci_low > margin``, the promote rule
        here; ``n`` counts the frames of both arms, ``n_boot`` 0: a Welch interval)."""
        from training.risk.registry import Comparison

        return Comparison(
            champion_version=self.champion.version,
            challenger_version=self.challenger.version,
            champion_mean=self.champion.mean,
            challenger_mean=self.challenger.mean,
            diff=self.diff,
            ci_low=self.ci_low,
            ci_high=self.ci_high,
            margin=self.margin,
            confidence=self.confidence,
            n=self.champion.n + self.challenger.n,
            n_boot=0,
            seed=self.seed,
        )


def ab_result(
    champion_scores: np.ndarray,
    challenger_scores: np.ndarray,
    split: TrafficSplit,
    margin: float,
    confidence: float = 0.95,
    metric: str = "miou",
    champion_version: str | None = None,
    challenger_version: str | None = None,
) -> TrafficResult:
    """The :class:`TrafficResult` of per-frame scores, ``(split.champion.size,)`` and
    ``(split.challenger.size,)`` in the split's frame order; NaN (no labelled pixel) is left
    out. Raises ``ValueError`` when an arm keeps fewer than :data:`MIN_FRAMES` scores."""
    routed = {"champion": split.champion.size, "challenger": split.challenger.size}
    arms: dict[str, Arm] = {}
    kept: dict[str, np.ndarray] = {}
    for arm, scores, version in (
        ("champion", champion_scores, champion_version),
        ("challenger", challenger_scores, challenger_version),
    ):
        x = np.asarray(scores, dtype=np.float64).reshape(-1)
        if x.size != routed[arm]:
            raise ValueError(f"{arm}_scores: expected {routed[arm]} scores, got {x.size}")
        kept[arm] = x[~np.isnan(x)]
        if kept[arm].size < MIN_FRAMES:
            raise ValueError(
                f"{arm}: {kept[arm].size} of its {x.size} frames have a labelled pixel; an "
                f"interval needs at least {MIN_FRAMES}"
            )
        mean, low, high = mean_interval(kept[arm], confidence)
        arms[arm] = Arm(version, x.size, kept[arm].size, mean, low, high)
    diff, low, high, df = welch_interval(kept["champion"], kept["challenger"], confidence)
    return TrafficResult(
        champion=arms["champion"],
        challenger=arms["challenger"],
        diff=diff,
        ci_low=low,
        ci_high=high,
        df=df,
        margin=float(margin),
        confidence=float(confidence),
        metric=str(metric),
        share=split.share,
        seed=split.seed,
        frames=split.n,
        recommendation=recommend(low, high, float(margin)),
    )


# --------------------------------------------------------------------------- scoring
def score_frames(
    model: Any,
    dataset: Any,
    indices: Sequence[int] | np.ndarray,
    num_classes: int,
    metric: str = "miou",
    batch_size: int = 16,
) -> np.ndarray:
    """``(len(indices),)`` per-frame scores of ``model`` on ``dataset[indices]`` (Sample
    dicts with ``mask``), in that order; NaN for a frame without a labelled pixel."""
    from torch.utils.data import DataLoader, Subset

    from training.risk.registry import per_image_scores

    subset = Subset(dataset, [int(i) for i in indices])
    return per_image_scores(model, DataLoader(subset, batch_size=batch_size), num_classes, metric)  # type: ignore[arg-type]


def run_ab(
    registry: Any,
    dataset: Any,
    split: TrafficSplit,
    num_classes: int,
    margin: float,
    confidence: float = 0.95,
    metric: str = "miou",
    batch_size: int = 16,
) -> tuple[TrafficResult, dict[str, np.ndarray]]:
    """Load the registry's champion and challenger (:meth:`ModelRegistry.load`), score each
    on the frames ``split`` routed to it, and return the result with the per-frame scores
    (``{"champion": (n_a,), "challenger": (n_b,)}``, NaN kept)."""
    from training.risk.registry import CHALLENGER, CHAMPION

    versions = {arm: registry.version_of(arm) for arm in (CHAMPION, CHALLENGER)}
    scores = {
        arm: score_frames(
            registry.load(versions[arm]),
            dataset,
            getattr(split, arm),
            num_classes,
            metric,
            batch_size,
        )
        for arm in (CHAMPION, CHALLENGER)
    }
    result = ab_result(
        scores[CHAMPION],
        scores[CHALLENGER],
        split,
        margin,
        confidence,
        metric,
        champion_version=versions[CHAMPION],
        challenger_version=versions[CHALLENGER],
    )
    return result, scores


# --------------------------------------------------------------------------- records
def report(
    result: TrafficResult,
    split: TrafficSplit,
    scores: dict[str, np.ndarray],
    model: str,
    data: str,
    ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The JSON-ready A/B report: the result, the model, the data folder, the time, and per
    arm the routed frames (index, id where known, score: null when unscored)."""
    frames: dict[str, Any] = {}
    for arm in ("champion", "challenger"):
        index = [int(i) for i in getattr(split, arm)]
        frames[arm] = {
            "index": index,
            "score": [None if math.isnan(s) else float(s) for s in scores[arm]],
        }
        if ids is not None:
            frames[arm]["id"] = [str(ids[i]) for i in index]
    return {"model": model, "data": data, "at": _now(), **result.to_dict(), "routed": frames}


def write_report(content: dict[str, Any], folder: Path) -> Path:
    """Write ``content`` to ``<folder>/ab-<model>-v<challenger>-<UTC time>.json``
    atomically; return the file."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = folder / f"ab-{content['model']}-v{content['challenger']['version']}-{stamp}.json"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ab-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=1)
    os.replace(tmp, path)
    return path


def record_ab(registry: Any, result: TrafficResult, extra: dict[str, str] | None = None) -> None:
    """Tag the challenger's model version with the result (``ab.*``, ``ab.at``) and
    ``extra`` (e.g. ``{"ab.report": <file>, "ab.data": <folder>}``)."""
    tags = {**result.as_tags(), "ab.at": _now(), **(extra or {})}
    for key, value in tags.items():
        registry.client.set_model_version_tag(
            registry.name, str(result.challenger.version), key, value[:5000]
        )


def apply_ab(registry: Any, result: TrafficResult, reason: str = "scripts/monitor.py") -> str:
    """Act on ``result.recommendation``; return what was done, one line.

    ``promote``: :meth:`ModelRegistry.promote` with the result (decision ``promoted``, the
    champion history records the difference and its interval); ``reject_challenger``:
    :meth:`ModelRegistry.withdraw` (``decision=rejected`` with the reason, the
    ``challenger`` alias removed); ``keep_champion``: nothing changes.

    Raises:
        RegistryError: the registry's champion or challenger changed since the A/B.
    """
    from training.risk.registry import CHALLENGER, CHAMPION, RegistryError

    aliases = registry.aliases()
    tested = (result.champion.version, result.challenger.version)
    if (aliases.get(CHAMPION), aliases.get(CHALLENGER)) != tested:
        raise RegistryError(
            f"traffic.apply: the A/B tested champion {tested[0]} and challenger {tested[1]}, "
            f"but the registry now holds {aliases or 'no aliases'}; run the A/B again"
        )
    challenger = str(result.challenger.version)
    if result.recommendation == PROMOTE:
        registry.promote(result.to_comparison())
        return f"champion of {registry.name} is now version {challenger}"
    if result.recommendation == REJECT_CHALLENGER:
        registry.withdraw(challenger, "rejected", f"{reason}: {result.reason()}")
        return (
            f"version {challenger} of {registry.name} is no longer the challenger; champion "
            f"version {result.champion.version} serves all frames"
        )
    return f"nothing changed: champion version {result.champion.version} stays"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


__all__ = [
    "KEEP_CHAMPION",
    "METRICS",
    "PROMOTE",
    "RECOMMENDATIONS",
    "REJECT_CHALLENGER",
    "Arm",
    "TrafficResult",
    "TrafficSplit",
    "ab_result",
    "apply_ab",
    "challenger_count",
    "check_arms",
    "check_traffic",
    "mean_interval",
    "record_ab",
    "recommend",
    "report",
    "run_ab",
    "score_frames",
    "split_traffic",
    "welch_interval",
]
