"""Compare the runs of a sweep: mean ± std over seeds per configuration, a table and plots.

The body of ``scripts/compare.py``. Training logs one MLflow run per stage, tagged ``stage``,
``experiment`` (the training experiment's name), ``sweep_id`` and ``config_hash``, with the
flattened resolved config as parameters (``training.tracking.flatten``). Here

* :func:`fetch_runs` / :func:`sweep_job_hashes` find the runs of one or more sweeps (or of
  an experiment name), including stages a sweep job reused from an earlier run;
* :func:`finished_rows` turns them into :class:`RunRow` s (stage, seed, params, metrics);
* :func:`varying_keys` finds the parameters that vary across the sweep: they define a
  *configuration* (seed and bookkeeping keys such as paths never do);
* :func:`aggregate` averages each metric over the seeds of one (stage, configuration),
  counting each (stage, configuration, seed) once;
* :func:`markdown_table`, :func:`csv_table`, :func:`plot_against`, :func:`plot_by` render.

Units: metrics are used as logged. mIoU, pixel accuracy, F1, precision and recall are
fractions in [0, 1] (the sim - real gap in [-1, 1]); the Markdown table and the plots show
these *fraction metrics* in percent, the CSV keeps the logged fractions. Other metrics
(latencies in ms, ...) are shown as logged. Std is the sample standard deviation over seeds
(ddof = 1; undefined for one seed); n is the number of seeds that have the metric.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import logging
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import ConfigError

log = logging.getLogger(__name__)

#: Parameters that never define a configuration: the seed (averaged over), what is derived
#: from it, where things are written, how runs are named and tracked, and settings that do
#: not change a stage's result (risk monitors, registry, logging, worker counts). ``stage.*``
#: is the data module's description of the stage, derived from ``stages.<name>.*``.
BOOKKEEPING = (
    "seed",
    "name",
    "progress",
    "log_model",
    "retries",
    "paths.*",
    "tracking.*",
    "hydra.*",
    "stage.*",
    "registry.*",
    "risk.*",
    "data.augment.seed",
    "data.loader.num_workers",
    "*.root",
)

#: Keys kept as columns even when another key varies the same way (an alias).
PREFERRED = (
    "adaptation.method",
    "stages.finetune.sim_ratio",
    "stages.finetune.real_fraction",
    "data.generate.randomization",
)

#: Table columns by default (all fractions).
DEFAULT_COLUMNS = ("test/real/miou", "test/sim/miou", "test/gap/miou", "test/real/pixel_acc")

LABELS = {
    "test/real/miou": "real mIoU",
    "test/sim/miou": "sim mIoU",
    "test/gap/miou": "gap mIoU (sim - real)",
    "test/real/pixel_acc": "real pixel acc",
}

#: Stages that are not training results (risk monitoring, this script's own runs).
NOT_RESULTS = ("monitor", "compare", "pipeline", "study", "cyclegan")

_FRACTION_LEAVES = {
    "miou",
    "pixel_acc",
    "macro_f1",
    "macro_precision",
    "macro_recall",
    "accuracy",
    "f1",
    "precision",
    "recall",
    "iou",
}
_MISSING = "—"


# ------------------------------------------------------------------------------ rows
@dataclass(frozen=True)
class RunRow:
    """One finished stage run: its parameters (JSON-ish text, as logged) and metrics."""

    run_id: str
    stage: str
    seed: str | None
    params: Mapping[str, str]
    metrics: Mapping[str, float]
    sweep_id: str = ""
    config_hash: str = ""
    end_time: int = 0  # ms since the epoch; the latest run wins among duplicates


def row_from_run(run: Any) -> RunRow:
    """An MLflow ``Run`` as a :class:`RunRow`."""
    tags, params = run.data.tags, dict(run.data.params)
    return RunRow(
        run_id=run.info.run_id,
        stage=tags.get("stage", ""),
        seed=params.get("seed"),
        params=params,
        metrics=dict(run.data.metrics),
        sweep_id=tags.get("sweep_id", ""),
        config_hash=tags.get("config_hash", ""),
        end_time=int(run.info.end_time or 0),
    )


def finished_rows(
    runs: Iterable[Any], exclude_stages: Sequence[str] = NOT_RESULTS
) -> tuple[list[RunRow], list[str]]:
    """The FINISHED runs as rows (each run id once), and notes on the runs left out."""
    rows: dict[str, RunRow] = {}
    left_out: Counter[str] = Counter()
    for run in runs:
        stage = run.data.tags.get("stage", "")
        if stage in exclude_stages or run.info.run_id in rows:
            continue
        if run.info.status != "FINISHED":
            left_out[f"{stage or '?'} {run.info.status}"] += 1
            continue
        rows[run.info.run_id] = row_from_run(run)
    notes = [f"left out {n} run(s): {what}" for what, n in sorted(left_out.items())]
    return list(rows.values()), notes


# --------------------------------------------------------------------------- MLflow
def search_all(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    """Every run of ``experiment_id`` matching ``filter_string`` (all result pages)."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def known_tag_values(client: Any, experiment_id: str, tag: str) -> list[str]:
    """The non-empty values of ``tag`` over the training runs of the experiment, sorted."""
    values = set()
    for run in search_all(client, experiment_id, ""):
        if run.data.tags.get("stage") not in NOT_RESULTS and run.data.tags.get(tag):
            values.add(run.data.tags[tag])
    return sorted(values)


