"""Smoke test of scripts/benchmark_cyclegan.py at toy size (the real run takes minutes)."""

from __future__ import annotations

import json

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
    results = main([*TINY, "--lightning", "--json", str(out)])
    printed = capsys.readouterr().out

    assert "## small" in printed and "--reference-repo" in printed  # says how to compare
    assert "training:" in printed and "translation:" in printed
    written = json.loads(out.read_text())
    assert written["machine"]["torch_threads"] >= 1
    cfg = written["configs"]["small"]
    assert cfg["config"] == {"ngf": 4, "ndf": 4, "blocks": 2, "batch": 2, "height": 32, "width": 32}
    assert cfg["params"]["ours"]["G"] > 0 and cfg["params"]["ours"]["D"] > 0
    assert "junyanz" not in cfg["training"]  # no reference checkout given
    _positive(cfg["training"]["ours"])
    assert "cpu_median_s" in cfg["training"]["ours"]
    _positive(cfg["training"]["ours_trainer"])  # the same step inside a pl.Trainer
    assert set(cfg["translate"]) == {"1", "3"}
    for summary in cfg["translate"].values():
        _positive(summary)
    assert results["configs"]["small"]["training"]["ours"]["n"] == 1
