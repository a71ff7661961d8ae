"""Hydra sweeps (``python scripts/train.py -m ...``): checks before any job starts, and the
value an optimizing sweeper (Optuna, ``configs/hparams_search/``) maximizes.

:class:`SweepChecks` is a Hydra callback, registered in ``configs/train.yaml`` under
``hydra.callbacks``. Its ``on_multirun_start`` runs once, in the launching process, after
Hydra composed the primary config and before the sweeper and launcher exist; it refuses the
sweep, with every problem in one message, when

* a swept key (``key=a,b`` on the command line, or a key of ``hydra.sweeper.params``, the
  Optuna search space) is in no job's config: the message names the key and the closest
  existing keys (``+key=`` / ``++key=`` additions are left alone);
* a swept config group option does not exist (``adaptation: choice(none, dnn)`` in the
  search space; on the command line Hydra refuses it itself), or a swept group is not in
  the defaults list (``backend=a,b`` for train.py; the message names the closest keys);
* the launcher or sweeper class (``hydra.launcher._target_``, ``hydra.sweeper._target_``,
  the Optuna sampler), or what the plugin imports only later (``submitit``, ``optuna``),
  cannot be imported: the message names the pip package to install;
* a launcher or sweeper setting is not one the plugin knows (its structured config), or the
  SLURM launcher is used where there is no ``sbatch``;
* an optimizing sweeper is used without ``optimized_metric`` (every trial would fail after
  training: the job must return a number);
* one of ``extra_checks`` raises: callables taking the composed config (with its ``hydra``
  node), e.g. a tracking-server reachability check; list them in ``configs/train.yaml``
  (``hydra.callbacks.sweep_checks.extra_checks``, as dotted names or ``_partial_`` nodes)
  or pass them to ``SweepChecks``. :func:`check_randomization`, listed there, refuses a
  preset name given to ``data.generate.randomization`` (the preset is ``randomization=``).

Once every check passed, the callables of ``before_jobs`` run (with the config, in the
launching process, before the launcher starts a job): the work that the jobs would otherwise
all do at once, e.g. creating the local MLflow store
(:func:`training.tracking_server.prepare_tracking_store`). A refused sweep runs none of
them, so it leaves nothing behind. The refusal message has the credentials of any URI in it
removed (:func:`training.tracking.redact_uri`).

What Hydra 1.3 does by itself (hydra-core 1.3.8): an unknown key swept on the command line
fails in the basic sweeper's ``validate_batch_is_legal`` -- before the first job, but after
the sweep folder and its ``multirun.yaml`` exist, with ``Key 'x' is not in struct`` and no
suggestion; the Optuna sweeper has no such step, so an unknown key in its search space fails
when the launcher composes the first trial (the study and the sweep folder exist by then).
A missing launcher plugin fails at composition (``Could not find
'hydra/launcher/submitit_slurm'``, not naming the package), a launcher ``_target_`` that
cannot be imported at setup (``Unknown plugin class``), and ``submitit`` and ``sbatch`` are
needed only inside ``launch``. Hydra 1.3 turns an exception raised by a callback into a
warning and goes on, so this callback stops the sweep with ``SystemExit``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import itertools
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from hydra.core.override_parser.types import ValueType
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from core.config import ConfigError

#: Module prefix of a launcher / sweeper / sampler class -> the pip package providing it.
PACKAGES = {
    "hydra_plugins.hydra_joblib_launcher": "hydra-joblib-launcher",
    "hydra_plugins.hydra_submitit_launcher": "hydra-submitit-launcher",
    "hydra_plugins.hydra_optuna_sweeper": "hydra-optuna-sweeper",
    "hydra_plugins.hydra_nevergrad_sweeper": "hydra-nevergrad-sweeper",
    "hydra_plugins.hydra_ax_sweeper": "hydra-ax-sweeper",
    "hydra_plugins.hydra_ray_launcher": "hydra-ray-launcher",
    "hydra_plugins.hydra_rq_launcher": "hydra-rq-launcher",
    "submitit": "submitit",
    "optuna": "optuna",
    "joblib": "joblib",
    "nevergrad": "nevergrad",
}
#: Modules a plugin imports only when it launches (after the sweep folder exists).
LAZY_IMPORTS = {
    "hydra_plugins.hydra_submitit_launcher": ("submitit",),
    "hydra_plugins.hydra_optuna_sweeper": ("optuna",),
}
#: Sweepers that optimize what each job returns (``main`` returns ``optimized_metric``).
OPTIMIZING_SWEEPERS = (
    "hydra_plugins.hydra_optuna_sweeper",
    "hydra_plugins.hydra_nevergrad_sweeper",
    "hydra_plugins.hydra_ax_sweeper",
)
SLURM_LAUNCHERS = ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",)
MAX_GROUP_COMBINATIONS = 64  # job configs composed to find keys that only some groups add


class SweepConfigError(ConfigError):
    """A sweep that cannot run; raised before any job starts."""


# ----------------------------------------------------------------------------- the callback
class SweepChecks(Callback):
    """Refuse a bad ``-m`` sweep before the sweeper, the launcher or any job starts."""

    def __init__(
        self,
        extra_checks: Iterable[Callable[[DictConfig], Any] | str] = (),
        before_jobs: Iterable[Callable[[DictConfig], Any] | str] = (),
    ) -> None:
        self.extra_checks = [_callable(c, "extra_checks") for c in extra_checks or ()]
        self.before_jobs = [_callable(c, "before_jobs") for c in before_jobs or ()]

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_sweep(config, self.extra_checks)
            prepare_sweep(config, self.before_jobs)
        except SweepConfigError as exc:
            # Hydra 1.3 catches an Exception raised by a callback and only warns: exit here.
            raise SystemExit(f"Error: {exc}") from None


def check_sweep(
    config: DictConfig,
    extra_checks: Sequence[Callable[[DictConfig], Any]] = (),
    config_loader: Any = None,
) -> None:
    """Every check of :class:`SweepChecks`; raises :class:`SweepConfigError` naming all
    problems. ``config`` is the primary config with its ``hydra`` node."""
    problems = check_plugins(config)
    problems += check_objective(config)
    problems += check_sweep_keys(config, config_loader)
    for check in extra_checks:
        try:
            check(config)
        except Exception as exc:  # any failure refuses the sweep
            problems.append(f"{_name(check)}: {exc}")
    if problems:
        raise SweepConfigError(
            _redact(
                "the sweep was refused before any job started:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        )


def prepare_sweep(config: DictConfig, before_jobs: Sequence[Callable[[DictConfig], Any]]) -> None:
    """Run each of ``before_jobs`` with ``config``, after :func:`check_sweep` passed; the
    first failure stops the sweep (raises :class:`SweepConfigError` naming it)."""
    for step in before_jobs:
        try:
            step(config)
        except Exception as exc:
            raise SweepConfigError(
                _redact(f"the sweep was stopped before any job started: {_name(step)}: {exc}")
            ) from None


def _name(check: Callable[..., Any]) -> str:
    """A check's name in a message (the function of a ``_partial_`` node)."""
    func = getattr(check, "func", check)  # functools.partial
    return getattr(func, "__qualname__", None) or repr(check)


