"""Augmentations and the sim/real DataModule, on tiny in-memory Sample datasets."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from core.config import ConfigError
from training.augment import Augment, AugmentedDataset
from training.datamodule import SimRealDataModule
from training.sampler import real_subset_indices

H, W = 8, 16


class TinySamples(Dataset):
    """``n`` Samples of one domain; item ``i`` has id ``"<prefix>/<i>"`` and pixel values
    that encode ``i``, so tests can tell which item (and which augmentation) they got."""

    def __init__(
        self,
        n: int,
        domain: int,
        labelled: bool = True,
        size: tuple[int, int] = (H, W),
        prefix: str | None = None,
    ) -> None:
        self.n, self.domain, self.labelled, self.size = n, domain, labelled, size
        self.prefix = prefix or ("sim" if domain == 0 else "real")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        h, w = self.size
        gen = torch.Generator().manual_seed(1000 * self.domain + i)
        sample: dict[str, Any] = {
            "image": torch.rand(3, h, w, generator=gen),
            "domain": self.domain,
            "group": "day" if i % 2 else "night",
            "id": f"{self.prefix}/{i}",
        }
        if self.labelled:
            sample["mask"] = torch.randint(0, 11, (h, w), generator=gen)
        return sample


def _index(sample_id: str) -> int:
    return int(sample_id.rsplit("/", 1)[1])


def _dm(**kwargs: Any) -> SimRealDataModule:
    args: dict[str, Any] = {
        "sim_train": TinySamples(60, 0),
        "sim_val": TinySamples(10, 0, prefix="simval"),
        "real_train": TinySamples(50, 1),
        "real_val": TinySamples(7, 1, prefix="realval"),
        "sim_ratio": 0.9,
        "real_fraction": 0.2,
        "batch_size": 20,
        "batches_per_epoch": 4,
        "val_batch_size": 4,
        "seed": 3,
    }
    args.update(kwargs)
    return SimRealDataModule(**args)


def _asymmetric_sample() -> dict[str, Any]:
    """Left half bright with label 1, right half dark with label 2."""
    image = torch.zeros(3, 16, 32)
    image[:, :, :16] = 0.8
    image[:, :, 16:] = 0.2
    mask = torch.full((16, 32), 2, dtype=torch.int64)
    mask[:, :16] = 1
    return {"image": image, "mask": mask, "domain": 0, "group": "day", "id": "x/0"}


# --- Augment ----------------------------------------------------------------------------
def test_augment_keeps_the_sample_contract() -> None:
    sample = TinySamples(1, 0)[0]
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
    out = Augment(scale=(0.5, 1.5), color_jitter=0.4, seed=1)(sample, key=(0, 0))
    assert out["image"].shape == (3, H, W) and out["image"].dtype == torch.float32
    assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) <= 1.0
    assert out["mask"].shape == (H, W) and out["mask"].dtype == torch.int64
    assert (out["domain"], out["group"], out["id"]) == (0, "night", "sim/0")
    for k, v in before.items():  # the input is not modified
        assert torch.equal(sample[k], v) if isinstance(v, torch.Tensor) else sample[k] == v


def test_augment_mask_holds_only_original_labels_or_ignore() -> None:
    sample = TinySamples(1, 0, size=(24, 40))[0]
    labels = set(sample["mask"].unique().tolist())
    aug = Augment(scale=(0.5, 1.5), color_jitter=0.3, seed=0)
    saw_pad = False
    for key in range(20):
        values = set(aug(sample, key=(0, key))["mask"].unique().tolist())
        assert values <= labels | {255}
        saw_pad |= 255 in values
    assert saw_pad  # scales < 1 pad with ignore


def test_augment_pads_image_with_zero_and_mask_with_ignore() -> None:
    sample = _asymmetric_sample()
    out = Augment(hflip=False, scale=(0.5, 0.5), seed=0)(sample, key=(0, 0))
    pad = out["mask"] == 255
    assert int(pad.sum()) == 16 * 32 - 8 * 16
    assert float(out["image"][:, pad].abs().max()) == 0.0
    # The kept half-size image still has both regions, labels where their pixels are.
    kept = ~pad
    assert set(out["mask"][kept].unique().tolist()) == {1, 2}


def test_augment_flips_image_and_mask_together() -> None:
    sample = _asymmetric_sample()
    aug = Augment(hflip=True, seed=0)
    flips = 0
    for key in range(16):
        out = aug(sample, key=(0, key))
        flipped = bool(out["mask"][0, 0] == 2)
        flips += flipped
        expected_left = 0.2 if flipped else 0.8
        assert torch.allclose(out["image"][:, :, 0], torch.full((3, 16), expected_left))
        expected = sample["mask"].flip(-1) if flipped else sample["mask"]
        assert torch.equal(out["mask"], expected)
    assert 0 < flips < 16


def test_augment_rescale_keeps_image_and_mask_aligned() -> None:
    sample = _asymmetric_sample()
    aug = Augment(scale=(0.6, 1.6), seed=4)
    for key in range(10):
        out = aug(sample, key=(1, key))
        labelled = out["mask"] != 255
        expected = torch.where(out["mask"] == 1, 0.8, 0.2)[labelled]
        agree = (out["image"][0][labelled] - expected).abs() < 1e-4
        # Only the resampled column at the 1/2 boundary may blend the two regions.
        assert float(agree.float().mean()) > 0.9


def test_augment_is_reproducible_by_key() -> None:
    sample = TinySamples(1, 1)[0]
    aug = Augment(scale=(0.7, 1.3), color_jitter=0.5, seed=9)
    a, b = aug(sample, key=(2, 5)), aug(sample, key=(2, 5))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    others = [
        aug(sample, key=(3, 5)),
        Augment(scale=(0.7, 1.3), color_jitter=0.5, seed=8)(sample, key=(2, 5)),
    ]
    assert all(not torch.equal(a["image"], o["image"]) for o in others)


def test_augment_without_mask() -> None:
    sample = TinySamples(1, 1, labelled=False)[0]
    out = Augment(scale=(0.5, 1.5), color_jitter=0.2)(sample, key=(0, 1))
    assert "mask" not in out and out["image"].shape == (3, H, W)


def test_augment_identity_when_disabled() -> None:
    sample = TinySamples(1, 0)[0]
    out = Augment(hflip=False)(sample, key=(0, 0))
    assert torch.equal(out["image"], sample["image"]) and torch.equal(out["mask"], sample["mask"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": (0.0, 1.0)}, "scale"),
        ({"scale": (1.5, 1.0)}, "scale"),
        ({"color_jitter": 2.0}, "color_jitter"),
        ({"seed": -1}, "seed"),
    ],
)
def test_augment_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Augment(**kwargs)


def test_augmented_dataset_keys_by_epoch_and_index() -> None:
    base = TinySamples(5, 0)
    aug = Augment(scale=(0.5, 1.5), color_jitter=0.3, seed=2)
    ds = AugmentedDataset(base, aug)
    assert len(ds) == 5
    expected = aug(base[3], key=(4, 3))
    assert torch.equal(ds[(4, 3)]["image"], expected["image"])
    ds.set_epoch(4)
    assert torch.equal(ds[3]["image"], expected["image"])
    assert torch.equal(ds[-2]["image"], expected["image"])  # same key however it is spelled
    ds.set_epoch(5)
    assert not torch.equal(ds[3]["image"], expected["image"])


# --- DataModule: training -----------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_batches_have_the_exact_ratio(num_workers: int) -> None:
    dm = _dm(num_workers=num_workers)
    loader = dm.train_dataloader()
    assert len(loader) == 4
    subset_ids = {f"real/{i}" for i in dm.real_train_indices}
    batches = list(loader)
    assert len(batches) == 4
    for batch in batches:
        assert batch["image"].shape == (20, 3, H, W) and batch["image"].dtype == torch.float32
        assert batch["mask"].shape == (20, H, W) and batch["mask"].dtype == torch.int64
        assert batch["domain"].dtype == torch.int64 and int(batch["domain"].sum()) == 2
        assert len(batch["group"]) == 20 and len(batch["id"]) == 20
        for d, sample_id in zip(batch["domain"].tolist(), batch["id"], strict=True):
            assert sample_id.startswith("sim/" if d == 0 else "real/")
            if d == 1:  # only the labelled real subset is trained on
                assert sample_id in subset_ids


def test_train_batches_do_not_depend_on_the_number_of_workers() -> None:
    aug = Augment(scale=(0.5, 1.5), color_jitter=0.2, seed=1)
    a = list(_dm(num_workers=0, augment=aug).train_dataloader())
    b = list(_dm(num_workers=2, augment=aug).train_dataloader())
    for x, y in zip(a, b, strict=True):
        assert x["id"] == y["id"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])


def test_epoch_reaches_augmentation_in_persistent_workers() -> None:
    aug = Augment(scale=(0.5, 1.5), color_jitter=0.3, seed=5)
    dm = _dm(num_workers=2, augment=aug, batches_per_epoch=2)
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    train_set = dm.train_dataset().dataset  # the un-augmented ConcatDataset
    for epoch in (0, 1, 2):
        dm.train_batch_sampler.set_epoch(epoch)  # what Lightning does each epoch
        batch = next(iter(loader))
        for row, sample_id in enumerate(batch["id"]):
            # Back from the Sample id to its index in ConcatDataset([sim(60), real subset]).
            index = _index(sample_id)
            if sample_id.startswith("real/"):
                index = 60 + dm.real_train_indices.index(index)
            expected = aug(train_set[index], key=(epoch, index))
            assert torch.equal(batch["image"][row], expected["image"])


def test_real_subset_is_the_seeded_fraction() -> None:
    dm = _dm(real_fraction=0.2, seed=3)
    assert dm.real_train_indices == real_subset_indices(50, 0.2, 3)
    assert dm.num_real_labelled == 10 == len(dm.real_subset)
    assert [s["id"] for s in dm.real_subset] == [f"real/{i}" for i in dm.real_train_indices]
    assert set(_dm(real_fraction=0.1).real_train_indices) < set(dm.real_train_indices)


def test_single_domain_training() -> None:
    sim_only = _dm(sim_ratio=1.0, real_train=None)
    assert all(int(b["domain"].sum()) == 0 for b in sim_only.train_dataloader())
    real_only = _dm(sim_ratio=0.0, sim_train=None, real_fraction=0.5)
    for batch in real_only.train_dataloader():
        assert batch["domain"].tolist() == [1] * 20


class _RecordDomains(pl.LightningModule):
    """Trivial model that records the domains and ids of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[int], list[str]]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen.append((self.current_epoch, batch["domain"].tolist(), list(batch["id"])))
        return (self.weight * batch["image"].mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_lightning_trainer_sees_the_ratio_and_new_batches_each_epoch() -> None:
    dm = _dm(batches_per_epoch=3, augment=Augment(seed=0), sim_val=None, real_val=None)
    model = _RecordDomains()
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert [epoch for epoch, _, _ in model.seen] == [0, 0, 0, 1, 1, 1]
    assert all(sum(domains) == 2 and len(domains) == 20 for _, domains, _ in model.seen)
    epoch_ids = [[ids for e, _, ids in model.seen if e == k] for k in (0, 1)]
    assert epoch_ids[0] != epoch_ids[1]
    # Epoch 1 is exactly what the sampler draws for epoch 1: set_epoch reached it.
    sampler = dm._batch_sampler(rank=0, world_size=1)
    sampler.set_epoch(1)
    train_set = dm.train_dataset().dataset
    expected = [[train_set[i]["id"] for _, i in b] for b in sampler]  # (epoch, index) pairs
    assert epoch_ids[1] == expected


def test_train_loader_uses_the_trainer_rank() -> None:
    dm = _dm(batches_per_epoch=2)

    class FakeTrainer:
        global_rank, world_size = 1, 3

    dm.trainer = FakeTrainer()  # type: ignore[assignment]
    dm.train_dataloader()
    assert (dm.train_batch_sampler.rank, dm.train_batch_sampler.world_size) == (1, 3)
    assert len(dm.train_dataloader()) == 2

    class LightningSplitTrainer(FakeTrainer):
        class _accelerator_connector:  # mirrors the Trainer's private attribute
            use_distributed_sampler = True

    dm.trainer = LightningSplitTrainer()  # type: ignore[assignment]
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        dm.train_dataloader()


# --- DataModule: evaluation and adaptation ------------------------------------------------
def test_val_and_test_loaders_names_and_order() -> None:
    dm = _dm()
    assert dm.val_names == ["sim", "real"]
    loaders = dm.val_dataloader()
    assert len(loaders) == 2
    sim_ids = [i for b in loaders[0] for i in b["id"]]
    real_ids = [i for b in loaders[1] for i in b["id"]]
    assert sim_ids == [f"simval/{i}" for i in range(10)]  # sequential, unshuffled
    assert real_ids == [f"realval/{i}" for i in range(7)]
    assert [len(b["id"]) for b in loaders[1]] == [4, 3]
    # No real_test: testing falls back to real_val.
    assert dm.test_names == ["sim", "real"]
    assert [i for b in dm.test_dataloader()[1] for i in b["id"]] == real_ids

    with_test = _dm(real_test=TinySamples(3, 1, prefix="realtest"), sim_val=None)
    assert with_test.val_names == ["real"] and with_test.test_names == ["real"]
    assert [i for b in with_test.test_dataloader()[0] for i in b["id"]] == [
        "realtest/0",
        "realtest/1",
        "realtest/2",
    ]


def test_unlabeled_loader_is_endless_and_maskless() -> None:
    dm = _dm(real_unlabeled=TinySamples(6, 1, labelled=False, prefix="unl"))
    batches = list(itertools.islice(iter(dm.unlabeled_dataloader(batch_size=4)), 5))
    assert len(batches) == 5  # 20 images from a pool of 6: it does not stop
    for batch in batches:
        assert "mask" not in batch and batch["image"].shape == (4, 3, H, W)
        assert batch["domain"].tolist() == [1, 1, 1, 1]
    ids = [i for b in batches for i in b["id"]]
    assert sorted(ids[:6]) == [f"unl/{i}" for i in range(6)]  # a pass before repeats

    fallback = _dm().unlabeled_dataloader()
    batch = next(iter(fallback))
    assert "mask" not in batch and batch["image"].shape[0] == 20
    assert all(i.startswith("real/") for i in batch["id"])
    with pytest.raises(ConfigError, match=r"^data\.datasets\.real_unlabeled: no unlabelled"):
        _dm(real_train=None, sim_ratio=1.0).unlabeled_dataloader()
    with pytest.raises(ValueError, match=r"unlabeled_dataloader\(batch_size=\.\.\.\)"):
        _dm().unlabeled_dataloader(batch_size=0)


def test_describe_counts() -> None:
    d = _dm(real_test=TinySamples(3, 1)).describe()
    assert d["num_sim_train"] == 60 and d["num_real_train_total"] == 50
    assert d["num_real_labelled"] == 10 and d["num_real_unlabeled"] == 50
    assert (d["batch_size"], d["batch_sim"], d["batch_real"]) == (20, 18, 2)
    assert (d["sim_ratio"], d["real_fraction"], d["batches_per_epoch"]) == (0.9, 0.2, 4)
    assert (d["num_sim_val"], d["num_real_val"], d["num_real_test"]) == (10, 7, 3)
    assert d["val_names"] == "sim,real" and d["augment"] == "none"


# --- DataModule: validation ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sim_ratio": 1.2}, r"^sim_ratio: expected a number in \[0, 1\]"),
        ({"real_fraction": -0.1}, r"^real_fraction: expected a number in \[0, 1\]"),
        ({"batch_size": 0}, r"^data\.loader\.batch_size: expected a whole number >= 1"),
        ({"batches_per_epoch": 0}, r"^data\.loader\.batches_per_epoch: expected a whole"),
        ({"val_batch_size": 0}, r"^data\.loader\.val_batch_size: expected a whole"),
        ({"num_workers": -1}, r"^data\.loader\.num_workers: expected a whole number >= 0"),
        ({"seed": -1}, r"^seed: expected a whole number >= 0"),
        ({"batch_size": 4}, r"^data\.loader\.batch_size=4 with sim_ratio=0\.9"),
        ({"sim_train": None}, r"^data\.datasets\.sim_train is not set.*no sim images"),
        ({"sim_train": TinySamples(0, 0)}, r"^data\.datasets\.sim_train is empty"),
        ({"real_fraction": 0.0}, r"^real_fraction=0\.0 leaves no real images \(0 of 50"),
        (
            {"real_train": None},
            r"^real_fraction=0\.2 leaves no real .*data\.datasets\.real_train is not set",
        ),
        (
            {"real_train": TinySamples(5, 1, labelled=False)},
            r"^data\.datasets\.real_train.*no 'mask'.*as data\.datasets\.real_unlabeled$",
        ),
        ({"real_train": TinySamples(5, 0)}, r"^data\.datasets\.real_train.*domain 0, expected 1"),
        ({"sim_val": TinySamples(5, 1)}, r"^data\.datasets\.sim_val.*domain 1, expected 0"),
        (
            {"real_train": TinySamples(50, 1, size=(4, 8))},
            r"^data\.datasets\.sim_train images .* data\.datasets\.real_train images",
        ),
        ({"sim_val": [1, 2, 3]}, r"^data\.datasets\.sim_val: expected a torch Dataset"),
        ({"augment": "flip"}, r"^data\.augment"),
    ],
)
def test_datamodule_validation_names_the_key(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):  # a ValueError
        _dm(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sim_ratio": 1.2}, r"^stages\.finetune\.sim_ratio: expected a number in \[0, 1\]"),
        ({"sim_ratio": "0.9"}, r"^stages\.finetune\.sim_ratio: expected a number"),
        ({"real_fraction": -0.1}, r"^stages\.finetune\.real_fraction: expected a number in"),
        ({"batch_size": 0}, r"^data\.loader\.batch_size: expected a whole number >= 1"),
        ({"batch_size": 2.5}, r"^data\.loader\.batch_size: expected a whole number"),
        (
            {"batches_per_epoch": 0},
            r"^data\.loader\.batches_per_epoch \(or stages\.finetune\.batches_per_epoch\): "
            r"expected a whole number >= 1, got 0",
        ),
        ({"val_batch_size": 0}, r"^data\.loader\.val_batch_size: "),
        ({"num_workers": -1}, r"^data\.loader\.num_workers: "),
        ({"seed": -1}, r"^seed: expected a whole number >= 0, got -1"),
        (
            {"batch_size": 4},
            r"^data\.loader\.batch_size=4 with stages\.finetune\.sim_ratio=0\.9 gives 4 sim "
            r"\+ 0 real.*use a larger data\.loader\.batch_size or a stages\.finetune\.sim_ratio",
        ),
        (
            {"sim_train": None},
            r"^data\.datasets\.sim_train is not set, so there are no sim images, but "
            r"stages\.finetune\.sim_ratio=0\.9 with data\.loader\.batch_size=20 needs 18 sim "
            r"\+ 2 real images per batch; provide data\.datasets\.sim_train or set "
            r"stages\.finetune\.sim_ratio=0 for real-only training$",
        ),
        (
            {"real_train": None},
            r"^stages\.finetune\.real_fraction=0\.2 leaves no real images "
            r"\(data\.datasets\.real_train is not set .*raise stages\.finetune\.real_fraction, "
            r"provide data\.datasets\.real_train, or set stages\.finetune\.sim_ratio=1",
        ),
        (
            {"real_fraction": 0.0},
            r"^stages\.finetune\.real_fraction=0\.0 leaves no real images \(0 of 50",
        ),
        ({"real_val": TinySamples(5, 0)}, r"^data\.datasets\.real_val: .*domain 0, expected 1"),
    ],
)
def test_stage_datamodule_errors_name_the_keys_a_user_types(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _dm(stage_name="finetune", **kwargs)


def test_stage_name_reaches_the_sampler_keys() -> None:
    assert _dm(stage_name="finetune").keys == {
        "sim_ratio": "stages.finetune.sim_ratio",
        "real_fraction": "stages.finetune.real_fraction",
        "batch_size": "data.loader.batch_size",
        "batches_per_epoch": "data.loader.batches_per_epoch (or stages.finetune.batches_per_epoch)",
        "seed": "seed",
        "sim_train": "data.datasets.sim_train",
        "real_train": "data.datasets.real_train",
    }
    plain = _dm().keys
    assert (plain["sim_ratio"], plain["real_fraction"]) == ("sim_ratio", "real_fraction")
    assert plain["batches_per_epoch"] == "data.loader.batches_per_epoch"
    with pytest.raises(TypeError, match="stage_name"):
        _dm(stage_name="")


class _GroupedSamples(TinySamples):
    """TinySamples listing its groups, as a generated dataset does: 1 in 10 at night."""

    @property
    def groups(self) -> list[str]:
        return ["night" if i % 10 == 0 else "day" for i in range(self.n)]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**super().__getitem__(i), "group": self.groups[i]}


def test_group_balanced_loader_draws_rare_groups_as_often():
    dm = _dm(
        sim_train=_GroupedSamples(100, 0), sim_ratio=1.0, batches_per_epoch=40, group_balanced=True
    )
    groups = [g for batch in dm.train_dataloader() for g in batch["group"]]
    assert 0.4 < groups.count("night") / len(groups) < 0.6  # 10 % of the frames
    plain = _dm(sim_train=_GroupedSamples(100, 0), sim_ratio=1.0, batches_per_epoch=40)
    groups = [g for batch in plain.train_dataloader() for g in batch["group"]]
    assert groups.count("night") / len(groups) == pytest.approx(0.1, abs=0.02)
