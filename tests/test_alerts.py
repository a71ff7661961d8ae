"""Alert rules, their config, and every notifier against real loopback servers."""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from training.risk.alerts import (
    OPERATORS,
    AlertManager,
    AlertRule,
    JsonlNotifier,
    LogNotifier,
    SmtpNotifier,
    WebhookNotifier,
    evaluate,
    forget_warnings,
    load_rules,
    rules_from_config,
)
from training.risk.register import RiskConfigError, RiskRegister


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Each test is its own run: notifier warnings are said once per run (process)."""
    forget_warnings()
    yield
    forget_warnings()


ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "configs" / "risk" / "alerts.yaml"
REGISTER = ROOT / "configs" / "risk" / "register.yaml"
WEBHOOK_ENV = "SIM2REAL_SLACK_WEBHOOK_URL"


@pytest.fixture(scope="module")
def rules() -> list[AlertRule]:
    return load_rules(ALERTS)


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load(ALERTS.read_text(encoding="utf-8"))


def _rule(op: str = ">", threshold: float = 0.2, channels=("slack",)) -> AlertRule:
    return AlertRule(
        "data_drift_detected",
        "データドリフト検出",
        "risk/T-02/psi",
        op,
        threshold,
        tuple(channels),
        "weekly",
    )


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- config


def test_rules_are_the_documents_alert_table(rules):
    """Section 5.2 (plus section 4's PSI > 0.25), rule by rule."""
    table = {(r.name_ja, r.metric, r.op, r.threshold, r.channels, r.frequency) for r in rules}
    assert table == {
        ("モデル精度低下", "risk/T-01/accuracy", "<", 0.85, ("slack", "email"), "realtime"),
        ("データドリフト検出", "risk/T-02/psi", ">", 0.2, ("slack",), "weekly"),
        ("データドリフト（再学習推奨）", "risk/T-02/psi", ">", 0.25, ("slack",), "weekly"),
        ("GPU使用率高", "risk/T-04/gpu_utilization", ">", 0.8, ("slack",), "realtime"),
        ("推論レイテンシ超過", "risk/T-06/latency_p95_ms", ">", 100.0, ("slack",), "realtime"),
        ("コスト超過", "risk/O-01/daily_cost_ratio", ">", 1.2, ("email",), "daily"),
        ("学習ジョブ失敗", "risk/T-05/job_failed", ">=", 1.0, ("slack", "email"), "realtime"),
        # not in the document's table: the project's S-05 rule (issue 14)
        ("敵対的頑健性の低下", "risk/S-05/max_drop_share", ">", 0.5, ("slack",), "realtime"),
        # the project's T-07, S-01, S-02 and O-02 rules (issue 14)
        ("デプロイ失敗", "risk/O-02/deployable", "<", 1.0, ("slack", "email"), "realtime"),
        ("データ整合性未検証", "risk/T-07/unverified", ">", 0.0, ("slack",), "realtime"),
        ("認証情報の漏洩", "risk/S-01/leaks_found", ">", 0.0, ("slack", "email"), "realtime"),
        (
            "認証情報の露出（不正アクセス）",
            "risk/S-02/leaks_found",
            ">",
            0.0,
            ("slack", "email"),
            "realtime",
        ),
    }


def test_rule_thresholds_agree_with_the_register(rules):
    register = RiskRegister.load(REGISTER)
    for rule in rules:
        assert rule.risk_id in register
        stated = register.get(rule.risk_id).thresholds
        if stated:
            assert rule.threshold in stated.values(), rule.name


def _error(data: dict, tmp_path: Path) -> str:
    path = tmp_path / "alerts.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(RiskConfigError) as info:
        AlertManager.load(path, tmp_path)
    assert str(path) in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("threshold", "0.85", r"rules\[0\]\.threshold: expected a number, got str"),
        ("threshold", True, r"rules\[0\]\.threshold: expected a number, got bool"),
        ("threshold", None, r"rules\[0\]\.threshold"),
        ("op", "=>", r"rules\[0\]\.op: unknown operator '=>'"),
        ("op", "lt", r"rules\[0\]\.op"),
        ("metric", "accuracy", r"rules\[0\]\.metric: expected 'risk/<ID>/<metric>'"),
        ("metric", "risk/T-42/accuracy", r"rules\[0\]\.metric: unknown risk id 'T-42'"),
        ("channels", ["pager"], r"rules\[0\]\.channels: unknown channel 'pager'"),
        ("channels", "slack", r"rules\[0\]\.channels: expected a non-empty list"),
        ("frequency", "hourly", r"rules\[0\]\.frequency"),
        ("colour", "red", r"rules\[0\]: unknown key\(s\) colour"),
    ],
)
def test_bad_rule_names_file_and_key(raw, tmp_path, key, value, expected):
    raw["rules"][0][key] = value
    assert re.search(expected, _error(raw, tmp_path))


