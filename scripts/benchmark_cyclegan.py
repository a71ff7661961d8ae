"""Benchmark of the CycleGAN: training s/iteration and images/s, translation images/s.

    python scripts/benchmark_cyclegan.py                              # both configs, ours only
    python scripts/benchmark_cyclegan.py --config reference \\
        --reference-repo /path/to/pytorch-CycleGAN-and-pix2pix        # side by side
    python scripts/benchmark_cyclegan.py --config small --iters 20 --lightning --json out.json
    python scripts/benchmark_cyclegan.py --config small --curve-iters 50 \\
        --reference-repo /path/to/pytorch-CycleGAN-and-pix2pix        # loss curves, both

Configs: ``reference`` is the architecture of Zhu et al. (9-block ResNet generator, 3-layer
PatchGAN, ngf = ndf = 64, batch 1, 256x256); ``small`` is a CPU-sized one (ngf = ndf = 16,
3 blocks, batch 4, 128x256). ``--ngf/--ndf/--blocks/--batch/--height/--width`` override every
selected config.

One training iteration is the work ``CycleGAN.training_step`` does per batch, run in a plain
loop without a Trainer: both generators forward, cycle and identity passes, generator update
(discriminators frozen, as ``toggle_optimizer`` does), then both discriminators on real and
pooled fake images, discriminator update -- two Adam steps. Our iteration is timed in the
``--forms`` asked (default ``fp32``, ``bf16`` autocast as ``trainer.precision=bf16-mixed``
runs it, and ``bf16+cl`` with channels_last; ``bf16+compile`` and ``bf16+cl+compile`` add
``torch.compile``), each from the same initial weights, and each form's speed-up is printed
against the reference and against the form before it (each step's own gain). ``--curve-iters N``
records the generator and discriminator losses of the fastest form and of the reference
over the same first N iterations (smooth random images, the same batches for both) and
prints how well the curves agree in trend. ``--lightning`` also times the
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


#: Our training forms: name -> (bf16 autocast, channels_last, torch.compile).
FORMS: dict[str, tuple[bool, bool, bool]] = {
    "fp32": (False, False, False),
    "bf16": (True, False, False),
    "bf16+cl": (True, True, False),
    "bf16+compile": (True, False, True),
    "bf16+cl+compile": (True, True, True),
}
#: Forms timed unless ``--forms`` says otherwise (compiling takes minutes on 2 cores).
DEFAULT_FORMS = ("fp32", "bf16", "bf16+cl")


def our_trainer_free_step(
    model: CycleGAN, bf16: bool = False, channels_last: bool = False, compile: bool = False
) -> Callable[[torch.Tensor, torch.Tensor], dict[str, float]]:
    """One ``training_step`` of ``model`` without Lightning: returns ``step(sim01, real01)``,
    which gives the step's ``g_loss`` and ``d_loss``.

    Same losses, weights, pools and update order as ``CycleGAN.training_step``; the
    ``toggle_optimizer`` / ``untoggle_optimizer`` pairs are replaced by the ``requires_grad``
    switches they perform. Not done: the LR schedule (a constant factor here) and logging.
    ``bf16`` runs both halves under ``torch.autocast`` as ``trainer.precision=bf16-mixed``
    does (losses in fp32, weights and Adam state in fp32); ``channels_last`` puts weights
    and images in NHWC; ``compile`` compiles the four networks in place as the stage does.
    """
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile_networks()  # what adaptation.cyclegan.compile=true does
    opt_g, opt_d = model.configure_optimizers()
    g_params = [p for group in opt_g.param_groups for p in group["params"]]
    d_params = [p for group in opt_d.param_groups for p in group["params"]]
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def step(sim01: torch.Tensor, real01: torch.Tensor) -> dict[str, float]:
        sim = (sim01 * 2 - 1).contiguous(memory_format=fmt)
        real = (real01 * 2 - 1).contiguous(memory_format=fmt)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        for p in d_params:  # toggle_optimizer(opt_g)
            p.requires_grad_(False)
        with autocast:
            losses, fake_real, fake_sim = model.generator_losses(sim, real)
            g_loss = model.generator_objective(losses)
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        for p in d_params:  # untoggle_optimizer(opt_g)
            p.requires_grad_(True)
        for p in g_params:  # toggle_optimizer(opt_d)
            p.requires_grad_(False)
        with autocast:
            d_loss = model.discriminator_loss(sim, real, fake_sim, fake_real)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        for p in g_params:  # untoggle_optimizer(opt_d)
            p.requires_grad_(True)
        return {"g_loss": float(g_loss.detach()), "d_loss": float(d_loss.detach())}

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


def reference_step(model: Any) -> Callable[[torch.Tensor, torch.Tensor], dict[str, float]]:
    """``step(sim01, real01)``: ``set_input`` + ``optimize_parameters()`` of the reference;
    gives its generator loss (``loss_G``, the same weighted sum as ours) and the sum of its
    two discriminator losses (``loss_D_A + loss_D_B``, each already halved as ours)."""
    paths = ["benchmark.png"]

    def step(sim01: torch.Tensor, real01: torch.Tensor) -> dict[str, float]:
        # Its datasets hand over images normalized to [-1, 1]; ours maps [0, 1] inside.
        model.set_input(
            {"A": sim01 * 2 - 1, "B": real01 * 2 - 1, "A_paths": paths, "B_paths": paths}
        )
        model.optimize_parameters()
        return {
            "g_loss": float(model.loss_G.detach()),
            "d_loss": float(model.loss_D_A.detach() + model.loss_D_B.detach()),
        }

    return step


def loss_curves(
    steps: dict[str, Callable[[torch.Tensor, torch.Tensor], dict[str, float]]],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    iters: int,
) -> dict[str, dict[str, list[float]]]:
    """``g_loss`` and ``d_loss`` of each step function over the same ``iters`` batches
    (``batches`` cycled), from freshly built models."""
    curves: dict[str, dict[str, list[float]]] = {}
    for name, step in steps.items():
        curve: dict[str, list[float]] = {"g_loss": [], "d_loss": []}
        for i in range(iters):
            for key, value in step(*batches[i % len(batches)]).items():
                curve[key].append(value)
        curves[name] = curve
    return curves


def trend_agreement(a: list[float], b: list[float], window: int = 5) -> dict[str, float]:
    """How two loss curves agree in trend: the Pearson correlation of their moving
    averages (``window`` iterations), and each curve's change from its first to its last
    ``window`` iterations (relative to the first)."""
    import numpy as np

    def smooth(x: list[float]) -> np.ndarray:
        return np.convolve(np.asarray(x, dtype=float), np.ones(window) / window, mode="valid")

    sa, sb = smooth(a), smooth(b)
    corr = float(np.corrcoef(sa, sb)[0, 1]) if len(sa) > 1 else float("nan")

    def change(x: np.ndarray) -> float:
        return float((x[-1] - x[0]) / abs(x[0])) if x[0] else float("nan")

    return {"correlation": corr, "change_a": change(sa), "change_b": change(sb)}


def smooth_images(n: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """``n`` image batches of smooth random colour fields in [0, 1] (noise at 1/8 of the
    size, upsampled): a target a generator can learn within 50 iterations, unlike white
    noise."""
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    out = []
    for _ in range(n):
        low = torch.rand(b, c, max(1, h // 8), max(1, w // 8), generator=gen)
        out.append(torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear"))
    return out


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
        f"  {name:22s} {s['median_s']:9.3f} {s['mean_s']:9.3f} {s['min_s']:9.3f} "
        f"{s['max_s']:9.3f} {s['images_per_s']:9.2f} {s.get('cpu_median_s', float('nan')):9.3f}"
    )


# --------------------------------------------------------------------------- main
def _form_name(form: str) -> str:
    return f"ours_{form}"


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
    ap.add_argument(
        "--forms",
        nargs="+",
        choices=list(FORMS),
        default=list(DEFAULT_FORMS),
        help="our training forms to time (the first is the base of each gain)",
    )
    ap.add_argument(
        "--curve-iters",
        type=int,
        default=0,
        help="also record both implementations' losses over this many iterations",
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
        steps = {}
        for form in args.forms:  # one model per form, all from the same initial weights
            steps[_form_name(form)] = our_trainer_free_step(build_ours(cfg), *FORMS[form])
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
            f"  {'impl':22s} {'median':>9s} {'mean':>9s} {'min':>9s} {'max':>9s} {'images/s':>9s}"
            f" {'cpu_s':>9s}"
        )
        for k, s in train.items():
            print(_row(k, s))
        if args.lightning:
            lt_wall, lt_cpu = time_lightning(cfg, sim01, real01, args.iters, args.warmup)
            lt = summarize(lt_wall, cfg["batch"], lt_cpu)
            train["ours_trainer"] = lt
            plain = train[_form_name(args.forms[0])]
            overhead = lt["median_s"] / plain["median_s"] - 1
            overhead_cpu = lt["cpu_median_s"] / plain["cpu_median_s"] - 1
            lt |= {"overhead_vs_plain": overhead, "cpu_overhead_vs_plain": overhead_cpu}
            print(
                _row("ours+pl", lt) + f"   (in pl.Trainer: {100 * overhead:+.1f}% wall, "
                f"{100 * overhead_cpu:+.1f}% CPU vs plain loop; not interleaved)"
            )
        base = "junyanz" if "junyanz" in train else _form_name(args.forms[0])
        speedups: dict[str, dict[str, float]] = {}
        previous = None
        for form in args.forms:  # each form against the reference, and each step's own gain
            name = _form_name(form)
            gain = {"vs_" + base: train[base]["median_s"] / train[name]["median_s"]}
            if previous is not None:
                gain["vs_" + previous] = train[previous]["median_s"] / train[name]["median_s"]
            speedups[name] = gain
            previous = name
            steps_gain = "  ".join(f"{v:.2f}x {k[3:]}" for k, v in gain.items())
            print(f"  speed-up {name:<22} {steps_gain}   (iterations/s, by median)")
        train["speedups"] = speedups
        out["training"] = train

        # --- loss curves: the fastest form against the reference; without one, the
        # fastest reduced-precision form against fp32
        fresh: dict[str, Callable[[torch.Tensor, torch.Tensor], dict[str, float]]] = {}
        if args.curve_iters:
            names = [_form_name(f) for f in args.forms]
            if reference is None:
                names = [n for n in names if n != "ours_fp32"]
            if names:
                fastest = min(names, key=lambda n: train[n]["median_s"])
                form = fastest.removeprefix("ours_")
                fresh[fastest] = our_trainer_free_step(build_ours(cfg), *FORMS[form])
            if reference is not None:
                with tempfile.TemporaryDirectory() as ckpt:
                    theirs, _ = build_reference(*reference, cfg, ckpt)
                fresh["junyanz"] = reference_step(theirs)
            elif fresh:
                fresh["ours_fp32"] = our_trainer_free_step(build_ours(cfg), *FORMS["fp32"])
            if len(fresh) < 2:
                print("loss curves: skipped (no reference and no reduced-precision form)")
        if args.curve_iters and len(fresh) == 2:
            shape = (cfg["batch"], 3, cfg["height"], cfg["width"])
            sims, reals = smooth_images(8, shape, 1), smooth_images(8, shape, 2)
            curves = loss_curves(fresh, list(zip(sims, reals, strict=True)), args.curve_iters)
            a, b = list(curves)
            print(f"loss curves over the same first {args.curve_iters} iterations: {a} vs {b}")
            print(f"  {'iter':>4s} {a + ' g':>14s} {b + ' g':>14s} {a + ' d':>14s} {b + ' d':>14s}")
            for i in sorted({*range(0, args.curve_iters, 10), args.curve_iters - 1}):
                print(
                    f"  {i:4d} {curves[a]['g_loss'][i]:14.3f} {curves[b]['g_loss'][i]:14.3f} "
                    f"{curves[a]['d_loss'][i]:14.3f} {curves[b]['d_loss'][i]:14.3f}"
                )
            trend = {
                key: trend_agreement(curves[a][key], curves[b][key]) for key in ("g_loss", "d_loss")
            }
            for key, t in trend.items():
                print(
                    f"  {key}: correlation of 5-iteration means {t['correlation']:.3f}; change "
                    f"first to last {100 * t['change_a']:+.0f} % ({a}) and "
                    f"{100 * t['change_b']:+.0f} % ({b})"
                )
            out["loss_curves"] = {"curves": curves, "trend": trend}

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
