"""Self-training pieces: the EMA teacher, pseudo-labels, ClassMix, MIC, bad settings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptation.plugin import ModelInfo, StepOutputs
from adaptation.self_training import (
    IGNORE,
    SelfTraining,
    SelfTrainingObjective,
    classmix,
    classmix_masks,
    ema_momentum,
    ema_update,
    patch_mask,
    pseudo_labels,
    teacher_update,
)
from core.config import ConfigError


class Tiny(nn.Module):
    """``(B, 3, H, W) -> (B, C, H, W)`` logits, with BatchNorm (float and int buffers)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 1)
        self.norm = nn.BatchNorm2d(classes)
        self.seen: list[torch.Tensor] = []

    def forward_features(self, x):
        self.seen.append(x.detach().clone())
        logits = self.norm(self.conv(x))
        return logits, logits

    def forward(self, x):
        return self.forward_features(x)[0]


def test_ema_update_is_exact_for_parameters_and_buffers():
    torch.manual_seed(0)
    teacher, student = Tiny(), Tiny()
    student.norm.running_mean += 1.0
    student.norm.num_batches_tracked += 7
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.9)
    after, s = teacher.state_dict(), student.state_dict()
    for key, value in after.items():
        if value.dtype.is_floating_point:
            assert torch.allclose(value, 0.9 * before[key] + 0.1 * s[key]), key
        else:
            assert torch.equal(value, s[key]), key


def test_ema_momentum_follows_the_step():
    assert ema_momentum(0, 0.999) == 0.0  # the first update copies the student
    assert ema_momentum(1, 0.999) == 0.5
    assert ema_momentum(10_000, 0.999) == 0.999


def test_the_teacher_moves_on_training_steps_only():
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = Tiny()
            self.objective = SelfTrainingObjective(
                self.model, lambda: iter(()), 0.5, 1.0, False, 0.0, 4, 0, 3
            )

        def training_step(self, batch, idx):
            return self.model(batch[0]).pow(2).mean()

        def validation_step(self, batch, idx):
            self.model(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.5)

    module = Module()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(4, 3, 4, 4)))
    kw = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
          "enable_model_summary": False}  # fmt: skip
    callback = teacher_update(module.objective, momentum=0.5)
    start = {k: v.clone() for k, v in module.objective.teacher.state_dict().items()}
    pl.Trainer(callbacks=[callback], **kw).validate(module, data, verbose=False)
    for key, value in module.objective.teacher.state_dict().items():
        assert torch.equal(value, start[key]), key  # validation never updates it
    pl.Trainer(callbacks=[callback], max_steps=2, **kw).fit(module, data)
    assert not torch.equal(module.objective.teacher.conv.weight, start["conv.weight"])


