"""The fused (compiled C) per-pixel passes against the tensor kernels, and the fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from core.paths import config_dir
from simulation.procedural import ProceduralBackend, fused
from simulation.procedural.fused import resolve_kernels
from simulation.randomization import DomainRandomizer

H, W = 64, 128
needs_fused = pytest.mark.skipif(not fused.available(), reason="the C passes were not built")


def _randomizer(preset: str) -> DomainRandomizer:
    from hydra.utils import instantiate

    if preset == "camera_world":
        data = OmegaConf.load(config_dir() / "data/procedural.yaml")
        return instantiate(data.generate.camera_world)
    return instantiate(OmegaConf.load(config_dir() / f"randomization/{preset}.yaml"))


def _frames(taxonomy, preset: str, style: str, kernels: str, indices=range(24)):
    backend = ProceduralBackend(
        _randomizer(preset), taxonomy, seed=3, height=H, width=W, style=style, kernels=kernels
    )
    try:
        return backend.render(list(indices))
    finally:
        backend.close()


@needs_fused
@pytest.mark.parametrize(
    "preset, style",
    [("full", "sim"), ("full", "photo"), ("appearance", "sim"), ("camera_world", "photo")],
)
def test_fused_passes_agree_with_the_tensor_kernels(taxonomy, preset, style):
    """Same maths in float32: labels equal, image bytes within two grey levels, and unequal
    on at most 0.1 % of the values (measured at 64x128: 0.001-0.003 % for sim, 0.027 %
    for photo, whose JPEG step can round a coefficient the other way; all from the last
    bits of sin/exp and summation order)."""
    ref = _frames(taxonomy, preset, style, "torch")
    new = _frames(taxonomy, preset, style, "fused")
    assert np.mean(ref.masks == new.masks) >= 0.99999
    diff = np.abs(ref.images.astype(np.int16) - new.images.astype(np.int16))
    assert diff.max() <= 2
    assert np.mean(diff > 0) <= 1e-3
    assert [r["params"] for r in ref.records] == [r["params"] for r in new.records]
    assert new.records[0]["backend_version"].endswith("-fused")
    assert ref.records[0]["backend_version"].endswith("-torch")


@needs_fused
@pytest.mark.parametrize("preset, style", [("full", "sim"), ("appearance", "photo")])
def test_every_instruction_set_writes_the_same_bytes(taxonomy, preset, style):
    """The vectorized passes are compiled for baseline x86-64, AVX2 and AVX-512 and the
    widest the CPU has runs: each must write exactly the bytes of the others."""
    widest = fused.isa()
    if widest == "baseline":
        pytest.skip("this CPU has neither AVX2 nor AVX-512: one variant only")
    frames = {}
    try:
        for name in fused.ISA_NAMES[: fused.ISA_NAMES.index(widest) + 1]:
            assert fused.isa(name) == name
            frames[name] = _frames(taxonomy, preset, style, "fused", range(12))
    finally:
        fused.isa(fused.ISA_NAMES[-1])
    assert fused.isa() == widest
    for name, batch in frames.items():
        np.testing.assert_array_equal(batch.images, frames["baseline"].images, err_msg=name)
        np.testing.assert_array_equal(batch.masks, frames["baseline"].masks, err_msg=name)


def test_isa_names_are_checked():
    with pytest.raises(ValueError, match="expected one of .*'avx512'.*, got 'sse9'"):
        fused.isa("sse9")


@pytest.mark.parametrize("kernels", ["torch", pytest.param("fused", marks=needs_fused)])
def test_frames_depend_only_on_their_index(taxonomy, kernels):
    """Any batch, any thread count, the pool of render threads or none: the same bytes,
    textured tree crowns and per-frame sensor blur included (both once read the batch:
    the crown's tile corner came from the sprite's place in the batch, the blur's radius
    from the batch's largest sigma)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # fused: a pool of two render threads, a piece each
        whole = _frames(taxonomy, "appearance", "sim", kernels, range(24))
        alone = _frames(taxonomy, "appearance", "sim", kernels, [15, 2])
        torch.set_num_threads(1)  # one thread: no pool, OpenMP on one core
        serial = _frames(taxonomy, "appearance", "sim", kernels, range(24))
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(whole.images[[15, 2]], alone.images)
    np.testing.assert_array_equal(whole.masks[[15, 2]], alone.masks)
    np.testing.assert_array_equal(whole.images, serial.images)
    np.testing.assert_array_equal(whole.masks, serial.masks)


@needs_fused
def test_fused_sensor_blur_matches_the_tensor_blur_where_the_radius_is_the_same():
    """One frame, one radius: the separable C blur equals torch's conv2d to float rounding."""
    from simulation.randomization import Sensor
    from simulation.sensor import apply_sensor_effects

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, H, W, generator=gen)
    sensors = [Sensor(noise_std=0.02, blur_sigma_px=1.1, exposure_ev=0.5, vignetting=0.3)]
    ref = apply_sensor_effects(images.clone(), sensors, [(1, 2)])
    new = fused.sensor(images.clone(), sensors, [(1, 2)])
    torch.testing.assert_close(new, ref, atol=2e-6, rtol=0)


