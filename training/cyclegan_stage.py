"""Pixel-level adaptation in the run: train a CycleGAN, then translate the sim training set.

``adaptation=cyclegan`` (or ``cyclegan_dann``) runs, before the stages it adapts:

1. the frozen **sim segmenter**: the stage named by ``adaptation.cyclegan.segmenter``
   trained without adaptation (the same folder and MLflow run as ``adaptation=none``'s),
   used by the semantic guard and the CyCADA semantic loss;
2. the **cyclegan** stage: a :class:`~adaptation.cyclegan.CycleGAN` trained on the sim
   training images against unlabelled real ones, logged as its own MLflow run (every loss,
   image grids ``sim | translated | cycle | real`` with the guard's figure at intervals, the
   generator as a model artifact) and cached by a hash like every stage -- or, with
   ``adaptation.cyclegan.generator`` set, an earlier run's generator;
3. the **translation**: the semantic guard on held-out sim frames (refusing with
   :class:`~adaptation.cyclegan.translate.SemanticGuardError` before anything is written),
   then the sim training set written through the generator as a new dataset whose card
   names the generator run.

The adapted stages then read the translated dataset as their ``sim_train``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from simulation.configuration import ConfigError, instantiate_checked
from simulation.dataset import GeneratedDataset, atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

GENERATOR_FILE = "generator.pt"
KEY = "adaptation.cyclegan"


@dataclass
class GeneratorRun:
    """A trained sim->real generator: its weights file, MLflow run and figures."""

    run_dir: Path
    generator: Path
    run_id: str
    digest: str
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False


class SimToReal(nn.Module):
    """The sim->real generator as an image-to-image model in [0, 1].

    ``(B, 3, H, W)`` float in [0, 1] -> ``(B, 3, H, W)`` float in [0, 1]; what the MLflow
    model artifact and the translation run.
    """

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return ((self.generator(images01 * 2 - 1) + 1) / 2).clamp(0, 1)


# --------------------------------------------------------------------- generator files
def save_generator(module: Any, path: Path) -> None:
    """Write the sim->real generator with what checks it before use: architecture
    (``ngf``, ``blocks``), image channels and size (``[H, W]``), atomically."""
    import io

    hp = module.hparams
    payload = {
        "arch": module.g_sim2real.arch,
        "ngf": int(hp.g_ngf),
        "blocks": int(hp.g_blocks),
        "image_channels": int(module.image_channels or 3),
        "image_size": list(module.image_size) if module.image_size else None,
        "state_dict": {k: v.detach().cpu() for k, v in module.g_sim2real.state_dict().items()},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_generator(path: Path, image_size: tuple[int, int], key: str = KEY) -> SimToReal:
    """The generator saved by :func:`save_generator`, checked against the data's image
    size ``(H, W)`` and 3 channels before any frame is translated."""
    from adaptation.cyclegan import ResnetGenerator
    from training.models.weights import read_checkpoint

    ckpt = read_checkpoint(path, key)
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "ngf" not in ckpt:
        raise ConfigError(f"{key}: {path} is not a generator file written by save_generator")
    if ckpt.get("image_channels") != 3:
        raise ConfigError(
            f"{key}: {path} was trained on {ckpt.get('image_channels')}-channel images; the "
            "data are RGB (3 channels)"
        )
    trained = tuple(ckpt.get("image_size") or ())
    if trained != tuple(image_size):
        raise ConfigError(
            f"{key}: {path} was trained on {trained[0] if trained else '?'}x"
            f"{trained[1] if len(trained) > 1 else '?'} images, the data are "
            f"{image_size[0]}x{image_size[1]} (data.image); train a generator at this size"
        )
    generator = ResnetGenerator(ngf=int(ckpt["ngf"]), n_blocks=int(ckpt["blocks"]))
    generator.load_state_dict(ckpt["state_dict"])
    return SimToReal(generator).eval()


def resolve_generator(source: str, uri: str, download_dir: Path) -> tuple[Path, str]:
    """``adaptation.cyclegan.generator``: a generator file, or the MLflow run id of an
    earlier cyclegan stage. Returns ``(local file, run id or '')``; a missing file or run
    is a :class:`ConfigError` naming the key."""
    path = Path(source)
    if path.suffix in (".pt", ".ckpt") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{KEY}.generator: no generator file at {path}")
        return path, ""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        client.get_run(source)
    except MlflowException as exc:
        raise ConfigError(
            f"{KEY}.generator: no MLflow run {source!r} in the tracking store ({exc.message[:200]})"
        ) from None
    download_dir.mkdir(parents=True, exist_ok=True)
    try:
        local = client.download_artifacts(source, f"generator/{GENERATOR_FILE}", str(download_dir))
    except (MlflowException, OSError) as exc:
        raise ConfigError(
            f"{KEY}.generator: run {source!r} holds no generator/{GENERATOR_FILE} "
            f"(is it a cyclegan stage?): {exc}"
        ) from None
    return Path(local), source


# ------------------------------------------------------------------------------ data
def unlabeled_real(datasets: Mapping[str, Any]) -> Any:
    """The unlabelled real pool: ``real_unlabeled`` when configured (even if empty: that is
    an error for the caller to report), else the real training images."""
    pool = datasets.get("real_unlabeled")
    return datasets.get("real_train") if pool is None else pool


class UnpairedImages(torch.utils.data.Dataset):
    """Unpaired ``{"sim": (3, H, W), "real": (3, H, W)}`` pairs in [0, 1].

    Item ``i`` pairs sim frame ``i mod n_sim`` with real frame ``perm[i] mod n_real``
    (``perm`` fixed by ``seed``); the length is the larger set's, so an epoch sees every
    image of both.
    """

    def __init__(self, sim: Any, real: Any, seed: int = 0) -> None:
        if len(sim) == 0 or len(real) == 0:
            raise ValueError("CycleGAN needs sim and unlabelled real images; one set is empty")
        self.sim, self.real = sim, real
        self.length = max(len(sim), len(real))
        self.perm = np.random.default_rng([seed, 7]).permutation(self.length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "sim": self.sim[i % len(self.sim)]["image"],
            "real": self.real[int(self.perm[i]) % len(self.real)]["image"],
        }


# ----------------------------------------------------------------------- image grids
def translation_grid(
    sim: torch.Tensor, translated: torch.Tensor, cycle: torch.Tensor, real: torch.Tensor
) -> np.ndarray:
    """Rows of ``sim | translated | cycle reconstruction | real``.

    All inputs ``(N, 3, H, W)`` in [0, 1]; returns ``(N * H, 4 * W, 3) uint8``.
    """
    cols = [t.detach().float().clamp(0, 1).cpu() for t in (sim, translated, cycle, real)]
    grid = torch.cat([torch.cat(list(c), dim=1) for c in cols], dim=2)  # (3, N*H, 4*W)
    return grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def translation_monitor(
    sim: torch.Tensor,
    real: torch.Tensor,
    every: int,
    segmenter: nn.Module | None,
    class_names: list[str],
) -> Any:
    """A Lightning callback: every ``every`` batches (and after the last), the image grid of
    ``sim`` / ``real`` (``(N, 3, H, W)`` in [0, 1]) and the guard's label-corruption rate on
    them, logged to the CycleGAN's MLflow run."""
    import pytorch_lightning as pl

    from adaptation.cyclegan.module import STEPS_PER_BATCH
    from adaptation.cyclegan.translate import label_corruption

    class TranslationMonitor(pl.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, *_: Any) -> None:
            step = trainer.global_step // STEPS_PER_BATCH
            last = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
            if step % every and not last:
                return
            g, f = module.g_sim2real, module.g_real2sim
            was = g.training
            g.eval(), f.eval()
            with torch.no_grad():
                x = sim.to(module.device)
                fake = (g(x * 2 - 1) + 1) / 2
                cycle = (f(fake * 2 - 1) + 1) / 2
            g.train(was), f.train(was)
            logger = trainer.logger
            logger.experiment.log_image(
                logger.run_id,
                translation_grid(x, fake, cycle, real),
                artifact_file=f"translation/step_{step:06d}.png",
            )
            if segmenter is not None:
                stats = label_corruption(
                    segmenter.to(module.device), x, fake.clamp(0, 1), len(class_names)
                )
                logger.log_metrics(stats.metrics(class_names, prefix="cyclegan/guard_"), step=step)

    return TranslationMonitor()


