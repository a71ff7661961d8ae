"""Risk T-04's time series: MLflow's own system metrics, logged to a stage's run while
it trains.

:class:`mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor` samples CPU,
memory, disk and network (``psutil``) and, with ``pynvml``, every GPU's utilisation and
memory, as ``system/*`` metrics every ``risk.system_metrics.interval_s`` seconds. The
register's T-04 *summary* (and its "not available" rule) stays with
:class:`training.risk.gpu.GpuMonitor`, which counts only the GPUs the process may use
(``CUDA_VISIBLE_DEVICES``): MLflow's series reports every GPU of the machine.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

#: ``risk.system_metrics`` keys and their defaults (interval 0: off).
SETTINGS: Mapping[str, float] = {"interval_s": 10.0, "samples_before_logging": 1}


def settings_from(risk: Mapping[str, Any]) -> dict[str, float] | None:
    """``risk.system_metrics`` checked: ``{"interval_s", "samples_before_logging"}``, or
    None when off (``interval_s: 0``). Raises :class:`~core.config.ConfigError` naming
    the key (the run calls this before any work)."""
    from core.config import ConfigError

    node = dict(risk.get("system_metrics") or {})
    unknown = sorted(set(node) - set(SETTINGS))
    if unknown:
        raise ConfigError(
            f"risk.system_metrics.{unknown[0]}: unknown key, expected one of {list(SETTINGS)}"
        )
    values = {**SETTINGS, **node}
    interval, samples = values["interval_s"], values["samples_before_logging"]
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval < 0:
        raise ConfigError(
            f"risk.system_metrics.interval_s={interval}: expected seconds >= 0 (0: off)"
        )
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(
            f"risk.system_metrics.samples_before_logging={samples}: expected an integer >= 1"
        )
    if interval == 0:
        return None
    return {"interval_s": float(interval), "samples_before_logging": int(samples)}


def start_system_metrics(
    run_id: str, tracking_uri: str, settings: Mapping[str, float], resume: bool
) -> Any:
    """A started :class:`SystemMetricsMonitor` for ``run_id`` (call ``finish()`` after
    training), or None without ``psutil`` (one warning; nothing else changes)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as exc:
        log.warning("risk.system_metrics: off (%s); pip install psutil", exc)
        return None
    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=float(settings["interval_s"]),
        samples_before_logging=int(settings["samples_before_logging"]),
        resume_logging=resume,
        tracking_uri=tracking_uri,
    )
    monitor.start()
    return monitor


def finish_system_metrics(monitor: Any) -> None:
    """Stop ``monitor`` and log what it sampled since its last point, so a stage shorter
    than the interval (or its last partial interval) still leaves one point per series."""
    if monitor is None:
        return
    monitor.finish()
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as exc:  # the series is a convenience: never fail a stage for it
        log.warning("risk.system_metrics: last point not logged (%s)", exc)
