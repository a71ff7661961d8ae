"""Preemption (risk T-04): SIGTERM during training saves the stage's checkpoint, exits with
status 75 and leaves the MLflow run KILLED (not failed); the rerun resumes from the saved
step. Unit tests on the store and a real Lightning fit, then ``scripts/train.py`` end to end
(SIGTERM; Lightning's SLURM requeue on SIGUSR1 with a stand-in ``scontrol``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT
from training import preemption
from training.stages.specs import TrackingSpec
from training.stages.store import StageStore


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One tracking store for the unit tests (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def make_store(tmp_path: Path, uri: str, make_trainer, on_failure=None) -> StageStore:
    tracking = TrackingSpec(uri, "preempt", "", "", (tmp_path / "artifacts").as_uri())
    return StageStore(tmp_path, tracking, "exp", make_trainer, retries=2, on_failure=on_failure)


class SigtermTrainer:
    """Stands in for ``pl.Trainer``: the first ``fit`` stops as Lightning does on SIGTERM."""

    calls = 0

    def __init__(self, **kwargs) -> None:
        pass

    def fit(self, module, **kwargs) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        SigtermTrainer.calls += 1
        if SigtermTrainer.calls == 1:
            raise SIGTERMException()


def test_a_sigterm_stop_is_no_failure_and_the_rerun_reopens_the_run(tmp_path, uri):
    failures = []
    SigtermTrainer.calls = 0
    s = make_store(tmp_path, uri, SigtermTrainer, on_failure=lambda run, exc: failures.append(exc))
    with pytest.raises(preemption.Preempted) as stop, s.open("stage", "abc") as run:
        run.fit(object())
    assert stop.value.code == preemption.EXIT_PREEMPTED == 75
    assert SigtermTrainer.calls == 1  # not retried in the same process (retries=2)
    assert failures == []  # no T-05 job-failure alert
    client = MlflowClient(s.tracking.uri)
    first = client.get_run(run.run_id)
    assert first.info.status == "KILLED"
    assert "status" not in first.data.tags and "failure_0" not in first.data.tags
    assert first.data.tags["preempted_0"].startswith("SIGTERM; ")
    assert not (run.run_dir / "done.json").exists()
    with s.open("stage", "abc") as again:
        assert again.run_id == run.run_id and not again.fresh
        assert client.get_run(run.run_id).info.status == "RUNNING"  # resumed
        again.fit(object())
        again.finish({"metrics": {}})
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_the_newest_of_last_and_the_slurm_requeue_checkpoints_resumes(tmp_path):
    assert preemption.resume_checkpoint(tmp_path) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"a")
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"b")
    os.utime(hpc, ns=(10**18, 10**18))
    os.utime(last, ns=(2 * 10**18, 2 * 10**18))
    assert preemption.resume_checkpoint(tmp_path) == last
    os.utime(hpc, ns=(3 * 10**18, 3 * 10**18))  # Lightning's SIGUSR1 save came later
    assert preemption.resume_checkpoint(tmp_path) == hpc
    os.utime(last, ns=(3 * 10**18, 3 * 10**18))
    assert preemption.resume_checkpoint(tmp_path) == last  # a tie: ours


def test_a_save_killed_half_way_is_removed_unless_its_writer_runs(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    stale = tmp_path / f".last.ckpt.tmp-{int(dead.stdout)}-0123abcd"
    live = tmp_path / f".last.ckpt.tmp-{os.getppid()}-89abcdef"
    for path in (stale, live):
        path.write_bytes(b"part")
    assert preemption.remove_partial(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


class ParentDouble:
    def __init__(self, client, run_id):
        self.client, self.run_id, self.failed = client, run_id, None

    def fail(self, error):
        self.failed = error


@pytest.mark.parametrize("preempted", [True, False])
def test_a_parent_run_is_killed_by_a_preemption_and_failed_by_an_error(uri, preempted):
    client = MlflowClient(uri)
    run = client.create_run("0").info.run_id
    parent = ParentDouble(client, run)
    error = preemption.Preempted("source_only: preempted") if preempted else OSError("disk")
    preemption.end_parent(parent, error)
    info = client.get_run(run)
    if preempted:
        assert info.info.status == "KILLED" and parent.failed is None
        assert info.data.tags["preempted"] == "source_only: preempted"
    else:
        assert info.info.status == "RUNNING" and parent.failed is error


def _tiny_module(stop_at: int, stop_testing: bool = False):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            if self.global_step == stop_at and stop_at >= 0:
                signal.raise_signal(signal.SIGTERM)  # what `kill <pid>` delivers
            (x,) = batch
            return self.layer(x).pow(2).mean()

        def test_step(self, batch, batch_idx):
            if stop_testing:
                signal.raise_signal(signal.SIGTERM)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(40, 4)), batch_size=4)

        test_dataloader = train_dataloader

    return Tiny()


def test_sigterm_in_a_real_fit_saves_last_ckpt_at_that_step(tmp_path, uri):
    """Lightning's own handler stops at the end of the batch that saw the signal; the
    callback saves the whole training state there, and the resumed fit goes on from it."""
    from functools import partial

    import pytorch_lightning as pl

    make_trainer = partial(pl.Trainer, accelerator="cpu", max_epochs=2, log_every_n_steps=1)
    s = make_store(tmp_path, uri, make_trainer)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(preemption.Preempted, match=r"step 4\)"), s.open("stage", "abc") as run:
        run.fit(_tiny_module(stop_at=3))
    assert signal.getsignal(signal.SIGTERM) == handler  # Lightning put ours back
    ckpt = torch.load(run.checkpoint_dir / "last.ckpt", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 4)  # batches 0..3 done
    assert "optimizer_states" in ckpt and "loops" in ckpt
    assert sorted(p.name for p in run.checkpoint_dir.iterdir()) == ["last.ckpt"]
    with s.open("stage", "abc") as again:
        trainer = again.fit(_tiny_module(stop_at=-1))
        again.finish({})
    assert trainer.global_step == 20  # 2 epochs of 10 batches: 4 before, 16 after
    tags = MlflowClient(s.tracking.uri).get_run(run.run_id).data.tags
    assert tags["preempted_0"] == "SIGTERM; saved checkpoints/last.ckpt (epoch 0, step 4)"


# ------------------------------------------------------------- DDP: two CPU processes
DDP_FIT = """
import signal, sys
import pytorch_lightning as pl, torch
from torch.utils.data import DataLoader, TensorDataset
from training.preemption import EXIT_PREEMPTED, is_preemption, preemption_checkpoint

