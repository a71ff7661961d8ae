"""Safe loading and atomic saving of model weights.

Every file is read with ``torch.load(..., weights_only=True)``: a checkpoint is data,
and a full unpickler would run whatever code a crafted file names. A file that holds
anything besides tensors and plain containers (str, int, float, bool, None, list, tuple,
dict) is refused with :class:`CheckpointError`.

Before any weight is copied, the checkpoint is checked against the model -- by
architecture name when the file records one (``checkpoint["arch"]``, written by
:func:`save_state_dict` and by our Lightning module), and always by key set and tensor
shapes -- so a checkpoint of another architecture stops the run before training starts
with a message that names the file and the config key (:class:`CheckpointMismatchError`).

Example:
    >>> save_state_dict(model, "runs/a/model.pt")
    >>> load_checkpoint_weights(other_model, "runs/a/model.pt", key="model.init_checkpoint")
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.files import atomic_write_bytes

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "describe_mismatches",
    "extract_state_dict",
    "load_checkpoint_weights",
    "read_checkpoint",
    "save_state_dict",
    "state_dict_mismatches",
]

#: Prefix of the task model's keys in a Lightning checkpoint (``LightningModule.model``).
LIGHTNING_PREFIX = "model."

#: Key component that ``torch.compile`` inserts (``OptimizedModule._orig_mod``).
_COMPILE_COMPONENT = "_orig_mod."

#: At most this many keys of each kind are named in an error message.
_MAX_NAMED_KEYS = 5

#: Buffers that may be absent from older files: BatchNorm fills them in on load
#: (torchvision's published ResNet weights predate ``num_batches_tracked``).
_OPTIONAL_SUFFIXES = (".num_batches_tracked",)


class CheckpointError(ValueError):
    """A weights file that cannot be used; the message names the file and config key."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose architecture, keys or tensor shapes do not fit the model."""


