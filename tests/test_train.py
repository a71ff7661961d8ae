"""Training end to end on the smoke experiment, against a real local MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from core.config import ConfigError
from tests.conftest import compose_config
from training.stages import run_train
from training.tracking import dataset_digest

pytestmark = pytest.mark.slow


def split_root(tmp_path, split: str) -> Path:
    """The folder of a generated smoke split (named by the hash of its generation)."""
    return Path(smoke_config(tmp_path).data.datasets[split].root)


def smoke_config(tmp_path, *overrides: str):
    return compose_config(
        "train",
        [
            "experiment=smoke",
            f"paths.data={tmp_path / 'data'}",
            f"paths.output={tmp_path / 'out'}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        results = run_train(smoke_config(tmp))
    return tmp, results


def test_smoke_runs_every_stage(smoke_run):
    tmp, results = smoke_run
    assert list(results) == ["source_only", "finetune"]
    for res in results.values():
        assert res.checkpoint.exists() and (res.run_dir / "done.json").exists()
        for key in ("test/sim/miou", "test/real/miou", "test/gap/miou"):
            assert 0.0 <= res.metrics[key] <= 1.0 or key.startswith("test/gap")
        gap = res.metrics["test/sim/miou"] - res.metrics["test/real/miou"]
        assert res.metrics["test/gap/miou"] == pytest.approx(gap)
    # the finetuned model starts from the source_only weights
    ckpt = torch.load(results["finetune"].checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["arch"].startswith("unet")


def test_mlflow_holds_runs_metrics_and_artifacts(smoke_run):
    tmp, results = smoke_run
    client = MlflowClient(f"sqlite:///{tmp / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sim2real-drive")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage != 'monitor'")
    assert {r.data.tags["stage"] for r in runs} == {"source_only", "finetune", "pipeline"}
    # one parent run per pipeline; every stage run nests under it
    [parent] = [r for r in runs if r.data.tags["stage"] == "pipeline"]
    for r in runs:
        if r is not parent:
            assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
    expected = results["finetune"].metrics["test/real/miou"]
    assert parent.data.metrics["finetune/test/real/miou"] == pytest.approx(expected)
    summary = client.download_artifacts(parent.info.run_id, "pipeline/summary.md", str(tmp))
    assert "| finetune |" in Path(summary).read_text()
    run = client.get_run(results["finetune"].run_id)
    metrics = run.data.metrics
    for key in (
        "train/loss",
        "train/sim/loss",
        "train/real/loss",
        "val/sim/miou",
        "val/real/miou",
        "gap/miou",
        "val/real/iou/road",
        "val/real/pixel_acc",
        "test/real/miou",
        "test/sim/miou",
        "test/gap/miou",
        "test/real/macro_f1",
    ):
        assert key in metrics, key
    assert any(k.startswith("val/real/") and k.endswith("-clear/miou") for k in metrics)
    params = run.data.params
    assert params["stages.finetune.sim_ratio"] == "0.9"
    assert params["stage.num_real_labelled"] == "19"  # round(192 * 0.1)
    assert params["trainer.precision_requested"] == "auto"  # the CPU default, then its choice
    assert params["trainer.precision"] in ("bf16-mixed", "32-true")
    assert run.data.tags["experiment"] == "smoke" and len(run.data.tags["config_hash"]) == 12
    assert run.data.tags["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "val", "test"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {
        "checkpoints/best.ckpt"
    }
    val_real = {a.path for a in client.list_artifacts(run.info.run_id, "val/real")}
    assert any(p.endswith(".png") and "predictions" in p for p in val_real)
    assert any("confusion" in p for p in val_real)
    models = client.search_logged_models([exp.experiment_id])
    assert any(m.source_run_id == run.info.run_id for m in models)
    # dataset lineage: every dataset with the digest of its card
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"sim_train", "sim_val", "real_train", "real_val", "real_test"}
    from simulation.dataset import GeneratedDataset

    ds = GeneratedDataset(split_root(tmp, "real_train"))
    assert inputs["real_train"].digest == dataset_digest(ds)


def test_rerun_skips_finished_stages(smoke_run):
    tmp, results = smoke_run
    again = run_train(smoke_config(tmp))
    assert all(r.skipped for r in again.values())
    assert again["finetune"].run_id == results["finetune"].run_id
    client = MlflowClient(f"sqlite:///{tmp / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sim2real-drive")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage != 'monitor'")
    assert sorted(r.data.tags["stage"] for r in runs) == ["finetune", "pipeline", "source_only"]
    # the rerun resumed the same parent run, which lists both stages as reused
    [parent] = [r for r in runs if r.data.tags["stage"] == "pipeline"]
    assert parent.info.status == "FINISHED"
    stages = client.download_artifacts(parent.info.run_id, "pipeline/stages.json", str(tmp))
    listed = json.loads(Path(stages).read_text())
    assert listed["finetune"] == {
        "run_id": results["finetune"].run_id,
        "reused": True,
        "alerts": results["finetune"].alerts,
    }


def test_interrupted_stage_resumes_in_the_same_run(tmp_path, monkeypatch):
    from training.task import SegmentationTask

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    original = SegmentationTask.on_train_epoch_start
    calls = {"n": 0}

    def dies_in_second_epoch(self):
        if self.current_epoch == 1 and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("spot instance reclaimed")
        return original(self)

    monkeypatch.setattr(SegmentationTask, "on_train_epoch_start", dies_in_second_epoch)
    cfg = smoke_config(
        tmp_path,
        "experiment=source_only",
        "data=smoke",
        "retries=0",
        "stages.source_only.max_epochs=2",
        "log_model=false",
    )
    with pytest.raises(RuntimeError, match="spot instance"):
        run_train(cfg)
    run_dirs = list((tmp_path / "out" / "runs").iterdir())
    assert len(run_dirs) == 1 and (run_dirs[0] / "checkpoints" / "last.ckpt").exists()
    first_id = (run_dirs[0] / "mlflow_run_id.txt").read_text()
    results = run_train(
        smoke_config(
            tmp_path,
            "experiment=source_only",
            "data=smoke",
            "retries=0",
            "stages.source_only.max_epochs=2",
            "log_model=false",
        )
    )
    assert results["source_only"].run_id == first_id
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    history = client.get_metric_history(first_id, "val/real/miou")
    assert len(history) == 2  # epoch 0 before the failure, epoch 1 after resuming


def test_ddp_on_two_cpu_processes_logs_one_run_per_stage(tmp_path):
    """The multi-process path (Lightning's DDP launcher re-runs the script per rank), and
    T-03's scaling efficiency against the same work on one process."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}

    def train(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "scripts/train.py",
                "experiment=smoke",
                "trainer=ddp_cpu",
                f"paths.data={tmp_path / 'data'}",
                f"paths.output={tmp_path / 'out'}",
                "log_model=false",
                "stages.source_only.max_epochs=1",
                *extra,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )

    one = train("trainer.devices=1", "trainer.strategy=auto", "~stages.finetune")
    assert one.returncode == 0, one.stderr[-3000:]
    # the console is quiet by default; Lightning's "Initializing distributed" line (one
    # per rank) is what shows two processes
    out = train("hydra.verbose=[lightning_fabric]")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MEMBER: 2/2" in out.stderr + out.stdout
    assert out.stdout.count("| finetune |") == 1  # rank zero reports, once
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sim2real-drive").experiment_id])
    stages = sorted(r.data.tags["stage"] for r in runs)
    assert stages == ["finetune", "pipeline", "pipeline", "source_only", "source_only"]
    parents = [r for r in runs if r.data.tags["stage"] == "pipeline"]
    assert sum("finetune/test/real/miou" in r.data.metrics for r in parents) == 1  # the DDP run
    assert all("source_only/test/real/miou" in r.data.metrics for r in parents)
    assert all("test/real/miou" in r.data.metrics for r in runs if r not in parents)
    by_devices = {
        r.data.metrics["risk/T-03/devices"]: r
        for r in runs
        if r.data.tags["stage"] == "source_only"
    }
    single, ddp = by_devices[1.0].data.metrics, by_devices[2.0].data.metrics
    assert "risk/T-03/scaling_efficiency" not in single
    efficiency = ddp["risk/T-03/scaling_efficiency"]
    assert efficiency == pytest.approx(
        ddp["risk/T-03/images_per_s_per_device"] / single["risk/T-03/images_per_s_per_device"]
    )
    assert ddp["risk/T-03/images_per_s"] == pytest.approx(
        2 * ddp["risk/T-03/images_per_s_per_device"]
    )
    print(f"T-03 on this machine: 2 CPU processes at {efficiency:.2f} of one process's rate")
    assert "efficiency" in by_devices[2.0].data.tags["risk/T-03/scaling"]
    # the finetune stage had no one-process run: no figure, and the tag says how to get one
    finetune = next(r for r in runs if r.data.tags["stage"] == "finetune")
    assert "risk/T-03/scaling_efficiency" not in finetune.data.metrics
    assert "trainer.devices=1" in finetune.data.tags["risk/T-03/scaling"]


def test_transient_failure_is_retried(tmp_path, monkeypatch):
    from training.task import SegmentationTask

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    original = SegmentationTask.training_step
    calls = {"n": 0}

    def flaky(self, batch, batch_idx):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("NFS hiccup")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(SegmentationTask, "training_step", flaky)
    cfg = smoke_config(
        tmp_path,
        "experiment=source_only",
        "data=smoke",
        "retries=1",
        "stages.source_only.max_epochs=1",
        "log_model=false",
    )
    results = run_train(cfg)
    run = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}").get_run(
        results["source_only"].run_id
    )
    assert "NFS hiccup" in run.data.tags["failure_0"]
    assert json.loads((results["source_only"].run_dir / "done.json").read_text())["metrics"]


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("stages.source_only.sim_ratio=1.5", ConfigError, r"stages.source_only.sim_ratio"),
        (
            "stages.source_only.real_fraction=-0.1",
            ConfigError,
            r"stages.source_only.real_fraction: expected a number in \[0, 1\]",
        ),
        ("data.loader.batch_size=0", ConfigError, r"data.loader.batch_size: expected a whole"),
        ("seed=-1", ConfigError, r"^seed: expected a whole number >= 0"),
        ("+stages.source_only.lr=0.1", ConfigError, "stages.source_only.lr: unknown key"),
        ("stages.finetune.init=nowhere.ckpt", ConfigError, "stages.finetune.init"),
        (
            "data.datasets.sim_train.root=/does/not/exist",
            ConfigError,
            "data.datasets.sim_train: /does/not/exist",
        ),
    ],
)
def test_bad_input_stops_before_training(smoke_run, override, error, match):
    tmp, _ = smoke_run
    with pytest.raises(error, match=match):
        run_train(smoke_config(tmp, override, "paths.output=" + str(tmp / "bad")))
    assert not (tmp / "bad" / "runs").exists()


