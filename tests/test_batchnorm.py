"""Target BatchNorm statistics (AdaBN) and the domain-balanced task loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from training.batchnorm import recalibrate_batchnorm
from training.losses import SegmentationLoss
from training.task import SegmentationTask


def test_recalibration_sets_the_plain_average_and_restores_the_rest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.1)).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    batches = [torch.randn(5, 3, 6, 6) + 3.0, torch.randn(5, 3, 6, 6) - 1.0]
    assert recalibrate_batchnorm(model, batches) == 2
    norm = model[1]
    with torch.no_grad():
        outs = [model[0](b) for b in batches]
    mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(norm.running_mean, mean)
    torch.testing.assert_close(norm.running_var, var)
    assert norm.momentum == 0.1 and not model.training  # settings and mode restored
    for key, value in weights.items():
        if key != "1.num_batches_tracked":
            assert torch.equal(model.state_dict()[key], value), key


def test_no_batch_leaves_the_statistics_as_they_were():
    model = nn.BatchNorm2d(2)
    model.running_mean += 5
    assert recalibrate_batchnorm(model, []) == 0
    assert torch.equal(model.running_mean, torch.full((2,), 5.0))


def _task(share):
    model = nn.Conv2d(3, 2, 1)
    return SegmentationTask(
        model, SegmentationLoss(2), ["a", "b"], np.zeros((256, 3), np.uint8),
        channels_last=False, real_loss_share=share,
    )  # fmt: skip


def test_real_loss_share_weighs_each_domain_by_its_share():
    torch.manual_seed(0)
    logits = torch.randn(10, 2, 4, 4)
    batch = {
        "mask": torch.randint(0, 2, (10, 4, 4)),
        "domain": torch.tensor([0] * 9 + [1]),
    }
    loss = SegmentationLoss(2)
    sim, real = loss(logits[:9], batch["mask"][:9]), loss(logits[9:], batch["mask"][9:])
    torch.testing.assert_close(_task(0.5).task_loss(logits, batch), 0.5 * sim + 0.5 * real)
    torch.testing.assert_close(_task(None).task_loss(logits, batch), loss(logits, batch["mask"]))
    # one domain only: that domain's loss, whatever the share
    only_sim = {"mask": batch["mask"][:9], "domain": batch["domain"][:9]}
    torch.testing.assert_close(_task(0.5).task_loss(logits[:9], only_sim), sim)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("++stages.finetune.real_loss_share=1.5", r"stages.finetune.real_loss_share: expected"),
        ("++stages.finetune.bn_recalibration=-1", r"stages.finetune.bn_recalibration: expected"),
    ],
)
def test_bad_stage_values_name_the_key(override, match):
    from conftest import compose_config

    from core.config import ConfigError
    from training.stages.specs import stage_specs

    cfg = compose_config("train", [override])
    with pytest.raises(ConfigError, match=match):
        stage_specs(cfg.stages, cfg.retries)
