"""Alert rules of ``shared/risk-matrix.md`` section 5.2, their evaluation and notifiers.

A rule watches one metric named ``risk/<ID>/<metric>`` and fires when
``value <op> threshold`` holds. :func:`evaluate` is pure; :class:`AlertManager` sends the
fired alerts to the notifiers of each rule's channels (``slack``, ``email``) and to the
``always`` notifiers (log, JSONL). A failing notifier never stops training: its failure
is logged and kept in :attr:`AlertManager.failures` for the caller to log to MLflow.

Every notifier has a total deadline, ``timeout_s`` (the whole request, not one socket
read): the manager sends from daemon worker threads (one per notifier, its alerts in
order) and waits for each send at most its deadline, so a slow or hung channel costs a
``process`` call at most the largest deadline, never more; a send past its deadline is
abandoned with a warning naming the notifier and recorded as a failure, and the
notifier's further alerts of that call are skipped. The webhook and SMTP notifiers also
shut their own sockets down at the deadline (a server that trickles a byte at a time
cannot hold a thread), and daemon threads never hold up the end of the process.

Secrets (webhook URL, SMTP user/password, addresses) are read from the environment, never
from config, and never written to logs or failures.

Example::

    manager = AlertManager.load("configs/risk/alerts.yaml", output_dir="outputs/run")
    alerts = manager.process({"risk/T-02/psi": 0.31})
    [a.message for a in alerts if a.fired]
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import os
import smtplib
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from http import client as http_client
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

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
#: Total deadline (seconds) of a notifier that names none (log, JSONL, a third-party one).
DEFAULT_DEADLINE_S = 5.0
#: Grace the manager adds to a deadline so a self-bounded notifier reports its own error.
_GRACE_S = 0.1


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
    """Sends one fired alert somewhere; raises on failure (the manager catches it).

    ``timeout_s`` (optional, default :data:`DEFAULT_DEADLINE_S`) is the total time one
    ``send`` may take; the manager stops waiting for it after that.
    """

    name: str
    enabled: bool

    def send(self, alert: Alert) -> None: ...


class DeadlineExceeded(TimeoutError):
    """A notifier did not deliver within its total deadline."""


def _deadline(value: Any, who: str) -> float:
    seconds = float(value)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{who}: timeout_s must be a positive number of seconds, got {value!r}")
    return seconds


def _shutdown(target: Any) -> None:
    """Shut down a socket (or the current ``.sock`` of a connection): a thread blocked
    reading or writing it returns at once."""
    sock = getattr(target, "sock", target)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError, ValueError):  # not connected yet, or closed
            sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """Enforces one request's total deadline: when it passes, every socket and connection
    handed to :meth:`track` is shut down, so a server that trickles bytes (each read within
    the per-read timeout) cannot stretch the request. ``fired`` says whether it did."""

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self._done = False
        self._tracked: list[Any] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._done = True
        self._timer.cancel()

    def track(self, target: Any) -> Any:
        """Watch ``target`` (a socket, or an object whose ``.sock`` is one); returned as is.
        Shut down at once if the deadline has already passed."""
        with self._lock:
            self._tracked.append(target)
            fired = self.fired
        if fired:
            _shutdown(target)
        return target

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            tracked = list(self._tracked)
        for target in tracked:
            _shutdown(target)


def _tracked_connection(cls: type, dog: _Watchdog) -> Callable[..., Any]:
    """An ``http.client`` connection factory whose sockets ``dog`` watches."""

    def make(*args: Any, **kwargs: Any) -> Any:
        conn = cls(*args, **kwargs)
        create = getattr(conn, "_create_connection", None)  # http.client's hook, 3.11-3.13
        if create is not None:
            # the raw socket, watched from the moment it exists (connect, TLS handshake)
            conn._create_connection = lambda *a, **kw: dog.track(create(*a, **kw))
        return dog.track(conn)  # conn.sock at the deadline: the plain or the TLS socket

    return make


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, dog: _Watchdog) -> None:
        super().__init__()
        self._dog = dog

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_tracked_connection(http_client.HTTPConnection, self._dog), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, dog: _Watchdog) -> None:
        super().__init__()
        self._dog = dog

    def https_open(self, req: urllib.request.Request) -> Any:
        factory = _tracked_connection(http_client.HTTPSConnection, self._dog)
        return self.do_open(factory, req, context=self._context)


class _SMTP(smtplib.SMTP):
    """``smtplib.SMTP`` whose socket (plain, then TLS after STARTTLS) a watchdog shuts."""

    def __init__(self, dog: _Watchdog, timeout: float) -> None:
        self._dog = dog
        super().__init__(timeout=timeout)
        dog.track(self)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self._dog.track(super()._get_socket(host, port, timeout))


class LogNotifier:
    """Python logging, at WARNING: always available, the floor under every other channel."""

    def __init__(
        self, logger: logging.Logger | None = None, timeout_s: float = DEFAULT_DEADLINE_S
    ) -> None:
        self.name = "log"
        self.enabled = True
        self.timeout_s = _deadline(timeout_s, "log notifier")
        self._log = logger or log

    def send(self, alert: Alert) -> None:
        self._log.warning("ALERT %s", alert.message)


class JsonlNotifier:
    """Appends one JSON object per alert to ``path`` (created with its folder if needed).

    Each record is written with a single ``write`` in append mode, then flushed and
    fsynced, so a crash leaves whole lines and concurrent writers do not interleave lines.
    """

    def __init__(self, path: str | os.PathLike[str], timeout_s: float = DEFAULT_DEADLINE_S) -> None:
        self.name = "jsonl"
        self.enabled = True
        self.timeout_s = _deadline(timeout_s, "jsonl notifier")
        self.path = Path(path)

    def send(self, alert: Alert) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **alert.to_dict()}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


#: Notifier warnings already given in this process (one command: a run, a pipeline of
#: stages, a sequential sweep): each is said once, not once per stage.
_SAID: set[str] = set()


def warn_once(message: str, *args: Any) -> bool:
    """Log ``message % args`` at WARNING the first time this process sees it (later: DEBUG);
    returns whether it was new."""
    text = message % args if args else message
    if text in _SAID:
        log.debug(text)
        return False
    _SAID.add(text)
    log.warning(text)
    return True


def forget_warnings() -> None:
    """Let :func:`warn_once` say everything again (a new run in the same process; tests)."""
    _SAID.clear()


def _env(var: str | None, who: str) -> str | None:
    """The variable's value, or None with one warning (the notifier is then disabled)."""
    value = os.environ.get(var) if var else None
    if var and not value:
        warn_once("%s notifier disabled: environment variable %s is not set", who, var)
        return None
    return value