def test_real_fraction_leaving_no_real_images(smoke_run):
    tmp, _ = smoke_run
    with pytest.raises(ConfigError, match=r"stages\.real_only\.real_fraction=0.0 leaves no"):
        run_train(
            smoke_config(
                tmp,
                "experiment=real_only",
                "data=smoke",
                "stages.real_only.real_fraction=0.0",
                "paths.output=" + str(tmp / "bad2"),
            )
        )


def test_taxonomy_mismatch_is_refused(smoke_run):
    tmp, _ = smoke_run
    # a changed taxonomy names new generated folders (the old data is never reused); a
    # dataset folder given by hand that was labelled with another taxonomy is refused
    roots = [
        f"data.datasets.{split}.root={split_root(tmp, split)}"
        for split in ("sim_train", "sim_val", "real_train", "real_val", "real_test")
    ]
    changed = "taxonomy.colors.0=[1,2,3]"
    new_roots = smoke_config(tmp, changed).data.datasets
    assert Path(new_roots.sim_train.root) != split_root(tmp, "sim_train")
    with pytest.raises(ConfigError, match=r"data.datasets.sim_train: .*taxonomy"):
        run_train(
            smoke_config(
                tmp, changed, "data.generate=null", *roots, "paths.output=" + str(tmp / "bad3")
            )
        )
    assert not (tmp / "bad3" / "runs").exists()