def test_pseudo_labels_below_the_threshold_are_ignored():
    logits = torch.tensor([[[[4.0, 0.1]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    labels, confidence, quality = pseudo_labels(logits, threshold=0.9)
    assert labels.tolist() == [[[0, IGNORE]]]
    assert confidence[0, 0, 0] > 0.9 > confidence[0, 0, 1]
    assert quality.tolist() == [0.5]


def test_classmix_mixes_image_and_label_with_the_same_mask():
    g = torch.Generator().manual_seed(0)
    src_labels = torch.tensor([[[0, 1], [2, IGNORE]]])
    mask = classmix_masks(src_labels, g)
    assert not mask[0, 1, 1]  # ignored pixels are never pasted
    assert 1 <= int(mask.sum()) <= 2  # half of the three classes, rounded up
    src, tgt = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    tgt_labels = torch.full((1, 2, 2), 7)
    images, labels = classmix(src, src_labels, tgt, tgt_labels, mask)
    assert torch.equal(images[0, 0] == 1, mask[0])
    assert torch.equal(labels == src_labels, mask | (src_labels == 7))
    assert torch.equal(labels[~mask], tgt_labels[~mask])


def test_patch_mask_hides_whole_patches_at_the_ratio():
    g = torch.Generator().manual_seed(0)
    keep = patch_mask((64, 32, 32), patch=8, ratio=0.7, generator=g)
    cells = keep[:, ::8, ::8]
    assert torch.equal(keep, cells.repeat_interleave(8, 1).repeat_interleave(8, 2))
    assert abs(1 - cells.float().mean().item() - 0.7) < 0.05


def test_mic_masks_the_students_input_only():
    torch.manual_seed(0)
    student = Tiny()
    real = torch.rand(2, 3, 8, 8) + 0.5  # no zero pixel: a hidden one is visible
    objective = SelfTrainingObjective(
        student, lambda: iter([{"image": real}]), 0.01, 1.0, False, 0.5, 4, 0, 3
    )
    teacher = objective.teacher
    teacher.seen = []
    student.seen = []
    batch = {"image": torch.rand(2, 3, 8, 8), "mask": torch.zeros(2, 8, 8, dtype=torch.long)}
    logits, feats = student.forward_features(batch["image"])
    student.seen = []
    outputs = StepOutputs(logits, feats, student.forward_features, step=3, total_steps=10)
    loss, logs = objective(batch, outputs)
    assert torch.equal(teacher.seen[0], real)  # the teacher sees the whole image
    masked = student.seen[0]
    assert (masked == 0).any() and not torch.equal(masked, real)
    assert loss.requires_grad and "self_training/loss_mic" in logs
    assert "self_training/agreement" not in logs  # measured every AGREEMENT_EVERY steps
    outputs = StepOutputs(logits, feats, student.forward_features, step=10, total_steps=20)
    objective._batches = iter([{"image": real}])
    _, logs = objective(batch, outputs)
    assert 0.0 <= float(logs["self_training/agreement"]) <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 1.0}, r"adaptation.self_training.threshold: expected a number in \(0, 1\)"),
        ({"threshold": 0.0}, r"adaptation.self_training.threshold"),
        ({"momentum": 1.0}, r"adaptation.self_training.momentum: expected a number in \[0, 1\)"),
        ({"mic_ratio": 1.5}, r"adaptation.self_training.mic_ratio: expected a number in \[0, 1\]"),
        ({"mix_ratio": -0.1}, r"adaptation.self_training.mix_ratio: expected a number in \[0, 1\]"),
        ({"image_every": -1}, r"adaptation.self_training.image_every"),
    ],
)
def test_bad_settings_name_the_key(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SelfTraining(["source_only"], **kwargs)


def test_no_unlabelled_images_is_refused():
    info = ModelInfo(3, 3, unlabeled=None, seed=0, student=Tiny())
    with pytest.raises(ConfigError, match="data.datasets.real_unlabeled: self-training needs"):
        SelfTraining(["source_only"]).objective(info)


class Linear(nn.Module):
    """A per-pixel linear classifier ``(B, 3, H, W) -> (B, 2, H, W)`` (no BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward_features(self, x):
        logits = self.conv(x)
        return logits, logits

    def forward(self, x):
        return self.conv(x)


def _shifted_domain(gen, n, shift):
    """Images whose left half is class 0 (channel 0 near -1), right half class 1 (near +1),
    every value moved by ``shift``: the target is a colour-shifted copy of the source."""
    labels = torch.zeros(n, 8, 8, dtype=torch.long)
    labels[:, :, 4:] = 1
    images = (labels.float() * 2 - 1).unsqueeze(1).repeat(1, 3, 1, 1)
    images = images + 0.35 * torch.randn(images.shape, generator=gen) + shift
    return images, labels


def _accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def test_self_training_beats_source_only_on_a_colour_shifted_target():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = Linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ce = nn.CrossEntropyLoss()
    for _ in range(100):  # source only
        x, y = _shifted_domain(gen, 8, 0.0)
        opt.zero_grad()
        ce(model(x), y).backward()
        opt.step()
    test_x, test_y = _shifted_domain(torch.Generator().manual_seed(9), 64, 0.9)
    source_only = _accuracy(model, test_x, test_y)

    def real():
        while True:
            yield {"image": _shifted_domain(gen, 8, 0.9)[0]}

    objective = SelfTrainingObjective(model, real, 0.6, 1.0, True, 0.0, 4, 0, 2)
    for step in range(400):
        x, y = _shifted_domain(gen, 8, 0.0)
        logits, features = model.forward_features(x)
        outputs = StepOutputs(logits, features, model.forward_features, step, 400)
        term, logs = objective({"image": x, "mask": y}, outputs)
        opt.zero_grad()
        (ce(logits, y) + term).backward()
        opt.step()
        ema_update(objective.teacher, model, ema_momentum(step, 0.9))
    adapted = _accuracy(model, test_x, test_y)
    assert source_only < 0.9  # the shift costs the source model
    assert adapted > source_only + 0.1, (source_only, adapted)  # 0.84 -> 0.99 here
    assert logs["self_training/pseudo/0"] + logs["self_training/pseudo/1"] == pytest.approx(1)


def test_a_collapsed_teacher_raises_an_alert_and_the_grid_is_drawn(caplog):
    import numpy as np

    student = Tiny()
    objective = SelfTrainingObjective(
        student, lambda: iter(()), 0.5, 1.0, False, 0.0, 4, 0, 3, class_names=["a", "b", "c"]
    )
    objective.class_shares = torch.tensor([0.97, 0.02, 0.01])
    callback = teacher_update(objective, 0.9, palette=np.zeros((256, 3), np.uint8))
    tags, images = {}, {}

    class Experiment:
        def set_tag(self, run_id, key, value):
            tags[key] = value

    class Module:
        logger = type("L", (), {"experiment": Experiment(), "run_id": "r"})()

        def log_image(self, image, name):
            images[name] = image

    objective.example = (
        torch.rand(2, 3, 4, 5), torch.zeros(2, 4, 5, dtype=torch.long),
        torch.rand(2, 3, 4, 5), torch.ones(2, 4, 5, dtype=torch.long),
    )  # fmt: skip
    trainer = type("T", (), {"global_step": 3, "is_global_zero": True})()
    with caplog.at_level("WARNING"):
        callback.on_train_batch_end(trainer, Module())
    assert tags == {"alert/self_training_collapse": "a 0.970 at step 2"}
    assert "collapsed to one class (a 0.970 at step 2)" in caplog.text
    [(name, grid)] = images.items()
    from core.images import LABEL_BAND_PX

    assert name == "self_training/examples_step000002.png"
    assert grid.shape == (LABEL_BAND_PX + 8, 20, 3)  # a labelled strip over 2 rows of 4 panels
