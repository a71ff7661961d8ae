"""A CycleGAN interrupted mid-training and resumed ends with the weights of one that ran
through: the data order, the image pools and the optimizers all come back."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from adaptation.cyclegan.module import CycleGAN
from adaptation.cyclegan.stage import CycleGANTranslation, StepSampler
from adaptation.plugin import RunValues
from training.stages.specs import TrackingSpec
from training.stages.store import StageStore

CLASSES = ("a", "b")


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 16, 32, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i]}


class Env:
    """The run's side of the plug-in contract, reduced to the stage store."""

    def __init__(self, out: Path) -> None:
        from functools import partial

        import pytorch_lightning as pl

        uri = f"sqlite:///{out / 'mlflow.db'}"
        tracking = TrackingSpec(uri, "resume", "", "", (out / "artifacts").as_uri())
        make_trainer = partial(
            pl.Trainer, accelerator="cpu", devices=1, enable_model_summary=False,
            enable_checkpointing=True,
        )  # fmt: skip
        self.store = StageStore(out, tracking, "resume", make_trainer, retries=0)
        self.num_workers, self.log_model = 0, False
        self.data_dir, self.output_dir, self.tracking_uri = out / "data", out, uri

    def finished(self, kind, digest):
        return self.store.finished(kind, digest)

    def open(self, kind, digest, tags=None):
        return self.store.open(kind, digest, tags)

    def lock(self, name, what, data=False):
        return contextlib.nullcontext()


def run_values() -> RunValues:
    return RunValues(
        seed=3, image_size=(16, 32), class_names=CLASSES, data={"datasets": {}},
        precision="32-true", stage_key=lambda name: "x", stage_names=("source_only",),
    )  # fmt: skip


def plugin() -> CycleGANTranslation:
    model = {
        "_target_": "adaptation.cyclegan.CycleGAN", "g_ngf": 4, "g_blocks": 1, "d_ndf": 4,
        "d_layers": 1, "pool_size": 3, "lambda_semantic": 0.0,
    }  # fmt: skip
    return CycleGANTranslation(
        ["source_only"], model, segmenter=None, batch_size=2, max_batches=7, image_every=2
    )


def train(out: Path) -> dict[str, torch.Tensor]:
    datasets = {"sim_train": Images(5, 0), "real_train": Images(4, 1)}
    record = plugin()._train(run_values(), Env(out), datasets, None)
    return torch.load(record.values["generator"], weights_only=True)["state_dict"]


def test_step_sampler_starts_where_the_checkpoint_ends():
    full = StepSampler(5, seed=1)
    stream = iter(full)
    expected = [next(stream) for _ in range(13)]
    resumed = iter(StepSampler(5, seed=1, start=lambda: 7))
    assert [next(resumed) for _ in range(6)] == expected[7:]
    assert sorted(expected[:5]) == list(range(5))  # each epoch a permutation


@pytest.mark.slow
def test_a_resumed_cyclegan_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    straight = train(tmp_path / "straight")

    original = CycleGAN.training_step
    state = {"failed": False}

    def killed_at_batch_5(self, batch, batch_idx):
        if self.trainer.global_step >= 10 and not state["failed"]:  # 2 optimizer steps a batch
            state["failed"] = True
            raise RuntimeError("spot instance reclaimed")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(CycleGAN, "training_step", killed_at_batch_5)
    with pytest.raises(RuntimeError, match="spot instance"):
        train(tmp_path / "resumed")
    assert (tmp_path / "resumed" / "runs").exists()
    resumed = train(tmp_path / "resumed")  # from the checkpoint after batch 4
    assert state["failed"]
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