def test_checkpoint_of_another_architecture_is_refused(smoke_run):
    tmp, results = smoke_run
    ckpt = results["source_only"].checkpoint
    with pytest.raises(ValueError, match="architecture|arch"):
        run_train(
            smoke_config(
                tmp,
                "experiment=finetune",
                "data=smoke",
                "model=deeplab",
                f"stages.finetune.init={ckpt}",
                "~stages.source_only",
                "paths.output=" + str(tmp / "bad4"),
            )
        )


def test_risk_register_is_assessed_and_published(smoke_run):
    tmp, results = smoke_run
    res = results["finetune"]
    client = MlflowClient(f"sqlite:///{tmp / 'out' / 'mlflow.db'}")
    run = client.get_run(res.run_id)
    m = run.data.metrics
    for key in (
        "risk/T-01/accuracy",
        "risk/T-02/psi",
        "risk/T-05/job_failed",
        "risk/T-06/latency_p95_ms",
        "risk/T-08/eod_max",
        "risk/T-09/gap_miou",
        "risk/T-10/sim_train/dropped",
        "risk/O-01/daily_cost_ratio",
        "risk/S-05/clean_miou",
        "risk/S-05/fgsm_eps4/drop",
        "risk/S-05/pgd_eps4/miou",
        "risk/S-05/fog_s3/miou",
        "risk/S-05/max_drop_share",
        "risk/T-03/images_per_s_per_device",
        "risk/T-07/verified",
        "risk/S-01/leaks_found",
        "risk/O-03/coverage",
        "system/cpu_utilization_percentage",  # MLflow's system metrics: T-04's series
    ):
        assert key in m, key
    # T-03: one process, so no scaling figure; the work is named for the ledger
    assert m["risk/T-03/devices"] == 1 and m["risk/T-03/images_per_s_per_device"] > 0
    assert "risk/T-03/scaling_efficiency" not in m
    assert run.data.tags["risk/T-03/workload"].startswith("finetune|accelerator=CPUAccelerator")
    # T-07: every generated set the stage read was verified (the smoke data is all generated)
    assert m["risk/T-07/verified"] == m["risk/T-07/checksummed"] == m["risk/T-07/datasets"] >= 3
    assert m["risk/T-07/unverified"] == 0 and m["risk/T-07/verified_share"] == 1.0
    # S-01/S-02: the run logged no credential; O-03: the rows measured, the rest named
    assert m["risk/S-01/leaks_found"] == m["risk/S-02/leaks_found"] == 0
    assert m["risk/S-01/items_scanned"] > 100  # params, tags, config.yaml ...
    unmonitored = run.data.tags["risk/O-03/not_monitored"].split(",")
    assert "T-04" in unmonitored and "T-07" not in unmonitored and "O-03" not in unmonitored
    assert m["risk/O-03/coverage"] == pytest.approx((23 - len(unmonitored)) / 23)
    assert m["risk/S-05/max_drop"] >= m["risk/S-05/pgd_eps4/drop"]
    assert run.data.tags["risk/T-06/method"].startswith("best of 3 interleaved rounds")
    assert m["risk/T-01/accuracy"] == pytest.approx(res.metrics["test/real/pixel_acc"])
    assert m["risk/T-09/gap_miou"] == pytest.approx(res.metrics["test/gap/miou"])
    assert m["risk/T-09/source_only_real_miou"] == pytest.approx(
        results["source_only"].metrics["test/real/miou"]
    )
    # no GPU here: reported as not available, never as 0 %
    assert "risk/T-04/gpu_utilization" not in m
    assert run.data.tags["risk/T-04/gpu"].startswith("not available")
    assert "model_accuracy_drop" in run.data.tags["risk/alerts_fired"]  # tiny model, < 85 %
    arts = {a.path for a in client.list_artifacts(res.run_id, "risk")}
    assert arts == {
        "risk/register.json",
        "risk/alerts.json",
        "risk/risk_dashboard.html",
        "risk/T-07_datasets.json",
    }
    page = (res.run_dir / "risk_dashboard.html").read_text()
    assert "<h2>T-07 datasets</h2>" in page and "T-03 training images/s per device" in page
    assert "T-01 accuracy on real data" in page and "モデル精度低下" in page
    assert "S-05 real mIoU under attack / corruption" in page
    assert "risk/T-06/method: best of 3" in page  # how the latency figures were taken
    alerts = [json.loads(line) for line in (res.run_dir / "alerts.jsonl").read_text().splitlines()]
    assert any(a["risk_id"] == "T-01" and a["fired"] for a in alerts)
    local = client.download_artifacts(res.run_id, "risk/register.json", str(tmp))
    with open(local) as f:
        table = json.load(f)
    assert len(table["data"]) == 23