def fetch_runs(
    client: Any,
    experiment_id: str,
    sweep_ids: Sequence[str] = (),
    name: str | None = None,
    required: bool = True,
) -> list[Any]:
    """The runs tagged with any of ``sweep_ids`` (and, if given, experiment ``name``); with
    no sweep id, every run tagged experiment ``name``. Monitor and compare runs excluded.

    Raises :class:`ConfigError` naming ``sweep`` (with the known sweep ids) or
    ``experiment`` (with the known experiment names) when nothing matches, unless not
    ``required`` (a sweep whose jobs all reused earlier runs has no run of its own).
    """
    if not sweep_ids and not name:
        known = known_tag_values(client, experiment_id, "sweep_id")
        raise ConfigError(
            "sweep: give a sweep id (sweep=<id>, several: 'sweep=[a,b]') or experiment=<name>; "
            f"known sweep ids: {', '.join(known) or 'none'}"
        )
    runs: list[Any] = []
    name_filter = f" and tags.experiment = {_quote(name)}" if name else ""
    for sweep_id in sweep_ids or [None]:
        sweep_filter = f"tags.sweep_id = {_quote(sweep_id)}" if sweep_id else ""
        text = (sweep_filter + name_filter).removeprefix(" and ")
        found = [
            r
            for r in search_all(client, experiment_id, text)
            if r.data.tags.get("stage") not in NOT_RESULTS
        ]
        if sweep_id:  # stages the sweep's jobs reused from earlier runs (training.pipeline)
            reused = f"tags.`sweep/{sweep_id}` = 'reused'" + name_filter
            found += search_all(client, experiment_id, reused)
        if found or not required:
            runs.extend(found)
        elif sweep_id:
            known = known_tag_values(client, experiment_id, "sweep_id")
            what = f" with experiment={name!r}" if name else ""
            raise ConfigError(
                f"sweep: no run is tagged sweep_id={sweep_id!r}{what}; known sweep ids: "
                f"{', '.join(known) or 'none'}"
            )
        else:
            known = known_tag_values(client, experiment_id, "experiment")
            raise ConfigError(
                f"experiment: no run is tagged experiment={name!r}; known experiment names: "
                f"{', '.join(known) or 'none'}"
            )
    return runs


