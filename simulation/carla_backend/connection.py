"""Connecting to a CARLA server: bounded time-outs and retries, never a hang.

``carla.Client(host, port)`` does not touch the network; the first RPC does, and it
blocks for the client's time-out when nothing answers (then raises ``RuntimeError``
"time-out of ...ms while waiting for the simulator"). :func:`connect` therefore sets
the time-out first and proves the server answers with a cheap call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # carla is optional: imported only where a client is really built
    import carla

log = logging.getLogger(__name__)


class CarlaError(RuntimeError):
    """Base of this package's errors (a ``RuntimeError``, like the client's own errors)."""


class CarlaConnectionError(CarlaError):
    """No CARLA server answered at ``host:port``."""


def connect(
    host: str = "localhost",
    port: int = 2000,
    timeout_s: float = 10.0,
    retries: int = 3,
    backoff_s: float = 1.0,
    client_cls: Callable[[str, int], Any] | None = None,
) -> carla.Client:
    """A ``carla.Client`` whose server has answered.

    Args:
        host, port: the server's RPC address (``-carla-rpc-port``, 2000 by default).
        timeout_s: seconds each RPC may block before the client gives up; also kept as
            the returned client's time-out.
        retries: connection attempts in total (>= 1).
        backoff_s: seconds to wait between two attempts.
        client_cls: builds an unconnected client from ``(host, port)``; ``carla.Client``
            by default (tests pass a double).

    Returns:
        The client, with ``set_timeout(timeout_s)`` applied.

    Raises:
        CarlaConnectionError: no answer after ``retries`` attempts, within about
            ``retries * (timeout_s + backoff_s)`` seconds; the message names ``host:port``,
            the attempts and the time-out.
        ValueError: for a non-positive ``timeout_s``, ``retries < 1`` or ``backoff_s < 0``.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s: expected seconds > 0, got {timeout_s!r}")
    if int(retries) < 1:
        raise ValueError(f"retries: expected at least 1 attempt, got {retries!r}")
    if backoff_s < 0:
        raise ValueError(f"backoff_s: expected seconds >= 0, got {backoff_s!r}")
    if client_cls is None:
        import carla

        client_cls = carla.Client

    last_error: RuntimeError | None = None
    for attempt in range(1, int(retries) + 1):
        try:
            client = client_cls(host, int(port))
            client.set_timeout(float(timeout_s))
            server_version = client.get_server_version()
        except RuntimeError as err:  # the client's only error type for network failures
            last_error = err
            log.warning(
                "CARLA server %s:%s did not answer (attempt %d/%d): %s",
                host,
                port,
                attempt,
                retries,
                err,
            )
            if attempt < retries:
                time.sleep(backoff_s)
            continue
        client_version = client.get_client_version()
        if client_version != server_version:
            # CARLA tolerates small mismatches, but a different minor version often
            # breaks sensors and batches in ways that look like server bugs.
            log.warning(
                "CARLA client %s differs from server %s at %s:%s",
                client_version,
                server_version,
                host,
                port,
            )
        return client
    raise CarlaConnectionError(
        f"CARLA server at {host}:{port} did not answer after {retries} attempt(s) "
        f"({timeout_s:g} s time-out each, {backoff_s:g} s apart): {last_error}. "
        f"Is the simulator running with -carla-rpc-port={port}?"
    ) from last_error
