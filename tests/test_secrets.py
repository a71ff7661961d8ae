"""No tracking credentials on disk or on the console.

Credentials come from the environment (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``,
``MLFLOW_TRACKING_TOKEN``, or a whole ``MLFLOW_TRACKING_URI``), never from a config value:

* a ``tracking.uri`` with ``user:password@`` is refused by the Hydra callback
  ``training.tracking_server.TrackingChecks`` before Hydra writes ``.hydra/*.yaml`` (and
  again by the pre-flight check, for configs composed in code);
* a password in ``MLFLOW_TRACKING_URI`` is allowed, but no message, exception chain or file
  of the run shows it.

The subprocess runs stop before any training (the refusal, or the server check of a closed
port), so they are fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from hydra.utils import instantiate

from core.config import ConfigError
from tests.conftest import CONFIGS, ROOT, compose_config
from training.sweeps import SweepConfigError, check_sweep
from training.tracking import redact, redact_uri, uri_has_userinfo
from training.tracking_server import (
    QUIET_URLS,
    TrackingChecks,
    check_config_credentials,
    check_reachable,
    check_tracking,
    refuse_credentials,
)

SECRET = "pw-SECRET"
#: port 1: nothing listens there (connection refused at once)
URI = f"http://user:{SECRET}@127.0.0.1:1"


def run_script(tmp_path: Path, *args: str, env_uri: str | None = None, script: str = "train"):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    if env_uri:
        env["MLFLOW_TRACKING_URI"] = env_uri
    started = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            f"scripts/{script}.py",
            *args,
            f"paths.data={tmp_path / 'data'}",
            f"paths.output={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    return out, time.monotonic() - started


def files_with(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


# ------------------------------------------------------------------------ the helper
def test_redact_uri_removes_every_userinfo():
    assert redact_uri(URI) == "http://127.0.0.1:1"
    assert redact_uri(URI, "***@") == "http://***@127.0.0.1:1"
    assert redact_uri("https://TOKEN@host/x?a=b@c") == "https://host/x?a=b@c"
    # a password with an unencoded @ goes entirely (urlparse splits at the last @ too)
    assert redact_uri("http://u:p@ss@host:5000/") == "http://host:5000/"
    text = f"API request to {URI}/api/2.0 failed; see postgresql://a:b@db/mlflow"
    assert redact_uri(text) == (
        "API request to http://127.0.0.1:1/api/2.0 failed; see postgresql://db/mlflow"
    )
    assert redact_uri("sqlite:////tmp/a@b/mlflow.db") == "sqlite:////tmp/a@b/mlflow.db"
    assert redact({"tracking": {"uri": URI}, "l": [URI], "n": 1}) == {
        "tracking": {"uri": "http://127.0.0.1:1"},
        "l": ["http://127.0.0.1:1"],
        "n": 1,
    }
    assert uri_has_userinfo(URI) and uri_has_userinfo("https://tok@h")
    assert not uri_has_userinfo("http://127.0.0.1:5000") and not uri_has_userinfo("a@b.c")


# ------------------------------------------------------------------------ item 8: tracking.uri
def test_a_password_in_tracking_uri_is_refused_naming_the_env_variables():
    with pytest.raises(ConfigError) as info:
        refuse_credentials(URI)
    message = str(info.value)
    assert message.startswith("tracking.uri: http://***@127.0.0.1:1 carries credentials")
    assert "MLFLOW_TRACKING_USERNAME" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert "MLFLOW_TRACKING_TOKEN" in message
    assert SECRET not in message and "user" not in message.split("carries")[0]
    refuse_credentials("http://127.0.0.1:5000")  # no credentials: fine


def test_the_pre_flight_check_refuses_a_configured_password_before_any_request(tmp_path):
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"^tracking\.uri: http://\*\*\*@127\.0\.0\.1:1 "):
        check_tracking(tmp_path, URI, timeout_s=5.0)
    assert time.monotonic() - started < 1.0  # refused, not sent to the (closed) port


def test_the_callback_checks_the_value_its_interpolation_and_every_override(tmp_path, monkeypatch):
    def config(*overrides: str, mode: RunMode = RunMode.RUN, name: str = "train"):
        with initialize_config_dir(str(CONFIGS), version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            return loader.load_configuration(
                name, [f"paths.output={tmp_path / 'out'}", *overrides], mode
            )

    def refused(cfg) -> str:
        with pytest.raises(SystemExit) as stop:
            if cfg.hydra.mode == RunMode.MULTIRUN:
                TrackingChecks().on_multirun_start(cfg)
            else:
                TrackingChecks().on_run_start(cfg)
        message = str(stop.value.code)
        assert SECRET not in message
        return message

    assert "tracking.uri: http://***@127.0.0.1:1" in refused(config(f"tracking.uri={URI}"))
    # a sweep of it: the values are left out of the primary config, not out of the check
    swept = config(f"tracking.uri=http://127.0.0.1:2,{URI}", "seed=0", mode=RunMode.MULTIRUN)
    assert "http://127.0.0.1:2,http://***@127.0.0.1:1" in refused(swept)
    assert "tracking.uri" in refused(config(f"++tracking.uri={URI}"))
    monkeypatch.setenv("TEST_SECRETS_URI", URI)  # an interpolation: checked as it resolves
    refused(config("tracking.uri=${oc.env:TEST_SECRETS_URI}"))
    assert "tracking.uri: " in refused(
        config(f"tracking.uri={URI}", "current.root=x", name="monitor")
    )
    TrackingChecks().on_run_start(config("tracking.uri=http://127.0.0.1:5000"))  # fine
    check_config_credentials(config())


def test_every_script_with_tracking_registers_the_callback():
    scripts = (("train", []), ("pipeline", []), ("monitor", ["current.root=x"]), ("report", []))
    for name, overrides in scripts:
        cfg = compose_config(name, overrides, return_hydra_config=True)
        targets = [c._target_ for c in cfg.hydra.callbacks.values()]
        assert targets[0] == "training.tracking_server.TrackingChecks", (name, targets)


@pytest.mark.slow  # a subprocess each: the full suite runs it
def test_train_py_refuses_a_password_in_tracking_uri_before_writing_anything(tmp_path):
    out, seconds = run_script(tmp_path, f"tracking.uri={URI}")
    console = out.stdout + out.stderr
    assert out.returncode == 1, console
    assert "Error: tracking.uri: http://***@127.0.0.1:1 carries credentials" in out.stderr
    assert "MLFLOW_TRACKING_PASSWORD" in out.stderr
    assert SECRET not in console and "Traceback" not in console
    assert not (tmp_path / "out").exists()  # no .hydra/*.yaml, no store, nothing
    assert not files_with(tmp_path, SECRET)
    assert seconds < 60


@pytest.mark.slow  # a subprocess each: the full suite runs it
def test_a_sweep_of_tracking_uri_is_refused_before_multirun_yaml(tmp_path):
    out, _ = run_script(tmp_path, "-m", f"tracking.uri=http://127.0.0.1:2,{URI}", "seed=0")
    console = out.stdout + out.stderr
    assert out.returncode == 1, console
    assert "tracking.uri: " in out.stderr and SECRET not in console
    assert not (tmp_path / "out").exists()


def test_a_sweep_refusal_never_echoes_a_secret(tmp_path):
    """An override echoed back in the sweep's refusal (here a typo'd key) is redacted."""
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = (
            GlobalHydra.instance()
            .config_loader()
            .load_configuration(
                "train",
                [
                    "experiment=smoke",
                    f"paths.output={tmp_path / 'out'}",
                    f"tracking.url={URI},http://127.0.0.1:2",
                ],
                RunMode.MULTIRUN,
            )
        )
        callback = instantiate(cfg.hydra.callbacks.sweep_checks)
        with pytest.raises(SweepConfigError) as info:
            check_sweep(cfg, callback.extra_checks)
    message = str(info.value)
    assert "no key 'tracking.url'" in message
    assert "http://***@127.0.0.1:1" in message and SECRET not in message


# ------------------------------------------------------------------------ item 9: the env URI
def test_a_failing_server_check_chains_no_secret(monkeypatch):
    monkeypatch.delenv(QUIET_URLS, raising=False)
    with pytest.raises(ConfigError) as info:
        check_reachable(URI, timeout_s=2.0, source="MLFLOW_TRACKING_URI")
    error = info.value
    assert error.__cause__ is None and error.__context__ is None  # MLflow's error not chained
    printed = "".join(traceback.format_exception(error))
    assert "MLFLOW_TRACKING_URI: the MLflow tracking server http://127.0.0.1:1 did not answer" in (
        printed
    )
    assert SECRET not in printed and "user:" not in printed


def test_an_env_uri_with_a_password_silences_mlflows_run_links(tmp_path, monkeypatch):
    """MLflow prints "View run ... at: <the tracking URI>" when a run ends (with a live
    server: tests/test_tracking_server.py)."""
    monkeypatch.setenv(QUIET_URLS, "false")  # put back (unset) after the test
    monkeypatch.setenv("MLFLOW_TRACKING_URI", URI)
    with pytest.raises(ConfigError, match="^MLFLOW_TRACKING_URI: "):
        check_tracking(tmp_path, None, timeout_s=2.0)
    assert os.environ[QUIET_URLS] == "true"


@pytest.mark.slow  # a subprocess each: the full suite runs it
def test_train_py_with_a_password_in_mlflow_tracking_uri_prints_no_secret(tmp_path):
    out, seconds = run_script(tmp_path, "experiment=smoke", env_uri=URI)
    console = out.stdout + out.stderr
    assert out.returncode != 0, console
    assert "MLFLOW_TRACKING_URI: the MLflow tracking server http://127.0.0.1:1 did not " in (
        console
    )
    assert SECRET not in console
    assert "MlflowException" not in console and "During handling" not in console
    assert not files_with(tmp_path, SECRET)
    assert not (tmp_path / "data").exists()  # stopped before any dataset was generated
    assert seconds < 90
