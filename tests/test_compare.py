"""Sweep comparison (training/compare.py, scripts/compare.py): aggregation on synthetic rows,
then the script end to end against a temporary SQLite MLflow store (no training)."""

from __future__ import annotations

import csv
import io
import math

import pytest
from hydra import compose, initialize
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from core.config import ConfigError
from tests.conftest import compose_config
from training import compare
from training.compare import RunRow

PNG = b"\x89PNG\r\n\x1a\n"


def params(
    seed: int,
    sim_ratio: float = 0.9,
    real_fraction: float = 0.1,
    method: str = "none",
    stage: str = "finetune",
    output: str = "/out",
) -> dict[str, str]:
    """Flattened params shaped like training's (JSON-ish text values)."""
    p = {
        "seed": str(seed),
        "name": "smoke",
        "paths.output": output,
        "tracking.sweep_id": "s1",
        "tracking.uri": "null",
        "stage.name": stage,
        "stage.seed": str(seed),
        "stage.augment": f"Augment(seed={seed})",
        "data.augment.seed": str(seed),
        "data.generate.root": f"{output}/data",
        "data.generate.randomization": "light",
        "model.base_channels": "8",
        "adaptation.method": method,
        "adaptation.stages": "[]" if method == "none" else '["source_only"]',
        "stages.source_only.init": "null",
        "stages.source_only.sim_ratio": "1.0",
        "stages.source_only.real_fraction": "0.1",
        "stages.finetune.init": "source_only",
        "stages.finetune.sim_ratio": str(sim_ratio),
        "stages.finetune.real_fraction": str(real_fraction),
    }
    if method == "dann":
        p["adaptation.weight"] = "1.0"
    return p


def row(run_id: str, seed: int, miou: float, stage: str = "finetune", end: int = 0, **kw) -> RunRow:
    metrics = {
        "test/real/miou": miou,
        "test/sim/miou": miou + 0.1,
        "test/gap/miou": 0.1,
        "test/real/pixel_acc": 0.5,
    }
    return RunRow(run_id, stage, str(seed), params(seed, stage=stage, **kw), metrics, end_time=end)


# --------------------------------------------------------------------------- pure
def test_summarize_mean_and_sample_std():
    s = compare.summarize([0.25, 0.75])
    assert (s.mean, s.n) == (0.5, 2)
    assert s.std == math.sqrt(0.125)  # ddof = 1: ((0.25^2 + 0.25^2) / 1) ** 0.5
    s = compare.summarize([0.2, 0.4, 0.6])
    assert s.mean == pytest.approx(0.4, abs=1e-15) and s.std == pytest.approx(0.2, abs=1e-15)
    one = compare.summarize([0.3, math.nan])  # non-finite values are not seeds
    assert one.mean == 0.3 and one.n == 1 and math.isnan(one.std)
    assert compare.summarize([]).n == 0


def test_varying_keys_ignore_seed_bookkeeping_and_other_stages():
    rows = [
        row(f"f{s}{r}", s, 0.3, sim_ratio=r, output=f"/out{s}") for s in (0, 1) for r in (0.5, 0.9)
    ]
    # one source_only run per seed, whichever job ran it first (its params say sim_ratio 0.5)
    rows += [row(f"s{s}", s, 0.1, stage="source_only", sim_ratio=0.5) for s in (0, 1)]
    keys = compare.varying_keys(rows)
    # seed, paths, tracking, stage.*, augment seeds vary but never define a configuration;
    # stages.finetune.* cannot change source_only's result
    assert keys == {"finetune": {"stages.finetune.sim_ratio": []}, "source_only": {}}


def test_aliases_collapse_to_the_preferred_key_and_ancestors_count():
    rows = [row(f"{m}{s}", s, 0.3, method=m) for m in ("none", "dann") for s in (0, 1)]
    keys = compare.varying_keys(rows)
    assert keys == {"finetune": {"adaptation.method": ["adaptation.stages", "adaptation.weight"]}}
    assert compare.ancestors(rows[0].params, "finetune") == {"finetune", "source_only"}
    assert compare.is_relevant("stages.source_only.sim_ratio", "finetune", rows[0].params)
    assert not compare.is_relevant("stages.finetune.sim_ratio", "source_only", rows[0].params)