out, signalled = sys.argv[1], int(sys.argv[2])

class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.sent = False

    def training_step(self, batch, batch_idx):
        if self.global_step == 3 and self.global_rank == signalled and not self.sent:
            self.sent = True  # mid-step: the other rank is on its way to the gradient all-reduce
            signal.raise_signal(signal.SIGTERM)
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(40, 4)), batch_size=4)

trainer = pl.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    callbacks=[preemption_checkpoint(out)],
)
try:
    trainer.fit(Tiny())
    print(f"rank {trainer.global_rank}: finished", flush=True)
except BaseException as error:
    print(f"rank {trainer.global_rank}: {type(error).__name__} at step {trainer.global_step}",
          flush=True)
    sys.exit(EXIT_PREEMPTED if is_preemption(error) else 1)
"""


@pytest.mark.slow
@pytest.mark.parametrize("signalled", [0, 1])
def test_a_sigterm_mid_step_on_one_ddp_rank_stops_both_at_the_same_step(tmp_path, signalled):
    """SIGTERM to one process of a 2-process fit, in the middle of a training step: Lightning
    alone runs a broadcast in its signal handler, which meets the other rank's gradient
    all-reduce and hangs both. With the callback both stop after that step and one
    checkpoint holds it."""
    script = tmp_path / "fit.py"
    script.write_text(DDP_FIT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "ckpt"), str(signalled)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # rank 1 is its child: one group to kill on a hang
    )
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the 2-process fit hung after SIGTERM:\n{out[-3000:]}")
    assert proc.returncode == preemption.EXIT_PREEMPTED, out[-3000:]
    stops = sorted(re.findall(r"rank (\d): (\w+) at step (\d+)", out))
    assert stops == [("0", "SIGTERMException", "4"), ("1", "SIGTERMException", "4")], out[-3000:]
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4


# ------------------------------------------------------------- scripts/train.py, end to end
TRAIN = [
    "experiment=source_only",
    "data=smoke",
    "log_model=false",
    "risk.enabled=false",  # the register's monitors are not what is tested here
    "retries=0",
    "stages.source_only.max_epochs=3",  # 12 batches each: steps 0..35
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The smoke datasets, generated by the first training of the module."""
    return tmp_path_factory.mktemp("data")


