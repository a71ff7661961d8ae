"""Benchmark of the training path: model throughput, data throughput, inference latency.

    python scripts/benchmark_training.py                 # default UNet, 128x256, CPU
    python scripts/benchmark_training.py --model deeplab --device cuda

Prints
* training throughput (images/s) of the model: forward + backward + AdamW step;
* the DataModule's throughput alone (images/s through the 90/10 sampler, augmentation
  and collation), and its ratio to training -- it must stay >= 5x so data never limits;
* the cost of a self-training step (EMA teacher forward, ClassMix, the student on the
  mixed batch; with and without MIC) against a plain step at the same batch: issue 11
  asks for at most 2x;
* inference latency at batch 1 (p50/p95/p99 ms), the input of risk T-06.
The datasets are small procedural ones generated into a temporary folder (or --data).
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args()
    device = torch.device(args.device)

    taxonomy_cfg = OmegaConf.load(CONFIGS / "taxonomy/drive11.yaml")
    taxonomy = instantiate(taxonomy_cfg)
    model = instantiate(
        OmegaConf.load(CONFIGS / f"model/{args.model}.yaml"), num_classes=taxonomy.num_classes
    )
    model = model.to(device, memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"# {date.today()} {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, device {device}; {model.arch} ({n_params:,} parameters), "
        f"{args.height}x{args.width}, batch {args.batch_size}"
    )

    # --- training throughput
    loss_fn = SegmentationLoss(taxonomy.num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(args.batch_size, 3, args.height, args.width, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(
        0, taxonomy.num_classes, (args.batch_size, args.height, args.width), device=device
    )
    model.train()
    times = []
    for step in range(args.steps + 2):
        _sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        _sync(device)
        if step >= 2:  # the first steps warm up allocators and kernels
            times.append(time.perf_counter() - start)
    train_ips = args.batch_size / statistics.median(times)
    plain_step = statistics.median(times)
    print(f"training      {train_ips:8.1f} images/s  ({plain_step:.3f} s/step)")

    # --- a self-training step at the same batch
    for mic in (0.0, 0.7):
        st = _self_training_step(model, loss_fn, x, y, args.steps, device, mic)
        print(
            f"self-training {args.batch_size / st:8.1f} images/s  ({st:.3f} s/step, "
            f"{st / plain_step:.2f}x a plain step; MIC {'on' if mic else 'off'})"
        )

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
    print(f"data path     {data_ips:8.1f} images/s  ({ratio:.1f}x training: {verdict})")

    # --- inference latency, batch 1
    model.eval()
    one = torch.rand(1, 3, args.height, args.width, device=device)
    one = one.contiguous(memory_format=torch.channels_last)
    lat = []
    with torch.inference_mode():
        for i in range(60):
            _sync(device)
            start = time.perf_counter()
            model(one)
            _sync(device)
            if i >= 10:
                lat.append(1000 * (time.perf_counter() - start))
    q = statistics.quantiles(lat, n=100)
    print(f"latency b=1   p50 {q[49]:.1f} ms  p95 {q[94]:.1f} ms  p99 {q[98]:.1f} ms")


def _self_training_step(model, loss_fn, x, y, steps, device, mic_ratio) -> float:
    """Median seconds of one training step with the self-training objective's terms."""
    from adaptation.plugin import ModelInfo, StepOutputs
    from adaptation.self_training import SelfTraining, ema_momentum, ema_update

    real = torch.rand_like(x)

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
        logits, features = model.forward_features(x)
        outputs = StepOutputs(logits, features, model.forward_features, step, steps + 2)
        term, _ = objective(batch, outputs)
        (loss_fn(logits, y) + term).backward()
        opt.step()
        ema_update(objective.teacher, model, ema_momentum(step, plugin.momentum))
        _sync(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
