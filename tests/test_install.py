"""The package as users install it: a wheel built from the checkout, installed into a fresh
virtual environment, used from a folder outside the checkout. The Hydra configs must come
with it (package data) and compose there, and the scripts must find them (``pkg://configs``).
Slow: builds a wheel and a venv (the venv reuses this interpreter's packages, no download).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, ROOT

pytestmark = pytest.mark.slow

#: Top-level folders of a checkout that are not the package (outputs, data, caches, tests).
NOT_SOURCE = {
    ".git",
    "build",
    "data",
    "dist",
    "docs",
    "mlartifacts",
    "mlruns",
    "multirun",
    "outputs",
    "tests",
    ".venv",
}
CACHES = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache")

#: Run by the installed package's interpreter: where the configs are, and one composition.
PROBE = """
import json, sys
import core.paths
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

where = core.paths.config_dir()
with initialize_config_dir(str(where), version_base="1.3"):
    cfg = compose("train", ["experiment=smoke", "randomization.weather.cloudiness=[0,61]"])
print(json.dumps({
    "config_dir": str(where),
    "core": core.paths.__file__,
    "sys_path": sys.path,
    "name": cfg.name,
    "cloudiness": OmegaConf.to_container(cfg.data.generate.randomization.weather.cloudiness),
    "sim_train": cfg.data.datasets.sim_train.root,
    "yaml": sorted(p.relative_to(where).as_posix() for p in where.rglob("*.yaml")),
}))
"""


def _ignore(root: Path):
    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = set(CACHES(folder, names))
        if Path(folder) == root:
            skipped |= NOT_SOURCE & set(names)
        return skipped

    return ignore


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def test_the_wheel_ships_the_configs_and_they_compose_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_NO_INDEX"] = "1"  # nothing is downloaded: the venv reuses this interpreter's
    yaml = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))

    # a copy of the sources, so the build leaves nothing (build/, egg-info) in the checkout
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_ignore(ROOT))
    wheels = tmp_path / "wheels"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    _run([*cmd, "-w", str(wheels), "."], src, env)
    (wheel,) = wheels.glob("sim2real_drive-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"configs/{name}" for name in yaml} <= names
    assert {"configs/__init__.py", "core/paths.py", "core/hashing.py"} <= names
    assert not any(n.startswith(("configs/data/__init__", "tests/")) for n in names)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    # --force-reinstall: this interpreter has the package already (editable, same version)
    pip = [str(python), "-m", "pip", "install", "--no-deps", "--force-reinstall"]
    _run([*pip, str(wheel)], tmp_path, env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = json.loads(_run([str(python), "-c", PROBE], elsewhere, env).stdout)
    config_dir = Path(probe["config_dir"])
    assert config_dir.is_relative_to(venv) and config_dir.parent.name == "site-packages"
    assert not config_dir.is_relative_to(ROOT) and not Path(probe["core"]).is_relative_to(ROOT)
    assert not any((elsewhere / p).resolve() == ROOT for p in probe["sys_path"])
    assert probe["yaml"] == yaml  # every config, subfolders included
    assert probe["name"] == "smoke" and probe["cloudiness"] == [0, 61]
    assert Path(probe["sim_train"]).name.startswith("sim_train-")

    # the scripts find the installed configs too (@hydra.main(config_path="pkg://configs"))
    job = _run(
        [str(python), "-m", "scripts.generate", "--cfg", "job", "randomization=light"],
        elsewhere,
        env,
    )
    assert "Town01: 0.4" in job.stdout  # configs/randomization/light.yaml
    job = _run(
        [str(python), "-m", "scripts.train", "--cfg", "job", "experiment=smoke"],
        elsewhere,
        env,
    )
    assert "name: smoke" in job.stdout and "${generated:sim_train}" in job.stdout