def train(tmp_path: Path, data: Path, env=None, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SLURM_"))}
    return subprocess.Popen(
        [
            sys.executable,
            "scripts/train.py",
            *TRAIN,
            *extra,
            f"paths.data={data}",
            f"paths.output={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        env={
            **base,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            **(env or {}),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(what, proc: subprocess.Popen, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(
                f"training ended (status {proc.returncode}):\n{proc.stdout.read()}"
            )
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for training")


def first_epoch_saved(tmp_path: Path):
    """The stage folder once epoch 0's ``last.ckpt`` exists: training is under way."""
    found = list((tmp_path / "out" / "runs").glob("source_only-*/checkpoints/last.ckpt"))
    return found[0].parent.parent if found else None


def finish(proc: subprocess.Popen, timeout: float = 600.0) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"training did not end within {timeout:.0f} s:\n{out[-3000:]}")
    return proc.returncode, out


def stage_runs(tmp_path: Path) -> dict[str, object]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sim2real-drive")
    return {r.data.tags["stage"]: r for r in client.search_runs([exp.experiment_id])}


def assert_resumes_and_finishes(tmp_path, data, run_dir, saved_step, env=None, extra=()):
    """The rerun of the same command resumes at ``saved_step`` and finishes the stage."""
    code, out = finish(train(tmp_path, data, env, extra))
    assert code == 0, out[-3000:]
    resumed = re.search(r"source_only: resuming from (\S+) \(epoch (\d+), step (\d+)\)", out)
    assert resumed, out[-3000:]
    assert resumed.group(1) == "checkpoints/last.ckpt" and int(resumed.group(3)) == saved_step
    done = json.loads((run_dir / "done.json").read_text())
    assert 0.0 <= done["metrics"]["test/real/miou"] <= 1.0
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 36  # 3 epochs x 12 batches over both sessions
    runs = stage_runs(tmp_path)
    stage = runs["source_only"]
    assert stage.info.run_id == done["run_id"] and stage.info.status == "FINISHED"
    assert runs["pipeline"].info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    history = client.get_metric_history(stage.info.run_id, "val/real/miou")
    # epoch 0 from the first session, epochs 1 and 2 after resuming: none trained twice
    assert sorted(m.step for m in history) == [11, 23, 35]
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))
    return stage


def assert_preempted(tmp_path: Path, run_dir: Path, code: int, out: str) -> int:
    """Exit 75, ``last.ckpt`` saved mid-training, the runs KILLED: returns its step."""
    assert code == preemption.EXIT_PREEMPTED, out[-3000:]
    assert out.count("preempted by SIGTERM, saved checkpoints/last.ckpt") == 1  # rank zero
    assert "Traceback" not in out
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] >= 1 and 12 <= ckpt["global_step"] < 36  # after epoch 0, not done
    assert not (run_dir / "done.json").exists()
    assert not [p.name for p in run_dir.rglob(".*tmp*")]  # nothing half-written
    runs = stage_runs(tmp_path)
    stage = runs["source_only"]
    assert stage.info.status == "KILLED"
    assert stage.data.tags["preempted_0"] == (
        f"SIGTERM; saved checkpoints/last.ckpt (epoch {ckpt['epoch']}, step {ckpt['global_step']})"
    )
    assert "status" not in stage.data.tags  # not tagged failed: no T-05 job-failure alert
    assert runs["pipeline"].info.status == "KILLED"
    return int(ckpt["global_step"])


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["cpu", "ddp_cpu"])
def test_sigterm_during_training_exits_75_and_the_rerun_resumes(tmp_path, data_dir, trainer):
    """Under DDP (two CPU processes) Lightning forwards the signal to the other rank and
    both stop at the same step; rank zero alone writes the checkpoint and logs."""
    extra = (f"trainer={trainer}",)
    proc = train(tmp_path, data_dir, extra=extra)
    run_dir = wait_for(lambda: first_epoch_saved(tmp_path), proc)
    proc.send_signal(signal.SIGTERM)  # what a spot reclaim or `scancel` sends
    code, out = finish(proc)
    step = assert_preempted(tmp_path, run_dir, code, out)
    stage = assert_resumes_and_finishes(tmp_path, data_dir, run_dir, step, extra=extra)
    assert set(stage.data.tags) >= {"preempted_0"} and "preempted_1" not in stage.data.tags


