"""The risk register: the level rule and the config, checked row by row against the document."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from training.risk.register import (
    CATEGORY_FROM_JA,
    KNOWN_IDS,
    LEVEL_FROM_JA,
    STATUS_FROM_JA,
    RiskConfigError,
    RiskRegister,
    risk_level,
)

ROOT = Path(__file__).resolve().parents[1]
REGISTER = ROOT / "configs" / "risk" / "register.yaml"
# The shared folder beside the repository holds the register's source of truth.
MATRIX = Path(__file__).resolve().parents[2] / "shared" / "risk-matrix.md"

needs_doc = pytest.mark.skipif(
    not MATRIX.exists(), reason=f"risk matrix document not found at {MATRIX}"
)


def _table_rows(text: str, columns: int) -> dict[str, list[str]]:
    """Markdown table rows starting with a risk id and having ``columns`` cells, by id."""
    rows = {}
    for line in text.splitlines():
        if not re.match(r"^\|\s*[TSOB]-\d\d\s*\|", line):
            continue
        cells = [c.strip().strip("*").strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == columns:
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def doc_matrix() -> dict[str, dict[str, str]]:
    """Section 3's rows: id -> columns, levels translated to English words."""
    rows = _table_rows(MATRIX.read_text(encoding="utf-8"), columns=9)
    out = {}
    for rid, (_, name, prob, impact, level, cost, owner, _mitigation, status) in rows.items():
        out[rid] = {
            "name_ja": name,
            "probability": LEVEL_FROM_JA[prob],
            "impact": LEVEL_FROM_JA[impact],
            "level": LEVEL_FROM_JA[level],
            "mitigation_cost": LEVEL_FROM_JA[cost],
            "owner": owner,
            "status": STATUS_FROM_JA[status],
        }
    return out


@pytest.fixture(scope="module")
def doc_categories() -> dict[str, str]:
    """Section 2's rows: id -> category in English."""
    rows = _table_rows(MATRIX.read_text(encoding="utf-8"), columns=3)
    return {rid: CATEGORY_FROM_JA[cat] for rid, (_, _name, cat) in rows.items()}


