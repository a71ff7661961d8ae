"""A new user's first hour (issue 15): telemetry off, a quiet console, and
``scripts/monitor.py`` right after the main job with nothing but paths on the command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import ROOT

#: What the telemetry probe prints: the switch after importing an entry script, and what
#: mlflow itself reads from it.
PROBE = """
import json, os, sys
import importlib
importlib.import_module(sys.argv[1])
from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY
print(json.dumps({"env": os.environ.get("MLFLOW_DISABLE_TELEMETRY"),
                  "mlflow": MLFLOW_DISABLE_TELEMETRY.get()}))
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


@pytest.mark.parametrize(
    "script", ["scripts.train", "scripts.pipeline", "scripts.monitor", "scripts.report"]
)
def test_telemetry_switch_is_set_in_a_run_environment(script):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, script],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout.splitlines()[-1]) == {"env": "true", "mlflow": True}


def test_telemetry_default_yields_to_the_user_environment():
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "scripts.train"],
        cwd=ROOT,
        env=_clean_env(MLFLOW_DISABLE_TELEMETRY="false"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout.splitlines()[-1]) == {"env": "false", "mlflow": False}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=_clean_env(), capture_output=True, text=True
    )


@pytest.mark.slow
def test_monitor_check_and_rollback_right_after_the_smoke_pipeline(tmp_path):
    from mlflow.tracking import MlflowClient

    from training.risk.registry import ModelRegistry

    data, out = tmp_path / "data", tmp_path / "out"
    paths = [f"paths.data={data}", f"paths.output={out}"]
    main = _run([str(ROOT / "scripts/pipeline.py"), "experiment=smoke", *paths], tmp_path)
    assert main.returncode == 0, main.stderr[-3000:]

    # the console: one line per alert, no Lightning table, tip or accelerator lines, the
    # "notifier disabled" warnings once for the whole run
    console = (main.stdout + main.stderr).splitlines()
    alerts = Counter(line.split(" - ", 1)[-1] for line in console if "ALERT" in line)
    stages = [line for line in console if ": finished in " in line]
    assert alerts and stages
    # each (stage, alert) pair once: an alert fires once per stage that crosses it
    assert max(alerts.values()) <= len(stages), alerts
    assert not [line for line in console if "ALERT" in line and "training.stages" in line]
    disabled = [line for line in console if "notifier disabled" in line]
    assert len(disabled) == len(set(d.split(" - ", 1)[-1] for d in disabled)) <= 2, disabled
    for noise in ("Tip:", "┏", "GPU available", "LeafSpec", "Downloading artifacts"):
        assert not [line for line in console if noise in line], noise

    uri = f"sqlite:///{out / 'mlflow.db'}"
    [model] = [m.name for m in MlflowClient(uri).search_registered_models()]
    registry = ModelRegistry(uri, name=model)
    versions_before = len(registry.describe()["versions"])
    [new_data] = sorted((data / "smoke").glob("real_val-*"))

    monitor = str(ROOT / "scripts/monitor.py")
    check = _run([monitor, f"paths.output={out}", f"current.root={new_data}"], tmp_path)
    assert check.returncode == 0, check.stderr[-3000:]
    assert f"checking {model} version" in check.stdout
    assert "real_train-" in check.stdout  # drift against the champion's own real data
    assert "accuracy" in check.stdout and "Traceback" not in check.stderr
    # the smoke champion is far below 0.85: the retraining ran on the champion's config
    [config_file] = (out / "monitor").glob(f"retrain-{model}-v*.yaml")
    text = config_file.read_text()
    assert "height: 64" in text and "width: 128" in text and str(new_data) in text
    after = registry.describe()
    assert len(after["versions"]) == versions_before + 1
    newest = after["versions"][-1]
    assert newest["tags"].get("stage") == "finetune"
    run = MlflowClient(uri).get_run(newest["run_id"])
    assert run.data.tags.get("trigger", "").startswith("T-01")

    # rollback with no override: make a second champion, then roll it back
    if registry.aliases().get("challenger"):
        registry.promote(force=True)
    champion = registry.history()[-2]["version"]  # the one a rollback brings back
    rollback = _run([monitor, f"paths.output={out}", "action=rollback"], tmp_path)
    assert rollback.returncode == 0, rollback.stderr[-3000:]
    assert registry.aliases()["champion"] == champion
    assert f"champion of {model} is now version {champion}" in rollback.stdout

    # a name the store lacks, no new data, no dataset there: a message naming the key
    bad = _run([monitor, f"paths.output={out}", "registry.name=nope"], tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "registry.name" in bad.stderr and model in bad.stderr
    bare = _run([monitor, f"paths.output={out}"], tmp_path)
    assert bare.returncode == 2 and "current.root" in bare.stderr
    missing = _run([monitor, f"paths.output={out}", f"current.root={data}/smoke/gone"], tmp_path)
    assert missing.returncode == 2 and "current.root" in missing.stderr
    assert "Traceback" not in missing.stderr and "real_val-" in missing.stderr
