"""Pre-flight check of the MLflow tracking store: a clear error before any job starts.

MLflow's client retries a request that cannot connect for minutes (``MLFLOW_HTTP_REQUEST_
MAX_RETRIES`` = 7 with exponential backoff, ``MLFLOW_HTTP_REQUEST_TIMEOUT`` = 120 s each), so a
tracking server that is down, a wrong port or a missing password would otherwise show up deep
inside the first stage -- after the datasets were generated -- as a long stall and a stack trace.
:func:`check_reachable` asks once, with a short timeout and no retry, and raises a
:class:`~core.config.ConfigError` naming the setting to fix.

* ``http://`` / ``https://``: one ``GET api/2.0/mlflow/experiments/search?max_results=1``,
  authenticated the way MLflow authenticates (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``,
  ``MLFLOW_TRACKING_TOKEN``, TLS settings): it proves the server answers, is an MLflow tracking
  server (not ``--artifacts-only``, not another service on that port), accepts the credentials
  and can read its backend store.
* ``sqlite:`` / ``file:`` / a plain path: the folder of the store can be created and written.
* anything else (``databricks``, ``postgresql`` straight to a database, plugins): not checked.

Credentials come from the environment only (``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``, or a whole ``MLFLOW_TRACKING_URI``):
a ``tracking.uri`` with ``user:password@`` is refused (:func:`check_config_credentials`), by
:class:`TrackingChecks` before Hydra writes the run folder's ``.hydra/*.yaml``, and again by
:func:`check_tracking`. No message, and no exception chained under one, shows a URI's
credentials (:func:`training.tracking.redact_uri`).

:func:`check_tracking_config` also creates the local SQLite store once, under a lock
(:func:`training.tracking.create_store`), before any job or MLflow client opens it.

See ``docs/remote-tracking.md``.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from hydra.experimental.callback import Callback

from core.config import ConfigError

#: The REST call of the check: cheap, read-only, and served only by a tracking server.
PROBE = "/api/2.0/mlflow/experiments/search"
ENV = "MLFLOW_TRACKING_URI"
DOCS = "docs/remote-tracking.md"
KEY = "tracking.uri"
#: MLflow prints "View run ... at: <server URL>" when a run ends, the URL built from the
#: tracking URI with its credentials: set to true while the URI carries some.
QUIET_URLS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def tracking_source(configured: str | None = None) -> str:
    """Which setting decides the tracking URI, with the precedence of
    :func:`training.tracking.tracking_uri`: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else
    the local SQLite store in ``paths.output``."""
    if configured:
        return "tracking.uri"
    if os.environ.get(ENV):
        return ENV
    return "paths.output"


def check_tracking(
    output_dir: str | os.PathLike[str],
    configured: str | None = None,
    timeout_s: float = 5.0,
    create: bool = False,
) -> str:
    """Resolve the tracking URI as training will (:func:`training.tracking.tracking_uri`),
    refuse credentials in ``configured`` (``tracking.uri``), check the URI with
    :func:`check_reachable` and return it. With ``create``, a local SQLite store is then
    created and migrated once, under its lock (:func:`training.tracking.create_store`)."""
    from training.tracking import create_store, tracking_uri, uri_has_userinfo

    source = tracking_source(configured)
    if source == KEY:
        refuse_credentials(str(configured), KEY)
    uri = tracking_uri(output_dir, configured, create=False)
    if uri_has_userinfo(uri):  # MLFLOW_TRACKING_URI with credentials: MLflow must not print it
        os.environ[QUIET_URLS] = "true"
    check_reachable(uri, timeout_s=timeout_s, source=source)
    if create:
        create_store(uri)
    return uri


def check_tracking_config(config: Any, timeout_s: float = 5.0, create: bool = True) -> str:
    """:func:`check_tracking` for a composed training config (``paths.output``,
    ``tracking.uri``): the call for the start of ``run_train`` (which also creates the local
    store, ``create``) and, with ``create=False`` as one of
    ``hydra.callbacks.sweep_checks.extra_checks``, before a sweep's first job (the sweep's
    ``before_jobs`` then creates the store: :func:`prepare_tracking_store`)."""
    tracking = config.get("tracking") or {}
    return check_tracking(
        config.paths.output, tracking.get("uri"), timeout_s=timeout_s, create=create
    )


def prepare_tracking_store(config: Any) -> str | None:
    """Create the local SQLite store of a composed config once, under its lock
    (:func:`training.tracking.create_store`): listed in
    ``hydra.callbacks.sweep_checks.before_jobs``, it runs in the launching process after every
    check passed and before the launcher starts the jobs, which would otherwise all create
    it at once on a fresh output folder. Returns the URI (None for a server)."""
    from training.tracking import create_store, tracking_uri

    tracking = config.get("tracking") or {}
    uri = tracking_uri(config.paths.output, tracking.get("uri"), create=False)
    return uri if create_store(uri) is not None else None


# ------------------------------------------------------------------------------ credentials
def refuse_credentials(uri: str, key: str = KEY) -> None:
    """Raise :class:`ConfigError` naming ``key`` when ``uri`` carries ``user[:password]@``: a
    config value is written to disk (Hydra's ``.hydra/*.yaml``, MLflow parameters) and shown
    on the console; the message shows the URI redacted."""
    from training.tracking import redact_uri, uri_has_userinfo

    if not uri_has_userinfo(uri):
        return
    raise ConfigError(
        f"{key}: {redact_uri(uri, '***@')} carries credentials (user:password@ in the URI). "
        f"A config value is written to disk (the run folder's .hydra/*.yaml, MLflow "
        f"parameters) and shown on the console, so {key} must not hold a secret: remove it "
        "from the URI and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
        "MLFLOW_TRACKING_TOKEN) in the environment -- or, for a URI that has to carry its "
        f"password (a database), give the whole URI in {ENV} instead; see {DOCS}."
    )


def check_config_credentials(config: Any) -> None:
    """:func:`refuse_credentials` for every value ``tracking.uri`` may take in a composed
    config (with its ``hydra`` node): the config's value (resolved where it resolves), each
    command-line override of it (every value of a sweep: ``tracking.uri=a,b``, left out of
    the primary config) and an entry of ``hydra.sweeper.params``."""
    from omegaconf import DictConfig, OmegaConf

    values: list[str] = []
    tracking = OmegaConf.select(config, "tracking", throw_on_resolution_failure=False)
    if isinstance(tracking, DictConfig):
        node = tracking._get_node("uri", validate_access=False)
        raw = None if node is None else node._value()
        if isinstance(raw, str):  # as written (an interpolation stays ${...})
            values.append(raw)
        resolved = OmegaConf.select(config, KEY, throw_on_resolution_failure=False)
        if resolved:  # what the job would use (None where it does not resolve here)
            values.append(str(resolved))
    overrides = OmegaConf.select(config, "hydra.overrides.task", default=None)
    for line in OmegaConf.to_container(overrides, resolve=False) if overrides else []:
        key, _, value = str(line).partition("=")
        if key.strip().lstrip("+~") == KEY:  # tracking.uri=, +tracking.uri=, ++tracking.uri=
            values.append(value)
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    if params is not None:
        value = OmegaConf.to_container(params, resolve=False).get(KEY)
        if value is not None:
            values.append(str(value))
    for value in values:
        refuse_credentials(value, KEY)


class TrackingChecks(Callback):
    """Refuse a ``tracking.uri`` with credentials before Hydra writes anything.

    Hydra writes the run folder's ``.hydra/config.yaml``, ``hydra.yaml`` and
    ``overrides.yaml`` (and a sweep's ``multirun.yaml``) after ``on_run_start`` /
    ``on_multirun_start``; registered in ``hydra.callbacks`` (``configs/train.yaml``, which
    ``pipeline.yaml`` composes, and ``configs/monitor.yaml``), this callback stops the launch
    there. Hydra 1.3 turns an exception raised by a callback into a warning, so it exits
    with ``SystemExit`` and the (redacted) message."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: Any) -> None:
        try:
            check_config_credentials(config)
        except ConfigError as exc:
            raise SystemExit(f"Error: {exc}") from None


def check_reachable(uri: str, timeout_s: float = 5.0, source: str = "tracking.uri") -> None:
    """Raise :class:`ConfigError` (naming ``source``, the setting that gave ``uri``) unless the
    tracking store at ``uri`` can be used; an http(s) server must answer within ``timeout_s``."""
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_server(uri, timeout_s, source)
    elif scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is not None:
            _check_folder(path.parent, uri, source, what="SQLite tracking database")
    elif scheme == "file" or len(scheme) <= 1:  # file:, a plain path (or a Windows drive)
        _check_folder(_file_path(uri), uri, source, what="file tracking store")


# ------------------------------------------------------------------------------ server
def _check_server(uri: str, timeout_s: float, source: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    shown = _redact(uri)
    started = time.monotonic()
    try:
        response = http_request(
            get_default_host_creds(uri.rstrip("/")),
            PROBE,
            "GET",
            max_retries=0,
            backoff_factor=0,
            backoff_jitter=0,
            timeout=timeout_s,
            raise_on_status=False,
            params={"max_results": 1},
        )
    except MlflowException as exc:
        elapsed = time.monotonic() - started
        failure = _failure(exc, timeout_s, elapsed)
    else:
        failure = None
    if failure is not None:
        # not chained: MLflow's message ("API request to <url> failed ...") and the requests
        # errors under it show the URI with its credentials, and Hydra prints the chain
        raise ConfigError(
            f"{source}: the MLflow tracking server {shown} did not answer "
            f"({failure}). {_advice(source, uri)}"
        ) from None
    status = response.status_code
    if status == 200 and _is_json_object(response):
        return
    if status in (401, 403):
        what = (
            f"HTTP {status}: the credentials were refused"
            if _has_credentials()
            else f"HTTP {status}: it needs credentials and none are set"
        )
        raise ConfigError(
            f"{source}: the MLflow tracking server {shown} answered {what}. Set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
            f"in the environment -- never in {source} itself; see {DOCS}."
        )
    if status in (200, 404):
        raise ConfigError(
            f"{source}: {shown} answered (HTTP {status}) but is not an MLflow tracking server "
            f"at that address: {PROBE} is missing (another service on that port, a path prefix "
            "missing from the URI, or a server started with --artifacts-only). Point "
            f"{source} at the `mlflow server` itself; see {DOCS}."
        )
    reason = getattr(response, "reason", "") or ""
    detail = f"HTTP {status} {reason}".strip()
    if status >= 500:
        raise ConfigError(
            f"{source}: the MLflow tracking server {shown} answered {detail}: it is up but "
            "failing, its backend store (the database of --backend-store-uri) may be down or "
            "unreachable from the server. See the server's log, or "
            f"{_fallback(source)} to log to the local SQLite store in paths.output."
        )
    raise ConfigError(
        f"{source}: the MLflow tracking server {shown} answered {detail}. {_advice(source, uri)}"
    )


def _failure(exc: BaseException, timeout_s: float, elapsed: float) -> str:
    """What went wrong under MLflow's wrapping: refused, unknown host, timeout, TLS."""
    import requests

    chain = _causes(exc)
    if any(isinstance(e, socket.gaierror) for e in chain):
        return "host name not found"
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused: nothing listens on that port"
    if any(isinstance(e, requests.exceptions.SSLError) for e in chain):
        return (
            "TLS handshake failed (a self-signed server certificate: set "
            "MLFLOW_TRACKING_SERVER_CERT_PATH)"
        )
    if any(isinstance(e, requests.exceptions.Timeout | TimeoutError) for e in chain):
        return f"timeout: no answer within {timeout_s:g} s"
    text = str(exc).lower()
    if "refused" in text:
        return "connection refused: nothing listens on that port"
    if "timed out" in text or "timeout" in text:
        return f"timeout: no answer within {timeout_s:g} s"
    last = chain[-1]
    return f"{type(last).__name__}: {_redact(str(last))[:300]} after {elapsed:.1f} s"


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: ``__cause__``/``__context__``, urllib3's ``reason`` and the
    exception a requests error carries as its first argument."""
    seen: list[BaseException] = []
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        seen.append(e)
        todo.extend([e.__cause__, e.__context__, getattr(e, "reason", None)])
        todo.extend(a for a in e.args[:1] if isinstance(a, BaseException))
    return seen


def _advice(source: str, uri: str) -> str:
    parsed = urlparse(uri)
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    local = host in ("127.0.0.1", "localhost", "::1")
    where = "" if local else f" on {host}"
    command = (
        "mlflow server --backend-store-uri sqlite:///mlflow-server.db "
        f"--artifacts-destination ./mlartifacts --host {'127.0.0.1' if local else '0.0.0.0'} "
        f"--port {port}"
    )
    return (
        f"Start the server{where} (e.g. `{command}`; see {DOCS}), correct {source}, or "
        f"{_fallback(source)} to log to the local SQLite store in paths.output."
    )


def _fallback(source: str) -> str:
    if source == ENV:
        return f"unset {ENV}"
    if source == "tracking.uri":
        return "set tracking.uri=null"
    return f"change {source}"


def _has_credentials() -> bool:
    return bool(
        os.environ.get("MLFLOW_TRACKING_USERNAME") or os.environ.get("MLFLOW_TRACKING_TOKEN")
    )


def _is_json_object(response: Any) -> bool:
    try:
        return isinstance(response.json(), dict)
    except ValueError:
        return False


def _redact(text: str) -> str:
    from training.tracking import redact_uri

    return redact_uri(text)


# ------------------------------------------------------------------------------ local
def _sqlite_path(uri: str) -> Path | None:
    from training.tracking import sqlite_path

    return sqlite_path(uri)


def _file_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme.lower() == "file":
        return Path(unquote(parsed.path))
    return Path(uri)


def _check_folder(folder: Path, uri: str, source: str, what: str) -> None:
    """A file can be written in ``folder``, or -- when it does not exist yet -- the folder can
    be created there: its nearest existing parent is a writable folder. Creates nothing that
    stays (a refused sweep leaves no folder behind)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a folder", str(existing))
        if existing == folder:
            with tempfile.TemporaryFile(dir=folder):
                pass
        elif not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(13, f"{existing} is not writable", str(existing))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"{source}: the {what} {_redact(uri)} cannot be written: folder {folder}: {reason}. "
            f"Point {source} at a writable place (or a tracking server, see {DOCS})."
        ) from exc