def _redact(message: str) -> str:
    """``message`` without the credentials of any URI in it (an override echoed back)."""
    from training.tracking import redact_uri

    return redact_uri(message, "***@")


def _callable(
    check: Callable[[DictConfig], Any] | str, where: str = "extra_checks"
) -> Callable[[DictConfig], Any]:
    if isinstance(check, str):
        from hydra.utils import get_method

        return get_method(check)
    if not callable(check):
        raise SweepConfigError(
            f"hydra.callbacks.sweep_checks.{where}: {check!r} is not "
            "callable (a dotted function name or a _partial_ node)"
        )
    return check


# ----------------------------------------------------------------------------- the objective
def objective(cfg: Any, results: Mapping[str, Any]) -> float | None:
    """``optimized_metric`` of the last stage in ``results`` (``run_train``'s answer), or
    None when the config names no metric. What an optimizing sweeper maximizes."""
    metric = cfg.get("optimized_metric")
    if not metric:
        return None
    if not results:
        raise ConfigError(f"optimized_metric={metric}: the run has no stage")
    last = list(results.values())[-1]
    if metric not in last.metrics:
        known = sorted(last.metrics)
        close = difflib.get_close_matches(str(metric), known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"optimized_metric={metric}: stage {last.name} has no such metric"
            f"{hint} (it has {len(known)}, e.g. {', '.join(known[:6])})"
        )
    return float(last.metrics[metric])