def test_other_config_errors(raw, tmp_path):
    dup = copy.deepcopy(raw)
    dup["rules"].append(copy.deepcopy(dup["rules"][0]))
    assert "duplicate rule 'model_accuracy_drop'" in _error(dup, tmp_path)
    missing = copy.deepcopy(raw)
    del missing["rules"][1]["threshold"]
    assert re.search(r"rules\[1\]: missing key\(s\) threshold", _error(missing, tmp_path))
    bad_channel = copy.deepcopy(raw)
    bad_channel["notifiers"]["pager"] = []
    assert "notifiers.pager: unknown channel" in _error(bad_channel, tmp_path)
    bad_type = copy.deepcopy(raw)
    bad_type["notifiers"]["slack"][0]["type"] = "teams"
    assert "notifiers.slack[0].type: unknown notifier 'teams'" in _error(bad_type, tmp_path)
    bad_timeout = copy.deepcopy(raw)
    bad_timeout["notifiers"]["slack"][0]["timeout_s"] = "5"
    assert "notifiers.slack[0].timeout_s" in _error(bad_timeout, tmp_path)
    assert "rules: expected a list" in _error({"rule": []}, tmp_path)


# --------------------------------------------------------------------------- evaluation

# (metric, value, fires) around every threshold of the document, both sides and equality.
AROUND = [
    ("risk/S-05/max_drop_share", 0.51, True),
    ("risk/S-05/max_drop_share", 0.5, False),
    ("risk/T-01/accuracy", 0.849, True),
    ("risk/T-01/accuracy", 0.85, False),  # "< 85%": exactly 85% is fine
    ("risk/T-01/accuracy", 0.851, False),
    ("risk/T-04/gpu_utilization", 0.79, False),
    ("risk/T-04/gpu_utilization", 0.8, False),  # "> 80%"
    ("risk/T-04/gpu_utilization", 0.81, True),
    ("risk/T-06/latency_p95_ms", 99.9, False),
    ("risk/T-06/latency_p95_ms", 100, False),
    ("risk/T-06/latency_p95_ms", 100.1, True),
    ("risk/O-01/daily_cost_ratio", 1.19, False),
    ("risk/O-01/daily_cost_ratio", 1.2, False),
    ("risk/O-01/daily_cost_ratio", 1.21, True),
    ("risk/T-05/job_failed", 0, False),
    ("risk/T-05/job_failed", 1, True),  # ">= 1": a failed job is exactly 1
    ("risk/T-05/job_failed", True, True),
]


@pytest.mark.parametrize(("metric", "value", "fires"), AROUND)
def test_rules_around_thresholds(rules, metric, value, fires):
    alerts = evaluate(rules, {metric: value})
    assert len(alerts) == 1
    assert alerts[0].fired is fires
    assert alerts[0].value == float(value)
    assert alerts[0].risk_id == metric.split("/")[1]


@pytest.mark.parametrize(
    ("psi", "fired"),
    [
        (0.19, []),
        (0.2, []),
        (0.21, ["data_drift_detected"]),
        (0.25, ["data_drift_detected"]),
        (0.26, ["data_drift_detected", "data_drift_severe"]),
    ],
)
def test_two_drift_levels(rules, psi, fired):
    alerts = evaluate(rules, {"risk/T-02/psi": psi})
    assert [a.rule.name for a in alerts if a.fired] == fired