# ---------------------------------------------------------------------------- stage
def cyclegan_digest(cfg: Any, segmenter_digest: str | None) -> str:
    """12 hex digits over what decides the generator: seed, data, image size, the CycleGAN
    settings and the segmenter behind the semantic loss."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg.adaptation.cyclegan, resolve=True)
    for k in ("stages", "guard", "translate_batch_size", "image_every"):
        node.pop(k, None)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    blob = {
        "seed": int(cfg.seed),
        "cyclegan": node,
        "image": data["image"],
        "sim": data["datasets"].get("sim_train"),
        "generate": data.get("generate"),
        "real": data["datasets"].get("real_unlabeled") or data["datasets"].get("real_train"),
        "segmenter": segmenter_digest if float(node["model"].get("lambda_semantic", 0)) else None,
        "precision": str(cfg.trainer.get("precision")),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_cyclegan(
    cfg: Any,
    datasets: Mapping[str, Any],
    segmenter: nn.Module | None,
    segmenter_digest: str | None,
    class_names: list[str],
    parent: Any = None,
) -> GeneratorRun:
    """Train (or resume, or reuse) the CycleGAN of ``adaptation.cyclegan``; see module doc.
    ``parent`` (a :class:`~training.pipeline.PipelineRun`) nests a new run under it."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from adaptation.cyclegan.module import STEPS_PER_BATCH
    from training import tracking
    from training.run import DONE, RUN_ID, stage_logger

    node = cfg.adaptation.cyclegan
    digest = cyclegan_digest(cfg, segmenter_digest)
    run_dir = Path(cfg.paths.output) / "runs" / f"cyclegan-{digest}"
    done = run_dir / DONE
    if done.exists():
        info = json.loads(done.read_text())
        log.info("cyclegan: finished earlier in %s, skipped", run_dir)
        if parent is not None:
            parent.reused(info["run_id"])
        return GeneratorRun(
            run_dir, Path(info["generator"]), info["run_id"], digest, info["metrics"], skipped=True
        )

    sim, real = datasets.get("sim_train"), unlabeled_real(datasets)
    if sim is None or real is None or len(real) == 0:
        raise ConfigError(
            "data.datasets.real_unlabeled: CycleGAN needs unlabelled real images "
            "(real_unlabeled, or real_train standing in for it); none found"
        )
    batches = int(node.max_batches)
    batch_size = int(node.batch_size)
    if batches < 1 or batch_size < 1:
        raise ConfigError(f"{KEY}: max_batches and batch_size must be >= 1")
    model = instantiate_checked(node.model, semantic_model=segmenter, seed=int(cfg.seed))
    loader = torch.utils.data.DataLoader(
        UnpairedImages(sim, real, seed=int(cfg.seed)),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=int(cfg.data.loader.get("num_workers", 0)),
        generator=torch.Generator().manual_seed(int(cfg.seed)),
    )
    n_show = min(4, len(sim), len(real))
    show_sim = sim if datasets.get("sim_val") is None else datasets["sim_val"]
    sample_sim = torch.stack([show_sim[i]["image"] for i in range(n_show)])
    sample_real = torch.stack([real[i]["image"] for i in range(n_show)])

    run_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking.tracking_uri(cfg.paths.output, cfg.tracking.uri)
    logger, run_id = stage_logger(
        cfg, "cyclegan", digest, run_dir, parent, tags={"adaptation": str(cfg.adaptation.method)}
    )
    if run_id is None:
        from omegaconf import OmegaConf

        params = tracking.flatten(
            {
                "seed": int(cfg.seed),
                "image": OmegaConf.to_container(cfg.data.image),
                "adaptation": tracking.redact(OmegaConf.to_container(cfg.adaptation, resolve=True)),
                "data": {"sim_train": len(sim), "real_unlabeled": len(real)},
            }
        )
        logger.log_hyperparams(params)
        (run_dir / RUN_ID).write_text(logger.run_id)
    run_id = logger.run_id

    ckpt_dir = run_dir / "checkpoints"
    every = max(1, int(node.image_every))
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=every * STEPS_PER_BATCH
    )
    monitor = translation_monitor(sample_sim, sample_real, every, segmenter, class_names)
    make_trainer = instantiate_checked(cfg.trainer, _partial_=True)
    trainer = make_trainer(
        max_steps=batches * STEPS_PER_BATCH,
        max_epochs=-1,
        logger=logger,
        callbacks=[checkpoint, monitor],
        default_root_dir=str(run_dir),
        enable_progress_bar=bool(cfg.progress),
        use_distributed_sampler=False,
        log_every_n_steps=min(10, batches),
    )
    last = ckpt_dir / "last.ckpt"
    started = time.perf_counter()
    # Lightning warns that a mid-fit checkpoint holds the state after the optimizer steps:
    # that is the state a resumed fit continues from, as wanted
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    try:
        trainer.fit(
            model,
            train_dataloaders=loader,
            ckpt_path=str(last) if last.exists() else None,
            weights_only=True,
        )
    except BaseException:
        logger.experiment.set_tag(run_id, "status", "failed")
        logger.finalize("failed")
        raise
    seconds = time.perf_counter() - started
    generator = run_dir / GENERATOR_FILE
    save_generator(model, generator)
    metrics = {"cyclegan/seconds": seconds, "cyclegan/batches_per_s": batches / max(seconds, 1e-9)}
    logger.log_metrics(metrics, step=batches)
    if trainer.is_global_zero:
        client = logger.experiment
        client.log_artifact(run_id, str(generator), artifact_path="generator")
        if cfg.log_model:
            h, w = int(cfg.data.image.height), int(cfg.data.image.width)
            translator = load_generator(generator, (h, w))
            tracking.log_model(run_id, translator, h, w, uri=uri, name="generator_model")
        atomic_write_json(done, {"generator": str(generator), "run_id": run_id, "metrics": metrics})
    logger.finalize("success")
    return GeneratorRun(run_dir, generator, run_id, digest, metrics)


