"""Watching the champion on new real data, and retraining when the register says so.

:func:`check_champion` evaluates the registry's champion on a new labelled real dataset
(T-01 accuracy) and measures drift against what it was trained on (T-02 PSI). When the
accuracy falls under its threshold or the PSI exceeds the retraining level, it launches
fine-tuning with the new data (``scripts/train.py`` with configured overrides) and
records why: on its own MLflow run and as the ``trigger`` tag of the training runs. The
new model is registered as the challenger and only replaces the champion if it wins.

What the check needs besides the new data follows from what training produced, never
from a second default (:func:`resolve_model`, :func:`champion_of`):

- the registered model: ``registry.name``, else the one model in the store (the one
  registered last when there are several, the others named in the log);
- the champion's training config: its run's ``config.yaml`` (the resolved config every
  stage run logs), found through the model version's run;
- the drift reference: that config's ``data.datasets.real_train`` (the real images the
  champion was fine-tuned on);
- the retraining: that same config (:func:`write_retrain_config`), cut to the registered
  stage and the stages it starts from, with the new data as its real training split, run
  by ``scripts/train.py --config-dir <folder> --config-name <file>``: the 64x128 champion
  of the main job is retrained at 64x128 with its own method and recipe, and its sim
  pretraining is reused from the stage cache.
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
#: The resolved config every stage run logs (``training.stages.segmenter``).
RUN_CONFIG = "config.yaml"
#: Where a dataset node of the run's config names its folder.
DATA_KEY = "data.datasets.{role}"


@dataclass(frozen=True)
class Champion:
    """The champion version of a registered model and the training config behind it."""

    model: str
    version: str
    run_id: str
    stage: str
    config: dict[str, Any]

    def dataset(self, role: str) -> dict[str, Any] | None:
        """The champion's ``data.datasets.<role>`` node (``real_train``...), or None."""
        node = ((self.config.get("data") or {}).get("datasets") or {}).get(role)
        return dict(node) if isinstance(node, Mapping) else None


def resolve_model(tracking_uri: str, name: str | None, key: str = "registry.name") -> str:
    """The registered model to watch: ``name`` if the store has it, else (``name`` None)
    the only one, or the one registered last. A name the store lacks, or an empty
    registry, is a :class:`~core.config.ConfigError` naming ``key`` and what exists."""
    from mlflow.tracking import MlflowClient

    from core.config import ConfigError
    from training.tracking import redact_uri

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    names = sorted(m.name for m in client.search_registered_models())
    where = redact_uri(tracking_uri)
    if name:
        if name in names:
            return str(name)
        raise ConfigError(
            f"{key}: no registered model {name!r} in {where}; registered models there: "
            f"{', '.join(names) or 'none'}"
            + ("" if names else " (train one first: python scripts/pipeline.py)")
        )
    if not names:
        raise ConfigError(
            f"{key}: the tracking store {where} has no registered model: train one first "
            "(python scripts/pipeline.py), or point paths.output (or tracking.uri) at the "
            "store that has it"
        )
    if len(names) == 1:
        return names[0]
    newest = client.search_model_versions(order_by=["creation_timestamp DESC"], max_results=1)
    chosen = str(newest[0].name) if newest else names[-1]
    log.info(
        "%s: %s, the model registered last (also in the store: %s; pass %s=<name>)",
        key,
        chosen,
        ", ".join(n for n in names if n != chosen),
        key,
    )
    return chosen


def champion_of(tracking_uri: str, model: str) -> Champion:
    """The champion version of ``model``, its source run and that run's resolved config."""
    import tempfile

    import yaml
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from core.config import ConfigError
    from training.risk.registry import CHAMPION, ModelRegistry

    registry = ModelRegistry(tracking_uri, name=model)
    aliases = registry.aliases()
    if CHAMPION not in aliases:
        raise ConfigError(
            f"registry.name: model {model!r} has no '{CHAMPION}' alias (aliases: "
            f"{aliases or 'none'})"
        )
    version = registry.client.get_model_version(model, aliases[CHAMPION])
    run_id = str(version.run_id)
    client = MlflowClient(tracking_uri)
    try:
        with tempfile.TemporaryDirectory(prefix="champion-") as tmp:
            local = client.download_artifacts(run_id, RUN_CONFIG, tmp)
            config = yaml.safe_load(Path(local).read_text(encoding="utf-8")) or {}
    except (MlflowException, OSError) as err:
        raise ConfigError(
            f"registry.name: the run {run_id} of model {model!r} version {version.version} "
            f"has no {RUN_CONFIG} to retrain or measure drift from ({err}); pass "
            "reference.root=<its training data> and retrain.enabled=false"
        ) from None
    stage = str(version.tags.get("stage") or (config.get("registry") or {}).get("stages", [""])[0])
    return Champion(model, str(version.version), run_id, stage, config)


