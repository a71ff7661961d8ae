"""``trainer.precision: auto``: bf16 mixed precision where the hardware runs it natively.

:func:`resolve_precision` turns the requested Lightning precision into the one a run
trains with, once, before any stage hash is taken (the precision changes the result, so
it is part of every stage's key):

- ``auto`` on CPU: ``bf16-mixed`` when the CPU has native bf16 arithmetic (AMX tiles or
  AVX-512 BF16, which oneDNN uses for convolutions and matmuls), else ``32-true``.
  Without those units bf16 is emulated and slower than fp32.
- ``auto`` on GPU: ``bf16-mixed`` where CUDA supports bf16 (Ampere and later), else
  ``16-mixed``.
- Anything else is kept. ``bf16-mixed``/``bf16-true`` forced on a CPU without native bf16
  trains anyway, with a warning naming ``trainer.precision`` and the slow-down measured on
  a small convolution (:func:`bf16_slowdown`).

Under ``bf16-mixed`` Lightning runs every ``training_step``/``test_step`` inside
``torch.autocast``: convolutions and matmuls in bf16, losses (cross-entropy, L1, MSE, BCE)
in fp32, weights and optimizer state in fp32. Code that thresholds probabilities casts
the logits to fp32 first (``adaptation/self_training.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

KEY = "trainer.precision"
BF16 = ("bf16-mixed", "bf16-true", "bf16")


@dataclass(frozen=True)
class Bf16Support:
    """What the CPU offers for bf16: the units found, and whether they are native."""

    native: bool
    units: tuple[str, ...]


@dataclass(frozen=True)
class Resolution:
    """The precision a run trains with, what was asked and why."""

    requested: str
    precision: str
    reason: str


def cpu_bf16_support() -> Bf16Support:
    """Native bf16 on this CPU: AMX tiles or AVX-512 BF16, with oneDNN available."""
    import torch

    units = []
    probes = (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported"))
    for name, probe in probes:
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            units.append(name)
    native = bool(units) and torch.backends.mkldnn.is_available()
    return Bf16Support(native, tuple(units))


def cuda_bf16_support() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve_precision(
    requested: object,
    accelerator: object,
    cpu_support: Callable[[], Bf16Support] = cpu_bf16_support,
    cuda_bf16: Callable[[], bool] = cuda_bf16_support,
    measure: Callable[[], float] | None = None,
) -> Resolution:
    """The precision to train with (module doc).

    Args:
        requested: ``trainer.precision`` as configured.
        accelerator: ``trainer.accelerator`` (``cpu``, ``gpu``/``cuda``, ``auto``).
        cpu_support, cuda_bf16: capability probes (injected by tests).
        measure: fp32 time / bf16 time on this CPU, for the forced-bf16 warning
            (:func:`bf16_slowdown` by default).
    """
    asked = str(requested)
    on_gpu = _uses_gpu(str(accelerator))
    if asked == "auto":
        if on_gpu:
            if cuda_bf16():
                return Resolution(asked, "bf16-mixed", "the GPU supports bf16")
            return Resolution(asked, "16-mixed", "the GPU has no bf16: fp16 with loss scaling")
        support = cpu_support()
        if support.native:
            units = " and ".join(support.units)
            return Resolution(asked, "bf16-mixed", f"the CPU has {units}")
        return Resolution(asked, "32-true", "the CPU has no native bf16 (AMX, AVX-512 BF16)")
    if asked in BF16 and not on_gpu:
        support = cpu_support()
        if not support.native:
            ratio = (measure or bf16_slowdown)()
            log.warning(
                "%s=%s: this CPU has no native bf16 (AMX, AVX-512 BF16); a small "
                "convolution ran %.1fx slower in bf16 than in fp32 here. "
                "%s=auto picks 32-true on such CPUs.",
                KEY,
                asked,
                1.0 / ratio if ratio > 0 else float("inf"),
                KEY,
            )
            return Resolution(asked, asked, "forced; no native bf16 on this CPU")
    return Resolution(asked, asked, "as configured")


def _uses_gpu(accelerator: str) -> bool:
    if accelerator in ("gpu", "cuda", "mps"):
        return True
    if accelerator == "auto":
        import torch

        return torch.cuda.is_available()
    return False


def bf16_slowdown(repeats: int = 3) -> float:
    """fp32 seconds / bf16 seconds of a 3x3 convolution's forward and backward (batch 2,
    32 channels, 64x64) on this CPU: above 1 means bf16 is faster. About 0.1 s."""
    import torch

    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(2, 32, 64, 64)

    def timed(bf16: bool) -> float:
        best = float("inf")
        for _ in range(repeats + 1):  # the first round warms oneDNN's kernel cache
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                conv(x).float().square().mean().backward()
            best = min(best, time.perf_counter() - start)
        return best

    return timed(False) / timed(True)


_announced: set[tuple[str, str]] = set()


def apply_precision(trainer_cfg: object) -> Resolution:
    """Resolve ``trainer_cfg.precision`` in place (an OmegaConf node) and say the choice
    once per process when it was ``auto``."""
    from omegaconf import open_dict

    requested = trainer_cfg.get("precision", "32-true")  # type: ignore[attr-defined]
    accelerator = trainer_cfg.get("accelerator", "auto")  # type: ignore[attr-defined]
    choice = resolve_precision(requested, accelerator)
    if choice.precision != str(requested):
        with open_dict(trainer_cfg):
            trainer_cfg.precision = choice.precision  # type: ignore[attr-defined]
        if (choice.requested, choice.precision) not in _announced:
            _announced.add((choice.requested, choice.precision))
            log.info("%s=%s: training in %s (%s)", KEY, requested, choice.precision, choice.reason)
    return choice
