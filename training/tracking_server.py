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

from core.config import ConfigError

#: The REST call of the check: cheap, read-only, and served only by a tracking server.
PROBE = "/api/2.0/mlflow/experiments/search"
ENV = "MLFLOW_TRACKING_URI"
DOCS = "docs/remote-tracking.md"


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
    output_dir: str | os.PathLike[str], configured: str | None = None, timeout_s: float = 5.0
) -> str:
    """Resolve the tracking URI as training will (:func:`training.tracking.tracking_uri`), check
    it with :func:`check_reachable` and return it."""
    from training.tracking import tracking_uri

    source = tracking_source(configured)
    uri = tracking_uri(output_dir, configured, create=False)
    check_reachable(uri, timeout_s=timeout_s, source=source)
    return uri


def check_tracking_config(config: Any, timeout_s: float = 5.0) -> str:
    """:func:`check_tracking` for a composed training config (``paths.output``,
    ``tracking.uri``): the call for the start of ``run_train`` and, as one of
    ``hydra.callbacks.sweep_checks.extra_checks``, before a sweep's first job."""
    tracking = config.get("tracking") or {}
    return check_tracking(config.paths.output, tracking.get("uri"), timeout_s=timeout_s)


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
        raise ConfigError(
            f"{source}: the MLflow tracking server {shown} did not answer "
            f"({_failure(exc, timeout_s, elapsed)}). {_advice(source, uri)}"
        ) from exc
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
    from training.tracking import redact

    return redact(text)


# ------------------------------------------------------------------------------ local
def _sqlite_path(uri: str) -> Path | None:
    """The database file of ``sqlite:///relative.db`` / ``sqlite:////absolute.db``; None for
    an in-memory database."""
    rest = uri.split(":", 1)[1]
    if not rest.startswith("//"):
        return None
    path = unquote(rest[2:].split("?", 1)[0])
    path = path[1:] if path.startswith("/") else path  # sqlite:/// + the path
    if not path or path == ":memory:":
        return None
    return Path(path)


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