@pytest.mark.slow
def test_slurm_requeue_on_sigusr1_then_sigterm_resumes(tmp_path, data_dir):
    """Lightning's SLURMEnvironment (auto_requeue, its default under SLURM) on SIGUSR1:
    saves ``hpc_ckpt_1.ckpt`` and calls ``scontrol requeue <job>``; SLURM's SIGTERM
    follows. No SLURM here: its variables are set and ``scontrol`` records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.txt"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    slurm = {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    proc = train(tmp_path, data_dir, slurm)
    run_dir = wait_for(lambda: first_epoch_saved(tmp_path), proc)
    proc.send_signal(signal.SIGUSR1)  # sbatch --signal=SIGUSR1@90: the time limit is near
    wait_for(lambda: calls.exists() and (run_dir / "hpc_ckpt_1.ckpt").exists(), proc)
    assert calls.read_text().split() == ["requeue", "4242"]
    proc.send_signal(signal.SIGTERM)  # then SLURM stops the job it requeued
    code, out = finish(proc)
    step = assert_preempted(tmp_path, run_dir, code, out)
    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=True)
    assert hpc["global_step"] <= step  # ours, saved later, is the one resumed
    assert_resumes_and_finishes(tmp_path, data_dir, run_dir, step, slurm)  # requeued job


def test_sigterm_while_testing_keeps_the_fits_checkpoint(tmp_path, uri):
    """After the fit, nothing is saved: the fit's last.ckpt (its end) resumes the stage."""
    from functools import partial

    import pytorch_lightning as pl

    make_trainer = partial(pl.Trainer, accelerator="cpu", max_epochs=1, log_every_n_steps=1)
    s = make_store(tmp_path, uri, make_trainer)
    module = _tiny_module(stop_at=-1, stop_testing=True)
    with pytest.raises(preemption.Preempted, match="after the fit"), s.open("s", "t") as run:
        trainer = run.fit(module)
        last = run.checkpoint_dir / "last.ckpt"
        trainer.save_checkpoint(last)  # what the stage's ModelCheckpoint leaves at the end
        before = last.stat().st_mtime_ns
        trainer.test(module, verbose=False)
    assert last.stat().st_mtime_ns == before
    info = MlflowClient(uri).get_run(run.run_id)
    assert info.info.status == "KILLED" and "after the fit" in info.data.tags["preempted_0"]


@pytest.mark.slow
def test_a_stage_stopped_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """SIGTERM at step 17 (epoch 1 of 3, mid-epoch), rerun: the same test figures as the
    run nobody stopped -- with data-loader workers too, whose first batches would otherwise
    be drawn before the checkpoint is restored."""
    from tests.conftest import compose_config
    from training.stages import run_train
    from training.task import SegmentationTask

    def config(name: str):
        out = f"paths.output={tmp_path / name}"
        return compose_config("train", [*overrides, f"paths.data={tmp_path / 'data'}", out])

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = (
        "experiment=source_only",
        "data=smoke",
        "log_model=false",
        "risk.enabled=false",
        "retries=0",
        "stages.source_only.max_epochs=3",
        "data.loader.num_workers=2",
    )
    whole = run_train(config("whole"))["source_only"].metrics
    original = SegmentationTask.training_step

    def stopped_at_17(self, batch, batch_idx):
        if self.global_step == 17:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning stops after this batch
        return original(self, batch, batch_idx)

    monkeypatch.setattr(SegmentationTask, "training_step", stopped_at_17)
    with pytest.raises(preemption.Preempted):
        run_train(config("cut"))
    (run_dir,) = (tmp_path / "cut" / "runs").glob("source_only-*")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 18
    monkeypatch.setattr(SegmentationTask, "training_step", original)
    resumed = run_train(config("cut"))["source_only"].metrics
    for key in ("test/real/miou", "test/sim/miou", "test/real/pixel_acc"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-9), key