def read_checkpoint(path: str | os.PathLike[str], key: str) -> Any:
    """``torch.load`` of ``path`` on the CPU with ``weights_only=True``.

    Args:
        path: the file.
        key: the config key that named ``path``, quoted in every error.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is not a torch checkpoint, or holds objects that the
            weights-only unpickler refuses (classes, functions, arbitrary objects).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(
            f"{key}: {path} was refused by torch.load(weights_only=True): it holds Python "
            f"objects besides tensors and plain containers ({first_line}). Files are never "
            "unpickled in full, since that can run arbitrary code; re-save the weights with "
            "training.models.save_state_dict (or keep only plain values in the checkpoint)."
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(
            f"{key}: {path} could not be read as a torch checkpoint: {error}"
        ) from error


def extract_state_dict(
    checkpoint: Any, path: str | os.PathLike[str], key: str
) -> tuple[dict[str, Tensor], str | None]:
    """The state_dict and recorded architecture of a loaded checkpoint.

    Accepts a plain state_dict (``{name: tensor}``), our wrapped format
    (``{"arch": str, "state_dict": {...}}``) and a Lightning checkpoint
    (``{"state_dict": {"model.<name>": ...}, ...}``). When keys carry the Lightning
    prefix ``model.``, only those keys are kept (others belong to the rest of the
    LightningModule: loss buffers, a domain discriminator) and the prefix is removed;
    ``torch.compile``'s ``_orig_mod.`` component is removed as well.

    Returns:
        ``(state_dict, arch)``; ``arch`` is ``None`` when the file does not record one.

    Raises:
        CheckpointError: not a mapping of names to tensors.
    """
    arch: str | None = None
    state = checkpoint
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        state = checkpoint["state_dict"]
        recorded = checkpoint.get("arch")
        arch = recorded if isinstance(recorded, str) else None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{key}: {path} is neither a state_dict ({{name: tensor}}) nor a checkpoint "
            f"with a 'state_dict' entry (top-level type {type(checkpoint).__name__})"
        )
    if any(k.startswith(LIGHTNING_PREFIX) for k in state):
        cut = len(LIGHTNING_PREFIX)
        state = {k[cut:]: v for k, v in state.items() if k.startswith(LIGHTNING_PREFIX)}
    return {k.replace(_COMPILE_COMPONENT, ""): v for k, v in state.items()}, arch


def state_dict_mismatches(
    expected: Mapping[str, Tensor], loaded: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """How ``loaded`` differs from a model's ``expected`` state_dict.

    Returns:
        ``(missing, unexpected, shape_mismatches)``: keys of ``expected`` absent from
        ``loaded`` (optional BatchNorm counters excepted), keys of ``loaded`` the model
        lacks, and ``"name: checkpoint (..) vs model (..)"`` for keys whose shapes differ.
        All three empty means a strict ``load_state_dict`` will succeed.
    """
    missing = [k for k in expected if k not in loaded and not k.endswith(_OPTIONAL_SUFFIXES)]
    unexpected = [k for k in loaded if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(loaded[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in loaded and loaded[k].shape != v.shape
    ]
    return missing, unexpected, shapes


def describe_mismatches(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    """One line naming the first few keys of each kind of mismatch."""

    def first(items: list[str]) -> str:
        shown = ", ".join(items[:_MAX_NAMED_KEYS])
        hidden = len(items) - _MAX_NAMED_KEYS
        return shown + (f", ... (+{hidden} more)" if hidden > 0 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {first(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {first(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {first(shapes)}")
    return "; ".join(parts)


def load_checkpoint_weights(
    model: nn.Module, path: str | os.PathLike[str], key: str = "model.init_checkpoint"
) -> None:
    """Load the weights in ``path`` into ``model``, in place, after checking they fit.

    Args:
        model: the model; its ``arch`` attribute (if any) is compared with the
            checkpoint's. A ``torch.compile``'d model is unwrapped.
        path: a plain state_dict, a file from :func:`save_state_dict`, or a Lightning
            checkpoint of our task module (keys ``model.<name>``).
        key: the config key that named ``path``, quoted in errors.

    Raises:
        FileNotFoundError: no file at ``path`` (the message names ``key``).
        CheckpointError: unreadable file, or objects that weights-only loading refuses.
        CheckpointMismatchError: the checkpoint records another ``arch``, or its keys or
            shapes differ from the model's -- raised before any weight is changed.
    """
    target = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    state, ckpt_arch = extract_state_dict(read_checkpoint(path, key), path, key)
    model_arch = getattr(target, "arch", None)
    shown_ckpt = repr(ckpt_arch) if ckpt_arch is not None else "not recorded"
    shown_model = repr(model_arch) if model_arch is not None else type(target).__name__

    if ckpt_arch is not None and model_arch is not None and ckpt_arch != model_arch:
        raise CheckpointMismatchError(
            f"{key}: checkpoint {path} was saved from architecture {ckpt_arch!r}, but the "
            f"model is {model_arch!r}; point {key} at a checkpoint of this architecture or "
            "configure the model that made it"
        )
    problems = state_dict_mismatches(target.state_dict(), state)
    if any(problems):
        raise CheckpointMismatchError(
            f"{key}: checkpoint {path} (architecture {shown_ckpt}) does not fit the model "
            f"(architecture {shown_model}): {describe_mismatches(*problems)}"
        )
    target.load_state_dict(state, strict=True)


def save_state_dict(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save ``{"arch": model.arch, "state_dict": ...}`` to ``path`` atomically.

    Tensors are detached and moved to the CPU so the file loads anywhere. The file is
    written as a temporary sibling, fsynced, then renamed over ``path``: a reader sees
    the old file or the new one, never a partial write. A ``torch.compile``'d model is
    unwrapped so the keys match the plain model's. ``arch`` is ``None`` for models
    without the attribute.
    """
    target = getattr(model, "_orig_mod", model)
    payload = {
        "arch": getattr(target, "arch", None),
        "state_dict": {k: v.detach().cpu() for k, v in target.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
