"""Building objects from Hydra configs with errors that name the key at fault."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config that cannot run; the message names the key."""


def instantiate_checked(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising our own config errors unwrapped, so the user
    reads the key that is wrong rather than Hydra's 'Error in call to target'."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ValueError | OSError):
            raise cause from None
        raise
