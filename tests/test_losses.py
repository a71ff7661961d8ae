"""Loss errors name what a user can change: a config key, or the function argument."""

from __future__ import annotations

import pytest

from training.losses import class_weights_from_histogram

COUNTS = [500, 300, 150, 40, 10]


@pytest.mark.parametrize("clip", [(2.0, 5.0), (0.0, 5.0), (0.2, 0.5), (0.2, float("inf")), (1,)])
def test_bad_clip_names_the_argument_not_a_config_key(clip: tuple) -> None:
    # No config sets the clip (the stages use the default), so the message names the
    # function argument rather than a key no config has.
    with pytest.raises(ValueError, match=r"^class_weights_from_histogram\(clip=\.\.\.\): ") as e:
        class_weights_from_histogram(COUNTS, "inverse", clip=clip)
    assert "loss." not in str(e.value)


def test_unknown_method_names_the_config_key() -> None:
    with pytest.raises(ValueError, match=r"^loss\.class_weighting: expected one of"):
        class_weights_from_histogram(COUNTS, "focal")
