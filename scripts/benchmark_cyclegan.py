"""Benchmark of the CycleGAN: training s/iteration and images/s, translation images/s.

    python scripts/benchmark_cyclegan.py                              # both configs, ours only
    python scripts/benchmark_cyclegan.py --config reference \\
        --reference-repo /path/to/pytorch-CycleGAN-and-pix2pix        # side by side
    python scripts/benchmark_cyclegan.py --config small --iters 20 --lightning --json out.json

Configs: ``reference`` is the architecture of Zhu et al. (9-block ResNet generator, 3-layer
PatchGAN, ngf = ndf = 64, batch 1, 256x256); ``small`` is a CPU-sized one (ngf = ndf = 16,
3 blocks, batch 4, 128x256). ``--ngf/--ndf/--blocks/--batch/--height/--width`` override every
selected config.

One training iteration is the work ``CycleGAN.training_step`` does per batch, run in a plain
loop without a Trainer: both generators forward, cycle and identity passes, generator update
(discriminators frozen, as ``toggle_optimizer`` does), then both discriminators on real and
pooled fake images, discriminator update -- two Adam steps. ``--lightning`` also times the
real ``training_step`` inside a ``pl.Trainer`` (per batch, hook to hook) to show the
Trainer's overhead against the plain loop.

``--reference-repo PATH`` (a checkout of junyanz/pytorch-CycleGAN-and-pix2pix) adds the
reference implementation: its ``CycleGANModel`` built from a minimal option namespace, timed
as ``set_input`` + ``optimize_parameters()`` on the same tensors, in blocks of iterations
alternated with ours (order swapped every round) so that machine load hits both alike.

Translation: ``CycleGAN.translate`` (generator in eval mode, no_grad) at each
``--translate-batch`` size and the config's image size. Warm-up iterations are never timed;
figures are the median and mean over the timed ones. ``--json PATH`` writes them all.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

from adaptation.cyclegan import CycleGAN

CONFIGS: dict[str, dict[str, int]] = {
    "reference": {"ngf": 64, "ndf": 64, "blocks": 9, "batch": 1, "height": 256, "width": 256},
    "small": {"ngf": 16, "ndf": 16, "blocks": 3, "batch": 4, "height": 128, "width": 256},
}
D_LAYERS = 3  # PatchGAN depth of both configs (the reference's netD='basic')
REFERENCE_URL = "https://github.com/junyanz/pytorch-CycleGAN-and-pix2pix"


# --------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg": load,
    }


def _load_str(load: list[float] | None) -> str:
    return "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)


# --------------------------------------------------------------------------- ours
def build_ours(cfg: dict[str, int], seed: int = 0) -> CycleGAN:
    torch.manual_seed(seed)
    return CycleGAN(
        g_ngf=cfg["ngf"], g_blocks=cfg["blocks"], d_ndf=cfg["ndf"], d_layers=D_LAYERS, seed=seed
    )


def our_trainer_free_step(model: CycleGAN) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One ``training_step`` of ``model`` without Lightning: returns ``step(sim01, real01)``.

    Same losses, weights, pools and update order as ``CycleGAN.training_step``; the
    ``toggle_optimizer`` / ``untoggle_optimizer`` pairs are replaced by the ``requires_grad``
    switches they perform. Not done: the LR schedule (a constant factor here) and logging.
    """
    opt_g, opt_d = model.configure_optimizers()
    g_params = [p for group in opt_g.param_groups for p in group["params"]]
    d_params = [p for group in opt_d.param_groups for p in group["params"]]

    def step(sim01: torch.Tensor, real01: torch.Tensor) -> None:
        sim, real = sim01 * 2 - 1, real01 * 2 - 1
        for p in d_params:  # toggle_optimizer(opt_g)
            p.requires_grad_(False)
        losses, fake_real, fake_sim = model.generator_losses(sim, real)
        g_loss = model.generator_objective(losses)
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        for p in d_params:  # untoggle_optimizer(opt_g)
            p.requires_grad_(True)
        for p in g_params:  # toggle_optimizer(opt_d)
            p.requires_grad_(False)
        d_loss = model.discriminator_loss(sim, real, fake_sim, fake_real)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        for p in g_params:  # untoggle_optimizer(opt_d)
            p.requires_grad_(True)

    return step


