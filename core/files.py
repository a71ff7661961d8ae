"""Atomic file writing shared by every package: readers see the old file or the new one.

A file is written as a temporary sibling named with the writer's pid and a random part,
fsynced and renamed in one step (``os.replace``); :func:`writer_alive` tells whether the
process behind a temporary name still runs, so a killed writer's leftovers can be removed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unique_suffix() -> str:
    # pid + random part: two processes (or a killed one) never share a temporary name.
    return f"{os.getpid()}-{secrets.token_hex(4)}"


TMP_PID = re.compile(r"tmp-(?:\d+-)?(\d+)-[0-9a-f]{8}$")


def writer_alive(tmp_name: str) -> bool:
    """Whether the process that made temporary ``tmp_name`` still runs (not us)."""
    match = TMP_PID.search(tmp_name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False  # ours from an earlier attempt in this process: stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tmp_name(name: str) -> str:
    return f".{name}.tmp-{unique_suffix()}"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that readers see the old file or the new one,
    never a part: a temporary file in the same folder, fsynced, then ``os.replace``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Byte version of :func:`atomic_write_text`."""
    path = Path(path)
    tmp = path.with_name(tmp_name(path.name))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON (with a final newline) via :func:`atomic_write_text`."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
