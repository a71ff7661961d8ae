"""Smoke test of scripts/benchmark_cyclegan.py at toy size (the real run takes minutes)."""

from __future__ import annotations

import json

import pytest

from scripts.benchmark_cyclegan import main

TINY = [
    "--config",
    "small",
    "--ngf",
    "4",
    "--ndf",
    "4",
    "--blocks",
    "2",
    "--batch",
    "2",
    "--height",
    "32",
    "--width",
    "32",
    "--iters",
    "1",
    "--warmup",
    "0",
    "--translate-batch",
    "1",
    "3",
    "--translate-iters",
    "1",
]


def _positive(summary: dict) -> None:
    assert summary["n"] >= 1
    for key in ("median_s", "mean_s", "min_s", "max_s", "images_per_s"):
        assert summary[key] > 0, key
    assert summary.get("cpu_median_s", 0.0) >= 0


def test_benchmark_prints_and_writes_positive_figures(tmp_path, capsys):
    out = tmp_path / "figures.json"
    results = main([*TINY, "--lightning", "--curve-iters", "6", "--json", str(out)])
    printed = capsys.readouterr().out

    assert "## small" in printed and "--reference-repo" in printed  # says how to compare
    assert "training:" in printed and "translation:" in printed
    written = json.loads(out.read_text())
    assert written["machine"]["torch_threads"] >= 1
    cfg = written["configs"]["small"]
    assert cfg["config"] == {"ngf": 4, "ndf": 4, "blocks": 2, "batch": 2, "height": 32, "width": 32}
    assert cfg["params"]["ours"]["G"] > 0 and cfg["params"]["ours"]["D"] > 0
    assert "junyanz" not in cfg["training"]  # no reference checkout given
    for form in ("ours_fp32", "ours_bf16", "ours_bf16+cl"):  # the default forms
        _positive(cfg["training"][form])
        assert "cpu_median_s" in cfg["training"][form]
    gains = cfg["training"]["speedups"]
    assert set(gains["ours_bf16+cl"]) == {"vs_ours_fp32", "vs_ours_bf16"}  # each step's gain
    assert gains["ours_bf16"]["vs_ours_fp32"] > 0
    assert "speed-up ours_bf16" in printed
    _positive(cfg["training"]["ours_trainer"])  # the same step inside a pl.Trainer
    assert set(cfg["translate"]) == {"1", "3"}
    for summary in cfg["translate"].values():
        _positive(summary)
    assert results["configs"]["small"]["training"]["ours_fp32"]["n"] == 1
    curves = cfg["loss_curves"]["curves"]
    assert len(curves) == 2 and "ours_fp32" in curves  # no reference: the fastest vs fp32
    for curve in curves.values():
        assert len(curve["g_loss"]) == len(curve["d_loss"]) == 6
        assert all(v > 0 for v in curve["g_loss"])
    assert -1 <= cfg["loss_curves"]["trend"]["g_loss"]["correlation"] <= 1
    assert "loss curves over the same first 6 iterations" in printed


def test_trend_agreement_of_two_falling_curves_and_of_opposite_ones():
    from scripts.benchmark_cyclegan import trend_agreement

    falling = [10.0 - i for i in range(10)]
    same = trend_agreement(falling, [2 * v for v in falling], window=2)
    assert same["correlation"] == pytest.approx(1.0)
    assert same["change_a"] == pytest.approx(same["change_b"])
    assert same["change_a"] < 0
    opposite = trend_agreement(falling, falling[::-1], window=2)
    assert opposite["correlation"] == pytest.approx(-1.0)


@pytest.mark.parametrize("layout", ["missing", "other"])
def test_a_reference_checkout_that_is_missing_or_of_another_layout_names_the_path(tmp_path, layout):
    from scripts.benchmark_cyclegan import load_reference

    repo = tmp_path / "checkout"
    if layout == "other":
        (repo / "models").mkdir(parents=True)
        (repo / "models" / "networks.py").write_text("# not the CycleGAN repository\n")
    with pytest.raises(
        FileNotFoundError, match=r"--reference-repo .*checkout: no models/cycle_gan_model.py"
    ):
        load_reference(repo)
