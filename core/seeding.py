"""Seeded blocks: the same seed gives the same draws, whatever ran before, and the
process's own random state is put back afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's RNG (CPU and the current CUDA device) seeded by
    ``seed``; restore the previous states on exit."""
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield
