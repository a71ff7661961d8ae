"""Risk T-04 (GPU resource exhaustion): GPU utilisation and memory, read through NVML.

The register's alert is "GPU utilisation > 80 %". Two readings matter for exhaustion:
how busy the GPU is (NVML's utilisation: the fraction of the last sample period, 1/6 s to
1 s depending on the product, in which a kernel was running) and how full its memory is
(an out-of-memory error is the exhaustion that stops a run).

- :func:`gpu_snapshot`: one reading of every visible GPU.
- :class:`GpuMonitor`: a background thread that samples every ``interval_s`` seconds
  during training and summarizes the run as ``risk/T-04/...`` metrics.

NVML comes from the ``nvidia-ml-py`` package (module ``pynvml``), imported lazily: it is
optional, and without it (or without a GPU) every function here says *not available*,
with the reason, instead of reporting 0 % -- the register wants a missing measurement
to look missing, not like an idle GPU.

Complementary: MLflow's own system metrics (``mlflow.enable_system_metrics_logging()``,
or ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true``) log a per-run *time series* of CPU,
memory, disk, network and (with ``pynvml``) GPU utilisation and memory under
``system/...``; it needs ``psutil`` (and ``pynvml`` for the GPU part). This module gives
the register's per-run *summary* numbers and the not-available tag that series lacks.

GPUs are those visible to the process: NVML itself ignores ``CUDA_VISIBLE_DEVICES``, so
on a shared machine it would report the neighbours' GPUs; a ``CUDA_VISIBLE_DEVICES`` of
indices or ``GPU-`` UUIDs is honoured.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__all__ = ["DEFAULT_INTERVAL_S", "GpuMonitor", "gpu_snapshot"]

#: Default sampling period of :class:`GpuMonitor`, in seconds.
DEFAULT_INTERVAL_S = 5.0
_INSTALL_HINT = "pynvml not installed (pip install nvidia-ml-py)"


def _import_nvml() -> tuple[ModuleType | None, str]:
    """``(pynvml, "")`` initialized, or ``(None, reason)``."""
    try:
        import pynvml
    except ImportError:
        return None, _INSTALL_HINT
    try:
        pynvml.nvmlInit()
    except Exception as err:  # pynvml.NVMLError_*: no driver, no library, no permission
        return None, f"NVML could not start: {type(err).__name__}: {err}"
    return pynvml, ""


def _visible_handles(nvml: ModuleType) -> list[tuple[int, Any]]:
    """``(nvml index, handle)`` of the GPUs this process may use."""
    count = int(nvml.nvmlDeviceGetCount())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
    handles = []
    for entry in (e.strip() for e in visible.split(",")):
        if not entry:
            continue
        if entry.isdigit():
            if int(entry) >= count:
                break  # CUDA stops at the first invalid entry, and so do we
            handles.append((int(entry), nvml.nvmlDeviceGetHandleByIndex(int(entry))))
        elif entry.startswith("GPU-"):
            handle = nvml.nvmlDeviceGetHandleByUUID(entry)
            handles.append((int(nvml.nvmlDeviceGetIndex(handle)), handle))
        else:  # MIG-... or something else NVML cannot map simply: fall back to all GPUs
            return [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
    return handles


def _read(nvml: ModuleType) -> dict[str, Any]:
    """One reading of the visible GPUs with an initialized NVML (see :func:`gpu_snapshot`)."""
    gpus = []
    for index, handle in _visible_handles(nvml):
        name = nvml.nvmlDeviceGetName(handle)
        util = nvml.nvmlDeviceGetUtilizationRates(handle)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        total = int(mem.total)
        gpus.append(
            {
                "index": index,
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "utilization": float(util.gpu) / 100.0,  # NVML reports whole percent
                "memory_used_bytes": int(mem.used),
                "memory_total_bytes": total,
                "memory_fraction": int(mem.used) / total if total else float("nan"),
            }
        )
    if not gpus:
        return {"available": False, "reason": "NVML sees no GPU visible to this process"}
    return {
        "available": True,
        "gpus": gpus,
        "max_utilization": max(g["utilization"] for g in gpus),
        "max_memory_fraction": max(g["memory_fraction"] for g in gpus),
    }


def gpu_snapshot() -> dict[str, Any]:
    """Utilisation and memory of every visible GPU, now.

    Returns:
        With NVML and a GPU: ``{"available": True, "gpus": [{"index", "name",
        "utilization" (fraction in [0, 1]), "memory_used_bytes", "memory_total_bytes",
        "memory_fraction" (used / total)}, ...], "max_utilization", "max_memory_fraction"}``.
        Otherwise ``{"available": False, "reason": "<why>"}`` -- never zeros.
    """
    nvml, reason = _import_nvml()
    if nvml is None:
        return {"available": False, "reason": reason}
    try:
        return _read(nvml)
    except Exception as err:  # a GPU fell off the bus, a driver/library mismatch, ...
        return {"available": False, "reason": f"NVML query failed: {type(err).__name__}: {err}"}
    finally:
        nvml.nvmlShutdown()


class GpuMonitor:
    """Samples GPU utilisation and memory in a background thread while training runs.

    Use as a context manager (or :meth:`start` / :meth:`stop`). A sample is taken at
    start, then every ``interval_s`` seconds, and once more at stop, so even a run
    shorter than the interval has two readings.

    Summary (:meth:`metrics`), chosen for what "exhaustion" means for each quantity:

    - ``gpu_utilization``: the **mean** over samples of the busiest GPU's utilisation
      (fraction). A peak is nearly always 100 % for any GPU that ever ran a kernel, so it
      says little; the mean says whether the run keeps the device saturated (and hence
      whether more jobs, or a bigger batch, would fit). ``gpu_utilization_peak`` is also
      logged.
    - ``gpu_memory_fraction``: the **peak** over samples and GPUs of used / total memory,
      because running out of memory once is enough to kill the run.

    Args:
        interval_s: seconds between samples (> 0). NVML's own utilisation counter
            averages over up to 1 s, so below that samples are not independent.

    Example:
        >>> with GpuMonitor(interval_s=5.0) as monitor:
        ...     trainer.fit(model, datamodule)
        >>> mlflow.log_metrics(monitor.metrics()); mlflow.set_tags(monitor.tags())
    """

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s: expected a number of seconds > 0, got {interval_s}")
        self.interval_s = float(interval_s)
        self.reason = "not started"
        self.samples: list[dict[str, Any]] = []
        self._nvml: ModuleType | None = None
        self._names: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> GpuMonitor:
        """Initialize NVML and start sampling; without NVML/GPU, record why and return."""
        if self._thread is not None:
            raise RuntimeError("GpuMonitor: already started")
        self._nvml, reason = _import_nvml()
        if self._nvml is None:
            self.reason = reason
            return self
        self.reason = ""
        self.sample()
        if self._nvml is None:  # the first reading failed: nothing to monitor
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="GpuMonitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take a last sample, stop the thread and shut NVML down (idempotent)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()
        self._shutdown()

    def __enter__(self) -> GpuMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def _shutdown(self) -> None:
        with self._lock:
            if self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                finally:
                    self._nvml = None

    # -- sampling -----------------------------------------------------------------------

    def sample(self) -> dict[str, Any] | None:
        """Take one reading now (the thread calls this; tests may too). ``None`` when NVML
        is not running; a failed read stops monitoring and keeps the reason."""
        with self._lock:
            if self._nvml is None:
                return None
            try:
                reading = _read(self._nvml)
            except Exception as err:
                reading = {"available": False, "reason": f"NVML query failed: {err}"}
            if not reading["available"]:
                # Keep what was measured so far, but say why sampling ended.
                self.reason = reading["reason"]
                self._stop.set()
                nvml, self._nvml = self._nvml, None
                nvml.nvmlShutdown()
                return None
            self.samples.append(reading)
            self._names = [f"{g['index']}:{g['name']}" for g in reading["gpus"]]
            return reading

    # -- summaries ----------------------------------------------------------------------

    def metrics(self, prefix: str = "risk/T-04/") -> dict[str, float]:
        """``<prefix>gpu_utilization`` (mean of the busiest GPU), ``<prefix>
        gpu_utilization_peak`` and ``<prefix>gpu_memory_fraction`` (peak), all fractions
        in [0, 1]; an **empty** dict when nothing was measured (see :meth:`tags`)."""
        with self._lock:
            samples = list(self.samples)
        if not samples:
            return {}
        busiest = [s["max_utilization"] for s in samples]
        return {
            f"{prefix}gpu_utilization": sum(busiest) / len(busiest),
            f"{prefix}gpu_utilization_peak": max(busiest),
            f"{prefix}gpu_memory_fraction": max(s["max_memory_fraction"] for s in samples),
        }

    def tags(self, prefix: str = "risk/T-04/") -> dict[str, str]:
        """``{<prefix>gpu: "not available: <reason>"}`` when nothing was measured, else the
        GPUs sampled (``"0:NVIDIA H100, 1:..."``) and the sample count."""
        with self._lock:
            n = len(self.samples)
            names: Sequence[str] = list(self._names)
        if n == 0:
            return {f"{prefix}gpu": f"not available: {self.reason or 'no sample taken'}"}
        out = {f"{prefix}gpu": ", ".join(names), f"{prefix}gpu_samples": str(n)}
        if self.reason:  # sampling ended early; the figures cover the time before
            out[f"{prefix}gpu_note"] = f"sampling stopped: {self.reason}"
        return out
