"""The risk register of ``shared/risk-matrix.md`` (section 3) as validated data.

The document is the source of truth; ``configs/risk/register.yaml`` copies its 23 rows and
this module refuses a copy that drifted from the document's own rules: an unknown id, a
probability/impact/level word outside ``high|medium|low``, or a stated level that is not
what section 1.3's rule (``リスクレベル = 発生確率 × 影響度``) gives.

Example::

    register = RiskRegister.load("configs/risk/register.yaml")
    register.get("T-02").level                      # 'high'
    rows = register.live_status(metrics, alerts)   # one dict per risk, for an MLflow table
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import yaml

LEVELS: tuple[str, ...] = ("low", "medium", "high")
# The document's words for the three levels (section 1.1 / 1.2 / 1.3).
LEVEL_FROM_JA: Mapping[str, str] = MappingProxyType({"高": "high", "中": "medium", "低": "low"})
# The document's status words (column ステータス of section 3).
STATUS_FROM_JA: Mapping[str, str] = MappingProxyType(
    {"実装済み": "implemented", "計画中": "planned", "実施中": "in_progress"}
)
STATUSES: tuple[str, ...] = tuple(STATUS_FROM_JA.values())
# The document's category words (column カテゴリ of section 2).
CATEGORY_FROM_JA: Mapping[str, str] = MappingProxyType(
    {
        "技術": "technical",
        "セキュリティ": "security",
        "コンプライアンス": "compliance",
        "運用": "operational",
        "ビジネス": "business",
    }
)
CATEGORIES: tuple[str, ...] = tuple(CATEGORY_FROM_JA.values())

ID_PATTERN = re.compile(r"^(T|S|O|B)-\d\d$")
# Every id of the document's section 2/3 tables; a new risk is added to the document first.
KNOWN_IDS: frozenset[str] = frozenset(
    [f"T-{i:02d}" for i in range(1, 11)]
    + [f"S-{i:02d}" for i in range(1, 6)]
    + [f"O-{i:02d}" for i in range(1, 6)]
    + [f"B-{i:02d}" for i in range(1, 4)]
)

# Scores behind section 1.3's product. The cut-offs are the ones every row of section 3
# agrees with (tests/test_risk_register.py checks all 23): 中×高 = 6 and 高×高 = 9 are 高;
# 中×中 = 4 and 低×高 = 3 are 中; 低×中 = 2 and 低×低 = 1 are 低.
_SCORE: Mapping[str, int] = MappingProxyType({"low": 1, "medium": 2, "high": 3})
_HIGH_FROM, _MEDIUM_FROM = 6, 3

_REQUIRED = (
    "id",
    "name_ja",
    "name_en",
    "category",
    "probability",
    "impact",
    "level",
    "mitigation_cost",
    "owner",
    "mitigation",
    "status",
)
_OPTIONAL = ("thresholds",)


class RiskConfigError(ValueError):
    """A risk or alert config that disagrees with the register's rules; names file and key."""


def risk_level(probability: str, impact: str) -> str:
    """Section 1.3's rule ``リスクレベル = 発生確率 × 影響度``.

    Levels score low=1, medium=2, high=3; a product of 6 or more is ``high``, 3-4 is
    ``medium``, 2 or less is ``low``.

    >>> risk_level("medium", "high"), risk_level("low", "high"), risk_level("low", "medium")
    ('high', 'medium', 'low')
    """
    for what, word in (("probability", probability), ("impact", impact)):
        if word not in _SCORE:
            raise ValueError(f"{what} must be one of {'|'.join(LEVELS)}, got {word!r}")
    product = _SCORE[probability] * _SCORE[impact]
    if product >= _HIGH_FROM:
        return "high"
    if product >= _MEDIUM_FROM:
        return "medium"
    return "low"