def test_auto_falls_back_to_the_tensor_kernels_without_the_extension(taxonomy, monkeypatch):
    monkeypatch.setattr(fused, "available", lambda: False)
    assert resolve_kernels("auto") == "torch"
    backend = ProceduralBackend(_randomizer("light"), taxonomy, seed=0, height=H, width=W)
    assert backend.kernels == "torch" and backend.version.endswith("-torch")
    assert backend.render([0, 1]).images.shape == (2, H, W, 3)
    with pytest.raises(ValueError, match=r"backend.kernels: fused needs the compiled passes"):
        resolve_kernels("fused")


def test_kernels_setting_is_checked(monkeypatch):
    with pytest.raises(ValueError, match=r"backend.kernels: expected auto, fused or torch, got 'c"):
        resolve_kernels("c")
    monkeypatch.setattr(fused, "available", lambda: True)
    assert resolve_kernels("auto") == "fused"
    assert resolve_kernels("auto", compile=True) == "torch"  # torch.compile asked for
    with pytest.raises(ValueError, match=r"backend.compile: torch.compile applies to the tensor"):
        resolve_kernels("fused", compile=True)


def test_library_is_none_where_the_module_is_not_a_compiled_one(monkeypatch):
    import importlib.util

    fused.library.cache_clear()
    try:
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
        assert fused.library() is None and not fused.available()
    finally:
        monkeypatch.undo()
        fused.library.cache_clear()


