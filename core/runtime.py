"""What every entry point sets up first: environment defaults and a quiet console.

``scripts/*.py`` call :func:`apply_env_defaults` before anything imports MLflow, and
:func:`quiet_console` once logging is configured (inside the ``@hydra.main`` function).

- **Telemetry**: MLflow 3 sends usage telemetry (a DNS lookup and an HTTPS request per
  process) unless ``MLFLOW_DISABLE_TELEMETRY`` (or ``DO_NOT_TRACK``) is true; it decides
  when ``mlflow`` is imported. The project turns it off by default; a value already in the
  user's environment is kept (``MLFLOW_DISABLE_TELEMETRY=false python scripts/train.py``
  turns it back on). Child processes (sweep jobs, the monitor's retraining) inherit it.
  ``MLFLOW_LOGGING_LEVEL`` defaults to WARNING the same way (``=INFO`` shows MLflow's
  messages again).
- **Console**: one line per stage. Lightning's and MLflow's informational chatter (model
  summary, accelerator lines, tips, checkpoint restores, database migrations) and a few
  known third-party deprecation warnings are hidden; a logger the user made verbose
  (``hydra.verbose=[pytorch_lightning]``, ``hydra.verbose=true``) keeps its level.
"""

from __future__ import annotations

import logging
import os
import warnings

#: Environment defaults: set unless the user's environment already has a value.
ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # read once, when mlflow is imported
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # mlflow sets its loggers' level from it on import
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no bar per downloaded artifact
}
#: Loggers lowered to WARNING by :func:`quiet_console` (unless set to DEBUG by the user).
CHATTY_LOGGERS = (
    "pytorch_lightning",
    "lightning",
    "lightning.pytorch",
    "lightning_fabric",
    "mlflow",
    "alembic",
)
#: Third-party warnings that say nothing about this project's runs (message regexes).
KNOWN_WARNINGS = (
    r"The specified dataset source can be interpreted in multiple ways",  # mlflow.data
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # pytorch_lightning + torch 2.10
    r".*does not have many workers which may be a bottleneck",  # num_workers=0 on purpose
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)


def apply_env_defaults(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set :data:`ENV_DEFAULTS` in ``environ`` (``os.environ``) where unset; return what
    was set."""
    env = os.environ if environ is None else environ
    added = {}
    for key, value in ENV_DEFAULTS.items():
        if key not in env:
            env[key] = value
            added[key] = value
    return added


def quiet_console(verbose: bool = False) -> None:
    """Hide third-party chatter: :data:`CHATTY_LOGGERS` to WARNING (a logger set to DEBUG,
    as ``hydra.verbose`` does, is left alone) and :data:`KNOWN_WARNINGS` filtered.
    ``verbose=True`` does nothing."""
    if verbose:
        return
    for name in CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.DEBUG:
            continue  # the user asked for this one
        logger.setLevel(logging.WARNING)
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


__all__ = ["CHATTY_LOGGERS", "ENV_DEFAULTS", "apply_env_defaults", "quiet_console"]
