"""Readers for real driving datasets, as map-style torch Datasets of project Samples.

Three layouts are read:

- **Cityscapes**: ``root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
  ``root/gtFine/<split>/<city>/<name>_gtFine_labelIds.png`` (label ids);
- **CamVid** (SegNet layout): ``root/<split>/<name>.png`` with
  ``root/<split>annot/<name>.png`` (index in CamVid's 11 classes, 11 = unlabelled);
- **plain folders** of unlabeled images (recursive), for domain adaptation.

Every item is a Sample (see DESIGN.md)::

    {"image": (3, H, W) float32 in [0, 1],
     "mask": (H, W) int64 taxonomy indices, 255 = ignore   # labelled readers only
     "domain": 1,                                          # real
     "group": str,                                         # condition slice
     "id": str}                                            # path relative to the root

Files are discovered (and every label checked to exist) at construction, in sorted
order, so a bad dataset fails before training starts and ``Subset(ds, indices)`` means
the same frames on every machine. Decoding happens in ``__getitem__``.

Labels that give training nothing: a labelled frame whose ids all lie outside the
taxonomy mapping (every pixel "ignore") is named in a warning when it is read, and a
split where most of an evenly spaced sample of up to ``label_scan`` label files (32 by
default; read at construction, labels only) is so is refused, naming its root -- the
usual cause is labels in another id scheme (train ids, colour images). Images beyond
PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) are refused naming the
file and the limit.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from simulation.taxonomy import IGNORE_INDEX, Taxonomy

log = logging.getLogger(__name__)

#: Value of a Sample's ``domain`` for real data (0 is simulated).
REAL_DOMAIN = 1

#: Default suffixes read by :class:`ImageFolderDataset` (matched case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

#: PIL modes that hold one integer per pixel, i.e. an index / label-id image. ``P`` is
#: included because index PNGs are often saved with a palette for viewing; the pixel
#: values are still the indices.
LABEL_MODES: tuple[str, ...] = ("L", "P", "I", "I;16")

#: Kinds accepted by :func:`build_real_dataset`.
KINDS: tuple[str, ...] = ("cityscapes", "camvid", "folder")

CITYSCAPES_LAYOUT = (
    "<root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and "
    "<root>/gtFine/<split>/<city>/<name>_gtFine_labelIds.png"
)
CAMVID_LAYOUT = "<root>/<split>/<name>.png and <root>/<split>annot/<name>.png"

# Errors PIL raises for unreadable files: UnidentifiedImageError and truncation are
# OSErrors; some decoders report broken streams as SyntaxError or ValueError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError)

#: Label files read at construction to catch a split whose labels map to nothing.
LABEL_SCAN = 32


class RealDataError(ValueError):
    """A real dataset that cannot be read; the message names the path and what was expected."""


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    """Validate ``size`` = ``(height, width)`` in pixels, both positive integers."""
    try:
        values = tuple(size)
    except TypeError:
        raise ValueError(f"size: expected (height, width) in pixels, got {size!r}") from None
    if len(values) != 2 or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"size: expected (height, width) as two integers, got {size!r}")
    height, width = (int(v) for v in values)
    if height <= 0 or width <= 0:
        raise ValueError(f"size: height and width must be positive, got {size!r}")
    return height, width


def _check_dir(path: Path, layout: str) -> None:
    if not path.is_dir():
        raise RealDataError(f"{path}: folder not found; expected the layout {layout}")


def _bomb_error(path: Path, err: Exception, what: str) -> RealDataError:
    limit = Image.MAX_IMAGE_PIXELS
    shown = f"{2 * limit} pixels (2 x PIL.Image.MAX_IMAGE_PIXELS = {limit})" if limit else "?"
    return RealDataError(
        f"{path}: {what} is too large to decode safely ({err}); the limit is {shown}. "
        "Downscale the file, or raise PIL.Image.MAX_IMAGE_PIXELS if it is trusted"
    )


def _open_image(path: Path, exif_transpose: bool = False) -> Image.Image:
    """Decode ``path`` fully into an RGB image (any PIL mode in, RGB out)."""
    try:
        with Image.open(path) as img:
            img.load()  # PIL opens lazily; force the decode so corruption surfaces here
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except Image.DecompressionBombError as err:
        raise _bomb_error(path, err, "image") from None
    except _DECODE_ERRORS as err:
        raise RealDataError(
            f"{path}: cannot read image ({type(err).__name__}: {err}); expected a readable "
            "PNG/JPEG/BMP/WebP file"
        ) from err


def _open_label(path: Path) -> np.ndarray:
    """Decode a single-channel label PNG into an ``(H, W)`` integer array of its raw ids."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            ids = np.array(img)  # for mode P these are the palette indices, i.e. the ids
    except Image.DecompressionBombError as err:
        raise _bomb_error(path, err, "label image") from None
    except _DECODE_ERRORS as err:
        raise RealDataError(
            f"{path}: cannot read label image ({type(err).__name__}: {err}); expected an "
            "index/label-id PNG"
        ) from err
    if mode not in LABEL_MODES:
        # An RGB/RGBA label is almost always a colour visualisation (e.g. *_color.png or
        # CamVid's *_L.png); mapping its channels as ids would be silently wrong.
        raise RealDataError(
            f"{path}: label image has mode {mode!r}; expected a single-channel index/label-id "
            f"PNG (mode one of {LABEL_MODES}), not a colour-coded label"
        )
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise RealDataError(
            f"{path}: label ids span {ids.min()}..{ids.max()}; expected ids in 0..255"
        )
    return ids


