"""Alert rules of ``shared/risk-matrix.md`` section 5.2, their evaluation and notifiers.

A rule watches one metric named ``risk/<ID>/<metric>`` and fires when
``value <op> threshold`` holds. :func:`evaluate` is pure; :class:`AlertManager` sends the
fired alerts to the notifiers of each rule's channels (``slack``, ``email``) and to the
``always`` notifiers (log, JSONL). A failing notifier never stops training: its failure
is logged and kept in :attr:`AlertManager.failures` for the caller to log to MLflow.

Secrets (webhook URL, SMTP user/password, addresses) are read from the environment, never
from config, and never written to logs or failures.

Example::

    manager = AlertManager.load("configs/risk/alerts.yaml", output_dir="outputs/run")
    alerts = manager.process({"risk/T-02/psi": 0.31})
    [a.message for a in alerts if a.fired]
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import smtplib
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Protocol

from training.risk.register import (
    KNOWN_IDS,
    RiskConfigError,
    check_keys,
    check_threshold,
    read_yaml,
)

log = logging.getLogger(__name__)

OPERATORS: Mapping[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
}
CHANNELS: tuple[str, ...] = ("slack", "email")
FREQUENCIES: tuple[str, ...] = ("realtime", "daily", "weekly", "monthly", "quarterly")


@dataclass(frozen=True)
class AlertRule:
    """One alert: fires when ``metrics[metric] <op> threshold``.

    ``metric`` follows ``risk/<ID>/<metric>``; the risk id is taken from it.
    """

    name: str
    name_ja: str
    metric: str
    op: str
    threshold: float
    channels: tuple[str, ...]
    frequency: str = "realtime"
    description: str = ""

    @property
    def risk_id(self) -> str:
        """The register id in the metric name (``risk/T-02/psi`` -> ``T-02``)."""
        return self.metric.split("/")[1]

    def holds(self, value: float) -> bool:
        """Whether ``value <op> threshold`` (the alert condition) is true."""
        return OPERATORS[self.op](value, self.threshold)


@dataclass(frozen=True)
class Alert:
    """A rule evaluated on one value. ``fired`` is True when the condition held."""

    rule: AlertRule
    value: float
    fired: bool
    message: str

    @property
    def risk_id(self) -> str:
        """The register id the alert belongs to."""
        return self.rule.risk_id

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record of the alert."""
        return {
            "rule": self.rule.name,
            "name_ja": self.rule.name_ja,
            "risk_id": self.risk_id,
            "metric": self.rule.metric,
            "op": self.rule.op,
            "threshold": self.rule.threshold,
            "value": self.value,
            "fired": self.fired,
            "channels": list(self.rule.channels),
            "frequency": self.rule.frequency,
            "message": self.message,
        }


def _message(rule: AlertRule, value: float, fired: bool) -> str:
    """English text with the document's Japanese name, e.g. for Slack and e-mail."""
    title = rule.name.replace("_", " ")
    relation = rule.op if fired else "not " + rule.op
    text = (
        f"[{rule.risk_id}] {title} ({rule.name_ja}): "
        f"{rule.metric} = {value:g} {relation} {rule.threshold:g}"
    )
    if fired and rule.description:
        text += f" - {rule.description}"
    return text


def evaluate(rules: Iterable[AlertRule], metrics: Mapping[str, Any]) -> list[Alert]:
    """Evaluate every rule whose metric has a value; pure.

    Args:
        rules: the alert rules.
        metrics: metric name -> number (float, int, bool, numpy or 0-d tensor).

    Returns:
        One :class:`Alert` per rule with a usable value, fired or not, in rule order. A
        metric that is missing, NaN or not a number skips its rule: no data is not an alarm.
    """
    alerts = []
    for rule in rules:
        raw = metrics.get(rule.metric)
        if raw is None or isinstance(raw, (str, bytes)):
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError):
            continue
        if math.isnan(value):
            continue
        fired = rule.holds(value)
        alerts.append(Alert(rule, value, fired, _message(rule, value, fired)))
    return alerts


# --------------------------------------------------------------------------- notifiers


class Notifier(Protocol):
    """Sends one fired alert somewhere; raises on failure (the manager catches it)."""

    name: str
    enabled: bool

    def send(self, alert: Alert) -> None: ...


class LogNotifier:
    """Python logging, at WARNING: always available, the floor under every other channel."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.name = "log"
        self.enabled = True
        self._log = logger or log

    def send(self, alert: Alert) -> None:
        self._log.warning("ALERT %s", alert.message)


class JsonlNotifier:
    """Appends one JSON object per alert to ``path`` (created with its folder if needed).

    Each record is written with a single ``write`` in append mode, then flushed and
    fsynced, so a crash leaves whole lines and concurrent writers do not interleave lines.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = "jsonl"
        self.enabled = True
        self.path = Path(path)

    def send(self, alert: Alert) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **alert.to_dict()}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _env(var: str | None, who: str) -> str | None:
    """The variable's value, or None with one warning (the notifier is then disabled)."""
    value = os.environ.get(var) if var else None
    if var and not value:
        log.warning("%s notifier disabled: environment variable %s is not set", who, var)
        return None
    return value


