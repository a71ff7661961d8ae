"""Risk T-06: latency percentiles, optimized forms of a model and their agreement."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from training.risk.latency import (
    KINDS,
    LatencyStats,
    NotApplicable,
    agreement,
    latency_report,
    measure_latency,
    optimize,
)


class FakeClock:
    """A clock that advances only when the timed function says so: exact durations."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TinyConvNet(nn.Module):
    """Conv-only segmenter with BatchNorm: (B, 3, H, W) -> (B, 4, H, W) logits."""

    arch = "tiny-conv"

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TinyLinearHead(nn.Module):
    """A conv stem and a per-pixel nn.Linear classifier: something int8_dynamic can quantize."""

    arch = "tiny-linear"

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.stem(x)).permute(0, 2, 3, 1)  # (B, H, W, 16)
        return self.head(features).permute(0, 3, 1, 2)


def _seeded(model_cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = model_cls()
    # Non-trivial BatchNorm statistics, so eval-vs-train mode mistakes would show.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_percentiles_from_an_injected_clock_are_exact():
    clock = FakeClock()
    durations_ms = itertools.cycle(range(1, 101))  # call i takes i ms: 1 .. 100
    calls = []

    def fn(x):
        calls.append(x)
        clock.now += next(durations_ms) / 1e3

    stats = measure_latency(fn, torch.zeros(1), runs=100, warmup=0, clock=clock)
    assert stats.runs == 100 and len(calls) == 100
    # numpy's linear interpolation over 1..100: p = 1 + q * 99
    assert stats.p50_ms == pytest.approx(50.5)
    assert stats.p95_ms == pytest.approx(95.05)
    assert stats.p99_ms == pytest.approx(99.01)
    assert stats.mean_ms == pytest.approx(50.5)
    assert (stats.min_ms, stats.max_ms) == pytest.approx((1.0, 100.0))


def test_warmup_calls_are_not_timed_and_run_in_inference_mode():
    clock = FakeClock()
    modes = []

    def fn(x):
        modes.append(torch.is_inference_mode_enabled())
        # The first 3 (warm-up) calls are slow, the timed ones take 2 ms each.
        clock.now += 1.0 if len(modes) <= 3 else 2e-3

    stats = measure_latency(fn, torch.zeros(1), runs=5, warmup=3, clock=clock)
    assert len(modes) == 8 and all(modes)
    assert stats.max_ms == pytest.approx(2.0) and stats.p99_ms == pytest.approx(2.0)


def test_bad_runs_are_refused():
    with pytest.raises(ValueError, match="runs"):
        measure_latency(lambda x: x, torch.zeros(1), runs=0)
    with pytest.raises(ValueError, match="durations_s"):
        LatencyStats.from_seconds([])


@pytest.mark.parametrize("kind", ["torchscript", "export", "channels_last"])
def test_optimized_forms_agree_with_eager(kind):
    model = _seeded(TinyConvNet).train()  # train mode on purpose: optimize must use eval
    example = torch.rand(1, 3, 16, 24)
    fn = optimize(model, kind, example)
    assert callable(fn) and not isinstance(fn, NotApplicable)
    assert model.training, "optimize must not change the caller's model"
    eager = optimize(model, "eager", example)
    images = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    result = agreement(eager, fn, images)
    assert result["pixel_agreement"] == 1.0
    assert result["max_abs_logit_diff"] < 1e-4


def test_int8_dynamic_is_not_applicable_to_a_conv_only_model():
    result = optimize(_seeded(TinyConvNet), "int8_dynamic", torch.rand(1, 3, 8, 8))
    assert isinstance(result, NotApplicable)
    assert result.kind == "int8_dynamic" and "nn.Linear" in result.reason
    assert str(result).startswith("not applicable: ")


def test_int8_dynamic_quantizes_linear_layers_and_its_agreement_is_measured():
    model = _seeded(TinyLinearHead)
    example = torch.rand(1, 3, 16, 16)
    quantized = optimize(model, "int8_dynamic", example)
    assert not isinstance(quantized, NotApplicable)
    assert quantized.head._get_name() == "DynamicQuantizedLinear"
    assert isinstance(model.head, nn.Linear), "the caller's model must stay float"
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    targets = torch.randint(0, 4, (4, 16, 16), generator=torch.Generator().manual_seed(3))
    targets[:, 0, :] = 255  # ignored pixels must not count
    result = agreement(optimize(model, "eager", example), quantized, images, targets)
    # int8 rounding changes the logits a little and, near ties, a few labels.
    assert 0 < result["max_abs_logit_diff"] < 0.5
    assert 0.8 <= result["pixel_agreement"] <= 1.0
    assert result["miou_delta"] == pytest.approx(
        result["miou_optimized"] - result["miou_reference"]
    )
    report = latency_report(model, 16, 16, kinds=("int8_dynamic",), runs=2, warmup=0)
    assert report.tags()["risk/T-06/int8_dynamic/status"].startswith("ok")
    assert 0.8 <= report.metrics()["risk/T-06/int8_dynamic/agreement"] <= 1.0


def test_agreement_counts_changed_labels_and_miou_delta():
    ref_logits = torch.zeros(1, 2, 2, 2)
    ref_logits[:, 1] = 1.0  # reference predicts class 1 everywhere
    opt_logits = ref_logits.clone()
    opt_logits[0, 0, 0, 0] = 3.0  # one pixel of four flips to class 0
    targets = torch.ones(1, 2, 2, dtype=torch.long)
    result = agreement(lambda x: ref_logits, lambda x: opt_logits, torch.zeros(1, 3, 2, 2), targets)
    assert result["pixel_agreement"] == 0.75
    assert result["max_abs_logit_diff"] == pytest.approx(3.0)
    assert result["miou_reference"] == 1.0  # class 1 only: IoU 1
    # optimized: class 1 IoU 3/4, class 0 predicted but absent: IoU 0 -> mIoU 0.375
    assert result["miou_delta"] == pytest.approx(0.375 - 1.0)


def test_latency_report_metrics_and_tags():
    report = latency_report(_seeded(TinyConvNet), 16, 24, kinds=KINDS, runs=3, warmup=1)
    metrics, tags = report.metrics(), report.tags()
    assert all(isinstance(v, float) for v in metrics.values())
    for key in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms"):
        assert metrics[f"risk/T-06/{key}"] > 0
    assert metrics["risk/T-06/latency_p95_ms"] == metrics["risk/T-06/eager/latency_p95_ms"]
    assert metrics["risk/T-06/over_threshold"] == 0.0  # a 16x24 toy is far below 100 ms
    for kind in ("channels_last", "torchscript", "export"):
        assert metrics[f"risk/T-06/{kind}/latency_p95_ms"] > 0
        assert metrics[f"risk/T-06/{kind}/agreement"] == 1.0
        assert metrics[f"risk/T-06/{kind}/speedup"] > 0
        assert tags[f"risk/T-06/{kind}/status"].startswith("ok")  # a toy: maybe slower
    assert not any(k.startswith("risk/T-06/int8_dynamic/") for k in metrics)
    assert tags["risk/T-06/int8_dynamic/status"].startswith("not applicable: no nn.Linear")
    assert tags["risk/T-06/best_kind"] in KINDS
    assert tags["risk/T-06/input_shape"] == "1x3x16x24"


def test_over_threshold_and_a_failing_kind_is_reported_not_raised(monkeypatch):
    import training.risk.latency as latency

    real_optimize = latency.optimize

    def broken_export(model, kind, example):
        if kind == "export":
            raise RuntimeError("unsupported op")
        return real_optimize(model, kind, example)

    monkeypatch.setattr(latency, "optimize", broken_export)
    report = latency_report(
        _seeded(TinyConvNet), 8, 8, kinds=("eager", "export"), runs=2, warmup=0, threshold_ms=0.0
    )
    assert report.metrics()["risk/T-06/over_threshold"] == 1.0
    assert report.tags()["risk/T-06/export/status"] == "failed: RuntimeError: unsupported op"
    assert report.best_kind == "eager"


def test_latency_report_validates_its_inputs():
    with pytest.raises(ValueError, match="kinds"):
        latency_report(TinyConvNet(), 8, 8, kinds=("tensorrt",))
    with pytest.raises(ValueError, match="images"):
        latency_report(TinyConvNet(), 8, 8, images=torch.rand(2, 3, 4, 4))


#: The clock the delayed model advances; a module global, so that the copies
#: :func:`optimize` makes share it.
CLOCK = FakeClock()
SCHEDULE: dict[str, object] = {}


class DelayedNet(nn.Module):
    """A model whose every call takes ``SCHEDULE['delay'](call index)`` seconds of the
    fake clock, and records the torch threads it ran with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        calls = SCHEDULE.setdefault("calls", [])
        calls.append(torch.get_num_threads())
        CLOCK.now += SCHEDULE["delay"](len(calls) - 1)
        return x[:, :2]


def _delayed_report(delay, **kwargs):
    SCHEDULE.clear()
    SCHEDULE["delay"] = delay
    settings = {"runs": 10, "warmup": 4, "rounds": 3, "clock": CLOCK, **kwargs}
    return latency_report(DelayedNet(), 4, 4, kinds=("eager",), **settings)


def test_the_best_rounds_percentiles_ignore_a_burst_of_other_work():
    """10 ms a call; the first timed round is slowed to 210 ms by other work on the
    machine. The report takes the best round: p95 10 ms, no alert."""
    warm = 4 + 1  # warm-up calls, then the one call of the warm-up's own timer
    report = _delayed_report(lambda i: 0.010 + (0.200 if warm <= i < warm + 10 else 0.0))
    metrics = report.metrics()
    assert metrics["risk/T-06/latency_p95_ms"] == pytest.approx(10.0)
    assert metrics["risk/T-06/over_threshold"] == 0.0
    assert report.results["eager"].round_p50_ms == pytest.approx([210.0, 10.0, 10.0])
    assert len(SCHEDULE["calls"]) == warm + 3 * 10 + 4  # agreement: 2 images, 2 forms
    method = report.tags()["risk/T-06/method"]
    assert method.startswith("best of 3 interleaved rounds of 10 calls per form after 4 warm-up")


def test_a_slow_machine_throughout_still_alarms():
    report = _delayed_report(lambda i: 0.150)
    assert report.metrics()["risk/T-06/latency_p95_ms"] == pytest.approx(150.0)
    assert report.metrics()["risk/T-06/over_threshold"] == 1.0


def test_threads_are_pinned_while_measuring_and_restored_after():
    before = torch.get_num_threads()
    report = _delayed_report(lambda i: 0.001, threads=1)
    assert set(SCHEDULE["calls"]) == {1}
    assert torch.get_num_threads() == before
    assert "cpu (1 thread)" in report.tags()["risk/T-06/method"]


def test_a_form_slower_than_eager_is_reported_as_slower_and_never_best(monkeypatch):
    import training.risk.latency as latency

    real_optimize = latency.optimize

    def slow_channels_last(model, kind, example):
        fn = real_optimize(model, kind, example)
        if kind != "channels_last":
            return fn

        def slower(x):
            CLOCK.now += 0.010  # on top of the model's own 10 ms
            return fn(x)

        return slower

    monkeypatch.setattr(latency, "optimize", slow_channels_last)
    SCHEDULE.clear()
    SCHEDULE["delay"] = lambda i: 0.010
    report = latency_report(
        DelayedNet(), 4, 4, kinds=("eager", "channels_last"), runs=5, warmup=1, clock=CLOCK
    )
    assert report.metrics()["risk/T-06/channels_last/speedup"] == pytest.approx(0.5)
    assert report.tags()["risk/T-06/channels_last/status"] == "ok, slower than eager (0.50x)"
    assert report.best_kind == "eager"


def test_the_bf16_form_applies_only_where_bf16_is_native(monkeypatch):
    import training.precision as precision

    model, example = _seeded(TinyConvNet), torch.rand(1, 3, 16, 24)
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: precision.Bf16Support(False, ()))
    missing = optimize(model, "bf16", example)
    assert isinstance(missing, NotApplicable) and "no native bf16" in missing.reason
    monkeypatch.setattr(
        precision, "cpu_bf16_support", lambda: precision.Bf16Support(True, ("AMX",))
    )
    form = optimize(model, "bf16", example)
    out = form(example)
    assert out.dtype == torch.float32 and out.shape == (1, 4, 16, 24)
    eager = optimize(model, "eager", example)
    assert agreement(eager, form, torch.rand(2, 3, 16, 24))["pixel_agreement"] > 0.9
