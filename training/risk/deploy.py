"""O-02 deployability: the registered export, loaded as a deployment would, must predict
what the checkpoint predicts.

Risk O-02 of ``risk-matrix.md`` (deployment failure): a model that evaluated well can still
fail where it is served, because what is served is not the checkpoint but the exported
program (``data/model.pt2``, :func:`training.tracking.log_model`). So before a challenger may
be promoted, :func:`check_deployable`

1. downloads the version's artifacts through the registry's tracking URI;
2. writes fixed probe images (the first ``N`` validation images) to a ``.npy``;
3. starts a fresh Python process (``python -m training.risk.deploy``, no MLflow credentials
   in its environment) that loads ONLY the exported program, through the registry's checked
   loader :func:`~training.risk.registry.load_exported_model` (nothing unpickled), and
   writes its argmax masks as a ``.npy`` (read back with ``allow_pickle=False``);
4. compares them with the in-memory model's masks on the same images: the share of pixels
   whose class agrees; deployable when it is at least ``registry.deploy_min_agreement``.

Whatever goes wrong in the fresh process (an import error, a refused archive, a crash, no
answer within ``registry.deploy_timeout_s``: its whole process group is killed) is a failed
check with the reason, never an exception or a hang. Figures: ``risk/O-02/pixel_agreement``
(share in [0, 1]), ``risk/O-02/deployable`` (1/0), ``risk/O-02/load_seconds`` (the
``load_exported_model`` call in the fresh process), ``risk/O-02/child_seconds`` (the fresh
process from start to exit: interpreter, imports, load, predictions).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: The folder that holds the ``training`` package: the fresh process imports it from here.
ROOT = Path(__file__).resolve().parents[2]
#: ``registry.*`` keys of this check and their defaults (``deploy_images: 0``: no check).
DEFAULTS: dict[str, float] = {
    "deploy_images": 8,
    "deploy_min_agreement": 0.999,
    "deploy_timeout_s": 300,
}
PREFIX = "risk/O-02/"


@dataclass(frozen=True)
class DeploySettings:
    """``images`` probe images, ``min_agreement`` share of pixels, ``timeout_s`` seconds."""

    images: int
    min_agreement: float
    timeout_s: float


def settings_from(registry: Mapping[str, Any]) -> DeploySettings | None:
    """The ``registry.deploy_*`` keys checked (defaults for absent ones); None when the
    check is off (``deploy_images: 0``). Raises :class:`~core.config.ConfigError` naming
    the key, so a run calls it before any work."""
    from core.config import check_number

    values = {**DEFAULTS, **{k: v for k, v in registry.items() if k in DEFAULTS}}
    images = check_number("registry.deploy_images", values["deploy_images"], low=0, integer=True)
    share = check_number(
        "registry.deploy_min_agreement", values["deploy_min_agreement"], low=0, high=1
    )
    timeout = check_number(
        "registry.deploy_timeout_s", values["deploy_timeout_s"], low=0, low_open=True
    )
    if images == 0:
        return None
    return DeploySettings(int(images), float(share), float(timeout))


@dataclass(frozen=True)
class DeployCheck:
    """The outcome of one check.

    ``pixel_agreement`` is NaN and ``load_seconds`` NaN when the fresh process gave no
    predictions / did not load the model; ``reason`` is ``"ok"`` or why it failed.
    """

    deployable: bool
    pixel_agreement: float
    load_seconds: float
    child_seconds: float
    images: int
    reason: str

    def figures(self) -> dict[str, float]:
        """``risk/O-02/*`` figures; unmeasured ones (NaN) are left out."""
        values = {
            "pixel_agreement": self.pixel_agreement,
            "deployable": float(self.deployable),
            "load_seconds": self.load_seconds,
            "child_seconds": self.child_seconds,
        }
        return {PREFIX + k: float(v) for k, v in values.items() if math.isfinite(v)}

    def tags(self) -> dict[str, str]:
        """``deploy.*`` tags for the model version (``deploy.reason`` always present)."""
        out = {f"deploy.{k.removeprefix(PREFIX)}": repr(v) for k, v in self.figures().items()}
        out["deploy.images"] = str(self.images)
        out["deploy.reason"] = self.reason[:5000]
        return out


def probe_images(batches: Iterable[Mapping[str, Any]] | None, n: int) -> np.ndarray:
    """The first ``n`` images of ``batches`` (a DataLoader of Sample dicts) as
    ``(N, 3, H, W)`` float32 (``N <= n``; ``(0, 3, 0, 0)`` when there are none)."""
    out: list[np.ndarray] = []
    count = 0
    for batch in batches or ():
        images = np.asarray(batch["image"].detach().cpu(), dtype=np.float32)
        out.append(images[: n - count])
        count += len(out[-1])
        if count >= n:
            break
    if not out:
        return np.zeros((0, 3, 0, 0), np.float32)
    return np.ascontiguousarray(np.concatenate(out))


def predict_masks(model: Any, images: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` int64 argmax classes of ``model`` (``(B, 3, H, W) -> (B, C, H, W)``
    logits) on ``images`` ``(N, 3, H, W)``: a copy on the CPU in eval mode, as
    :func:`training.tracking.log_model` exports it; one image at a time, as the fresh
    process runs the exported program."""
    import torch

    model = copy.deepcopy(model).cpu().eval().to(memory_format=torch.contiguous_format)
    return _argmax(model, images)


def _argmax(model: Any, images: np.ndarray) -> np.ndarray:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    with torch.no_grad():
        masks = [model(x[i : i + 1]).argmax(dim=1)[0] for i in range(x.shape[0])]
    if not masks:
        return np.zeros((0, *x.shape[2:]), np.int64)
    return torch.stack(masks).numpy().astype(np.int64)


def pixel_agreement(expected: np.ndarray, actual: np.ndarray) -> float:
    """Share of pixels where the two ``(N, H, W)`` label maps agree, in [0, 1]."""
    if expected.shape != actual.shape or expected.size == 0:
        raise ValueError(
            f"masks: expected equal non-empty shapes, got {expected.shape} and {actual.shape}"
        )
    return float(np.mean(expected == actual))


def check_export(
    model_dir: str | os.PathLike[str],
    model: Any,
    images: np.ndarray,
    *,
    min_agreement: float = 0.999,
    timeout_s: float = 300.0,
    where: str = "exported model",
    python: str = sys.executable,
) -> DeployCheck:
    """Load the MLflow model folder ``model_dir`` in a fresh process and compare its
    predictions on ``images`` with ``model``'s.

    Args:
        model_dir: a downloaded model folder (``MLmodel``, ``data/model.pt2``).
        model: the in-memory model (the checkpoint's weights), ``(B, 3, H, W) -> logits``.
        images: ``(N, 3, H, W)`` float32 probe images in [0, 1], ``N >= 1``.
        min_agreement: the share of agreeing pixels a deployable export reaches.
        timeout_s: seconds the fresh process may take (start, imports, load, predict).
        where: what the model is, for messages (``model 'x' version 3``).
        python: the interpreter of the fresh process.
    """
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        return _failed(0, f"no probe images of shape (N, 3, H, W) (got {images.shape})")
    n = int(images.shape[0])
    with tempfile.TemporaryDirectory(prefix="deploy-") as tmp:
        folder = Path(tmp)
        np.save(folder / "images.npy", images, allow_pickle=False)
        command = [python, "-m", "training.risk.deploy", "--model", str(model_dir)]
        command += ["--images", str(folder / "images.npy"), "--out", str(folder)]
        command += ["--where", where]
        start = time.perf_counter()
        try:
            child = subprocess.Popen(
                command,
                cwd=ROOT,
                env=_child_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group: killed whole on timeout
            )
        except OSError as err:
            return _failed(n, f"could not start a fresh process ({python}): {err}")
        try:
            expected = predict_masks(model, images)  # while the child starts
            remaining = max(0.1, timeout_s - (time.perf_counter() - start))
            _, stderr = child.communicate(timeout=remaining)
        except subprocess.TimeoutExpired:
            _kill(child)
            seconds = time.perf_counter() - start
            return _failed(
                n,
                f"the fresh process did not finish within {timeout_s:g} s "
                "(registry.deploy_timeout_s); killed",
                child_seconds=seconds,
            )
        except BaseException:
            _kill(child)
            raise
        seconds = time.perf_counter() - start
        result = _read_json(folder / "result.json")
        if "error" in result:
            return _failed(
                n,
                f"the fresh process could not load or run the exported program: {result['error']}",
                child_seconds=seconds,
            )
        if child.returncode != 0:
            tail = _last_line(stderr)
            return _failed(
                n,
                f"the fresh process exited with status {child.returncode}"
                + (f": {tail}" if tail else ""),
                child_seconds=seconds,
            )
        load = result.get("load_seconds")
        load = float(load) if isinstance(load, int | float) else math.nan
        try:
            actual = np.load(folder / "masks.npy", allow_pickle=False)
        except (OSError, ValueError) as err:
            return _failed(n, f"the fresh process wrote no readable masks: {err}", load, seconds)
        if actual.shape != expected.shape:
            return _failed(
                n,
                f"the exported program's masks have shape {actual.shape}, the checkpoint's "
                f"{expected.shape}",
                load,
                seconds,
            )
    agreement = pixel_agreement(expected, actual)
    ok = agreement >= min_agreement
    reason = (
        "ok"
        if ok
        else f"pixel agreement {agreement:.6f} < {min_agreement:g} "
        "(registry.deploy_min_agreement): the exported program does not predict what the "
        "checkpoint predicts"
    )
    return DeployCheck(ok, agreement, load, seconds, n, reason)


def check_deployable(
    tracking_uri: str,
    name: str,
    version: str,
    model: Any,
    images: np.ndarray,
    *,
    min_agreement: float = 0.999,
    timeout_s: float = 300.0,
    python: str = sys.executable,
) -> DeployCheck:
    """:func:`check_export` on registered model ``name`` version ``version``, downloaded
    through ``tracking_uri`` (a download failure is a failed check too)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from training.tracking import redact_uri

    where = f"model '{name}' version {version}"
    with tempfile.TemporaryDirectory(prefix="deploy-model-") as tmp:
        try:
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            uri = client.get_model_version_download_uri(name, version)
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri
            )
        except Exception as err:  # the store is down, the version is gone...
            reason = f"{where}: could not download the artifacts: {type(err).__name__}: {err}"
            return _failed(int(len(images)), redact_uri(reason)[:2000])
        return check_export(
            local,
            model,
            images,
            min_agreement=min_agreement,
            timeout_s=timeout_s,
            where=where,
            python=python,
        )


# --------------------------------------------------------------------------- internals
def _failed(
    n: int, reason: str, load_seconds: float = math.nan, child_seconds: float = math.nan
) -> DeployCheck:
    from training.tracking import redact_uri

    return DeployCheck(False, math.nan, load_seconds, child_seconds, n, redact_uri(reason))


def _child_env() -> dict[str, str]:
    """This environment without MLflow settings or credentials (the fresh process reads
    nothing but the files it is given), with the project importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _kill(child: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    child.communicate()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _last_line(stderr: bytes | None) -> str:
    lines = [s for s in (stderr or b"").decode("utf-8", "replace").splitlines() if s.strip()]
    return lines[-1].strip()[:500] if lines else ""


# --------------------------------------------------------------------------- fresh process
def main(argv: Sequence[str] | None = None) -> int:
    """The fresh process: load ``--model`` with ``load_exported_model`` only, write the
    argmax masks of ``--images`` to ``<out>/masks.npy`` and ``<out>/result.json``
    (``load_seconds``, or ``error``). Exit status 0, or 2 with the error written."""
    parser = argparse.ArgumentParser(prog="python -m training.risk.deploy")
    parser.add_argument("--model", required=True, help="downloaded MLflow model folder")
    parser.add_argument("--images", required=True, help="(N, 3, H, W) float32 .npy")
    parser.add_argument("--out", required=True, help="folder for masks.npy and result.json")
    parser.add_argument("--where", default="exported model", help="name used in messages")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        from training.risk.registry import load_exported_model

        start = time.perf_counter()
        module = load_exported_model(args.model, args.where)
        load = time.perf_counter() - start
        images = np.load(args.images, allow_pickle=False)
        np.save(out / "masks.npy", _argmax(module, images), allow_pickle=False)
        (out / "result.json").write_text(json.dumps({"load_seconds": load}), encoding="utf-8")
    except Exception as err:
        message = f"{type(err).__name__}: {err}"
        (out / "result.json").write_text(json.dumps({"error": message}), encoding="utf-8")
        print(message, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
