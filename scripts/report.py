"""Write the audit report of the registered model for the register's monthly / quarterly
review (risk T-08, section 5.3); see configs/report.yaml and docs/review-cycle.md."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import hydra
from omegaconf import DictConfig

from core.config import ConfigError, check_number
from core.files import atomic_write_text
from core.runtime import apply_env_defaults, quiet_console
from training.risk.audit import (
    REVIEW_DAYS,
    build_report,
    check_model,
    period_start,
    render_audit,
)
from training.risk.registry import RegistryError
from training.tracking import existing_store_uri

# before anything imports mlflow (telemetry is decided on import); the user's values win
apply_env_defaults()
quiet_console()


def run_report(cfg: DictConfig, now: datetime | None = None) -> Path:
    """The body of ``scripts/report.py``: check the settings and the store, gather, render,
    write the HTML file atomically; returns its path. ``now`` (UTC) ends the period."""
    review = str(cfg.review)
    if review not in REVIEW_DAYS:
        raise ConfigError(f"review: expected one of {', '.join(REVIEW_DAYS)}, got {review!r}")
    since_days = check_number("since_days", cfg.since_days, low=1, integer=True, optional=True)
    now = now or datetime.now(timezone.utc)
    output = Path(str(cfg.paths.output))
    target = Path(
        str(cfg.output_file or output / "reports" / f"audit-{review}-{now:%Y-%m-%d}.html")
    )
    if target.is_dir():
        raise ConfigError(f"output_file: {target} is a folder; expected an .html file path")
    uri = existing_store_uri(output, cfg.tracking.uri)
    model = check_model(uri, cfg.registry.name)
    since = period_start(now, review, None if since_days is None else int(since_days))
    report = build_report(uri, model, review, since, now)
    page = render_audit(report)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, page)
    print(
        f"{review} audit of {model}: {len(report['versions'])} version(s), "
        f"{len(report['alerts'])} alert(s) since {since:%Y-%m-%d} -> {target}"
    )
    return target


@hydra.main(version_base="1.3", config_path="pkg://configs", config_name="report")
def main(cfg: DictConfig) -> None:
    try:
        run_report(cfg)
    except (ConfigError, RegistryError) as err:  # a message, not a traceback
        print(f"report: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
