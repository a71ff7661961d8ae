"""Benchmark of the training path: model throughput, data throughput, inference latency.

    python scripts/benchmark_training.py                 # default UNet, 128x256, CPU
    python scripts/benchmark_training.py --model deeplab --device cuda

Prints
* training throughput (images/s) of the model, forward + backward + AdamW step, in fp32
  and under bf16 autocast, each in the default and the channels_last layout (which
  ``SegmentationTask`` trains in), side by side from the same weights;
* the DataModule's throughput alone (images/s through the 90/10 sampler, augmentation
  and collation), and its ratio to the fastest training form -- it must stay >= 5x so
  data never limits;
* the cost of a self-training step (EMA teacher forward, ClassMix, the student on the
  mixed batch; with and without MIC) against a plain step at the same batch, in fp32 and
  in the fastest form, each against the plain step of its own form: issue 11 asks for at
  most 2x;
* inference latency at batch 1 of eager, channels_last, TorchScript and bf16, measured
  as the risk T-06 monitor does (``training.risk.latency``: warm-up, best of interleaved
  rounds, pinned threads), with each form's speed-up over eager.
The datasets are small procedural ones generated into a temporary folder (or --data).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from core.paths import config_dir
from simulation.dataset import GeneratedDataset
from training.augment import Augment
from training.datamodule import SimRealDataModule
from training.losses import SegmentationLoss
from training.precision import cpu_bf16_support, resolve_precision
from training.risk.latency import latency_report
from training.stages.data import ensure_procedural_datasets

CONFIGS = config_dir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unet", help="config in configs/model/")
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12, help="timed training steps")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default=None, help="folder for the benchmark datasets")
    ap.add_argument(
        "--latency-threads", type=int, default=1, help="torch threads for the latency figures"
    )
    args = ap.parse_args()
    device = torch.device(args.device)

    taxonomy_cfg = OmegaConf.load(CONFIGS / "taxonomy/drive11.yaml")
    taxonomy = instantiate(taxonomy_cfg)
    model = instantiate(
        OmegaConf.load(CONFIGS / f"model/{args.model}.yaml"), num_classes=taxonomy.num_classes
    )
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"# {date.today()} {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, device {device}; {model.arch} ({n_params:,} parameters), "
        f"{args.height}x{args.width}, batch {args.batch_size}"
    )
    support = cpu_bf16_support() if device.type == "cpu" else None
    if support is not None:
        units = ", ".join(support.units) or "none"
        print(
            f"# CPU bf16 units: {units}; trainer.precision=auto picks "
            f"{resolve_precision('auto', 'cpu').precision}"
        )

    # --- training throughput: fp32, bf16 autocast, bf16 + channels_last; one fresh copy of
    # the same initial weights each, side by side in this process
    loss_fn = SegmentationLoss(taxonomy.num_classes).to(device)
    x = torch.rand(args.batch_size, 3, args.height, args.width, device=device)
    y = torch.randint(
        0, taxonomy.num_classes, (args.batch_size, args.height, args.width), device=device
    )
    initial = copy.deepcopy(model.state_dict())
    rates: dict[str, float] = {}
    for name, bf16, channels_last in VARIANTS:
        model.load_state_dict(initial)
        step = _train_step_seconds(model, loss_fn, x, y, args.steps, device, bf16, channels_last)
        rates[name] = args.batch_size / step
        gains = [f"{rates[name] / rates[base]:.2f}x {base}" for base in rates if base != name]
        print(
            f"training {name:<20} {rates[name]:8.1f} images/s  ({step:.3f} s/step"
            + (f"; {', '.join(gains)}" if gains else "")
            + ")"
        )
    train_ips = max(rates.values())  # the data path must keep up with the fastest form

    # --- a self-training step at the same batch, in fp32 and in the fastest form, each
    # against the plain step of its own form
    forms = {name: (bf16, cl) for name, bf16, cl in VARIANTS}
    fastest = max(rates, key=rates.__getitem__)
    for name in dict.fromkeys(("fp32", fastest)):
        bf16, channels_last = forms[name]
        plain_step = args.batch_size / rates[name]
        for mic in (0.0, 0.7):
            model.load_state_dict(initial)
            st = _self_training_step(
                model, loss_fn, x, y, args.steps, device, mic, bf16, channels_last
            )
            print(
                f"self-training {name:<20} {args.batch_size / st:8.1f} images/s  ({st:.3f} "
                f"s/step, {st / plain_step:.2f}x a plain {name} step; MIC {'on' if mic else 'off'})"
            )
    model = model.to(memory_format=torch.contiguous_format)

    # --- data path alone
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or tmp)
        splits = {
            "sim_train": {"style": "sim", "seed": 1, "num_frames": 512},
            "real_train": {"style": "photo", "seed": 2, "num_frames": 256},
        }
        preset = OmegaConf.to_container(OmegaConf.load(CONFIGS / "randomization/full.yaml"))
        gen = {"root": str(root), "randomization": preset, "shard_size": 128, "splits": splits}
        image = {"height": args.height, "width": args.width}
        roots = ensure_procedural_datasets(gen, image, taxonomy_cfg)  # <root>/<split>-<key>
        dm = SimRealDataModule(
            sim_train=GeneratedDataset(roots["sim_train"]),
            real_train=GeneratedDataset(roots["real_train"]),
            sim_ratio=0.9,
            real_fraction=0.5,
            batch_size=args.batch_size,
            batches_per_epoch=40,
            num_workers=args.workers,
            augment=Augment(hflip=True, scale=(0.9, 1.1), color_jitter=0.1),
        )
        loader = dm.train_dataloader()
        for _ in loader:  # warm-up epoch: page cache, worker start
            pass
        start = time.perf_counter()
        n = sum(batch["image"].shape[0] for batch in loader)
        data_ips = n / (time.perf_counter() - start)
    ratio = data_ips / train_ips
    verdict = "ok" if ratio >= 5 else "DATA-BOUND: below the 5x target"
    print(
        f"data path     {data_ips:8.1f} images/s  ({ratio:.1f}x the fastest training form: "
        f"{verdict})"
    )

    # --- inference latency, batch 1: the T-06 monitor's own measurement
    report = latency_report(
        model.eval(), args.height, args.width, kinds=LATENCY_KINDS, threads=args.latency_threads
    )
    print(f"latency b=1, {report.method}")
    for kind, result in report.results.items():
        if result.stats is None:
            print(f"  {kind:<14} {result.status}: {result.reason}")
            continue
        st, agree = result.stats, result.agreement.get("pixel_agreement", float("nan"))
        print(
            f"  {kind:<14} p50 {st.p50_ms:6.1f} ms  p95 {st.p95_ms:6.1f} ms  "
            f"{report.speedup(kind):.2f}x eager  agreement {agree:.4f}"
        )


#: The inference forms timed at batch 1 (``training.risk.latency``).
LATENCY_KINDS = ("eager", "channels_last", "torchscript", "bf16")
#: (name, bf16 autocast, channels_last memory format)
VARIANTS = (
    ("fp32", False, False),
    ("fp32+channels_last", False, True),  # how SegmentationTask trains in fp32
    ("bf16", True, False),
    ("bf16+channels_last", True, True),  # how it trains under trainer.precision=bf16-mixed
)


def _train_step_seconds(model, loss_fn, x, y, steps, device, bf16, channels_last) -> float:
    """Median seconds of forward + backward + AdamW step (after two warm-up steps)."""
    model, x = _in_layout(model, x, channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    times = []
    for step in range(steps + 2):
        _sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        _sync(device)
        if step >= 2:  # the first steps warm up allocators and kernels
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _self_training_step(
    model, loss_fn, x, y, steps, device, mic_ratio, bf16=False, channels_last=False
) -> float:
    """Median seconds of one training step with the self-training objective's terms, in
    the given form (as :func:`_train_step_seconds`)."""
    from adaptation.plugin import ModelInfo, StepOutputs
    from adaptation.self_training import SelfTraining, ema_momentum, ema_update

    model, x = _in_layout(model, x, channels_last)
    real = torch.rand_like(x)  # keeps x's memory format

    def batches():
        while True:
            yield {"image": real}

    info = ModelInfo(model.feature_channels, int(y.max()) + 1, lambda _: batches(), 0, model)
    plugin = SelfTraining(["source_only"], mic_ratio=mic_ratio)
    objective = plugin.objective(info)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = {"image": x, "mask": y}
    times = []
    for step in range(steps + 2):
        _sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, features = model.forward_features(x)
            outputs = StepOutputs(logits, features, model.forward_features, step, steps + 2)
            term, _ = objective(batch, outputs)
            loss = loss_fn(logits, y) + term
        loss.backward()
        opt.step()
        ema_update(objective.teacher, model, ema_momentum(step, plugin.momentum))
        _sync(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _in_layout(model, x, channels_last: bool):
    """``(model, x)`` in the NHWC (channels_last) or the default memory layout; the model
    is converted in place."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(memory_format=fmt), x.contiguous(memory_format=fmt)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