def test_aggregate_per_configuration_and_stage_counts_each_seed_once():
    rows = [
        row("a0", 0, 0.25, sim_ratio=0.5),
        row("a1", 1, 0.75, sim_ratio=0.5),
        row("b0", 0, 0.10, sim_ratio=0.9),
        row("b1", 1, 0.20, sim_ratio=0.9),
        row("b1-again", 1, 0.30, sim_ratio=0.9, end=5, output="/elsewhere"),  # a rerun
        row("s0", 0, 0.05, stage="source_only"),
        row("s1", 1, 0.07, stage="source_only"),
    ]
    keys = compare.varying_keys(rows)
    kept, notes = compare.dedupe_seeds(rows, keys)
    assert {r.run_id for r in kept} == {"a0", "a1", "b0", "b1-again", "s0", "s1"}
    assert len(notes) == 1 and "b1-again" in notes[0]
    groups = compare.aggregate(kept, keys, ["test/real/miou"])
    assert [(g.stage, g.config, g.seeds) for g in groups] == [
        ("finetune", (("stages.finetune.sim_ratio", "0.5"),), ["0", "1"]),
        ("finetune", (("stages.finetune.sim_ratio", "0.9"),), ["0", "1"]),
        ("source_only", (), ["0", "1"]),
    ]
    a, b, s = (g.stats["test/real/miou"] for g in groups)
    assert (a.mean, a.std, a.n) == (0.5, math.sqrt(0.125), 2)
    assert b.mean == pytest.approx(0.2) and b.std == pytest.approx(math.sqrt(0.02))
    assert s.mean == pytest.approx(0.06)


def test_markdown_and_csv_tables():
    rows = [
        row("a0", 0, 0.25, sim_ratio=0.5),
        row("a1", 1, 0.75, sim_ratio=0.5),
        row("b0", 0, 0.123, sim_ratio=0.9),
    ]
    keys = compare.varying_keys(rows)
    groups = compare.aggregate(rows, keys, ["test/real/miou", "test/gap/miou"])
    cols = compare.table_keys(keys)
    md = compare.markdown_table(groups, ["test/real/miou", "test/gap/miou"], cols)
    assert md.splitlines() == [
        "| stage | stages.finetune.sim_ratio | seeds | real mIoU (%) | gap mIoU (sim - real) (%) |",
        "|---|---|---|---|---|",
        "| finetune | 0.5 | 0, 1 | 50.0 ± 35.4 (2) | 10.0 ± 0.0 (2) |",
        "| finetune | 0.9 | 0 | 12.3 ± – (1) | 10.0 ± – (1) |",
    ]
    table = list(csv.DictReader(io.StringIO(compare.csv_table(groups, ["test/real/miou"], cols))))
    assert table[0]["stages.finetune.sim_ratio"] == "0.5" and table[0]["run_ids"] == "a0;a1"
    assert float(table[0]["test/real/miou.mean"]) == 0.5  # logged units: a fraction
    assert float(table[0]["test/real/miou.std"]) == math.sqrt(0.125)
    assert table[1]["test/real/miou.std"] == "" and table[1]["test/real/miou.n"] == "1"
    assert compare.format_stat(compare.Stat(12.5, 1.25, 3), "risk/T-06/latency_p50_ms") == (
        "12.5 ± 1.25 (3)"
    )


def test_report_plots_when_keys_vary_and_skips_with_a_note():
    rows = [
        row(f"{r}{f}{s}", s, 0.1 * s + r, sim_ratio=r, real_fraction=f)
        for r in (0.5, 0.9)
        for f in (0.1, 0.3)
        for s in (0, 1)
    ]
    report = compare.build_report(rows, title="t")
    assert set(report.plots) == {"real_miou_vs_sim_ratio.png", "real_miou_vs_real_fraction.png"}
    assert all(png.startswith(PNG) for png in report.plots.values())
    assert report.notes == [
        "gap_miou_by_method.png skipped: adaptation.method does not vary (values: none)"
    ]
    assert report.markdown.count("| finetune |") == 4
    methods = [row(f"{m}{s}", s, 0.3, method=m) for m in ("none", "dann") for s in (0, 1)]
    report = compare.build_report(methods, title="t", stage="finetune")
    assert set(report.plots) == {"gap_miou_by_method.png"}


