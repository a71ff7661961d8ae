"""Watching the champion on new real data, and retraining when the register says so.

:func:`check_champion` evaluates the registry's champion on a new labelled real dataset
(T-01 accuracy) and measures drift against what it was trained on (T-02 PSI). When the
accuracy falls under its threshold or the PSI exceeds the retraining level, it launches
fine-tuning with the new data (``scripts/train.py`` with configured overrides) and
records why: on its own MLflow run and as the ``trigger`` tag of the training runs. The
new model is registered as the challenger and only replaces the champion if it wins.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@dataclass
class CheckResult:
    """What a check found and decided."""

    accuracy: float
    psi: float
    reasons: list[str] = field(default_factory=list)
    retrain: bool = False
    command: list[str] = field(default_factory=list)
    returncode: int | None = None
    run_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(accuracy: float, psi: float, accuracy_min: float, psi_max: float) -> list[str]:
    """Reasons to retrain (empty: keep the champion). Pure, for the thresholds' tests."""
    reasons = []
    if np.isfinite(accuracy) and accuracy < accuracy_min:
        reasons.append(f"T-01 accuracy {accuracy:.4f} < {accuracy_min}")
    if np.isfinite(psi) and psi > psi_max:
        reasons.append(f"T-02 PSI {psi:.4f} > {psi_max}")
    return reasons


def retrain_command(
    overrides: Sequence[str],
    reasons: Sequence[str],
    output: str,
    tracking_uri: str | None = None,
    registry_name: str | None = None,
) -> list[str]:
    """The ``scripts/train.py`` command that fine-tunes on the new data, tagged with why,
    writing to the same tracking store and registered model as the champion it watches."""
    why = "; ".join(reasons).replace("'", "")
    cmd = [
        sys.executable,
        str(SCRIPTS / "train.py"),
        *overrides,
        f"paths.output={output}",
        f"tracking.trigger='{why}'",
    ]
    from training.tracking import uri_has_userinfo

    # a URI with credentials came from MLFLOW_TRACKING_URI (a config value with them is
    # refused): the child inherits the environment, and the secret stays off the command
    # line, the child's .hydra files and the retrain_command tag
    if tracking_uri and not uri_has_userinfo(tracking_uri):
        cmd.append(f"tracking.uri='{tracking_uri}'")
    if registry_name:
        cmd.append(f"registry.name={registry_name}")
    return cmd


def check_champion(
    tracking_uri: str,
    registry_name: str,
    experiment: str,
    current: Any,
    reference: Any,
    num_classes: int,
    thresholds: Mapping[str, float],
    retrain_overrides: Sequence[str],
    output_dir: str,
    retrain: bool = True,
    dry_run: bool = False,
    drift_samples: int = 128,
    batch_size: int = 16,
) -> CheckResult:
    """Evaluate the champion on ``current``; retrain when a threshold is crossed.

    Args:
        tracking_uri: the MLflow store holding the registry.
        registry_name: registered model name.
        experiment: MLflow experiment of the monitor run.
        current: new labelled real data (Sample dicts); reference: the training data.
        num_classes: taxonomy size.
        thresholds: ``{"accuracy": 0.85, "psi": 0.25}``.
        retrain_overrides: ``scripts/train.py`` overrides for the retraining.
        output_dir: ``paths.output`` of the retraining run.
        retrain: launch training when needed (else only record the decision).
        dry_run: record the command without running it.

    Raises:
        training.risk.registry.UnsafeModelError: the champion's artifacts are not a plain
            exported program (a pickle, no ``data/model.pt2``, code in the archive); raised
            by :meth:`ModelRegistry.load` before anything is deserialized or logged.
    """
    from mlflow.tracking import MlflowClient
    from torch.utils.data import DataLoader

    from training.risk.drift import drift_report, image_statistics
    from training.risk.monitor import _sample_images
    from training.risk.registry import ModelRegistry, per_image_scores

    registry = ModelRegistry(tracking_uri, name=registry_name)
    model = registry.load("champion")
    loader = DataLoader(current, batch_size=batch_size)
    accuracy = float(np.nanmean(per_image_scores(model, loader, num_classes, "pixel_acc")))
    ref_img, _ = _sample_images(reference, drift_samples, 0)
    cur_img, _ = _sample_images(current, drift_samples, 1)
    ref_f, names = image_statistics(ref_img)
    cur_f, _ = image_statistics(cur_img)
    psi = float(drift_report(ref_f, cur_f, names).metrics()["risk/T-02/psi"])
    reasons = decide(accuracy, psi, float(thresholds["accuracy"]), float(thresholds["psi"]))
    result = CheckResult(accuracy, psi, reasons, retrain=bool(reasons) and retrain)

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(
        exp_id,
        run_name="monitor/champion-check",
        tags={"stage": "monitor", "registry_name": registry_name},
    )
    result.run_id = run.info.run_id
    client.log_metric(result.run_id, "risk/T-01/accuracy", accuracy)
    client.log_metric(result.run_id, "risk/T-02/psi", psi)
    client.set_tag(result.run_id, "champion_version", registry.aliases().get("champion", ""))
    client.set_tag(result.run_id, "current_data", str(getattr(current, "root", "")))
    client.set_tag(result.run_id, "decision", "retrain" if reasons else "keep")
    client.set_tag(result.run_id, "trigger", "; ".join(reasons) or "none")
    if result.retrain:
        result.command = retrain_command(
            retrain_overrides, reasons, output_dir, tracking_uri, registry_name
        )
        client.set_tag(result.run_id, "retrain_command", shlex.join(result.command)[:5000])
        if not dry_run:
            log.warning("retraining: %s", "; ".join(reasons))
            result.returncode = subprocess.run(result.command, check=False).returncode
            client.set_tag(result.run_id, "retrain_returncode", str(result.returncode))
    client.log_dict(result.run_id, result.to_dict(), "monitor/check.json")
    client.set_terminated(
        result.run_id, "FAILED" if result.returncode not in (None, 0) else "FINISHED"
    )
    log.info("champion check: %s", json.dumps(result.to_dict()))
    return result