class RealDataset(Dataset[dict[str, Any]]):
    """Base of the real-data readers: a sorted list of (image, label) paths, read lazily.

    Args:
        root: dataset root; Sample ids are paths relative to it.
        size: ``(height, width)`` in pixels that every Sample is resized to.
        group: condition slice stored in every Sample (real data has no weather metadata).
        items: ``(image path, label path or None)`` pairs, already in the final order.
        taxonomy: maps raw label ids to training indices; ``None`` for unlabeled data.
        source: the taxonomy mapping the labels are written in (``"cityscapes"``, ...).
        exif_transpose: rotate images by their EXIF orientation (camera photos).
        label_scan: label files (evenly spaced) read now to refuse a split whose labels
            are mostly outside the mapping; 0 skips the scan.
    """

    def __init__(
        self,
        root: Path,
        size: tuple[int, int],
        group: str,
        items: list[tuple[Path, Path | None]],
        taxonomy: Taxonomy | None = None,
        source: str | None = None,
        exif_transpose: bool = False,
        label_scan: int = LABEL_SCAN,
    ) -> None:
        self.root = root
        self.size = size
        self.group = group
        self.taxonomy = taxonomy
        self.source = source
        self._items = items
        self._exif_transpose = exif_transpose
        self.ids: list[str] = [img.relative_to(root).as_posix() for img, _ in items]
        # label files already named in a warning (per process: DataLoader workers each warn)
        self._warned: set[Path] = set()
        if taxonomy is not None and source is not None:
            self._usable = taxonomy.lut(source) != IGNORE_INDEX  # (256,) raw id -> any class
            self.scan_labels(_check_count(label_scan, "label_scan"))

    @property
    def labelled_classes(self) -> list[int] | None:
        """Taxonomy indices this dataset's label mapping can produce (CamVid labels no
        ``terrain``); None for unlabelled data. Evaluation averages over these."""
        if self.taxonomy is None or self.source is None:
            return None
        values = np.unique(self.taxonomy.lut(self.source))
        return [int(v) for v in values if v != IGNORE_INDEX]

    def _no_usable_pixel(self, ids: np.ndarray) -> bool:
        return not bool(self._usable[ids.astype(np.uint8, copy=False)].any())

    def _warn_unusable(self, path: Path) -> None:
        if path in self._warned:
            return
        self._warned.add(path)
        log.warning(
            "%s: label has no pixel of any taxonomy class (every id is outside the %r mapping "
            "or unlabelled), so this frame trains as all-ignore",
            path,
            self.source,
        )

    def scan_labels(self, count: int = LABEL_SCAN) -> tuple[int, int]:
        """Read up to ``count`` evenly spaced label files (labels only, no images) and
        refuse the split when most of them have no usable pixel.

        Returns ``(unusable, scanned)``. Files that fail to decode are left to
        ``__getitem__``, which names them. Raises :class:`RealDataError` naming the root.
        """
        labelled = [label for _, label in self._items if label is not None]
        if not count or not labelled:
            return 0, 0
        picks = np.unique(np.linspace(0, len(labelled) - 1, min(count, len(labelled))).round())
        unusable: list[Path] = []
        scanned = 0
        for i in picks.astype(int):
            path = labelled[i]
            try:
                ids = _open_label(path)
            except RealDataError:
                continue
            scanned += 1
            if self._no_usable_pixel(ids):
                unusable.append(path)
                self._warn_unusable(path)
        if scanned and 2 * len(unusable) > scanned:
            raise RealDataError(
                f"{self.root}: {len(unusable)} of {scanned} sampled label files have no pixel "
                f"of any taxonomy class (all ids outside the {self.source!r} mapping), e.g. "
                f"{unusable[0]}; training would see almost only 'ignore'. Check that the "
                f"labels hold {self.source} label ids (not train ids or colour images) and "
                "that the taxonomy maps them"
            )
        return len(unusable), scanned

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample ``index``: image ``(3, H, W) float32`` in [0, 1], mask ``(H, W) int64``."""
        image_path, label_path = self._items[index]
        height, width = self.size
        img = _open_image(image_path, self._exif_transpose)
        native = img.size  # (width, height), PIL order
        if img.size != (width, height):
            # PIL's BILINEAR widens its kernel with the downscale factor, i.e. it is
            # antialiased (unlike a plain 2x2 bilinear tap).
            img = img.resize((width, height), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8))
        sample: dict[str, Any] = {
            "image": pixels.permute(2, 0, 1).float().div_(255.0).contiguous(),
            "domain": REAL_DOMAIN,
            "group": self.group,
            "id": self.ids[index],
        }
        if label_path is not None:
            sample["mask"] = self._load_mask(label_path, native)
        return sample

    def _load_mask(self, path: Path, image_size: tuple[int, int]) -> torch.Tensor:
        """Label file -> ``(H, W) int64`` taxonomy indices at ``self.size``, 255 = ignore."""
        assert self.taxonomy is not None and self.source is not None
        ids = _open_label(path)
        if (ids.shape[1], ids.shape[0]) != image_size:
            raise RealDataError(
                f"{path}: label is {ids.shape[1]}x{ids.shape[0]} (WxH) but its image is "
                f"{image_size[0]}x{image_size[1]}; expected the same size"
            )
        mapped = self.taxonomy.convert(ids, self.source).astype(np.uint8, copy=False)
        if not (mapped != IGNORE_INDEX).any():
            self._warn_unusable(path)
        height, width = self.size
        if mapped.shape != (height, width):
            # NEAREST only: any interpolation would invent ids between two classes.
            label_img = Image.fromarray(mapped)  # 2-D uint8 -> mode L
            resized = label_img.resize((width, height), Image.Resampling.NEAREST)
            mapped = np.array(resized, dtype=np.uint8)
        return torch.from_numpy(mapped.astype(np.int64))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, n={len(self)}, "
            f"size={self.size}, group={self.group!r})"
        )


def _check_count(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{key}: expected a whole number >= 0, got {value!r}")
    return int(value)


def _check_labelled(taxonomy: Taxonomy, source: str) -> None:
    if not isinstance(taxonomy, Taxonomy):
        raise TypeError(f"taxonomy: expected a simulation.taxonomy.Taxonomy, got {taxonomy!r}")
    taxonomy.lut(source)  # fails now, naming the mapping, if the taxonomy lacks it


def _check_group(group: str) -> str:
    if not isinstance(group, str) or not group:
        raise ValueError(f"group: expected a non-empty string, got {group!r}")
    return group


class CityscapesDataset(RealDataset):
    """Cityscapes fine annotations, label ids mapped with ``taxonomy.convert(ids, "cityscapes")``.

    Layout: ``root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` and
    ``root/gtFine/<split>/<city>/<name>_gtFine_labelIds.png``.

    Args:
        root: dataset root (the folder holding ``leftImg8bit/`` and ``gtFine/``).
        split: ``"train"``, ``"val"``, ``"test"`` or any split folder that exists.
        taxonomy: the project taxonomy; must define a ``cityscapes`` mapping.
        size: ``(height, width)`` in pixels of every returned image and mask.
        group: condition slice stored in every Sample.
        label_scan: label files sampled at construction (see :meth:`RealDataset.scan_labels`).

    Raises:
        RealDataError: a missing folder, an image without its label file, no images, or
            labels that mostly map to no class.
        ValueError: a bad ``size`` or ``group``.

    Example:
        >>> ds = CityscapesDataset("data/cityscapes", "val", taxonomy, size=(512, 1024))
        >>> s = ds[0]; s["image"].shape, s["mask"].shape
        (torch.Size([3, 512, 1024]), torch.Size([512, 1024]))
    """

    IMAGE_SUFFIX = "_leftImg8bit.png"
    LABEL_SUFFIX = "_gtFine_labelIds.png"

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        taxonomy: Taxonomy,
        size: Sequence[int],
        group: str = "unknown",
        label_scan: int = LABEL_SCAN,
    ) -> None:
        root = Path(root)
        hw = _check_size(size)
        _check_labelled(taxonomy, "cityscapes")
        _check_dir(root, CITYSCAPES_LAYOUT)
        image_dir = root / "leftImg8bit" / split
        label_dir = root / "gtFine" / split
        _check_dir(image_dir, CITYSCAPES_LAYOUT)
        _check_dir(label_dir, CITYSCAPES_LAYOUT)
        images = sorted(
            (p for p in image_dir.glob(f"*/*{self.IMAGE_SUFFIX}") if p.is_file()),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        if not images:
            raise RealDataError(
                f"{image_dir}: no *{self.IMAGE_SUFFIX} images found; expected the layout "
                f"{CITYSCAPES_LAYOUT}"
            )
        items: list[tuple[Path, Path | None]] = []
        for img in images:
            name = img.name[: -len(self.IMAGE_SUFFIX)]
            label = label_dir / img.parent.name / f"{name}{self.LABEL_SUFFIX}"
            if not label.is_file():
                raise RealDataError(
                    f"{label}: label file not found for image {img}; expected the layout "
                    f"{CITYSCAPES_LAYOUT}"
                )
            items.append((img, label))
        super().__init__(
            root, hw, _check_group(group), items, taxonomy, "cityscapes", label_scan=label_scan
        )


class CamVidDataset(RealDataset):
    """CamVid in the SegNet layout, label index mapped with ``taxonomy.convert(ids, "camvid")``.

    Layout: ``root/<split>/<name>.png`` with ``root/<split>annot/<name>.png`` holding the
    index in CamVid's 11 classes (11 = unlabelled); splits ``train``, ``val``, ``test``.

    Args:
        root: dataset root (the folder holding ``train/``, ``trainannot/``, ...).
        split: split folder name; its labels are in ``<split>annot``.
        taxonomy: the project taxonomy; must define a ``camvid`` mapping.
        size: ``(height, width)`` in pixels of every returned image and mask.
        group: condition slice stored in every Sample.
        label_scan: label files sampled at construction (see :meth:`RealDataset.scan_labels`).

    Raises:
        RealDataError: a missing folder, an image without its label file, no images, or
            labels that mostly map to no class.
        ValueError: a bad ``size`` or ``group``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        taxonomy: Taxonomy,
        size: Sequence[int],
        group: str = "unknown",
        label_scan: int = LABEL_SCAN,
    ) -> None:
        root = Path(root)
        hw = _check_size(size)
        _check_labelled(taxonomy, "camvid")
        _check_dir(root, CAMVID_LAYOUT)
        image_dir = root / split
        label_dir = root / f"{split}annot"
        _check_dir(image_dir, CAMVID_LAYOUT)
        _check_dir(label_dir, CAMVID_LAYOUT)
        images = sorted(
            p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not images:
            raise RealDataError(
                f"{image_dir}: no images found; expected the layout {CAMVID_LAYOUT}"
            )
        items: list[tuple[Path, Path | None]] = []
        for img in images:
            label = label_dir / f"{img.stem}.png"
            if not label.is_file():
                raise RealDataError(
                    f"{label}: label file not found for image {img}; expected the layout "
                    f"{CAMVID_LAYOUT}"
                )
            items.append((img, label))
        super().__init__(
            root, hw, _check_group(group), items, taxonomy, "camvid", label_scan=label_scan
        )


class ImageFolderDataset(RealDataset):
    """Unlabeled images under ``root`` (recursive), for domain adaptation; no ``mask`` key.

    Files are matched by suffix (case-insensitive) and sorted by their path relative to
    ``root``; other files (notes, label lists) are skipped. Images are rotated by their
    EXIF orientation, since camera photos are often stored sideways.

    Args:
        root: folder to search; Sample ids are paths relative to it.
        size: ``(height, width)`` in pixels of every returned image.
        group: condition slice stored in every Sample.
        extensions: file suffixes to read, with or without the leading dot.

    Raises:
        RealDataError: ``root`` is not a folder, or it holds no matching image.
        ValueError: a bad ``size``, ``group`` or ``extensions``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        size: Sequence[int],
        group: str = "unknown",
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
    ) -> None:
        root = Path(root)
        hw = _check_size(size)
        if isinstance(extensions, str):  # a lone ".png" would otherwise become 4 characters
            extensions = (extensions,)
        exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
        if not exts or "." in exts:
            raise ValueError(f"extensions: expected file suffixes such as '.png', got {exts}")
        _check_dir(root, "<root>/**/<name>.<ext> for ext in " + ", ".join(sorted(exts)))
        images = sorted(
            (
                p
                for p in root.rglob("*")
                # "._x.png" files are macOS metadata forks, not images; they would fail
                # at read time in the middle of an epoch.
                if p.suffix.lower() in exts and not p.name.startswith("._") and p.is_file()
            ),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        if not images:
            raise RealDataError(
                f"{root}: no images with suffix {sorted(exts)} found (searched recursively)"
            )
        items: list[tuple[Path, Path | None]] = [(p, None) for p in images]
        super().__init__(root, hw, _check_group(group), items, exif_transpose=True)


def build_real_dataset(
    kind: str,
    root: str | os.PathLike[str],
    split: str | None,
    taxonomy: Taxonomy | None,
    size: Sequence[int],
    group: str = "unknown",
) -> RealDataset:
    """Build a real-data reader by name, e.g. from a Hydra config.

    Args:
        kind: ``"cityscapes"``, ``"camvid"`` or ``"folder"``.
        root: dataset root.
        split: split name. For ``"folder"`` it selects the sub-folder ``root/<split>``
            (``None`` or ``""``: ``root`` itself) and ids are relative to that folder.
        taxonomy: project taxonomy; unused (may be ``None``) for ``"folder"``.
        size: ``(height, width)`` in pixels.
        group: condition slice stored in every Sample.

    Raises:
        ValueError: an unknown ``kind``, naming the accepted ones.
    """
    if kind == "cityscapes":
        return CityscapesDataset(root, _require_split(kind, split), taxonomy, size, group)
    if kind == "camvid":
        return CamVidDataset(root, _require_split(kind, split), taxonomy, size, group)
    if kind == "folder":
        folder = Path(root) / split if split else Path(root)
        return ImageFolderDataset(folder, size, group)
    raise ValueError(f"kind: unknown real dataset kind {kind!r}, expected one of {KINDS}")


def _require_split(kind: str, split: str | None) -> str:
    if not split:
        raise ValueError(f"split: a {kind} dataset needs a split such as 'train', got {split!r}")
    return split


__all__ = [
    "CAMVID_LAYOUT",
    "CITYSCAPES_LAYOUT",
    "IMAGE_EXTENSIONS",
    "KINDS",
    "LABEL_MODES",
    "LABEL_SCAN",
    "REAL_DOMAIN",
    "CamVidDataset",
    "CityscapesDataset",
    "ImageFolderDataset",
    "RealDataError",
    "RealDataset",
    "build_real_dataset",
]