@pytest.mark.parametrize(
    ("op", "below", "equal", "above"),
    [
        ("<", True, False, False),
        ("<=", True, True, False),
        (">", False, False, True),
        (">=", False, True, True),
        ("==", False, True, False),
    ],
)
def test_each_operator_at_equality(op, below, equal, above):
    assert set(OPERATORS) == {"<", "<=", ">", ">=", "=="}
    rule = _rule(op=op, threshold=0.5)
    got = [evaluate([rule], {rule.metric: v})[0].fired for v in (0.4, 0.5, 0.6)]
    assert got == [below, equal, above]


def test_missing_nan_and_non_numbers_skip(rules):
    assert evaluate(rules, {}) == []
    assert evaluate(rules, {"risk/T-01/accuracy": math.nan}) == []
    assert evaluate(rules, {"risk/T-01/accuracy": None, "risk/T-02/psi": "high"}) == []
    assert evaluate(rules, {"val/real/accuracy": 0.1}) == []


def test_message_is_english_with_the_japanese_name(rules):
    (alert,) = evaluate(rules, {"risk/T-01/accuracy": 0.8})
    assert alert.fired
    assert alert.message.startswith("[T-01] model accuracy drop (モデル精度低下)")
    assert "risk/T-01/accuracy = 0.8 < 0.85" in alert.message


# --------------------------------------------------------------------------- notifiers


def test_jsonl_appends_one_object_per_fired_alert(rules, tmp_path):
    path = tmp_path / "sub" / "alerts.jsonl"
    manager = AlertManager(rules, always=[JsonlNotifier(path)])
    manager.process({"risk/T-01/accuracy": 0.8, "risk/T-04/gpu_utilization": 0.5})
    manager.process({"risk/T-02/psi": 0.3})
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["rule"] for r in records] == [
        "model_accuracy_drop",
        "data_drift_detected",
        "data_drift_severe",
    ]
    first = records[0]
    assert first["risk_id"] == "T-01" and first["name_ja"] == "モデル精度低下"
    assert first["value"] == 0.8 and first["threshold"] == 0.85 and first["fired"] is True
    assert first["channels"] == ["slack", "email"] and "time" in first
    assert manager.failures == []


def test_log_notifier(rules, caplog):
    with caplog.at_level(logging.WARNING, logger="training.risk.alerts"):
        AlertManager(rules, always=[LogNotifier()]).process({"risk/T-05/job_failed": 1})
    assert "ALERT [T-05]" in caplog.text and "学習ジョブ失敗" in caplog.text


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((self.path, self.headers["Content-Type"], body))
        status = 500 if self.path.endswith("/broken") else 200
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture()
def webhook_server() -> Iterator[HTTPServer]:
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    server.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_webhook_posts_slack_payload(rules, webhook_server, monkeypatch, tmp_path):
    port = webhook_server.server_address[1]
    monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:{port}/services/T000/SECRET")
    hook = WebhookNotifier(timeout_s=2)
    assert hook.enabled
    manager = AlertManager(rules, {"slack": [hook], "email": [hook]}, always=[])
    manager.process({"risk/T-01/accuracy": 0.5})  # slack and email: the same hook sends once
    assert manager.failures == []
    assert len(webhook_server.received) == 1
    path, content_type, body = webhook_server.received[0]
    assert path == "/services/T000/SECRET" and content_type.startswith("application/json")
    payload = json.loads(body)
    assert payload["text"].startswith("[T-01] model accuracy drop (モデル精度低下)")
    assert payload["blocks"][0] == {
        "type": "header",
        "text": {"type": "plain_text", "text": "T-01: モデル精度低下"},
    }
    assert payload["blocks"][1]["text"]["text"] == payload["text"]
    assert "risk/T-01/accuracy" in payload["blocks"][2]["elements"][0]["text"]