def test_finetuned_model_is_registered_champion(smoke_run):
    from training.risk.registry import ModelRegistry

    tmp, results = smoke_run
    registry = ModelRegistry(f"sqlite:///{tmp / 'out' / 'mlflow.db'}", "sim2real-segmenter-smoke")
    assert registry.aliases()["champion"] == "1"
    run = MlflowClient(f"sqlite:///{tmp / 'out' / 'mlflow.db'}").get_run(results["finetune"].run_id)
    assert run.data.tags["registry/decision"] == "first_champion"


@pytest.mark.parametrize(
    ("thresholds", "retrain"),
    [({"accuracy": 0.99, "psi": 1e9}, True), ({"accuracy": 0.0, "psi": 1e9}, False)],
)
def test_monitor_retrains_only_past_a_threshold(smoke_run, thresholds, retrain):
    from simulation.dataset import GeneratedDataset
    from training.risk.retrain import check_champion

    tmp, _ = smoke_run
    uri = f"sqlite:///{tmp / 'out' / 'mlflow.db'}"
    result = check_champion(
        uri,
        "sim2real-segmenter-smoke",
        "sim2real-drive",
        GeneratedDataset(split_root(tmp, "real_test")),
        GeneratedDataset(split_root(tmp, "real_train")),
        11,
        thresholds,
        ["experiment=finetune", "data=smoke"],
        str(tmp / "retrain"),
        dry_run=True,
        drift_samples=24,
    )
    assert result.retrain is retrain
    assert 0.0 <= result.accuracy <= 1.0
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.data.tags["decision"] == ("retrain" if retrain else "keep")
    if retrain:
        assert result.reasons[0].startswith("T-01 accuracy")
        assert any(c.startswith("tracking.trigger='T-01 accuracy") for c in result.command)
        assert "retrain_command" in run.data.tags


