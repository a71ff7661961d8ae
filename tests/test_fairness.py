"""T-08 fairness across driving conditions: DPD and EOD from per-group confusion matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.risk.fairness import (
    demographic_parity_difference,
    equal_opportunity_difference,
    fairness_report,
)

NAMES = ["road", "person", "vehicle"]
# rows = truth, columns = prediction; 100 labelled pixels per group
CONF = {
    # person: 10 truth, 8 found -> recall 0.8; predicted person 8/100
    # vehicle: 40 truth, all found -> recall 1.0; predicted vehicle 40/100
    "day-clear": np.array([[50, 0, 0], [2, 8, 0], [0, 0, 40]]),
    # person: 10 truth, 4 found -> recall 0.4; predicted person (5 + 4)/100 = 0.09
    # vehicle: 25 truth, 20 found -> recall 0.8; predicted vehicle 20/100
    "night-clear": np.array([[60, 5, 0], [6, 4, 0], [5, 0, 20]]),
    # no person in fog frames: excluded from the person EOD; predicted person 0/100
    # vehicle: 10 truth, all found -> recall 1.0; predicted vehicle 10/100
    "day-fog": np.array([[90, 0, 0], [0, 0, 0], [0, 0, 10]]),
}


def test_hand_computed_dpd_and_eod():
    r = fairness_report(CONF, NAMES)
    person, vehicle = r["person"], r["vehicle"]
    assert person["recall"] == pytest.approx({"day-clear": 0.8, "night-clear": 0.4})
    assert "day-fog" not in person["recall"]  # no truth pixel of person
    assert person["eod"] == pytest.approx(0.8 - 0.4)
    assert (person["worst_group"], person["best_group"]) == ("night-clear", "day-clear")
    assert person["groups_compared"] == 2
    # DPD uses every group with labelled pixels, fog included: 0.09 - 0.0
    assert person["pred_rate"] == pytest.approx(
        {"day-clear": 0.08, "night-clear": 0.09, "day-fog": 0.0}
    )
    assert person["dpd"] == pytest.approx(0.09)
    assert vehicle["eod"] == pytest.approx(1.0 - 0.8)
    assert vehicle["worst_group"] == "night-clear"
    assert vehicle["dpd"] == pytest.approx(0.40 - 0.10)
    assert demographic_parity_difference(CONF, NAMES, "vehicle") == pytest.approx(0.3)
    assert equal_opportunity_difference(CONF, NAMES, "person") == pytest.approx(0.4)


def test_metrics_names_and_eod_max():
    m = fairness_report(CONF, NAMES).metrics()
    assert m == pytest.approx(
        {
            "risk/T-08/dpd/person": 0.09,
            "risk/T-08/eod/person": 0.4,
            "risk/T-08/dpd/vehicle": 0.3,
            "risk/T-08/eod/vehicle": 0.2,
            "risk/T-08/eod_max": 0.4,
        }
    )
    assert set(fairness_report(CONF, NAMES).metrics(prefix="x/")) >= {"x/eod_max"}


def test_single_group_or_no_support_gives_nan():
    one = fairness_report({"day-clear": CONF["day-clear"]}, NAMES)
    assert math.isnan(one["person"]["eod"]) and math.isnan(one["person"]["dpd"])
    assert one["person"]["worst_group"] is None
    assert math.isnan(one.metrics()["risk/T-08/eod_max"])
    # two groups but only one with person pixels: EOD undefined, DPD defined
    two = {"day-clear": CONF["day-clear"], "day-fog": CONF["day-fog"]}
    r = fairness_report(two, NAMES, classes=["person"])
    assert math.isnan(r["person"]["eod"])
    assert r["person"]["dpd"] == pytest.approx(0.08)
    # a group with no labelled pixels at all is left out of DPD as well
    empty = {**CONF, "night-fog": np.zeros((3, 3))}
    assert fairness_report(empty, NAMES)["person"]["dpd"] == pytest.approx(0.09)


def test_min_pixels_excludes_small_groups():
    # night-clear has 10 person pixels: with min_pixels=11 only day-clear remains
    r = fairness_report(CONF, NAMES, classes=["person", "vehicle"], min_pixels=11)
    assert math.isnan(r["person"]["eod"])
    assert r["vehicle"]["recall"] == pytest.approx({"day-clear": 1.0, "night-clear": 0.8})
    assert r.metrics()["risk/T-08/eod_max"] == pytest.approx(0.2)


def test_parity_is_zero_and_torch_input_works():
    same = {g: torch.tensor([[5, 1], [2, 8]]) for g in ("day-clear", "night-rain")}
    r = fairness_report(same, ["road", "person"], classes=["person"])
    assert r["person"]["eod"] == 0.0 and r["person"]["dpd"] == 0.0
    assert r["person"]["recall"]["night-rain"] == pytest.approx(0.8)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"confusions\['day-clear'\]: expected shape \(3, 3\)"):
        fairness_report({"day-clear": np.zeros((2, 2))}, NAMES)
    with pytest.raises(ValueError, match="unknown class 'cyclist'"):
        fairness_report(CONF, NAMES, classes=["cyclist"])
    with pytest.raises(ValueError, match="non-negative"):
        fairness_report({"a": -np.ones((3, 3)), "b": np.ones((3, 3))}, NAMES)
