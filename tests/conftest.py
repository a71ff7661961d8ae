"""Shared fixtures: the project's real configs, composed the way users run them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def load_config(group: str, name: str):
    return OmegaConf.load(CONFIGS / group / f"{name}.yaml")


@pytest.fixture(scope="session")
def taxonomy():
    return instantiate(load_config("taxonomy", "drive11"))


@pytest.fixture(scope="session")
def randomizer_full():
    return instantiate(load_config("randomization", "full"))