def test_rollback_needs_a_previous_champion(smoke_run):
    from training.risk.registry import ModelRegistry, RegistryError

    tmp, _ = smoke_run
    with pytest.raises(RegistryError, match="no previous champion"):
        ModelRegistry(
            f"sqlite:///{tmp / 'out' / 'mlflow.db'}", "sim2real-segmenter-smoke"
        ).rollback()


def test_failed_stage_raises_the_job_failure_alert(tmp_path, monkeypatch):
    from training.task import SegmentationTask

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def broken(self, batch, batch_idx):
        raise OSError("disk full")

    monkeypatch.setattr(SegmentationTask, "training_step", broken)
    cfg = smoke_config(
        tmp_path, "experiment=source_only", "data=smoke", "retries=0", "log_model=false"
    )
    with pytest.raises(OSError, match="disk full"):
        run_train(cfg)
    run_dir = next((tmp_path / "out" / "runs").iterdir())
    alerts = [json.loads(x) for x in (run_dir / "alerts.jsonl").read_text().splitlines()]
    failed = [a for a in alerts if a["risk_id"] == "T-05"]
    assert failed and failed[0]["fired"] and failed[0]["value"] == 1.0
    run = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}").get_run(
        (run_dir / "mlflow_run_id.txt").read_text()
    )
    assert run.data.tags["status"] == "failed" and "disk full" in run.data.tags["error"]
    assert "training_job_failed" in run.data.tags["risk/alerts_fired"]


def test_monitor_launches_retraining_and_the_new_model_enters_as_challenger(smoke_run):
    from simulation.dataset import GeneratedDataset
    from training.risk.registry import ModelRegistry
    from training.risk.retrain import check_champion

    tmp, _ = smoke_run
    uri = f"sqlite:///{tmp / 'out' / 'mlflow.db'}"
    result = check_champion(
        uri,
        "sim2real-segmenter-smoke",
        "sim2real-drive",
        GeneratedDataset(split_root(tmp, "real_test")),
        GeneratedDataset(split_root(tmp, "real_train")),
        11,
        {"accuracy": 0.99, "psi": 1e9},
        [
            "experiment=smoke",
            f"paths.data={tmp / 'data'}",
            f"data.datasets.real_train.root={split_root(tmp, 'real_test')}",
        ],
        str(tmp / "out"),
        drift_samples=24,
    )
    assert result.returncode == 0
    client = MlflowClient(uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("sim2real-drive").experiment_id],
        filter_string="tags.trigger LIKE 'T-01%'",
    )
    # the sim-only source_only stage does not read the real training split: it is reused,
    # and only the finetune trains again, tagged with why; the monitor's run records it too
    assert {r.data.tags["stage"] for r in runs} - {"monitor"} == {"finetune", "pipeline"}
    monitor = client.get_run(result.run_id)
    assert monitor.data.tags["decision"] == "retrain"
    assert monitor.data.tags["retrain_returncode"] == "0"
    versions = ModelRegistry(uri, "sim2real-segmenter-smoke").describe()["versions"]
    assert len(versions) == 2  # the retrained model was registered and compared
    finetune = [r for r in runs if r.data.tags["stage"] == "finetune"][0]
    assert finetune.data.tags["registry/decision"] in {"promoted", "kept_champion"}


