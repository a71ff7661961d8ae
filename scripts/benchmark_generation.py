"""Benchmark of data generation: frames/s in memory and written to disk with the manifest.

    python scripts/benchmark_generation.py                       # 128x256, full preset
    python scripts/benchmark_generation.py --kernels fused       # one path only
    python scripts/benchmark_generation.py --kernels fused --isa baseline avx2 avx512
    python scripts/benchmark_generation.py --stages --frames 512   # ms per pass, one thread
    python scripts/benchmark_generation.py --compile             # + torch.compile'd kernels
    python scripts/benchmark_generation.py --frames 2000 --preset light
    python scripts/benchmark_generation.py --preset appearance --photo-preset camera_world

Prints one row per (style, passes, stage), the passes side by side in one run: ``torch``
(the tensor kernels), ``compiled`` (the same through torch.compile, with ``--compile``)
and ``fused`` (the compiled C loops, where ``pip install`` built them). "sample" times
the scene-parameter sampling alone, "memory" ``backend.render`` (sampling included),
"disk" the whole ``generate`` path: rendering, atomic shard writes with checksums,
manifest, card and contact sheet. Warm-up batches are rendered first and not timed.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from core.paths import config_dir
from simulation.dataset import DatasetWriter
from simulation.generation import generate_shards
from simulation.procedural import ProceduralBackend, fused

CONFIGS = config_dir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1024)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--preset", default="full", help="randomization preset")
    ap.add_argument(
        "--photo-preset",
        default=None,
        help="preset of the photo style (default: --preset); camera_world: data=procedural's",
    )
    ap.add_argument("--styles", nargs="+", default=["sim", "photo"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--compile", action="store_true", help="also torch.compile the kernels")
    ap.add_argument(
        "--kernels",
        nargs="+",
        default=["torch", "fused"] if fused.available() else ["torch"],
        choices=["torch", "fused"],
        help="the per-pixel passes to time (default: both, where fused was built)",
    )
    ap.add_argument(
        "--isa",
        nargs="+",
        default=None,
        choices=fused.ISA_NAMES,
        help="instruction sets to time the fused passes with, side by side (default: the "
        "widest this CPU has); a set the CPU lacks runs as the widest it has",
    )
    ap.add_argument(
        "--stages",
        action="store_true",
        help="instead: ms per frame of each fused pass and of the Python layout, on one thread",
    )
    args = ap.parse_args()
    if args.stages:
        _stages(args)
        return
    if "fused" in args.kernels and not fused.available():
        ap.error("--kernels fused: the compiled passes were not built by pip install here")
    widest = fused.isa() if fused.available() else None
    isas = args.isa or [widest]
    paths = [(k, False, None) for k in args.kernels if k != "fused"]
    paths += [("fused", False, i) for i in isas if "fused" in args.kernels]
    paths += [("torch", True, None)] if args.compile else []

    taxonomy = instantiate(OmegaConf.load(CONFIGS / "taxonomy/drive11.yaml"))
    presets = {"sim": args.preset, "photo": args.photo_preset or args.preset}
    randomizers = {style: instantiate(_preset(name)) for style, name in presets.items()}
    print(
        f"# {date.today()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"{args.frames} frames {args.height}x{args.width}, presets {presets}, "
        f"batch {args.batch_size}; fused passes built for up to {widest}"
    )
    print(f"{'style':6s} {'passes':15s} {'stage':7s} {'frames/s':>9s} {'ms/frame':>9s}")
    for style in args.styles:
        randomizer = randomizers[style]
        start = time.perf_counter()
        for i in range(args.frames):
            randomizer.sample(0, i)
        _row(style, "-", "sample", args.frames, time.perf_counter() - start)
        for kernels, compiled, isa in paths:
            if isa is not None:
                isa = fused.isa(isa)  # the set that runs: at most the widest the CPU has
            backend = ProceduralBackend(
                randomizer,
                taxonomy,
                seed=0,
                height=args.height,
                width=args.width,
                style=style,
                batch_size=args.batch_size,
                compile=compiled,
                kernels=kernels,
            )
            name = "compiled" if compiled else kernels
            name += f"/{isa}" if isa is not None and len(isas) > 1 else ""
            backend.render(list(range(10**6, 10**6 + args.batch_size)))  # warm-up (and compile)
            start = time.perf_counter()
            for lo in range(0, args.frames, args.shard_size):
                backend.render(list(range(lo, min(lo + args.shard_size, args.frames))))
            _row(style, name, "memory", args.frames, time.perf_counter() - start)
            with tempfile.TemporaryDirectory() as tmp:
                writer = DatasetWriter(Path(tmp) / "ds", args.frames, args.shard_size, {"b": 1})
                start = time.perf_counter()
                result = generate_shards(backend, writer, writer.open(), taxonomy, progress=False)
                _row(style, name, "disk", result.frames, time.perf_counter() - start)


def _stages(args) -> None:
    """Where a frame's time goes: each fused pass and the Python around them, timed by
    wrapping them, one thread, one batch after a warm-up batch."""
    import collections
    import functools

    from simulation.procedural import renderer

    if not fused.available():
        raise SystemExit("--stages: the compiled passes were not built by pip install here")
    torch.set_num_threads(1)
    spent: collections.Counter = collections.Counter()

    def timed(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] += time.perf_counter() - start

        setattr(owner, name, wrapper)

    for name in ("surfaces", "sprites", "shade", "camera", "sensor", "finish"):
        timed(fused, name, f"pass {name}")
    timed(renderer, "make_street", "python street layout")
    timed(renderer, "make_objects", "python object layout")
    taxonomy = instantiate(OmegaConf.load(CONFIGS / "taxonomy/drive11.yaml"))
    print(f"# {date.today()}, one thread, {args.frames} frames {args.height}x{args.width}")
    for style in args.styles:
        preset = args.photo_preset if style == "photo" and args.photo_preset else args.preset
        randomizer = instantiate(_preset(preset))
        timed(randomizer, "sample", "python scene sampling")
        backend = ProceduralBackend(
            randomizer, taxonomy, 0, args.height, args.width, style, args.batch_size
        )
        backend.render(list(range(10**6, 10**6 + args.batch_size)))  # warm-up
        spent.clear()
        start = time.perf_counter()
        backend.render(list(range(args.frames)))
        total = time.perf_counter() - start
        print(f"{style}: {1000 * total / args.frames:.2f} ms a frame in all")
        for label, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
            print(f"  {label:24s} {1000 * seconds / args.frames:6.3f}")
        rest = total - sum(spent.values())
        print(f"  {'other (glue)':24s} {1000 * rest / args.frames:6.3f}")
        backend.close()


def _preset(name: str):
    """A preset of configs/randomization/, or ``camera_world``: the real splits' world."""
    if name == "camera_world":
        return OmegaConf.load(CONFIGS / "data/procedural.yaml").generate.camera_world
    return OmegaConf.load(CONFIGS / f"randomization/{name}.yaml")


def _row(style: str, passes: str, stage: str, frames: int, seconds: float) -> None:
    rate, ms = frames / seconds, 1000 * seconds / frames
    print(f"{style:6s} {passes:15s} {stage:7s} {rate:9.1f} {ms:9.2f}", flush=True)


if __name__ == "__main__":
    main()