@dataclass(frozen=True)
class Risk:
    """One row of the register (section 3), levels in English words.

    ``thresholds`` holds the numeric limits section 4 states for the risk (for example
    ``{"psi_warning": 0.2}``); it is informational here, the alert rules act on them.
    """

    id: str
    name_ja: str
    name_en: str
    category: str
    probability: str
    impact: str
    level: str
    mitigation_cost: str
    owner: str
    mitigation: str
    status: str
    thresholds: Mapping[str, float] = field(default_factory=dict)

    @property
    def metric_prefix(self) -> str:
        """The MLflow metric prefix of this risk: ``risk/<ID>/``."""
        return f"risk/{self.id}/"

    def to_row(self) -> dict[str, Any]:
        """A flat dict of scalars (thresholds as ``key=value`` text), one table row."""
        thresholds = ", ".join(f"{k}={v:g}" for k, v in self.thresholds.items())
        return {
            "id": self.id,
            "name_ja": self.name_ja,
            "name_en": self.name_en,
            "category": self.category,
            "probability": self.probability,
            "impact": self.impact,
            "level": self.level,
            "mitigation_cost": self.mitigation_cost,
            "owner": self.owner,
            "mitigation": self.mitigation,
            "status": self.status,
            "thresholds": thresholds,
        }


class _AlertLike(Protocol):
    """What :meth:`RiskRegister.live_status` needs of an alert (``alerts.Alert`` fits)."""

    risk_id: str
    fired: bool
    message: str


