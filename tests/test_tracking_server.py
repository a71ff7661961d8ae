"""The tracking store's pre-flight check, and training against a real ``mlflow server``.

The slow tests start ``mlflow server`` with a SQLite backend on a free loopback port (the
single-host setup of docs/remote-tracking.md), run the smoke training against it over HTTP and
check that runs, metrics, tags and artifacts are on the server -- the artifacts in its
``--artifacts-destination``, none in the training's output folder.
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow.utils.rest_utils  # noqa: F401 - imported here, not inside the timed checks
import pytest
from hydra import initialize_config_dir

from core.config import ConfigError
from tests.conftest import CONFIGS, compose_config
from training.tracking_server import check_reachable, check_tracking

STARTUP_S = 90.0  # a loaded 2-core machine takes 10-20 s
#: the smoke experiment, smaller still: what is tested here is the tracking, not the training
FASTER = [
    "data.loader.batches_per_epoch=4",
    "trainer.log_every_n_steps=2",
    "risk.latency_kinds=[eager]",
    "risk.latency_runs=2",
    *(
        f"data.generate.splits.{split}.num_frames={n}"
        for split, n in (
            ("sim_train", 48),
            ("real_train", 48),
            ("sim_val", 12),
            ("real_val", 12),
            ("real_test", 12),
        )
    ),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A running ``mlflow server`` subprocess (its own process group: it spawns uvicorn)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        self.command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"
        # the job runner (huey consumers, for GenAI evaluation jobs) is not needed here
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.log = (root / "server.log").open("w")
        self.proc = subprocess.Popen(
            self.command,
            cwd=root,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = STARTUP_S) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"mlflow server did not answer /health in {timeout_s:g} s:\n{self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return "".join((self.root / "server.log").read_text().splitlines(True)[-30:])

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait_s)
                # the group outlives its leader for a moment: wait for the workers too
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline:
                    os.killpg(self.proc.pid, 0)
                    time.sleep(0.2)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


class _Canned(http.server.BaseHTTPRequestHandler):
    status = 404
    body = b"not here"

    def do_GET(self):  # noqa: N802 - the http.server interface
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def canned():
    """A loopback HTTP server that answers every GET with ``(status, body)``."""
    servers = []

    def start(status: int, body: bytes = b"") -> str:
        handler = type("Handler", (_Canned,), {"status": status, "body": body})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def raises_within(seconds: float, uri: str, **kwargs) -> str:
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        check_reachable(uri, **kwargs)
    elapsed = time.monotonic() - started
    assert elapsed < seconds, f"the check took {elapsed:.1f} s"
    return str(info.value)


# ------------------------------------------------------------------------ fast: no server
def test_closed_port_fails_fast_naming_the_key_and_the_fix():
    port = free_port()  # closed again: nothing listens there
    message = raises_within(6.0, f"http://127.0.0.1:{port}", timeout_s=5.0)
    assert message.startswith("tracking.uri: ")
    assert f"http://127.0.0.1:{port}" in message
    assert "connection refused" in message
    assert "mlflow server" in message and f"--port {port}" in message
    assert "tracking.uri=null" in message


def test_the_source_named_is_the_one_given():
    port = free_port()
    message = raises_within(6.0, f"http://127.0.0.1:{port}", source="MLFLOW_TRACKING_URI")
    assert message.startswith("MLFLOW_TRACKING_URI: ")
    assert "unset MLFLOW_TRACKING_URI" in message


def test_a_silent_server_times_out_after_timeout_s():
    with socket.socket() as sock:  # accepts connections (kernel backlog), never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        message = raises_within(3.0, f"http://127.0.0.1:{port}", timeout_s=1.0)
    assert "timeout" in message and "1 s" in message


def test_credentials_in_the_uri_never_reach_the_message():
    port = free_port()
    message = raises_within(6.0, f"http://alice:s3cret@127.0.0.1:{port}")
    assert "s3cret" not in message and "alice" not in message
    assert f"http://127.0.0.1:{port}" in message


def test_a_server_that_is_not_mlflow_is_named(canned):
    uri = canned(404, b"<html>nginx</html>")
    message = raises_within(6.0, uri)
    assert "HTTP 404" in message and "not an MLflow tracking server" in message
    assert "--artifacts-only" in message


def test_refused_credentials_point_at_the_environment(canned, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    message = raises_within(6.0, canned(401, b"You are not authenticated."))
    assert "HTTP 401" in message and "none are set" in message
    assert "MLFLOW_TRACKING_USERNAME" in message and "MLFLOW_TRACKING_PASSWORD" in message


def test_a_failing_server_suggests_its_backend_store(canned):
    message = raises_within(6.0, canned(503, b"db down"))
    assert "HTTP 503" in message and "backend store" in message
    assert "tracking.uri=null" in message and "Start the server" not in message


def test_sqlite_and_file_stores_need_a_writable_folder(tmp_path):
    check_reachable(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert not (tmp_path / "new").exists()  # checked, not created: a refused run leaves nothing
    check_reachable((tmp_path / "mlruns").as_uri())
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"^tracking\.uri: the SQLite tracking database"):
        check_reachable(f"sqlite:///{blocker / 'mlflow.db'}")
    with pytest.raises(ConfigError, match="file tracking store"):
        check_reachable((blocker / "mlruns").as_uri(), source="MLFLOW_TRACKING_URI")


def test_other_schemes_are_not_checked():
    check_reachable("databricks://profile")
    check_reachable("sqlite://")  # in memory


def test_check_tracking_names_the_setting_that_won(tmp_path, monkeypatch):
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=r"^MLFLOW_TRACKING_URI: .*unset MLFLOW_TRACKING_URI"):
        check_tracking(tmp_path, None, timeout_s=2.0)
    with pytest.raises(ConfigError, match=r"^tracking\.uri: "):  # the config beats the env
        check_tracking(tmp_path, f"http://127.0.0.1:{port}", timeout_s=2.0)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = check_tracking(tmp_path / "out", None)
    assert uri == f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}"


def test_a_sweep_is_refused_before_its_first_job(tmp_path):
    """Wired as ``hydra.callbacks.sweep_checks.extra_checks`` (training/sweeps.py), the check
    stops a ``-m`` launch with the message (Hydra 1.3 would only warn on an exception)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from training.sweeps import SweepChecks

    uri = f"http://127.0.0.1:{free_port()}"
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = (
            GlobalHydra.instance()
            .config_loader()
            .load_configuration(
                "train",
                [
                    "experiment=smoke",
                    f"paths.data={tmp_path / 'data'}",
                    f"paths.output={tmp_path / 'out'}",
                    f"tracking.uri={uri}",
                    "seed=0,1",
                ],
                RunMode.MULTIRUN,
            )
        )
        check = "training.tracking_server.check_tracking_config"
        started = time.monotonic()
        with pytest.raises(SystemExit) as stop:
            SweepChecks([check]).on_multirun_start(cfg)
    assert time.monotonic() - started < 6.0
    message = str(stop.value.code)
    assert "check_tracking_config: tracking.uri: " in message
    assert f"{uri} did not answer (connection refused" in message


