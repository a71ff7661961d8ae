"""Risk S-05 (adversarial attack): mIoU under FGSM, PGD and common corruptions.

The register's mitigation is "adversarial training, input validation"; this module gives
the measurement that says whether one is needed. For a segmentation model and real test
images with labels:

- :func:`fgsm`: one signed-gradient step of size ``eps`` that increases the pixel-mean
  cross-entropy (Goodfellow et al. 2015); images stay in [0, 1].
- :func:`pgd`: ``steps`` signed-gradient steps of ``alpha`` from a seeded uniform start
  inside the L-inf ball of radius ``eps``, projected back after each (Madry et al. 2018).
- :data:`CORRUPTIONS`: Gaussian noise, Gaussian blur, JPEG, brightness and fog at
  severities 1-5 (after Hendrycks and Dietterich's ImageNet-C, scaled to these images).
- :func:`robustness_figures`: clean mIoU and, per attack and corruption, the mIoU and its
  drop from clean, as ``risk/S-05/<name>/miou`` and ``.../drop``, with
  ``risk/S-05/max_drop_share`` (the largest drop as a share of the clean mIoU) for the
  alert rule ``adversarial_robustness_drop``.

Budgets ``eps`` are in units of the [0, 1] pixel range (``4 / 255`` is four grey levels).
Attacks run the model in eval mode (BatchNorm on running statistics) with gradients to
the input only; the model's weights and mode are left as they were.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.metrics import IGNORE_INDEX


def _loss(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(model(images).float(), labels, ignore_index=IGNORE_INDEX)


def _input_gradient(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(_loss(model, x, labels), x)
    return grad


def fgsm(model: nn.Module, images: Tensor, labels: Tensor, eps: float) -> Tensor:
    """FGSM: ``clamp(x + eps * sign(d loss / d x), 0, 1)``.

    Args:
        model: ``(B, 3, H, W) -> (B, C, H, W)`` logits, used as it is (call in eval mode).
        images: ``(B, 3, H, W)`` float in [0, 1].
        labels: ``(B, H, W)`` int64, ``255`` ignored.
        eps: the L-inf budget in [0, 1] units.
    """
    grad = _input_gradient(model, images, labels)
    return (images + eps * grad.sign()).clamp(0, 1).detach()


def pgd(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    eps: float,
    steps: int = 5,
    alpha: float | None = None,
    seed: int = 0,
) -> Tensor:
    """PGD in the L-inf ball of radius ``eps`` around ``images`` (shapes as :func:`fgsm`).

    Starts at a uniform point of the ball (seeded: the same images give the same attack),
    then ``steps`` signed-gradient steps of ``alpha`` (default ``2.5 * eps / steps``), each
    projected back into the ball and into [0, 1].
    """
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    alpha = 2.5 * eps / steps if alpha is None else alpha
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = (torch.rand(images.shape, generator=gen) * 2 - 1) * eps
    x = (images + start.to(images.device)).clamp(0, 1)
    for _ in range(steps):
        grad = _input_gradient(model, x, labels)
        x = x + alpha * grad.sign()
        x = torch.min(torch.max(x, images - eps), images + eps).clamp(0, 1).detach()
    return x


# ----------------------------------------------------------------------------- corruptions
def _gaussian_noise(x: Tensor, severity: int, seed: int) -> Tensor:
    sigma = (0.04, 0.06, 0.08, 0.10, 0.13)[severity - 1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=gen).to(x.device)).clamp(0, 1)


def _gaussian_blur(x: Tensor, severity: int, seed: int) -> Tensor:
    from torchvision.transforms.functional import gaussian_blur

    sigma = (0.5, 0.8, 1.1, 1.5, 2.0)[severity - 1]  # in pixels of a 64x128 frame
    size = 2 * math.ceil(2 * sigma) + 1
    return gaussian_blur(x, [size, size], [sigma, sigma])


def _jpeg(x: Tensor, severity: int, seed: int) -> Tensor:
    import numpy as np
    from PIL import Image

    quality = (80, 65, 50, 35, 20)[severity - 1]
    frames = (x.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    out = []
    for frame in frames.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        out.append(torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()))
    return (torch.stack(out).permute(0, 3, 1, 2).float() / 255).to(x.device)


def _brightness(x: Tensor, severity: int, seed: int) -> Tensor:
    shift = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    return (x + shift).clamp(0, 1)


def _fog(x: Tensor, severity: int, seed: int) -> Tensor:
    """A smooth grey haze blended in: ``x (1 - a) + a haze``, ``haze`` low-frequency
    noise around 0.8 (seeded)."""
    a = (0.15, 0.25, 0.35, 0.45, 0.55)[severity - 1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b, _, h, w = x.shape
    low = torch.rand(b, 1, max(1, h // 16), max(1, w // 16), generator=gen)
    haze = 0.7 + 0.2 * F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (x * (1 - a) + a * haze.to(x.device)).clamp(0, 1)


#: name -> ``(images (B, 3, H, W) in [0, 1], severity 1..5, seed) -> corrupted images``
CORRUPTIONS: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "noise": _gaussian_noise,
    "blur": _gaussian_blur,
    "jpeg": _jpeg,
    "brightness": _brightness,
    "fog": _fog,
}


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """``images`` under corruption ``name`` of :data:`CORRUPTIONS` at ``severity`` 1-5."""
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption: expected one of {list(CORRUPTIONS)}, got {name!r}")
    if not 1 <= int(severity) <= 5:
        raise ValueError(f"severity: expected 1..5, got {severity}")
    return CORRUPTIONS[name](images, int(severity), seed)


# ----------------------------------------------------------------------------- report
def _miou(
    model: nn.Module, images: Tensor, labels: Tensor, class_names: Sequence[str], batch: int
) -> float:
    from training.metrics import SegmentationMetrics

    # rank zero alone assesses a stage: a synced compute would wait for the other DDP ranks
    metrics = SegmentationMetrics(len(class_names), list(class_names), sync=False)
    metrics = metrics.to(images.device)
    with torch.no_grad():
        for i in range(0, len(images), batch):
            metrics.update(model(images[i : i + batch]).argmax(1), labels[i : i + batch])
    return float(metrics.compute()["miou"])


def robustness_figures(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    fgsm_eps: Sequence[float] = (1 / 255, 4 / 255),
    pgd_eps: Sequence[float] = (4 / 255,),
    pgd_steps: int = 5,
    corruptions: Sequence[str] = tuple(CORRUPTIONS),
    severities: Sequence[int] = (1, 3, 5),
    batch_size: int = 8,
    seed: int = 0,
    prefix: str = "risk/S-05/",
) -> dict[str, float]:
    """S-05 figures of ``model`` on ``images`` ``(N, 3, H, W)`` in [0, 1] with ``labels``
    ``(N, H, W)``: ``clean_miou``; per attack ``fgsm_eps<k>``/``pgd_eps<k>`` (``k`` in
    grey levels, ``eps * 255``) and per corruption ``<name>_s<severity>``: ``/miou`` and
    ``/drop`` (clean minus attacked, mIoU points as a fraction); ``max_drop`` and
    ``max_drop_share`` (the largest drop over the clean mIoU; 0 when clean is 0)."""
    was_training = model.training
    model.eval()
    try:
        grads = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)  # gradients to the input only
        try:
            figures = _figures(
                model,
                images,
                labels,
                class_names,
                attacks=_attacks(fgsm_eps, pgd_eps, pgd_steps, seed),
                corruptions=[(c, s) for c in corruptions for s in severities],
                batch=batch_size,
                seed=seed,
            )
        finally:
            for p, g in zip(model.parameters(), grads, strict=True):
                p.requires_grad_(g)
    finally:
        model.train(was_training)
    return {prefix + k: v for k, v in figures.items()}


def _attacks(
    fgsm_eps: Sequence[float], pgd_eps: Sequence[float], pgd_steps: int, seed: int
) -> dict[str, Callable[[nn.Module, Tensor, Tensor], Tensor]]:
    out: dict[str, Callable[[nn.Module, Tensor, Tensor], Tensor]] = {}
    for eps in fgsm_eps:
        out[f"fgsm_eps{eps * 255:g}"] = lambda m, x, y, e=eps: fgsm(m, x, y, e)
    for eps in pgd_eps:
        out[f"pgd_eps{eps * 255:g}"] = lambda m, x, y, e=eps: pgd(m, x, y, e, pgd_steps, seed=seed)
    return out


def _figures(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    attacks: Mapping[str, Callable[[nn.Module, Tensor, Tensor], Tensor]],
    corruptions: Sequence[tuple[str, int]],
    batch: int,
    seed: int,
) -> dict[str, float]:
    clean = _miou(model, images, labels, class_names, batch)
    inputs: dict[str, Tensor] = {}
    for name, attack in attacks.items():
        parts = [
            attack(model, images[i : i + batch], labels[i : i + batch])
            for i in range(0, len(images), batch)
        ]
        inputs[name] = torch.cat(parts)
    for name, severity in corruptions:
        inputs[f"{name}_s{severity}"] = corrupt(images, name, severity, seed)
    out = {"clean_miou": clean}
    drops = []
    for name, x in inputs.items():
        miou = _miou(model, x, labels, class_names, batch)
        out[f"{name}/miou"] = miou
        out[f"{name}/drop"] = clean - miou
        drops.append(clean - miou)
    worst = max(drops, default=0.0)
    out["max_drop"] = worst
    out["max_drop_share"] = worst / clean if clean > 0 else 0.0
    return out


#: ``risk.robustness`` keys and their defaults (budgets in grey levels, 1/255).
SETTINGS = {
    "frames": 32,
    "fgsm_eps_255": [1, 4],
    "pgd_eps_255": [4],
    "pgd_steps": 5,
    "corruptions": list(CORRUPTIONS),
    "severities": [1, 3, 5],
}


def settings_from(risk: Mapping[str, object]) -> dict[str, object] | None:
    """``risk.robustness`` checked and turned into :func:`robustness_figures` keyword
    arguments plus ``frames``; None when off (``frames: 0`` or no node). Raises
    :class:`~core.config.ConfigError` naming the key for a bad value (the run calls this
    before any work)."""
    from core.config import ConfigError

    node = dict(risk.get("robustness") or {})  # type: ignore[arg-type]
    unknown = sorted(set(node) - set(SETTINGS))
    if unknown:
        raise ConfigError(
            f"risk.robustness.{unknown[0]}: unknown key, expected one of {list(SETTINGS)}"
        )
    values = {**SETTINGS, **node}

    def numbers(key: str, low: float, high: float, integer: bool = False) -> list[float]:
        raw = values[key]
        items = list(raw) if isinstance(raw, list | tuple) else None
        if items is None or not all(isinstance(v, int | float) and low <= v <= high for v in items):
            kind = "integers" if integer else "numbers"
            raise ConfigError(
                f"risk.robustness.{key}={raw}: expected a list of {kind} in [{low}, {high}]"
            )
        if integer and not all(float(v).is_integer() for v in items):
            raise ConfigError(f"risk.robustness.{key}={raw}: expected integers")
        return [float(v) for v in items]

    frames = values["frames"]
    if not isinstance(frames, int) or frames < 0:
        raise ConfigError(f"risk.robustness.frames={frames}: expected an integer >= 0 (0: off)")
    steps = values["pgd_steps"]
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"risk.robustness.pgd_steps={steps}: expected an integer >= 1")
    corruptions = values["corruptions"]
    bad = [c for c in list(corruptions or []) if c not in CORRUPTIONS]  # type: ignore[call-overload]
    if not isinstance(corruptions, list | tuple) or bad:
        raise ConfigError(
            f"risk.robustness.corruptions={corruptions}: expected names from {list(CORRUPTIONS)}"
        )
    fgsm_eps = numbers("fgsm_eps_255", 0, 255)
    pgd_eps = numbers("pgd_eps_255", 0, 255)
    severities = numbers("severities", 1, 5, integer=True)
    if frames == 0:
        return None
    return {
        "frames": frames,
        "fgsm_eps": [e / 255 for e in fgsm_eps],
        "pgd_eps": [e / 255 for e in pgd_eps],
        "pgd_steps": steps,
        "corruptions": list(corruptions),
        "severities": [int(s) for s in severities],
    }
