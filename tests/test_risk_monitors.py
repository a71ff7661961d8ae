"""The register's T-03, T-07, S-01/S-02, O-03 monitors and T-04's system metrics: figures
from constructed inputs, the alerts they fire, the config errors."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from core.config import ConfigError
from simulation.dataset import GeneratedDataset
from training.risk.alerts import evaluate, load_rules
from training.risk.integrity import dataset_rows, integrity_figures
from training.risk.leaks import redact_secrets, scan_run, scan_text, secret_values
from training.risk.monitor import CONFIG_DIR, check_settings, coverage_figures
from training.risk.register import RiskRegister
from training.risk.throughput import (
    ScalingLedger,
    ThroughputMeter,
    throughput_figures,
    workload_key,
)

PASSWORD = "hunter2-Secret-Value"


def fired(metrics: dict[str, float]) -> set[str]:
    rules = load_rules(CONFIG_DIR / "alerts.yaml")
    return {a.rule.name for a in evaluate(rules, metrics) if a.fired}


# ------------------------------------------------------------------------------ T-07
@pytest.fixture(scope="module")
def sim_root(tmp_path_factory) -> Path:
    from tests.test_dataset import generate

    root = tmp_path_factory.mktemp("integrity") / "sim"
    generate(root)
    return root


class Reader(torch.utils.data.Dataset):
    """A real-camera reader: no checksums."""

    name = "camvid"

    def __len__(self) -> int:
        return 1


def test_integrity_rows_and_figures(sim_root: Path) -> None:
    from training.stages.data import verify_datasets

    fresh = GeneratedDataset(sim_root)
    rows = dataset_rows({"sim_train": fresh, "real_test": Reader(), "real_val": None})
    assert [(r["role"], r["kind"], r["verified"]) for r in rows] == [
        ("sim_train", "generated", False),
        ("real_test", "Reader", None),
    ]
    assert rows[0]["card_sha256"] == fresh.card_digest and rows[0]["files"] > 6
    figures, tags = integrity_figures(rows)
    assert figures == {
        "risk/T-07/datasets": 2.0,
        "risk/T-07/checksummed": 1.0,
        "risk/T-07/verified": 0.0,
        "risk/T-07/unverified": 1.0,
        "risk/T-07/verified_share": 0.0,
    }
    assert tags["risk/T-07/summary"] == (
        "0 of 1 checksummed datasets verified (sha256 of every file); NOT verified: "
        "sim_train; without checksums: real_test (Reader)"
    )
    assert "data_integrity_unverified" in fired(figures)

    verify_datasets({"sim_train": fresh})
    # a subset of the verified set, as a stage sees it, looked through
    subset = torch.utils.data.Subset(fresh, [0, 1])
    rows = dataset_rows({"sim_train": subset})
    assert rows[0]["verified"] and rows[0]["name"] == fresh.name
    later = datetime.fromisoformat(rows[0]["verified_at"]) + timedelta(hours=2)
    figures, _ = integrity_figures(rows, now=later)
    assert figures["risk/T-07/unverified"] == 0 and figures["risk/T-07/verified_share"] == 1
    assert figures["risk/T-07/oldest_verification_h"] == pytest.approx(2.0)
    assert "data_integrity_unverified" not in fired(figures)
    assert integrity_figures([]) == ({}, {})


# ------------------------------------------------------------------------------ S-01/S-02
@pytest.mark.parametrize(
    ("text", "kind"),
    [
        (f"tracking.uri=https://alice:{PASSWORD}@mlflow.example.com", "url_password"),
        ("url: https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXXXXXX", "slack_webhook"),
        ("https://discord.com/api/webhooks/123456/abcdefghijklmnop", "discord_webhook"),
        ("token ghp_" + "a" * 36, "github_token"),
        ("AKIAIOSFODNN7EXAMPLE", "aws_access_key"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload", "bearer_token"),
        ("-----BEGIN RSA PRIVATE KEY-----", "private_key"),
        (f"password={PASSWORD}", "secret_assignment"),
        (f'{{"api_key": "{PASSWORD}"}}', "secret_assignment"),
    ],
)
def test_scan_finds_each_credential_form(text: str, kind: str) -> None:
    assert kind in scan_text(text)
    assert PASSWORD not in redact_secrets(text, secrets=[])


@pytest.mark.parametrize(
    "text",
    [
        "tracking.uri=https://mlflow.example.com",
        "http://***@mlflow.example.com",  # what redact_uri leaves
        "password_env: SIM2REAL_SMTP_PASSWORD",  # the name of a variable, not its value
        "url_env=SIM2REAL_SLACK_WEBHOOK_URL",
        "password: ***",
        "token=${MLFLOW_TRACKING_TOKEN}",
        "password: null",
        "card_sha256=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    ],
)
def test_scan_passes_what_is_not_a_credential(text: str) -> None:
    assert scan_text(text) == []


def test_secret_values_of_the_environment_are_found_and_redacted() -> None:
    env = {
        "SIM2REAL_SLACK_WEBHOOK_URL": "https://example.org/hook/abcdef",
        "MLFLOW_TRACKING_PASSWORD": PASSWORD,
        "HOME": "/root/very/long/path",
        "SHORT_TOKEN": "abc",  # too short to scan for
    }
    known = secret_values(env)
    assert set(known) == {env["SIM2REAL_SLACK_WEBHOOK_URL"], PASSWORD}
    text = f"error: could not post to {env['SIM2REAL_SLACK_WEBHOOK_URL']} as {PASSWORD}"
    assert scan_text(text, known) == ["environment_secret"]
    assert redact_secrets(text, known) == "error: could not post to *** as ***"


def _store(tmp_path: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("scan", artifact_location=(tmp_path / "art").as_uri())
    return client, exp


def test_leak_scan_finds_a_planted_password_and_passes_a_clean_run(tmp_path: Path) -> None:
    client, exp = _store(tmp_path)
    clean = client.create_run(exp).info.run_id
    client.log_param(clean, "tracking.uri", "https://mlflow.example.com")
    client.log_param(clean, "risk.alerts", "null")
    client.set_tag(clean, "stage", "finetune")
    client.log_text(clean, "trainer:\n  precision: bf16-mixed\n", "config.yaml")
    scan = scan_run(client, clean, secrets=[])
    assert scan.findings == [] and scan.items >= 4
    assert scan.figures()["risk/S-01/leaks_found"] == 0
    assert not fired(scan.figures()) & {"credential_leak", "credential_exposed"}

    leaky = client.create_run(exp).info.run_id
    client.log_param(leaky, "tracking.uri", f"https://alice:{PASSWORD}@mlflow.example.com")
    client.log_text(leaky, "notifier: https://hooks.slack.com/services/T1/B2/C3C3C3C3", "a/b.txt")
    folder = tmp_path / "stage"
    folder.mkdir()
    (folder / "notes.log").write_text(f"retrying with password={PASSWORD}\n")
    (folder / "weights.ckpt").write_bytes(PASSWORD.encode())  # binary: not read
    scan = scan_run(
        client, leaky, pending_tags={"error": f"x {PASSWORD}"}, folders=[folder], secrets=[PASSWORD]
    )
    where = {(f.where, f.kind) for f in scan.findings}
    assert where == {
        ("param:tracking.uri", "url_password"),
        ("param:tracking.uri", "environment_secret"),
        ("artifact:a/b.txt", "slack_webhook"),
        ("tag:error", "environment_secret"),
        ("file:notes.log", "secret_assignment"),
        ("file:notes.log", "environment_secret"),
    }
    figures = scan.figures()
    assert figures["risk/S-01/leaks_found"] == figures["risk/S-02/leaks_found"] == 6
    assert {"credential_leak", "credential_exposed"} <= fired(figures)
    summary = scan.tags()["risk/S-01/leak_scan"]
    assert summary.startswith("6 credential(s): ")
    assert "url_password in param:tracking.uri" in summary
    assert PASSWORD not in json.dumps(scan.tags()) + repr(scan.findings)


def test_published_tags_are_redacted(tmp_path: Path) -> None:
    from training.risk.monitor import publish

    client, exp = _store(tmp_path)
    run = client.create_run(exp).info.run_id
    publish(
        client,
        run,
        "t",
        {"risk/S-01/leaks_found": 1.0},
        tmp_path,
        tags={"error": f"connect https://bob:{PASSWORD}@host failed"},
        alerts_path=_quiet_alerts(tmp_path),
    )
    tags = client.get_run(run).data.tags
    assert PASSWORD not in json.dumps(tags) and "https://bob:***@host" in tags["error"]
    assert "credential_leak" in tags["risk/alerts_fired"]
    assert PASSWORD not in (tmp_path / "risk_dashboard.html").read_text()


def _quiet_alerts(tmp_path: Path) -> Path:
    """The project's rules with only the JSONL notifier (no network)."""
    import yaml

    cfg = yaml.safe_load((CONFIG_DIR / "alerts.yaml").read_text())
    cfg["notifiers"] = {}
    path = tmp_path / "alerts.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------ O-03
