"""Risk T-03 (insufficient scalability): training images/s per device and, for
multi-process runs, the scaling efficiency against one process.

:class:`ThroughputMeter` (a Lightning callback) counts the labelled images of every
training batch and the time the training loop spent on them: from one batch's start to
the next (compute plus waiting for data), validation and checkpointing left out. Per
device: the process's own images over its own seconds.

Scaling efficiency needs a one-process figure of the same work. Every stage records its
per-device rate in a ledger shared by all runs of ``paths.output``
(``throughput_ledger.json``), keyed by the work (stage, model and its size, image and
batch size, precision, accelerator); a run on N processes reads the one-process entry of
its key::

    efficiency = per_device_rate(N) / per_device_rate(1)        (1.0 = linear scaling)

Without a one-process entry the figure is missing (never guessed) and the tag says how
to get one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

__all__ = ["ThroughputMeter", "ScalingLedger", "throughput_figures", "workload_key"]


class ThroughputMeter(pl.Callback):
    """Labelled training images and loop seconds of this process (see the module doc).

    The first batch of each epoch is counted without the data wait before it (the loader
    starts up then); the gaps that hold validation are not counted at all.
    """

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self.batch_size = 0
        self.work: dict[str, Any] = {}
        self._start: float | None = None
        self._last_end: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        model = getattr(pl_module, "model", pl_module)
        self.work = {
            "model": type(model).__name__,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "precision": str(trainer.precision),
            "accelerator": type(trainer.accelerator).__name__,
        }

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_end = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self.seconds += now - self._last_end  # waiting for this batch's data
        self._start = now

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        now = time.perf_counter()
        if self._start is not None:
            self.seconds += now - self._start
            images = batch["image"] if isinstance(batch, Mapping) else batch[0]
            self.images += int(images.shape[0])
            self.batch_size = int(images.shape[0])
            self.work["image_size"] = "x".join(str(int(s)) for s in images.shape[-2:])
        self._start, self._last_end = None, now

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_end = None

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Any) -> None:
        self._last_end = None


def workload_key(stage: str, work: Mapping[str, Any], batch_size: int) -> str:
    """The ledger key of a stage's work: everything that sets the per-device cost of a
    step except the number of processes."""
    parts = [stage, *(f"{k}={work[k]}" for k in sorted(work)), f"batch={batch_size}"]
    return "|".join(str(p) for p in parts)


class ScalingLedger:
    """``{key: {"<processes>": {"images_per_s_per_device", "run_id", "at"}}}`` in one JSON
    file, shared by the runs of an output folder (locked, replaced atomically)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.path}: not a throughput ledger ({err})") from None
        return data if isinstance(data, dict) else {}

    def record(self, key: str, processes: int, rate: float, run_id: str) -> dict[str, Any]:
        """Write this run's per-device rate under ``key``; returns the key's entries."""
        from core.files import atomic_write_json
        from core.locks import exclusive

        with exclusive(self.path.with_name(self.path.name + ".lock"), "the throughput ledger"):
            data = self.read()
            entry = data.setdefault(key, {})
            entry[str(int(processes))] = {
                "images_per_s_per_device": float(rate),
                "run_id": run_id,
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            atomic_write_json(self.path, data)
        return entry


def throughput_figures(
    images: int,
    seconds: float,
    processes: int,
    key: str,
    ledger: ScalingLedger | None,
    run_id: str = "",
) -> tuple[dict[str, float], dict[str, str]]:
    """``risk/T-03/*`` figures and tags of one process's count (rank zero's, in DDP).

    Figures: ``images_per_s_per_device``, ``images_per_s`` (times ``processes``),
    ``devices``, and with ``processes > 1`` and a one-process entry of ``key``,
    ``scaling_efficiency`` and ``speedup`` (efficiency times processes)."""
    if images <= 0 or seconds <= 0:
        return {}, {}
    rate = images / seconds
    figures = {
        "risk/T-03/images_per_s_per_device": rate,
        "risk/T-03/images_per_s": rate * processes,
        "risk/T-03/devices": float(processes),
    }
    tags = {"risk/T-03/workload": key}
    if ledger is None:
        return figures, tags
    entries = ledger.record(key, processes, rate, run_id)
    single = (entries.get("1") or {}).get("images_per_s_per_device")
    if processes > 1 and single:
        efficiency = rate / float(single)
        figures["risk/T-03/scaling_efficiency"] = efficiency
        figures["risk/T-03/speedup"] = efficiency * processes
        tags["risk/T-03/scaling"] = (
            f"{processes} processes at {rate:.2f} images/s each against {float(single):.2f} "
            f"on one (run {entries['1']['run_id']}): efficiency {efficiency:.2f}"
        )
    elif processes > 1:
        tags["risk/T-03/scaling"] = (
            "no one-process figure of this work yet: run the same stage with one process "
            "(trainer.devices=1) into the same paths.output for the scaling efficiency"
        )
    return figures, tags
