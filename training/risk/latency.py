"""Risk T-06 (inference latency over budget): measure it, try the mitigations, check accuracy.

The register's alert is "latency > 100 ms" and its mitigations are TensorRT, quantization
and lighter models. This module measures what a CPU or GPU at hand can tell:

- :func:`measure_latency`: wall-clock latency percentiles of any callable, in
  milliseconds, under ``torch.inference_mode`` and CUDA-synchronized on a GPU (a CUDA
  call only *queues* work, so an unsynchronized timer measures the launch, not the
  inference).
- :func:`optimize`: an optimized form of a model, one of :data:`KINDS`:

  ========================  ==============================================================
  ``"eager"``               the model itself, in eval mode (the reference)
  ``"channels_last"``       weights and input in NHWC memory format (faster conv kernels
                            on CPUs with oneDNN and on tensor-core GPUs)
  ``"torchscript"``         ``torch.jit.trace`` + ``torch.jit.freeze`` (constant-folded,
                            conv-BN fused)
  ``"export"``              ``torch.export.export(...).module()``, the graph a deployment
                            compiler (TensorRT, ExecuTorch, AOTInductor) starts from
  ``"bf16"``                the model under bf16 autocast, logits returned in fp32; only
                            where the hardware has native bf16 (AMX / AVX-512 BF16 CPUs,
                            bf16 GPUs), else :class:`NotApplicable`
  ``"int8_dynamic"``        ``quantize_dynamic`` of ``nn.Linear`` layers (CPU only); a
                            conv-only network such as the U-Net has nothing to quantize,
                            and this is reported as :class:`NotApplicable`, never faked
  ========================  ==============================================================

  TensorRT itself is not installed here, so it is not among the kinds; ``"export"`` is
  the artifact it would consume.
- :func:`agreement`: what an optimization changes in the output: pixel agreement of
  argmax labels, max abs logit difference and, given targets, the mIoU delta.
- :func:`latency_report`: all of the above for one model, as a :class:`LatencyReport`
  whose :meth:`~LatencyReport.metrics` and :meth:`~LatencyReport.tags` go to MLflow as
  ``risk/T-06/...``.

A risk alert must not depend on what else the machine is doing, so the report measures
the model, not the machine: every form is warmed up first (TorchScript's profiling
executor optimizes the graph only after its first calls), the forms are then timed in
``rounds`` interleaved rounds (a burst of other work hits every form alike) and each
form's figures are those of its best round (lowest p95, the figure the alert reads), with
the process's torch threads pinned to ``threads`` (one inference thread per camera, as
deployed) for the measurement. The alert compares only these figures;
``risk/T-06/method`` says how they were taken. Each form's ``speedup`` over eager is
reported, and a form slower than eager is tagged so; ``best_kind`` is never slower than
eager.

Traced and exported forms are specialized on the example's shape: call them with inputs
of the example's batch size, height and width (the report does).

Example:
    >>> report = latency_report(UNet(num_classes=11), 128, 256, runs=20)
    >>> report.metrics()["risk/T-06/latency_p95_ms"]            # eager, batch 1, in ms
    >>> report.tags()["risk/T-06/best_kind"]                     # e.g. "channels_last"
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_KINDS",
    "KINDS",
    "KindResult",
    "LatencyReport",
    "LatencyStats",
    "NotApplicable",
    "agreement",
    "latency_report",
    "measure_latency",
    "optimize",
]

#: Every kind :func:`optimize` knows.
KINDS: tuple[str, ...] = (
    "eager",
    "channels_last",
    "torchscript",
    "export",
    "int8_dynamic",
    "bf16",
)
#: Kinds tried by :func:`latency_report` unless told otherwise.
DEFAULT_KINDS: tuple[str, ...] = KINDS
#: The register's alert threshold (section 5.2): latency > 100 ms.
DEFAULT_THRESHOLD_MS = 100.0
#: An optimized kind must agree with eager on at least this fraction of pixels to be
#: called the best one: a faster model that predicts other labels is not a mitigation.
DEFAULT_MIN_AGREEMENT = 0.99
#: MLflow rejects longer tag values on some backends; reasons are cut to this length.
_MAX_TAG_CHARS = 500


@dataclass(frozen=True)
class LatencyStats:
    """Latency percentiles of repeated calls, in milliseconds.

    Percentiles use linear interpolation between samples (numpy's default), so with few
    runs ``p99`` is close to the maximum.
    """

    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    runs: int

    @classmethod
    def from_seconds(cls, durations_s: Sequence[float]) -> LatencyStats:
        """Statistics of ``durations_s`` (one duration per call, in seconds)."""
        if len(durations_s) == 0:
            raise ValueError("durations_s: expected at least one duration, got none")
        ms = np.asarray(durations_s, dtype=np.float64) * 1e3
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        return cls(
            p50_ms=float(p50),
            p95_ms=float(p95),
            p99_ms=float(p99),
            mean_ms=float(ms.mean()),
            min_ms=float(ms.min()),
            max_ms=float(ms.max()),
            runs=len(ms),
        )


@dataclass(frozen=True)
class NotApplicable:
    """Marker returned by :func:`optimize` when a kind does not apply to a model.

    Attributes:
        kind: the kind asked for.
        reason: why, in words (for example "no nn.Linear layer to quantize").
    """

    kind: str
    reason: str

    def __str__(self) -> str:
        return f"not applicable: {self.reason}"


def _as_args(example: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (example,) if isinstance(example, Tensor) else tuple(example)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    fn: Callable[..., Any],
    example: Tensor | Sequence[Tensor],
    runs: int = 50,
    warmup: int = 10,
    device: torch.device | str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyStats:
    """Latency of ``fn(*example)`` over ``runs`` timed calls after ``warmup`` untimed ones.

    Every call runs under ``torch.inference_mode``. On a CUDA device the stream is
    synchronized before the clock starts and before it stops, so each duration covers the
    whole inference (kernels included), not just the launch.

    Args:
        fn: the callable to time, e.g. a model or an output of :func:`optimize`.
        example: its input, a tensor or a tuple of positional tensors.
        runs: number of timed calls (>= 1).
        warmup: untimed calls first (>= 0): they absorb one-off costs (allocator growth,
            oneDNN/cuDNN kernel selection, TorchScript profiling runs).
        device: moves ``example`` there first; ``None`` keeps it where it is. The device
            that is synchronized is the one the (moved) example lives on.
        clock: a monotonic clock in seconds; injectable so tests can be exact.

    Returns:
        :class:`LatencyStats` in milliseconds.
    """
    if runs < 1:
        raise ValueError(f"runs: expected >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup: expected >= 0, got {warmup}")
    args = _as_args(example)
    if device is not None:
        args = tuple(a.to(device) for a in args)
    sync_device = args[0].device if args else torch.device("cpu")
    durations: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn(*args)
        _sync(sync_device)
        for _ in range(runs):
            start = clock()
            fn(*args)
            _sync(sync_device)
            durations.append(clock() - start)
    return LatencyStats.from_seconds(durations)


def _eval_copy(model: nn.Module) -> nn.Module:
    # A copy, so that optimizing never changes the caller's model (its mode, memory
    # format or weights); eval, so that BatchNorm uses running statistics.
    return copy.deepcopy(model).eval()


class _Bf16(nn.Module):
    """Runs ``model`` under bf16 autocast on ``device_type``; logits come back in fp32."""

    def __init__(self, model: nn.Module, device_type: str) -> None:
        super().__init__()
        self.model, self.device_type = model, device_type

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(x).float()


def _bf16_support(device: torch.device) -> str:
    """Why bf16 does not apply on ``device`` ("" when it does)."""
    if device.type == "cuda":
        return "" if torch.cuda.is_bf16_supported() else "this GPU has no bf16 support"
    if device.type == "cpu":
        from training.precision import cpu_bf16_support

        if cpu_bf16_support().native:
            return ""
        return "this CPU has no native bf16 (AMX, AVX-512 BF16): emulated bf16 is slower"
    return f"no bf16 autocast path for {device.type}"


class _ChannelsLast(nn.Module):
    """Runs ``model`` (already in channels_last) on inputs converted to channels_last."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def optimize(
    model: nn.Module, kind: str, example: Tensor | Sequence[Tensor]
) -> Callable[..., Tensor] | NotApplicable:
    """An optimized form of ``model`` for inference, or why there is none.

    Args:
        model: a segmentation model (``(B, 3, H, W)`` -> ``(B, C, H, W)`` logits). It is
            copied, never changed.
        kind: one of :data:`KINDS` (see the module docstring).
        example: an input of the shape and device it will be called with; tracing and
            export specialize on its shape.

    Returns:
        A callable ``(*example) -> logits`` on the example's device, or a
        :class:`NotApplicable` with the reason (for ``"int8_dynamic"`` when the model has
        no ``nn.Linear`` layer or the example is not on the CPU).

    Raises:
        ValueError: an unknown ``kind``. Errors of the tracer or exporter propagate.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
    args = _as_args(example)
    device = args[0].device
    net = _eval_copy(model).to(device)
    if kind == "eager":
        return net
    if kind == "channels_last":
        return _ChannelsLast(net.to(memory_format=torch.channels_last)).eval()
    if kind == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            # torch.jit is deprecated in favour of torch.compile/export, but it is still
            # the one ahead-of-time path that fuses conv+BN on a CPU without a compiler.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.freeze(torch.jit.trace(net, args))
    if kind == "bf16":
        why = _bf16_support(device)
        return NotApplicable(kind, why) if why else _Bf16(net, device.type).eval()
    if kind == "export":
        # No .eval() on the result: exported modules refuse train()/eval(); the graph is
        # captured from a model already in eval mode, so it has eval semantics.
        return torch.export.export(net, args).module()
    # int8_dynamic
    n_linear = sum(isinstance(m, nn.Linear) for m in net.modules())
    if n_linear == 0:
        return NotApplicable(
            kind,
            "no nn.Linear layer to quantize: dynamic int8 quantization covers Linear/RNN "
            f"layers only, and {type(model).__name__} is convolutional",
        )
    if device.type != "cpu":
        return NotApplicable(kind, f"dynamic int8 kernels run on the CPU only, not {device}")
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not installed.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(net, {nn.Linear}, dtype=torch.qint8)


def _batches(images: Tensor | Sequence[Tensor], batch_size: int) -> list[Tensor]:
    if isinstance(images, Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        return list(images.split(batch_size))
    return [img.unsqueeze(0) if img.ndim == 3 else img for img in images]


def agreement(
    reference_fn: Callable[[Tensor], Tensor],
    optimized_fn: Callable[[Tensor], Tensor],
    images: Tensor | Sequence[Tensor],
    targets: Tensor | Sequence[Tensor] | None = None,
    class_names: Sequence[str] | None = None,
    batch_size: int = 1,
) -> dict[str, float]:
    """How far the optimized model's output is from the reference's.

    Args:
        reference_fn: the reference, usually the eager model in eval mode.
        optimized_fn: the optimized form (an output of :func:`optimize`).
        images: ``(N, 3, H, W)`` float in [0, 1] (split into ``batch_size`` chunks), or a
            sequence of ``(B, 3, H, W)`` / ``(3, H, W)`` tensors used as given.
        targets: optional labels matching ``images``, ``(N, H, W)`` int64 (255 = ignore)
            or a sequence of ``(B, H, W)`` / ``(H, W)``; adds the mIoU entries.
        class_names: names for :class:`~training.metrics.SegmentationMetrics`; default
            ``c0 .. c{C-1}``.
        batch_size: chunk size for a tensor ``images``; 1 by default because traced and
            exported forms are specialized on the batch size of their example.

    Returns:
        ``pixel_agreement`` (fraction of pixels with the same argmax label, in [0, 1]) and
        ``max_abs_logit_diff``; with targets also ``miou_reference``, ``miou_optimized``
        and ``miou_delta`` (optimized minus reference; negative = the optimization costs
        accuracy).
    """
    batches = _batches(images, batch_size)
    target_batches: list[Tensor] | None = None
    if targets is not None:
        target_batches = (
            list((targets.unsqueeze(0) if targets.ndim == 2 else targets).split(batch_size))
            if isinstance(targets, Tensor)
            else [t.unsqueeze(0) if t.ndim == 2 else t for t in targets]
        )
        if [len(t) for t in target_batches] != [len(b) for b in batches]:
            raise ValueError("targets: expected one (H, W) label map per image in images")
    same = total = 0
    max_diff = 0.0
    metrics: list[Any] = []
    with torch.inference_mode():
        for i, x in enumerate(batches):
            ref = reference_fn(x).float()
            opt = optimized_fn(x).float()
            if ref.shape != opt.shape:
                raise ValueError(
                    f"optimized_fn: output shape {tuple(opt.shape)} differs from the "
                    f"reference's {tuple(ref.shape)}"
                )
            ref_labels, opt_labels = ref.argmax(1), opt.argmax(1)
            same += int((ref_labels == opt_labels).sum())
            total += ref_labels.numel()
            max_diff = max(max_diff, float((ref - opt).abs().max()))
            if target_batches is not None:
                if not metrics:
                    from training.metrics import SegmentationMetrics

                    c = ref.shape[1]
                    names = class_names if class_names is not None else [f"c{k}" for k in range(c)]
                    metrics = [SegmentationMetrics(c, names).to(ref.device) for _ in range(2)]
                target = target_batches[i].to(ref.device)
                metrics[0].update(ref_labels, target)
                metrics[1].update(opt_labels, target)
    out = {"pixel_agreement": same / total if total else math.nan, "max_abs_logit_diff": max_diff}
    if metrics:
        miou_ref, miou_opt = (m.compute()["miou"] for m in metrics)
        out.update(miou_reference=miou_ref, miou_optimized=miou_opt, miou_delta=miou_opt - miou_ref)
    return out


@dataclass
class KindResult:
    """What :func:`latency_report` found for one kind.

    Attributes:
        kind: the kind.
        status: ``"ok"``, ``"not applicable"`` or ``"failed"``.
        reason: why it is not ok ("" when ok).
        stats: latency in ms of the best round when ok.
        agreement: :func:`agreement` against eager when ok.
        round_p50_ms: the median of every round, in the order timed.
    """

    kind: str
    status: str
    reason: str = ""
    stats: LatencyStats | None = None
    agreement: dict[str, float] = field(default_factory=dict)
    round_p50_ms: list[float] = field(default_factory=list)


@dataclass
class LatencyReport:
    """Result of :func:`latency_report`; see :meth:`metrics` and :meth:`tags` for MLflow.

    Attributes:
        results: per kind, in the order tried.
        threshold_ms: the alert threshold in ms.
        min_agreement: the agreement a kind needs to be eligible as ``best_kind``.
        batch_size, height, width: the input shape measured.
        device: where it ran, e.g. ``"cpu (1 thread)"``.
        method: how the figures were taken, in words (warm-up, rounds, calls, threads).
    """

    results: dict[str, KindResult]
    threshold_ms: float
    min_agreement: float
    batch_size: int
    height: int
    width: int
    device: str
    method: str = ""

    def speedup(self, kind: str) -> float:
        """Eager's median latency / ``kind``'s (above 1: faster than eager); NaN if either
        was not measured."""
        eager, other = self.results.get("eager"), self.results.get(kind)
        if eager is None or other is None or eager.stats is None or other.stats is None:
            return math.nan
        return eager.stats.p50_ms / other.stats.p50_ms if other.stats.p50_ms > 0 else math.nan

    @property
    def best_kind(self) -> str | None:
        """The ok kind with the lowest p95 whose pixel agreement >= ``min_agreement``."""
        eligible = {
            r.kind: r.stats.p95_ms
            for r in self.results.values()
            if r.stats is not None
            and r.agreement.get("pixel_agreement", math.nan) >= self.min_agreement
        }
        return min(eligible, key=eligible.__getitem__) if eligible else None

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict of everything (for an artifact or a printout)."""
        return {
            "device": self.device,
            "input_shape": [self.batch_size, 3, self.height, self.width],
            "threshold_ms": self.threshold_ms,
            "min_agreement": self.min_agreement,
            "best_kind": self.best_kind,
            "method": self.method,
            "kinds": {
                k: {
                    "status": r.status,
                    "reason": r.reason,
                    "latency_ms": vars(r.stats) if r.stats else None,
                    "round_p50_ms": list(r.round_p50_ms),
                    "speedup": self.speedup(k),
                    "agreement": dict(r.agreement),
                }
                for k, r in self.results.items()
            },
        }

    def metrics(self, prefix: str = "risk/T-06/") -> dict[str, float]:
        """Flat float metrics for MLflow (latencies in ms, agreement in [0, 1]).

        ``<prefix>latency_p50_ms`` / ``_p95_ms`` / ``_p99_ms`` are eager's (the model as
        trained), ``<prefix>over_threshold`` is 1.0 when eager's p95 exceeds the threshold
        and ``<prefix>best_over_threshold`` the same for ``best_kind`` (does a mitigation
        bring it under?). Per ok kind: ``<prefix><kind>/latency_p50_ms``,
        ``<prefix><kind>/latency_p95_ms``, ``<prefix><kind>/speedup`` (eager's median over
        the kind's), ``<prefix><kind>/agreement`` (pixel agreement
        with eager), ``<prefix><kind>/max_abs_logit_diff`` and, with targets,
        ``<prefix><kind>/miou_delta``. Kinds that are not ok have no metric: see
        :meth:`tags`.
        """
        out: dict[str, float] = {}
        eager = self.results.get("eager")
        if eager is not None and eager.stats is not None:
            out[f"{prefix}latency_p50_ms"] = eager.stats.p50_ms
            out[f"{prefix}latency_p95_ms"] = eager.stats.p95_ms
            out[f"{prefix}latency_p99_ms"] = eager.stats.p99_ms
            out[f"{prefix}over_threshold"] = float(eager.stats.p95_ms > self.threshold_ms)
        best = self.best_kind
        if best is not None:
            best_stats = self.results[best].stats
            assert best_stats is not None
            out[f"{prefix}best_over_threshold"] = float(best_stats.p95_ms > self.threshold_ms)
        for kind, r in self.results.items():
            if r.stats is None:
                continue
            out[f"{prefix}{kind}/latency_p50_ms"] = r.stats.p50_ms
            out[f"{prefix}{kind}/latency_p95_ms"] = r.stats.p95_ms
            out[f"{prefix}{kind}/speedup"] = self.speedup(kind)
            if "pixel_agreement" in r.agreement:
                out[f"{prefix}{kind}/agreement"] = r.agreement["pixel_agreement"]
                out[f"{prefix}{kind}/max_abs_logit_diff"] = r.agreement["max_abs_logit_diff"]
            if "miou_delta" in r.agreement:
                out[f"{prefix}{kind}/miou_delta"] = r.agreement["miou_delta"]
        return out

    def tags(self, prefix: str = "risk/T-06/") -> dict[str, str]:
        """String facts for MLflow tags: best kind, device, input shape, threshold, method,
        and ``<prefix><kind>/status`` (``ok``, ``ok, slower than eager (0.45x)``,
        ``not applicable: <why>``, ``failed: <error>``).
        """
        out = {
            f"{prefix}best_kind": self.best_kind or "none",
            f"{prefix}device": self.device,
            f"{prefix}input_shape": f"{self.batch_size}x3x{self.height}x{self.width}",
            f"{prefix}threshold_ms": f"{self.threshold_ms:g}",
            f"{prefix}method": self.method,
        }
        for kind, r in self.results.items():
            status = r.status if not r.reason else f"{r.status}: {r.reason}"
            gain = self.speedup(kind)
            if kind != "eager" and r.stats is not None and gain < 1:
                status = f"ok, slower than eager ({gain:.2f}x)"
            out[f"{prefix}{kind}/status"] = status[:_MAX_TAG_CHARS]
        return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"{device.type} ({n} thread{'s' if n != 1 else ''})"


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block (None: as it is), then restored."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads: expected >= 1, got {threads}")
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def latency_report(
    model: nn.Module,
    height: int,
    width: int,
    kinds: Sequence[str] = DEFAULT_KINDS,
    runs: int = 20,
    warmup: int = 20,
    batch_size: int = 1,
    images: Tensor | None = None,
    targets: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    threshold_ms: float = DEFAULT_THRESHOLD_MS,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    device: torch.device | str | None = None,
    seed: int = 0,
    rounds: int = 3,
    threads: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyReport:
    """Latency of ``model`` and of each optimized kind, with its agreement with eager
    (how the figures are taken: module docstring).

    Args:
        model: the segmentation model (not changed: every kind works on a copy).
        height, width: input size in pixels.
        kinds: kinds of :data:`KINDS` to try; ``"eager"`` is always measured (it is the
            reference) and comes first.
        runs: timed calls per kind and round.
        warmup: untimed calls per kind before the first round (TorchScript's profiling
            runs and oneDNN's kernel choice happen there).
        batch_size: batch of the timed input; the register's figure is batch 1.
        images: ``(N, 3, height, width)`` float in [0, 1] to measure agreement on, ``N`` a
            multiple of ``batch_size``; by default ``2 * batch_size`` random images
            (seeded), which still reveal numerical differences.
        targets: ``(N, height, width)`` labels for ``images``: adds the mIoU delta.
        class_names: passed to :func:`agreement`.
        threshold_ms: alert threshold on p95, in ms (the register's 100 ms).
        min_agreement: pixel agreement a kind needs to be ``best_kind``.
        device: where to run; default the model's device.
        seed: seed of the random example and default images.
        rounds: interleaved timing rounds; each kind reports its best round.
        threads: torch threads during the measurement (None: the process's setting).
        clock: a monotonic clock in seconds (injectable for tests).

    Returns:
        A :class:`LatencyReport`. A kind that does not apply or whose optimization fails
        is recorded with its reason, not raised, so one exporter bug does not hide the
        other figures.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"kinds: unknown {unknown}, expected a subset of {list(KINDS)}")
    if height < 1 or width < 1 or batch_size < 1:
        raise ValueError(
            f"height, width, batch_size: expected positive integers, got "
            f"{height}, {width}, {batch_size}"
        )
    if rounds < 1 or runs < 1 or warmup < 0:
        raise ValueError(
            f"rounds, runs, warmup: expected >= 1, >= 1, >= 0, got {rounds}, {runs}, {warmup}"
        )
    if targets is not None and images is None:
        raise ValueError("targets: given without images")
    if images is not None and (
        tuple(images.shape[-2:]) != (height, width) or images.shape[0] % batch_size
    ):
        raise ValueError(
            f"images: expected (N, 3, {height}, {width}) with N a multiple of batch_size="
            f"{batch_size} (traced and exported forms are fixed to that batch), got "
            f"{tuple(images.shape)}"
        )
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    example = torch.rand(batch_size, 3, height, width, generator=gen).to(device)
    if images is None:
        images = torch.rand(2 * batch_size, 3, height, width, generator=gen)
    images = images.to(device)

    order = ["eager", *[k for k in dict.fromkeys(kinds) if k != "eager"]]
    results: dict[str, KindResult] = {}
    with pinned_threads(threads):
        name = _device_name(device)
        forms: dict[str, Callable[..., Tensor]] = {}
        for kind in order:
            try:
                fn = optimize(model, kind, example)
                if not isinstance(fn, NotApplicable):
                    measure_latency(fn, example, runs=1, warmup=warmup, clock=clock)
            except Exception as err:  # recorded, not raised: see Returns
                results[kind] = KindResult(kind, "failed", f"{type(err).__name__}: {err}")
                continue
            if isinstance(fn, NotApplicable):
                results[kind] = KindResult(kind, "not applicable", fn.reason)
                continue
            forms[kind] = fn
        timed: dict[str, list[LatencyStats]] = {kind: [] for kind in forms}
        for _ in range(rounds):  # interleaved: a burst of other work hits every form
            for kind, fn in forms.items():
                timed[kind].append(measure_latency(fn, example, runs=runs, warmup=0, clock=clock))
        reference = forms.get("eager")
        for kind, fn in forms.items():
            best = min(timed[kind], key=lambda stats: stats.p95_ms)  # what the alert reads
            agree = (
                agreement(reference, fn, images, targets, class_names, batch_size=batch_size)
                if reference is not None
                else {}
            )
            results[kind] = KindResult(
                kind,
                "ok",
                stats=best,
                agreement=agree,
                round_p50_ms=[t.p50_ms for t in timed[kind]],
            )
    results = {kind: results[kind] for kind in order if kind in results}
    method = (
        f"best of {rounds} interleaved round{'s' if rounds != 1 else ''} of {runs} calls per "
        f"form after {warmup} warm-up calls; {name}; batch {batch_size}"
    )
    return LatencyReport(
        results=results,
        threshold_ms=float(threshold_ms),
        min_agreement=float(min_agreement),
        batch_size=batch_size,
        height=height,
        width=width,
        device=name,
        method=method,
    )
