"""The generated dataset on disk: an atomic, resumable shard writer and a verifying reader.

Layout of a dataset folder ``root/``::

    root/generation.json                 fingerprint + frame/shard counts (written at open)
    root/shards/000000/images.npy        (n, H, W, 3) uint8 RGB
    root/shards/000000/masks.npy         (n, H, W) uint8 taxonomy indices, 255 = ignore
    root/shards/000000/records.jsonl     one provenance dict per frame, in index order
    root/shards/000000/stats.json        histogram, groups and checksums of the shard
    root/manifest.jsonl                  every record in dataset-index order (+ shard, offset)
    root/card.json                       written last: its presence means "complete"
    root/.verified-<key>.json            cache of a passed :meth:`GeneratedDataset.verify_cached`
    root/.generation*.lock               held while a generate command writes (never deleted)

The card carries its own checksum, ``card_sha256``: the sha256 of the card's canonical JSON
without that field (:func:`card_checksum`), checked on every read, so a card edited by
hand is named as such. Cards written before it existed are still read (with a log line).

A shard folder only ever exists under its final name once it is complete: it is
written as ``shards/.tmp-000003-<pid>-<rand>/``, its files are fsynced, and the
folder is renamed in one step. A killed run therefore leaves only complete shards
(plus temporary folders that the next :meth:`DatasetWriter.open` removes), and
rerunning the same generation resumes with the missing shards.

Arrays are stored as uncompressed ``.npy`` so the reader can memory-map them and the
writer is bounded by disk and hashing speed, not by compression.

Example:
    >>> writer = DatasetWriter(root, num_frames=1000, shard_size=100, fingerprint=fp)
    >>> for k in writer.open():
    ...     writer.write_shard(k, backend.render(shard_ranges(1000, 100)[k]))
    >>> card = writer.finalize(tax.num_classes, list(tax.classes))
    >>> ds = GeneratedDataset(root, expected_taxonomy_hash=tax.hash)
    >>> ds[0]["image"].shape
    torch.Size([3, 128, 256])
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import shutil
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset

from core.files import atomic_write_bytes, atomic_write_json, fsync_dir, unique_suffix, writer_alive
from simulation.frames import FrameBatch

log = logging.getLogger(__name__)

__all__ = [
    "CARD_FILE",
    "FORMAT_VERSION",
    "GENERATION_FILE",
    "MANIFEST_FILE",
    "SHARD_FILES",
    "DatasetError",
    "DatasetWriter",
    "DiskFullError",
    "GeneratedDataset",
    "card_checksum",
    "no_space_is_clear",
    "shard_ranges",
]

FORMAT_VERSION = 1
GENERATION_FILE = "generation.json"
MANIFEST_FILE = "manifest.jsonl"
CARD_FILE = "card.json"
SHARDS_DIR = "shards"
STATS_FILE = "stats.json"
#: The checksummed files of every shard, in the order they are written.
SHARD_FILES = ("images.npy", "masks.npy", "records.jsonl")
IGNORE_INDEX = 255
#: Keys the writer puts in the card; ``card_extra`` may not replace them.
CARD_KEYS = (
    "format_version",
    "fingerprint",
    "num_frames",
    "shard_size",
    "num_shards",
    "image_size",
    "num_classes",
    "class_names",
    "class_pixel_histogram",
    "ignore_pixels",
    "groups",
    "taxonomy_hash",
    "shards",
    "manifest",
    "created_at",
    "card_sha256",
)
#: The card's checksum of itself (see :func:`card_checksum`).
CARD_CHECKSUM_KEY = "card_sha256"
#: Prefix of the generation locks, which a dataset folder keeps across ``overwrite``: a
#: lock file deleted while another process holds it would lock a file nobody else opens.
LOCK_PREFIX = ".generation"
#: Prefix of the markers of passed verifications (:meth:`GeneratedDataset.verify_cached`).
VERIFIED_PREFIX = ".verified-"
_TMP_SHARD_PREFIX = ".tmp-"
# Memory maps keep a duplicated file descriptor each, so a dataset with thousands of
# shards would run out of descriptors if every shard stayed mapped.
_MAX_OPEN_SHARDS = 64
_HASH_CHUNK = 8 * 1024 * 1024


class DatasetError(RuntimeError):
    """A dataset on disk that cannot be written or read; the message names the file."""


class DiskFullError(DatasetError):
    """The disk (or quota) filled up while a dataset was written; complete shards are kept."""


#: errno values that mean "no room to write": a full disk and an exceeded quota.
_NO_SPACE = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


@contextlib.contextmanager
def no_space_is_clear(root: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Turn a full disk (``ENOSPC``/``EDQUOT``) while writing ``what`` of the dataset at
    ``root`` into a :class:`DiskFullError` that names the folder and says how to go on;
    any other error passes through unchanged."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        raise DiskFullError(
            f"{root}: no space left on the device while writing {what}{where}: "
            f"{exc.strerror or exc}. Every complete shard is kept; free some space (or move "
            "the folder) and rerun the same command: it resumes with the missing shards"
        ) from None


def card_checksum(card: Mapping[str, Any]) -> str:
    """sha256 of the card's canonical JSON (sorted keys, no spaces) without its own
    ``card_sha256``: what ``card_sha256`` holds."""
    body = {k: v for k, v in card.items() if k != CARD_CHECKSUM_KEY}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# Cards without a self-checksum already named in a log line (once per folder and process).
_LEGACY_CARDS_LOGGED: set[str] = set()


# --- small shared helpers ---------------------------------------------------------------
def shard_ranges(num_frames: int, shard_size: int) -> list[range]:
    """Frame indices of every shard: shard ``k`` covers
    ``[k * shard_size, min((k + 1) * shard_size, num_frames))``.

    Example:
        >>> shard_ranges(5, 2)
        [range(0, 2), range(2, 4), range(4, 5)]
    """
    if int(num_frames) != num_frames or num_frames < 0:
        raise ValueError(f"num_frames: expected an integer >= 0, got {num_frames!r}")
    if int(shard_size) != shard_size or shard_size < 1:
        raise ValueError(f"shard_size: expected an integer >= 1, got {shard_size!r}")
    num_frames, shard_size = int(num_frames), int(shard_size)
    return [
        range(start, min(start + shard_size, num_frames))
        for start in range(0, num_frames, shard_size)
    ]


def _json_default(value: Any) -> Any:
    # Backends often hand over numpy scalars; they are JSON numbers in spirit.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _canonical(obj: Any, what: str) -> Any:
    """JSON round trip, so tuples/lists and numpy scalars compare like what is on disk."""
    try:
        return json.loads(json.dumps(obj, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{what}: expected a JSON-ready value ({exc})") from None


def _differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths at which two JSON values differ (``[prefix]`` if they differ as a whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in list(old) + [k for k in new if k not in old]:
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(path)
            else:
                out.extend(_differing_keys(old[key], new[key], path))
        return out
    return [] if old == new else [prefix or "<root>"]


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11: no Python-level loop
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
        return h.hexdigest()


def _file_stats(root: Path, paths: Iterable[Path]) -> dict[str, list[int]] | None:
    """``{relative path: [size, mtime_ns, inode]}``; None if a file is missing."""
    out: dict[str, list[int]] = {}
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            return None
        out[path.relative_to(root).as_posix()] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return out


class _HashingWriter:
    """File-like object that hashes exactly the bytes written through it, so a file's
    checksum comes for free while it is written instead of from a second read."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self._f.write(data)


