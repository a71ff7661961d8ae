"""Risk O-01 (operating cost over budget): a device-hour cost ledger and its daily ratio.

The register's alert is "daily cost > 120 % of the budget". A run's cost is

    cost = device_hours * price_per_device_hour

where ``device_hours`` is wall-clock hours times the number of devices (4 GPUs for 30
minutes = 2 device-hours; :func:`device_hours` does the conversion). Each run's cost is
written to a JSON ledger shared by all runs (a sweep's runs, resumed runs, other
machines on a shared disk); the daily cost is the sum over the ledger's runs of that day.

Days are UTC calendar days: a run is attributed to the day of its ``when`` (default: the
moment it is recorded), converted to UTC; a naive datetime is taken as UTC.

The ledger is safe to share: every write is atomic (temporary file + ``os.replace``), so
a crash never leaves half a file, and on POSIX a lock file serializes the
read-modify-write of concurrent recorders so no entry is lost. Recording a ``run_id``
again replaces its entry: a resumed run records its cumulative device-hours and is not
counted twice.

Example:
    >>> tracker = CostTracker("outputs/cost-ledger.json", price_per_device_hour=2.5,
    ...                       daily_budget=100.0)
    >>> tracker.record("run-1", device_hours(seconds=3600, devices=4))   # 4 device-h
    10.0
    >>> tracker.metrics()["risk/O-01/daily_cost_ratio"]                   # 10 / 100
    0.1
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_ALERT_RATIO", "CostTracker", "device_hours"]

#: The register's alert: daily cost above 120 % of the daily budget.
DEFAULT_ALERT_RATIO = 1.2
_LEDGER_VERSION = 1


def _check_number(key: str, value: float, positive: bool = False) -> float:
    """``value`` as a float, or a ValueError naming the config ``key``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a number, got {value!r}") from None
    bad = not math.isfinite(value) or (value <= 0 if positive else value < 0)
    if bad:
        expected = "a finite number > 0" if positive else "a finite number >= 0"
        raise ValueError(f"{key}: expected {expected}, got {value}")
    return value


def device_hours(seconds: float, devices: int = 1) -> float:
    """Device-hours of ``devices`` devices busy for ``seconds`` of wall-clock time.

    Example:
        >>> device_hours(1800, devices=4)
        2.0
    """
    seconds = _check_number("seconds", seconds)
    if int(devices) != devices or devices < 1:
        raise ValueError(f"devices: expected an integer >= 1, got {devices!r}")
    return seconds * int(devices) / 3600.0


def _utc_day(when: datetime) -> date:
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).date()


def _as_day(day: date | datetime | str | None) -> date:
    if day is None:
        return datetime.now(timezone.utc).date()
    if isinstance(day, datetime):
        return _utc_day(day)
    if isinstance(day, date):
        return day
    try:
        return date.fromisoformat(day)
    except ValueError:
        raise ValueError(f"day: expected YYYY-MM-DD, got {day!r}") from None