def test_coverage_counts_the_measured_rows() -> None:
    register = RiskRegister.load(CONFIG_DIR / "register.yaml")
    figures = {"risk/T-01/accuracy": 0.9, "risk/T-01/f1": 0.8, "risk/S-05/max_drop": 0.1}
    out = coverage_figures(register, figures)
    # T-01, S-05 and O-03 itself, of the document's 23 rows
    assert out == {
        "risk/O-03/coverage": pytest.approx(3 / 23),
        "risk/O-03/monitored": 3.0,
        "risk/O-03/not_monitored": 20.0,
    }


# ------------------------------------------------------------------------------ T-03
class _Trainer:
    precision = "bf16-mixed"

    class accelerator:  # noqa: N801 - stands in for an accelerator instance's class
        pass


def test_meter_counts_images_and_loop_time_without_validation(monkeypatch) -> None:
    clock = iter([0.0, 1.0, 1.5, 2.5, 10.0, 20.0, 20.5, 21.5])
    monkeypatch.setattr("training.risk.throughput.time.perf_counter", lambda: next(clock))
    meter = ThroughputMeter()
    model = torch.nn.Conv2d(3, 2, 1)
    meter.on_fit_start(_Trainer(), model)
    batch = {"image": torch.zeros(4, 3, 8, 16)}
    meter.on_train_epoch_start(None, None)
    meter.on_train_batch_start(None, None, batch, 0)  # t=0
    meter.on_train_batch_end(None, None, None, batch, 0)  # t=1: 1 s of compute
    meter.on_train_batch_start(None, None, batch, 1)  # t=1.5: 0.5 s waiting for data
    meter.on_train_batch_end(None, None, None, batch, 1)  # t=2.5
    meter.on_validation_start(None, None)  # the gap that holds validation is not counted
    meter.on_train_batch_start(None, None, batch, 2)  # t=10
    meter.on_train_batch_end(None, None, None, batch, 2)  # t=20: 10 s
    meter.on_train_batch_start(None, None, batch, 3)  # t=20.5
    meter.on_train_batch_end(None, None, None, batch, 3)  # t=21.5
    assert meter.images == 16 and meter.seconds == pytest.approx(1 + 0.5 + 1 + 10 + 0.5 + 1)
    assert meter.work == {
        "model": "Conv2d",
        "parameters": 8,
        "precision": "bf16-mixed",
        "accelerator": "type",
        "image_size": "8x16",
    }
    assert workload_key("finetune", meter.work, meter.batch_size) == (
        "finetune|accelerator=type|image_size=8x16|model=Conv2d|parameters=8|"
        "precision=bf16-mixed|batch=4"
    )


