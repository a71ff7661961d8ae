"""Check the champion on new real data and retrain when needed, or roll back; see
configs/monitor.yaml."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from core.config import ConfigError, instantiate_checked
from training.risk.registry import ModelRegistry
from training.risk.retrain import check_champion
from training.tracking import tracking_uri


@hydra.main(version_base="1.3", config_path="pkg://configs", config_name="monitor")
def main(cfg: DictConfig) -> None:
    uri = tracking_uri(cfg.paths.output, cfg.tracking.uri)
    if cfg.action == "rollback":
        version = ModelRegistry(uri, name=cfg.registry.name).rollback("scripts/monitor.py")
        print(f"champion of {cfg.registry.name} is now version {version}")
        return
    if cfg.action != "check":
        raise ConfigError(f"action: expected 'check' or 'rollback', got {cfg.action!r}")
    taxonomy = instantiate_checked(cfg.taxonomy)
    current = instantiate_checked(cfg.current, expected_taxonomy_hash=taxonomy.hash)
    reference = instantiate_checked(cfg.reference, expected_taxonomy_hash=taxonomy.hash)
    result = check_champion(
        uri,
        cfg.registry.name,
        cfg.tracking.experiment,
        current,
        reference,
        taxonomy.num_classes,
        dict(cfg.thresholds),
        list(cfg.retrain.overrides),
        str(cfg.paths.output),
        retrain=bool(cfg.retrain.enabled),
        dry_run=bool(cfg.retrain.dry_run),
        drift_samples=int(cfg.drift_samples),
        batch_size=int(cfg.batch_size),
    )
    decision = "retrain: " + "; ".join(result.reasons) if result.reasons else "keep the champion"
    print(f"accuracy {result.accuracy:.4f}, PSI {result.psi:.3f} -> {decision}")
    if result.returncode not in (None, 0):
        raise SystemExit(result.returncode)


if __name__ == "__main__":
    main()