def sweep_job_hashes(sweep_dir: str | Path) -> dict[str, dict[str, str]]:
    """``{job: {stage: config_hash}}`` of a Hydra multirun folder, from each job's saved
    ``.hydra/config.yaml`` and the run's own plan (:func:`training.stages.check_config`),
    so stages adapted by a pixel-level component (CycleGAN) are found too.

    A stage whose hash matched an earlier finished run was not trained again: the job reused
    that run, which carries the earlier run's ``sweep_id`` tag (often none), so the tag alone
    misses it. Hashes computed by another code version may not match: callers treat a hash
    with no run as a note, never as an error.
    """
    from omegaconf import OmegaConf

    from training.stages import check_config

    jobs: dict[str, dict[str, str]] = {}
    for config_file in sorted(Path(sweep_dir).glob("*/.hydra/config.yaml")):
        cfg = OmegaConf.load(config_file)
        if not cfg.get("stages"):
            continue
        hashes = dict(check_config(cfg).digests)
        jobs[config_file.parent.parent.name] = hashes
    return jobs


def fetch_by_hashes(
    client: Any, experiment_id: str, jobs: Mapping[str, Mapping[str, str]]
) -> tuple[list[Any], list[str]]:
    """The finished runs of each job's stages by ``config_hash`` tag, and notes on stages
    with none (a job that failed, or a hash from another code version)."""
    runs, notes = [], []
    cache: dict[tuple[str, str], list[Any]] = {}
    for job, hashes in sorted(jobs.items(), key=lambda kv: _sort_key(kv[0])):
        for stage, digest in hashes.items():
            if (stage, digest) not in cache:
                text = (
                    f"tags.config_hash = {_quote(digest)} and tags.stage = {_quote(stage)}"
                    " and attributes.status = 'FINISHED'"
                )
                cache[stage, digest] = search_all(client, experiment_id, text)
            found = cache[stage, digest]
            if not found:
                notes.append(f"job {job}: no finished {stage} run with config hash {digest}")
            runs.extend(found)
    return runs, notes


# ----------------------------------------------------------------------- configuration
def parse_value(text: str | None) -> Any:
    """A logged parameter (JSON-ish text) as a value: ``"0.9"`` -> 0.9, ``"none"`` -> ``"none"``."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def ancestors(params: Mapping[str, str], stage: str) -> set[str]:
    """``stage`` and the stages it starts from (``stages.<name>.init``, transitively)."""
    out, current = set(), stage
    while current and current not in out:
        out.add(current)
        init = parse_value(params.get(f"stages.{current}.init"))
        current = init if isinstance(init, str) and f"stages.{init}.init" in params else None
    return out


def is_ignored(key: str, ignore: Sequence[str] = BOOKKEEPING) -> bool:
    """Whether ``key`` matches one of the ``ignore`` patterns (fnmatch: ``paths.*``)."""
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in ignore)


def is_relevant(key: str, stage: str, params: Mapping[str, str]) -> bool:
    """Whether ``key`` can change the result of ``stage``: another stage's settings
    (``stages.<other>.*``) cannot, unless the stage starts from that one."""
    if not key.startswith("stages."):
        return True
    other = key.split(".")[1]
    return other in ancestors(params, stage)


def _partition(values: Sequence[Any]) -> tuple[int, ...]:
    first: dict[Any, int] = {}
    return tuple(first.setdefault(v, len(first)) for v in values)


def varying_keys(
    rows: Sequence[RunRow], ignore: Sequence[str] = BOOKKEEPING, prefer: Sequence[str] = PREFERRED
) -> dict[str, dict[str, list[str]]]:
    """Per stage, the parameters that vary across its rows and can change its result.

    Returns ``{stage: {key: [aliases]}}``: keys that split the rows the same way (such as
    ``adaptation.method`` and ``adaptation.weight``, absent without DANN) are one column,
    named by the key in ``prefer``, else the one every row has, else the shortest; the others
    are its aliases. A parameter missing from a row counts as a value of its own.
    """
    by_stage: dict[str, list[RunRow]] = defaultdict(list)
    for row in rows:
        by_stage[row.stage].append(row)
    out: dict[str, dict[str, list[str]]] = {}
    for stage, stage_rows in by_stage.items():
        candidates = sorted({k for r in stage_rows for k in r.params})
        groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
        for key in candidates:
            if is_ignored(key, ignore):
                continue
            if not any(is_relevant(key, stage, r.params) for r in stage_rows):
                continue
            values = [r.params.get(key) for r in stage_rows]
            if len(set(values)) > 1:
                groups[_partition(values)].append(key)
        chosen: dict[str, list[str]] = {}
        for keys in groups.values():

            def rank(key: str, stage_rows: list[RunRow] = stage_rows) -> tuple[Any, ...]:
                missing = any(key not in r.params for r in stage_rows)
                container = any(
                    isinstance(parse_value(r.params.get(key)), list | dict) for r in stage_rows
                )
                return (key not in prefer, missing, container, key.count("."), len(key), key)

            ranked = sorted(keys, key=rank)
            heads = [k for k in ranked if k in prefer] or ranked[:1]
            for head in heads:
                chosen[head] = [k for k in ranked if k not in heads] if head == heads[0] else []
        out[stage] = {k: chosen[k] for k in sorted(chosen, key=_key_order(prefer))}
    return out


def _key_order(prefer: Sequence[str]) -> Any:
    return lambda key: (prefer.index(key) if key in prefer else len(prefer), key)


# ------------------------------------------------------------------------ aggregation
@dataclass(frozen=True)
class Stat:
    """Mean and sample std (ddof = 1; NaN for n < 2) of one metric over ``n`` seeds, in the
    metric's logged unit."""

    mean: float
    std: float
    n: int