def test_webhook_http_error_is_a_failure_without_the_url(
    rules, webhook_server, monkeypatch, caplog
):
    port = webhook_server.server_address[1]
    monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:{port}/SECRET/broken")
    manager = AlertManager(rules, {"slack": [WebhookNotifier(timeout_s=2)]}, always=[])
    with caplog.at_level(logging.ERROR):
        alerts = manager.process({"risk/T-02/psi": 0.21})
    assert [a.fired for a in alerts] == [True, False]
    (failure,) = manager.failures
    assert failure.notifier == "webhook" and failure.risk_id == "T-02"
    assert "500" in failure.error
    assert "SECRET" not in failure.error and "SECRET" not in caplog.text


def test_unreachable_webhook_is_recorded_not_raised(rules, monkeypatch, tmp_path):
    monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:{_closed_port()}/hook")
    jsonl = JsonlNotifier(tmp_path / "alerts.jsonl")
    manager = AlertManager(
        rules, {"slack": [WebhookNotifier(timeout_s=2)]}, always=[LogNotifier(), jsonl]
    )
    start = time.monotonic()
    alerts = manager.process({"risk/T-06/latency_p95_ms": 250.0})
    assert time.monotonic() - start < 2.5  # within the notifier's timeout
    assert alerts[0].fired
    assert [f.notifier for f in manager.failures] == ["webhook"]
    assert "refused" in manager.failures[0].error.lower()
    # The other channels still got the alert.
    assert len((tmp_path / "alerts.jsonl").read_text(encoding="utf-8").splitlines()) == 1


def test_missing_env_disables_with_one_warning(rules, monkeypatch, caplog):
    monkeypatch.delenv(WEBHOOK_ENV, raising=False)
    with caplog.at_level(logging.WARNING):
        hook = WebhookNotifier()
    assert not hook.enabled
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and WEBHOOK_ENV in warnings[0].getMessage()
    manager = AlertManager(rules, {"slack": [hook]}, always=[])
    assert manager.process({"risk/T-01/accuracy": 0.1})[0].fired
    assert manager.failures == []

    monkeypatch.delenv("SMTP_TEST_USER", raising=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        smtp = SmtpNotifier(
            "127.0.0.1",
            25,
            "a@localhost",
            ["b@localhost"],
            user_env="SMTP_TEST_USER",
            password_env="SMTP_TEST_PASSWORD",
        )
    assert not smtp.enabled
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


class _SmtpHandler(socketserver.StreamRequestHandler):
    """Just enough SMTP for smtplib: greeting, EHLO, MAIL, RCPT, DATA, QUIT."""

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        self.reply("220 localhost test SMTP")
        envelope = {"rcpt": []}
        while line := self.rfile.readline():
            command = line.decode().strip()
            verb = command[:4].upper()
            if verb in ("EHLO", "HELO"):
                self.reply("250 localhost")
            elif verb == "MAIL":
                envelope["from"] = command
                self.reply("250 OK")
            elif verb == "RCPT":
                envelope["rcpt"].append(command)
                self.reply("250 OK")
            elif verb == "DATA":
                self.reply("354 end with .")
                data = b""
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    data += chunk
                envelope["data"] = data
                self.server.messages.append(envelope)
                self.reply("250 OK queued")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("502 not implemented")


@pytest.fixture()
def smtp_server() -> Iterator[socketserver.ThreadingTCPServer]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SmtpHandler)
    server.daemon_threads = True
    server.messages = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_smtp_sends_mail(rules, smtp_server):
    port = smtp_server.server_address[1]
    smtp = SmtpNotifier(
        "127.0.0.1", port, "sim@localhost", ["ops@localhost", "ml@localhost"], timeout_s=2
    )
    manager = AlertManager(rules, {"email": [smtp]}, always=[])
    manager.process({"risk/O-01/daily_cost_ratio": 1.5})
    assert manager.failures == []
    (envelope,) = smtp_server.messages
    assert "sim@localhost" in envelope["from"]
    assert len(envelope["rcpt"]) == 2
    mail = message_from_bytes(envelope["data"])
    assert "O-01" in str(mail["Subject"])
    body = mail.get_payload(decode=True).decode("utf-8")
    assert "daily_cost_ratio = 1.5 > 1.2" in body


