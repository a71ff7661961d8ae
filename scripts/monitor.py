"""Check the champion on new real data and retrain when needed, or roll back; see
configs/monitor.yaml."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from core.config import ConfigError, instantiate_checked
from core.runtime import apply_env_defaults, quiet_console
from training.risk.registry import ModelRegistry, RegistryError
from training.risk.retrain import (
    champion_of,
    check_champion,
    dataset_node,
    resolve_model,
    retrain_overrides,
    write_retrain_config,
)
from training.tracking import tracking_uri

# before anything imports mlflow (telemetry is decided on import); the user's values win
apply_env_defaults()
quiet_console()


def run_monitor(cfg: DictConfig) -> None:
    """The body of ``scripts/monitor.py``: a check (and retraining) or a rollback."""
    if cfg.action not in ("check", "rollback"):
        raise ConfigError(f"action: expected 'check' or 'rollback', got {cfg.action!r}")
    output = Path(str(cfg.paths.output))
    store = output / "mlflow.db"
    if not (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or store.exists()):
        raise ConfigError(
            f"paths.output: no MLflow store at {store}: run the main job first (python "
            "scripts/pipeline.py), or pass the paths.output it wrote to"
        )
    uri = tracking_uri(output, cfg.tracking.uri, create=False)
    name = resolve_model(uri, cfg.registry.name)
    if cfg.action == "rollback":
        version = ModelRegistry(uri, name=name).rollback("scripts/monitor.py")
        print(f"champion of {name} is now version {version}")
        return
    champion = champion_of(uri, name)
    if not cfg.current.get("root"):
        test = champion.dataset("real_test") or {}
        raise ConfigError(
            "current.root: the new labelled real data to check the champion on, e.g. "
            f"current.root=data/new_camera_batch (champion: {name} version "
            f"{champion.version}, tested on {test.get('root', 'its real test split')})"
        )
    taxonomy = instantiate_checked(cfg.taxonomy)
    current_node = dataset_node("current", _plain(cfg.current), None)
    reference_node = dataset_node(
        "reference", _plain(cfg.reference), champion.dataset("real_train")
    )
    current = instantiate_checked(current_node, expected_taxonomy_hash=taxonomy.hash)
    reference = instantiate_checked(reference_node, expected_taxonomy_hash=taxonomy.hash)
    print(
        f"checking {name} version {champion.version} (stage {champion.stage}, run "
        f"{champion.run_id}) on {current_node['root']}; drift against {reference_node['root']}"
    )
    config_file = None
    overrides: list[str] = []
    if cfg.retrain.enabled:
        config_file = write_retrain_config(champion, current_node, output, output / "monitor")
        overrides = retrain_overrides(config_file, list(cfg.retrain.overrides))
    result = check_champion(
        uri,
        name,
        cfg.tracking.experiment,
        current,
        reference,
        taxonomy.num_classes,
        dict(cfg.thresholds),
        overrides,
        str(output),
        retrain=bool(cfg.retrain.enabled),
        dry_run=bool(cfg.retrain.dry_run),
        drift_samples=int(cfg.drift_samples),
        batch_size=int(cfg.batch_size),
        retrain_config=config_file,
    )
    decision = "retrain: " + "; ".join(result.reasons) if result.reasons else "keep the champion"
    print(f"accuracy {result.accuracy:.4f}, PSI {result.psi:.3f} -> {decision}")
    if result.retrain and cfg.retrain.dry_run:
        print(f"retraining not run (retrain.dry_run=true); its config: {config_file}")
    if result.returncode not in (None, 0):
        raise SystemExit(result.returncode)


def _plain(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


@hydra.main(version_base="1.3", config_path="pkg://configs", config_name="monitor")
def main(cfg: DictConfig) -> None:
    try:
        run_monitor(cfg)
    except (ConfigError, RegistryError) as err:  # a message, not a traceback
        print(f"monitor: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