class WebhookNotifier:
    """Posts a Slack-compatible payload (``{"text", "blocks"}``) to a webhook URL.

    The URL is a secret: it is read from ``url_env`` and never logged; errors that could
    echo it are redacted.
    """

    def __init__(self, url_env: str = "SIM2REAL_SLACK_WEBHOOK_URL", timeout_s: float = 5.0) -> None:
        self.name = "webhook"
        self.url_env = url_env
        self.timeout_s = float(timeout_s)
        self._url = _env(url_env, "webhook")
        self.enabled = self._url is not None

    @staticmethod
    def payload(alert: Alert) -> dict[str, Any]:
        """Slack incoming-webhook body: plain ``text`` fallback plus Block Kit blocks."""
        rule = alert.rule
        return {
            "text": alert.message,
            "blocks": [
                {
                    "type": "header",
                    "text": {"type": "plain_text", "text": f"{rule.risk_id}: {rule.name_ja}"},
                },
                {"type": "section", "text": {"type": "mrkdwn", "text": alert.message}},
                {
                    "type": "context",
                    "elements": [
                        {
                            "type": "mrkdwn",
                            "text": f"`{rule.metric}` {rule.op} {rule.threshold:g} | "
                            f"frequency: {rule.frequency}",
                        }
                    ],
                },
            ],
        }

    def send(self, alert: Alert) -> None:
        if self._url is None:
            return
        request = urllib.request.Request(
            self._url,
            data=json.dumps(self.payload(alert)).encode("utf-8"),
            headers={"Content-Type": "application/json; charset=utf-8"},
            method="POST",
        )
        try:
            # urlopen raises HTTPError on 4xx/5xx, so reaching the end means delivered.
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
        except Exception as err:
            raise RuntimeError(str(err).replace(self._url, "<webhook url>")) from None


class SmtpNotifier:
    """Sends each alert as a plain-text e-mail through an SMTP server.

    Login happens only when ``user_env`` is given; if it (or ``password_env``) is given but
    unset in the environment, the notifier is disabled with one warning.
    """

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        recipients: Sequence[str],
        user_env: str | None = None,
        password_env: str | None = None,
        starttls: bool = False,
        timeout_s: float = 10.0,
    ) -> None:
        self.name = "smtp"
        self.host, self.port = host, int(port)
        self.sender, self.recipients = sender, list(recipients)
        self.starttls, self.timeout_s = bool(starttls), float(timeout_s)
        # Credentials are optional (a local relay needs none), but a named variable that is
        # unset means a misconfigured login: disable rather than send unauthenticated.
        missing = [v for v in (user_env, password_env) if v and not os.environ.get(v)]
        self._user = os.environ.get(user_env) if user_env else None
        self._password = os.environ.get(password_env) if password_env else None
        self.enabled = not missing
        if missing:
            log.warning(
                "smtp notifier disabled: environment variable(s) %s not set", ", ".join(missing)
            )

    def send(self, alert: Alert) -> None:
        if not self.enabled:
            return
        message = EmailMessage()
        message["Subject"] = f"[sim2real-drive] {alert.risk_id} {alert.rule.name_ja}"
        message["From"] = self.sender
        message["To"] = ", ".join(self.recipients)
        message.set_content(alert.message + "\n\n" + json.dumps(alert.to_dict(), indent=2))
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout_s) as smtp:
            if self.starttls:
                smtp.starttls()
            if self._user is not None:
                smtp.login(self._user, self._password or "")
            smtp.send_message(message)


# --------------------------------------------------------------------------- manager


@dataclass(frozen=True)
class NotifierFailure:
    """One notifier that could not deliver one alert (secrets already redacted)."""

    notifier: str
    rule: str
    risk_id: str
    error: str

    def to_dict(self) -> dict[str, str]:
        return {
            "notifier": self.notifier,
            "rule": self.rule,
            "risk_id": self.risk_id,
            "error": self.error,
        }


