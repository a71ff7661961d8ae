"""Generating a dataset: configured backend -> shards on disk -> manifest, card, contact sheet.

:func:`run_generate` is the body of ``scripts/generate.py``; it checks the whole config
before the first frame, resumes an interrupted dataset, and can split the shards over
several jobs of a Hydra multirun (``parallel.index`` / ``parallel.count``).

Two identical commands at once do not collide: each job holds the dataset's generation
lock (:func:`generation_lock_path`, one per ``parallel`` slice, so the jobs of a multirun
still write side by side) while it writes, so the second waits and then finds its shards
done.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from core.config import ConfigError, instantiate_checked
from core.locks import exclusive
from simulation.dataset import (
    CARD_FILE,
    LOCK_PREFIX,
    DatasetWriter,
    GeneratedDataset,
    atomic_write_bytes,
    no_space_is_clear,
    shard_ranges,
)
from simulation.frames import Backend
from simulation.taxonomy import Taxonomy

log = logging.getLogger(__name__)

CONTACT_SHEET = "contact_sheet.png"

# Backend arguments that change speed or where frames come from, never their content.
_NON_CONTENT_KEYS = {
    "batch_size",
    "compile",
    "kernels",  # fused and torch passes agree within float rounding; the card says which
    "host",
    "port",
    "timeout_s",
    "retries",
    "backoff_s",
    "tm_port",
    "episode_retries",
}


@dataclass
class GenerationResult:
    """What :func:`generate_shards` did."""

    root: Path
    frames: int
    seconds: float
    complete: bool

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("nan")


def check_positive_int(value: Any, key: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``, else a :class:`ConfigError` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"{key}: expected a whole number >= {minimum}, got {value!r}")
    return int(value)


def check_dataset_name(name: Any) -> str:
    """``name`` as a plain folder name: it becomes ``data/<name>`` (the default
    ``output_dir``), so a path separator or ``..`` would write the dataset elsewhere."""
    text = "" if name is None else str(name)
    if not text.strip() or text == "." or any(bad in text for bad in ("/", "\\", "..", "\0")):
        raise ConfigError(
            f"name: expected a plain dataset name (no path separators, no '..'; it names the "
            f"folder data/<name>), got {text!r}; choose another folder with output_dir=..."
        )
    return text


def generation_lock_path(root: Path, index: int = 0, count: int = 1) -> Path:
    """The lock a generate job holds on dataset ``root`` while it writes: one per
    ``parallel`` slice (``.generation.lock`` for a single job), so identical commands wait
    for each other while the jobs of one multirun write their shards side by side."""
    suffix = "" if count == 1 else f"-{index}-of-{count}"
    return Path(root) / f"{LOCK_PREFIX}{suffix}.lock"


def my_shards(missing: Sequence[int], index: int, count: int) -> list[int]:
    """The missing shards job ``index`` of ``count`` parallel jobs takes (round robin)."""
    count = check_positive_int(count, "parallel.count")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ConfigError(f"parallel.index: expected 0 <= index < {count}, got {index!r}")
    return [k for k in missing if k % count == index]


def generate_shards(
    backend: Backend,
    writer: DatasetWriter,
    shard_ids: Sequence[int],
    taxonomy: Taxonomy,
    progress: bool = True,
) -> GenerationResult:
    """Render and write ``shard_ids``; finalize the dataset when no shard is missing.

    A shard is written atomically, so a run killed at any point leaves only complete
    shards behind and the next run continues with the missing ones. Shard ``k`` is
    written (checksums, files, fsync) on a second thread while shard ``k + 1`` renders;
    at most one write is pending, and a failed write stops the run with its error.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    ranges = writer.ranges
    total = sum(len(ranges[k]) for k in shard_ids)
    start = time.perf_counter()
    with (
        tqdm(total=total, unit="frame", disable=not progress, desc="generate") as bar,
        ThreadPoolExecutor(1, thread_name_prefix="shard-writer") as pool,
    ):
        pending = None
        try:
            for k in shard_ids:
                batch = backend.render(list(ranges[k]))
                if pending is not None:
                    bar.update(pending.result())
                pending = pool.submit(_write, writer, k, batch)
            if pending is not None:
                bar.update(pending.result())
        finally:
            if pending is not None:
                pending.exception()  # a write in flight finishes (or fails) before we leave
    seconds = time.perf_counter() - start
    missing = [k for k in range(writer.num_shards) if not writer.shard_dir(k).is_dir()]
    complete = not missing
    if complete and not (writer.root / CARD_FILE).exists():
        writer.finalize(taxonomy.num_classes, list(taxonomy.classes))
        with no_space_is_clear(writer.root, CONTACT_SHEET):
            contact_sheet(GeneratedDataset(writer.root), taxonomy, writer.root / CONTACT_SHEET)
    return GenerationResult(writer.root, total, seconds, complete)


def _write(writer: DatasetWriter, shard_id: int, batch) -> int:
    writer.write_shard(shard_id, batch)
    return len(batch)


