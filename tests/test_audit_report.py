"""The T-08 / section 5.3 audit report (training/risk/audit.py, scripts/report.py) over a
real SQLite store whose stage runs logged through the real publisher
(training.risk.monitor.publish: risk figures, risk/register.json, risk/alerts.json)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import yaml

from core.config import ConfigError
from core.paths import config_dir
from tests.conftest import ROOT, compose_config
from training.risk import audit

MODEL = "seg-audit"
#: The tests on the store: its fixture (SQLite tables, four published runs, three
#: registered versions) takes about 20 s of CPU on the 2-core machine.
STORE = pytest.mark.slow
#: Per-group real test figures of each stage run: (mIoU, pixel accuracy) per group.
GROUPS = {
    "v1": {"day-clear": (0.383, 0.781), "night-fog": (0.243, 0.658)},
    "v2": {"day-clear": (0.520, 0.880), "night-fog": (0.410, 0.820), "dusk-rain": (0.455, 0.85)},
    "v3": {"day-clear": (0.500, 0.870), "night-fog": (0.300, 0.700)},
}
#: Risk figures each run publishes: v1 fires the accuracy and both drift alerts, v2 none,
#: v3 the accuracy alert.
RISK = {
    "v1": {"risk/T-01/accuracy": 0.77, "risk/T-02/psi": 0.31, "risk/T-08/eod/person": 0.371,
           "risk/T-08/dpd/person": 0.012, "risk/T-08/eod/vehicle": 0.223,
           "risk/T-08/dpd/vehicle": 0.062, "risk/T-08/eod_max": 0.371},
    "v2": {"risk/T-01/accuracy": 0.90, "risk/T-02/psi": 0.10, "risk/T-08/eod/person": 0.120,
           "risk/T-08/dpd/person": 0.010, "risk/T-08/eod_max": 0.120},
    "v3": {"risk/T-01/accuracy": 0.84, "risk/T-02/psi": 0.12, "risk/T-08/eod/person": 0.250,
           "risk/T-08/eod_max": 0.250},
}  # fmt: skip


def _quiet_alerts(folder: Path) -> Path:
    """The project's alert rules without notifiers or JSONL: nothing leaves the test."""
    rules = yaml.safe_load((config_dir() / "risk" / "alerts.yaml").read_text("utf-8"))["rules"]
    path = folder / "alerts.yaml"
    path.write_text(yaml.safe_dump({"rules": rules, "jsonl": None}, allow_unicode=True), "utf-8")
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """``<root>/out/mlflow.db``: three registered versions of :data:`MODEL` (v1 first
    champion, v2 promoted over it, v3 rejected challenger), an unregistered failed stage in
    another experiment and a champion check of scripts/monitor.py; plus ``<root>/empty``, a
    store without any registered model."""
    import mlflow

    root = tmp_path_factory.mktemp("audit")
    (root / "out").mkdir()
    uri = f"sqlite:///{root / 'out' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        try:
            _fill_store(uri, root)
        finally:  # the registry sets MLflow's process-wide URI: put back "none at all"
            mlflow.set_tracking_uri(None)
    return {"uri": uri, "root": root, "out": root / "out"}