# ----------------------------------------------------------------------------- plugins
def check_plugins(config: DictConfig) -> list[str]:
    """Problems with the configured launcher and sweeper: classes that cannot be imported
    (naming the pip package), settings the plugin does not know, SLURM without ``sbatch``."""
    problems: list[str] = []
    choices = _choices(config)
    for section in ("launcher", "sweeper"):
        node = OmegaConf.select(config, f"hydra.{section}")
        if not isinstance(node, DictConfig):
            continue
        where = f"hydra/{section}={choices.get(f'hydra/{section}', '?')}"
        targets = list(_targets(node, f"hydra.{section}"))
        root = str(node.get("_target_") or "")
        failed = False
        for key, target in targets:
            problem = _import_problem(target)
            if problem:
                failed = True
                problems.append(f"{where}: {key}={target}: {problem}")
        if failed or not root:
            continue
        for module in _lazy_imports(root):
            if importlib.util.find_spec(module) is None:
                problems.append(
                    f"{where}: {root} needs the module '{module}', which is not "
                    f"installed: pip install {_package(module)}"
                )
        problems += _schema_problems(section, node, root, where)
        if section == "launcher" and root in SLURM_LAUNCHERS and not shutil.which("sbatch"):
            problems.append(
                f"{where}: no 'sbatch' on PATH: submit the sweep from a SLURM "
                "login node (or use hydra/launcher=local here)"
            )
    return problems


def _targets(node: Any, path: str) -> Iterable[tuple[str, str]]:
    """(dotted key, class path) of every ``_target_`` under ``node``, outermost first."""
    if isinstance(node, DictConfig) and not _is_empty(node):
        target = node._get_node("_target_", validate_access=False)
        if target is not None and not target._is_missing() and isinstance(target._value(), str):
            yield f"{path}._target_", str(target._value())
        for key in node:
            if key != "_target_":
                yield from _targets(node._get_node(key, validate_access=False), f"{path}.{key}")


def _import_problem(target: str) -> str | None:
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        return "not a dotted class path"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        package = _package(missing if missing != module_name else target)
        return f"cannot import module '{missing}': not installed: pip install {package}"
    except ImportError as exc:  # installed but broken (a version conflict, usually)
        return f"importing {module_name} failed ({exc}); reinstall {_package(target)}"
    if not hasattr(module, attr):
        close = difflib.get_close_matches(attr, [n for n in dir(module) if n[:1].isupper()])
        hint = f"; did you mean {module_name}.{close[0]}?" if close else ""
        return f"module {module_name} has no '{attr}'{hint}"
    return None


def _package(module: str) -> str:
    for prefix, package in PACKAGES.items():
        if module == prefix or module.startswith(prefix + "."):
            return package
    parts = module.split(".")
    if parts[0] == "hydra_plugins" and len(parts) > 1:  # hydra_plugins.hydra_x -> hydra-x
        return f"{parts[1].replace('_', '-')} (the plugin package's usual name)"
    return f"<the package that provides {parts[0]}>"


def _lazy_imports(target: str) -> tuple[str, ...]:
    for prefix, modules in LAZY_IMPORTS.items():
        if target.startswith(prefix + "."):
            return modules
    return ()


