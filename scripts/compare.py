"""Compare the runs of a sweep: mean ± std over seeds per configuration, a table and plots
saved to ``<paths.output>/compare/<sweep id>/`` and logged to MLflow; see configs/compare.yaml."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig

from core.config import ConfigError
from core.files import atomic_write_bytes, atomic_write_text
from core.paths import config_dir
from training import compare
from training.tracking import redact, tracking_uri

log = logging.getLogger(__name__)

CONFIG = config_dir() / "compare.yaml"
_SAFE = re.compile(r"[A-Za-z0-9_.:=+-]+")


def sweep_ids(value: Any) -> list[str]:
    """``sweep`` as a list of ids: null, one id (Hydra may read it as a number) or a list."""
    if value is None:
        return []
    items = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    ids = [str(v) for v in items if v is not None and str(v) != ""]
    for sid in ids:
        if not _SAFE.fullmatch(sid) or sid.startswith("."):
            raise ConfigError(f"sweep: {sid!r} is not a sweep id (a multirun folder name)")
    return ids


def output_label(ids: list[str], name: str | None) -> str:
    """The results folder under ``compare/``: the sweep id(s), or ``experiment-<name>``."""
    if name and not _SAFE.fullmatch(str(name)):
        raise ConfigError(f"experiment: {name!r} is not an experiment name")
    parts = ["+".join(ids)] if ids else []
    if name:
        parts.append(f"experiment-{name}")
    return "-".join(parts)


def job_hashes(sweep_dir: Path) -> dict[str, dict[str, str]]:
    """:func:`training.compare.sweep_job_hashes`, or nothing (with a warning) when the
    folder is missing or its configs no longer compose with this code version."""
    if not sweep_dir.is_dir():
        return {}
    try:
        return compare.sweep_job_hashes(sweep_dir)
    except Exception as exc:  # noqa: BLE001 - the tagged runs still make a comparison
        log.warning("cannot recompute the stage hashes of %s: %r", sweep_dir, exc)
        return {}


def run_compare(cfg: DictConfig) -> Path:
    """Fetch, aggregate, write, print and log; returns the results folder."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg.paths.output, cfg.tracking.uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(str(cfg.tracking.experiment))
    if exp is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise ConfigError(
            f"tracking.experiment: no MLflow experiment {cfg.tracking.experiment!r} at "
            f"{redact(uri)}; known: {known}"
        )
    ids = sweep_ids(cfg.sweep)
    name = str(cfg.experiment) if cfg.experiment else None
    label = output_label(ids, name)
    notes: list[str] = []
    if not ids:
        runs = compare.fetch_runs(client, exp.experiment_id, [], name)
    else:
        runs = []
        for sid in ids:
            jobs = job_hashes(Path(cfg.multirun_dir) / sid) if cfg.resolve_reused else {}
            # a sweep whose jobs all reused earlier runs has no run tagged with its id
            runs += compare.fetch_runs(client, exp.experiment_id, [sid], name, required=not jobs)
            if not cfg.resolve_reused:
                continue
            if not jobs:
                notes.append(
                    f"sweep {sid}: no job folders in {Path(cfg.multirun_dir) / sid}; "
                    "stages its jobs reused from earlier runs are missed"
                )
            found, missing = compare.fetch_by_hashes(client, exp.experiment_id, jobs)
            runs += found
            notes += [f"sweep {sid}: {m}" for m in missing]
    rows, left_out = compare.finished_rows(runs)
    notes += left_out
    if not rows:
        what = f"sweep {', '.join(ids)}" if ids else f"experiment {name}"
        raise ConfigError(f"sweep: no finished run in {what} ({'; '.join(left_out)})")
    report = compare.build_report(
        rows,
        title=f"Compare {label}",
        metric=str(cfg.metric),
        columns=list(cfg.columns),
        gap_metric=str(cfg.gap_metric),
        plot_keys=list(cfg.plot_keys),
        method_key=str(cfg.method_key),
        stage=str(cfg.stage) if cfg.stage else None,
        ignore=[*compare.BOOKKEEPING, *cfg.ignore],
        per_class=str(cfg.per_class) if cfg.get("per_class") else None,
    )
    report.notes[:0] = notes
    if notes:
        tail = "" if "\nNotes:\n" in report.markdown else "\nNotes:\n"
        report.markdown += tail + "".join(f"- {n}\n" for n in notes)
    out = Path(cfg.paths.output) / "compare" / label
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", report.markdown)
    atomic_write_text(out / "table.csv", report.csv)
    for file_name, png in report.plots.items():
        atomic_write_bytes(out / file_name, png)
    if cfg.get("results_csv"):
        copy = Path(str(cfg.results_csv))
        copy.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(copy, report.csv)
    for stale in [*out.glob("*_vs_*.png"), *out.glob("*_by_*.png")]:
        if stale.name not in report.plots:  # a plot this comparison skipped
            stale.unlink()
    for note in report.notes:
        log.info("note: %s", note)
    print(report.markdown)
    if cfg.log_to_mlflow:
        run_id = log_compare_run(client, exp.experiment_id, out, ids, name, label, cfg, report)
        print(f"saved to {out}; logged as MLflow run {run_id} in {redact(uri)}")
    else:
        print(f"saved to {out}")
    if cfg.get("results_csv"):
        print(f"CSV also written to {cfg.results_csv}")
    return out


def log_compare_run(
    client: Any,
    experiment_id: str,
    out: Path,
    ids: list[str],
    name: str | None,
    label: str,
    cfg: DictConfig,
    report: compare.Report,
) -> str:
    """A new run tagged ``stage=compare``, with the files of ``out`` as artifacts."""
    tags = {
        "stage": "compare",
        "experiment": "compare",
        "sweep_id": ",".join(ids),
        "compared_experiment": name or "",
    }
    run = client.create_run(experiment_id, run_name=f"compare/{label}", tags=tags)
    run_id = run.info.run_id
    try:
        keys = compare.table_keys(report.keys)
        params = {
            "sweep": ",".join(ids),
            "experiment": name or "",
            "stage": cfg.stage or "",
            "metric": cfg.metric,
            "configuration_keys": ",".join(keys),
            "runs": len({r for g in report.groups for r in g.run_ids}),
            "groups": len(report.groups),
        }
        for key, value in params.items():
            client.log_param(run_id, key, str(value)[:6000])
        client.log_artifacts(run_id, str(out))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def register_config() -> None:
    """configs/compare.yaml as a stored config named ``compare``.

    Composed from ``configs/`` it would meet the training config groups ``stage/`` and
    ``experiment/``, and Hydra would read ``stage=finetune`` as picking a group option; from
    the config store, with no config folder, ``stage`` and ``experiment`` are plain keys.
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="compare", node=OmegaConf.load(CONFIG))


register_config()


@hydra.main(version_base="1.3", config_path=None, config_name="compare")
def main(cfg: DictConfig) -> None:
    run_compare(cfg)


if __name__ == "__main__":
    main()
