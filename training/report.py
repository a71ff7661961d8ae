"""The results table printed after training and saved next to the runs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

COLUMNS = (
    ("sim mIoU", "test/sim/miou"),
    ("real mIoU", "test/real/miou"),
    ("gap (sim - real)", "test/gap/miou"),
    ("real pixel acc", "test/real/pixel_acc"),
)


def results_table(results: Mapping[str, Any]) -> str:
    """A Markdown table: one row per stage, test mIoU on sim and real and their gap (%)."""
    lines = [
        "| stage | " + " | ".join(c for c, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for name, res in results.items():
        cells = []
        for _, key in COLUMNS:
            v = res.metrics.get(key, math.nan)
            cells.append("n/a" if not math.isfinite(v) else f"{100 * v:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