@dataclass
class Group:
    """One (stage, configuration): its seeds, runs and per-metric statistics."""

    stage: str
    config: tuple[tuple[str, str | None], ...]
    seeds: list[str] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    stats: dict[str, Stat] = field(default_factory=dict)

    def value(self, key: str) -> str | None:
        return dict(self.config).get(key)


def summarize(values: Iterable[float]) -> Stat:
    """Mean and sample standard deviation (ddof = 1) of the finite ``values``."""
    finite = [float(v) for v in values if math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return Stat(math.nan, math.nan, 0)
    mean = math.fsum(finite) / n
    std = statistics.stdev(finite) if n > 1 else math.nan
    return Stat(mean, std, n)


def _sort_key(value: Any) -> tuple[Any, ...]:
    """Numbers by value, then text, then missing: mixed values sort without errors."""
    if isinstance(value, str):
        value = parse_value(value)
    if value is None:
        return (2, "")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value))
    return (1, json.dumps(value, sort_keys=True) if not isinstance(value, str) else value)


def dedupe_seeds(
    rows: Sequence[RunRow], keys: Mapping[str, Iterable[str]]
) -> tuple[list[RunRow], list[str]]:
    """One row per (stage, configuration, seed): the latest-ending one. Two runs of one
    configuration and seed differ only in bookkeeping (a rerun, another output folder), and
    counting both would pass one seed off as two."""
    latest: dict[tuple[Any, ...], RunRow] = {}
    notes = []
    for row in sorted(rows, key=lambda r: (r.end_time, r.run_id)):
        ident = (row.stage, _config(row, keys.get(row.stage, ())), row.seed)
        if ident in latest:
            notes.append(
                f"{row.stage} seed {row.seed}: run {row.run_id} repeats "
                f"{latest[ident].run_id} (same configuration), counted once"
            )
        latest[ident] = row
    kept = {r.run_id for r in latest.values()}
    return [r for r in rows if r.run_id in kept], notes


def _config(row: RunRow, keys: Iterable[str]) -> tuple[tuple[str, str | None], ...]:
    return tuple((k, row.params.get(k)) for k in keys)


def aggregate(
    rows: Sequence[RunRow], keys: Mapping[str, Iterable[str]], metrics: Sequence[str]
) -> list[Group]:
    """Mean ± std over seeds of each metric, per (stage, configuration of ``keys[stage]``).

    Rows should be deduplicated first (:func:`dedupe_seeds`). Groups come in stage order
    (the order stages first appear in ``rows``), then by configuration values.
    """
    order: dict[str, int] = {}
    members: dict[tuple[Any, ...], list[RunRow]] = defaultdict(list)
    for row in rows:
        order.setdefault(row.stage, len(order))
        members[row.stage, _config(row, keys.get(row.stage, ()))].append(row)
    groups = []
    for (stage, config), group_rows in members.items():
        group_rows = sorted(group_rows, key=lambda r: _sort_key(r.seed))
        stats = {m: summarize(r.metrics[m] for r in group_rows if m in r.metrics) for m in metrics}
        groups.append(
            Group(
                stage,
                config,
                [str(r.seed) for r in group_rows],
                [r.run_id for r in group_rows],
                stats,
            )
        )
    groups.sort(key=lambda g: (order[g.stage], [_sort_key(v) for _, v in g.config]))
    return groups


