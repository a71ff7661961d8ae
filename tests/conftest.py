"""Shared fixtures: the project's real configs, composed the way users run them, and a
clean MLflow process state for every test."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

#: MLflow settings read from the environment that would send a test's runs (or its model
#: registry, or its experiment) to wherever the developer's shell points.
MLFLOW_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
)

# Under pytest-xdist (``-n``, as ``pyproject.toml`` sets) the workers share the machine's
# cores: each gets its share of threads, and so do the processes its tests start (the
# variables are read by torch's OpenMP pool and inherited by subprocesses). Two workers
# with two threads each on two cores make every training test slower than one worker.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _threads = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)

# MLflow 3 (checked on 3.17) starts its telemetry client when ``mlflow`` is imported, which
# happens while test modules are collected -- before any fixture runs -- and reads
# MLFLOW_DISABLE_TELEMETRY (there is no MLFLOW_ENABLE_TELEMETRY; DO_NOT_TRACK=true works
# too). Set here, at conftest import, it also reaches the subprocesses tests start.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
if "mlflow" in sys.modules:  # imported by a plugin before this file: re-evaluate (-> None)
    from mlflow.telemetry.client import set_telemetry_client

    set_telemetry_client()


def load_config(group: str, name: str):
    return OmegaConf.load(CONFIGS / group / f"{name}.yaml")


def compose_config(
    config_name: str, overrides: Sequence[str] = (), return_hydra_config: bool = False
):
    """``configs/<config_name>.yaml`` composed with ``overrides``, as the scripts see it
    (``return_hydra_config=True`` keeps the ``hydra`` node)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(config_name, list(overrides), return_hydra_config=return_hydra_config)


@pytest.fixture
def compose():
    """:func:`compose_config`, for tests that prefer a fixture to an import."""
    return compose_config


#: MLflow's process-wide state: (module, variable). Read only (private, no public getter
#: tells "unset" from MLflow's default); restored through the public setters where MLflow
#: has them (mlflow 3.17).
MLFLOW_GLOBALS = {
    "tracking": ("mlflow.tracking._tracking_service.utils", "_tracking_uri"),
    "registry": ("mlflow.tracking._model_registry.utils", "_registry_uri"),
    "experiment": ("mlflow.tracking.fluent", "_active_experiment_id"),
}


def _mlflow_globals() -> dict[str, object]:
    """The process-wide MLflow settings (None for a module not imported yet: nothing can
    have set it)."""
    return {
        key: getattr(sys.modules.get(module), name, None)
        for key, (module, name) in MLFLOW_GLOBALS.items()
    }


@pytest.fixture(autouse=True)
def isolated_mlflow(monkeypatch):
    """No test sees the developer's MLflow settings, sends telemetry, or leaks MLflow's
    process-wide state into the next test: ``mlflow.set_tracking_uri`` (which Lightning's
    MLFlowLogger calls too) and ``mlflow.set_registry_uri`` also export
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI, ``mlflow.set_experiment`` keeps an id.

    After the test, the state is put back as it was before it (None, unless a module-scoped
    fixture set it: tests/test_registry.py's store keeps the tracking URI set for its
    module, which MLflow's SQL registry reads when a version is created from a logged
    model). Module-scoped fixtures run outside this one and isolate themselves
    (``pytest.MonkeyPatch.context()``)."""
    absent = [name for name in MLFLOW_ENV if name not in os.environ]
    for name in MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)  # restored by monkeypatch, if set before
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    before = _mlflow_globals()
    yield
    after = _mlflow_globals()
    if after != before:
        import mlflow

        if after["tracking"] != before["tracking"]:
            mlflow.set_tracking_uri(before["tracking"])  # None: unsets MLFLOW_TRACKING_URI
        if after["registry"] != before["registry"]:
            mlflow.set_registry_uri(before["registry"])
        if after["experiment"] != before["experiment"]:  # no public reset: private
            module, name = MLFLOW_GLOBALS["experiment"]
            setattr(sys.modules[module], name, before["experiment"])
    for name in absent:  # exported during the test (the setters above export too)
        os.environ.pop(name, None)


@pytest.fixture(scope="session")
def taxonomy():
    return instantiate(load_config("taxonomy", "drive11"))


@pytest.fixture(scope="session")
def randomizer_full():
    return instantiate(load_config("randomization", "full"))
