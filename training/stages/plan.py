"""What a run will train, and under which names, from its config alone.

:func:`make_plan` builds the adaptation components of ``cfg.adaptation`` (every node with
a ``_target_``), checks that each implements one plug-in interface and lists only stages
of the experiment, and names every stage by :func:`core.hashing.stage_key`. Nothing is
trained or read from disk, so ``training/compare.py`` finds the runs of a sweep's stages,
CycleGAN-adapted ones included, by the same names the run gave them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adaptation.plugin import PixelAdaptation, RunValues, TaskAdaptation
from core.config import ConfigError, instantiate_checked, plain
from core.hashing import stage_key
from training.stages.specs import StageSpec, check_run_values, stage_specs, world_size

#: Config sections that decide a segmentation stage's result (besides the stage itself).
RESULT_KEYS = ("seed", "data", "model", "optimizer", "loss", "warmup_fraction", "taxonomy")
#: Trainer settings that change the result (devices change it through the world size).
TRAINER_KEYS = (
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "sync_batchnorm",
    "max_steps",
    "limit_train_batches",
)


@dataclass(frozen=True)
class Component:
    """An adaptation component: its key under ``adaptation``, its config (plain, for the
    stage hash), the stages it adapts and the built plug-in object."""

    name: str
    node: Mapping[str, Any]
    stages: tuple[str, ...]
    plugin: PixelAdaptation | TaskAdaptation

    @property
    def key(self) -> str:
        return f"adaptation.{self.name}"


@dataclass
class Plan:
    """The stages of a run in order with their hashes, and the components adapting them."""

    stages: list[StageSpec]
    digests: dict[str, str]
    parents: dict[str, str | None]
    pixel: list[Component]
    task: list[Component]
    run: RunValues
    #: stage -> {pixel component: the key of the datasets it gives that stage}
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    #: ``trainer.precision`` as configured (``auto``) before it was resolved in place
    precision_requested: str = ""

    def objectives_for(self, stage: str) -> list[Component]:
        return [c for c in self.task if stage in c.stages]


def _file_key(init: str | None) -> str | None:
    """A checkpoint file a stage starts from, named by its content (a file replaced under
    the same path is another start)."""
    if not init:
        return None
    from core.hashing import file_sha256

    return "file:" + file_sha256(init)[:16]


def load_components(adaptation: Any, stage_names: list[str]) -> list[Component]:
    """Every ``adaptation.<name>`` node with a ``_target_``, built and checked: it must
    implement :class:`~adaptation.plugin.PixelAdaptation` or
    :class:`~adaptation.plugin.TaskAdaptation` and list only stages of this experiment."""
    components = []
    for name, node in (adaptation or {}).items():
        if not hasattr(node, "get") or "_target_" not in node:
            continue
        key = f"adaptation.{name}"
        stages = list(node.get("stages") or [])
        for stage in stages:
            if stage not in stage_names:
                raise ConfigError(
                    f"{key}.stages: '{stage}' is not a stage of this experiment ({stage_names})"
                )
        try:
            plugin = instantiate_checked(node)
        except ConfigError:
            raise
        except Exception as exc:  # Hydra wraps the target's own error: show that one
            cause = exc.__cause__ or exc
            raise ConfigError(
                f"{key}._target_: cannot build '{node._target_}': {type(cause).__name__}: {cause}"
            ) from None
        if not isinstance(plugin, PixelAdaptation | TaskAdaptation):
            raise ConfigError(
                f"{key}._target_: '{node._target_}' is not an adaptation plug-in; expected a "
                "subclass of adaptation.plugin.PixelAdaptation (datasets -> datasets) or "
                "adaptation.plugin.TaskAdaptation (a loss term)"
            )
        settings = plain(node)
        settings.pop("stages", None)
        components.append(Component(name, settings, tuple(stages), plugin))
    return components


def data_identity(data: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies the data of a run: ``data`` without worker counts (they change
    speed, not results)."""
    blob = dict(plain(data))
    loader = dict(blob.get("loader") or {})
    loader.pop("num_workers", None)
    blob["loader"] = loader
    return blob


def plain_stage_key(cfg: Any, spec: StageSpec, parent: str | None) -> str:
    """The hash of a stage trained without adaptation."""
    return _stage_key(cfg, spec, parent, {}, {})


def _stage_key(
    cfg: Any,
    spec: StageSpec,
    parent: str | None,
    objectives: Mapping[str, Any],
    inputs: Mapping[str, str],
) -> str:
    blob = {k: plain(cfg.get(k)) for k in RESULT_KEYS}
    # T-10 screening decides which frames a stage trains on
    risk = cfg.get("risk") or {}
    blob["screening"] = bool(risk.get("enabled") and risk.get("screening"))
    data = data_identity(cfg.data)
    # a sim-only stage without adaptation never reads the real training split: a retrain
    # on new real data reuses it
    if spec.sim_ratio >= 1.0 and not objectives and not inputs:
        datasets = dict(data.get("datasets") or {})
        datasets.pop("real_train", None)
        datasets.pop("real_unlabeled", None)
        data["datasets"] = datasets
    trainer = plain(cfg.trainer)
    return stage_key(
        sections={**blob, "data": data},
        stage=plain(cfg.stages[spec.name]),
        trainer={k: v for k, v in trainer.items() if k in TRAINER_KEYS},
        world_size=world_size(cfg.trainer),
        objectives=dict(objectives),
        inputs=dict(inputs),
        parent=parent,
    )


def run_values(cfg: Any, specs: list[StageSpec], class_names: tuple[str, ...]) -> RunValues:
    by_name = {s.name: s for s in specs}
    plain_keys: dict[str, str] = {}

    def key_of(name: str) -> str:
        if name not in plain_keys:
            spec = by_name[name]
            parent = key_of(spec.init) if spec.init in by_name else _file_key(spec.init)
            plain_keys[name] = plain_stage_key(cfg, spec, parent)
        return plain_keys[name]

    return RunValues(
        seed=int(cfg.seed),
        image_size=(int(cfg.data.image.height), int(cfg.data.image.width)),
        class_names=tuple(class_names),
        data=data_identity(cfg.data),
        precision=str(cfg.trainer.get("precision")),
        stage_key=key_of,
        stage_names=tuple(by_name),
    )


def make_plan(cfg: Any, class_names: tuple[str, ...]) -> Plan:
    """The run's stages, components and stage hashes; every check before any work."""
    specs = stage_specs(cfg.get("stages"), cfg.get("retries"))
    check_run_values(cfg.get("seed"), cfg.data.loader)
    names = [s.name for s in specs]
    components = load_components(cfg.get("adaptation"), names)
    pixel = [c for c in components if isinstance(c.plugin, PixelAdaptation)]
    task = [c for c in components if isinstance(c.plugin, TaskAdaptation)]
    run = run_values(cfg, specs, class_names)
    digests: dict[str, str] = {}
    parents: dict[str, str | None] = {}
    inputs: dict[str, dict[str, str]] = {}
    pixel_keys = {c.name: c.plugin.key(run) for c in pixel}
    for spec in specs:
        parent = digests.get(spec.init) if spec.init in digests else _file_key(spec.init)
        objectives = {c.name: c.node for c in task if spec.name in c.stages}
        used = {c.name: pixel_keys[c.name] for c in pixel if spec.name in c.stages}
        inputs[spec.name] = used
        parents[spec.name] = parent
        digests[spec.name] = _stage_key(cfg, spec, parent, objectives, used)
    return Plan(specs, digests, parents, pixel, task, run, inputs)
