"""The stage store's protocol without training: retries, failure marking, done markers."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from core.config import ConfigError
from training.stages.specs import TrackingSpec
from training.stages.store import StageStore, is_transient


class FakeTrainer:
    """Stands in for ``pl.Trainer``: ``fit`` raises the next error of a shared list."""

    errors: list[BaseException] = []
    calls = 0

    def __init__(self, **kwargs) -> None:
        pass

    def fit(self, module, **kwargs) -> None:
        FakeTrainer.calls += 1
        if FakeTrainer.errors:
            raise FakeTrainer.errors.pop(0)


def store(tmp_path, retries: int) -> StageStore:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = TrackingSpec(uri, "store", "", "", (tmp_path / "artifacts").as_uri())
    return StageStore(tmp_path, tracking, "exp", FakeTrainer, retries=retries)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (OSError("NFS hiccup"), True),
        (RuntimeError("CUDA error: an illegal memory access"), True),
        (ValueError("groups: unknown group 'unknown'"), False),
        (TypeError("forward() got an unexpected keyword"), False),
        (ConfigError("stages.x.sim_ratio: expected"), False),
        (NotImplementedError("not here"), False),
    ],
)
def test_only_transient_failures_are_retried(tmp_path, error, transient):
    assert is_transient(error) is transient
    FakeTrainer.errors, FakeTrainer.calls = [error], 0
    s = store(tmp_path, retries=2)
    if transient:
        with s.open("stage", "abc") as run:
            run.fit(object())
            run.finish({"metrics": {}})
        assert FakeTrainer.calls == 2  # failed once, then resumed and finished
        tags = MlflowClient(s.tracking.uri).get_run(run.run_id).data.tags
        assert type(error).__name__ in tags["failure_0"]
        assert json.loads((run.run_dir / "done.json").read_text())["run_id"] == run.run_id
    else:
        with pytest.raises(type(error)), s.open("stage", "abc") as run:
            run.fit(object())
        assert FakeTrainer.calls == 1  # never retried: it would fail the same again
        info = MlflowClient(s.tracking.uri).get_run(run.run_id)
        assert info.info.status == "FAILED" and info.data.tags["status"] == "failed"
        assert not (run.run_dir / "done.json").exists()


def test_a_finished_stage_is_reused_and_an_interrupted_one_resumes_its_run(tmp_path):
    FakeTrainer.errors, FakeTrainer.calls = [KeyboardInterrupt()], 0
    s = store(tmp_path, retries=3)
    with pytest.raises(KeyboardInterrupt), s.open("stage", "abc") as run:
        run.fit(object())
    first = run.run_id
    assert MlflowClient(s.tracking.uri).get_run(first).info.status == "RUNNING"  # resumable
    assert s.finished("stage", "abc") is None
    with s.open("stage", "abc") as again:
        assert again.run_id == first and not again.fresh
        again.fit(object())
        again.finish({"metrics": {"x": 1.0}})
    record = s.finished("stage", "abc")
    assert record.skipped and record.run_id == first and record.values["metrics"] == {"x": 1.0}
    assert MlflowClient(s.tracking.uri).get_run(first).info.status == "FINISHED"


def test_a_folder_whose_run_is_not_in_the_store_starts_a_new_run(tmp_path):
    FakeTrainer.errors, FakeTrainer.calls = [], 0
    s = store(tmp_path, retries=0)
    folder = s.folder("stage", "abc")
    folder.mkdir(parents=True)
    (folder / "mlflow_run_id.txt").write_text("0123456789abcdef0123456789abcdef")
    with s.open("stage", "abc") as run:
        assert run.fresh and run.run_id != "0123456789abcdef0123456789abcdef"
        run.finish({})
    assert (folder / "mlflow_run_id.txt").read_text() == run.run_id


@pytest.mark.parametrize(
    ("devices", "expected"), [(1, 1), (2, 2), ([0, 1], 2), ("3", 3), ("auto", 1), (-1, 1)]
)
def test_world_size_reads_every_form_of_devices(devices, expected):
    from omegaconf import OmegaConf

    from training.stages.specs import world_size

    cfg = OmegaConf.create({"devices": devices, "accelerator": "cpu", "num_nodes": 1})
    assert world_size(cfg) == expected
