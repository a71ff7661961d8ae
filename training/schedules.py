"""Learning-rate schedules as pure functions of the step (no hidden counters)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0, floor: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer ``step``.

    Linear warm-up from 0 over ``warmup_steps``, then a cosine decay to ``floor`` at
    ``total_steps``; constant ``floor`` afterwards.

    >>> [round(warmup_cosine(s, 10, 2), 3) for s in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    if total_steps <= 0:
        return 1.0
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