def time_lightning(
    cfg: dict[str, int], sim01: torch.Tensor, real01: torch.Tensor, iters: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds per batch of ``training_step`` in a ``pl.Trainer`` (no warm-up).

    Timed from ``on_train_batch_start`` to ``on_train_batch_end``: training_step with its
    optimizer toggling, LightningOptimizer steps and ``log_dict``, not data loading.
    """
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    class BatchTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []
            self._start = self._cpu = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._start = time.perf_counter()
            self._cpu = time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.times.append(time.perf_counter() - self._start)
            self.cpu.append(time.process_time() - self._cpu)

    model = build_ours(cfg)
    n = warmup + iters
    loader = DataLoader([{"sim": sim01, "real": real01}] * n, batch_size=None)
    timer = BatchTimer()
    quiet = ("pytorch_lightning", "lightning.pytorch", "lightning.fabric")
    levels = {name: logging.getLogger(name).level for name in quiet}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in quiet:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            trainer = pl.Trainer(
                accelerator="cpu",
                max_steps=2 * n,
                max_epochs=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=tmp,
                callbacks=[timer],
            )
            trainer.fit(model, train_dataloaders=loader)
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
    return timer.times[warmup:], timer.cpu[warmup:]


# --------------------------------------------------------------------------- reference
def load_reference(repo: str | Path) -> tuple[type, ModuleType]:
    """Import ``models.cycle_gan_model.CycleGANModel`` and ``models.networks`` from ``repo``.

    The checkout's top-level ``models`` and ``util`` packages are imported from ``repo``
    (put first on ``sys.path``); nothing is stubbed. Refuses if other packages of those
    names are already imported.
    """
    repo = Path(repo).resolve()
    if not (repo / "models" / "cycle_gan_model.py").is_file():
        raise FileNotFoundError(f"--reference-repo {repo}: no models/cycle_gan_model.py there")
    for name in ("models", "util"):
        mod = sys.modules.get(name)
        if mod is not None and repo not in Path(getattr(mod, "__file__", "") or "/").parents:
            raise RuntimeError(f"a module {name!r} from elsewhere is already imported: {mod!r}")
    sys.path.insert(0, str(repo))
    cycle_gan_model = importlib.import_module("models.cycle_gan_model")
    networks = importlib.import_module("models.networks")
    return cycle_gan_model.CycleGANModel, networks


def reference_options(cfg: dict[str, int], checkpoints_dir: str) -> SimpleNamespace:
    """The options ``CycleGANModel(opt)`` reads (BaseModel, CycleGANModel, define_G/D, GANLoss).

    Values are the reference's defaults for ``--model cycle_gan`` training (base_options,
    train_options and CycleGANModel.modify_commandline_options).
    """
    blocks = cfg["blocks"]
    return SimpleNamespace(
        isTrain=True,
        gpu_ids=[],
        checkpoints_dir=checkpoints_dir,
        name="benchmark",
        preprocess="resize_and_crop",
        input_nc=3,
        output_nc=3,
        ngf=cfg["ngf"],
        ndf=cfg["ndf"],
        netG=f"resnet_{blocks}blocks" if blocks in (6, 9) else "resnet_6blocks",
        netD="basic" if D_LAYERS == 3 else "n_layers",
        n_layers_D=D_LAYERS,
        norm="instance",
        no_dropout=True,
        init_type="normal",
        init_gain=0.02,
        gan_mode="lsgan",
        pool_size=50,
        lr=0.0002,
        beta1=0.5,
        lambda_A=10.0,
        lambda_B=10.0,
        lambda_identity=0.5,
        direction="AtoB",
    )


def build_reference(
    model_cls: type, networks: ModuleType, cfg: dict[str, int], checkpoints_dir: str, seed: int = 0
) -> tuple[Any, str | None]:
    """The reference model at ``cfg``, and a note when it had to be adapted.

    Its ``define_G`` knows only 6 and 9 ResNet blocks; for another count both generators are
    replaced by its own ``ResnetGenerator(n_blocks=...)`` through its ``init_net`` and its
    ``optimizer_G`` rebuilt the way its ``__init__`` builds it.
    """
    torch.manual_seed(seed)
    random.seed(seed)
    opt = reference_options(cfg, checkpoints_dir)
    note = None
    with contextlib.redirect_stdout(io.StringIO()):  # init_weights prints per network
        model = model_cls(opt)
        if cfg["blocks"] not in (6, 9):

            def generator() -> torch.nn.Module:
                net = networks.ResnetGenerator(
                    3,
                    3,
                    cfg["ngf"],
                    norm_layer=networks.get_norm_layer("instance"),
                    use_dropout=False,
                    n_blocks=cfg["blocks"],
                )
                return networks.init_net(net, opt.init_type, opt.init_gain, opt.gpu_ids)

            model.netG_A, model.netG_B = generator(), generator()
            model.optimizer_G = torch.optim.Adam(
                [*model.netG_A.parameters(), *model.netG_B.parameters()],
                lr=opt.lr,
                betas=(opt.beta1, 0.999),
            )
            model.optimizers[0] = model.optimizer_G
            note = (
                f"reference define_G has no resnet_{cfg['blocks']}blocks: its ResnetGenerator"
                f"(n_blocks={cfg['blocks']}) was put in through its init_net"
            )
    return model, note


def reference_step(model: Any) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``step(sim01, real01)``: ``set_input`` + ``optimize_parameters()`` of the reference."""
    paths = ["benchmark.png"]

    def step(sim01: torch.Tensor, real01: torch.Tensor) -> None:
        # Its datasets hand over images normalized to [-1, 1]; ours maps [0, 1] inside.
        model.set_input(
            {"A": sim01 * 2 - 1, "B": real01 * 2 - 1, "A_paths": paths, "B_paths": paths}
        )
        model.optimize_parameters()

    return step