@pytest.fixture(scope="module")
def register() -> RiskRegister:
    return RiskRegister.load(REGISTER)


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load(REGISTER.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- the rule


@needs_doc
def test_document_has_all_23_rows(doc_matrix, doc_categories):
    assert set(doc_matrix) == set(KNOWN_IDS)
    assert set(doc_categories) == set(KNOWN_IDS)
    assert len(doc_matrix) == 23


@needs_doc
def test_level_rule_reproduces_every_stated_level(doc_matrix):
    """Section 1.3 (リスクレベル = 発生確率 × 影響度) against all 23 stated levels."""
    mismatches = {
        rid: (row["probability"], row["impact"], row["level"])
        for rid, row in doc_matrix.items()
        if risk_level(row["probability"], row["impact"]) != row["level"]
    }
    assert not mismatches


def test_level_rule_full_table():
    expected = {
        ("high", "high"): "high",
        ("high", "medium"): "high",
        ("medium", "high"): "high",
        ("high", "low"): "medium",
        ("low", "high"): "medium",
        ("medium", "medium"): "medium",
        ("medium", "low"): "low",
        ("low", "medium"): "low",
        ("low", "low"): "low",
    }
    for (p, i), level in expected.items():
        assert risk_level(p, i) == level, (p, i)


def test_level_rule_rejects_unknown_words():
    with pytest.raises(ValueError, match="probability"):
        risk_level("中", "high")
    with pytest.raises(ValueError, match="impact"):
        risk_level("high", "critical")


# --------------------------------------------------------------------------- the config


@needs_doc
def test_config_matches_document_row_by_row(register, doc_matrix, doc_categories):
    assert register.ids == sorted(register.ids, key=lambda r: "TSOB".index(r[0]))
    assert set(register.ids) == set(doc_matrix)
    for risk in register:
        row = doc_matrix[risk.id]
        for key, value in row.items():
            assert getattr(risk, key) == value, (risk.id, key)
        assert risk.category == doc_categories[risk.id], risk.id


def test_register_api(register):
    assert len(register) == 23
    assert "T-09" in register and "X-01" not in register
    t02 = register.get("T-02")
    assert (t02.probability, t02.impact, t02.level) == ("high", "high", "high")
    assert t02.thresholds["psi_warning"] == 0.2
    with pytest.raises(KeyError, match="T-99"):
        register.get("T-99")
    rows = register.to_rows()
    assert [r["id"] for r in rows] == register.ids
    assert all(isinstance(v, str) for r in rows for v in r.values())  # flat, table-ready
    with pytest.raises(AttributeError):  # frozen
        t02.level = "low"


def test_live_status(register):
    metrics = {
        "risk/T-01/accuracy": 0.9,
        "risk/T-02/psi": 0.31,
        "risk/T-06/latency_p95_ms": math.nan,  # NaN is no measurement
        "val/real/miou": 0.5,
    }
    fired = SimpleNamespace(risk_id="T-02", fired=True, message="drift")
    quiet = SimpleNamespace(risk_id="T-01", fired=False, message="fine")
    rows = {r["id"]: r for r in register.live_status(metrics, [fired, quiet])}
    assert rows["T-01"]["live_status"] == "ok"
    assert rows["T-01"]["metrics"] == {"accuracy": 0.9}
    assert rows["T-02"]["live_status"] == "alert"
    assert rows["T-02"]["alert_messages"] == ["drift"]
    assert rows["T-06"]["live_status"] == "not_monitored"
    assert rows["T-03"]["live_status"] == "not_monitored"
    assert rows["T-02"]["level"] == "high"  # the register row is kept


# --------------------------------------------------------------------------- validation


def _error(data: dict, tmp_path: Path) -> str:
    path = tmp_path / "register.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(RiskConfigError) as info:
        RiskRegister.load(path)
    message = str(info.value)
    assert str(path) in message  # every error names the file
    return message


@pytest.mark.parametrize(
    ("index", "key", "value", "expected"),
    [
        (0, "id", "T-1", r"risks\[0\]\.id.*does not match"),
        (0, "id", "T-11", r"risks\[0\]\.id.*unknown risk id 'T-11'"),
        (0, "id", "X-01", r"risks\[0\]\.id"),
        (1, "probability", "very high", r"risks\[1\]\.probability.*low\|medium\|high"),
        (1, "impact", "高", r"risks\[1\]\.impact"),
        (2, "level", "severe", r"risks\[2\]\.level"),
        (2, "level", "high", r"risks\[2\]\.level.*disagrees.*medium x medium -> 'medium'"),
        (3, "status", "done", r"risks\[3\]\.status"),
        (3, "category", "tech", r"risks\[3\]\.category"),
        (0, "thresholds", {"accuracy_min": "0.85"}, r"thresholds\.accuracy_min.*str"),
        (0, "thresholds", {"accuracy_min": True}, r"thresholds\.accuracy_min.*bool"),
        (0, "thresholds", [0.85], r"risks\[0\]\.thresholds"),
        (0, "owner", "", r"risks\[0\]\.owner"),
    ],
)
def test_bad_values_name_file_and_key(raw, tmp_path, index, key, value, expected):
    raw["risks"][index][key] = value
    assert re.search(expected, _error(raw, tmp_path))


def test_duplicate_missing_and_unknown_keys(raw, tmp_path):
    dup = copy.deepcopy(raw)
    dup["risks"].append(copy.deepcopy(dup["risks"][0]))
    assert "duplicate risk id 'T-01'" in _error(dup, tmp_path)

    missing = copy.deepcopy(raw)
    del missing["risks"][4]["owner"]
    assert re.search(r"risks\[4\]: missing key\(s\) owner", _error(missing, tmp_path))

    extra = copy.deepcopy(raw)
    extra["risks"][4]["severity"] = "high"
    assert re.search(r"risks\[4\]: unknown key\(s\) severity", _error(extra, tmp_path))

    assert "risks: expected a list" in _error({"risk": []}, tmp_path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(RiskConfigError, match="nowhere.yaml"):
        RiskRegister.load(tmp_path / "nowhere.yaml")