@dataclass
class AlertManager:
    """Evaluates rules and dispatches fired alerts; never raises because a channel is down.

    Args:
        rules: the alert rules.
        notifiers: channel name -> notifiers for the rules that list that channel.
        always: notifiers every fired alert goes to (default: a :class:`LogNotifier`;
            :meth:`from_config` adds a :class:`JsonlNotifier` in the output folder).
    """

    rules: Sequence[AlertRule]
    notifiers: Mapping[str, Sequence[Notifier]] = field(default_factory=dict)
    always: Sequence[Notifier] | None = None
    failures: list[NotifierFailure] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.always is None:
            self.always = [LogNotifier()]

    def process(self, metrics: Mapping[str, Any]) -> list[Alert]:
        """Evaluate ``metrics`` and notify for every fired alert.

        Returns every evaluated alert (fired or not). Delivery failures are logged and
        appended to :attr:`failures` (cumulative; see :meth:`failures_since`).
        """
        alerts = evaluate(self.rules, metrics)
        for alert in alerts:
            if alert.fired:
                self._dispatch(alert)
        return alerts

    def failures_since(self, start: int) -> list[NotifierFailure]:
        """Failures recorded after the first ``start`` ones (``len(failures)`` before)."""
        return self.failures[start:]

    def _dispatch(self, alert: Alert) -> None:
        targets: list[Notifier] = list(self.always or [])
        for channel in alert.rule.channels:
            targets.extend(self.notifiers.get(channel, []))
        seen: set[int] = set()
        for notifier in targets:
            # A notifier listed for two channels (or also in `always`) sends once.
            if id(notifier) in seen or not notifier.enabled:
                continue
            seen.add(id(notifier))
            try:
                notifier.send(alert)
            except Exception as err:  # any channel error: record it, keep training
                failure = NotifierFailure(
                    notifier.name, alert.rule.name, alert.risk_id, f"{type(err).__name__}: {err}"
                )
                self.failures.append(failure)
                log.error(
                    "alert %s not delivered by %s: %s",
                    alert.rule.name,
                    notifier.name,
                    failure.error,
                )

    @classmethod
    def load(cls, path: str | Path, output_dir: str | Path) -> AlertManager:
        """Read ``configs/risk/alerts.yaml``-style YAML and build the manager."""
        path = Path(path)
        return cls.from_config(read_yaml(path, "alert config"), output_dir, source=str(path))

    @classmethod
    def from_config(
        cls, cfg: Any, output_dir: str | Path, source: str = "<alerts config>"
    ) -> AlertManager:
        """Build from a parsed mapping (dict or DictConfig) with ``rules``, ``notifiers``
        and ``jsonl`` (file name inside ``output_dir``; null for none)."""
        cfg = _plain(cfg)
        if not isinstance(cfg, Mapping):
            raise RiskConfigError(f"{source}: expected a mapping with a 'rules' list")
        rules = rules_from_config(cfg, source)
        notifiers = _notifiers_from_config(cfg.get("notifiers") or {}, source)
        always: list[Notifier] = [LogNotifier()]
        if cfg.get("jsonl", "alerts.jsonl"):
            always.append(JsonlNotifier(Path(output_dir) / str(cfg.get("jsonl", "alerts.jsonl"))))
        return cls(rules, notifiers, always)


def _plain(cfg: Any) -> Any:
    if hasattr(cfg, "_metadata"):  # an OmegaConf DictConfig: plain containers from here
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def load_rules(path: str | Path) -> list[AlertRule]:
    """Only the validated rules of an alert YAML file."""
    path = Path(path)
    return rules_from_config(read_yaml(path, "alert config"), str(path))


def rules_from_config(cfg: Any, source: str = "<alerts config>") -> list[AlertRule]:
    """Validate ``cfg["rules"]`` into :class:`AlertRule` s; errors name ``source`` and key."""
    cfg = _plain(cfg)
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("rules"), list):
        raise RiskConfigError(f"{source}: rules: expected a list of alert rules")
    rules, names = [], set()
    for i, raw in enumerate(cfg["rules"]):
        rule = _parse_rule(raw, f"{source}: rules[{i}]")
        if rule.name in names:
            raise RiskConfigError(f"{source}: rules[{i}].name: duplicate rule {rule.name!r}")
        names.add(rule.name)
        rules.append(rule)
    return rules


_RULE_KEYS = ("name", "name_ja", "metric", "op", "threshold", "channels")
_RULE_OPTIONAL = ("frequency", "description")