class RiskRegister:
    """The validated set of risks, in the document's order; iterable, indexable by id."""

    def __init__(self, risks: Iterable[Risk], source: str = "<register>") -> None:
        self._risks: dict[str, Risk] = {}
        for i, risk in enumerate(risks):
            if risk.id in self._risks:
                raise RiskConfigError(f"{source}: risks[{i}].id: duplicate risk id {risk.id!r}")
            self._risks[risk.id] = risk

    @classmethod
    def load(cls, path: str | Path) -> RiskRegister:
        """Read and validate a register YAML (``risks:`` list of rows)."""
        path = Path(path)
        return cls.from_config(read_yaml(path, "risk register"), source=str(path))

    @classmethod
    def from_config(cls, data: Any, source: str = "<register>") -> RiskRegister:
        """Build from a parsed mapping ``{"risks": [...]}``; errors name ``source`` and key."""
        if hasattr(data, "_metadata"):  # an OmegaConf DictConfig: plain containers from here
            from omegaconf import OmegaConf

            data = OmegaConf.to_container(data, resolve=True)
        if not isinstance(data, Mapping) or not isinstance(data.get("risks"), list):
            raise RiskConfigError(f"{source}: risks: expected a list of risk rows")
        return cls(
            (_parse_risk(row, f"{source}: risks[{i}]") for i, row in enumerate(data["risks"])),
            source=source,
        )

    def get(self, risk_id: str) -> Risk:
        """The risk with this id; ``KeyError`` naming the known ids otherwise."""
        try:
            return self._risks[risk_id]
        except KeyError:
            raise KeyError(
                f"unknown risk id {risk_id!r}; known: {', '.join(self._risks)}"
            ) from None

    def __iter__(self) -> Iterator[Risk]:
        return iter(self._risks.values())

    def __len__(self) -> int:
        return len(self._risks)

    def __contains__(self, risk_id: object) -> bool:
        return risk_id in self._risks

    @property
    def ids(self) -> list[str]:
        """Risk ids in register order."""
        return list(self._risks)

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat dict per risk, e.g. for ``mlflow.log_table`` (via a DataFrame or dict)."""
        return [risk.to_row() for risk in self]

    def live_status(
        self, metrics: Mapping[str, Any], alerts: Iterable[_AlertLike] = ()
    ) -> list[dict[str, Any]]:
        """Each risk's row plus what this run measured for it.

        Args:
            metrics: metric name -> value; the ones named ``risk/<ID>/<metric>`` belong to
                risk ``<ID>``. NaN or non-numeric values count as not measured.
            alerts: evaluated alerts (``alerts.evaluate``); those with ``fired`` mark
                their risk.

        Returns:
            Rows with the ``to_row`` columns plus ``live_status`` (``alert`` when an alert
            for the risk fired, ``ok`` when measured and no alert fired, ``not_monitored``
            when this run has no metric for it), ``metrics`` (dict ``<metric>`` -> value of
            the risk's metrics) and ``alert_messages`` (list of the fired alerts' text).
        """
        fired: dict[str, list[str]] = {}
        for alert in alerts:
            if alert.fired:
                fired.setdefault(alert.risk_id, []).append(alert.message)
        rows = []
        for risk in self:
            measured = {
                key[len(risk.metric_prefix) :]: value
                for key, value in sorted(metrics.items())
                if key.startswith(risk.metric_prefix) and _is_number(value)
            }
            if risk.id in fired:
                status = "alert"
            elif measured:
                status = "ok"
            else:
                status = "not_monitored"
            row = risk.to_row()
            row.update(
                live_status=status,
                metrics={k: float(v) for k, v in measured.items()},
                alert_messages=fired.get(risk.id, []),
            )
            rows.append(row)
        return rows


def _is_number(value: Any) -> bool:
    """A finite-or-infinite real value (tensors/numpy scalars included), not NaN."""
    if isinstance(value, (str, bytes)):
        return False
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def check_threshold(value: Any, where: str) -> float:
    """A threshold as float; bools, strings and NaN are config mistakes, not numbers."""
    # bool is an int subclass: `threshold: yes` must not silently become 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RiskConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    if math.isnan(value):
        raise RiskConfigError(f"{where}: expected a number, got NaN")
    return float(value)


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document at ``path``; a :class:`RiskConfigError` naming the file if it is
    missing or not valid YAML (``what`` says which config it is)."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RiskConfigError(f"{path}: {what} file not found") from None
    except yaml.YAMLError as err:
        raise RiskConfigError(f"{path}: not valid YAML: {err}") from None


def check_keys(raw: Any, required: Sequence[str], optional: Sequence[str], where: str) -> None:
    """``raw`` must be a mapping holding every ``required`` key and nothing outside
    ``required`` and ``optional``; else a :class:`RiskConfigError` naming ``where``."""
    if not isinstance(raw, Mapping):
        raise RiskConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    missing = [key for key in required if key not in raw]
    if missing:
        raise RiskConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    unknown = sorted(set(raw) - set(required) - set(optional))
    if unknown:
        raise RiskConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")


def _parse_risk(row: Any, where: str) -> Risk:
    """Validate one YAML row into a :class:`Risk`."""
    check_keys(row, _REQUIRED, _OPTIONAL, where)
    for key in _REQUIRED:
        if not isinstance(row[key], str) or not row[key].strip():
            raise RiskConfigError(f"{where}.{key}: expected a non-empty string, got {row[key]!r}")

    risk_id = row["id"]
    if not ID_PATTERN.match(risk_id):
        raise RiskConfigError(f"{where}.id: {risk_id!r} does not match {ID_PATTERN.pattern}")
    if risk_id not in KNOWN_IDS:
        raise RiskConfigError(
            f"{where}.id: unknown risk id {risk_id!r} (not in shared/risk-matrix.md)"
        )
    for key in ("probability", "impact", "level", "mitigation_cost"):
        if row[key] not in LEVELS:
            raise RiskConfigError(
                f"{where}.{key}: expected one of {'|'.join(LEVELS)}, got {row[key]!r}"
            )
    if row["category"] not in CATEGORIES:
        raise RiskConfigError(
            f"{where}.category: expected one of {'|'.join(CATEGORIES)}, got {row['category']!r}"
        )
    if row["status"] not in STATUSES:
        raise RiskConfigError(
            f"{where}.status: expected one of {'|'.join(STATUSES)}, got {row['status']!r}"
        )
    expected = risk_level(row["probability"], row["impact"])
    if row["level"] != expected:
        raise RiskConfigError(
            f"{where}.level: {row['level']!r} disagrees with the rule probability x impact "
            f"({row['probability']} x {row['impact']} -> {expected!r})"
        )

    raw_thresholds = row.get("thresholds") or {}
    if not isinstance(raw_thresholds, Mapping):
        raise RiskConfigError(f"{where}.thresholds: expected a mapping of name -> number")
    thresholds = {
        str(name): check_threshold(value, f"{where}.thresholds.{name}")
        for name, value in raw_thresholds.items()
    }
    return Risk(
        **{key: row[key] for key in _REQUIRED},
        thresholds=MappingProxyType(thresholds),
    )
