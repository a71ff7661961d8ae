"""CycleGAN pixel-level adaptation as a plug-in: train a CycleGAN, translate the sim set.

``adaptation=cyclegan`` (or ``cyclegan_dann``) builds :class:`CycleGANTranslation`, a
:class:`~adaptation.plugin.PixelAdaptation`. Before the stages it adapts, its
:meth:`~CycleGANTranslation.prepare` runs, through the run's stage store:

1. the frozen **sim segmenter**: the stage named by ``segmenter`` trained without
   adaptation (the same folder and MLflow run as ``adaptation=none``'s), used by the
   semantic guard and the CyCADA semantic loss;
2. the **cyclegan** stage: a :class:`~adaptation.cyclegan.CycleGAN` trained on the sim
   training images against unlabelled real ones, logged as its own MLflow run (every loss,
   image grids ``sim | translated | cycle | real`` with the guard's figure at intervals, the
   generator as a model artifact), named by :func:`core.hashing.generator_key` -- or, with
   ``generator`` set, an earlier run's generator;
3. the **translation**: the semantic guard on held-out sim frames (refusing with
   :class:`~adaptation.cyclegan.translate.SemanticGuardError` before anything is written),
   then the sim training set written through the generator as a new dataset in
   ``<paths.data>/translated/<sim name>-<translation key>``, named by generator, source
   and guard settings (:func:`core.hashing.translation_key`): a changed guard reruns the
   guard and the translation, never the CycleGAN training.

The adapted stages then read the translated dataset as their ``sim_train``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adaptation.plugin import PixelAdaptation, Prepared, PrepareEnv, RunValues
from core.config import ConfigError, check_number
from core.files import atomic_write_bytes
from core.hashing import file_sha256, generator_key, translation_key
from core.images import label_columns
from core.seeding import seeded
from simulation.dataset import GeneratedDataset

log = logging.getLogger(__name__)

GENERATOR_FILE = "generator.pt"
KEY = "adaptation.cyclegan"


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
    from core.weights import read_checkpoint

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


class StepSampler(torch.utils.data.Sampler[int]):
    """An endless index stream: epoch ``e`` is a permutation of ``range(length)`` drawn
    from ``(seed, e)``, and the stream starts ``start()`` indices in (read each time it is
    iterated). A fit resumed after ``k`` batches of ``b`` images, with ``start`` giving
    ``k * b``, sees exactly the images an uninterrupted fit would have, whatever Lightning
    does with the epoch it restarts."""

    def __init__(self, length: int, seed: int, start: Callable[[], int] = lambda: 0) -> None:
        if length < 1:
            raise ValueError("StepSampler: length must be >= 1")
        self.length, self.seed, self.start = int(length), int(seed), start

    def __iter__(self):
        epoch, offset = divmod(int(self.start()), self.length)
        while True:
            order = torch.randperm(
                self.length, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            )
            yield from (int(i) for i in order[offset:])
            epoch, offset = epoch + 1, 0


def batches_done(checkpoint: Path) -> int:
    """Training batches behind a CycleGAN checkpoint (0 when there is none)."""
    from adaptation.cyclegan.module import STEPS_PER_BATCH

    if not checkpoint.exists():
        return 0
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return int(state.get("global_step", 0)) // STEPS_PER_BATCH


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
#: The column captions of the logged translation grid (core.images.label_columns).
TRANSLATION_COLUMNS = ("sim", "translated", "reconstructed", "real")


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
                label_columns(translation_grid(x, fake, cycle, real), TRANSLATION_COLUMNS),
                artifact_file=f"translation/step_{step:06d}.png",
            )
            if segmenter is not None:
                stats = label_corruption(
                    segmenter.to(module.device), x, fake.clamp(0, 1), len(class_names)
                )
                logger.log_metrics(stats.metrics(class_names, prefix="cyclegan/guard_"), step=step)

    return TranslationMonitor()


# ------------------------------------------------------------------------ the plug-in
class CycleGANTranslation(PixelAdaptation):
    """CycleGAN translation of the sim training set (module doc), as a plug-in.

    Args:
        stages: the stages that read the translated sim training set.
        model: the :class:`~adaptation.cyclegan.CycleGAN` node (``_target_`` and its
            arguments; the semantic model and the seed are given here).
        segmenter: the frozen sim segmenter: a stage of the experiment, a checkpoint
            file, or None (no guard, no semantic loss).
        generator: None to train one here; or an earlier cyclegan run's MLflow run id, or
            a ``generator.pt`` file: translate with it, no training.
        batch_size: unpaired images of each domain per training batch.
        max_batches: training batches (one generator and one discriminator step each).
        image_every: interval of the image grid and guard figure, in batches.
        translate_batch_size: images per translation batch.
        guard: ``frames``, ``max_corruption``, ``max_class_corruption``,
            ``min_class_pixels`` (:class:`~adaptation.cyclegan.translate.GuardLimits`).
        compile: ``torch.compile`` the four networks in place before training (a speed
            setting: not part of the generator's identity; README, "Performance").
        key: where this component sits in the config, for messages.
    """

    def __init__(
        self,
        stages: Any,
        model: Mapping[str, Any],
        segmenter: str | None = "source_only",
        generator: str | None = None,
        batch_size: int = 4,
        max_batches: int = 500,
        image_every: int = 100,
        translate_batch_size: int = 16,
        guard: Mapping[str, Any] | None = None,
        compile: bool = False,
        key: str = KEY,
    ) -> None:
        from omegaconf import OmegaConf

        from adaptation.cyclegan.translate import GuardLimits

        self.stages = list(stages)
        self.config_key = key
        self.model = (
            OmegaConf.to_container(model, resolve=True)
            if OmegaConf.is_config(model)
            else dict(model)
        )
        self.segmenter = str(segmenter) if segmenter else None
        self.generator = str(generator) if generator else None
        self.batch_size = check_number(f"{key}.batch_size", batch_size, low=1, integer=True)
        self.max_batches = check_number(f"{key}.max_batches", max_batches, low=1, integer=True)
        self.image_every = check_number(f"{key}.image_every", image_every, low=1, integer=True)
        self.translate_batch_size = check_number(
            f"{key}.translate_batch_size", translate_batch_size, low=1, integer=True
        )
        guard = dict(
            OmegaConf.to_container(guard, resolve=True)
            if OmegaConf.is_config(guard)
            else guard or {}
        )
        self.guard_frames = check_number(
            f"{key}.guard.frames", guard.pop("frames", 64), low=1, integer=True
        )
        limits = {}
        for name, value in guard.items():
            if name not in GuardLimits.__dataclass_fields__:
                known = ["frames", *GuardLimits.__dataclass_fields__]
                raise ConfigError(f"{key}.guard.{name}: unknown key, expected one of {known}")
            if name == "min_class_pixels":
                limits[name] = check_number(f"{key}.guard.{name}", value, low=0, integer=True)
            else:
                limits[name] = float(check_number(f"{key}.guard.{name}", value, low=0, high=1))
        self.limits = GuardLimits(**limits)
        if not isinstance(compile, bool):
            raise ConfigError(f"{key}.compile: expected true or false, got {compile!r}")
        self.compile = compile
        self._given: tuple[Path, str] | None = None  # the resolved ``generator``

    # -------------------------------------------------------------- identities
    def _generator_identity(self, run: RunValues) -> str:
        if self.generator:  # an earlier generator: its file's digest, or its run
            path = Path(self.generator)
            if path.is_file():
                return "file:" + file_sha256(path)[:16]
            return "run:" + self.generator
        datasets = run.data.get("datasets") or {}
        uses_segmenter = float(self.model.get("lambda_semantic", 0) or 0) > 0
        return generator_key(
            seed=run.seed,
            settings={
                "model": self.model,
                "batch_size": self.batch_size,
                "max_batches": self.max_batches,
            },
            image_size=run.image_size,
            data={
                "sim": datasets.get("sim_train"),
                "generate": run.data.get("generate"),
                "real": datasets.get("real_unlabeled") or datasets.get("real_train"),
            },
            segmenter=self._segmenter_identity(run) if uses_segmenter else None,
            precision=run.precision,
        )

    def _segmenter_identity(self, run: RunValues) -> str | None:
        if not self.segmenter:
            return None
        if self.segmenter in run.stage_names:
            return run.stage_key(self.segmenter)
        path = Path(self.segmenter)
        return file_sha256(path)[:12] if path.is_file() else self.segmenter

    def key(self, run: RunValues) -> str:
        datasets = run.data.get("datasets") or {}
        return translation_key(
            generator=self._generator_identity(run),
            source={"sim": datasets.get("sim_train"), "generate": run.data.get("generate")},
            guard={
                "segmenter": self._segmenter_identity(run),
                "frames": self.guard_frames,
                "max_corruption": self.limits.max_corruption,
                "max_class_corruption": self.limits.max_class_corruption,
                "min_class_pixels": self.limits.min_class_pixels,
            },
        )

    # ------------------------------------------------------------------ checks
    def check(self, run: RunValues, env: PrepareEnv, datasets: Mapping[str, Any] | None) -> None:
        """Before any data is made: the segmenter, and a given generator (found, and
        trained at this image size). With the datasets: the source set and the
        unlabelled real images."""
        key = self.config_key
        if datasets is None:
            if self.segmenter:
                env.check_segmenter(self.segmenter, f"{key}.segmenter")
            if self.generator:
                path, run_id = resolve_generator(
                    self.generator, env.tracking_uri, env.output_dir / "generators"
                )
                load_generator(path, run.image_size, key=key)
                self._given = (path, run_id)
            return
        source = datasets.get("sim_train")
        if not isinstance(source, GeneratedDataset):
            raise ConfigError(
                "data.datasets.sim_train: translation writes a generated dataset and needs a "
                f"generated sim dataset, got {type(source).__name__}"
            )
        if tuple(source.image_size) != tuple(run.image_size):
            h, w = run.image_size
            raise ConfigError(
                f"data.image: {h}x{w}, but {source.root} holds "
                f"{source.image_size[0]}x{source.image_size[1]} frames"
            )
        done = env.data_dir / "translated" / f"{source.name}-{self.key(run)}" / "card.json"
        if env.world_size > 1 and not done.exists():
            raise ConfigError(
                f"{key}: the CycleGAN and the translation run in one process, and this "
                f"translated sim set is not made yet (world size {env.world_size}); run the "
                "command once without DDP (trainer=cpu or trainer=gpu), then with it: the "
                "DDP run reuses the translated set"
            )
        real = unlabeled_real(datasets)
        if self.generator is None and (real is None or len(real) == 0):
            raise ConfigError(
                "data.datasets.real_unlabeled: CycleGAN needs unlabelled real images "
                "(real_unlabeled, or real_train standing in for it); none found"
            )

    # ------------------------------------------------------------------- work
    def prepare(self, run: RunValues, env: PrepareEnv, datasets: Mapping[str, Any]) -> Prepared:
        segmenter, _ = (None, None)
        if self.segmenter:
            segmenter, _ = env.segmenter(self.segmenter, f"{self.config_key}.segmenter")
        trained_now = False
        if self._given is not None:
            generator, generator_run = self._given
        else:
            with env.lock(f"cyclegan-{self._generator_identity(run)}", "the CycleGAN"):
                record = self._train(run, env, datasets, segmenter)
            generator, generator_run = Path(record.values["generator"]), record.run_id
            trained_now = not record.skipped
        key = self.key(run)
        with env.lock(f"translation-{key}", "the translation", data=True):
            translated, figures = self._translate(
                run, env, datasets, generator, generator_run, segmenter, key
            )
        if trained_now and "translate/images_per_s" in figures:  # computed just now
            env.log_metrics(generator_run, figures)
        return Prepared({"sim_train": translated}, key, figures, {})

    def _train(
        self,
        run: RunValues,
        env: PrepareEnv,
        datasets: Mapping[str, Any],
        segmenter: nn.Module | None,
    ) -> Any:
        """Train (or resume, or reuse) the CycleGAN through the stage store."""
        from hydra.utils import instantiate
        from pytorch_lightning.callbacks import ModelCheckpoint

        from adaptation.cyclegan.module import STEPS_PER_BATCH

        digest = self._generator_identity(run)
        record = env.finished("cyclegan", digest)
        if record is not None:
            return record
        sim, real = datasets["sim_train"], unlabeled_real(datasets)
        with seeded(run.seed):  # the same seed, the same initial weights
            model = instantiate(self.model, semantic_model=segmenter, seed=run.seed)
        if self.compile:
            model.compile_networks()
        n_show = min(4, len(sim), len(real))
        show_sim = sim if datasets.get("sim_val") is None else datasets["sim_val"]
        sample_sim = torch.stack([show_sim[i]["image"] for i in range(n_show)])
        sample_real = torch.stack([real[i]["image"] for i in range(n_show)])
        with env.open("cyclegan", digest) as stage:
            pairs = UnpairedImages(sim, real, seed=run.seed)
            size = self.batch_size

            def resumed_from() -> Path:  # the store's choice: last.ckpt or a newer SLURM one
                return stage.resume_checkpoint() or stage.checkpoint_dir / "last.ckpt"

            loader = torch.utils.data.DataLoader(
                pairs,
                batch_size=size,
                # from the batch the last checkpoint ends at, on resume and on every retry
                sampler=StepSampler(
                    len(pairs), run.seed, start=lambda: batches_done(resumed_from()) * size
                ),
                drop_last=True,
                num_workers=env.num_workers,
            )
            if stage.fresh:
                stage.log_params(
                    {
                        "seed": run.seed,
                        "image": {"height": run.image_size[0], "width": run.image_size[1]},
                        "adaptation": {"cyclegan": self._settings()},
                        "data": {"sim_train": len(sim), "real_unlabeled": len(real)},
                    }
                )
            every = self.image_every
            checkpoint = ModelCheckpoint(
                dirpath=stage.checkpoint_dir,
                save_last=True,
                save_top_k=0,
                every_n_train_steps=every * STEPS_PER_BATCH,
            )
            monitor = translation_monitor(
                sample_sim, sample_real, every, segmenter, list(run.class_names)
            )
            started = time.perf_counter()
            with warnings.catch_warnings(), seeded(run.seed):
                # Lightning warns that a mid-fit checkpoint holds the state after the
                # optimizer steps: that is the state a resumed fit continues from
                warnings.filterwarnings(
                    "ignore", message="Using ModelCheckpoint with manual optimization"
                )
                trainer = stage.fit(
                    model,
                    callbacks=[checkpoint, monitor],
                    train_dataloaders=loader,
                    max_steps=self.max_batches * STEPS_PER_BATCH,
                    max_epochs=-1,
                    log_every_n_steps=min(10, self.max_batches),
                )
            seconds = time.perf_counter() - started
            generator = stage.run_dir / GENERATOR_FILE
            save_generator(model, generator)
            metrics = {
                "cyclegan/seconds": seconds,
                "cyclegan/batches_per_s": self.max_batches / max(seconds, 1e-9),
            }
            stage.logger.log_metrics(metrics, step=self.max_batches)
            if trainer.is_global_zero:
                stage.log_artifact(generator, artifact_path="generator")
                if env.log_model:
                    translator = load_generator(generator, run.image_size)
                    env.export_model(stage.run_id, translator, "generator_model")
            return stage.finish({"generator": str(generator), "metrics": metrics})

    def _settings(self) -> dict[str, Any]:
        return {
            "stages": self.stages,
            "segmenter": self.segmenter,
            "generator": self.generator,
            "model": self.model,
            "batch_size": self.batch_size,
            "max_batches": self.max_batches,
            "image_every": self.image_every,
            "translate_batch_size": self.translate_batch_size,
            "guard": {"frames": self.guard_frames, **vars(self.limits)},
            "compile": self.compile,
        }

    def _translate(
        self,
        run: RunValues,
        env: PrepareEnv,
        datasets: Mapping[str, Any],
        generator: Path,
        generator_run: str,
        segmenter: nn.Module | None,
        key: str,
    ) -> tuple[GeneratedDataset, dict[str, float]]:
        """The semantic guard, then ``sim_train`` translated into a new dataset (cached).

        When the dataset of this key is complete already, nothing is recomputed and the
        guard's figures come from its card. Otherwise the guard runs on up to
        ``guard.frames`` held-out sim frames (``sim_val``, else the first training
        frames) and refuses a corrupting generator before any shard is written.
        """
        from adaptation.cyclegan.translate import measure_corruption, translate_dataset

        source = datasets["sim_train"]
        translator = load_generator(generator, run.image_size, key=self.config_key)
        if segmenter is not None:  # training may have left it on the GPU; translate on CPU
            segmenter = segmenter.cpu()
        root = env.data_dir / "translated" / f"{source.name}-{key}"
        if (root / "card.json").exists():
            dataset = GeneratedDataset(
                root, expected_taxonomy_hash=source.card.get("taxonomy_hash")
            )
            log.info("translated dataset %s: complete, reused", root)
            return dataset, dict(dataset.card.get("guard") or {})
        classes = list(run.class_names)
        batch = self.translate_batch_size
        figures: dict[str, float] = {}
        if segmenter is not None:
            held_out = source if datasets.get("sim_val") is None else datasets["sim_val"]
            n = min(self.guard_frames, len(held_out))
            stats = measure_corruption(
                translator, segmenter, held_out, list(range(n)), len(classes), batch
            )
            figures.update(stats.metrics(classes, prefix="guard/"))
            log.info(
                "semantic guard: %.1f%% of pixels change class on %d held-out frames",
                100 * stats.overall,
                stats.frames,
            )
            self.limits.check(stats, classes, f"the generator {generator}")
        provenance = {"generator_run": generator_run, "generator_sha256": file_sha256(generator)}
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
