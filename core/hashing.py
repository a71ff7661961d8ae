"""Content hashes: 12 hex digits of SHA-256 over canonical JSON (keys sorted, anything JSON
cannot write as ``str``), so the same settings give the same key in every process and on
every machine, whatever the order of their keys.

:func:`content_hash` hashes any JSON-like blob; each ``*_key`` function names what goes
into one kind of key and takes plain values (dicts, lists, numbers, strings), never config
nodes: a caller resolves its config first.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

#: Hex digits of a key (48 bits: no accidental collision among a project's folders).
KEY_LENGTH = 12


def content_hash(blob: Any) -> str:
    """12 hex digits of SHA-256 over ``blob`` as canonical JSON.

    Example:
        >>> content_hash({"b": 1, "a": [1, 2]}) == content_hash({"a": [1, 2], "b": 1})
        True
    """
    text = json.dumps(blob, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_LENGTH]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The full SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def generation_key(
    split: str,
    spec: Mapping[str, Any],
    randomization: Mapping[str, Any],
    image: Mapping[str, Any],
    shard_size: int,
    taxonomy: Mapping[str, Any],
) -> str:
    """The key of one generated split: its name and spec (style, seed, frame count), the
    randomization node, the image size, the shard size and the taxonomy config -- all that
    decides its frames, labels and card. Values as written: ``[0, 20]`` and ``[0.0, 20.0]``
    are different keys."""
    return content_hash(
        {
            "split": split,
            "spec": spec,
            "randomization": randomization,
            "image": image,
            "shard_size": shard_size,
            "taxonomy": taxonomy,
        }
    )


def stage_key(
    *,
    sections: Mapping[str, Any],
    stage: Mapping[str, Any],
    trainer: Mapping[str, Any],
    world_size: int,
    objectives: Mapping[str, Any],
    inputs: Mapping[str, str],
    parent: str | None,
) -> str:
    """The key of a segmentation stage: the config sections that decide its result (seed,
    data, model, ...), the stage's own settings, the result-changing trainer settings, the
    world size, its adaptation objectives, data made inside the run (``inputs``: the
    translated sim set's key) and the key of the stage it starts from."""
    blob: dict[str, Any] = dict(sections)
    blob.update(stage=stage, trainer=trainer, world_size=world_size, parent=parent)
    if objectives:
        blob["objectives"] = dict(objectives)
    if inputs:
        blob["inputs"] = dict(inputs)
    return content_hash(blob)


def generator_key(
    *,
    seed: int,
    settings: Mapping[str, Any],
    image_size: Any,
    data: Mapping[str, Any],
    segmenter: str | None,
    precision: Any,
) -> str:
    """The key of a trained CycleGAN generator: seed, model and training settings, image
    size, the sim and real data it saw, the frozen segmenter (semantic loss) and precision."""
    return content_hash(
        {
            "seed": seed,
            "settings": settings,
            "image_size": image_size,
            "data": data,
            "segmenter": segmenter,
            "precision": precision,
        }
    )


def translation_key(*, generator: str, source: Mapping[str, Any], guard: Mapping[str, Any]) -> str:
    """The key of a translated sim set: the generator's identity, the source set and the
    semantic guard's settings."""
    return content_hash({"generator": generator, "source": source, "guard": guard})