@needs_fused
@pytest.mark.parametrize("decal", [False, True])
def test_compiled_sprites_write_the_bytes_of_the_numpy_rasterizer(decal):
    """Overlapping sprites at equal depths (the later wins), sprites half outside the
    frame, behind the camera or of no size, textured canopies: the C loop and
    sprites.rasterize leave every buffer byte for byte the same."""
    from simulation.procedural import kernels, textures
    from simulation.procedural import sprites as sp

    rng = np.random.default_rng(7)
    n, h, w, count = 3, 40, 60, 90
    sprites = sp.Sprites(
        frame=np.sort(rng.integers(0, n, count)),
        u0=rng.uniform(-20, 70, count),
        v0=rng.uniform(-15, 45, count),
        w=rng.uniform(1e-3, 30, count),
        h=rng.uniform(1e-3, 30, count),
        depth=rng.choice([-1.0, 3.0, 5.0, 5.0, 8.5], count).astype(np.float32),
        template=rng.integers(0, len(sp.TEMPLATES), count),
        label=rng.integers(0, 11, count).astype(np.uint8),
        color=rng.uniform(0, 1, (count, 3)).astype(np.float32),
        texture=rng.choice([0.0, 0.4, 0.9], count).astype(np.float32),
        decal=np.full(count, decal),
    )
    start = {
        "depth": rng.choice([4.0, 6.0, 1e4], (n, h, w)).astype(np.float32),
        "label": rng.integers(0, 11, (n, h, w)).astype(np.uint8),
        "albedo": rng.uniform(0, 1, (n, h, w, 3)).astype(np.float32),
        "emissive": np.zeros((n, h, w), np.float32),
    }
    fixed = rng.uniform(0, 1, (sp.NUM_PARTS, 3)).astype(np.float32)
    tile = None if decal else textures.tiles()[textures.FAMILY_ID["foliage"], 0].numpy()
    ref = {k: v.copy() for k, v in start.items()}
    new = {k: v.copy() for k, v in start.items()}
    sp.rasterize(sprites, *ref.values(), fixed, decal, tile=tile)
    surface, height = np.zeros((n, h, w), np.uint8), np.zeros((n, h, w), np.float32)
    fused.sprites(sprites, *new.values(), fixed, decal, tile=tile, upright=(surface, height))
    for k in start:
        np.testing.assert_array_equal(new[k], ref[k], err_msg=k)
    assert not np.array_equal(new["albedo"], start["albedo"])  # something was drawn
    # the upright pixels: where the depth moved (decals never move it)
    moved = ref["depth"] != start["depth"]
    assert moved.any() != decal
    np.testing.assert_array_equal(surface, np.where(moved, kernels.S_UPRIGHT, 0))
    np.testing.assert_array_equal(height, np.where(moved, 1.0, 0.0).astype(np.float32))


@needs_fused
def test_render_threads_take_small_pieces_and_the_bytes_stay(taxonomy, monkeypatch):
    """Pieces of PIECE_PIXELS (here 5 frames) on the pool of render threads: the frames
    of one piece of 24 and of five pieces are the same bytes, records in order."""
    from simulation.procedural import backend as backend_module

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        whole = _frames(taxonomy, "full", "sim", "fused", range(24))
        monkeypatch.setattr(backend_module, "PIECE_PIXELS", 5 * H * W)
        sizes = []
        render = ProceduralBackend._render

        def spy(self, chunk, threads):
            sizes.append(len(chunk))
            return render(self, chunk, threads)

        monkeypatch.setattr(ProceduralBackend, "_render", spy)
        pieces = _frames(taxonomy, "full", "sim", "fused", range(24))
    finally:
        torch.set_num_threads(threads)
    assert sorted(sizes) == [4, 5, 5, 5, 5]
    np.testing.assert_array_equal(pieces.images, whole.images)
    np.testing.assert_array_equal(pieces.masks, whole.masks)
    assert [r["index"] for r in pieces.records] == list(range(24))


@needs_fused
def test_generation_benchmark_prints_each_instruction_set_and_the_stages():
    """scripts/benchmark_generation.py, tiny: a row per instruction set asked for (named
    as the set that ran) and the per-pass stages, each with a positive figure."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_generation.py"
    tiny = ["--frames", "8", "--batch-size", "4", "--shard-size", "4", "--styles", "sim"]
    widest = fused.isa()
    out = subprocess.run(
        [sys.executable, str(script), *tiny, "--kernels", "fused", "--isa", "baseline", widest],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("sim ")]
    names = {(r[1], r[2]) for r in rows}
    assert {("fused/baseline", "memory"), ("fused/baseline", "disk")} <= names
    assert (f"fused/{widest}", "memory") in names or widest == "baseline"
    assert all(float(r[3]) > 0 for r in rows)
    stages = subprocess.run(
        [sys.executable, str(script), *tiny, "--stages"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    for label in ("pass surfaces", "pass shade", "pass finish", "python scene sampling"):
        line = next(x for x in stages.splitlines() if x.strip().startswith(label))
        assert float(line.split()[-1]) > 0, line