class CostTracker:
    """Cost of training runs in a JSON ledger, and the daily cost against a budget.

    Args:
        ledger_path: the JSON ledger (created on the first :meth:`record`; its folder too).
        price_per_device_hour: price of one device for one hour, in ``currency`` (>= 0;
            0 for hardware that is already paid for). Config key
            ``risk.cost.price_per_device_hour``.
        daily_budget: budget per UTC day, in ``currency`` (> 0). Config key
            ``risk.cost.daily_budget``.
        currency: ISO code; a ledger written in another currency is refused (``risk.cost.
            currency``), since summing USD and JPY would be meaningless.
        alert_ratio: ``daily_cost / daily_budget`` above which ``over_budget`` is 1.0 (the
            register's 1.2). Config key ``risk.cost.alert_ratio``.

    Raises:
        ValueError: a negative or non-finite price, a budget <= 0, an alert ratio <= 0, or
            an existing ledger that is unreadable or in another currency; the message
            names the key or file.
    """

    def __init__(
        self,
        ledger_path: str | os.PathLike[str],
        price_per_device_hour: float,
        daily_budget: float,
        currency: str = "USD",
        alert_ratio: float = DEFAULT_ALERT_RATIO,
    ) -> None:
        self.price_per_device_hour = _check_number(
            "risk.cost.price_per_device_hour", price_per_device_hour
        )
        # A zero budget would make the ratio infinite for any cost: refuse it up front.
        self.daily_budget = _check_number("risk.cost.daily_budget", daily_budget, positive=True)
        self.alert_ratio = _check_number("risk.cost.alert_ratio", alert_ratio, positive=True)
        if not isinstance(currency, str) or not currency.strip():
            raise ValueError(f"risk.cost.currency: expected a currency code, got {currency!r}")
        self.currency = currency.strip().upper()
        self.ledger_path = Path(ledger_path)
        self.last_run_id: str | None = None
        self._load()  # fail now, before training, on a corrupt ledger or a wrong currency

    # -- ledger I/O ---------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        if not self.ledger_path.exists():
            return {"version": _LEDGER_VERSION, "currency": self.currency, "runs": {}}
        try:
            ledger = json.loads(self.ledger_path.read_text(encoding="utf-8"))
            runs = ledger["runs"]
            if not isinstance(runs, dict):
                raise TypeError("'runs' is not an object")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{self.ledger_path}: not a cost ledger ({type(err).__name__}: {err})"
            ) from err
        if ledger.get("currency") != self.currency:
            raise ValueError(
                f"risk.cost.currency: {self.currency!r}, but the ledger {self.ledger_path} "
                f"is in {ledger.get('currency')!r}; use another ledger_path or currency"
            )
        return ledger

    def _write(self, ledger: dict[str, Any]) -> None:
        folder = self.ledger_path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.ledger_path.name}.", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(ledger, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.ledger_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize read-modify-write between processes (POSIX ``flock``; a no-op
        elsewhere, where the atomic replace still prevents torn files)."""
        self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # Windows
            yield
            return
        lock_path = self.ledger_path.with_name(self.ledger_path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- public API ---------------------------------------------------------------------

    def record(
        self,
        run_id: str,
        device_hours: float,
        devices: int = 1,
        when: datetime | None = None,
    ) -> float:
        """Write (or replace) ``run_id``'s entry and return its cost in ``currency``.

        Args:
            run_id: the run's id (e.g. the MLflow run id); recording it again replaces
                the entry, so pass a resumed run's *cumulative* device-hours.
            device_hours: total device-hours of the run (wall-clock hours x devices; see
                :func:`device_hours`), >= 0.
            devices: number of devices, kept in the ledger for the record; it does not
                multiply ``device_hours``, which already includes it.
            when: when the run ran (its day is its UTC date); default now.

        Returns:
            ``device_hours * price_per_device_hour``.
        """
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run_id: expected a non-empty string, got {run_id!r}")
        hours = _check_number("device_hours", device_hours)
        if int(devices) != devices or devices < 1:
            raise ValueError(f"devices: expected an integer >= 1, got {devices!r}")
        when = when or datetime.now(timezone.utc)
        cost = hours * self.price_per_device_hour
        with self._locked():
            ledger = self._load()
            ledger["runs"][run_id] = {
                "device_hours": hours,
                "devices": int(devices),
                "price_per_device_hour": self.price_per_device_hour,
                "cost": cost,
                "when": when.isoformat(),
                "day": _utc_day(when).isoformat(),
            }
            self._write(ledger)
        self.last_run_id = run_id
        return cost

    def runs(self) -> dict[str, dict[str, Any]]:
        """The ledger's entries, ``run_id -> {device_hours, devices, cost, day, ...}``."""
        return dict(self._load()["runs"])

    def run_cost(self, run_id: str) -> float:
        """The recorded cost of ``run_id``; KeyError when it is not in the ledger."""
        runs = self.runs()
        if run_id not in runs:
            raise KeyError(f"run_id {run_id!r} is not in the ledger {self.ledger_path}")
        return float(runs[run_id]["cost"])

    def daily_cost(self, day: date | datetime | str | None = None) -> float:
        """Sum of the costs of the runs of UTC ``day`` (default today), in ``currency``.

        Each entry keeps the price it was recorded with, so a price change applies to
        new runs only.
        """
        key = _as_day(day).isoformat()
        return float(sum(e["cost"] for e in self.runs().values() if e["day"] == key))

    def metrics(
        self,
        day: date | datetime | str | None = None,
        run_id: str | None = None,
        prefix: str = "risk/O-01/",
    ) -> dict[str, float]:
        """Flat float metrics for MLflow (amounts in ``currency``).

        Args:
            day: UTC day of the daily figures; default today.
            run_id: whose ``run_cost``; default the last run recorded by this tracker.
                Without either, ``run_cost`` is left out.
            prefix: prepended to every key.

        Returns:
            ``<prefix>run_cost``, ``<prefix>daily_cost``, ``<prefix>daily_budget``,
            ``<prefix>daily_cost_ratio`` (daily cost / budget; the alert is > 1.2) and
            ``<prefix>over_budget`` (1.0 when the ratio exceeds ``alert_ratio``).
        """
        daily = self.daily_cost(day)
        ratio = daily / self.daily_budget
        out: dict[str, float] = {}
        run_id = run_id or self.last_run_id
        if run_id is not None:
            out[f"{prefix}run_cost"] = self.run_cost(run_id)
        out[f"{prefix}daily_cost"] = daily
        out[f"{prefix}daily_budget"] = self.daily_budget
        out[f"{prefix}daily_cost_ratio"] = ratio
        out[f"{prefix}over_budget"] = float(ratio > self.alert_ratio)
        return out