class WebhookNotifier:
    """Posts a Slack-compatible payload (``{"text", "blocks"}``) to a webhook URL.

    The URL is a secret: it is read from ``url_env`` and never logged; errors that could
    echo it (or its path and query, where the token lies) are redacted.

    ``timeout_s`` bounds the whole request -- connect, send, response headers and body --
    not each socket read: at the deadline the connection is shut down and
    :class:`DeadlineExceeded` raised. Proxies from the environment are honoured.
    """

    def __init__(self, url_env: str = "SIM2REAL_SLACK_WEBHOOK_URL", timeout_s: float = 5.0) -> None:
        self.name = "webhook"
        self.url_env = url_env
        self.timeout_s = _deadline(timeout_s, "webhook notifier")
        self._url = _env(url_env, "webhook")
        self.enabled = self._url is not None

    def _redact(self, text: str) -> str:
        if not self._url:
            return text
        parts = urlsplit(self._url)
        text = text.replace(self._url, "<webhook url>")
        for secret in (parts.path, parts.query, parts.password):
            if secret and secret != "/":
                text = text.replace(secret, "<redacted>")
        return text

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
        with _Watchdog(self.timeout_s) as dog:
            opener = urllib.request.build_opener(_HTTPHandler(dog), _HTTPSHandler(dog))
            try:
                # open raises HTTPError on 4xx/5xx, so reaching the end means delivered.
                with opener.open(request, timeout=self.timeout_s) as response:
                    response.read()
            except Exception as err:
                if not dog.fired:
                    raise RuntimeError(self._redact(str(err))) from None
            if dog.fired:  # a shut-down read may also end "normally", short
                raise DeadlineExceeded(
                    f"no complete response within the {self.timeout_s:g} s deadline"
                )