# --------------------------------------------------------------------------- timing
def time_interleaved(
    steps: dict[str, Callable[[], None]], iters: int, warmup: int, block: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds per call of each step, in alternating blocks of ``block`` calls.

    Each step first runs ``warmup`` untimed calls; then rounds of ``block`` timed calls per
    step follow, the order of the steps reversed every round, until each has ``iters``.
    CPU seconds (``time.process_time``, all threads) are less sensitive to other load than
    wall seconds.
    """
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    round_ = 0
    while any(len(t) < iters for t in times.values()):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            for _ in range(min(block, iters - len(times[name]))):
                start, start_cpu = time.perf_counter(), time.process_time()
                steps[name]()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        round_ += 1
    return times, cpu


def summarize(
    times: list[float], images_per_call: int, cpu: list[float] | None = None
) -> dict[str, Any]:
    median = statistics.median(times)
    out = {
        "n": len(times),
        "median_s": median,
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "max_s": max(times),
        "images_per_s": images_per_call / median,
        "times_s": times,
    }
    if cpu:
        out |= {"cpu_median_s": statistics.median(cpu), "cpu_times_s": cpu}
    return out


def time_translate(
    model: CycleGAN, batch: int, height: int, width: int, iters: int, warmup: int
) -> dict[str, Any]:
    images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        model.translate(images, check_size=False)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return summarize(times, batch)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _row(name: str, s: dict[str, Any]) -> str:
    return (
        f"  {name:10s} {s['median_s']:9.3f} {s['mean_s']:9.3f} {s['min_s']:9.3f} "
        f"{s['max_s']:9.3f} {s['images_per_s']:9.2f} {s.get('cpu_median_s', float('nan')):9.3f}"
    )


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["reference", "small", "both"], default="both")
    for name in ("ngf", "ndf", "blocks", "batch", "height", "width"):
        ap.add_argument(f"--{name}", type=int, default=None, help="override the config's value")
    ap.add_argument("--iters", type=int, default=6, help="timed training iterations per impl")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    ap.add_argument("--block", type=int, default=1, help="iterations per interleaved block")
    ap.add_argument(
        "--reference-repo", default=None, help=f"checkout of {REFERENCE_URL} to time side by side"
    )
    ap.add_argument(
        "--lightning",
        action="store_true",
        help="also time training_step inside a pl.Trainer (its overhead)",
    )
    ap.add_argument("--translate-batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--translate-iters", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.block < 1 or args.translate_iters < 1:
        ap.error("--iters, --block and --translate-iters must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine_info()
    names = ["reference", "small"] if args.config == "both" else [args.config]
    print(
        f"# {info['date']} {info['cpu']} ({info['machine']}, {info['cores']} cores), "
        f"{info['torch_threads']} torch threads, torch {info['torch']}, "
        f"python {info['python']}; load average {_load_str(info['loadavg'])}"
    )
    reference = None
    if args.reference_repo:
        reference = load_reference(args.reference_repo)
        print(f"# reference: {Path(args.reference_repo).resolve()}")
    else:
        print(
            f"# reference: not run (pass --reference-repo PATH, a checkout of {REFERENCE_URL}, "
            "for a side-by-side timing)"
        )
    results: dict[str, Any] = {"machine": info, "args": vars(args), "configs": {}}
    sim01, real01 = None, None
    for name in names:
        cfg = dict(CONFIGS[name])
        cfg.update({k: getattr(args, k) for k in cfg if getattr(args, k) is not None})
        shape = (cfg["batch"], 3, cfg["height"], cfg["width"])
        gen = torch.Generator().manual_seed(0)
        sim01, real01 = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)
        out: dict[str, Any] = {"config": cfg, "notes": []}
        results["configs"][name] = out
        print(
            f"\n## {name}: ResNet generator ngf={cfg['ngf']} blocks={cfg['blocks']}, PatchGAN "
            f"ndf={cfg['ndf']} layers={D_LAYERS}; batch {cfg['batch']}, "
            f"{cfg['height']}x{cfg['width']}"
        )
        ours = build_ours(cfg)
        params = {"ours": {"G": _n_params(ours.g_sim2real), "D": _n_params(ours.d_real)}}
        steps = {"ours": our_trainer_free_step(ours)}
        if reference is not None:
            with tempfile.TemporaryDirectory() as ckpt:
                theirs, note = build_reference(*reference, cfg, ckpt)
            if note:
                out["notes"].append(note)
            params["junyanz"] = {"G": _n_params(theirs.netG_A), "D": _n_params(theirs.netD_A)}
            steps["junyanz"] = reference_step(theirs)
        out["params"] = params
        line = "  ".join(f"{k}: G {v['G']:,}  D {v['D']:,}" for k, v in params.items())
        if reference is not None:
            same = params["ours"] == params["junyanz"]
            line += "  (" + ("same" if same else "DIFFERENT") + ")"
        print(f"parameters per network  {line}")
        for note in out["notes"]:
            print(f"note: {note}")

        # --- training throughput
        bound = {k: functools.partial(v, sim01, real01) for k, v in steps.items()}
        times, cpu = time_interleaved(bound, args.iters, args.warmup, args.block)
        train = {k: summarize(v, cfg["batch"], cpu[k]) for k, v in times.items()}
        interleave = f"interleaved in blocks of {args.block}, " if len(steps) > 1 else ""
        print(
            f"training: s/iteration (1 G + 1 D update), {args.iters} timed after {args.warmup} "
            f"warm-up, {interleave}plain loop"
        )
        print(
            f"  {'impl':10s} {'median':>9s} {'mean':>9s} {'min':>9s} {'max':>9s} {'images/s':>9s}"
            f" {'cpu_s':>9s}"
        )
        for k, s in train.items():
            print(_row(k, s))
        if args.lightning:
            lt_wall, lt_cpu = time_lightning(cfg, sim01, real01, args.iters, args.warmup)
            lt = summarize(lt_wall, cfg["batch"], lt_cpu)
            train["ours_trainer"] = lt
            overhead = lt["median_s"] / train["ours"]["median_s"] - 1
            overhead_cpu = lt["cpu_median_s"] / train["ours"]["cpu_median_s"] - 1
            lt |= {"overhead_vs_plain": overhead, "cpu_overhead_vs_plain": overhead_cpu}
            print(
                _row("ours+pl", lt) + f"   (in pl.Trainer: {100 * overhead:+.1f}% wall, "
                f"{100 * overhead_cpu:+.1f}% CPU vs plain loop; not interleaved)"
            )
        if "junyanz" in train:
            ours_s, theirs_s = train["ours"], train["junyanz"]
            ratio = ours_s["median_s"] / theirs_s["median_s"]
            ratios = {
                "median": ratio,
                "min": ours_s["min_s"] / theirs_s["min_s"],
                "cpu_median": ours_s["cpu_median_s"] / theirs_s["cpu_median_s"],
            }
            train["ratio_ours_over_junyanz"] = ratios
            verdict = "ours slower" if ratio > 1 else "ours faster"
            print(
                f"  ratio ours/junyanz: {ratio:.3f} by median wall s ({verdict}); "
                f"{ratios['min']:.3f} by min, {ratios['cpu_median']:.3f} by median CPU s"
            )
        out["training"] = train

        # --- translation throughput
        print("translation: CycleGAN.translate (eval, no_grad)")
        print(f"  {'batch':>5s} {'median_s':>9s} {'mean_s':>9s} {'images/s':>9s}")
        out["translate"] = {}
        for batch in args.translate_batch:
            s = time_translate(
                ours, batch, cfg["height"], cfg["width"], args.translate_iters, args.warmup
            )
            out["translate"][str(batch)] = s
            print(f"  {batch:5d} {s['median_s']:9.4f} {s['mean_s']:9.4f} {s['images_per_s']:9.2f}")

    results["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"\n# load average at the end {_load_str(results['loadavg_end'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"# figures written to {args.json}")
    return results


if __name__ == "__main__":
    main()
