"""Champion/challenger registry (risk T-01) against a real local MLflow store (SQLite)."""

from __future__ import annotations

import math
import os

import mlflow
import numpy as np
import pytest
import torch
from torch import nn

from training import tracking
from training.risk.registry import (
    Comparison,
    ModelRegistry,
    RegistryError,
    compare_scores,
    paired_bootstrap_ci,
    per_image_scores,
)

H = W = 8
NUM_CLASSES = 3


class TinySegNet(nn.Module):
    """A 1x1-conv segmenter: ``(B, 3, H, W) -> (B, C, H, W)`` logits."""

    arch = "conv1x1"

    def __init__(self, num_classes: int = NUM_CLASSES, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Conv2d(3, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class FixedLabels(nn.Module):
    """Predicts a given label map for every input (one-hot logits), for hand-made scores."""

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("logits", nn.functional.one_hot(labels, num_classes).permute(2, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.float().expand(x.shape[0], -1, -1, -1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store with two runs, each having logged a TinySegNet (logging = export,
    a few seconds each, so it is shared; each test uses its own registered-model name)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # tracking.log_model logs through the fluent API
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("registry-test", artifact_location=(root / "art").as_uri())
    models, run_ids = [], []
    for seed, miou in [(1, 0.40), (2, 0.55)]:
        run = client.create_run(exp, tags={"stage": "finetune", "git_commit": f"abc{seed}"})
        client.log_metric(run.info.run_id, "val/real/miou", miou)
        model = TinySegNet(seed=seed)
        tracking.log_model(run.info.run_id, model, H, W)
        client.set_terminated(run.info.run_id)
        models.append(model.eval())
        run_ids.append(run.info.run_id)
    yield {"uri": uri, "run_ids": run_ids, "models": models}
    # put back what was there: no URI at all, not MLflow's default exported as if configured
    # (a leaked MLFLOW_TRACKING_URI would send every later test's runs elsewhere)
    mlflow.set_tracking_uri(None)
    if previous_env is not None:
        os.environ["MLFLOW_TRACKING_URI"] = previous_env


@pytest.fixture
def registry(store, request):
    """A fresh registered model (name per test) with v1 = champion, v2 = challenger."""
    reg = ModelRegistry(store["uri"], name=f"seg-{request.node.name}")
    assert reg.register(store["run_ids"][0]) == "1"
    assert reg.register(store["run_ids"][1], tags={"note": "retrained"}) == "2"
    return reg


def probe() -> torch.Tensor:
    return torch.linspace(0, 1, 3 * H * W).reshape(1, 3, H, W)


def scorer(store, champion_scores: np.ndarray, challenger_scores: np.ndarray):
    """``evaluate_fn`` that recognises which logged model it got by its output on a probe."""
    expected = store["models"][1](probe())

    def evaluate(model: nn.Module) -> np.ndarray:
        with torch.no_grad():
            is_second = torch.allclose(model(probe()), expected, atol=1e-6)
        return challenger_scores if is_second else champion_scores

    return evaluate


def test_register_sets_aliases_tags_and_loads(store, registry):
    assert registry.aliases() == {"champion": "1", "challenger": "2"}
    tags = registry.client.get_model_version(registry.name, "2").tags
    assert tags["stage"] == "finetune"
    assert tags["git_commit"] == "abc2"
    assert float(tags["metric.val/real/miou"]) == pytest.approx(0.55)
    assert tags["note"] == "retrained"
    assert "registered_at" in tags
    assert registry.client.get_model_version(registry.name, "1").tags["decision"] == (
        "first_champion"
    )
    assert [h["version"] for h in registry.history()] == ["1"]

    x = probe()
    for ref, model in [("champion", store["models"][0]), (2, store["models"][1])]:
        loaded = registry.load(ref)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(RegistryError, match="no alias 'staging'"):
        registry.load("staging")

    # The loaded model is a torch.export graph fixed to batch 1: per-image forward copes.
    batches = [{"image": torch.rand(2, 3, H, W), "mask": torch.randint(0, NUM_CLASSES, (2, H, W))}]
    np.testing.assert_allclose(
        per_image_scores(registry.load("champion"), batches, NUM_CLASSES),
        per_image_scores(store["models"][0], batches, NUM_CLASSES, batch_forward=True),
    )

    info = registry.describe()
    assert [v["version"] for v in info["versions"]] == ["1", "2"]
    assert info["versions"][0]["aliases"] == ["champion"]
    assert info["aliases"] == {"champion": "1", "challenger": "2"}


def test_clear_winner_is_promoted(store, registry):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.7, 60)
    champion = base + rng.normal(0, 0.01, 60)
    challenger = base + 0.10 + rng.normal(0, 0.01, 60)

    cmp = registry.compare(scorer(store, champion, challenger), margin=0.02)
    assert (cmp.champion_version, cmp.challenger_version) == ("1", "2")
    assert cmp.n == 60
    assert cmp.diff == pytest.approx(0.10, abs=0.01)
    assert cmp.ci_low > 0.02 and cmp.wins

    assert registry.promote(cmp) is True
    assert registry.aliases() == {"champion": "2"}
    new = registry.client.get_model_version(registry.name, "2").tags
    assert new["decision"] == "promoted"
    assert new["previous_champion"] == "1"
    assert float(new["compare.ci_low"]) == pytest.approx(cmp.ci_low)
    assert new["compare.wins"] == "True"
    assert registry.client.get_model_version(registry.name, "1").tags["superseded_by"] == "2"
    history = registry.history()
    assert [(h["version"], h["previous"]) for h in history] == [("1", None), ("2", "1")]
    assert "won A/B comparison" in history[-1]["reason"]


def test_challenger_within_noise_is_not_promoted(store, registry):
    rng = np.random.default_rng(1)
    base = rng.uniform(0.3, 0.7, 60)
    champion = base + rng.normal(0, 0.02, 60)
    challenger = base + 0.005 + rng.normal(0, 0.02, 60)

    cmp = registry.compare(scorer(store, champion, challenger), margin=0.01)
    assert not cmp.wins
    assert registry.promote(cmp) is False
    assert registry.aliases() == {"champion": "1", "challenger": "2"}
    tags = registry.client.get_model_version(registry.name, "2").tags
    assert tags["decision"] == "rejected"
    assert tags["compare.wins"] == "False"
    assert [h["version"] for h in registry.history()] == ["1"]


def test_promote_refuses_stale_or_missing_evidence(registry):
    with pytest.raises(ValueError, match="force=True"):
        registry.promote()
    stale = compare_scores(np.zeros(5), np.ones(5), champion_version="1", challenger_version="7")
    with pytest.raises(RegistryError, match="compare again"):
        registry.promote(stale)
    assert registry.aliases() == {"champion": "1", "challenger": "2"}


def test_rollback_restores_previous_champion_once(registry):
    assert registry.promote(force=True) is True
    assert registry.client.get_model_version(registry.name, "2").tags["decision"] == "forced"
    with pytest.raises(RegistryError, match="no 'challenger'"):
        registry.promote(force=True)

    assert registry.rollback(reason="real-domain mIoU dropped") == "1"
    assert registry.aliases() == {"champion": "1"}
    tags = registry.client.get_model_version(registry.name, "2").tags
    assert tags["decision"] == "rolled_back"
    assert tags["rollback_reason"] == "real-domain mIoU dropped"
    assert "restored_at" in registry.client.get_model_version(registry.name, "1").tags
    assert [h["version"] for h in registry.history()] == ["1"]

    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback()
    assert registry.aliases() == {"champion": "1"}


def test_bootstrap_is_seeded_and_covers_the_true_diff():
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 0.05, 100)
    diffs = 0.05 + np.concatenate([noise, -noise])  # sample mean exactly the true 0.05
    low, high = paired_bootstrap_ci(diffs, confidence=0.95, n_boot=2000, seed=7)
    assert low < 0.05 < high
    assert high - low < 0.03  # se ~ 0.05 / sqrt(200): the interval is not vacuous
    assert paired_bootstrap_ci(diffs, 0.95, 2000, seed=7) == (low, high)
    assert paired_bootstrap_ci(diffs, 0.95, 2000, seed=8) != (low, high)
    # A wider confidence gives a wider interval.
    low99, high99 = paired_bootstrap_ci(diffs, confidence=0.99, n_boot=2000, seed=7)
    assert low99 <= low and high99 >= high


def test_compare_scores_drops_unscored_images_and_checks_shapes():
    a = np.array([0.5, math.nan, 0.4, 0.6])
    b = np.array([0.7, 0.9, 0.6, 0.8])
    cmp = compare_scores(a, b, margin=0.1, n_boot=200)
    assert isinstance(cmp, Comparison)
    assert cmp.n == 3
    assert cmp.diff == pytest.approx(0.2)
    assert cmp.ci_low == pytest.approx(0.2) and cmp.wins  # identical gains: no spread
    with pytest.raises(ValueError, match="same images"):
        compare_scores(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="at least 2"):
        compare_scores(np.array([0.1]), np.array([0.2]))


def test_per_image_scores_match_hand_computed_values():
    labels = torch.tensor([[0, 1], [1, 1]])
    model = FixedLabels(labels, num_classes=2)
    masks = torch.tensor(
        [
            [[0, 1], [0, 255]],  # 3 labelled pixels, 2 right
            [[255, 255], [255, 255]],  # nothing labelled: no score
            [[0, 1], [1, 1]],  # all right
        ]
    )
    batches = [
        {"image": torch.rand(2, 3, 2, 2), "mask": masks[:2]},
        {"image": torch.rand(1, 3, 2, 2), "mask": masks[2:]},
    ]
    acc = per_image_scores(model, batches, num_classes=2, metric="pixel_acc")
    np.testing.assert_allclose(acc, [2 / 3, math.nan, 1.0])
    # Image 0: road TP 1, FN 1 -> IoU 1/2; sky TP 1, FP 1 -> IoU 1/2.
    miou = per_image_scores(model, batches, num_classes=2, metric="miou", batch_forward=True)
    np.testing.assert_allclose(miou, [0.5, math.nan, 1.0])
    with pytest.raises(ValueError, match="metric"):
        per_image_scores(model, batches, num_classes=2, metric="f1")  # type: ignore[arg-type]