def test_dann_adapts_the_pretraining_stage(smoke_run, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tmp, plain = smoke_run
    out = tmp / "dann"
    cfg = smoke_config(
        tmp,
        "adaptation=dann",
        f"paths.output={out}",
        "stages.source_only.max_epochs=1",
        "log_model=false",
    )
    results = run_train(cfg)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    src = client.get_run(results["source_only"].run_id).data.metrics
    fin = client.get_run(results["finetune"].run_id).data.metrics
    assert {"train/dann/loss", "train/dann/domain_acc", "train/dann/lambda"} <= set(src)
    assert 0.0 < src["train/dann/lambda"] < 1.0
    assert "train/dann/loss" not in fin  # the 90/10 finetune that follows is plain
    for m in (src, fin):
        assert 0.0 <= m["test/gap/proxy_a_distance"] <= 2.0
    # DANN is part of what the stage is: it never reuses the plain stage's folder
    assert results["source_only"].run_dir.name != plain["source_only"].run_dir.name


def test_bad_adaptation_components_are_refused_before_work(smoke_run):
    tmp, _ = smoke_run
    out = tmp / "bad5"
    with pytest.raises(
        ConfigError,
        match=r"adaptation.dann._target_: 'tests.plugins.toy_objective"
        r".NotAPlugin' is not an adaptation plug-in",
    ):
        run_train(
            smoke_config(
                tmp,
                "+adaptation.dann={_target_: tests.plugins.toy_objective.NotAPlugin, "
                "stages: [source_only]}",
                f"paths.output={out}",
            )
        )
    with pytest.raises(
        ConfigError,
        match=r"adaptation.dann._target_: cannot build "
        r"'adaptation.nowhere.DANN'",
    ):
        run_train(
            smoke_config(
                tmp,
                "adaptation=dann",
                "adaptation.dann._target_=adaptation.nowhere.DANN",
                f"paths.output={out}",
            )
        )
    with pytest.raises(ConfigError, match="adaptation.dann.stages: 'oracle' is not a stage"):
        run_train(
            smoke_config(
                tmp, "adaptation=dann", "adaptation.dann.stages=[oracle]", f"paths.output={out}"
            )
        )
    with pytest.raises(ConfigError, match=r"adaptation.dann.weight: expected a number >= 0"):
        run_train(
            smoke_config(tmp, "adaptation=dann", "adaptation.dann.weight=-1", f"paths.output={out}")
        )
    assert not (out / "runs").exists()


def test_a_toy_objective_added_by_config_alone_trains(smoke_run):
    """A method is one module plus one config node: no edit to the loop or the task."""
    tmp, plain = smoke_run
    out = tmp / "toy"
    node = (
        "+adaptation.toy={_target_: tests.plugins.toy_objective.Entropy, "
        "stages: [source_only], weight: 0.1}"
    )
    cfg = smoke_config(
        tmp, node, f"paths.output={out}", "stages.source_only.max_epochs=1", "log_model=false"
    )
    results = run_train(cfg)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    src = client.get_run(results["source_only"].run_id).data.metrics
    fin = client.get_run(results["finetune"].run_id).data.metrics
    assert 0.0 < src["train/toy/entropy"] < 3.0  # ln(11) = 2.4 at most
    assert src["train/toy/step"] > 0  # the step reaches the objective
    assert "train/toy/entropy" not in fin
    # the objective is part of what the stage is: never the plain stage's folder
    assert results["source_only"].run_dir.name != plain["source_only"].run_dir.name


def test_cyclegan_translates_sim_and_trains_on_it(smoke_run, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tmp, plain = smoke_run
    out = tmp / "cyclegan"
    cfg = smoke_config(
        tmp,
        "adaptation=cyclegan",
        f"paths.output={out}",
        "log_model=false",
        "adaptation.cyclegan.image_every=12",
    )
    results = run_train(cfg)
    assert list(results) == ["source_only (no adaptation)", "source_only", "finetune"]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sim2real-drive")
    gan = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'cyclegan'")
    assert len(gan) == 1
    gan_run = gan[0]
    for key in (
        "cyclegan/cycle",
        "cyclegan/g_loss",
        "cyclegan/d_loss",
        "cyclegan/semantic",
        "cyclegan/guard_corruption",
        "guard/corruption",
        "translate/images_per_s",
    ):
        assert key in gan_run.data.metrics, key
    assert 0.0 <= gan_run.data.metrics["guard/corruption"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(gan_run.info.run_id, "translation")}
    assert {"translation/step_000012.png", "translation/step_000024.png"} <= artifacts
    assert client.list_artifacts(gan_run.info.run_id, "generator")[0].path.endswith("generator.pt")
    # the translated set: same labels, the generator run on its card and in each record
    [root] = (tmp / "data" / "translated").iterdir()
    card = json.loads((root / "card.json").read_text())
    assert card["translation"]["generator_run"] == gan_run.info.run_id
    sim_card = json.loads((split_root(tmp, "sim_train") / "card.json").read_text())
    assert card["class_pixel_histogram"] == sim_card["class_pixel_histogram"]
    # the adapted stages read it; the plain segmenter is adaptation=none's own stage
    inputs = client.get_run(results["source_only"].run_id).inputs.dataset_inputs
    sources = {i.dataset.name.split(":")[0]: i.dataset.source for i in inputs}
    assert "translated" in sources["sim_train"]
    assert results["source_only (no adaptation)"].run_dir.name == plain["source_only"].run_dir.name
    assert results["source_only"].run_dir.name != plain["source_only"].run_dir.name
    # the plan (what scripts/compare.py reads from a sweep's saved configs) names the
    # CycleGAN-adapted stages as the run did
    from training.stages import check_config

    planned = check_config(
        smoke_config(
            tmp, "adaptation=cyclegan", f"paths.output={out}", "log_model=false",
            "adaptation.cyclegan.image_every=12",
        )
    ).digests  # fmt: skip
    for name in ("source_only", "finetune"):
        assert results[name].run_dir.name == f"{name}-{planned[name]}"
    # a rerun trains nothing
    again = run_train(
        smoke_config(
            tmp,
            "adaptation=cyclegan",
            f"paths.output={out}",
            "log_model=false",
            "adaptation.cyclegan.image_every=12",
        )
    )
    assert all(r.skipped for r in again.values())
    # bad input, before any work: a missing generator run, a generator of another size
    with pytest.raises(ConfigError, match="adaptation.cyclegan.generator: no MLflow run"):
        run_train(
            smoke_config(
                tmp,
                "adaptation=cyclegan",
                f"paths.output={out}",
                "adaptation.cyclegan.generator=0123456789abcdef",
            )
        )
    with pytest.raises(ConfigError, match=r"trained on 64x128 images, the data are 32x64"):
        run_train(
            smoke_config(
                tmp,
                "adaptation=cyclegan",
                f"paths.output={tmp / 'bad7'}",
                "adaptation.cyclegan.generator=" + gan_run.info.run_id,
                f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
                "data.image.height=32",
                "data.image.width=64",
            )
        )
    assert not (tmp / "bad7" / "runs").exists()


def test_empty_unlabeled_real_folder_is_refused_before_work(smoke_run):
    tmp, _ = smoke_run
    empty = tmp / "empty_real"
    empty.mkdir()
    node = (
        "data.datasets.real_unlabeled={_target_: simulation.real_data.ImageFolderDataset,"
        f" root: '{empty}', size: [64, 128]}}"
    )
    with pytest.raises(ConfigError, match=r"data.datasets.real_unlabeled: .*no images"):
        run_train(smoke_config(tmp, "adaptation=cyclegan", f"paths.output={tmp / 'bad8'}", node))
    assert not (tmp / "bad8" / "runs").exists()


def _cityscapes_fixture(root: Path, frames: int = 6) -> Path:
    """A tiny Cityscapes layout (leftImg8bit + gtFine labelIds) for train and val: road
    below, sky above, a car band; every frame of the default condition group 'unknown'."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(frames):
            name = f"city_{i:06d}_000019"
            img = root / "leftImg8bit" / split / "city" / f"{name}_leftImg8bit.png"
            lab = root / "gtFine" / split / "city" / f"{name}_gtFine_labelIds.png"
            img.parent.mkdir(parents=True, exist_ok=True)
            lab.parent.mkdir(parents=True, exist_ok=True)
            labels = np.full((32, 64), 23, np.uint8)  # sky
            labels[16:] = 7  # road
            labels[12:20, 20:40] = 26  # car
            image = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
            Image.fromarray(image).save(img)
            Image.fromarray(labels).save(lab)
    return root


def test_a_real_dataset_without_condition_groups_trains_and_evaluates(smoke_run):
    """data=cityscapes used to stop at the first validation batch (the reader's group
    'unknown' was not among the sim cards' groups) and was then retried as transient."""
    tmp, _ = smoke_run
    real = _cityscapes_fixture(tmp / "cityscapes")
    out = tmp / "cityscapes_run"
    cfg = smoke_config(
        tmp,
        "data=cityscapes",
        f"data.real_root={real}",
        f"data.datasets.sim_train.root={split_root(tmp, 'sim_train')}",
        f"data.datasets.sim_val.root={split_root(tmp, 'sim_val')}",
        "data.image.height=64",
        "data.image.width=128",
        "data.loader.batch_size=10",
        "data.loader.batches_per_epoch=2",
        "data.loader.val_batch_size=4",
        "stages.source_only.max_epochs=1",
        "stages.finetune.real_fraction=1.0",
        "log_model=false",
        "retries=0",
        f"paths.output={out}",
    )
    results = run_train(cfg)
    metrics = results["finetune"].metrics
    assert 0.0 <= metrics["test/real/miou"] <= 1.0
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    logged = client.get_run(results["finetune"].run_id).data.metrics
    assert "val/real/unknown/miou" in logged  # the real split's own group


def _camvid_fixture(root: Path, frames: int = 6) -> Path:
    """A tiny CamVid (SegNet layout) for train, val and test: sky above, road below, a car
    band; index 11 (unlabelled) on a strip; no frame has a condition group."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for i in range(frames):
            labels = np.zeros((36, 48), np.uint8)  # sky
            labels[18:] = 3  # road
            labels[14:22, 10:30] = 8  # car
            labels[:, :2] = 11  # unlabelled
            image = rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / split / f"0001TP_{i:06d}.png")
            Image.fromarray(labels).save(root / f"{split}annot" / f"0001TP_{i:06d}.png")
    return root


def test_data_camvid_trains_end_to_end_and_scores_its_own_classes(tmp_path):
    """data=camvid: the sim splits are generated at its size, the real ones read from the
    SegNet layout; real mIoU averages over the 10 classes CamVid labels (no terrain)."""
    real = _camvid_fixture(tmp_path / "camvid")
    out = tmp_path / "out"
    cfg = smoke_config(
        tmp_path,
        "data=camvid",
        f"data.real_root={real}",
        "randomization=light",
        "data.image.height=32",
        "data.image.width=48",
        "data.generate.splits.sim_train.num_frames=24",
        "data.generate.splits.sim_val.num_frames=8",
        "data.generate.shard_size=16",
        "data.loader.batch_size=10",
        "data.loader.batches_per_epoch=2",
        "data.loader.val_batch_size=4",
        "stages.source_only.max_epochs=1",
        "stages.finetune.real_fraction=1.0",
        "log_model=false",
        "retries=0",
        "risk.enabled=false",
    )
    results = run_train(cfg)
    metrics = results["finetune"].metrics
    assert 0.0 <= metrics["test/real/miou"] <= 1.0
    assert "test/real/miou_all" in metrics  # the 11-class figure, named so
    assert "test/real/iou/terrain" not in metrics and "test/real/iou/road" in metrics
    assert "test/sim/miou_all" not in metrics  # generated data labels every class
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    logged = client.get_run(results["finetune"].run_id).data.metrics
    assert "test/real/unknown/miou" in logged


def test_a_later_stage_that_cannot_run_stops_the_run_before_the_first_trains(smoke_run):
    tmp, _ = smoke_run
    out = tmp / "late"
    with pytest.raises(ConfigError, match=r"stages\.finetune\.real_fraction=0.0 leaves no real"):
        run_train(smoke_config(tmp, "stages.finetune.real_fraction=0.0", f"paths.output={out}"))
    assert not (out / "runs").exists()  # source_only did not train first


def test_a_stage_killed_after_testing_resumes_without_testing_twice(tmp_path, monkeypatch):
    """Killed between fit/test and the done marker: MLflow must not show the run FINISHED,
    and the resumed stage must not log its test figures a second time."""
    import training.stages.monitoring as monitoring

    real_assess = monitoring.assess_risk
    calls = {"n": 0}

    def killed_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # the scheduler's kill, after the test ran
        return real_assess(*args, **kwargs)

    monkeypatch.setattr(monitoring, "assess_risk", killed_once)
    overrides = ("experiment=source_only", "data=smoke", "log_model=false")
    with pytest.raises(KeyboardInterrupt):
        run_train(smoke_config(tmp_path, *overrides))
    [run_dir] = list((tmp_path / "out" / "runs").iterdir())
    run_id = (run_dir / "mlflow_run_id.txt").read_text()
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "RUNNING"  # not FINISHED: not done
    results = run_train(smoke_config(tmp_path, *overrides))
    assert results["source_only"].run_id == run_id
    assert len(client.get_metric_history(run_id, "test/real/miou")) == 1
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "risk/T-02/psi" in client.get_run(run_id).data.metrics  # assessed on resume


def test_same_seed_same_weights_in_two_output_folders(tmp_path):
    """The repro of 'same seed, different results': the stage folder's hash is the same in
    both outputs, so the two trainings must end with exactly the same weights."""
    overrides = (
        "experiment=source_only", "data=smoke", "log_model=false", "risk.enabled=false",
        "stages.source_only.max_epochs=1", "+stages.source_only.batches_per_epoch=4",
    )  # fmt: skip
    states = []
    for out, noise in (("a", 1), ("b", 2)):
        torch.manual_seed(noise)  # whatever the process drew before must not matter
        torch.rand(noise * 10)
        cfg = smoke_config(tmp_path, *overrides, f"paths.output={tmp_path / out}")
        result = run_train(cfg)["source_only"]
        states.append(torch.load(result.checkpoint, map_location="cpu", weights_only=True))
    a, b = (s["state_dict"] for s in states)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_self_training_adapts_the_pretraining_and_the_finetune(smoke_run):
    tmp, plain = smoke_run
    out = tmp / "self_training"
    cfg = smoke_config(
        tmp,
        "adaptation=self_training",
        "adaptation.self_training.mic_ratio=0.5",
        "adaptation.self_training.threshold=0.5",
        "adaptation.self_training.image_every=4",
        "stages.source_only.max_epochs=1",
        "log_model=false",
        f"paths.output={out}",
    )
    results = run_train(cfg)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    for stage in ("source_only", "finetune"):  # sim only, then sim + the labelled real share
        run_id = results[stage].run_id
        logged = client.get_run(run_id).data.metrics
        for key in ("loss_mix", "loss_mic", "confidence", "confident_share", "agreement"):
            assert f"train/self_training/{key}" in logged, (stage, key)
        assert 0.0 <= logged["train/self_training/agreement"] <= 1.0
        assert "train/self_training/pseudo/road" in logged
        artifacts = [a.path for a in client.list_artifacts(run_id, "self_training")]
        assert "self_training/examples_step000000.png" in artifacts, artifacts
    assert results["source_only"].run_dir.name != plain["source_only"].run_dir.name