def _parse_rule(raw: Any, where: str) -> AlertRule:
    check_keys(raw, _RULE_KEYS, _RULE_OPTIONAL, where)
    for key in ("name", "name_ja", "metric"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise RiskConfigError(f"{where}.{key}: expected a non-empty string, got {raw[key]!r}")
    parts = raw["metric"].split("/")
    if len(parts) != 3 or parts[0] != "risk" or not parts[2]:
        raise RiskConfigError(
            f"{where}.metric: expected 'risk/<ID>/<metric>', got {raw['metric']!r}"
        )
    if parts[1] not in KNOWN_IDS:
        raise RiskConfigError(f"{where}.metric: unknown risk id {parts[1]!r} in {raw['metric']!r}")
    if raw["op"] not in OPERATORS:
        raise RiskConfigError(
            f"{where}.op: unknown operator {raw['op']!r}; expected one of {', '.join(OPERATORS)}"
        )
    threshold = check_threshold(raw["threshold"], f"{where}.threshold")
    channels = raw["channels"]
    if isinstance(channels, str) or not isinstance(channels, Sequence) or not channels:
        raise RiskConfigError(f"{where}.channels: expected a non-empty list, got {channels!r}")
    for channel in channels:
        if channel not in CHANNELS:
            raise RiskConfigError(
                f"{where}.channels: unknown channel {channel!r}; expected {', '.join(CHANNELS)}"
            )
    frequency = raw.get("frequency", "realtime")
    if frequency not in FREQUENCIES:
        raise RiskConfigError(
            f"{where}.frequency: expected one of {', '.join(FREQUENCIES)}, got {frequency!r}"
        )
    return AlertRule(
        name=raw["name"],
        name_ja=raw["name_ja"],
        metric=raw["metric"],
        op=raw["op"],
        threshold=threshold,
        channels=tuple(channels),
        frequency=frequency,
        description=str(raw.get("description") or ""),
    )


_WEBHOOK_KEYS = {"type", "url_env", "timeout_s"}
_SMTP_KEYS = {
    "type",
    "host",
    "host_env",
    "port",
    "sender",
    "recipients",
    "recipients_env",
    "user_env",
    "password_env",
    "starttls",
    "timeout_s",
}


def _notifiers_from_config(cfg: Any, source: str) -> dict[str, list[Notifier]]:
    """Build channel -> notifiers. Unset environment variables disable, never fail."""
    if not isinstance(cfg, Mapping):
        raise RiskConfigError(f"{source}: notifiers: expected a mapping channel -> list")
    out: dict[str, list[Notifier]] = {}
    for channel, entries in cfg.items():
        where = f"{source}: notifiers.{channel}"
        if channel not in CHANNELS:
            raise RiskConfigError(f"{where}: unknown channel; expected {', '.join(CHANNELS)}")
        if not isinstance(entries, list):
            raise RiskConfigError(f"{where}: expected a list of notifiers")
        out[channel] = []
        for i, entry in enumerate(entries):
            built = _notifier(entry, f"{where}[{i}]")
            if built is not None:
                out[channel].append(built)
    return out


def _notifier(entry: Any, where: str) -> Notifier | None:
    if not isinstance(entry, Mapping) or "type" not in entry:
        raise RiskConfigError(f"{where}: expected a mapping with a 'type' (webhook|smtp)")
    kind = entry["type"]
    allowed = {"webhook": _WEBHOOK_KEYS, "smtp": _SMTP_KEYS}.get(kind)
    if allowed is None:
        raise RiskConfigError(f"{where}.type: unknown notifier {kind!r}; expected webhook|smtp")
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise RiskConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
    timeout = entry.get("timeout_s", 5 if kind == "webhook" else 10)
    timeout = check_threshold(timeout, f"{where}.timeout_s")
    if kind == "webhook":
        return WebhookNotifier(
            url_env=entry.get("url_env", "SIM2REAL_SLACK_WEBHOOK_URL"), timeout_s=timeout
        )
    # Host and addresses may come from the environment; an unset variable disables e-mail
    # with one warning, like the webhook's URL.
    host = entry.get("host")
    recipients = entry.get("recipients")
    missing = []
    if not host and entry.get("host_env"):
        host = os.environ.get(entry["host_env"]) or None
        missing += [] if host else [entry["host_env"]]
    if recipients is None and entry.get("recipients_env"):
        value = os.environ.get(entry["recipients_env"], "")
        recipients = [r.strip() for r in value.split(",") if r.strip()] or None
        missing += [] if recipients else [entry["recipients_env"]]
    if missing:
        log.warning(
            "smtp notifier disabled: environment variable(s) %s not set", ", ".join(missing)
        )
        return None
    if not host or not recipients:
        raise RiskConfigError(
            f"{where}: needs host (or host_env) and recipients (or recipients_env)"
        )
    if isinstance(recipients, str):
        recipients = [recipients]
    port = entry.get("port", 25)
    if isinstance(port, bool) or not isinstance(port, int):
        raise RiskConfigError(f"{where}.port: expected an integer, got {port!r}")
    return SmtpNotifier(
        host=str(host),
        port=port,
        sender=str(entry.get("sender", "sim2real-drive@localhost")),
        recipients=list(recipients),
        user_env=entry.get("user_env"),
        password_env=entry.get("password_env"),
        starttls=bool(entry.get("starttls", False)),
        timeout_s=timeout,
    )