def _schema_problems(section: str, node: DictConfig, target: str, where: str) -> list[str]:
    """Settings ``node`` has that the plugin's structured config (ConfigStore) does not."""
    from hydra.core.config_store import ConfigStore

    schemas = ConfigStore.instance().repo.get("hydra", {}).get(section, {})
    for entry in schemas.values():
        schema = getattr(entry, "node", None)
        if not isinstance(schema, DictConfig) or schema.get("_target_") != target:
            continue
        names = [str(k) for k in schema]  # (`in` would skip the schema's ??? entries)
        unknown = [str(k) for k in node if str(k) not in names]
        problems = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            problems.append(
                f"{where}: hydra.{section}.{key} is not a setting of "
                f"{target.rsplit('.', 1)[-1]}{hint}"
            )
        return problems
    return []


def check_objective(config: DictConfig) -> list[str]:
    """An optimizing sweeper needs ``optimized_metric``: the number each job returns."""
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    if not target.startswith(OPTIMIZING_SWEEPERS):
        return []
    if isinstance(config, DictConfig) and config.get("optimized_metric"):
        return []
    return [
        f"hydra.sweeper._target_={target} maximizes (or minimizes) what each job returns, "
        "but optimized_metric is not set: use hparams_search=target_miou or add "
        "+optimized_metric=val/real/miou"
    ]


# ----------------------------------------------------------------------------- extra checks
def check_randomization(config: DictConfig) -> None:
    """An extra check (``extra_checks``): ``data.generate.randomization`` is an alias of the
    composed ``randomization`` node, so a preset name given to it (``-m
    data.generate.randomization=light,full``, the syntax before the preset was composed)
    would fail in every job; raises naming the override to write (``randomization=...``).
    Jobs never share a generated folder -- each split's is named by a hash of its
    generation config (``${generated:<split>}``) -- and an unknown preset is an unknown
    option of the ``randomization`` group, so nothing else about the data is checked here."""
    key = "data.generate.randomization"
    lines = [ov.input_line for _, ov in sweep_overrides(config) if ov.key_or_group == key]
    node = _node(config, key)
    if node is not None and not node._is_interpolation() and isinstance(node._value(), str):
        lines.append(f"{key}={node._value()}")
    if lines:
        raise SweepConfigError(
            f"{lines[0]}: {key} is the composed preset of configs/randomization/ (an alias "
            f"of the randomization node): write {lines[0].removeprefix('data.generate.')}"
        )