# ------------------------------------------------------------------- slow: a real server
@pytest.mark.slow
def test_a_live_server_passes(server, tmp_path, monkeypatch):
    started = time.monotonic()
    check_reachable(server.uri)
    check_reachable(server.uri + "/")
    assert time.monotonic() - started < 6.0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    assert check_tracking(tmp_path, None) == server.uri


@pytest.mark.slow
def test_a_password_in_mlflow_tracking_uri_is_not_in_mlflows_run_links(
    server, tmp_path, monkeypatch, capsys
):
    """MLflow prints "View run <name> at: <tracking URI>/#/..." when a run ends, with the
    credentials of the URI; after the check that MLFLOW_TRACKING_URI carries some, not."""
    from mlflow.tracking import MlflowClient

    from training.tracking_server import QUIET_URLS

    monkeypatch.setenv(QUIET_URLS, "false")  # put back (unset) after the test
    uri = server.uri.replace("http://", "http://user:pw-SECRET@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert check_tracking(tmp_path, None) == uri  # the server ignores the credentials
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("links") or client.create_experiment("links")
    experiment_id = getattr(experiment, "experiment_id", experiment)
    client.set_terminated(client.create_run(experiment_id).info.run_id)
    assert "pw-SECRET" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_wrong_path_on_a_live_server_is_not_mlflow(server):
    message = raises_within(6.0, server.uri + "/mlflow", source="MLFLOW_TRACKING_URI")
    assert "not an MLflow tracking server" in message


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory):
    """The smoke training (one epoch a stage), tracked by the server over HTTP."""
    import mlflow

    from training.stages import run_train

    tmp = tmp_path_factory.mktemp("remote-smoke")
    before = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        cfg = compose_config(
            "train",
            [
                "experiment=smoke",
                f"paths.data={tmp / 'data'}",
                f"paths.output={tmp / 'out'}",
                f"tracking.uri={server.uri}",
                "log_model=true",
                "registry.enabled=false",
                "stages.source_only.max_epochs=1",
                *FASTER,
            ],
        )
        check_tracking(cfg.paths.output, cfg.tracking.uri)
        started = time.monotonic()
        results = run_train(cfg)
        seconds = time.monotonic() - started
        leaked = os.environ.get("MLFLOW_TRACKING_URI")
    finally:
        # Lightning's MLFlowLogger calls mlflow.set_tracking_uri, which also exports
        # MLFLOW_TRACKING_URI: put the process-wide state back for the tests that follow
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before
    return tmp / "out", results, seconds, leaked


