"""Where things are: the project's Hydra configs (a checkout's ``configs/`` or the installed
package's) and the folders of generated dataset splits.

A generated split lives in ``<data.generate.root>/<split>-<key>``, the key a content hash of
what makes it (:func:`core.hashing.generation_key`), so two presets, seeds, sizes or frame
counts never share a folder. Importing this module registers the OmegaConf resolver
``${generated:SPLIT}`` that the data configs use for ``data.datasets.<role>.root``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.config import ConfigError, plain
from core.hashing import generation_key

#: The resolver of the generated splits' folders: ``root: ${generated:sim_train}``.
RESOLVER = "generated"


def config_dir() -> Path:
    """The folder of the Hydra configs (``train.yaml`` and its groups)."""
    import configs

    return Path(configs.__file__).resolve().parent


def generated_root(
    gen: Mapping[str, Any], split: str, image: Mapping[str, Any], taxonomy: Mapping[str, Any]
) -> Path:
    """The folder of split ``split`` of ``data.generate`` (``gen``), for this image size and
    taxonomy config: ``<gen.root>/<split>-<12 hex digits>``. Config nodes or plain values."""
    gen, image, taxonomy = plain(gen), plain(image), plain(taxonomy)
    splits = gen.get("splits") or {}
    if split not in splits:
        raise ConfigError(
            f"data.generate.splits: no split '{split}' (splits: {', '.join(splits) or 'none'})"
        )
    spec = dict(splits[split])
    randomization = split_randomization(gen, split)
    spec.pop("randomization", None)  # hashed once, as the split's randomization
    key = generation_key(
        split=split,
        spec=spec,
        randomization=randomization,
        image={"height": image["height"], "width": image["width"]},
        shard_size=gen["shard_size"],
        taxonomy=taxonomy,
    )
    return Path(str(gen["root"])) / f"{split}-{key}"


def split_randomization(gen: Mapping[str, Any], split: str) -> dict[str, Any]:
    """The randomization node split ``split`` of ``data.generate`` (``gen``) renders with: its
    own ``splits.<split>.randomization`` when given (the real splits' camera world), else
    ``data.generate.randomization`` (the composed preset). Plain values or config nodes."""
    gen = plain(gen)
    spec = (gen.get("splits") or {}).get(split) or {}
    key = "data.generate.randomization"
    randomization = gen.get("randomization")
    if spec.get("randomization") is not None:
        key, randomization = f"data.generate.splits.{split}.randomization", spec["randomization"]
    if not isinstance(randomization, Mapping):
        raise ConfigError(
            f"{key}: expected the randomization node, got "
            f"{randomization!r}; pick a preset with randomization={randomization or 'full'} "
            "(configs/randomization/) and change a field with "
            "randomization.weather.cloudiness=[0,80]"
        )
    return dict(randomization)


def _generated(split: str, *, _root_: Any, _node_: Any) -> str:
    """``${generated:SPLIT}``: :func:`generated_root` of ``data.generate``, ``data.image``
    and ``taxonomy`` of the config the value is in."""
    where = _node_._get_full_key(None) or "root"
    data = _root_.get("data")
    gen = data.get("generate") if data is not None else None
    if gen is None:
        raise ConfigError(
            f"{where}: ${{{RESOLVER}:{split}}} is a generated split, but data.generate is "
            f"null; point it at a dataset folder ({where}=<folder>)"
        )
    try:
        return str(generated_root(gen, str(split), data.image, _root_.taxonomy))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def register_resolvers() -> None:
    """Register ``${generated:SPLIT}`` (done on import; harmless to repeat)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _generated)


register_resolvers()