def _fill_store(uri: str, root: Path) -> None:
    from mlflow.tracking import MlflowClient

    from training.risk.monitor import publish
    from training.risk.registry import ModelRegistry, compare_scores

    client = MlflowClient(uri, registry_uri=uri)
    client.search_experiments()  # creates the tables
    (root / "empty").mkdir()
    shutil.copy(root / "out" / "mlflow.db", root / "empty" / "mlflow.db")
    alerts_path = _quiet_alerts(root)
    exp = client.create_experiment("audit", artifact_location=(root / "art").as_uri())
    other = client.create_experiment("other", artifact_location=(root / "art2").as_uri())
    runs = {}
    for name, groups in GROUPS.items():
        rid = client.create_run(
            exp, run_name=f"audit/{name}", tags={"stage": "finetune"}
        ).info.run_id
        test = {"test/real/miou": float(np.mean([m for m, _ in groups.values()]))}
        test["test/real/pixel_acc"] = float(np.mean([a for _, a in groups.values()]))
        test["test/real/iou/road"] = 0.9  # a per-class family, not a condition group
        for group, (miou, acc) in groups.items():
            test[f"test/real/{group}/miou"] = miou
            test[f"test/real/{group}/pixel_acc"] = acc
        for key, value in test.items():
            client.log_metric(rid, key, value)
        (root / "runs" / name).mkdir(parents=True)
        publish(client, rid, name, RISK[name], root / "runs" / name, alerts_path=alerts_path)
        client.create_logged_model(exp, name="model", source_run_id=rid)  # no export needed
        client.set_terminated(rid)
        runs[name] = rid
    failed = client.create_run(other, run_name="other/source_only", tags={"stage": "x"})
    publish(client, failed.info.run_id, "failed", {"risk/T-05/job_failed": 1.0}, root / "runs",
            alerts_path=alerts_path)  # fmt: skip
    client.set_terminated(failed.info.run_id, "FAILED")
    registry = ModelRegistry(uri, name=MODEL)
    registry.register(runs["v1"])
    registry.register(runs["v2"])
    win = compare_scores(np.full(20, 0.3), np.linspace(0.45, 0.55, 20),
                         champion_version="1", challenger_version="2")  # fmt: skip
    assert registry.promote(win)
    registry.register(runs["v3"])
    lose = compare_scores(np.full(20, 0.5), np.linspace(0.35, 0.45, 20),
                          champion_version="2", challenger_version="3")  # fmt: skip
    assert not registry.promote(lose)
    client.create_registered_model("seg-empty")
    check = client.create_run(
        exp, run_name="monitor/champion-check",
        tags={"stage": "monitor", "registry_name": MODEL, "champion_version": "2",
              "decision": "retrain", "trigger": "PSI 0.3120 > 0.25",
              "current_data": "data/week-48"},
    )  # fmt: skip
    client.log_metric(check.info.run_id, "risk/T-01/accuracy", 0.912)
    client.log_metric(check.info.run_id, "risk/T-02/psi", 0.312)
    client.set_terminated(check.info.run_id)


def _now() -> datetime:
    return datetime.now(timezone.utc) + timedelta(minutes=1)


@pytest.fixture(scope="module")
def report(store):
    now = _now()
    return audit.build_report(store["uri"], MODEL, "monthly", now - timedelta(days=31), now)


# --------------------------------------------------------------------------- pure parts
def test_fairness_summary_worst_group_and_gaps():
    metrics = {
        "test/real/day/miou": 0.6,
        "test/real/day/pixel_acc": 0.9,
        "test/real/night/miou": 0.35,
        "test/real/night/pixel_acc": 0.7,
        "test/real/fog/miou": math.nan,  # not measured: no group
        "test/real/iou/person": 0.2,  # a class, not a group
        "test/real/miou": 0.5,
        "risk/T-08/eod/person": 0.4,
        "risk/T-08/dpd/person": math.nan,
        "risk/T-08/eod_max": 0.4,
    }
    f = audit.fairness_summary(metrics)
    assert list(f["groups"]) == ["day", "night"]
    assert (f["worst_group"], f["best_group"]) == ("night", "day")
    assert f["miou_gap"] == pytest.approx(0.25)
    assert f["pixel_acc_gap"] == pytest.approx(0.2)
    assert f["classes"] == {"person": {"eod": 0.4, "dpd": None}}
    assert f["eod_max"] == 0.4
    one = audit.fairness_summary({"test/real/day/miou": 0.6})
    assert one["worst_group"] == "day" and one["miou_gap"] is None and one["eod_max"] is None


def test_register_rows_alert_records_and_decisions():
    table = {
        "columns": ["id", "level", "live_status", "metrics", "alert_messages"],
        "data": [["T-01", "high", "alert", '{"accuracy": 0.7}', '["[T-01] low"]'],
                 ["T-03", "medium", "not_monitored", "{}", "[]"]],
    }  # fmt: skip
    rows = audit.register_rows(table)
    assert rows[0]["metrics"] == {"accuracy": 0.7} and rows[0]["alert_messages"] == ["[T-01] low"]
    assert audit.register_summary(rows) == {
        "live": {"alert": 1, "not_monitored": 1},
        "levels": {"high": 1, "medium": 1},
        "high_in_alert": ["T-01"],
    }
    run = {"run_id": "r1", "name": "n", "start": "2026-12-01T10:00:00+00:00", "end": None,
           "tags": {"stage": "finetune", "risk/alerts_fired": "a,b"}}  # fmt: skip
    fired, failures = audit.alert_records(None, run)  # no artifact: the tag's rule names
    assert [a["rule"] for a in fired] == ["a", "b"] and failures == []
    assert fired[0]["time"] == "2026-12-01T10:00:00+00:00" and fired[0]["stage"] == "finetune"
    logged = {
        "alerts": [{"rule": "a", "risk_id": "T-01"}],
        "notifier_failures": [{"notifier": "webhook", "rule": "a", "error": "timeout"}],
    }
    fired, failures = audit.alert_records(logged, run)  # fmt: skip
    assert fired[0]["risk_id"] == "T-01" and failures[0]["notifier"] == "webhook"
    tags = {
        "decision": "rejected",
        "compare.diff": "-0.1",
        "compare.ci_low": "-0.12",
        "compare.ci_high": "-0.08",
        "compare.margin": "0.01",
        "superseded_by": "4",
    }
    assert audit.decision_text(tags) == (  # fmt: skip
        "rejected (diff -0.1000, CI [-0.1200, -0.0800], margin 0.01); superseded by v4"
    )
    assert audit.decision_text({}) == "pending"
    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    assert audit.period_start(now, "quarterly") == now - timedelta(days=92)
    assert audit.period_start(now, "monthly", 7) == now - timedelta(days=7)
    assert audit.in_period("2026-11-30T00:00:00+00:00", now - timedelta(days=2), now)
    assert not audit.in_period("2026-11-01T00:00:00+00:00", now - timedelta(days=2), now)


