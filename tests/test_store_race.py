"""Two runs on a fresh output folder create MLflow's SQLite store once (no schema race).

MLflow creates and migrates a store's tables in whichever process opens an empty database
first, without a lock: two processes doing it at once fail with ``sqlite3.OperationalError``
(``table _alembic_tmp_experiments already exists``, ``duplicate column name: step``, ...).
``training.tracking.create_store`` does it under ``<db folder>/locks/mlflow-store.lock``;
``check_tracking_config`` (the start of every ``run_train``) and the sweep callback's
``before_jobs`` call it. No training here.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3

import pytest
from omegaconf import OmegaConf

from training.sweeps import SweepChecks
from training.tracking import STORE_LOCK, create_store, store_lock
from training.tracking_server import check_tracking_config

PROCESSES = 2
ROUNDS = 2  # fresh stores per process start (the import of mlflow is paid once)


def _create(uris: list[str], barrier, results, locked: bool) -> None:
    """Open each store of ``uris`` in turn, all processes at the same moment (``barrier``);
    put one result per store: None, or the error."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from training.tracking import create_store, open_store

    for uri in uris:
        barrier.wait(timeout=300)
        try:
            (create_store if locked else open_store)(uri)
            results.put((uri, None))
        except Exception as exc:  # reported to the test
            results.put((uri, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))


def race(tmp_path, locked: bool, processes: int = PROCESSES, rounds: int = ROUNDS):
    """Run ``processes`` processes that each open the same ``rounds`` fresh stores at once;
    return ``{uri: [error or None, ...]}``."""
    context = multiprocessing.get_context("spawn")  # as the joblib launcher's workers
    uris = [f"sqlite:///{tmp_path / f'round{i}' / 'mlflow.db'}" for i in range(rounds)]
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=_create, args=(uris, barrier, results, locked))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        found: dict[str, list[str | None]] = {uri: [] for uri in uris}
        for _ in range(processes * rounds):
            uri, error = results.get(timeout=600)
            found[uri].append(error)
    finally:
        for worker in workers:
            worker.join(60)
            if worker.is_alive():
                worker.kill()
    return found


def tables(uri: str) -> set[str]:
    path = uri.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


@pytest.mark.slow  # a subprocess each: the full suite runs it
def test_processes_creating_a_fresh_store_at_once_all_succeed(tmp_path):
    found = race(tmp_path, locked=True)
    for uri, errors in found.items():
        assert errors == [None] * PROCESSES, (uri, errors)
        assert {"experiments", "runs", "metrics", "evaluation_datasets"} <= tables(uri)
        assert (tmp_path / uri.split("/")[-2] / STORE_LOCK).exists()


@pytest.mark.slow
def test_without_the_lock_the_same_race_fails(tmp_path):
    """The failure the lock prevents: the same race through MLflow's own store opening.
    A race is likely, not certain (on a loaded 2-core machine every attempt here collided),
    so a run without one is skipped rather than failed. The error varies with the moment of the
    collision: ``sqlite3.OperationalError`` (``table experiments already exists``,
    ``duplicate column name: step``) or alembic's ``CommandError`` (``Online migration
    expected to match one row``)."""
    found = race(tmp_path, locked=False)
    errors = [e for errs in found.values() for e in errs if e]
    if not errors:
        pytest.skip("the processes did not collide this time")
    assert any(
        "already exists" in e or "duplicate column" in e or "migration" in e for e in errors
    ), errors


def test_the_lock_lies_next_to_the_database(tmp_path):
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    assert store_lock(uri) == tmp_path / "out" / "locks" / "mlflow-store.lock"
    assert store_lock("http://127.0.0.1:5000") is None
    assert store_lock("sqlite://") is None  # in memory
    assert create_store("http://127.0.0.1:1") is None  # a server: nothing to create, no call
    assert create_store(uri) == store_lock(uri)
    assert "experiments" in tables(uri)
    assert create_store(uri) == store_lock(uri)  # an existing store: opened, left as it is


def test_check_tracking_config_creates_the_default_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = OmegaConf.create({"paths": {"output": str(tmp_path / "out")}, "tracking": {}})
    uri = check_tracking_config(cfg, create=False)  # the sweep's check: creates nothing
    assert not (tmp_path / "out").exists()
    assert check_tracking_config(cfg) == uri  # run_train's: creates it, under the lock
    assert "experiments" in tables(uri)
    assert (tmp_path / "out" / "locks" / "mlflow-store.lock").exists()


def _sweep_config(tmp_path, *overrides: str):
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from tests.conftest import CONFIGS

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return loader.load_configuration(
            "train",
            [
                "experiment=smoke",
                f"paths.data={tmp_path / 'data'}",
                f"paths.output={tmp_path / 'out'}",
                *overrides,
            ],
            RunMode.MULTIRUN,
        )


def test_the_sweep_callback_creates_the_store_before_any_job(tmp_path, monkeypatch):
    """``-m hydra/launcher=local seed=0,1`` on a fresh folder: the registered callback (as
    Hydra instantiates it from configs/train.yaml) creates the store once, in the launching
    process, before the launcher starts the jobs; a refused sweep creates nothing."""
    from hydra.utils import instantiate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bad = _sweep_config(tmp_path, "hydra/launcher=local", "seed=0,1", "stages.finetun.x=1,2")
    with pytest.raises(SystemExit, match="the sweep was refused"):
        instantiate(bad.hydra.callbacks.sweep_checks).on_multirun_start(bad)
    assert not (tmp_path / "out").exists()

    cfg = _sweep_config(tmp_path, "hydra/launcher=local", "seed=0,1")
    callback = instantiate(cfg.hydra.callbacks.sweep_checks)
    assert isinstance(callback, SweepChecks) and callback.before_jobs
    callback.on_multirun_start(cfg)
    assert "evaluation_datasets" in tables(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    assert (tmp_path / "out" / "locks" / "mlflow-store.lock").exists()
