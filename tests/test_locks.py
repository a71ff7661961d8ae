"""The inter-process lock that parallel sweep jobs share work under."""

from __future__ import annotations

import multiprocessing as mp
import time

from core.locks import exclusive


def _hold(lock, log, seconds):
    with exclusive(lock):
        with open(log, "a") as f:
            f.write("in\n")
        time.sleep(seconds)
        with open(log, "a") as f:
            f.write("out\n")


def test_a_second_process_waits_for_the_first(tmp_path):
    lock, log = tmp_path / "x.lock", tmp_path / "log.txt"
    ctx = mp.get_context("spawn")
    first = ctx.Process(target=_hold, args=(lock, log, 1.0))
    first.start()
    deadline = time.monotonic() + 30
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = ctx.Process(target=_hold, args=(lock, log, 0.0))
    second.start()
    first.join(30)
    second.join(30)
    assert log.read_text().split() == ["in", "out", "in", "out"]  # never interleaved


def test_a_dead_holder_leaves_no_stale_lock(tmp_path):
    lock = tmp_path / "x.lock"
    ctx = mp.get_context("spawn")
    holder = ctx.Process(target=_hold, args=(lock, tmp_path / "log.txt", 60.0))
    holder.start()
    deadline = time.monotonic() + 30
    while not (tmp_path / "log.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    holder.kill()
    holder.join(10)
    started = time.monotonic()
    with exclusive(lock):
        pass
    assert time.monotonic() - started < 5