def _fixed_overrides(config: DictConfig) -> list[str]:
    """The command-line overrides that every job of the sweep shares."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = _task_overrides(config)
    parsed = OverridesParser.create().parse_overrides(task)
    return [o.input_line for o in parsed if not o.is_sweep_override()]


# ----------------------------------------------------------------------------- swept keys
def sweep_overrides(config: DictConfig) -> list[tuple[str, Any]]:
    """(where, parsed Override) of every sweep: command-line sweeps and the entries of
    ``hydra.sweeper.params`` (the Optuna search space, or the basic sweeper's params)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    task = _task_overrides(config)
    out = [("command line", o) for o in parser.parse_overrides(task) if o.is_sweep_override()]
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    if isinstance(params, DictConfig):
        for key, value in OmegaConf.to_container(params, resolve=True).items():
            out += [("hydra.sweeper.params", o) for o in parser.parse_overrides([f"{key}={value}"])]
    return out


def check_sweep_keys(config: DictConfig, config_loader: Any = None) -> list[str]:
    """Problems with the swept keys and config groups of ``config``'s sweep."""
    loader = config_loader or _global_config_loader()
    swept = sweep_overrides(config)
    choices = _choices(config)
    problems: list[str] = []
    group_sweeps: list[Any] = []
    key_sweeps: list[tuple[str, Any]] = []
    for where, ov in swept:
        if ov.is_delete() or ov.is_hydra_override():
            continue  # Hydra refuses these itself, at composition
        line = f"{ov.input_line} ({where})"
        group = ov.key_or_group
        is_group = loader is not None and _group_exists(loader, group)
        element = group if ov.package is None else f"{group}@{ov.package}"
        if is_group and (ov.is_add() or element in choices or group in choices):
            problem = _option_problem(loader, ov)
            if problem:
                problems.append(f"{line}: {problem}")
            elif ov.is_choice_sweep() or ov.is_range_sweep():
                group_sweeps.append(ov)
            continue
        if ov.is_add() or ov.is_force_add():
            continue  # additions: whether the key exists does not matter
        if is_group:
            similar = _similar_keys(config, group, choices)
            hint = f" (or did you mean {', '.join(similar)}?)" if similar else ""
            problems.append(
                f"{line}: config group '{group}' is not in the defaults list of "
                f"{_config_name(config)}: add it with +{group}=...{hint}"
            )
            continue
        key_sweeps.append((line, ov))
    missing = [(line, ov) for line, ov in key_sweeps if not has_key(config, ov.key_or_group)]
    if missing and group_sweeps and loader is not None:
        return problems + _check_in_job_configs(config, loader, missing, group_sweeps, choices)
    for line, ov in missing:
        problems.append(_unknown_key(config, ov.key_or_group, line, choices))
    return problems


def _check_in_job_configs(
    config: DictConfig,
    loader: Any,
    missing: list[tuple[str, Any]],
    group_sweeps: list[Any],
    choices: Mapping[str, str],
) -> list[str]:
    """Keys absent from the primary config may come with a swept group option (a key of
    ``adaptation=dann`` only): compose the job config of each group combination."""
    fixed = _fixed_overrides(config)
    values = [
        [f"{ov.get_key_element()}={v}" for v in ov.sweep_string_iterator()] for ov in group_sweeps
    ]
    combos = list(itertools.islice(itertools.product(*values), MAX_GROUP_COMBINATIONS))
    found: dict[str, list[str]] = {line: [] for line, _ in missing}
    lacking: dict[str, list[str]] = {line: [] for line, _ in missing}
    problems: list[str] = []
    for combo in combos:
        try:
            job = loader.load_sweep_config(config, fixed + list(combo))
        except Exception as exc:  # reported with the combination
            problems.append(
                f"{' '.join(combo)}: the job config does not compose: {str(exc).splitlines()[0]}"
            )
            continue
        for line, ov in missing:
            (found if has_key(job, ov.key_or_group) else lacking)[line].append(" ".join(combo))
    for line, ov in missing:
        if not found[line]:
            problems.append(_unknown_key(config, ov.key_or_group, line, choices))
        elif lacking[line]:
            problems.append(
                f"{line}: the key exists only in some jobs' configs (e.g. with "
                f"{found[line][0]}), not with {lacking[line][0]}: those jobs would "
                f"fail; sweep the groups separately, or write "
                f"++{ov.key_or_group}=... to add it where it is missing"
            )
    return problems


def has_key(config: Any, key: str) -> bool:
    """Whether the dotted ``key`` is in ``config`` (``???`` values and interpolations count
    as present; nothing is resolved)."""
    node = config
    for part in key.split("."):
        if isinstance(node, DictConfig):
            if node._is_none() or node._is_missing():
                return False
            if node._is_interpolation():
                return True  # cannot tell without resolving: let the job decide
            node = node._get_node(part, validate_access=False)
        elif isinstance(node, ListConfig):
            if not part.isdigit() or node._is_none() or node._is_missing():
                return False
            index = int(part)
            node = node._get_node(index, validate_access=False) if index < len(node) else None
        else:
            return False
        if node is None:
            return False
    return True


def _unknown_key(config: DictConfig, key: str, line: str, choices: Mapping[str, str]) -> str:
    parent = key.rpartition(".")[0]
    message = f"{line}: no key '{key}' in the config"
    similar = _similar_keys(config, key, choices)
    if similar:
        message += f"; did you mean {' or '.join(similar)}?"
    node = _node(config, parent) if parent else None
    if isinstance(node, DictConfig) and not _is_empty(node):
        message += f" ({parent} has: {', '.join(sorted(str(k) for k in node))})"
    return message + f" -- to add a new key, write +{key}=..."


def _similar_keys(config: DictConfig, key: str, choices: Mapping[str, str]) -> list[str]:
    """The existing keys (or config groups) closest to ``key``: its siblings' names when its
    parent exists, else whole dotted paths, else paths with the same last part."""
    parent, _, leaf = key.rpartition(".")
    node = _node(config, parent) if parent else None
    if isinstance(node, DictConfig) and not _is_empty(node):
        close = difflib.get_close_matches(leaf, [str(k) for k in node], n=2, cutoff=0.7)
        return [f"{parent}.{k}" for k in close]
    paths = _paths(config) + [g.split("@")[0] for g in choices if not g.startswith("hydra/")]
    scored = sorted(
        ((difflib.SequenceMatcher(None, key, p).ratio(), p) for p in paths), reverse=True
    )
    close = [p for r, p in scored[:3] if r >= 0.75 and r >= scored[0][0] - 0.03]
    if not close:  # the same last part elsewhere (sim_ratio -> stages.finetune.sim_ratio)
        close = [p for p in paths if p.rpartition(".")[2] == leaf][:3]
    return list(dict.fromkeys(close))


def _node(config: Any, key: str) -> Any:
    """The node at dotted ``key`` (unresolved), or None."""
    if not has_key(config, key):
        return None
    node = config
    for part in key.split("."):
        node = node._get_node(
            int(part) if isinstance(node, ListConfig) else part, validate_access=False
        )
    return node


def _paths(config: DictConfig) -> list[str]:
    out: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, DictConfig) and not _is_empty(node):
            for key in node:
                if prefix or key != "hydra":
                    path = f"{prefix}{key}"
                    out.append(path)
                    walk(node._get_node(key, validate_access=False), path + ".")

    walk(config, "")
    return out