def contact_sheet(
    dataset: GeneratedDataset, taxonomy: Taxonomy, path: Path, per_group: int = 2
) -> Path:
    """A PNG with ``per_group`` frames of every condition group: image above colour mask.

    Columns are condition groups (labelled), so a reviewer sees at a glance what each
    group looks like and whether the labels sit on the objects.
    """
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(dataset.groups):
        if len(by_group.setdefault(g, [])) < per_group:
            by_group[g].append(i)
    groups = sorted(by_group)
    h, w = dataset.image_size
    pad, title = 4, 14
    sheet = Image.new(
        "RGB",
        (len(groups) * (w + pad) + pad, per_group * (2 * h + pad) + title + pad),
        (24, 24, 24),
    )
    draw = ImageDraw.Draw(sheet)
    for col, g in enumerate(groups):
        x = pad + col * (w + pad)
        draw.text((x, 2), g, fill=(230, 230, 230))
        images, masks = dataset.get_batch(by_group[g])
        for row, (img, mask) in enumerate(zip(images, masks, strict=True)):
            y = title + row * (2 * h + pad)
            sheet.paste(Image.fromarray(img), (x, y))
            sheet.paste(Image.fromarray(taxonomy.colorize(mask)), (x, y + h))
    import io

    buf = io.BytesIO()
    # a preview: the fastest deflate level (0.3 s of level 6's encoding per dataset before)
    sheet.save(buf, format="PNG", compress_level=1)
    atomic_write_bytes(path, buf.getvalue())
    return path


def backend_fingerprint(backend_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The backend config minus the keys that cannot change the frames."""
    return {k: v for k, v in backend_cfg.items() if k not in _NON_CONTENT_KEYS}


def run_generate(cfg: Any) -> GenerationResult:
    """Generate the dataset a resolved Hydra config describes (see ``configs/generate.yaml``).

    Everything is checked -- counts, image size, randomization, taxonomy, style -- before
    the first frame is rendered.
    """
    from omegaconf import OmegaConf

    name = check_dataset_name(cfg.get("name"))
    num_frames = check_positive_int(cfg.num_frames, "num_frames")
    shard_size = check_positive_int(cfg.shard_size, "shard_size")
    seed = check_positive_int(cfg.seed, "seed", minimum=0)
    height = check_positive_int(cfg.image.height, "image.height")
    width = check_positive_int(cfg.image.width, "image.width")
    if not cfg.get("output_dir"):
        raise ConfigError("output_dir: expected the dataset folder, got nothing")
    shard_ranges(num_frames, shard_size)
    index, count = cfg.parallel.index, cfg.parallel.count
    my_shards([], index, count)  # checks parallel.index / parallel.count
    taxonomy: Taxonomy = instantiate_checked(cfg.taxonomy)
    randomizer = instantiate_checked(cfg.randomization)
    backend_cfg = OmegaConf.to_container(cfg.backend, resolve=True)
    servers = list(cfg.parallel.get("servers") or [])
    if servers:  # one CARLA server per job: job i talks to servers[i % len(servers)]
        host, _, port = str(servers[index % len(servers)]).rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"parallel.servers: expected 'host:port' entries, got {servers}")
        backend_cfg.update(host=host, port=int(port))
    # objects go in after instantiation: Hydra would try to turn them into config nodes
    make_backend = instantiate_checked(backend_cfg, _partial_=True)
    backend = make_backend(
        randomizer=randomizer, taxonomy=taxonomy, seed=seed, height=height, width=width
    )
    style = backend_cfg.get("style")
    domain = cfg.get("domain")
    if domain is None:
        domain = 1 if style == "photo" else 0  # photo stands in for the real camera
    fingerprint = {
        "seed": seed,
        "image_size": [height, width],
        "backend": backend_fingerprint(backend_cfg),
        "randomization": OmegaConf.to_container(cfg.randomization, resolve=True),
        "taxonomy_hash": taxonomy.hash,
    }
    card_extra = {
        "name": name,
        "domain": int(domain),
        "style": style,
        "backend": backend.name,
        "backend_version": backend.version,
        "taxonomy": taxonomy.to_dict(),
        "randomization_groups": randomizer.groups,
        # each group's share of the frames: the joint `groups` table, or the product of the
        # independent time_of_day and condition probabilities
        "randomization_group_weights": {
            g: round(w, 6) for g, w in randomizer.group_weights.items()
        },
    }
    writer = DatasetWriter(
        Path(cfg.output_dir),
        num_frames,
        shard_size,
        fingerprint,
        card_extra,
        overwrite=bool(cfg.overwrite),
    )
    try:
        done = (writer.root / CARD_FILE).exists()
        if not done:
            backend.prepare()  # e.g. reach the CARLA server before touching the folder
        # a complete dataset needs no lock (and may sit on a read-only disk)
        lock = (
            contextlib.nullcontext()
            if done
            else exclusive(generation_lock_path(writer.root, index, count), f"dataset {name}")
        )
        with lock:
            shard_ids = my_shards(writer.open(), index, count)
            result = generate_shards(backend, writer, shard_ids, taxonomy, bool(cfg.progress))
    finally:
        backend.close()
    if result.frames:
        log.info(
            "generated %d frames in %.1f s (%.1f frames/s) into %s",
            result.frames,
            result.seconds,
            result.frames_per_second,
            result.root,
        )
    status = "complete" if result.complete else "incomplete (other jobs still writing)"
    log.info("dataset %s: %s", result.root, status)
    return result