class SmtpNotifier:
    """Sends each alert as a plain-text e-mail through an SMTP server.

    Login happens only when ``user_env`` is given; if it (or ``password_env``) is given but
    unset in the environment, the notifier is disabled with one warning.

    ``timeout_s`` bounds the whole conversation (connect, greeting, STARTTLS, login, the
    message): at the deadline the socket is shut down and :class:`DeadlineExceeded` raised.
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
        self.starttls = bool(starttls)
        self.timeout_s = _deadline(timeout_s, "smtp notifier")
        # Credentials are optional (a local relay needs none), but a named variable that is
        # unset means a misconfigured login: disable rather than send unauthenticated.
        missing = [v for v in (user_env, password_env) if v and not os.environ.get(v)]
        self._user = os.environ.get(user_env) if user_env else None
        self._password = os.environ.get(password_env) if password_env else None
        self.enabled = not missing
        if missing:
            warn_once(
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
        with _Watchdog(self.timeout_s) as dog:
            try:
                with _SMTP(dog, timeout=self.timeout_s) as smtp:
                    smtp.connect(self.host, self.port)
                    if self.starttls:
                        smtp.starttls()
                    if self._user is not None:
                        smtp.login(self._user, self._password or "")
                    smtp.send_message(message)
            except Exception:
                if not dog.fired:
                    raise
            if dog.fired:
                raise DeadlineExceeded(
                    f"no complete delivery within the {self.timeout_s:g} s deadline"
                )


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


class _Courier(threading.Thread):
    """Delivers one ``process`` call's alerts to one notifier, in order, from a daemon
    thread; each send runs in its own daemon thread and is waited for at most the
    notifier's deadline. After a missed deadline the remaining alerts are skipped (the
    notifier is unresponsive; the abandoned send is left to end on its own)."""

    def __init__(self, notifier: Notifier, alerts: Sequence[Alert]) -> None:
        super().__init__(name=f"alert-{notifier.name}", daemon=True)
        self.notifier = notifier
        self.alerts = list(alerts)
        self.deadline = _notifier_deadline(notifier)
        self.failures: list[tuple[NotifierFailure, bool]] = []  # (failure, timed out)
        self.stuck: threading.Thread | None = None  # an abandoned send still running

    def run(self) -> None:
        for i, alert in enumerate(self.alerts):
            outcome: list[BaseException] = []
            send = threading.Thread(
                target=self._send, args=(alert, outcome), name=self.name + "-send", daemon=True
            )
            send.start()
            send.join(self.deadline + _GRACE_S)
            timed_out = send.is_alive() or bool(
                outcome and isinstance(outcome[0], DeadlineExceeded)
            )
            if timed_out:
                if send.is_alive():  # left to end on its own; a daemon, it never blocks exit
                    self.stuck = send
                    why = f"no delivery within its {self.deadline:g} s deadline (send abandoned)"
                    err: BaseException = DeadlineExceeded(why)
                else:  # the notifier cut its own request at the deadline
                    err = outcome[0]
                self._fail(alert, err, timed_out=True)
                for skipped in self.alerts[i + 1 :]:
                    self._fail(
                        skipped,
                        DeadlineExceeded("skipped: missed its deadline on an earlier alert"),
                        timed_out=True,
                    )
                return
            if outcome:
                self._fail(alert, outcome[0], timed_out=False)

    def _send(self, alert: Alert, outcome: list[BaseException]) -> None:
        try:
            self.notifier.send(alert)
        except BaseException as err:  # recorded by the courier; never kills a thread loudly
            outcome.append(err)

    def _fail(self, alert: Alert, err: BaseException, timed_out: bool) -> None:
        self.failures.append((_failure(self.notifier, alert, err), timed_out))


def _failure(notifier: Notifier, alert: Alert, err: BaseException) -> NotifierFailure:
    return NotifierFailure(
        notifier.name, alert.rule.name, alert.risk_id, f"{type(err).__name__}: {err}"
    )


def _notifier_deadline(notifier: Notifier) -> float:
    try:
        return _deadline(getattr(notifier, "timeout_s", DEFAULT_DEADLINE_S), notifier.name)
    except (TypeError, ValueError):
        return DEFAULT_DEADLINE_S


@dataclass
class AlertManager:
    """Evaluates rules and dispatches fired alerts; never raises because a channel is down,
    and never waits for a channel longer than its deadline (``timeout_s``).

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
    _stuck: dict[int, threading.Thread] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.always is None:
            self.always = [LogNotifier()]

    def process(self, metrics: Mapping[str, Any]) -> list[Alert]:
        """Evaluate ``metrics`` and notify for every fired alert.

        Returns every evaluated alert (fired or not), once every notifier has delivered or
        missed its deadline: the call takes at most about the largest ``timeout_s`` of the
        notifiers involved (more only when a notifier is slow but each of several sends
        still finishes in time). Delivery failures are logged and appended to
        :attr:`failures` (cumulative; see :meth:`failures_since`).
        """
        alerts = evaluate(self.rules, metrics)
        fired = [alert for alert in alerts if alert.fired]
        if fired:
            self._dispatch(fired)
        return alerts

    def failures_since(self, start: int) -> list[NotifierFailure]:
        """Failures recorded after the first ``start`` ones (``len(failures)`` before)."""
        return self.failures[start:]

    def _targets(self, alert: Alert) -> list[Notifier]:
        targets: list[Notifier] = list(self.always or [])
        for channel in alert.rule.channels:
            targets.extend(self.notifiers.get(channel, []))
        out, seen = [], set()
        for notifier in targets:
            # A notifier listed for two channels (or also in `always`) sends once.
            if id(notifier) in seen or not notifier.enabled:
                continue
            seen.add(id(notifier))
            out.append(notifier)
        return out

    def _dispatch(self, alerts: Sequence[Alert]) -> None:
        plan: dict[int, tuple[Notifier, list[Alert]]] = {}
        for alert in alerts:
            for notifier in self._targets(alert):
                plan.setdefault(id(notifier), (notifier, []))[1].append(alert)
        couriers, results = [], []
        for key, (notifier, queued) in plan.items():
            stuck = self._stuck.get(key)
            if stuck is not None and stuck.is_alive():
                # still inside a send abandoned earlier: do not pile up threads behind it
                busy = DeadlineExceeded(
                    "skipped: still busy with an earlier alert past its deadline"
                )
                results.extend((_failure(notifier, a, busy), True) for a in queued)
                continue
            self._stuck.pop(key, None)
            courier = _Courier(notifier, queued)
            courier.start()
            couriers.append((key, courier))
        for key, courier in couriers:
            # each send is waited for at most its deadline, so this join is bounded
            courier.join()
            if courier.stuck is not None:
                self._stuck[key] = courier.stuck
            results.extend(courier.failures)
        for failure, timed_out in results:
            self.failures.append(failure)
            if timed_out:
                log.warning(
                    "alert %s not delivered by notifier %s: %s; moving on",
                    failure.rule,
                    failure.notifier,
                    failure.error,
                )
            else:
                log.error(
                    "alert %s not delivered by %s: %s",
                    failure.rule,
                    failure.notifier,
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
    if not (math.isfinite(timeout) and timeout > 0):
        raise RiskConfigError(
            f"{where}.timeout_s: expected a positive number of seconds (the deadline of the "
            f"whole request), got {timeout!r}"
        )
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
        warn_once("smtp notifier disabled: environment variable(s) %s not set", ", ".join(missing))
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