def _is_empty(node: Any) -> bool:
    """None, ``???`` or an interpolation: a node whose children cannot be read as they are."""
    return node._is_none() or node._is_missing() or node._is_interpolation()


def _option_problem(loader: Any, ov: Any) -> str | None:
    if ov.value_type == ValueType.GLOB_CHOICE_SWEEP:
        return None
    options = loader.get_group_options(ov.key_or_group)
    values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.value()]
    bad = [str(v) for v in values if str(v) not in options]
    if not bad:
        return None
    hints = [difflib.get_close_matches(b, options, n=1) for b in bad]
    hint = "; ".join(f"did you mean {h[0]}?" for h in hints if h)
    return (
        f"no option {', '.join(bad)} in config group '{ov.key_or_group}' "
        f"(options: {', '.join(options)}){'; ' + hint if hint else ''}"
    )


def _group_exists(loader: Any, group: str) -> bool:
    parent, _, leaf = group.rpartition("/")
    try:
        return leaf in loader.list_groups(parent)
    except Exception:  # a malformed name is not a group
        return False


def _task_overrides(config: DictConfig) -> list[str]:
    """The command-line overrides as typed (iterating the node would resolve ``${...}``)."""
    node = OmegaConf.select(config, "hydra.overrides.task", default=None)
    if not isinstance(node, ListConfig):
        return []
    return [str(x) for x in OmegaConf.to_container(node, resolve=False)]


def _choices(config: DictConfig) -> dict[str, str]:
    choices = OmegaConf.select(config, "hydra.runtime.choices", default=None)
    if not isinstance(choices, DictConfig):
        return {}
    return {str(k): str(v) for k, v in choices.items()}


def _config_name(config: DictConfig) -> str:
    name = OmegaConf.select(config, "hydra.job.config_name", default=None)
    return f"{name}.yaml" if name else "the primary config"


def _global_config_loader() -> Any:
    from hydra.core.global_hydra import GlobalHydra

    instance = GlobalHydra.instance()
    return instance.config_loader() if instance.is_initialized() else None