def dataset_node(
    key: str, node: Mapping[str, Any], champion_node: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The dataset node for ``key`` (``current`` / ``reference``): the monitor's own when
    its ``root`` is set, else the champion's; a folder that is not a dataset is a
    :class:`~core.config.ConfigError` naming ``<key>.root`` and the datasets beside it."""
    from core.config import ConfigError

    chosen = dict(node)
    if not chosen.get("root"):
        if champion_node is None:
            raise ConfigError(f"{key}.root: not set, and the champion's run names no such data")
        chosen = dict(champion_node)
    root = Path(str(chosen["root"]))
    if not (root / "card.json").is_file() and not _is_real_layout(root):
        beside = (
            sorted(p.name for p in root.parent.iterdir() if (p / "card.json").is_file())
            if root.parent.is_dir()
            else []
        )
        raise ConfigError(
            f"{key}.root: {root} is not a dataset folder (no card.json"
            + ("" if root.exists() else "; the folder does not exist")
            + f"); datasets in {root.parent}: {', '.join(beside) or 'none'}"
        )
    return chosen


def _is_real_layout(root: Path) -> bool:
    """A folder a real-data reader reads (Cityscapes, CamVid): no card, but not empty."""
    return root.is_dir() and any(root.iterdir()) and not (root / "shards").exists()


def stages_to_retrain(stages: Mapping[str, Any], stage: str) -> list[str]:
    """``stage`` and the stages it starts from (``init``), in the config's order."""
    keep, name = set(), stage
    while name and name in stages and name not in keep:
        keep.add(name)
        name = (stages[name] or {}).get("init")
    return [s for s in stages if s in keep]


def write_retrain_config(
    champion: Champion, current: Mapping[str, Any], output: str | Path, folder: Path
) -> Path:
    """The champion's training config as a ``scripts/train.py`` primary config: only its
    registered stage and the stages it starts from, ``current`` as the real training split
    (``data.datasets.real_train``), Hydra's run folder under ``output``. Returns the file
    (``<folder>/retrain-<model>-v<version>.yaml``)."""
    import copy

    from omegaconf import OmegaConf

    config = copy.deepcopy(champion.config)
    stages = dict(config.get("stages") or {})
    keep = stages_to_retrain(stages, champion.stage) or list(stages)
    config["stages"] = {name: stages[name] for name in keep}
    for component in (config.get("adaptation") or {}).values():
        if isinstance(component, dict) and isinstance(component.get("stages"), list):
            component["stages"] = [s for s in component["stages"] if s in keep]
    config.setdefault("data", {}).setdefault("datasets", {})["real_train"] = dict(current)
    config["hydra"] = {
        "job": {"chdir": False},
        "run": {"dir": f"{output}/hydra/retrain-${{now:%Y-%m-%d_%H-%M-%S}}"},
        "callbacks": {"tracking_checks": {"_target_": "training.tracking_server.TrackingChecks"}},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"retrain-{champion.model}-v{champion.version}.yaml"
    head = (
        f"# The training config of {champion.model} version {champion.version} (run "
        f"{champion.run_id}), written by scripts/monitor.py:\n# stages {keep}, new real "
        "training data. Rerun: python scripts/train.py --config-dir "
        f"{folder} --config-name {path.stem}\n"
    )
    path.write_text(head + OmegaConf.to_yaml(OmegaConf.create(config)), encoding="utf-8")
    return path


def retrain_overrides(config_file: Path, extra: Sequence[str]) -> list[str]:
    """``scripts/train.py`` arguments that train from ``config_file``, then ``extra``."""
    return [
        f"--config-dir={config_file.parent.resolve()}",
        f"--config-name={config_file.stem}",
        *extra,
    ]


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
    retrain_config: Path | None = None,
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
        retrain_config: the retraining's config file (:func:`write_retrain_config`),
            logged with the check's run.

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
        if retrain_config is not None:
            client.log_artifact(result.run_id, str(retrain_config), "monitor")
        if not dry_run:
            log.warning("retraining: %s", "; ".join(reasons))
            result.returncode = subprocess.run(result.command, check=False).returncode
            client.set_tag(result.run_id, "retrain_returncode", str(result.returncode))
    client.log_dict(result.run_id, result.to_dict(), "monitor/check.json")
    client.set_terminated(
        result.run_id, "FAILED" if result.returncode not in (None, 0) else "FINISHED"
    )
    log.debug("champion check: %s", json.dumps(result.to_dict()))
    return result