@pytest.mark.slow
def test_training_logs_runs_metrics_and_tags_to_the_server(server, trained):
    from mlflow.tracking import MlflowClient

    _, results, _, _ = trained
    client = MlflowClient(server.uri)
    assert list(results) == ["source_only", "finetune"]
    experiment = client.get_experiment_by_name("sim2real-drive")
    assert experiment is not None
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's choice
    for name, result in results.items():
        run = client.get_run(result.run_id)
        assert run.info.experiment_id == experiment.experiment_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["stage"] == name
        assert run.data.tags["experiment"] == "smoke"
        assert run.data.metrics["test/real/miou"] == pytest.approx(result.metrics["test/real/miou"])
        for key in ("train/loss", "val/real/miou", "test/gap/miou"):
            assert key in run.data.metrics, key
        assert run.data.params["tracking.uri"] == server.uri
        assert {i.dataset.name.split(":")[0] for i in run.inputs.dataset_inputs} >= {"real_test"}


@pytest.mark.slow
def test_artifacts_are_served_and_stored_by_the_server(server, trained, tmp_path):
    from mlflow.tracking import MlflowClient

    output, results, _, _ = trained
    client = MlflowClient(server.uri)
    for result in results.values():
        run = client.get_run(result.run_id)
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        top = {a.path for a in client.list_artifacts(result.run_id)}
        assert {"config.yaml", "checkpoints", "test", "val"} <= top
        images = {a.path for a in client.list_artifacts(result.run_id, "test/real")}
        assert "test/real/predictions_final.png" in images
        # downloaded through the server's artifact proxy ...
        got = Path(client.download_artifacts(result.run_id, "config.yaml", str(tmp_path)))
        text = got.read_text()
        assert "name: smoke" in text and server.uri in text
        ckpt = Path(
            client.download_artifacts(result.run_id, "checkpoints/best.ckpt", str(tmp_path))
        )
        assert ckpt.read_bytes() == result.checkpoint.read_bytes()
        # ... from the server's --artifacts-destination
        stored = server.artifacts / run.info.experiment_id / result.run_id / "artifacts"
        assert (stored / "config.yaml").is_file()
        assert (stored / "test" / "real" / "predictions_final.png").is_file()
        assert (stored / "checkpoints" / "best.ckpt").stat().st_size == ckpt.stat().st_size
        shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)
    # and nothing tracked locally: no SQLite store, no artifact folder in the output
    assert not (output / "mlflow.db").exists()
    assert not (output / "mlartifacts").exists()
    assert not list(output.rglob("mlruns"))


@pytest.mark.slow
def test_logged_models_are_registered_and_loaded_through_the_server(server, trained):
    """log_model (on by default) and the Model Registry, both in the server's SQL store."""
    import torch
    from mlflow.tracking import MlflowClient

    from training.risk.registry import CHAMPION, ModelRegistry

    _, results, _, _ = trained
    client = MlflowClient(server.uri)
    run = client.get_run(results["finetune"].run_id)
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.artifact_location.startswith("mlflow-artifacts:/")
    stored = server.artifacts / run.info.experiment_id / "models" / model.model_id / "artifacts"
    assert (stored / "MLmodel").is_file()

    registry = ModelRegistry(server.uri, name="remote-tracking-test")
    version = registry.register(run.info.run_id)
    assert registry.aliases()[CHAMPION] == version
    with torch.no_grad():
        logits = registry.load(CHAMPION)(torch.rand(2, 3, 64, 128))
    assert logits.shape[:2] == (2, 11) and logits.shape[2:] == (64, 128)
