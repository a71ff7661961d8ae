"""The T-01 A/B on traffic (``training/risk/traffic.py``, ``scripts/monitor.py action=ab``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from core.config import ConfigError
from tests.conftest import ROOT, compose_config
from training.risk.registry import ModelRegistry, RegistryError
from training.risk.traffic import (
    KEEP_CHAMPION,
    PROMOTE,
    REJECT_CHALLENGER,
    ab_result,
    apply_ab,
    challenger_count,
    check_arms,
    check_traffic,
    mean_interval,
    recommend,
    split_traffic,
    welch_interval,
)

H = W = 8
FRAMES = 40


# --------------------------------------------------------------------------- the split
@pytest.mark.parametrize("n", [0, 1, 7, 10, 25, 100, 1001])
@pytest.mark.parametrize("share", [0.1, 0.3, 0.5, 0.9])
def test_split_is_exact_disjoint_and_covering(n, share):
    split = split_traffic(n, share, seed=3)
    assert split.challenger.size == challenger_count(n, share) == math.floor(share * n + 0.5)
    assert split.challenger.size + split.champion.size == n
    assert not set(split.challenger.tolist()) & set(split.champion.tolist())
    np.testing.assert_array_equal(
        np.sort(np.concatenate([split.challenger, split.champion])), np.arange(n)
    )
    assert (np.diff(split.challenger) > 0).all() and (np.diff(split.champion) > 0).all()


def test_rounding_is_half_up_on_the_share_as_written():
    # 0.3 * 5 and 0.15 * 10 are 1.5 in binary floating point too, 0.1 * 25 is 2.5000...04
    cases = {(25, 0.1): 3, (24, 0.1): 2, (5, 0.3): 2, (10, 0.15): 2, (10, 0.25): 3}
    cases.update({(100, 0.1): 10, (7, 0.1): 1, (4, 0.1): 0, (3, 0.5): 2, (1, 0.5): 1})
    assert {key: challenger_count(*key) for key in cases} == cases
    # 0.35 is 0.34999... in binary: the decimal value as written rounds 3.5 up, not down
    assert challenger_count(10, 0.35) == 4


def test_split_is_reproducible_by_seed():
    a, b = split_traffic(100, 0.1, seed=0), split_traffic(100, 0.1, seed=0)
    np.testing.assert_array_equal(a.challenger, b.challenger)
    np.testing.assert_array_equal(a.champion, b.champion)
    other = split_traffic(100, 0.1, seed=1)
    assert other.challenger.size == 10
    assert not np.array_equal(other.challenger, a.challenger)
    assert not np.array_equal(a.challenger, np.arange(10))  # a permutation, not the first frames
    # one (n, seed): a larger share only adds frames to the challenger
    wider = split_traffic(100, 0.2, seed=0)
    assert set(a.challenger.tolist()) < set(wider.challenger.tolist())
    # seeds spread the challenger over all frames: each frame is picked about share of the time
    picked = np.zeros(100)
    for seed in range(400):
        picked[split_traffic(100, 0.1, seed).challenger] += 1
    assert picked.sum() == 4000 and picked.min() > 15 and picked.max() < 70


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("share", [0, 1, 1.5, -0.1, float("nan"), "0.1", True, None])
def test_a_share_outside_zero_one_names_the_key(share):
    with pytest.raises(ConfigError) as err:
        check_traffic(share, 0)
    assert str(err.value) == f"traffic.share: expected a number in (0, 1), got {share!r}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": -1}, "traffic.seed: expected a whole number >= 0, got -1"),
        ({"seed": 0.5}, "traffic.seed: expected a whole number >= 0, got 0.5"),
        ({"confidence": 1.0}, "traffic.confidence: expected a number in (0, 1) or null"),
        ({"margin": -0.01}, "traffic.margin: expected a number >= 0 or null, got -0.01"),
        ({"metric": "f1"}, "traffic.metric: expected one of miou, pixel_acc, got 'f1'"),
        ({"apply": "yes"}, "traffic.apply: expected true or false, got 'yes'"),
    ],
)
def test_other_traffic_keys_are_checked(kwargs, message):
    args = {"share": 0.1, "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_traffic(**args)
    check_traffic(0.1, 0, 0.95, 0.0, "miou", True)  # a valid set passes


def test_an_arm_too_small_names_the_share_and_the_data():
    check_arms(split_traffic(20, 0.1, 0))
    with pytest.raises(ConfigError) as err:
        check_arms(split_traffic(10, 0.1, 0), "traffic.share", "current.root")
    assert str(err.value).startswith(
        "traffic.share: 0.1 of the 10 frames of current.root routes 1 to the challenger and 9 "
        "to the champion; each arm needs at least 2 frames"
    )
    with pytest.raises(ConfigError, match="routes 10 to the challenger and 1 to the champion"):
        check_arms(split_traffic(11, 0.9, 0))


# --------------------------------------------------------------------------- intervals
def test_mean_interval_is_the_student_t_interval():
    mean, low, high = mean_interval(np.array([0.4, 0.6]), 0.95)
    # sd = 0.1414, se = 0.1, t(0.975, 1 df) = 12.706
    assert mean == pytest.approx(0.5)
    assert (low, high) == pytest.approx((0.5 - 1.27062, 0.5 + 1.27062), abs=1e-5)
    assert mean_interval(np.full(5, 0.3)) == pytest.approx(
        (0.3, 0.3, 0.3)
    )  # no spread, no uncertainty
    with pytest.raises(ValueError, match="at least 2"):
        mean_interval(np.array([0.5]))


def test_welch_interval_matches_hand_computation_and_scipy():
    a, b = np.array([0.2, 0.4, 0.6]), np.array([0.5, 0.7])
    diff, low, high, df = welch_interval(a, b, 0.95)
    # var_a/n_a = 0.04/3, var_b/n_b = 0.02/2: se = sqrt(0.023333) = 0.152753
    # df = 0.023333^2 / ((0.04/3)^2/2 + 0.01^2/1) = 2.88235
    assert diff == pytest.approx(0.2)
    assert df == pytest.approx(2.88235, abs=1e-4)
    half = stats.t.ppf(0.975, 2.88235) * 0.152753
    assert (low, high) == pytest.approx((0.2 - half, 0.2 + half), abs=1e-4)
    ref = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert (low, high) == pytest.approx((ref.low, ref.high))
    assert welch_interval(np.full(3, 0.5), np.full(4, 0.7)) == pytest.approx((0.2, 0.2, 0.2, None))
    assert welch_interval(np.full(3, 0.5), np.array([0.6, 0.8]))[3] == pytest.approx(1.0)


def test_interval_widens_with_confidence_and_narrows_with_frames():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.3, 0.7, 90), rng.uniform(0.3, 0.7, 10)
    _, low95, high95, _ = welch_interval(a, b, 0.95)
    _, low99, high99, _ = welch_interval(a, b, 0.99)
    assert low99 < low95 < high95 < high99
    _, low_big, high_big, _ = welch_interval(np.tile(a, 10), np.tile(b, 10), 0.95)
    assert high_big - low_big < (high95 - low95) / 2


# --------------------------------------------------------------------------- recommendation
def _scores(split, champion_mean, challenger_mean, sd, seed=0):
    rng = np.random.default_rng(seed)
    return (
        np.clip(rng.normal(champion_mean, sd, split.champion.size), 0, 1),
        np.clip(rng.normal(challenger_mean, sd, split.challenger.size), 0, 1),
    )


@pytest.mark.parametrize(
    ("champion_mean", "challenger_mean", "sd", "expected"),
    [
        (0.50, 0.65, 0.05, PROMOTE),  # clear win
        (0.65, 0.50, 0.05, REJECT_CHALLENGER),  # clear loss
        (0.55, 0.55, 0.10, KEEP_CHAMPION),  # noise
        (0.500, 0.505, 0.001, KEEP_CHAMPION),  # surely better, but by less than the margin
    ],
)
def test_recommendation_on_constructed_scores(champion_mean, challenger_mean, sd, expected):
    split = split_traffic(200, 0.1, seed=0)
    a, b = _scores(split, champion_mean, challenger_mean, sd)
    result = ab_result(a, b, split, margin=0.01, champion_version="1", challenger_version="2")
    assert result.recommendation == expected, result
    assert (result.champion.n, result.challenger.n) == (180, 20)
    assert result.champion.ci_low < result.champion.mean < result.champion.ci_high
    assert result.diff == pytest.approx(b.mean() - a.mean())
    assert result.to_comparison().wins is (expected == PROMOTE)
    assert result.reason().startswith(expected)
    tags = result.as_tags()
    assert tags["ab.recommendation"] == expected and tags["ab.challenger.n"] == "20"


def test_recommend_bounds_are_strict():
    assert recommend(0.01, 0.05, margin=0.01) == KEEP_CHAMPION  # must win by MORE than it
    assert recommend(0.0101, 0.05, margin=0.01) == PROMOTE
    assert recommend(-0.05, 0.0, margin=0.01) == KEEP_CHAMPION
    assert recommend(-0.05, -1e-9, margin=0.01) == REJECT_CHALLENGER


def test_ab_result_leaves_unscored_frames_out_and_checks_lengths():
    split = split_traffic(10, 0.3, seed=0)  # 3 to the challenger
    a = np.array([0.5, 0.6, np.nan, 0.5, 0.6, 0.5, 0.6])
    b = np.array([0.9, np.nan, 0.8])
    result = ab_result(a, b, split, margin=0.0)
    assert (result.champion.routed, result.champion.n) == (7, 6)
    assert (result.challenger.routed, result.challenger.n) == (3, 2)
    assert result.diff == pytest.approx(0.85 - 0.55)
    with pytest.raises(ValueError, match="expected 3 scores, got 2"):
        ab_result(a, b[:2], split, margin=0.0)
    with pytest.raises(ValueError, match="1 of its 3 frames have a labelled pixel"):
        ab_result(a, np.array([0.9, np.nan, np.nan]), split, margin=0.0)


class FakeRegistry:
    """The part of :class:`ModelRegistry` that :func:`apply_ab` uses, recording calls."""

    name = "fake"

    def __init__(self, aliases):
        self._aliases = dict(aliases)
        self.calls = []
        self.client = self

    def aliases(self):
        return dict(self._aliases)

    def promote(self, comparison=None, force=False):
        self.calls.append(("promote", comparison.wins, force))
        self._aliases = {"champion": self._aliases.pop("challenger")}
        return True

    def withdraw(self, version, decision, reason):
        self.calls.append(("withdraw", version, decision, reason))
        held = [a for a, v in self._aliases.items() if v == version]
        for alias in held:
            del self._aliases[alias]
        return held


@pytest.mark.parametrize(
    ("means", "expected", "aliases_after"),
    [
        ((0.5, 0.7), PROMOTE, {"champion": "2"}),
        ((0.7, 0.5), REJECT_CHALLENGER, {"champion": "1"}),
        ((0.6, 0.6), KEEP_CHAMPION, {"champion": "1", "challenger": "2"}),
    ],
)
def test_apply_ab_acts_on_the_recommendation_for_the_tested_pair(means, expected, aliases_after):
    split = split_traffic(100, 0.1, seed=0)
    a, b = _scores(split, *means, sd=0.05)
    result = ab_result(a, b, split, margin=0.01, champion_version="1", challenger_version="2")
    assert result.recommendation == expected
    registry = FakeRegistry({"champion": "1", "challenger": "2"})
    message = apply_ab(registry, result, "test")
    assert registry.aliases() == aliases_after
    if expected == PROMOTE:
        assert registry.calls == [("promote", True, False)]
        assert message == "champion of fake is now version 2"
    elif expected == REJECT_CHALLENGER:
        ((call, version, decision, reason),) = registry.calls
        assert (call, version, decision) == ("withdraw", "2", "rejected")
        assert reason.startswith("test: ") and "worse" in reason
        assert "champion version 1 serves all frames" in message
    else:
        assert registry.calls == [] and message.startswith("nothing changed")
    # the registry moved since the A/B: nothing is done
    moved = FakeRegistry({"champion": "1", "challenger": "3"})
    with pytest.raises(RegistryError, match="run the A/B again"):
        apply_ab(moved, result)
    assert moved.calls == []


# --------------------------------------------------------------------------- end to end
class Decoder(nn.Module):
    """Reads the label off the red channel (``label * 20`` grey levels); with ``weak`` it
    answers class 0 wherever the green channel is above half, about half the pixels."""

    def __init__(self, weak: bool, num_classes: int = 11) -> None:
        super().__init__()
        self.weak = weak
        self.register_buffer("classes", torch.arange(num_classes, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = x[:, 0:1] * (255.0 / 20.0)
        logits = -((level - self.classes.view(1, -1, 1, 1)) ** 2)
        if self.weak:
            bonus = (x[:, 1:2] > 0.5).float() * 1000.0
            logits = torch.cat([logits[:, :1] + bonus, logits[:, 1:]], dim=1)
        return logits


def write_frames(root, taxonomy, n=FRAMES, seed=0):
    from simulation.dataset import DatasetWriter, shard_ranges
    from simulation.frames import FrameBatch

    rng = np.random.default_rng(seed)
    masks = rng.integers(0, taxonomy.num_classes, (n, H, W)).astype(np.uint8)
    images = np.zeros((n, H, W, 3), np.uint8)
    images[..., 0] = masks * 20
    images[..., 1] = rng.integers(0, 256, (n, H, W))
    writer = DatasetWriter(root, n, 16, {"taxonomy_hash": taxonomy.hash, "kind": "ab-test"})
    for k in writer.open():
        r = shard_ranges(n, 16)[k]
        records = [{"index": i, "seed": 0, "group": "day_clear", "params": {}} for i in r]
        writer.write_shard(
            k, FrameBatch(images[r.start : r.stop], masks[r.start : r.stop], records)
        )
    writer.finalize(taxonomy.num_classes, taxonomy.classes)
    return root


#: The registry settings a stage run's ``config.yaml`` carries (``configs/train.yaml``).
RUN_CONFIG = {"registry": {"metric": "pixel_acc", "margin": 0.01, "confidence": 0.9}}


def make_store(root, taxonomy, export: bool):
    """``<root>/out/mlflow.db`` with a ``weak`` and a ``perfect`` run, each with the
    ``config.yaml`` a stage run logs and a logged model (the exported :class:`Decoder` when
    ``export``, else an empty logged-model entry: registrable, not loadable, and a third
    run ``no_config`` without the config), and 40 labelled frames in ``<root>/new_batch``."""
    import mlflow

    from training import tracking

    out = root / "out"
    out.mkdir()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        client = mlflow.MlflowClient(uri)
        exp = client.create_experiment("ab-test", artifact_location=(root / "art").as_uri())
        runs = {}
        for label in ("weak", "perfect") if export else ("weak", "perfect", "no_config"):
            run_id = client.create_run(exp, tags={"stage": "finetune"}).info.run_id
            if label != "no_config":
                client.log_dict(run_id, RUN_CONFIG, "config.yaml")
            if export:
                tracking.log_model(run_id, Decoder(label == "weak"), H, W, uri=uri)
            else:
                client.create_logged_model(exp, name="model", source_run_id=run_id)
            client.set_terminated(run_id)
            runs[label] = run_id
        mlflow.set_tracking_uri(None)
    data = write_frames(root / "new_batch", taxonomy)
    return {"uri": uri, "out": out, "runs": runs, "data": data}


@pytest.fixture(scope="module")
def ab_store(tmp_path_factory, taxonomy):
    """Two exported models (about 10 s each on 2 shared cores): for the slow test."""
    return make_store(tmp_path_factory.mktemp("ab"), taxonomy, export=True)


@pytest.fixture
def bare_store(tmp_path, taxonomy):
    """Registrable models that cannot be loaded: for what must stop before a model loads."""
    return make_store(tmp_path, taxonomy, export=False)


def monitor(store, name, *overrides):
    from scripts.monitor import run_monitor

    cfg = compose_config(
        "monitor",
        [
            "action=ab",
            f"paths.output={store['out']}",
            f"registry.name={name}",
            f"current.root={store['data']}",
            "traffic.share=0.25",
            *overrides,
        ],
    )
    run_monitor(cfg)


def reports(store, name):
    return sorted((store["out"] / "monitor").glob(f"ab-{name}-v*.json"))


@pytest.mark.slow  # ~ 8 models loaded from the registry
def test_monitor_ab_routes_reports_promotes_and_rejects(ab_store, capsys):
    name = "ab-seg"
    registry = ModelRegistry(ab_store["uri"], name=name)
    assert registry.register(ab_store["runs"]["weak"]) == "1"
    assert registry.register(ab_store["runs"]["perfect"]) == "2"

    # report only: the perfect challenger wins by far, nothing moves
    monitor(ab_store, name)
    console = capsys.readouterr().out
    assert "40 frames of" in console and "25% (10) to challenger version 2" in console
    assert "per-frame pixel_acc, margin 0.01" in console  # the champion run's registry settings
    assert "challenger v2: n 10 (of 10 routed), mean 1.0000, 90% CI [1.0000, 1.0000]" in console
    assert "-> promote: the challenger is better by more than 0.01" in console
    assert "not acted on (traffic.apply=false)" in console
    assert registry.aliases() == {"champion": "1", "challenger": "2"}
    [first] = reports(ab_store, name)
    content = json.loads(first.read_text())
    routed = content["routed"]
    assert len(routed["challenger"]["index"]) == 10 and len(routed["champion"]["index"]) == 30
    assert sorted(routed["challenger"]["index"] + routed["champion"]["index"]) == list(range(40))
    np.testing.assert_array_equal(
        routed["challenger"]["index"], split_traffic(40, 0.25, 0).challenger
    )
    assert routed["challenger"]["score"] == [1.0] * 10
    weak = np.array(routed["champion"]["score"])
    assert 0.4 < weak.mean() < 0.7 and weak.std() > 0  # class 0 on about half the pixels
    assert content["champion"]["mean"] == pytest.approx(weak.mean())
    assert content["recommendation"] == PROMOTE and content["applied"] is False
    assert content["confidence"] == 0.9 and content["df"] == pytest.approx(29.0)
    tags = registry.client.get_model_version(name, "2").tags
    assert tags["ab.recommendation"] == PROMOTE and tags["ab.report"] == str(first)
    assert tags["ab.challenger.n"] == "10" and tags["ab.applied"] == "False"

    # another seed routes other frames; the same seed the same ones (first report above)
    monitor(ab_store, name, "traffic.seed=1")
    capsys.readouterr()
    second = json.loads(reports(ab_store, name)[-1].read_text())
    assert second["routed"]["challenger"]["index"] != routed["challenger"]["index"]
    assert second["seed"] == 1

    # act on it: the challenger becomes champion, recorded as a promotion with its interval
    monitor(ab_store, name, "traffic.apply=true")
    assert "champion of ab-seg is now version 2" in capsys.readouterr().out
    assert registry.aliases() == {"champion": "2"}
    assert registry.client.get_model_version(name, "2").tags["decision"] == "promoted"
    assert "won A/B comparison" in registry.history()[-1]["reason"]

    # a weak challenger on the same frames is pulled off its share; the champion stays
    assert registry.register(ab_store["runs"]["weak"]) == "3"
    monitor(ab_store, name, "traffic.apply=true", "traffic.metric=miou", "traffic.margin=0.02")
    console = capsys.readouterr().out
    assert "per-frame miou, margin 0.02" in console
    assert "-> reject_challenger: the challenger is worse" in console
    assert "version 3 of ab-seg is no longer the challenger" in console
    assert registry.aliases() == {"champion": "2"}
    tags = registry.client.get_model_version(name, "3").tags
    assert tags["decision"] == "rejected" and "reject_challenger" in tags["decision_reason"]
    assert tags["ab.metric"] == "miou" and tags["ab.applied"] == "True"

    # nothing left to test
    with pytest.raises(RegistryError, match="model 'ab-seg' has no challenger to A/B-test"):
        monitor(ab_store, name)


@pytest.mark.slow  # a fresh MLflow store (its migrations): ~14 s on 2 busy cores
def test_monitor_ab_refuses_bad_input_before_loading_a_model(bare_store, monkeypatch, tmp_path):
    def no_load(self, *args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ModelRegistry, "load", no_load)
    ab_store = bare_store
    name = "ab-bad"
    registry = ModelRegistry(ab_store["uri"], name=name)
    registry.register(ab_store["runs"]["weak"])
    with pytest.raises(RegistryError, match="has no challenger"):
        monitor(ab_store, name)
    registry.register(ab_store["runs"]["perfect"])
    # the share is checked first of all: before the store is even looked for
    empty = {**ab_store, "out": tmp_path / "nothing"}  # no store there
    with pytest.raises(ConfigError, match=r"traffic.share: expected a number in \(0, 1\), got 1.5"):
        monitor(empty, name, "traffic.share=1.5")
    with pytest.raises(ConfigError, match=r"traffic.share: 0.01 of the 40 frames .* routes 0"):
        monitor(ab_store, name, "traffic.share=0.01")
    with pytest.raises(ConfigError, match="traffic.metric: expected one of miou, pixel_acc"):
        monitor(ab_store, name, "traffic.metric=f1")
    with pytest.raises(ConfigError, match="current.root: the labelled real frames to route"):
        monitor(ab_store, name, "current.root=null")
    with pytest.raises(ConfigError, match="action: expected 'check', 'rollback', 'ab'"):
        monitor(ab_store, name, "action=traffic")
    assert registry.aliases() == {"champion": "1", "challenger": "2"}
    assert not reports(ab_store, name)

    # null metric / margin / confidence come from the champion's run config: none there
    other = ModelRegistry(ab_store["uri"], name="ab-no-config")
    other.register(ab_store["runs"]["no_config"])
    other.register(ab_store["runs"]["perfect"])
    with pytest.raises(ConfigError) as err:
        monitor(ab_store, other.name)
    assert str(err.value).startswith(
        "traffic.metric, traffic.margin, traffic.confidence: null takes the registry settings "
        "of the champion's run config (its config.yaml), which model 'ab-no-config' lacks"
    )
    with pytest.raises(ConfigError, match=r"^traffic.margin: null takes"):
        monitor(ab_store, other.name, "traffic.metric=miou", "traffic.confidence=0.9")
    # all three given: past every check, up to loading the models
    explicit = ["traffic.metric=miou", "traffic.margin=0.0", "traffic.confidence=0.9"]
    with pytest.raises(AssertionError, match="a model was loaded"):
        monitor(ab_store, other.name, *explicit)


@pytest.mark.slow  # a subprocess: imports torch and mlflow
def test_monitor_script_names_the_share_and_exits_2(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/monitor.py"), "action=ab", "traffic.share=0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
            "OMP_NUM_THREADS": "1",
        },
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "monitor: traffic.share: expected a number in (0, 1), got 0" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "outputs" / "mlflow.db").exists()
