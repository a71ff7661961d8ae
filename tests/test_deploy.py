"""O-02 deployability: the registered export, loaded in a fresh process, against the
in-memory model (a real local MLflow store; the fresh process is a real interpreter unless
a test stands in a fake one to crash or hang)."""

from __future__ import annotations

import copy
import os
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from torch import nn

from core.config import ConfigError
from training import tracking
from training.risk import deploy
from training.risk.registry import HISTORY_TAG, ModelRegistry
from training.stages.monitoring import register_and_compare

H = W = 8
NUM_CLASSES = 3
REGISTRY = {"metric": "miou", "margin": 0.01, "confidence": 0.95}


class TinySegNet(nn.Module):
    """A 1x1-conv segmenter: ``(B, 3, H, W) -> (B, C, H, W)`` logits."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Conv2d(3, NUM_CLASSES, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def tampered(model: nn.Module) -> nn.Module:
    """``model`` with its weights shifted after export: other predictions."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head.weight.add_(torch.randn(other.head.weight.shape, generator=_gen(7)) * 2)
    return other


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 4) -> np.ndarray:
    return torch.rand(n, 3, H, W, generator=_gen(0)).numpy()


def val_loader() -> list[dict[str, torch.Tensor]]:
    """Two batches of (2, 3, H, W) images with masks, fixed."""
    g = _gen(1)
    return [
        {"image": torch.rand(2, 3, H, W, generator=g), "mask": torch.randint(0, 3, (2, H, W))}
        for _ in range(2)
    ]


def logged_run(store: dict, model: nn.Module) -> str:
    """A fresh run that logged ``model`` the way stages do (export, ``data/model.pt2``)."""
    client = mlflow.MlflowClient(store["uri"])
    run = client.create_run(store["experiment"], tags={"stage": "finetune"})
    tracking.log_model(run.info.run_id, model, H, W, uri=store["uri"])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store with one run that logged TinySegNet(seed=1), registered as
    ``deploy-base`` version 1."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("deploy-test", artifact_location=(root / "art").as_uri())
    info = {"uri": uri, "experiment": exp, "model": TinySegNet(seed=1).eval()}
    with pytest.MonkeyPatch.context():
        info["run_id"] = logged_run(info, info["model"])
        ModelRegistry(uri, name="deploy-base").register(info["run_id"])
    mlflow.set_tracking_uri(None)
    return info


def fake_python(tmp_path: Path, body: str) -> str:
    """An executable standing in for the interpreter of the fresh process: a Python
    script (run by this interpreter) with ``body``; ``out`` is the ``--out`` folder."""
    path = tmp_path / "fake-python"
    path.write_text(
        f"#!{sys.executable}\nimport sys, time\nfrom pathlib import Path\n"
        "out = Path(sys.argv[sys.argv.index('--out') + 1])\n" + textwrap.dedent(body),
        encoding="utf-8",
    )
    path.chmod(0o755)
    return str(path)


