"""A tampered registry model must not run code: loads go through the exported program only.

Each tampering is first shown to be a live exploit through the loader it targets
(``mlflow.pytorch.load_model`` for a pickled ``model.pth``; ``torch.export.load`` for a
crafted ``.pt2``): the payload writes a marker file. Then :meth:`ModelRegistry.load` -- the
load behind ``compare``, ``scripts/monitor.py`` and the retraining trigger -- must refuse it
with an error naming the model, the version and the file, and the marker must not appear.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import pathlib
import pickle
import shutil
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import pytest
import torch
from torch import nn

from training import tracking
from training.risk.registry import (
    ModelRegistry,
    UnsafeModelError,
    load_exported_model,
    per_image_scores,
)
from training.risk.retrain import check_champion

ROOT = Path(__file__).resolve().parents[1]
H = W = 8
NUM_CLASSES = 3


class TinySegNet(nn.Module):
    """A 1x1-conv segmenter: ``(B, 3, H, W) -> (B, C, H, W)`` logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, NUM_CLASSES, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class Payload:
    """Unpickling this writes ``path``: what an attacker's ``__reduce__`` would do."""

    def __init__(self, path: Path) -> None:
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.path, "payload ran"))


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One TinySegNet logged with training.tracking.log_model to a SQLite store, and a
    pristine copy of its artifact folder (each test restores it, then tampers)."""
    root = tmp_path_factory.mktemp("mlflow-safety")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("safety", artifact_location=(root / "art").as_uri())
    run = client.create_run(exp, tags={"stage": "finetune"})
    model = TinySegNet().eval()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracking.log_model(run.info.run_id, model, H, W, uri=uri)
    client.set_terminated(run.info.run_id)
    return {"uri": uri, "run_id": run.info.run_id, "model": model, "root": root}


@pytest.fixture
def registry(logged, request):
    """v1 (champion) and v2 (challenger) of one logged model, artifacts pristine."""
    reg = ModelRegistry(logged["uri"], name=f"safe-{request.node.name}"[:200])
    reg.register(logged["run_id"])
    reg.register(logged["run_id"])
    folder = artifact_folder(reg, "1")
    pristine = logged["root"] / "pristine"
    if not pristine.exists():
        shutil.copytree(folder, pristine)
    shutil.rmtree(folder)
    shutil.copytree(pristine, folder)
    return reg


def artifact_folder(registry: ModelRegistry, version: str) -> Path:
    uri = registry.client.get_model_version_download_uri(registry.name, version)
    parsed = urlparse(uri)
    assert parsed.scheme == "file", uri
    return Path(unquote(parsed.path))


def probe(batch: int = 1) -> torch.Tensor:
    return torch.linspace(0, 1, batch * 3 * H * W).reshape(batch, 3, H, W)


def rewrite_archive(pt2: Path, edit) -> None:
    """Rewrite the zip ``pt2`` record by record through ``edit(rel, data) -> bytes | None``
    (None drops the record); ``edit(None, None)`` may return extra ``{rel: bytes}``."""
    with zipfile.ZipFile(pt2) as src:
        names = src.namelist()
        root = names[0].split("/", 1)[0] + "/"
        records = {n[len(root) :]: src.read(n) for n in names}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for rel, data in records.items():
            new = edit(rel, data)
            if new is not None:
                dst.writestr(root + rel, new)
        for rel, data in (edit(None, None) or {}).items():
            dst.writestr(root + rel, data)
    pt2.write_bytes(out.getvalue())


# --------------------------------------------------------------------------- the real model


def test_exported_model_loads_scores_and_matches_the_original(logged, registry):
    model = logged["model"]
    loaded = registry.load("champion")
    assert isinstance(loaded, nn.Module)
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe()), model(probe()))
        torch.testing.assert_close(loaded(probe(2)), model(probe(2)))
    batches = [{"image": torch.rand(3, 3, H, W), "mask": torch.randint(0, NUM_CLASSES, (3, H, W))}]
    np.testing.assert_allclose(
        per_image_scores(loaded, batches, NUM_CLASSES),
        per_image_scores(model, batches, NUM_CLASSES, batch_forward=True),
    )
    cmp = registry.compare(lambda m: per_image_scores(m, batches, NUM_CLASSES))
    assert cmp.n == 3 and cmp.diff == 0.0  # the same logged model on both sides


# --------------------------------------------------------------------------- tampering


def test_pickled_model_pth_is_refused_and_never_unpickled(logged, registry, tmp_path):
    """The reported attack: data/model.pt2 replaced by a pickled data/model.pth."""
    marker = tmp_path / "pwned"
    folder = artifact_folder(registry, "1")
    (folder / "data" / "model.pt2").unlink()
    with open(folder / "data" / "model.pth", "wb") as f:
        pickle.dump(Payload(marker), f)
    (folder / "data" / "pickle_module_info.txt").write_text("mlflow.pytorch.pickle_module")

    # The failure, reproduced: MLflow's loader runs the payload.
    with pytest.raises(Exception):  # noqa: B017 (the payload returns None: no .eval())
        mlflow.pytorch.load_model(str(folder))
    assert marker.exists()
    marker.unlink()

    for load in (
        lambda: registry.load("champion"),
        lambda: registry.compare(lambda m: np.zeros(3)),
        lambda: check_champion(
            logged["uri"], registry.name, "monitor", None, None, NUM_CLASSES, {}, [], "."
        ),
    ):
        with pytest.raises(UnsafeModelError) as info:
            load()
        message = str(info.value)
        assert f"model '{registry.name}' version 1" in message
        assert "data/model.pth" in message and "pickle" in message
        assert not marker.exists()
    # The other version (same logged model here) is refused too; nothing ran.
    with pytest.raises(UnsafeModelError, match="data/model.pth"):
        registry.load(2)
    assert not marker.exists()


def test_missing_exported_program_is_refused(registry):
    (artifact_folder(registry, "1") / "data" / "model.pt2").unlink()
    with pytest.raises(UnsafeModelError) as info:
        registry.load("champion")
    assert f"model '{registry.name}' version 1" in str(info.value)
    assert "data/model.pt2 not found" in str(info.value)


def _sample_inputs_payload(marker):
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    return lambda rel, data: buf.getvalue() if rel == "data/sample_inputs/model.pt" else data


def _guards_payload(marker):
    def edit(rel, data):
        if rel == "models/model.json":
            program = json.loads(data)
            program["guards_code"] = [
                f"__import__('pathlib').Path({str(marker)!r}).touch() is None"
            ]
            return json.dumps(program).encode()
        return data

    return edit


def _shape_expression_payload(marker):
    def edit(rel, data):
        if rel == "models/model.json":
            text = data.decode()
            old = "\"Symbol('s"
            assert old in text  # the batch dimension is symbolic
            touch = f"__import__('pathlib').Path({str(marker)!r}).touch() or "
            return text.replace(old, '"' + touch.replace('"', '\\"') + "Symbol('s", 1).encode()
        return data

    return edit


def _pickled_weight_payload(marker):
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)

    def edit(rel, data):
        if rel == "data/weights/model_weights_config.json":
            config = json.loads(data)
            config["config"]["head.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        if rel is not None and rel.startswith("data/weights/weight_0"):
            return buf.getvalue()
        return data

    return edit


@pytest.mark.parametrize(
    ("payload", "record"),
    [
        (_sample_inputs_payload, "data/sample_inputs/model.pt"),  # torch falls back to pickle
        (_guards_payload, "models/model.json"),  # exec()ed by .module(), run by forward
        (_shape_expression_payload, "models/model.json"),  # sympify() = eval
        (_pickled_weight_payload, "data/weights/model_weights_config.json"),
    ],
    ids=["sample-inputs-pickle", "guards-code", "shape-expression", "pickled-weight"],
)
def test_code_inside_the_exported_program_is_refused(registry, tmp_path, payload, record):
    marker = tmp_path / "pwned"
    pt2 = artifact_folder(registry, "1") / "data" / "model.pt2"
    rewrite_archive(pt2, payload(marker))

    # The failure, reproduced: torch.export.load(...).module() and its first call run it.
    # (the payload's return value may not make a working program: errors don't matter)
    with contextlib.suppress(Exception):
        torch.export.load(str(pt2)).module()(probe(2))
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeModelError) as info:
        registry.load("champion")
    message = str(info.value)
    assert f"model '{registry.name}' version 1: data/model.pt2" in message
    assert record in message
    assert not marker.exists()


def test_foreign_records_in_the_archive_are_refused(registry, tmp_path):
    pt2 = artifact_folder(registry, "1") / "data" / "model.pt2"
    rewrite_archive(
        pt2,
        lambda rel, data: {"data/aotinductor/model/evil.so": b"\x7fELF"} if rel is None else data,
    )
    with pytest.raises(UnsafeModelError, match="data/aotinductor/model/evil.so"):
        registry.load("champion")
    pt2.write_bytes(b"not a zip")
    with pytest.raises(UnsafeModelError, match="not a zip"):
        registry.load("champion")


def test_load_exported_model_names_the_folder_contents(tmp_path):
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    with pytest.raises(UnsafeModelError, match=r"thing 7: data/model.pt2 not found.*MLmodel"):
        load_exported_model(tmp_path, "thing 7")


# --------------------------------------------------------------------------- no other loads

LOADERS = ("load_model",)  # mlflow.pytorch / mlflow.pyfunc / mlflow.<flavor>.load_model
#: Loaders that run code from their input; only the registry's checked loader may call one.
UNPICKLERS = ("torch.export.load", "torch.jit.load", "pickle.load", "pickle.loads")


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_no_project_code_loads_a_model_through_a_full_unpickler():
    """Every model load in the project is weights-only or goes through the registry's
    checked exported-program loader."""
    bad = []
    for folder in ("training", "scripts", "adaptation", "core", "simulation"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Call):
                    continue
                name = _dotted(node.func)
                keywords = {k.arg: k.value for k in node.keywords}
                weights_only = keywords.get("weights_only")
                if name.endswith(LOADERS) and "mlflow" in name:
                    bad.append(f"{rel}:{node.lineno} {name}")
                elif name == "torch.load" and not (
                    isinstance(weights_only, ast.Constant) and weights_only.value is True
                ):
                    bad.append(f"{rel}:{node.lineno} torch.load without weights_only=True")
                elif name in UNPICKLERS and rel != "training/risk/registry.py":
                    bad.append(f"{rel}:{node.lineno} {name}")
    assert not bad, bad
