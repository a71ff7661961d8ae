"""Inter-process locks for work that parallel jobs may share (a stage, a dataset).

Two jobs of a parallel sweep (``hydra/launcher=local``) that need the same unfinished stage
or dataset would otherwise do the same work at the same time in the same folder. With
:func:`exclusive`, the second one waits for the first, then finds the work done and skips
it. POSIX ``flock`` locks: released by the kernel when a holder dies, so a killed job never
leaves a stale lock behind; they hold between processes of one host (and on most shared
file systems that support ``flock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive(path: str | os.PathLike[str], what: str = "") -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if absent) for the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another job working on %s (%s)", what or path, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