# --------------------------------------------------------------------------- fast: settings
def test_settings_defaults_off_switch_and_bad_keys():
    assert deploy.settings_from({"name": "m"}) == deploy.DeploySettings(8, 0.999, 300.0)
    assert deploy.settings_from({"deploy_images": 0}) is None
    given = {"deploy_images": 2, "deploy_min_agreement": 1, "deploy_timeout_s": 1.5}
    assert deploy.settings_from(given) == deploy.DeploySettings(2, 1.0, 1.5)
    for key, value, expected in [
        ("deploy_images", -1, r"registry\.deploy_images: expected a whole number >= 0"),
        ("deploy_images", 2.5, r"registry\.deploy_images: expected a whole number"),
        ("deploy_min_agreement", 1.2, r"registry\.deploy_min_agreement: .*\[0, 1\]"),
        ("deploy_min_agreement", "0.9", r"registry\.deploy_min_agreement: .*got '0.9'"),
        ("deploy_timeout_s", 0, r"registry\.deploy_timeout_s: expected a number > 0"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            deploy.settings_from({key: value})


def test_register_and_compare_checks_settings_before_any_work():
    # an unreachable store: the bad key is reported before anything touches it
    with pytest.raises(ConfigError, match=r"registry\.deploy_timeout_s"):
        register_and_compare(
            "sqlite:////nonexistent/dir/mlflow.db",
            "run",
            {**REGISTRY, "name": "m", "deploy_timeout_s": -5},
            val_loader(),
            NUM_CLASSES,
            0,
            model=TinySegNet(seed=1),
        )


def test_probe_images_agreement_and_masks():
    probe = deploy.probe_images(val_loader(), 3)
    assert probe.shape == (3, 3, H, W) and probe.dtype == np.float32
    np.testing.assert_array_equal(probe[2], val_loader()[1]["image"][0].numpy())
    assert deploy.probe_images([], 3).shape[0] == 0
    a = np.zeros((2, 2, 2), np.int64)
    b = a.copy()
    b[0, 0, 0] = 1
    assert deploy.pixel_agreement(a, a) == 1.0
    assert deploy.pixel_agreement(a, b) == pytest.approx(7 / 8)
    with pytest.raises(ValueError, match="shapes"):
        deploy.pixel_agreement(a, b[:1])
    model = TinySegNet(seed=1).train()
    masks = deploy.predict_masks(model, images())
    expected = model(torch.from_numpy(images())).argmax(1).numpy()
    np.testing.assert_array_equal(masks, expected)
    assert model.training  # the caller's model is left as it was


def test_no_probe_images_is_a_failed_check(tmp_path):
    check = deploy.check_export(tmp_path, TinySegNet(seed=1), np.zeros((0, 3, H, W)))
    assert not check.deployable and "no probe images" in check.reason
    assert check.figures() == {"risk/O-02/deployable": 0.0}


# --------------------------------------------------------------------------- fast: fake child
def test_crashing_child_reports_its_failure(tmp_path):
    python = fake_python(
        tmp_path, "print('ImportError: no module named torch', file=sys.stderr)\nsys.exit(7)\n"
    )
    check = deploy.check_export(tmp_path, TinySegNet(seed=1), images(), python=python)
    assert not check.deployable
    assert check.reason == (
        "the fresh process exited with status 7: ImportError: no module named torch"
    )
    figures = check.figures()
    assert figures["risk/O-02/deployable"] == 0.0
    assert "risk/O-02/pixel_agreement" not in figures  # not measured, not made up
    assert check.tags()["deploy.reason"] == check.reason


def test_child_that_writes_nothing_or_a_pickle_fails(tmp_path):
    silent = fake_python(tmp_path, "sys.exit(0)\n")
    check = deploy.check_export(tmp_path, TinySegNet(seed=1), images(), python=silent)
    assert not check.deployable and "wrote no readable masks" in check.reason
    # an object array needs the unpickler: refused by allow_pickle=False
    pickled = fake_python(
        tmp_path,
        "import numpy as np\n"
        "np.save(out / 'masks.npy', np.array([{}], dtype=object), allow_pickle=True)\n",
    )
    check = deploy.check_export(tmp_path, TinySegNet(seed=1), images(), python=pickled)
    assert not check.deployable and "allow_pickle=False" in check.reason


def test_wrong_mask_shape_fails(tmp_path):
    python = fake_python(
        tmp_path,
        "import numpy as np\nnp.save(out / 'masks.npy', np.zeros((4, 4, 4), np.int64))\n"
        "(out / 'result.json').write_text('{\"load_seconds\": 0.5}')\n",
    )
    check = deploy.check_export(tmp_path, TinySegNet(seed=1), images(), python=python)
    assert not check.deployable
    assert "shape (4, 4, 4), the checkpoint's (4, 8, 8)" in check.reason
    assert check.load_seconds == 0.5


def test_hanging_child_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    python = fake_python(
        tmp_path,
        "import subprocess\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        f"Path({str(pid_file)!r}).write_text(str(child.pid))\n"
        "time.sleep(60)\n",
    )
    start = time.perf_counter()
    check = deploy.check_export(
        tmp_path, TinySegNet(seed=1), images(), timeout_s=2.0, python=python
    )
    elapsed = time.perf_counter() - start
    assert not check.deployable
    assert check.reason == (
        "the fresh process did not finish within 2 s (registry.deploy_timeout_s); killed"
    )
    assert 2.0 <= elapsed < 10.0 and check.child_seconds >= 2.0
    assert not _alive(int(pid_file.read_text()))  # its own child went with it


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.1)  # SIGKILL is delivered asynchronously
    return True


# --------------------------------------------------------------------------- slow: real child
@pytest.mark.slow
def test_honest_export_passes(store):
    check = deploy.check_deployable(
        store["uri"], "deploy-base", "1", store["model"], images(), min_agreement=0.999
    )
    assert check.reason == "ok" and check.deployable
    assert check.pixel_agreement == 1.0 and check.images == 4
    assert 0 < check.load_seconds < check.child_seconds
    figures = check.figures()
    assert set(figures) == {
        "risk/O-02/pixel_agreement",
        "risk/O-02/deployable",
        "risk/O-02/load_seconds",
        "risk/O-02/child_seconds",
    }
    assert figures["risk/O-02/deployable"] == 1.0


@pytest.mark.slow
def test_export_whose_predictions_differ_is_refused(store):
    """The version's export against an in-memory model whose weights changed after export."""
    other = tampered(store["model"])
    expected = deploy.pixel_agreement(
        deploy.predict_masks(store["model"], images()), deploy.predict_masks(other, images())
    )
    assert expected < 0.9  # the tampering changes predictions
    check = deploy.check_deployable(store["uri"], "deploy-base", "1", other, images())
    assert not check.deployable
    assert check.pixel_agreement == pytest.approx(expected)
    assert check.reason.startswith(f"pixel agreement {expected:.6f} < 0.999 ")
    assert "(registry.deploy_min_agreement)" in check.reason
    assert check.figures()["risk/O-02/deployable"] == 0.0


@pytest.mark.slow
def test_child_refusing_an_unsafe_export_fails_with_the_reason(store, tmp_path):
    client = mlflow.MlflowClient(store["uri"], registry_uri=store["uri"])
    folder = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("deploy-base", "1"),
        dst_path=str(tmp_path / "model"),
        tracking_uri=store["uri"],
    )
    (Path(folder) / "data" / "model.pth").write_bytes(b"not loaded")
    check = deploy.check_export(folder, store["model"], images(), where="model 'x' version 9")
    assert not check.deployable
    assert check.reason.startswith(
        "the fresh process could not load or run the exported program: UnsafeModelError: "
        "model 'x' version 9: refusing to load data/model.pth"
    )
    assert "risk/O-02/load_seconds" not in check.figures()


