"""Config errors, the one value checker, and building objects from Hydra nodes.

Every message names the key a user would type (``stages.finetune.sim_ratio``), passed in
by the caller: the leaves that check values never guess where a value came from.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


class ConfigError(ValueError):
    """A config that cannot run; the message names the key a user would type."""


def check_number(
    key: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> Any:
    """Return ``value`` if it is a number in the stated range, else raise
    :class:`ConfigError` naming ``key`` and what was expected.

    ``low``/``high`` bound the range (closed unless ``low_open``/``high_open``);
    ``integer`` asks for a whole number; ``optional`` lets ``None`` through.

    Example:
        >>> check_number("stages.finetune.sim_ratio", 0.9, low=0, high=1)
        0.9
    """
    if value is None and optional:
        return None
    kind = "a whole number" if integer else "a number"
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    if low is not None and high is not None:
        expected = f"{kind} in {left}{_fmt(low)}, {_fmt(high)}{right}"
    elif low is not None:
        expected = f"{kind} {'>' if low_open else '>='} {_fmt(low)}"
    elif high is not None:
        expected = f"{kind} {'<' if high_open else '<='} {_fmt(high)}"
    else:
        expected = kind
    if optional:
        expected += " or null"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and integer:
        ok = isinstance(value, numbers.Integral) or (
            math.isfinite(value) and float(value).is_integer()
        )
    if ok:
        ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    return int(value) if integer else value


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def plain(value: Any) -> Any:
    """A config node as plain, resolved containers; anything else as it is."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def instantiate_checked(node: Any, key: str | None = None, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising our own config errors unwrapped, so the user
    reads the key that is wrong rather than Hydra's 'Error in call to target'.

    With ``key`` (where ``node`` sits, e.g. ``data.augment``), an error whose message starts
    with one of the node's fields (``scale: expected ...``) names the full key
    (``data.augment.scale: expected ...``) and is a :class:`ConfigError`.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ValueError | OSError):
            raise _named(cause, node, key) from None
        raise
    except ValueError as exc:
        raise _named(exc, node, key) from None


def _named(error: Exception, node: Any, key: str | None) -> Exception:
    if key is None or isinstance(error, ConfigError) or not isinstance(error, ValueError):
        return error
    text = str(error)
    field = text.split(":", 1)[0]
    if hasattr(node, "keys") and field in node:
        return ConfigError(f"{key}.{text}")
    return ConfigError(f"{key}: {text}")