def test_smtp_refused_is_recorded_not_raised(rules):
    smtp = SmtpNotifier("127.0.0.1", _closed_port(), "a@localhost", ["b@localhost"], timeout_s=2)
    manager = AlertManager(rules, {"email": [smtp]}, always=[])
    alerts = manager.process({"risk/T-05/job_failed": 1.0})
    assert alerts[0].fired
    assert [(f.notifier, f.rule) for f in manager.failures] == [("smtp", "training_job_failed")]
    assert manager.failures[0].to_dict()["risk_id"] == "T-05"


def test_from_config_end_to_end(webhook_server, smtp_server, monkeypatch, tmp_path):
    """The shipped config, pointed at loopback servers through the environment."""
    cfg = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    cfg["notifiers"]["email"][0]["port"] = smtp_server.server_address[1]
    monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:{webhook_server.server_address[1]}/h")
    monkeypatch.setenv("SIM2REAL_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("SIM2REAL_ALERT_EMAIL_TO", "ops@localhost, ml@localhost")
    manager = AlertManager.from_config(cfg, tmp_path)
    start = len(manager.failures)
    alerts = manager.process({"risk/T-05/job_failed": 1, "risk/T-01/accuracy": 0.99})
    assert [a.fired for a in alerts] == [False, True]
    assert manager.failures_since(start) == []
    assert len(webhook_server.received) == 1  # slack
    assert len(smtp_server.messages) == 1  # email
    assert len(smtp_server.messages[0]["rcpt"]) == 2
    lines = (tmp_path / "alerts.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["rule"] == "training_job_failed"


def test_from_config_without_environment_is_quiet(monkeypatch, tmp_path, caplog):
    for var in (WEBHOOK_ENV, "SIM2REAL_SMTP_HOST", "SIM2REAL_ALERT_EMAIL_TO"):
        monkeypatch.delenv(var, raising=False)
    with caplog.at_level(logging.WARNING):
        manager = AlertManager.load(ALERTS, tmp_path)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2  # one each
    manager.process({"risk/T-05/job_failed": 1})
    assert manager.failures == []
    assert (tmp_path / "alerts.jsonl").exists()


def test_from_config_accepts_omegaconf(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ALERTS)
    # the 7 of section 5.2 and the project's S-05, T-07, S-01, S-02 and O-02 rules
    assert len(rules_from_config(cfg)) == len(OmegaConf.to_container(cfg)["rules"]) == 12
    assert isinstance(AlertManager.from_config(cfg, tmp_path), AlertManager)


# --------------------------------------------------------------------------- deadlines

DEADLINE = 1.0  # seconds: the notifiers' total deadline in these tests
MARGIN = 1.0  # what a loaded 2-core machine may add (thread start, logging, the grace)


class _TrickleHandler(BaseHTTPRequestHandler):
    """Answers a POST slowly: the status line and headers (mode "body") or the status line
    alone (mode "headers") at once, then one byte every 0.5 s -- each read of the client
    gets data well within a 5 s per-read timeout, so only a total deadline ends it."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append(self.path)
        if self.server.mode == "headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            rest = b"X-Slow: " + b"a" * 200 + b"\r\n\r\nok"
        else:
            self.send_response(200)
            self.send_header("Content-Length", "200")
            self.end_headers()
            rest = b"o" * 200
        self.wfile.flush()
        for byte in rest:
            if self.server.stop.wait(0.5):
                return
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:  # the client shut the connection down: it gave up
                self.server.hung_up.append(time.monotonic())
                return

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(params=["body", "headers"])
def trickle_server(request) -> Iterator[HTTPServer]:
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), _TrickleHandler)
    server.daemon_threads = True
    server.mode = request.param
    server.received, server.hung_up = [], []
    server.stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop.set()
    server.shutdown()
    server.server_close()


def _alert_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("alert-") and t.is_alive()]


def _wait_until(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_trickling_webhook_is_cut_at_its_total_deadline(
    rules, trickle_server, monkeypatch, tmp_path, caplog
):
    """The reported hang: headers, then a byte every so often, held the first alert for
    minutes. Now the whole request has one deadline; the call returns within it, the
    failure is recorded and logged without the URL, and the worker thread ends too."""
    port = trickle_server.server_address[1]
    monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:{port}/services/T000/SECRET")
    jsonl = JsonlNotifier(tmp_path / "alerts.jsonl")
    hook = WebhookNotifier(timeout_s=DEADLINE)
    manager = AlertManager(rules, {"slack": [hook]}, always=[LogNotifier(), jsonl])
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="training.risk.alerts"):
        alerts = manager.process({"risk/T-06/latency_p95_ms": 250.0})
    elapsed = time.monotonic() - start
    assert alerts[0].fired
    assert trickle_server.received == ["/services/T000/SECRET"]  # it did reach the server
    assert DEADLINE * 0.9 <= elapsed < DEADLINE + MARGIN
    (failure,) = manager.failures
    assert (failure.notifier, failure.rule) == ("webhook", "inference_latency_exceeded")
    assert failure.error.startswith("DeadlineExceeded") and "deadline" in failure.error
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("notifier webhook" in w and "deadline" in w for w in warnings), warnings
    assert "SECRET" not in caplog.text and "SECRET" not in failure.error
    # the local channels still recorded the alert
    assert len((tmp_path / "alerts.jsonl").read_text(encoding="utf-8").splitlines()) == 1
    # the connection was shut down at the deadline: no thread is left hanging on it
    assert _wait_until(lambda: not _alert_threads(), 3.0), _alert_threads()
    assert _wait_until(lambda: trickle_server.hung_up, 3.0)


def test_a_slow_webhook_does_not_hold_back_a_fast_one(
    rules, trickle_server, webhook_server, monkeypatch
):
    monkeypatch.setenv("SLOW_HOOK", f"http://127.0.0.1:{trickle_server.server_address[1]}/s")
    monkeypatch.setenv("FAST_HOOK", f"http://127.0.0.1:{webhook_server.server_address[1]}/f")
    slow = WebhookNotifier("SLOW_HOOK", timeout_s=DEADLINE)
    fast = WebhookNotifier("FAST_HOOK", timeout_s=DEADLINE)
    manager = AlertManager(rules, {"slack": [slow, fast]}, always=[])
    start = time.monotonic()
    manager.process({"risk/T-01/accuracy": 0.5})
    assert time.monotonic() - start < DEADLINE + MARGIN
    assert [f.notifier for f in manager.failures] == ["webhook"]  # the slow one
    ((path, _, body),) = webhook_server.received
    assert path == "/f"
    assert json.loads(body)["text"].startswith("[T-01] model accuracy drop")


def test_several_alerts_to_a_hung_notifier_cost_one_deadline(rules, trickle_server, monkeypatch):
    monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:{trickle_server.server_address[1]}/h")
    manager = AlertManager(rules, {"slack": [WebhookNotifier(timeout_s=DEADLINE)]}, always=[])
    start = time.monotonic()
    alerts = manager.process({"risk/T-02/psi": 0.3})  # two rules fire
    assert time.monotonic() - start < DEADLINE + MARGIN
    assert [a.fired for a in alerts] == [True, True]
    assert [f.rule for f in manager.failures] == ["data_drift_detected", "data_drift_severe"]
    assert "skipped" in manager.failures[1].error


class _TrickleSmtp(socketserver.StreamRequestHandler):
    """An SMTP server that sends its greeting one byte every 0.5 s."""

    def handle(self) -> None:
        for byte in b"220 " + b"x" * 100 + b"\r\n":
            if self.server.stop.wait(0.5):
                return
            try:
                self.wfile.write(bytes([byte]))
            except OSError:
                return


def test_trickling_smtp_server_is_cut_at_its_total_deadline(rules):
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _TrickleSmtp)
    server.daemon_threads = True
    server.stop = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        smtp = SmtpNotifier(
            "127.0.0.1", server.server_address[1], "a@localhost", ["b@localhost"], timeout_s=1
        )
        manager = AlertManager(rules, {"email": [smtp]}, always=[])
        start = time.monotonic()
        manager.process({"risk/O-01/daily_cost_ratio": 1.5})
        assert time.monotonic() - start < DEADLINE + MARGIN
        (failure,) = manager.failures
        assert failure.notifier == "smtp" and failure.error.startswith("DeadlineExceeded")
        assert _wait_until(lambda: not _alert_threads(), 3.0), _alert_threads()
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()


class _Hung:
    """A third-party notifier whose send blocks until released: only the manager's
    deadline can bound it."""

    name = "pager"
    enabled = True
    timeout_s = 0.5

    def __init__(self) -> None:
        self.release = threading.Event()
        self.sent = []

    def send(self, alert) -> None:
        self.release.wait()
        self.sent.append(alert.rule.name)


def test_any_notifier_is_bounded_and_a_stuck_one_is_not_piled_on(rules, tmp_path):
    hung = _Hung()
    jsonl = JsonlNotifier(tmp_path / "alerts.jsonl")
    manager = AlertManager(rules, {"slack": [hung]}, always=[jsonl])
    try:
        start = time.monotonic()
        manager.process({"risk/T-05/job_failed": 1})
        assert time.monotonic() - start < hung.timeout_s + MARGIN
        assert [f.notifier for f in manager.failures] == ["pager"]
        # still stuck: the next call skips it at once, without another thread behind it
        start = time.monotonic()
        manager.process({"risk/T-05/job_failed": 1})
        assert time.monotonic() - start < MARGIN
        assert "still busy" in manager.failures[1].error
        assert len([t for t in _alert_threads() if t.name.startswith("alert-pager")]) == 1
        assert len((tmp_path / "alerts.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    finally:
        hung.release.set()
    assert _wait_until(lambda: not _alert_threads(), 3.0)
    manager.process({"risk/T-05/job_failed": 1})  # released: delivers again
    assert hung.sent[-1] == "training_job_failed" and len(manager.failures) == 2


def test_a_hung_send_does_not_hold_up_the_end_of_the_process(tmp_path):
    """A send that never returns is abandoned in a daemon thread: the process exits."""
    import subprocess
    import sys

    script = tmp_path / "hang.py"
    script.write_text(
        "import threading, time\n"
        "from training.risk.alerts import AlertManager, load_rules\n"
        "class Hung:\n"
        "    name, enabled, timeout_s = 'pager', True, 0.5\n"
        "    def send(self, alert):\n"
        "        threading.Event().wait()\n"
        f"manager = AlertManager(load_rules({str(ALERTS)!r}), {{'slack': [Hung()]}}, always=[])\n"
        "start = time.monotonic()\n"
        "manager.process({'risk/T-05/job_failed': 1})\n"
        "print(round(time.monotonic() - start, 2), len(manager.failures))\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    seconds, failures = done.stdout.split()
    assert float(seconds) < 0.5 + MARGIN and failures == "1"


def test_timeout_must_be_positive(raw, tmp_path):
    raw["notifiers"]["slack"][0]["timeout_s"] = 0
    assert "notifiers.slack[0].timeout_s: expected a positive number" in _error(raw, tmp_path)
    with pytest.raises(ValueError, match="timeout_s"):
        WebhookNotifier(timeout_s=-1)


def test_notifier_disabled_is_said_once_per_run(monkeypatch, tmp_path, caplog):
    """Every stage builds its alert manager; the "disabled" warnings come once per run."""
    for var in (WEBHOOK_ENV, "SIM2REAL_SMTP_HOST", "SIM2REAL_ALERT_EMAIL_TO"):
        monkeypatch.delenv(var, raising=False)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            AlertManager.load(ALERTS, tmp_path)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 2 and len(set(said)) == 2, said