def _shard_name(shard_id: int) -> str:
    return f"{shard_id:06d}"


# --- writer -----------------------------------------------------------------------------
class DatasetWriter:
    """Writes a dataset shard by shard, atomically, and resumes an interrupted run.

    Args:
        root: the dataset folder (created if absent).
        num_frames: frames in the whole dataset.
        shard_size: frames per shard (the last shard may be shorter).
        fingerprint: JSON-ready description of what is generated (config, seed, backend,
            ``taxonomy_hash``, image size, ...). A folder holding a different fingerprint
            is never mixed with this one.
        card_extra: JSON-ready keys added to the top level of ``card.json`` (for example
            ``{"name": "sim-town", "domain": 0}``); may not replace the writer's keys.
        overwrite: when the folder holds a dataset with a *different* fingerprint, delete
            it and start again instead of raising. A dataset with the same fingerprint is
            always resumed, never deleted, so rerunning a command finishes its dataset.

    Usage: call :meth:`open` once (in the coordinating process), then
    :meth:`write_shard` for each returned id (in any order; the writer is picklable, so
    shards may be written by worker processes), then :meth:`finalize`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        num_frames: int,
        shard_size: int,
        fingerprint: Mapping[str, Any],
        card_extra: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        if int(num_frames) != num_frames or num_frames < 1:
            raise ValueError(f"num_frames: expected an integer >= 1, got {num_frames!r}")
        self.root = Path(root)
        self.num_frames = int(num_frames)
        self.shard_size = int(shard_size)
        self.ranges = shard_ranges(self.num_frames, self.shard_size)
        if not isinstance(fingerprint, Mapping):
            raise DatasetError(f"fingerprint: expected a dict, got {type(fingerprint).__name__}")
        self.fingerprint: dict[str, Any] = _canonical(dict(fingerprint), "fingerprint")
        self.card_extra: dict[str, Any] = _canonical(dict(card_extra or {}), "card_extra")
        clash = sorted(set(self.card_extra) & set(CARD_KEYS))
        if clash:
            raise DatasetError(
                f"card_extra: keys {clash} are written by the dataset writer itself; "
                "choose other names"
            )
        self.overwrite = bool(overwrite)
        self._opened = False
        # The counts belong with the fingerprint: resuming with another shard size would
        # mix shards of two layouts under one card.
        self.generation: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "num_frames": self.num_frames,
            "shard_size": self.shard_size,
            "fingerprint": self.fingerprint,
        }

    @property
    def num_shards(self) -> int:
        return len(self.ranges)

    @property
    def shards_dir(self) -> Path:
        return self.root / SHARDS_DIR

    def shard_dir(self, shard_id: int) -> Path:
        """Final folder of shard ``shard_id`` (present only once the shard is complete)."""
        return self.shards_dir / _shard_name(shard_id)

    # -- open ------------------------------------------------------------------------
    def open(self) -> list[int]:
        """Prepare ``root`` and return the ids of the shards still to be written.

        Raises :class:`DatasetError` if ``root`` holds a dataset with another fingerprint
        (unless ``overwrite``), naming ``generation.json`` and the first differing keys.
        Removes temporary folders and files a killed run left behind, so call it once,
        before any worker starts writing.
        """
        with no_space_is_clear(self.root, "the dataset folder"):
            return self._open()

    def _open(self) -> list[int]:
        self.root.mkdir(parents=True, exist_ok=True)
        gen_path = self.root / GENERATION_FILE
        if gen_path.exists():
            try:
                old = json.loads(gen_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise DatasetError(
                    f"{gen_path}: cannot read the fingerprint of the existing dataset ({exc}); "
                    "choose another output folder or pass overwrite=true"
                ) from None
            if old != self.generation:
                if not self.overwrite:
                    keys = _differing_keys(old, self.generation)
                    shown = ", ".join(keys[:5]) + (
                        f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                    )
                    raise DatasetError(
                        f"{gen_path}: this folder holds a dataset generated with a different "
                        f"fingerprint (differing keys: {shown}); choose another output folder "
                        "or pass overwrite=true to delete it and generate again"
                    )
                self._clear_root(everything=True)
        elif any((self.root / name).exists() for name in (SHARDS_DIR, MANIFEST_FILE, CARD_FILE)):
            # Dataset files without a fingerprint: nobody can tell what generated them.
            if not self.overwrite:
                raise DatasetError(
                    f"{self.root}: holds dataset files but no {GENERATION_FILE}, so what they "
                    "contain is unknown; choose another output folder or pass overwrite=true"
                )
            self._clear_root(everything=False)

        if not gen_path.exists():
            atomic_write_json(gen_path, self.generation)
        self.shards_dir.mkdir(exist_ok=True)
        self._remove_leftovers()
        self._opened = True
        if (self.root / CARD_FILE).exists():
            return []
        return [k for k in range(self.num_shards) if not self.shard_dir(k).is_dir()]

    def _clear_root(self, everything: bool) -> None:
        """Delete the old dataset: all of ``root`` when it is known to be a dataset folder
        (it has a ``generation.json``), else only the entries a dataset consists of."""
        names = (
            [p.name for p in self.root.iterdir() if not p.name.startswith(LOCK_PREFIX)]
            if everything
            else [SHARDS_DIR, MANIFEST_FILE, CARD_FILE, GENERATION_FILE]
        )
        # The card goes first: a half-deleted folder must never look complete.
        names.sort(key=lambda n: n != CARD_FILE)
        for name in names:
            path = self.root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()

    def _remove_leftovers(self) -> None:
        """Remove temporary shards and files of *dead* writers; a live one (another job of
        the same multirun, writing other shards) keeps its work in progress."""
        leftovers = list(self.shards_dir.glob(f"{_TMP_SHARD_PREFIX}*"))
        leftovers += self.root.glob(".*.tmp-*")  # from atomic_write_* of a killed run
        for path in leftovers:
            if writer_alive(path.name):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    # -- write -----------------------------------------------------------------------
    def write_shard(self, shard_id: int, batch: FrameBatch) -> None:
        """Write shard ``shard_id`` atomically.

        Args:
            shard_id: ``0 <= shard_id < num_shards``.
            batch: exactly the frames of :func:`shard_ranges` ``[shard_id]``, in order
                (``records[j]["index"] == range[j]``); images ``(n, H, W, 3) uint8``,
                masks ``(n, H, W) uint8``.

        Also stores the shard's class-pixel histogram, group counts and file checksums in
        ``stats.json`` while the data is in memory, so :meth:`finalize` reads no images.
        """
        if not self._opened and not (self.root / GENERATION_FILE).exists():
            raise DatasetError(f"{self.root}: call open() before write_shard()")
        if not 0 <= shard_id < self.num_shards:
            raise DatasetError(f"shard {shard_id}: expected a shard id in 0..{self.num_shards - 1}")
        expected = self.ranges[shard_id]
        if len(batch) != len(expected):
            raise DatasetError(
                f"shard {_shard_name(shard_id)}: expected {len(expected)} frames "
                f"(indices {expected.start}..{expected.stop - 1}), got {len(batch)}"
            )
        for j, (want, rec) in enumerate(zip(expected, batch.records, strict=True)):
            got = rec.get("index") if isinstance(rec, Mapping) else None
            if got != want:
                raise DatasetError(
                    f"shard {_shard_name(shard_id)}: records[{j}]['index'] should be {want} "
                    f"(shard covers {expected.start}..{expected.stop - 1}), got {got!r}"
                )
        final = self.shard_dir(shard_id)
        if final.exists():
            raise DatasetError(f"{final}: shard already written; shards are never rewritten")

        # Serialise records before touching the disk: a bad record must not cost I/O.
        try:
            records_text = "".join(
                json.dumps(rec, default=_json_default) + "\n" for rec in batch.records
            )
        except (TypeError, ValueError) as exc:
            raise DatasetError(
                f"shard {_shard_name(shard_id)}: records must be JSON-ready ({exc})"
            ) from None

        with no_space_is_clear(self.root, f"shard {_shard_name(shard_id)}"):
            self._write_shard_files(shard_id, batch, records_text, final)

    def _write_shard_files(
        self, shard_id: int, batch: FrameBatch, records_text: str, final: Path
    ) -> None:
        expected = self.ranges[shard_id]
        tmp = self.shards_dir / f"{_TMP_SHARD_PREFIX}{_shard_name(shard_id)}-{unique_suffix()}"
        tmp.mkdir(parents=True)
        try:
            checksums = {
                "images.npy": self._write_npy(tmp / "images.npy", batch.images),
                "masks.npy": self._write_npy(tmp / "masks.npy", batch.masks),
                "records.jsonl": self._write_bytes(
                    tmp / "records.jsonl", records_text.encode("utf-8")
                ),
            }
            masks = batch.masks
            # bincount of the flat uint8 view: one C pass, no per-frame Python work.
            hist = np.bincount(masks.reshape(-1), minlength=256)
            stats = {
                "id": shard_id,
                "frames": len(batch),
                "start": expected.start,
                "image_size": [int(masks.shape[1]), int(masks.shape[2])],
                "class_pixel_histogram": hist.tolist(),
                "groups": dict(Counter(str(r.get("group")) for r in batch.records)),
                "files": checksums,
            }
            self._write_bytes(tmp / STATS_FILE, (json.dumps(stats) + "\n").encode("utf-8"))
            fsync_dir(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.shards_dir)

    @staticmethod
    def _write_npy(path: Path, array: np.ndarray) -> str:
        """Save ``array`` as C-ordered ``.npy`` (fsynced) and return the file's sha256."""
        with open(path, "wb") as f:
            hw = _HashingWriter(f)
            np.save(hw, np.ascontiguousarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        return hw.sha256.hexdigest()

    @staticmethod
    def _write_bytes(path: Path, data: bytes) -> str:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return hashlib.sha256(data).hexdigest()

    # -- finalize --------------------------------------------------------------------
    def finalize(self, num_classes: int, class_names: Sequence[str]) -> dict[str, Any]:
        """Write ``manifest.jsonl`` and then ``card.json`` (both atomically); return the card.

        Args:
            num_classes: classes of the taxonomy; mask values must be ``< num_classes``
                or 255 (ignore).
            class_names: ``num_classes`` names in training-index order.

        Raises :class:`DatasetError` naming missing shards, a generation fingerprint that
        changed underneath, shards of different image sizes or out-of-range mask values.
        """
        class_names = [str(c) for c in class_names]
        if len(class_names) != num_classes or not 0 < num_classes < IGNORE_INDEX:
            raise DatasetError(
                f"class_names: expected num_classes={num_classes} names (1..254), "
                f"got {len(class_names)}"
            )
        gen_path = self.root / GENERATION_FILE
        try:
            on_disk = json.loads(gen_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{gen_path}: cannot read it ({exc}); call open() first") from None
        if on_disk != self.generation:
            raise DatasetError(
                f"{gen_path}: fingerprint differs from this writer's "
                f"(keys: {', '.join(_differing_keys(on_disk, self.generation)[:5])})"
            )
        missing = [_shard_name(k) for k in range(self.num_shards) if not self.shard_dir(k).is_dir()]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise DatasetError(
                f"{self.shards_dir}: {len(missing)} of {self.num_shards} shards missing "
                f"({shown}); write them before finalize()"
            )

        hist = np.zeros(256, dtype=np.int64)
        groups: Counter[str] = Counter()
        image_size: list[int] | None = None
        shards_card: list[dict[str, Any]] = []
        lines: list[str] = []
        for k, rng in enumerate(self.ranges):
            sdir = self.shard_dir(k)
            try:
                stats = json.loads((sdir / STATS_FILE).read_text(encoding="utf-8"))
                rec_lines = (sdir / "records.jsonl").read_text(encoding="utf-8").splitlines()
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{sdir}: cannot read shard stats/records ({exc})") from None
            if stats.get("frames") != len(rng) or len(rec_lines) != len(rng):
                raise DatasetError(
                    f"{sdir}: expected {len(rng)} frames, stats.json says {stats.get('frames')} "
                    f"and records.jsonl has {len(rec_lines)} lines"
                )
            if image_size is None:
                image_size = stats["image_size"]
            elif stats["image_size"] != image_size:
                raise DatasetError(
                    f"{sdir}: image size {stats['image_size']} differs from shard 000000's "
                    f"{image_size}; all frames of a dataset must share one size"
                )
            shard_hist = np.asarray(stats["class_pixel_histogram"], dtype=np.int64)
            bad = np.flatnonzero(shard_hist[num_classes:IGNORE_INDEX]) + num_classes
            if bad.size:
                raise DatasetError(
                    f"{sdir / 'masks.npy'}: mask values {bad.tolist()[:10]} are neither a class "
                    f"index (0..{num_classes - 1}) nor ignore ({IGNORE_INDEX})"
                )
            hist += shard_hist
            groups.update(stats["groups"])
            shards_card.append({"id": k, "frames": len(rng), "files": stats["files"]})
            for j, line in enumerate(rec_lines):
                rec = json.loads(line)
                rec["shard"] = k
                rec["offset"] = j
                lines.append(json.dumps(rec) + "\n")

        manifest = "".join(lines).encode("utf-8")
        with no_space_is_clear(self.root, MANIFEST_FILE):
            atomic_write_bytes(self.root / MANIFEST_FILE, manifest)
        card: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "num_frames": self.num_frames,
            "shard_size": self.shard_size,
            "num_shards": self.num_shards,
            "image_size": image_size,
            "num_classes": num_classes,
            "class_names": class_names,
            "class_pixel_histogram": {name: int(hist[i]) for i, name in enumerate(class_names)},
            "ignore_pixels": int(hist[IGNORE_INDEX]),
            "groups": dict(sorted(groups.items())),
            "taxonomy_hash": self.fingerprint.get("taxonomy_hash"),
            "shards": shards_card,
            "manifest": {"file": MANIFEST_FILE, "sha256": hashlib.sha256(manifest).hexdigest()},
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **self.card_extra,
        }
        card[CARD_CHECKSUM_KEY] = card_checksum(card)
        # Last write of the run: from here on the folder counts as complete.
        with no_space_is_clear(self.root, CARD_FILE):
            atomic_write_json(self.root / CARD_FILE, card)
        return card


# --- reader -----------------------------------------------------------------------------
class GeneratedDataset(Dataset):
    """A complete generated dataset as :class:`torch.utils.data.Dataset` of Samples.

    Args:
        root: the dataset folder.
        verify: recompute every file's sha256 at construction (see :meth:`verify`).
        expected_taxonomy_hash: if given, the card's ``taxonomy_hash`` must equal it.
        domain: ``domain`` of every Sample; default the card's ``domain``, else 0 (sim).

    ``ds[i]`` is a Sample dict: ``image`` ``(3, H, W) float32`` in ``[0, 1]``, ``mask``
    ``(H, W) int64`` (255 = ignore), ``domain`` int, ``group`` str and ``id`` str
    (the record's ``id``, else ``"<name>/<index:06d>"`` with the card's ``name`` or the
    folder name). Shard arrays are memory-mapped on first use, per process, so the
    dataset is cheap to pickle into DataLoader workers.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        verify: bool = False,
        expected_taxonomy_hash: str | None = None,
        domain: int | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset folder does not exist")
        card_path = self.root / CARD_FILE
        if not card_path.exists():
            raise DatasetError(
                f"{self.root}: dataset is incomplete (no {CARD_FILE}); rerun the same "
                "generate command to finish it"
            )
        try:
            card_bytes = card_path.read_bytes()
            self.card: dict[str, Any] = json.loads(card_bytes.decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{card_path}: cannot read the dataset card ({exc})") from None
        if not isinstance(self.card, dict):
            raise DatasetError(
                f"{card_path}: expected a JSON object, got {type(self.card).__name__}"
            )
        #: sha256 of the card file: names this version of the dataset (verification cache).
        self.card_digest = hashlib.sha256(card_bytes).hexdigest()
        self._check_card_checksum(card_path)
        if self.card.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                f"{card_path}: format_version {self.card.get('format_version')!r} is not "
                f"supported (expected {FORMAT_VERSION})"
            )
        found = self.card.get("taxonomy_hash")
        if expected_taxonomy_hash is not None and found != expected_taxonomy_hash:
            raise DatasetError(
                f"{card_path}: taxonomy hash {found!r} differs from the expected "
                f"{expected_taxonomy_hash!r}; the dataset was labelled with another taxonomy "
                "mapping -- regenerate it or use the matching taxonomy"
            )
        self.num_frames = int(self.card["num_frames"])
        self.shard_size = int(self.card["shard_size"])
        h, w = self.card["image_size"]
        self.image_size: tuple[int, int] = (int(h), int(w))
        self.class_names: list[str] = list(
            self.card.get("class_names") or self.card["class_pixel_histogram"]
        )
        self.domain = int(domain if domain is not None else self.card.get("domain", 0))
        self.name = str(self.card.get("name") or self.root.name)
        self._ranges = shard_ranges(self.num_frames, self.shard_size)
        if len(self._ranges) != len(self.card["shards"]):
            raise DatasetError(
                f"{card_path}: lists {len(self.card['shards'])} shards, expected "
                f"{len(self._ranges)} for {self.num_frames} frames of {self.shard_size}"
            )
        self._records: list[dict[str, Any]] | None = None
        self._groups: list[str] | None = None
        self._ids: list[str] | None = None
        self._arrays: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._verified: str | None = None  # the card digest verify_cached() passed for
        self._verified_at: str | None = None  # when (UTC, ISO 8601)
        if verify:
            self.verify()

    def _check_card_checksum(self, card_path: Path) -> None:
        stored = self.card.get(CARD_CHECKSUM_KEY)
        if stored is None:
            if str(card_path) not in _LEGACY_CARDS_LOGGED:
                _LEGACY_CARDS_LOGGED.add(str(card_path))
                log.info(
                    "%s: written before cards carried their own checksum (%s), so an edit of "
                    "the card cannot be detected; delete it and rerun the generate command "
                    "to rewrite it from the shards with one",
                    card_path,
                    CARD_CHECKSUM_KEY,
                )
            return
        if stored != card_checksum(self.card):
            raise DatasetError(
                f"{card_path}: the card does not match its own checksum ({CARD_CHECKSUM_KEY}); "
                "it was edited or damaged after the dataset was written, so its counts and "
                "file checksums cannot be trusted. Delete it and rerun the same generate "
                "command: the card is rewritten from the shards"
            )

    # -- pickling: never ship memory maps (or the big record list) to workers ---------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = OrderedDict()
        state["_records"] = None
        return state

    # -- metadata ----------------------------------------------------------------------
    @property
    def records(self) -> list[dict[str, Any]]:
        """Manifest records in index order (each with ``shard`` and ``offset``); lazy."""
        if self._records is None:
            path = self.root / MANIFEST_FILE
            try:
                with open(path, encoding="utf-8") as f:
                    records = [json.loads(line) for line in f]
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{path}: cannot read the manifest ({exc})") from None
            if len(records) != self.num_frames:
                raise DatasetError(
                    f"{path}: expected {self.num_frames} records, found {len(records)}"
                )
            self._records = records
        return self._records

    @property
    def groups(self) -> list[str]:
        """Condition group of every frame, in index order."""
        if self._groups is None:
            self._load_index()
        return self._groups  # type: ignore[return-value]

    @property
    def ids(self) -> list[str]:
        """Provenance id of every frame, in index order."""
        if self._ids is None:
            self._load_index()
        return self._ids  # type: ignore[return-value]

    def _load_index(self) -> None:
        # Compact per-frame lists survive pickling cheaply, unlike the full records.
        records = self.records
        self._groups = [str(r.get("group")) for r in records]
        self._ids = [
            str(r["id"]) if "id" in r else f"{self.name}/{r.get('index', i):06d}"
            for i, r in enumerate(records)
        ]

    # -- verification ------------------------------------------------------------------
    def verify(self) -> None:
        """Recompute the sha256 of every shard file and of the manifest.

        Raises :class:`DatasetError` naming the first missing or corrupted file and
        listing every bad one.
        """
        jobs = self._checksummed_files()

        def check(job: tuple[Path, str]) -> str | None:
            path, digest = job
            if not path.is_file():
                return f"{path} (missing)"
            if _sha256_file(path) != digest:
                return f"{path} (corrupted: sha256 differs from {CARD_FILE})"
            return None

        # hashlib releases the GIL on large buffers, so threads overlap hashing and I/O.
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            bad = [msg for msg in pool.map(check, jobs) if msg is not None]
        if bad:
            raise DatasetError(
                f"{bad[0]}; {len(bad)} bad file(s) in {self.root}: " + "; ".join(bad)
            )

    def _checksummed_files(self) -> list[tuple[Path, str]]:
        """``(path, sha256)`` of every shard file and of the manifest, as the card lists them."""
        jobs: list[tuple[Path, str]] = []
        for shard in self.card["shards"]:
            sdir = self.root / SHARDS_DIR / _shard_name(int(shard["id"]))
            jobs.extend((sdir / name, digest) for name, digest in shard["files"].items())
        manifest = self.card.get("manifest")
        if manifest:
            jobs.append((self.root / manifest["file"], manifest["sha256"]))
        return jobs

    def verification_marker(self) -> Path:
        """The file that records a passed :meth:`verify_cached` of this dataset version,
        named by the card's sha256 and the shard checksums it lists."""
        h = hashlib.sha256(self.card_digest.encode("ascii"))
        for path, digest in self._checksummed_files():
            h.update(f"\0{path.relative_to(self.root).as_posix()}\0{digest}".encode())
        return self.root / f"{VERIFIED_PREFIX}{h.hexdigest()[:24]}.json"

    def verify_cached(self) -> bool:
        """:meth:`verify`, once per dataset version: skipped when this card's files were
        verified before and none has changed since (same size, modification time and
        inode); otherwise hashed and, when they pass, recorded in
        :meth:`verification_marker` (written atomically; a read-only folder just stays
        unrecorded). Returns whether the files were hashed now.

        Raises :class:`DatasetError` as :meth:`verify` does.
        """
        if self._verified == self.card_digest:
            return False
        # stat before hashing: a file changed while it is hashed is hashed again next time
        stats = _file_stats(self.root, [path for path, _ in self._checksummed_files()])
        recorded = self._recorded_verification(stats)
        if recorded is not None:
            self._verified = self.card_digest
            self._verified_at = str(recorded.get("verified_at") or "") or None
            return False
        self.verify()
        self._verified = self.card_digest
        self._verified_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        if stats is not None:
            self._record_verification(self.verification_marker(), stats)
        return True

    def verification(self) -> dict[str, Any]:
        """Whether this dataset version's checksums were verified, and when: ``{"verified":
        bool, "verified_at": ISO 8601 UTC or None, "files": checksummed files}``. True when
        :meth:`verify_cached` passed in this process, or when its marker records a pass and
        no file changed since (stat only: nothing is hashed here)."""
        files = self._checksummed_files()
        if self._verified != self.card_digest:
            recorded = self._recorded_verification(
                _file_stats(self.root, [path for path, _ in files])
            )
            if recorded is not None:
                self._verified = self.card_digest
                self._verified_at = str(recorded.get("verified_at") or "") or None
        verified = self._verified == self.card_digest
        return {
            "verified": verified,
            "verified_at": self._verified_at if verified else None,
            "files": len(files),
        }

    def _recorded_verification(self, stats: dict[str, list[int]] | None) -> dict | None:
        """The marker's record of a pass of this card whose files still have ``stats``."""
        try:
            recorded = json.loads(self.verification_marker().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if (
            isinstance(recorded, dict)
            and stats is not None
            and recorded.get("card_sha256") == self.card_digest
            and recorded.get("files") == stats
        ):
            return recorded
        return None

    def _record_verification(self, marker: Path, stats: dict[str, list[int]]) -> None:
        record = {
            "card_sha256": self.card_digest,
            "files": stats,
            "verified_at": self._verified_at,
        }
        try:
            atomic_write_json(marker, record)
            for old in self.root.glob(f"{VERIFIED_PREFIX}*.json"):  # earlier versions'
                if old != marker:
                    old.unlink(missing_ok=True)
        except OSError as exc:  # read-only or full: verified now, just not remembered
            log.info("%s: cannot record the verification (%s); it reruns next time", marker, exc)

    # -- data access -------------------------------------------------------------------
    def _shard_arrays(self, shard_id: int) -> tuple[np.ndarray, np.ndarray]:
        """``(images (n, H, W, 3), masks (n, H, W))`` memory maps of one shard (LRU cached)."""
        arrays = self._arrays.get(shard_id)
        if arrays is not None:
            self._arrays.move_to_end(shard_id)
            return arrays
        sdir = self.root / SHARDS_DIR / _shard_name(shard_id)
        n = len(self._ranges[shard_id])
        h, w = self.image_size
        loaded = []
        for name, shape in (("images.npy", (n, h, w, 3)), ("masks.npy", (n, h, w))):
            path = sdir / name
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{path}: cannot load shard file ({exc})") from None
            if arr.shape != shape or arr.dtype != np.uint8:
                raise DatasetError(f"{path}: expected {shape} uint8, found {arr.shape} {arr.dtype}")
            loaded.append(arr)
        arrays = (loaded[0], loaded[1])
        self._arrays[shard_id] = arrays
        if len(self._arrays) > _MAX_OPEN_SHARDS:
            self._arrays.popitem(last=False)
        return arrays

    def _locate(self, index: int) -> tuple[int, int]:
        if not -self.num_frames <= index < self.num_frames:
            raise IndexError(f"index {index} out of range for {self.num_frames} frames")
        index %= self.num_frames
        return divmod(index, self.shard_size)

    def __len__(self) -> int:
        return self.num_frames

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard_id, offset = self._locate(int(index))
        images, masks = self._shard_arrays(shard_id)
        # np.array copies out of the map: the tensor must not alias a read-only file.
        image = torch.from_numpy(np.array(images[offset])).permute(2, 0, 1)
        i = shard_id * self.shard_size + offset
        return {
            "image": image.to(torch.float32).div_(255.0),
            "mask": torch.from_numpy(masks[offset].astype(np.int64)),
            "domain": self.domain,
            "group": self.groups[i],
            "id": self.ids[i],
        }

    def get_batch(self, indices: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """Raw frames for benchmarks and contact sheets.

        Returns:
            ``images (n, H, W, 3) uint8`` and ``masks (n, H, W) uint8``, in the order of
            ``indices``.
        """
        idx = np.asarray(list(indices), dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -self.num_frames or idx.max() >= self.num_frames):
            raise IndexError(f"indices out of range for {self.num_frames} frames")
        idx %= self.num_frames  # negative indices count from the end, as in __getitem__
        h, w = self.image_size
        images = np.empty((idx.size, h, w, 3), dtype=np.uint8)
        masks = np.empty((idx.size, h, w), dtype=np.uint8)
        shard_of, offset = np.divmod(idx, self.shard_size)
        # One fancy-index read per shard instead of one Python step per frame.
        for shard_id in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == shard_id)
            shard_images, shard_masks = self._shard_arrays(int(shard_id))
            images[sel] = shard_images[offset[sel]]
            masks[sel] = shard_masks[offset[sel]]
        return images, masks
