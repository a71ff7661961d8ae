"""Risk O-01: the device-hour cost ledger and the daily cost ratio."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone

import pytest

from training.risk.cost import CostTracker, device_hours

DAY = datetime(2026, 11, 27, 9, 0, tzinfo=timezone.utc)


@pytest.fixture
def tracker(tmp_path):
    return CostTracker(tmp_path / "ledger.json", price_per_device_hour=2.0, daily_budget=100.0)


def test_device_hours():
    assert device_hours(1800, devices=4) == 2.0
    assert device_hours(3600) == 1.0
    with pytest.raises(ValueError, match="devices"):
        device_hours(10, devices=0)


def test_two_runs_on_the_same_day_are_summed(tracker):
    assert tracker.record("a", 10.0, when=DAY) == 20.0
    assert tracker.record("b", 5.0, devices=4, when=DAY + timedelta(hours=3)) == 10.0
    assert tracker.daily_cost(DAY.date()) == 30.0
    assert tracker.daily_cost("2026-11-27") == 30.0
    m = tracker.metrics(DAY.date())
    assert m == {
        "risk/O-01/run_cost": 10.0,  # the last recorded run
        "risk/O-01/daily_cost": 30.0,
        "risk/O-01/daily_budget": 100.0,
        "risk/O-01/daily_cost_ratio": 0.3,
        "risk/O-01/over_budget": 0.0,
    }
    assert tracker.metrics(DAY, run_id="a")["risk/O-01/run_cost"] == 20.0


def test_recording_a_run_again_replaces_it(tracker):
    tracker.record("resumed", 10.0, when=DAY)
    tracker.record("resumed", 25.0, when=DAY)  # cumulative hours after the resume
    assert tracker.daily_cost(DAY) == 50.0
    assert list(tracker.runs()) == ["resumed"]


def test_ratio_above_the_alert(tracker):
    tracker.record("big", 61.0, when=DAY)  # 122 > 1.2 * 100
    m = tracker.metrics(DAY)
    assert m["risk/O-01/daily_cost_ratio"] == pytest.approx(1.22)
    assert m["risk/O-01/over_budget"] == 1.0


def test_days_are_separate_and_utc(tracker):
    tracker.record("today", 1.0, when=DAY)
    tracker.record("tomorrow", 2.0, when=DAY + timedelta(days=1))
    # 23:30 in UTC-5 is 04:30 the next UTC day
    late = datetime(2026, 11, 27, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    tracker.record("late", 4.0, when=late)
    assert tracker.daily_cost(date(2026, 11, 27)) == 2.0
    assert tracker.daily_cost(date(2026, 11, 28)) == 12.0
    assert tracker.daily_cost(date(2026, 11, 26)) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"price_per_device_hour": -1.0}, "risk.cost.price_per_device_hour"),
        ({"daily_budget": -5.0}, "risk.cost.daily_budget"),
        ({"daily_budget": 0.0}, "risk.cost.daily_budget"),
        ({"price_per_device_hour": float("nan")}, "risk.cost.price_per_device_hour"),
        ({"currency": ""}, "risk.cost.currency"),
    ],
)
def test_validation_errors_name_the_key(tmp_path, kwargs, key):
    args = {"price_per_device_hour": 1.0, "daily_budget": 10.0, **kwargs}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        CostTracker(tmp_path / "l.json", **args)


def test_negative_hours_are_refused(tracker):
    with pytest.raises(ValueError, match="device_hours"):
        tracker.record("a", -1.0)
    assert tracker.runs() == {}


def test_ledger_survives_a_reload_and_keeps_each_runs_price(tmp_path):
    path = tmp_path / "sub" / "ledger.json"
    CostTracker(path, price_per_device_hour=2.0, daily_budget=10.0).record("a", 3.0, when=DAY)
    reloaded = CostTracker(path, price_per_device_hour=4.0, daily_budget=10.0)
    reloaded.record("b", 1.0, when=DAY)
    assert reloaded.daily_cost(DAY) == 6.0 + 4.0  # "a" keeps the price it was recorded at
    assert reloaded.run_cost("a") == 6.0
    assert json.loads(path.read_text())["runs"]["a"]["day"] == "2026-11-27"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".ledger.json.")]


def test_a_ledger_in_another_currency_or_corrupt_is_refused(tmp_path):
    path = tmp_path / "ledger.json"
    CostTracker(path, 1.0, 10.0, currency="USD").record("a", 1.0)
    with pytest.raises(ValueError, match="risk.cost.currency"):
        CostTracker(path, 1.0, 10.0, currency="JPY")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a cost ledger"):
        CostTracker(path, 1.0, 10.0)


def test_metrics_without_a_run_leave_out_run_cost(tracker):
    assert "risk/O-01/run_cost" not in tracker.metrics(DAY)
