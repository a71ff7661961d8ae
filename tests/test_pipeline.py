"""The pipeline: parent runs, caching and invalidation by stage, resume after a kill, a
two-job sweep compared by scripts/compare.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from core.config import ConfigError
from tests.conftest import CONFIGS
from training.pipeline import run_pipeline, summary_table
from training.stages import StageResult, run_train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "log_model=false",
    "registry.enabled=false",
    "risk.enabled=false",
    "stages.source_only.max_epochs=1",
]


def smoke(tmp: Path, *overrides: str, config: str = "train"):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(
            config,
            [
                "experiment=smoke",
                f"paths.data={tmp / 'data'}",
                f"paths.output={tmp / 'out'}",
                *FAST,
                *overrides,
            ],
        )


def client_of(tmp: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp / 'out' / 'mlflow.db'}")


def runs_by_stage(tmp: Path) -> dict[str, list]:
    client = client_of(tmp)
    exp = client.get_experiment_by_name("sim2real-drive")
    out: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id]):
        out.setdefault(run.data.tags["stage"], []).append(run)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        results = run_train(smoke(tmp))
    return tmp, results


def test_changing_a_stage_reruns_it_and_what_follows_only(trained, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tmp, first = trained
    again = run_train(smoke(tmp, "stages.finetune.max_epochs=2"))
    assert (
        again["source_only"].skipped and again["source_only"].run_id == first["source_only"].run_id
    )
    assert not again["finetune"].skipped
    assert again["finetune"].run_dir != first["finetune"].run_dir
    # a change upstream reruns both stages
    upstream = run_train(smoke(tmp, "optimizer.lr=0.002"))
    assert not upstream["source_only"].skipped and not upstream["finetune"].skipped


def test_a_kill_between_stages_resumes_with_the_same_parent_run(tmp_path, monkeypatch):
    import training.stages.loop as loop

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real_train = loop.train_segmenter

    def killed_before_finetune(store, recipe, spec, *args, **kwargs):
        if spec.name == "finetune":
            raise KeyboardInterrupt  # the user's Ctrl-C, or the scheduler's kill
        return real_train(store, recipe, spec, *args, **kwargs)

    monkeypatch.setattr(loop, "train_segmenter", killed_before_finetune)
    with pytest.raises(KeyboardInterrupt):
        run_train(smoke(tmp_path))
    [parent] = runs_by_stage(tmp_path)["pipeline"]
    assert parent.info.status == "FAILED"
    monkeypatch.setattr(loop, "train_segmenter", real_train)
    results = run_train(smoke(tmp_path))
    assert results["source_only"].skipped and not results["finetune"].skipped
    runs = runs_by_stage(tmp_path)
    [again] = runs["pipeline"]  # resumed, not a second parent
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs["finetune"]} == {parent.info.run_id}


def test_pipeline_nests_each_method_under_one_study_run(trained, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tmp, first = trained
    overrides = [
        "experiment=smoke",
        f"paths.data={tmp / 'data'}",
        f"paths.output={tmp / 'out'}",
        *FAST,
        "methods=[none,dann]",
    ]
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("pipeline", overrides)
        by_method, table = run_pipeline(cfg, overrides)
    assert list(by_method) == ["none", "dann"]
    assert by_method["none"]["finetune"].run_id == first["finetune"].run_id  # cached
    assert not by_method["dann"]["source_only"].skipped
    assert "| dann | source_only |" in table and "| none | finetune |" in table
    runs = runs_by_stage(tmp)
    [study] = runs["study"]
    assert study.data.tags["methods"] == "none,dann"
    pipelines = [r for r in runs["pipeline"] if r.data.tags.get("mlflow.parentRunId")]
    assert {r.data.tags["adaptation"] for r in pipelines} == {"none", "dann"}
    assert {r.data.tags["mlflow.parentRunId"] for r in pipelines} == {study.info.run_id}
    assert "dann_finetune/test/real/miou" in study.data.metrics


def test_unknown_pipeline_method_is_refused_before_work(tmp_path):
    overrides = ["experiment=smoke", f"paths.output={tmp_path / 'out'}", "methods=[none,pix2pix]"]
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("pipeline", overrides)
        with pytest.raises(ConfigError, match="methods: unknown adaptation method 'pix2pix'"):
            run_pipeline(cfg, overrides)
    assert not (tmp_path / "out").exists()


def test_summary_table_rows():
    res = StageResult(
        "finetune",
        Path("."),
        Path("x"),
        "r1",
        {"test/sim/miou": 0.5, "test/real/miou": 0.25, "test/gap/miou": 0.25},
        skipped=True,
        alerts=["data_drift_detected"],
    )
    table = summary_table({"none": {"finetune": res}})
    assert table.splitlines()[2] == (
        "| none | finetune | 50.0 | 25.0 | 25.0 | data_drift_detected | reused |"
    )


def test_two_job_sweep_is_tagged_and_compared(trained):
    tmp, _ = trained
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    sweep = tmp / "out" / "multirun" / "two-jobs"
    out = subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            "-m",
            "experiment=smoke",
            "seed=0,1",
            f"paths.data={tmp / 'data'}",
            f"paths.output={tmp / 'out'}",
            *FAST,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = runs_by_stage(tmp)
    tagged = [r for r in runs["pipeline"] if r.data.tags.get("sweep_id") == "two-jobs"]
    assert len(tagged) == 2  # one parent per job, never overwritten
    # seed 0 reused the fixture's stages: they gained the sweep's tag
    reused = [r for r in runs["finetune"] if r.data.tags.get("sweep/two-jobs") == "reused"]
    assert len(reused) == 1
    cmp = subprocess.run(
        [
            sys.executable,
            "scripts/compare.py",
            "sweep=two-jobs",
            f"paths.output={tmp / 'out'}",
            "resolve_reused=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert cmp.returncode == 0, cmp.stderr[-3000:]
    finetune_row = [line for line in cmp.stdout.splitlines() if line.startswith("| finetune")]
    assert finetune_row and "(2)" in finetune_row[0]  # mean +- std over the two seeds
    assert (tmp / "out" / "compare" / "two-jobs" / "table.md").exists()