def test_report_errors_name_the_key():
    rows = [row("a0", 0, 0.25), row("a1", 1, 0.75)]
    with pytest.raises(ConfigError, match=r"^metric: .*'test/real/mIoU'.*test/real/miou"):
        compare.build_report(rows, title="t", metric="test/real/mIoU")
    with pytest.raises(ConfigError, match=r"^columns: .*'test/x'"):
        compare.build_report(rows, title="t", columns=["test/x"])
    with pytest.raises(ConfigError, match=r"^stage: no finished 'oracle' run; stages: finetune"):
        compare.build_report(rows, title="t", stage="oracle")


# ----------------------------------------------------------------------- end to end
SWEEP = "2026-01-02_03-04-05"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Training-like runs: 2 seeds x 2 sim ratios (finetune), source_only once per seed, a
    failed run, a monitor run and a run of another sweep."""
    out = tmp_path_factory.mktemp("compare") / "out"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    out.mkdir()
    # job 0 of the sweep reused its two stages from earlier runs (tagged with no sweep id):
    # only its saved config leads to them; a second sweep reused everything
    hashes = {}
    for sweep in (SWEEP, "all-reused"):
        job = out / "multirun" / sweep / "0" / ".hydra"
        job.mkdir(parents=True)
        OmegaConf.save(
            train_config(out, "seed=0", "stages.finetune.sim_ratio=0.5"), job / "config.yaml"
        )
        hashes = compare.sweep_job_hashes(out / "multirun" / sweep)["0"]
    reused = {
        ("source_only", 0, 0.5): hashes["source_only"],
        ("finetune", 0, 0.5): hashes["finetune"],
    }
    client = MlflowClient(uri)
    exp = client.create_experiment("sim2real-drive", artifact_location=(out / "art").as_uri())

    def run(stage, seed, ratio, real, sweep=SWEEP, status="FINISHED"):
        digest = reused.get((stage, seed, ratio), f"{stage}{seed}{ratio}")
        if (stage, seed, ratio) in reused:
            sweep = ""
        tags = {"stage": stage, "experiment": "smoke", "sweep_id": sweep, "config_hash": digest}
        r = client.create_run(exp, run_name=f"smoke/{stage}", tags=tags)
        for key, value in params(seed, sim_ratio=ratio, stage=stage).items():
            client.log_param(r.info.run_id, key, value)
        metrics = {
            "test/real/miou": real,
            "test/sim/miou": real + 0.125,
            "test/gap/miou": 0.125,
            "test/real/pixel_acc": 0.5,
        }
        for key, value in metrics.items():
            client.log_metric(r.info.run_id, key, value)
        client.set_terminated(r.info.run_id, status)

    for seed, (a, b) in enumerate([(0.25, 0.5), (0.75, 0.625)]):
        run("source_only", seed, 0.5, 0.0625)
        run("finetune", seed, 0.5, a)
        run("finetune", seed, 0.9, b)
    run("finetune", 2, 0.9, 0.99, status="FAILED")
    run("monitor", 0, 0.9, 0.99)
    run("finetune", 0, 0.9, 0.99, sweep="other-sweep")
    return out, uri, client, exp


def train_config(out, *overrides):
    """The smoke training config a sweep job saves in ``.hydra/config.yaml``."""
    return compose_config(
        "train",
        ["experiment=smoke", f"paths.output={out}", f"paths.data={out / 'data'}", *overrides],
    )


def compare_config(out, *overrides):
    """configs/compare.yaml as scripts/compare.py composes it (from the config store)."""
    import scripts.compare  # noqa: F401 - registers the config

    with initialize(version_base="1.3", config_path=None):
        return compose("compare", [f"paths.output={out}", *overrides])


def test_script_end_to_end(store, capsys):
    from scripts.compare import main

    out, uri, client, exp = store
    main(compare_config(out, f"sweep={SWEEP}"))
    folder = out / "compare" / SWEEP
    assert sorted(p.name for p in folder.iterdir()) == [
        "real_miou_vs_sim_ratio.png",
        "table.csv",
        "table.md",
    ]
    md = (folder / "table.md").read_text()
    assert "| source_only |  | 0, 1 | 6.2 ± 0.0 (2) |" in md
    assert "| finetune | 0.5 | 0, 1 | 50.0 ± 35.4 (2) | 62.5 ± 35.4 (2) | 12.5 ± 0.0 (2) |" in md
    assert "| finetune | 0.9 | 0, 1 | 56.2 ± 8.8 (2) |" in md
    assert "left out 1 run(s): finetune FAILED" in md
    assert "does not vary" in md  # real_fraction and the method: skipped with a note
    assert md in capsys.readouterr().out
    table = list(csv.DictReader(io.StringIO((folder / "table.csv").read_text())))
    assert [float(r["test/real/miou.mean"]) for r in table] == [0.0625, 0.5, 0.5625]
    assert (folder / "real_miou_vs_sim_ratio.png").read_bytes().startswith(PNG)

    [cmp] = client.search_runs([exp], f"tags.stage = 'compare' and tags.sweep_id = '{SWEEP}'")
    assert cmp.info.status == "FINISHED"
    assert cmp.data.tags["sweep_id"] == SWEEP and cmp.data.tags["experiment"] == "compare"
    assert cmp.data.params["configuration_keys"] == "stages.finetune.sim_ratio"
    assert cmp.data.params["runs"] == "6"
    logged = {f.path for f in client.list_artifacts(cmp.info.run_id)}
    assert logged == {"table.md", "table.csv", "real_miou_vs_sim_ratio.png"}

    # a second comparison ignores the compare run it logged; one stage, another metric
    main(
        compare_config(
            out, f"sweep={SWEEP}", "stage=finetune", "metric=test/sim/miou", "log_to_mlflow=false"
        )
    )
    md = (folder / "table.md").read_text()
    assert "source_only" not in md and "sim_miou_vs_sim_ratio.png" in {
        p.name for p in folder.iterdir()
    }
    assert "real_miou_vs_sim_ratio.png" not in {p.name for p in folder.iterdir()}  # stale


def test_script_errors_name_the_key(store):
    from scripts.compare import main

    out, *_ = store
    with pytest.raises(ConfigError, match=rf"^sweep: .*'nope'.*known sweep ids: {SWEEP}, other"):
        main(compare_config(out, "sweep=nope"))
    with pytest.raises(ConfigError, match=r"^sweep: give a sweep id.*known sweep ids"):
        main(compare_config(out))
    with pytest.raises(ConfigError, match=r"^metric: no run has the metric 'test/real/MIOU'"):
        main(compare_config(out, f"sweep={SWEEP}", "metric=test/real/MIOU"))
    with pytest.raises(ConfigError, match=r"^experiment: .*'bench'.*known experiment names: smoke"):
        main(compare_config(out, "experiment=bench"))
    with pytest.raises(ConfigError, match=r"^tracking.experiment: no MLflow experiment 'x'"):
        main(compare_config(out, f"sweep={SWEEP}", "tracking.experiment=x"))


def test_a_sweep_that_reused_every_stage(store):
    from scripts.compare import main

    out, *_ = store
    main(compare_config(out, "sweep=all-reused", "log_to_mlflow=false"))
    md = (out / "compare" / "all-reused" / "table.md").read_text()
    assert "| source_only | 0 | 6.2 ± – (1) |" in md
    assert "| finetune | 0 | 25.0 ± – (1) |" in md
    # without the job folders, the sweep has no run of its own
    with pytest.raises(ConfigError, match=r"^sweep: no run is tagged sweep_id='all-reused'"):
        main(compare_config(out, "sweep=all-reused", "resolve_reused=false"))


def test_per_class_iou_goes_to_the_csv_and_a_results_copy(store, tmp_path):
    from scripts.compare import main

    out, uri, client, exp = store
    for r in client.search_runs([exp], "tags.stage = 'finetune'"):
        client.log_metric(r.info.run_id, "test/real/iou/road", 0.8)
    copy = tmp_path / "docs" / "results" / "table.csv"
    main(compare_config(out, f"sweep={SWEEP}", f"results_csv={copy}", "log_to_mlflow=false"))
    table = list(csv.DictReader(io.StringIO(copy.read_text())))
    assert "test/real/iou/road.mean" in table[0]
    assert any(r["test/real/iou/road.mean"] == "0.8" for r in table)
    md = (out / "compare" / SWEEP / "table.md").read_text()
    assert "iou/road" not in md  # per class in the CSV only