def test_scaling_efficiency_against_the_one_process_entry(tmp_path: Path) -> None:
    ledger = ScalingLedger(tmp_path / "throughput_ledger.json")
    figures, tags = throughput_figures(200, 10.0, 2, "k", ledger, run_id="ddp-a")
    assert figures == {
        "risk/T-03/images_per_s_per_device": 20.0,
        "risk/T-03/images_per_s": 40.0,
        "risk/T-03/devices": 2.0,
    }
    assert "no one-process figure" in tags["risk/T-03/scaling"]
    one, _ = throughput_figures(250, 10.0, 1, "k", ledger, run_id="single")
    assert one["risk/T-03/images_per_s_per_device"] == 25.0 and len(one) == 3
    figures, tags = throughput_figures(180, 10.0, 2, "k", ledger, run_id="ddp-b")
    assert figures["risk/T-03/scaling_efficiency"] == pytest.approx(18 / 25)
    assert figures["risk/T-03/speedup"] == pytest.approx(2 * 18 / 25)
    assert "run single" in tags["risk/T-03/scaling"]
    other, _ = throughput_figures(180, 10.0, 2, "other work", ledger)
    assert "risk/T-03/scaling_efficiency" not in other
    saved = json.loads(ledger.path.read_text())
    assert set(saved) == {"k", "other work"} and set(saved["k"]) == {"1", "2"}
    assert saved["k"]["2"]["run_id"] == "ddp-b"  # a rerun replaces its entry
    assert throughput_figures(0, 0.0, 1, "k", ledger) == ({}, {})


# ------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    ("risk", "match"),
    [
        ({"system_metrics": {"interval_s": -1}}, r"risk.system_metrics.interval_s=-1: expected"),
        ({"system_metrics": {"interval_s": "10"}}, r"risk.system_metrics.interval_s=10"),
        ({"system_metrics": {"every": 3}}, r"risk.system_metrics.every: unknown key"),
        (
            {"system_metrics": {"samples_before_logging": 0}},
            r"risk.system_metrics.samples_before_logging=0: expected an integer >= 1",
        ),
        ({"leak_scan": "yes"}, r"risk.leak_scan='yes': expected true or false"),
        ({"robustness": {"pgd_eps_255": [300]}}, r"risk.robustness.pgd_eps_255"),
    ],
)
def test_bad_risk_settings_name_the_key(risk: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_settings(risk)


def test_system_metrics_log_a_point_even_for_a_short_stage(tmp_path: Path) -> None:
    from training.risk.system import finish_system_metrics, settings_from, start_system_metrics

    assert settings_from({"system_metrics": {"interval_s": 0}}) is None
    client, exp = _store(tmp_path)
    run = client.create_run(exp).info.run_id
    settings = settings_from({"system_metrics": {"interval_s": 30}})
    monitor = start_system_metrics(run, f"sqlite:///{tmp_path / 'mlflow.db'}", settings, False)
    finish_system_metrics(monitor)  # well inside the first interval
    metrics = client.get_run(run).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert metrics["system/system_memory_usage_megabytes"] > 0
    history = client.get_metric_history(run, "system/system_memory_usage_megabytes")
    assert len(history) == 1