def translate_sim(
    cfg: Any,
    datasets: Mapping[str, Any],
    generator: Path,
    generator_run: str,
    segmenter: nn.Module | None,
    class_names: list[str],
) -> tuple[GeneratedDataset, dict[str, float]]:
    """The semantic guard, then ``sim_train`` translated into a new dataset (cached).

    The translated dataset lives in ``<paths.data>/translated/<sim name>-<generator
    sha256[:12]>``; when it is complete already, nothing is recomputed and the guard's
    figures come from its card. Otherwise the guard runs on up to ``guard.frames``
    held-out sim frames (``sim_val``, else the first training frames) and refuses a
    corrupting generator before any shard is written. Returns the dataset and its
    ``guard/*`` and ``translate/*`` figures.
    """
    from adaptation.cyclegan.translate import GuardLimits, measure_corruption, translate_dataset

    node = cfg.adaptation.cyclegan
    image = (int(cfg.data.image.height), int(cfg.data.image.width))
    source = datasets.get("sim_train")
    if not isinstance(source, GeneratedDataset):
        raise ConfigError(
            "data.datasets.sim_train: translation writes a generated dataset and needs a "
            f"generated sim dataset, got {type(source).__name__}"
        )
    if tuple(source.image_size) != image:
        raise ConfigError(
            f"data.image: {image[0]}x{image[1]}, but {source.root} holds "
            f"{source.image_size[0]}x{source.image_size[1]} frames"
        )
    translator = load_generator(generator, image)  # checks size and channels first
    gen_sha = hashlib.sha256(generator.read_bytes()).hexdigest()
    root = Path(cfg.paths.data) / "translated" / f"{source.name}-{gen_sha[:12]}"
    if (root / "card.json").exists():
        dataset = GeneratedDataset(root, expected_taxonomy_hash=source.card.get("taxonomy_hash"))
        log.info("translated dataset %s: complete, reused", root)
        return dataset, dict(dataset.card.get("guard") or {})

    guard_cfg = node.guard
    try:
        limits = GuardLimits(
            float(guard_cfg.max_corruption),
            float(guard_cfg.max_class_corruption),
            float(guard_cfg.min_class_share),
        )
    except ValueError as exc:
        raise ConfigError(f"{KEY}.{exc}") from None
    batch = int(node.translate_batch_size)
    figures: dict[str, float] = {}
    if segmenter is not None:
        held_out = source if datasets.get("sim_val") is None else datasets["sim_val"]
        n = min(int(guard_cfg.frames), len(held_out))
        stats = measure_corruption(
            translator, segmenter, held_out, list(range(n)), len(class_names), batch
        )
        figures.update(stats.metrics(class_names, prefix="guard/"))
        log.info(
            "semantic guard: %.1f%% of pixels change class on %d held-out frames",
            100 * stats.overall,
            stats.frames,
        )
        limits.check(stats, class_names, f"the generator {generator}")

    provenance = {"generator_run": generator_run, "generator_sha256": gen_sha}
    started = time.perf_counter()
    result = translate_dataset(
        translator, source, root, provenance, batch_size=batch, card_extra={"guard": figures}
    )
    seconds = time.perf_counter() - started
    if result.written_frames:
        figures["translate/images_per_s"] = result.written_frames / max(seconds, 1e-9)
        log.info(
            "translated %d frames of %s -> %s at %.1f images/s",
            result.written_frames,
            source.root,
            root,
            figures["translate/images_per_s"],
        )
    return result.dataset, figures
