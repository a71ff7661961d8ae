"""The optional C extension (simulation/procedural/_fused.c) as ``pip`` builds it: with a
compiler the wheel carries it and the backend uses it; without one the build still
succeeds, the wheel carries none and the backend falls back to the tensor kernels.
Slow: two wheel builds and a venv (no download: the venv reuses this interpreter's packages).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

#: What the copied source leaves out: caches, outputs and the in-place built extension.
SKIP = shutil.ignore_patterns(
    *("__pycache__", "*.egg-info", "*.so", ".pytest_cache", ".ruff_cache", ".git", "build"),
    *("data", "dist", "docs", "outputs", "multirun", "mlruns", "tests"),
)
PROBE = (
    "from simulation.procedural import fused; from simulation.procedural.fused import "
    "resolve_kernels; print(fused.available(), resolve_kernels('auto'), fused.__file__)"
)


def _run(cmd, cwd, env):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    command = " ".join(map(str, cmd))
    assert out.returncode == 0, f"{command}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out


def _wheel(tmp_path: Path, name: str, env: dict[str, str]) -> tuple[Path, str]:
    src = tmp_path / f"src-{name}"
    shutil.copytree(ROOT, src, ignore=SKIP)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v"]
    out = _run([*cmd, "-w", str(tmp_path / name), "."], src, env)
    (wheel,) = (tmp_path / name).glob("sim2real_drive-*.whl")
    return wheel, out.stdout + out.stderr


def test_the_extension_is_built_where_a_compiler_is_and_skipped_where_none_is(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_NO_INDEX"] = "1"
    wheel, _ = _wheel(tmp_path, "with", env)
    assert any(
        n.startswith("simulation/procedural/_fused") and n.endswith(".so")
        for n in zipfile.ZipFile(wheel).namelist()
    )

    # no working compiler: setuptools' unix compiler runs $CC, here a command that fails
    bare, log = _wheel(tmp_path, "without", {**env, "CC": "false", "LDSHARED": "false"})
    names = zipfile.ZipFile(bare).namelist()
    assert not any(
        n.startswith("simulation/procedural/_fused") and n.endswith(".so") for n in names
    )
    assert "simulation/procedural/fused.py" in names
    assert "renderer will use its tensor kernels" in log

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--no-deps", "--force-reinstall"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run([*pip, str(bare)], tmp_path, env)
    available, kernels, where = _run([python, "-c", PROBE], elsewhere, env).stdout.split()
    assert (available, kernels) == ("False", "torch") and Path(where).is_relative_to(venv)
    _run([*pip, str(wheel)], tmp_path, env)
    available, kernels, where = _run([python, "-c", PROBE], elsewhere, env).stdout.split()
    assert (available, kernels) == ("True", "fused") and Path(where).is_relative_to(venv)
