"""Every option of every config group composes, and every ``_target_`` node in it builds.

Each option is composed the way the project uses it (``train`` or ``generate``, under the
package the defaults lists give it). Then every ``_target_`` node of the composed config:

* imports, and its keys bind to the target's signature together with the arguments the
  code passes at run time -- a misspelt key or a moved class fails here, not an hour into a
  run. This is all that is checked of nodes that need files, servers or devices: datasets
  that read folders, the CARLA backend, GPU and DDP trainers;
* is built, where that needs nothing outside the process (:data:`BUILD`): the model, the
  taxonomy, the augmentation, the optimizer (``_partial_``, then given the model's
  parameters), a single-process CPU trainer, the adaptation plug-ins (their run-time
  inputs come later, through their methods), the discriminator and the CycleGAN they
  build, the randomization sampler and the procedural backend.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from tests.conftest import CONFIGS, compose_config

#: How each group folder under configs/ is used: (primary config, override template).
#: ``stage`` is composed under a package of its own (``/stage@stages.<name>`` in the
#: experiments), after experiment=source_only, the stage that ``finetune`` starts from.
GROUPS: dict[str, tuple[str, str]] = {
    "taxonomy": ("train", "taxonomy={}"),
    "data": ("train", "data={}"),
    "model": ("train", "model={}"),
    "trainer": ("train", "trainer={}"),
    "adaptation": ("train", "adaptation={}"),
    "experiment": ("train", "experiment={}"),
    "stage": ("train", "experiment=source_only,+stage@stages.probe_{0}={0}"),
    "backend": ("generate", "backend={}"),
    "randomization": ("generate", "randomization={}"),
}
#: Folders of configs/ that are not groups of a primary config: Hydra's own (launchers),
#: the Optuna search (tests/test_sweeps.py), and the risk register and alert rules, files
#: that training/risk/ loads itself (``risk.register: null``; tests/test_risk_register.py,
#: tests/test_alerts.py).
NOT_GROUPS = {"hydra", "hparams_search", "risk"}

#: groups whose option is one ``_target_`` node at the group's own key
SINGLE_NODE = {"taxonomy", "model", "trainer", "backend", "randomization"}


def options() -> Iterator[Any]:
    for group, (primary, template) in GROUPS.items():
        for path in sorted((CONFIGS / group).glob("*.yaml")):
            overrides = template.format(path.stem).split(",")
            yield pytest.param(group, primary, overrides, id=f"{group}={path.stem}")


class BindError(AssertionError):
    """A node's keys do not fit its target's signature."""


def _none(built: Built) -> dict[str, Any]:
    return {}


def _no_args(built: Built) -> tuple[Any, ...]:
    return ()


def _always(node: dict[str, Any]) -> bool:
    return True


@dataclass(frozen=True)
class Rule:
    """How a node is built: ``kwargs(built)`` are the run-time arguments the code adds
    (bound to the signature in every case, passed when built); ``args(built)`` what the
    object of a ``_partial_`` node is called with; ``build(node)`` whether to build it
    here at all; ``check(obj)`` looks at what was built."""

    kwargs: Callable[[Built], dict[str, Any]] = _none
    args: Callable[[Built], tuple[Any, ...]] = _no_args
    build: Callable[[dict[str, Any]], bool] = _always
    check: Callable[[Any], None] | None = None


@dataclass
class Built:
    """The composed config and the objects built from it so far, by path: the run-time
    arguments of later nodes (the model's feature width, the randomizer)."""

    cfg: Any
    tmp_path: Any
    objects: dict[str, Any] = field(default_factory=dict)

    def get(self, path: str) -> Any:
        if path not in self.objects:
            rule = rule_for(path) or Rule()
            # objects go in after instantiation (as in training/ and simulation/): Hydra
            # would try to turn them into config nodes
            factory = instantiate(OmegaConf.select(self.cfg, path), _partial_=True)
            obj = factory(*rule.args(self), **rule.kwargs(self))
            if rule.check is not None:
                rule.check(obj)
            self.objects[path] = obj
        return self.objects[path]

    @property
    def taxonomy(self) -> Any:
        return self.get("taxonomy")

    @property
    def model(self) -> Any:
        return self.get("model")


def image(built: Built) -> tuple[int, int]:
    node = OmegaConf.select(built.cfg, "image") or OmegaConf.select(built.cfg, "data.image")
    return int(node.height), int(node.width)


def trainer_kwargs(built: Built) -> dict[str, Any]:
    """What training/ passes to the trainer factory on top of the config's keys."""
    return {
        "max_epochs": 1,
        "logger": False,
        "callbacks": [],
        "default_root_dir": str(built.tmp_path / "trainer"),
        "use_distributed_sampler": False,
        "enable_progress_bar": False,
    }


def local_trainer(node: dict[str, Any]) -> bool:
    """One CPU process: built; GPUs, several devices or a strategy: checked only."""
    return (
        node.get("accelerator") == "cpu"
        and node.get("devices", 1) == 1
        and node.get("num_nodes", 1) == 1
        and node.get("strategy", "auto") == "auto"
    )


def backend_kwargs(built: Built) -> dict[str, Any]:
    """What simulation/generation.py passes to the backend factory."""
    height, width = image(built)
    return {
        "randomizer": built.get("randomization"),
        "taxonomy": built.taxonomy,
        "seed": 0,
        "height": height,
        "width": width,
    }


def is_plugin(obj: Any) -> None:
    from adaptation.plugin import PixelAdaptation, TaskAdaptation

    assert isinstance(obj, PixelAdaptation | TaskAdaptation), (
        f"{type(obj).__name__} is not an adaptation plug-in (adaptation.plugin)"
    )


#: dotted path pattern (``*``: one key) -> rule; the first match wins. Nodes that match no
#: rule are imported and bound only.
BUILD: dict[str, Rule] = {
    "taxonomy": Rule(),
    "randomization": Rule(),
    "model": Rule(kwargs=lambda b: {"num_classes": b.taxonomy.num_classes}),
    "data.augment": Rule(),
    "optimizer": Rule(args=lambda b: (b.model.parameters(),)),
    "trainer": Rule(kwargs=trainer_kwargs, build=local_trainer),
    "backend": Rule(
        kwargs=backend_kwargs,
        build=lambda node: node["_target_"] == "simulation.procedural.ProceduralBackend",
    ),
    # adaptation plug-ins (adaptation.<name>), what they build per stage or run
    "adaptation.*": Rule(check=is_plugin),
    "adaptation.*.discriminator": Rule(kwargs=lambda b: {"in_features": b.model.feature_channels}),
    "adaptation.*.model": Rule(kwargs=lambda b: {"semantic_model": None, "seed": 0}),  # CycleGAN
}
#: paths that are bound only, whatever rule matches: they read folders
NEVER_BUILD = ("data.datasets.*",)
#: built first: other nodes' run-time arguments come from these
FIRST = ("taxonomy", "randomization", "model")


def matches(path: str, pattern: str) -> bool:
    keys, parts = path.split("."), pattern.split(".")
    return len(keys) == len(parts) and all(map(fnmatch.fnmatchcase, keys, parts))


def rule_for(path: str) -> Rule | None:
    if any(matches(path, p) for p in NEVER_BUILD):
        return None
    return next((r for p, r in BUILD.items() if matches(path, p)), None)


def target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(dotted path, plain node)`` of every ``_target_`` node, outermost first."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            if not str(key).startswith("_"):
                yield from target_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from target_nodes(value, f"{path}.{i}")


def check_binds(node: dict[str, Any], runtime: dict[str, Any]) -> None:
    """The target imports and the node's keys (plus ``runtime``) bind to its signature."""
    target = get_object(str(node["_target_"]))
    kwargs = {k: v for k, v in node.items() if not (k.startswith("_") and k.endswith("_"))}
    try:
        inspect.signature(target).bind_partial(*node.get("_args_", ()), **kwargs, **runtime)
    except TypeError as exc:
        raise BindError(str(exc)) from None


@pytest.mark.parametrize(("group", "primary", "overrides"), list(options()))
def test_every_group_option_composes_and_builds(group, primary, overrides, tmp_path):
    cfg = compose_config(primary, overrides)
    if "trainer" in cfg:  # as the run does before it builds the trainer
        from training.precision import apply_precision

        apply_precision(cfg.trainer)
    built = Built(cfg, tmp_path)
    nodes = list(target_nodes(OmegaConf.to_container(cfg, resolve=False)))
    nodes.sort(key=lambda item: item[0] not in FIRST)  # stable: otherwise in config order
    assert nodes, f"no _target_ node in {primary} {overrides}"
    if group in SINGLE_NODE:
        assert group in dict(nodes), f"{group}: not a _target_ node in {primary} {overrides}"

    failures = []
    for path, node in nodes:
        rule = rule_for(path)
        try:
            check_binds(node, rule.kwargs(built) if rule else {})
            if rule is not None and rule.build(node):
                built.get(path)
        except Exception as exc:  # noqa: BLE001 - every broken node is reported at once
            failures.append(f"{path} ({node['_target_']}): {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)

    if primary == "train":  # the stage keys every experiment (and stage option) brings
        from training.stages.specs import stage_specs

        names = [spec.name for spec in stage_specs(cfg.stages, cfg.retries)]
        if group == "stage":
            assert names[-1] == f"probe_{overrides[-1].rpartition('=')[2]}"


def test_every_config_folder_is_a_known_group():
    folders = {p.name for p in CONFIGS.iterdir() if p.is_dir() and any(p.rglob("*.yaml"))}
    assert folders - NOT_GROUPS == set(GROUPS), "add the new folder to GROUPS or NOT_GROUPS"