@pytest.mark.slow
def test_registration_refuses_undeployable_versions(store, request):
    """First version not deployable -> no champion; a deployable one becomes champion; an
    undeployable challenger is neither compared nor promoted; an honest one is compared."""
    uri, name = store["uri"], f"deploy-{request.node.name}"
    settings = {**REGISTRY, "name": name, "deploy_images": 3}
    client = mlflow.MlflowClient(uri)
    reg = ModelRegistry(uri, name=name)
    honest = TinySegNet(seed=2).eval()

    run_a = logged_run(store, honest)
    out = register_and_compare(uri, run_a, settings, val_loader(), NUM_CLASSES, 0, tampered(honest))
    assert out["registry/promoted"] == 0.0 and out["risk/O-02/deployable"] == 0.0
    assert out["risk/O-02/pixel_agreement"] < 0.999
    assert reg.aliases() == {}  # nothing to deploy rather than a wrong model
    assert reg.history() == []
    v1 = client.get_model_version(name, "1").tags
    assert v1["decision"] == "not_deployable" and v1["deploy.reason"].startswith("pixel agreement")
    assert v1["decision_reason"] == v1["deploy.reason"]  # ModelRegistry.withdraw
    run = client.get_run(run_a).data
    assert run.tags["registry/decision"] == "not_deployable"
    assert run.tags["risk/O-02/reason"] == v1["deploy.reason"]
    assert run.metrics["risk/O-02/deployable"] == 0.0

    run_b = logged_run(store, honest)
    out = register_and_compare(uri, run_b, settings, val_loader(), NUM_CLASSES, 0, honest)
    assert out == {"registry/promoted": 1.0, **_o02(client, run_b)}
    assert out["risk/O-02/pixel_agreement"] == 1.0 and out["risk/O-02/deployable"] == 1.0
    assert reg.aliases() == {"champion": "2"}
    assert [h["version"] for h in reg.history()] == ["2"]

    challenger = TinySegNet(seed=3).eval()
    run_c = logged_run(store, challenger)
    out = register_and_compare(
        uri, run_c, settings, val_loader(), NUM_CLASSES, 0, tampered(challenger)
    )
    assert out["registry/promoted"] == 0.0 and "registry/diff" not in out  # never compared
    assert reg.aliases() == {"champion": "2"}  # the champion stays; no challenger left
    assert client.get_model_version(name, "3").tags["decision"] == "not_deployable"
    assert "compare.diff" not in client.get_model_version(name, "3").tags
    assert client.get_run(run_c).data.tags["registry/decision"] == "not_deployable"

    run_d = logged_run(store, challenger)
    out = register_and_compare(uri, run_d, settings, val_loader(), NUM_CLASSES, 0, challenger)
    assert out["risk/O-02/deployable"] == 1.0 and "registry/diff" in out  # compared
    decision = client.get_run(run_d).data.tags["registry/decision"]
    assert decision in {"promoted", "kept_champion"}
    assert client.get_model_version(name, "4").tags["decision"] == (
        "promoted" if decision == "promoted" else "rejected"
    )
    assert reg.client.get_registered_model(name).tags[HISTORY_TAG]


def _o02(client: mlflow.MlflowClient, run_id: str) -> dict[str, float]:
    """The ``risk/O-02/*`` metrics logged to the run."""
    metrics = client.get_run(run_id).data.metrics
    return {k: v for k, v in metrics.items() if k.startswith("risk/O-02/")}


def test_child_environment_has_no_mlflow_settings(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    env = deploy._child_env()
    assert not any(k.startswith("MLFLOW_") for k in env)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(deploy.ROOT)
