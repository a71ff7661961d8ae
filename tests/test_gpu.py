"""Risk T-04: GPU utilisation and memory via NVML, and 'not available' without it."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from training.risk.gpu import GpuMonitor, gpu_snapshot

GIB = 1 << 30


def fake_pynvml(readings: list[list[tuple[int, int, int]]]) -> types.ModuleType:
    """A pynvml stand-in: ``readings[k][i] = (util %, used bytes, total bytes)`` of GPU
    ``i`` at the ``k``-th query (the last one repeats)."""
    mod = types.ModuleType("pynvml")
    state = {"calls": 0, "inits": 0, "shutdowns": 0}
    mod.state = state

    def current(i):
        k = min(state["calls"], len(readings) - 1)
        return readings[k][i]

    mod.nvmlInit = lambda: state.__setitem__("inits", state["inits"] + 1)
    mod.nvmlShutdown = lambda: state.__setitem__("shutdowns", state["shutdowns"] + 1)
    mod.nvmlDeviceGetCount = lambda: len(readings[0])
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetName = lambda h: b"Fake GPU" if h == 0 else "Fake GPU"

    def util(h):
        return SimpleNamespace(gpu=current(h)[0], memory=0)

    def mem(h):
        info = SimpleNamespace(used=current(h)[1], total=current(h)[2])
        if h == len(readings[0]) - 1:
            state["calls"] += 1  # one query = one pass over every GPU
        return info

    mod.nvmlDeviceGetUtilizationRates = util
    mod.nvmlDeviceGetMemoryInfo = mem
    return mod


@pytest.fixture
def no_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError


def test_without_nvml_nothing_is_reported_as_zero(no_nvml):
    snap = gpu_snapshot()
    assert snap["available"] is False and "nvidia-ml-py" in snap["reason"]
    with GpuMonitor(interval_s=0.01) as monitor:
        pass
    assert monitor.metrics() == {}
    assert monitor.tags() == {
        "risk/T-04/gpu": "not available: pynvml not installed (pip install nvidia-ml-py)"
    }


def test_nvml_that_cannot_start_is_not_available(monkeypatch):
    mod = fake_pynvml([[(50, GIB, 2 * GIB)]])

    def fail():
        raise RuntimeError("Driver Not Loaded")

    mod.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    snap = gpu_snapshot()
    assert snap == {
        "available": False,
        "reason": "NVML could not start: RuntimeError: Driver Not Loaded",
    }


def test_snapshot_with_a_fake_nvml(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    mod = fake_pynvml([[(30, 4 * GIB, 16 * GIB), (90, 12 * GIB, 16 * GIB)]])
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    snap = gpu_snapshot()
    assert snap["available"] is True
    assert [g["utilization"] for g in snap["gpus"]] == [0.3, 0.9]
    assert [g["memory_fraction"] for g in snap["gpus"]] == [0.25, 0.75]
    assert snap["gpus"][0]["name"] == "Fake GPU"  # bytes from old pynvml decoded
    assert snap["max_utilization"] == 0.9 and snap["max_memory_fraction"] == 0.75
    assert mod.state["inits"] == mod.state["shutdowns"] == 1


def test_snapshot_honours_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setitem(
        sys.modules, "pynvml", fake_pynvml([[(30, 4 * GIB, 16 * GIB), (90, 8 * GIB, 16 * GIB)]])
    )
    snap = gpu_snapshot()
    assert [g["index"] for g in snap["gpus"]] == [1] and snap["max_utilization"] == 0.9


def test_monitor_summarizes_mean_utilization_and_peak_memory(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    readings = [
        [(20, 2 * GIB, 10 * GIB), (40, 1 * GIB, 10 * GIB)],  # busiest 0.4
        [(100, 9 * GIB, 10 * GIB), (10, 1 * GIB, 10 * GIB)],  # busiest 1.0, memory 0.9
        [(60, 3 * GIB, 10 * GIB), (0, 1 * GIB, 10 * GIB)],  # busiest 0.6
    ]
    mod = fake_pynvml(readings)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    # A long interval: the thread never fires; start and stop take one sample each and
    # the test takes the middle one, so the figures are exact.
    monitor = GpuMonitor(interval_s=3600).start()
    monitor.sample()
    monitor.stop()
    m = monitor.metrics()
    assert m["risk/T-04/gpu_utilization"] == pytest.approx((0.4 + 1.0 + 0.6) / 3)
    assert m["risk/T-04/gpu_utilization_peak"] == 1.0
    assert m["risk/T-04/gpu_memory_fraction"] == pytest.approx(0.9)
    assert monitor.tags() == {
        "risk/T-04/gpu": "0:Fake GPU, 1:Fake GPU",
        "risk/T-04/gpu_samples": "3",
    }
    assert mod.state["shutdowns"] == 1
    monitor.stop()  # idempotent
    assert mod.state["shutdowns"] == 1


def test_monitor_thread_samples_periodically(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([[(50, GIB, 4 * GIB)]]))
    import time

    with GpuMonitor(interval_s=0.01) as monitor:
        time.sleep(0.2)
    assert len(monitor.samples) >= 4
    assert monitor.metrics()["risk/T-04/gpu_utilization"] == 0.5


def test_monitor_keeps_samples_when_the_gpu_disappears(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    mod = fake_pynvml([[(70, GIB, 4 * GIB)]])
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    monitor = GpuMonitor(interval_s=3600).start()

    def lost(h):
        raise RuntimeError("GPU is lost")

    mod.nvmlDeviceGetUtilizationRates = lost
    monitor.stop()
    assert monitor.metrics()["risk/T-04/gpu_utilization"] == 0.7
    assert "GPU is lost" in monitor.tags()["risk/T-04/gpu_note"]


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval_s"):
        GpuMonitor(interval_s=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_nvml_on_a_gpu():
    pytest.importorskip("pynvml", reason="needs nvidia-ml-py")
    block = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # 256 MiB in use
    with GpuMonitor(interval_s=0.2) as monitor:
        for _ in range(50):
            block.add_(1)
        torch.cuda.synchronize()
    snap = gpu_snapshot()
    assert snap["available"] is True
    assert all(0.0 <= g["utilization"] <= 1.0 for g in snap["gpus"])
    assert all(g["memory_used_bytes"] >= 256 << 20 for g in snap["gpus"][:1])
    m = monitor.metrics()
    assert 0.0 <= m["risk/T-04/gpu_utilization"] <= 1.0
    assert 0.0 < m["risk/T-04/gpu_memory_fraction"] <= 1.0
