"""The embedded default backend: procedural streets rendered on the CPU, no server."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from simulation.frames import FrameBatch
from simulation.procedural.fused import resolve_kernels
from simulation.procedural.renderer import ProceduralRenderer
from simulation.procedural.styles import get_style
from simulation.randomization import DomainRandomizer
from simulation.taxonomy import Taxonomy

#: Bumped whenever the same parameters would render different pixels; the backend's
#: ``version`` adds the passes (``-fused`` or ``-torch``), which agree within float rounding.
RENDERER_VERSION = "2"

#: Pixels per piece a render thread takes at a time with the fused passes (32 frames at
#: 128x256): their buffers (about 50 MB) stay in cache and are reused by the allocator
#: instead of being mapped afresh; 128-frame pieces spent 0.5-0.9 ms a frame more in
#: the kernel (page faults) on the 2-core machine (scripts/benchmark_generation.py).
PIECE_PIXELS = 32 * 128 * 256


class ProceduralBackend:
    """Procedural backend: frames depend only on ``(seed, index)``, in any batch.

    Args:
        randomizer: the shared scene-parameter sampler.
        taxonomy: label taxonomy (must contain the 11 street classes).
        seed: dataset seed.
        height, width: image size in pixels (positive).
        style: ``"sim"`` or ``"photo"``.
        batch_size: frames rendered together (peak memory about 2 MB per 128x256 frame).
        compile: run the tensor kernels through ``torch.compile`` (after a one-off
            compilation of 10-60 s); only with ``kernels: torch``.
        kernels: how the per-pixel passes run. ``fused``: compiled C loops
            (:mod:`.fused`, built by ``pip install`` where a C compiler is found),
            several times faster; ``torch``: the tensor kernels of :mod:`.kernels`;
            ``auto`` (default): ``fused`` where it was built (and ``compile`` is off),
            else ``torch``. The two agree to within float rounding; the frames' records
            and the dataset card name the one used (``backend_version``).
    """

    name = "procedural"

    def __init__(
        self,
        randomizer: DomainRandomizer,
        taxonomy: Taxonomy,
        seed: int,
        height: int,
        width: int,
        style: str = "sim",
        batch_size: int = 64,
        compile: bool = False,
        kernels: str = "auto",
    ) -> None:
        for key, value in (("image.height", height), ("image.width", width)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"{key}: expected a positive whole number of pixels, got {value!r}"
                )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"backend.batch_size: expected a positive number, got {batch_size}")
        self.randomizer, self.taxonomy, self.seed = randomizer, taxonomy, int(seed)
        try:
            self.style = get_style(style)
        except ValueError as exc:
            raise ValueError(f"backend.{exc}") from None
        reserved = [] if self.style.photo_only_looks else randomizer.photo_only_keys()
        if reserved:
            raise ValueError(
                f"{reserved[0]}: only the photo style (the stand-in for a real camera) renders "
                f"this look; the {self.style.name} style cannot sample it (set its weight to 0)"
            )
        self.batch_size = batch_size
        self._pool: ThreadPoolExecutor | None = None
        self.kernels = resolve_kernels(kernels, bool(compile))
        self.renderer = ProceduralRenderer(
            height,
            width,
            self.style,
            {c: i for i, c in enumerate(taxonomy.classes)},
            compile,
            self.kernels,
        )
        from importlib.metadata import PackageNotFoundError, version

        try:
            pkg = version("sim2real-drive")
        except PackageNotFoundError:  # running from a source tree
            pkg = "dev"
        self.version = f"{pkg}+renderer{RENDERER_VERSION}-{self.kernels}"

    def render(self, indices: Sequence[int]) -> FrameBatch:
        """Render the frames with these dataset indices.

        With the fused passes and more than one thread, pieces of the request render on
        that many Python threads at once, each pass on one core: the compiled loops run
        without the GIL, so one thread's loops overlap another's parameter sampling and
        layout. Frames depend only on their index, so the output is the same.
        """
        indices = [int(i) for i in indices]
        workers = torch.get_num_threads() if self.kernels == "fused" else 1
        step = max(1, min(self.batch_size, -(-len(indices) // max(workers, 1))))
        if self.kernels == "fused":
            h, w = self.renderer.height, self.renderer.width
            step = min(step, max(1, PIECE_PIXELS // (h * w)))
        pieces = [indices[s : s + step] for s in range(0, len(indices), step)]
        if workers > 1 and len(pieces) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="render")
            parts = list(self._pool.map(lambda piece: self._render(piece, 1), pieces))
        else:
            parts = [self._render(piece, None) for piece in pieces]
        return FrameBatch(
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
            [rec for p in parts for rec in p[2]],
        )

    def _render(self, chunk: list[int], threads: int | None):
        """``(images (n, H, W, 3) uint8, masks (n, H, W) uint8, records)`` of ``chunk``."""
        params = [self.style.adjust(self.randomizer.sample(self.seed, i)) for i in chunk]
        keys = [(self.seed, i) for i in chunk]
        image, mask = self.renderer.render(params, keys, threads)
        records = [
            {
                "index": i,
                "seed": self.seed,
                "backend": self.name,
                "backend_version": self.version,
                "style": self.style.name,
                "map": p.map,
                "group": p.group,
                "params": p.to_dict(),
            }
            for i, p in zip(chunk, params, strict=True)
        ]
        return image, mask, records

    def prepare(self) -> None:
        """Nothing to connect to: the procedural backend is always ready."""

    def close(self) -> None:
        """Stop the render threads, if any were started."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