# --------------------------------------------------------------------------- the store
@STORE
def test_report_data_over_the_store(store, report):
    assert [v["version"] for v in report["versions"]] == ["3", "2", "1"]  # newest first
    v3, v2, v1 = report["versions"]
    assert (v1["aliases"], v2["aliases"], v3["aliases"]) == ([], ["champion"], ["challenger"])
    assert v1["decision"] == "first_champion; superseded by v2"
    assert v2["decision"].startswith("promoted (diff +0.2000, CI [")
    assert v3["decision"].startswith("rejected (diff -0.1000, CI [")
    assert v1["test_miou"] == pytest.approx((0.383 + 0.243) / 2)
    assert v1["fairness"]["worst_group"] == "night-fog"
    assert v1["fairness"]["miou_gap"] == pytest.approx(0.140)
    assert v2["fairness"]["worst_group"] == "night-fog"
    assert v2["fairness"]["miou_gap"] == pytest.approx(0.110)
    assert "iou" not in v1["fairness"]["groups"]
    assert v1["fairness"]["classes"]["person"] == {"dpd": 0.012, "eod": 0.371}
    assert v1["alerts"] == ["model_accuracy_drop", "data_drift_detected", "data_drift_severe"]
    assert (v2["alerts"], v3["alerts"]) == ([], ["model_accuracy_drop"])
    # the register of the champion's (v2's) run: nothing fired there
    rows = {r["id"]: r for r in report["register"]["rows"]}
    assert len(rows) == 23 and report["register"]["source"].startswith(f"run {v2['run_id']}")
    assert (rows["T-01"]["level"], rows["T-01"]["live_status"]) == ("high", "ok")
    assert rows["T-01"]["metrics"] == {"accuracy": 0.9}
    assert rows["T-03"]["live_status"] == "not_monitored"
    # the period's alerts over the whole store, oldest first: v1's three, v3's one and
    # the failed stage of the other experiment
    assert [(a["rule"], a["run_name"]) for a in report["alerts"]] == [
        ("model_accuracy_drop", "audit/v1"),
        ("data_drift_detected", "audit/v1"),
        ("data_drift_severe", "audit/v1"),
        ("model_accuracy_drop", "audit/v3"),
        ("training_job_failed", "other/source_only"),
    ]
    assert report["alert_counts"] == {"T-01": 2, "T-02": 2, "T-05": 1}
    assert [h["version"] for h in report["champion_changes"]] == ["1", "2"]
    [check] = report["checks"]
    assert (check["decision"], check["psi"], check["champion_version"]) == ("retrain", 0.312, "2")


@STORE
def test_html_shows_versions_fairness_register_and_alerts(report):
    page = audit.render_audit(report)
    for text in (
        "Risk audit (monthly): seg-audit",
        "v1",
        "v2 <b>champion</b>",
        "v3 <b>challenger</b>",
        "first_champion; superseded by v2",
        "night-fog (0.243)",  # v1's worst group and its mIoU
        "0.140",  # v1's group mIoU gap
        "0.371",  # v1's EOD max
        "<td class='worst'>0.410</td>",  # v2's worst group cell
        "demographic parity diff (DPD)",
        "Model bias (モデルバイアス)",
        "<tr class='ok'><td>T-01</td>",
        "<tr class='not_monitored'><td>T-03</td>",
        "[T-01] model accuracy drop (モデル精度低下): risk/T-01/accuracy = 0.77 &lt; 0.85",
        "training_job_failed",
        "PSI 0.3120 &gt; 0.25",  # the champion check's trigger
        "data/week-48",
        "リスク評価レビュー",
    ):
        assert text in page, text
    assert "新規リスク識別" not in page  # a quarterly item
    assert page.count("data:image/png;base64,") == 3  # the trend panels
    assert "<script" not in page and not re.search(r"(src|href)=.https?:", page)
    quarterly = audit.render_audit({**report, "review": "quarterly"})
    assert "新規リスク識別" in quarterly and "T-08 バイアス評価レポート" in quarterly


@STORE
def test_period_keeps_aliased_versions_and_drops_older_history(store):
    later = _now() + timedelta(days=400)
    report = audit.build_report(store["uri"], MODEL, "quarterly", later - timedelta(days=92), later)
    assert [v["version"] for v in report["versions"]] == ["3", "2"]  # champion, challenger
    assert report["older_versions"] == 1
    assert report["alerts"] == [] and report["checks"] == []
    assert report["champion_changes"] == []
    page = audit.render_audit(report)
    assert "1 older version(s) not shown" in page and "none in the period" in page


def _cfg(store, *overrides: str):
    return compose_config("report", [f"paths.output={store['out']}", *overrides])


@STORE
def test_run_report_writes_the_file(store, capsys):
    from scripts.report import run_report

    now = _now()
    path = run_report(_cfg(store), now=now)
    assert path == store["out"] / "reports" / f"audit-monthly-{now:%Y-%m-%d}.html"
    page = path.read_text("utf-8")
    assert "Risk audit (monthly): seg-audit" in page and "night-fog (0.243)" in page
    assert f"3 version(s), 5 alert(s) since {now - timedelta(days=31):%Y-%m-%d}" in (
        capsys.readouterr().out
    )
    custom = store["root"] / "q.html"
    run_report(_cfg(store, "review=quarterly", "since_days=7", f"output_file={custom}"), now=now)
    assert "Risk audit (quarterly)" in custom.read_text("utf-8")


@STORE
def test_report_file_is_written_atomically(store, monkeypatch):
    """A write that fails (here: fsync, as on a full disk) leaves no partial file: a new
    report does not appear, an old one keeps its content, no temporary file remains."""
    from scripts.report import run_report

    folder = store["root"] / "atomic"
    folder.mkdir()
    old = folder / "old.html"
    old.write_text("previous report", "utf-8")

    def broken(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("core.files.os.fsync", broken)
    for target in (folder / "new.html", old):
        with pytest.raises(OSError, match="No space left"):
            run_report(_cfg(store, f"output_file={target}"))
    assert sorted(p.name for p in folder.iterdir()) == ["old.html"]
    assert old.read_text("utf-8") == "previous report"


@STORE
def test_bad_input_names_the_key_before_any_work(store, tmp_path):
    from scripts.report import run_report

    def refused(*overrides: str, out: Path | None = None) -> str:
        cfg = compose_config("report", [f"paths.output={out or store['out']}", *overrides])
        with pytest.raises(ConfigError) as err:
            run_report(cfg)
        return str(err.value)

    empty = refused(out=store["root"] / "empty")
    assert empty.startswith("registry.name: the tracking store sqlite:///")
    assert "has no registered model" in empty
    assert refused("registry.name=seg-empty") == (
        f"registry.name: registered model 'seg-empty' in {store['uri']} has no version to "
        "report on: register one first (python scripts/pipeline.py)"
    )
    assert refused("registry.name=nope").startswith("registry.name: no registered model 'nope'")
    assert refused(out=tmp_path / "none").startswith(
        f"paths.output: no MLflow store at {tmp_path / 'none' / 'mlflow.db'}"
    )
    assert refused("review=weekly") == ("review: expected one of monthly, quarterly, got 'weekly'")
    assert refused("since_days=0").startswith("since_days: expected a whole number >= 1")
    assert refused(f"output_file={tmp_path}").startswith(f"output_file: {tmp_path} is a folder")
    assert not (store["root"] / "empty" / "reports").exists()
    assert not (tmp_path / "none").exists()


def test_the_script_registers_the_tracking_checks():
    cfg = compose_config("report", return_hydra_config=True)
    targets = [c._target_ for c in cfg.hydra.callbacks.values()]
    assert targets[0] == "training.tracking_server.TrackingChecks"


@pytest.mark.slow  # a subprocess: imports mlflow from scratch
def test_script_exits_2_with_one_line_on_an_empty_registry(store):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    empty = store["root"] / "empty"
    out = subprocess.run(
        [sys.executable, "scripts/report.py", f"paths.output={empty}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("report: registry.name: the tracking store sqlite:///")
    assert "Traceback" not in out.stderr
    assert not (empty / "reports").exists()
