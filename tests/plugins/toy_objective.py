"""A toy task-level plug-in: an entropy penalty on the student's predictions.

It exists to show that a method arrives as one module plus one config node, with no edit
to the loop or the task: ``+adaptation.toy={_target_: tests.plugins.toy_objective.Entropy,
stages: [source_only], weight: 0.1}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from adaptation.plugin import ModelInfo, Objective, StepOutputs, TaskAdaptation


class EntropyObjective(Objective):
    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, batch: Mapping[str, Any], outputs: StepOutputs):  # type: ignore[override]
        probs = outputs.logits.float().softmax(dim=1)
        entropy = -(probs * probs.clamp_min(1e-8).log()).sum(dim=1).mean()
        return self.weight * entropy, {"toy/entropy": entropy.detach(), "toy/step": outputs.step}


class Entropy(TaskAdaptation):
    def __init__(self, stages: Sequence[str], weight: float = 0.1) -> None:
        self.stages = list(stages)
        self.weight = float(weight)

    def objective(self, model: ModelInfo) -> EntropyObjective:
        assert model.num_classes > 1 and model.feature_channels > 0
        return EntropyObjective(self.weight)


class NotAPlugin:
    """Builds, but implements neither plug-in interface."""

    def __init__(self, stages: Sequence[str]) -> None:
        self.stages = list(stages)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=1)
    return -(probs * probs.clamp_min(1e-8).log()).sum(dim=1).mean()