def available_metrics(rows: Iterable[RunRow]) -> list[str]:
    return sorted({m for r in rows for m in r.metrics})


def check_metrics(rows: Sequence[RunRow], metrics: Sequence[str], key: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` if no row has one of ``metrics``; the
    message suggests a near name and lists the test summary metrics that exist
    (``test/<domain>/<name>``)."""
    import difflib

    have = available_metrics(rows)
    for metric in metrics:
        if metric in have:
            continue
        near = [m for m in have if m.lower() == metric.lower()]
        near = near or difflib.get_close_matches(metric, have, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        summary = [m for m in have if m.startswith("test/") and m.count("/") == 2]
        raise ConfigError(
            f"{key}: no run has the metric {metric!r}{hint}; available: {', '.join(summary)} "
            f"and {len(have) - len(summary)} more (val/, train/, risk/, per class and group)"
        )


# -------------------------------------------------------------------------- rendering
def is_fraction(metric: str) -> bool:
    """Whether ``metric`` is a fraction in [0, 1] (or a gap of two), shown in percent."""
    parts = metric.split("/")
    return parts[-1] in _FRACTION_LEAVES or (len(parts) > 1 and parts[-2] in _FRACTION_LEAVES)


def metric_label(metric: str) -> str:
    """A column/axis label with its unit: ``real mIoU (%)``."""
    return f"{LABELS.get(metric, metric)}{' (%)' if is_fraction(metric) else ''}"


def format_stat(stat: Stat, metric: str) -> str:
    """``mean ± std (n)``; fractions in percent with one decimal; ``–`` for std of one seed."""
    if stat.n == 0:
        return "n/a"
    scale = 100.0 if is_fraction(metric) else 1.0

    def fmt(x: float) -> str:
        return f"{scale * x:.1f}" if is_fraction(metric) else f"{x:.4g}"

    std = fmt(stat.std) if math.isfinite(stat.std) else "–"
    return f"{fmt(stat.mean)} ± {std} ({stat.n})"


def table_keys(keys: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The configuration columns: the union of the stages' varying keys, in first-seen order."""
    out: list[str] = []
    for stage_keys in keys.values():
        out.extend(k for k in stage_keys if k not in out)
    return out


def _cell(text: str | None) -> str:
    return _MISSING if text is None else str(text).replace("|", "\\|")


def markdown_table(groups: Sequence[Group], metrics: Sequence[str], keys: Sequence[str]) -> str:
    """One line per (stage, configuration): the varying keys, the seeds, and each metric as
    ``mean ± std (n)`` (fractions in %, one decimal). A key that does not vary for a stage
    is left blank in its lines."""
    header = ["stage", *keys, "seeds", *(metric_label(m) for m in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for g in groups:
        config = dict(g.config)
        cells = [
            g.stage,
            *(_cell(config[k]) if k in config else "" for k in keys),
            ", ".join(g.seeds),
            *(format_stat(g.stats[m], m) for m in metrics),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_table(groups: Sequence[Group], metrics: Sequence[str], keys: Sequence[str]) -> str:
    """The table as CSV in the metrics' logged units (fractions stay fractions): per metric
    ``<metric>.mean``, ``<metric>.std`` (empty for one seed) and ``<metric>.n``; ``seeds`` and
    ``run_ids`` separated by ``;``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            "stage",
            *keys,
            "seeds",
            "run_ids",
            *(f"{m}.{s}" for m in metrics for s in ("mean", "std", "n")),
        ]
    )
    for g in groups:
        config = dict(g.config)
        row: list[Any] = [g.stage, *(config.get(k) if k in config else "" for k in keys)]
        row += [";".join(g.seeds), ";".join(g.run_ids)]
        for m in metrics:
            s = g.stats[m]
            row += [repr(s.mean) if s.n else "", repr(s.std) if s.n > 1 else "", s.n]
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def _series_label(g: Group, skip: str) -> str:
    others = [f"{k.split('.')[-1]}={_cell(v)}" for k, v in g.config if k != skip]
    return ", ".join([g.stage, *others])


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": None})
    return buf.getvalue()


def key_values(groups: Sequence[Group], key: str) -> list[str | None]:
    """The distinct values of ``key`` over the groups where it is a configuration key."""
    return sorted({g.value(key) for g in groups if key in dict(g.config)}, key=_sort_key)


def plot_against(groups: Sequence[Group], key: str, metric: str, title: str = "") -> bytes | None:
    """PNG: ``metric`` (mean, error bars = std over seeds; % for fractions) against the
    values of ``key``, one line per stage and setting of the other keys (no error bar for
    one seed); ``None`` when ``key`` takes fewer than two values."""
    values = key_values(groups, key)
    if len(values) < 2:
        return None
    from matplotlib.figure import Figure

    numeric = all(isinstance(parse_value(v), int | float) for v in values)
    position = {v: (float(parse_value(v)) if numeric else i) for i, v in enumerate(values)}
    scale = 100.0 if is_fraction(metric) else 1.0
    series: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        if key in dict(g.config) and g.stats[metric].n:
            series[_series_label(g, key)].append(g)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    # series side by side around each x (2% of the x range apart), so error bars stay apart
    span = (max(position.values()) - min(position.values())) or 1.0
    for i, (label, members) in enumerate(series.items()):
        members.sort(key=lambda g: position[g.value(key)])
        dodge = 0.02 * span * (i - (len(series) - 1) / 2)
        x = [position[g.value(key)] + dodge for g in members]
        y = [scale * g.stats[metric].mean for g in members]
        err = [scale * g.stats[metric].std if g.stats[metric].n > 1 else math.nan for g in members]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=4, label=label)
    if not numeric:
        ax.set_xticks(list(position.values()), [_cell(v) for v in values])
    ax.set_xlabel(key)
    ax.set_ylabel(metric_label(metric))
    ax.set_title(title or f"{LABELS.get(metric, metric)} vs {key.split('.')[-1]} (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def plot_by(groups: Sequence[Group], key: str, metric: str, title: str = "") -> bytes | None:
    """PNG: bars of ``metric`` (mean, error bars = std over seeds; % for fractions) per
    value of ``key`` (such as the adaptation method), one bar per stage and setting of the
    other keys (no error bar for one seed); ``None`` when ``key`` takes fewer than two
    values."""
    values = key_values(groups, key)
    if len(values) < 2:
        return None
    from matplotlib.figure import Figure

    scale = 100.0 if is_fraction(metric) else 1.0
    series: dict[str, dict[str | None, Group]] = defaultdict(dict)
    for g in groups:
        if key in dict(g.config) and g.stats[metric].n:
            series[_series_label(g, key)][g.value(key)] = g
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(series), 1)
    for i, (label, by_value) in enumerate(series.items()):
        xs, ys, errs = [], [], []
        for j, v in enumerate(values):
            if v in by_value:
                s = by_value[v].stats[metric]
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(scale * s.mean)
                errs.append(scale * s.std if s.n > 1 else math.nan)
        ax.bar(xs, ys, width=width, yerr=errs, capsize=4, label=label)
    ax.set_xticks(range(len(values)), [_cell(v) for v in values])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel(key)
    ax.set_ylabel(metric_label(metric))
    ax.set_title(title or f"{LABELS.get(metric, metric)} per {key.split('.')[-1]} (mean ± std)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


# ----------------------------------------------------------------------------- report
@dataclass
class Report:
    """What :func:`build_report` makes: the texts, the PNGs by file name, the notes."""

    markdown: str
    csv: str
    plots: dict[str, bytes]
    notes: list[str]
    groups: list[Group]
    keys: dict[str, dict[str, list[str]]]


def _slug(text: str) -> str:
    return text.removeprefix("test/").replace("/", "_")


def plot_name(metric: str, key: str, kind: str = "vs") -> str:
    """``real_miou_vs_sim_ratio.png``, ``gap_miou_by_method.png``."""
    return f"{_slug(metric)}_{kind}_{key.split('.')[-1]}.png"


def build_report(
    rows: Sequence[RunRow],
    *,
    title: str,
    metric: str = "test/real/miou",
    columns: Sequence[str] = DEFAULT_COLUMNS,
    gap_metric: str = "test/gap/miou",
    plot_keys: Sequence[str] = PREFERRED[1:3],
    method_key: str = "adaptation.method",
    stage: str | None = None,
    ignore: Sequence[str] = BOOKKEEPING,
    prefer: Sequence[str] = PREFERRED,
    per_class: str | None = None,
) -> Report:
    """The table (Markdown with a title, and CSV) and plots of finished ``rows``.

    ``metric`` is the target metric (first column, y of the plots against ``plot_keys``);
    ``gap_metric`` is plotted per ``method_key``. ``stage`` keeps one stage. Raises
    :class:`ConfigError` naming ``stage``, ``metric`` or ``columns`` for a stage or metric
    that no row has. ``per_class`` (a prefix such as ``test/real/iou/``) adds every metric
    under it that some row has to the CSV (per-class IoU), not to the Markdown table.
    """
    notes: list[str] = []
    if stage:
        stages = sorted({r.stage for r in rows})
        if stage not in stages:
            raise ConfigError(f"stage: no finished {stage!r} run; stages: {', '.join(stages)}")
        rows = [r for r in rows if r.stage == stage]
    check_metrics(rows, [metric], "metric")
    check_metrics(rows, list(columns), "columns")
    metrics = [metric, *(c for c in columns if c != metric)]
    keys = varying_keys(rows, ignore, prefer=(*prefer, *plot_keys, method_key))
    for stage_name, stage_keys in keys.items():
        for key, aliases in stage_keys.items():
            if aliases:
                notes.append(f"{stage_name}: {', '.join(aliases)} vary with {key} (not shown)")
    rows, dup_notes = dedupe_seeds(sorted(rows, key=lambda r: (r.end_time, r.run_id)), keys)
    notes += dup_notes
    extra = sorted(m for m in available_metrics(rows) if per_class and m.startswith(per_class))
    extra = [m for m in extra if m not in metrics]
    all_metrics = [*metrics, *([gap_metric] if gap_metric not in metrics else []), *extra]
    groups = aggregate(rows, keys, all_metrics)
    columns_keys = table_keys(keys)
    plots: dict[str, bytes] = {}
    for key in plot_keys:
        png = plot_against(groups, key, metric)
        name = plot_name(metric, key)
        if png is None:
            notes.append(f"{name} skipped: {key} does not vary ({_values_note(rows, key)})")
        else:
            plots[name] = png
    name = plot_name(gap_metric, method_key, "by")
    if gap_metric not in set(available_metrics(rows)):
        notes.append(f"{name} skipped: no run has {gap_metric}")
    elif (png := plot_by(groups, method_key, gap_metric)) is None:
        values = _values_note(rows, method_key)
        notes.append(f"{name} skipped: {method_key} does not vary ({values})")
    else:
        plots[name] = png
    seeds = sorted({str(r.seed) for r in rows}, key=_sort_key)
    header = [
        f"# {title}",
        "",
        f"Mean ± sample std (ddof=1) over seeds, (n) = seeds with the metric; fractions in %. "
        f"Seeds: {', '.join(seeds)}; {len(rows)} runs.",
        "",
    ]
    text = "\n".join(header) + "\n" + markdown_table(groups, metrics, columns_keys) + "\n"
    if notes:
        text += "\nNotes:\n" + "".join(f"- {n}\n" for n in notes)
    csv_text = csv_table(groups, [*metrics, *extra], columns_keys)
    return Report(text, csv_text, plots, notes, groups, keys)


def _values_note(rows: Sequence[RunRow], key: str) -> str:
    values = sorted({_cell(r.params.get(key)) for r in rows}, key=_sort_key)
    return "values: " + ", ".join(values)
