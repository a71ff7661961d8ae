"""Check the champion on new real data and retrain when needed, roll back, or A/B-test
the challenger on a share of the frames (action=ab); see configs/monitor.yaml."""

from __future__ import annotations

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
from training.risk.traffic import (
    apply_ab,
    check_arms,
    check_traffic,
    record_ab,
    report,
    run_ab,
    split_traffic,
    write_report,
)
from training.tracking import existing_store_uri

#: ``action=`` values: check (and retrain), rollback, ab (the A/B on traffic).
ACTIONS = ("check", "rollback", "ab")

# before anything imports mlflow (telemetry is decided on import); the user's values win
apply_env_defaults()
quiet_console()


def run_monitor(cfg: DictConfig) -> None:
    """The body of ``scripts/monitor.py``: a check (and retraining), a rollback, or an A/B
    on traffic."""
    if cfg.action not in ACTIONS:
        raise ConfigError(
            f"action: expected {', '.join(repr(a) for a in ACTIONS)}, got {cfg.action!r}"
        )
    if cfg.action == "ab":  # every traffic.* value checked before the store is opened
        traffic = cfg.traffic
        check_traffic(
            traffic.share,
            traffic.seed,
            traffic.confidence,
            traffic.margin,
            traffic.metric,
            traffic.apply,
        )
    output = Path(str(cfg.paths.output))
    uri = existing_store_uri(output, cfg.tracking.uri)
    name = resolve_model(uri, cfg.registry.name)
    if cfg.action == "rollback":
        version = ModelRegistry(uri, name=name).rollback("scripts/monitor.py")
        print(f"champion of {name} is now version {version}")
        return
    if cfg.action == "ab":
        run_traffic_ab(cfg, uri, name, output)
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


def run_traffic_ab(cfg: DictConfig, uri: str, name: str, output: Path) -> None:
    """``action=ab``: route ``traffic.share`` of ``current.root``'s frames to the
    challenger and the rest to the champion, report both arms and the recommendation
    (``training/risk/traffic.py``), record it, and act on it when ``traffic.apply``."""
    registry = ModelRegistry(uri, name=name)
    aliases = registry.aliases()
    if "challenger" not in aliases:
        raise RegistryError(
            f"action=ab: model {name!r} has no challenger to A/B-test (aliases: "
            f"{aliases or 'none'}); a retraining registers one (python scripts/monitor.py "
            "current.root=<new data>), as does any later training of the same model"
        )
    if not cfg.current.get("root"):
        raise ConfigError(
            "current.root: the labelled real frames to route between champion version "
            f"{aliases.get('champion')} and challenger version {aliases['challenger']} of "
            f"{name}, e.g. current.root=data/new_camera_batch"
        )
    traffic = cfg.traffic
    decided = _registry_settings(uri, name, traffic)
    taxonomy = instantiate_checked(cfg.taxonomy)
    current_node = dataset_node("current", _plain(cfg.current), None)
    current = instantiate_checked(current_node, expected_taxonomy_hash=taxonomy.hash)
    root = str(current_node["root"])
    if len(current) and "mask" not in current[0]:
        raise ConfigError(f"current.root: {root} has no labels; the A/B scores labelled frames")
    split = split_traffic(len(current), float(traffic.share), int(traffic.seed))
    check_arms(split, "traffic.share", "current.root")
    print(
        f"A/B on traffic: {name}, {split.n} frames of {root}, {split.share:.0%} "
        f"({split.challenger.size}) to challenger version {aliases['challenger']}, the rest "
        f"to champion version {aliases.get('champion')} (seed {split.seed}); per-frame "
        f"{decided['metric']}, margin {decided['margin']}"
    )
    result, scores = run_ab(
        registry,
        current,
        split,
        taxonomy.num_classes,
        decided["margin"],
        decided["confidence"],
        decided["metric"],
        int(cfg.batch_size),
    )
    level = f"{result.confidence:.0%} CI"
    for arm in (result.champion, result.challenger):
        label = "champion  " if arm is result.champion else "challenger"
        print(
            f"  {label} v{arm.version}: n {arm.n} (of {arm.routed} routed), mean "
            f"{arm.mean:.4f}, {level} [{arm.ci_low:.4f}, {arm.ci_high:.4f}]"
        )
    df = "" if result.df is None else f", Welch df {result.df:.1f}"
    print(
        f"  difference (challenger - champion) {result.diff:+.4f}, {level} "
        f"[{result.ci_low:+.4f}, {result.ci_high:+.4f}]{df}"
    )
    print(f"-> {result.reason()}")
    ids = getattr(current, "ids", None)
    content = report(result, split, scores, name, root, ids)
    content["applied"] = bool(traffic.apply)
    path = write_report(content, output / "monitor")
    record_ab(
        registry,
        result,
        {"ab.report": str(path), "ab.data": root, "ab.applied": str(content["applied"])},
    )
    print(f"recorded: {path} and the ab.* tags of version {result.challenger.version}")
    if traffic.apply:
        print(apply_ab(registry, result, "scripts/monitor.py action=ab"))
    elif result.recommendation != "keep_champion":
        print("not acted on (traffic.apply=false); traffic.apply=true acts on it")


def _registry_settings(uri: str, name: str, traffic: DictConfig) -> dict:
    """``traffic.{metric, margin, confidence}``; a null one is the champion run's own
    ``registry.<key>`` (the rule its registration compared with), checked like the rest."""
    decided = {key: traffic.get(key) for key in ("metric", "margin", "confidence")}
    missing = [key for key, value in decided.items() if value is None]
    if missing:
        keys = ", ".join(f"traffic.{k}" for k in missing)
        try:
            registry_cfg = champion_of(uri, name).config.get("registry") or {}
        except ConfigError:
            raise ConfigError(
                f"{keys}: null takes the registry settings of the champion's run config "
                f"(its config.yaml), which model {name!r} lacks; set {keys} explicitly "
                "(configs/train.yaml: registry.metric miou, margin 0.01, confidence 0.95)"
            ) from None
        for key in missing:
            if registry_cfg.get(key) is None:
                raise ConfigError(
                    f"traffic.{key}: null takes the champion run's registry.{key}, which its "
                    f"config does not set; set traffic.{key} explicitly"
                )
            decided[key] = registry_cfg[key]
        check_traffic(
            traffic.share, traffic.seed, decided["confidence"], decided["margin"], decided["metric"]
        )
    decided["margin"] = float(decided["margin"])
    decided["confidence"] = float(decided["confidence"])
    return decided


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
