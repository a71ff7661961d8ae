"""Sweeps: the checks before any job starts (training/sweeps.py), the Optuna search config,
the launcher configs. Only the last test trains (marked slow)."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

import core.paths  # noqa: F401  (registers the ${generated:SPLIT} resolver)
from core.config import ConfigError
from tests.conftest import CONFIGS, ROOT
from training import sweeps
from training.sweeps import SweepChecks, SweepConfigError, check_sweep, objective


def hparams(name: str = "target_miou") -> str:
    """``hparams_search=NAME``, with the ``+`` that train.yaml needs while its defaults list
    has no ``hparams_search`` entry."""
    defaults = OmegaConf.load(CONFIGS / "train.yaml").defaults
    listed = any(isinstance(d, DictConfig) and "hparams_search" in d for d in defaults)
    return f"{'' if listed else '+'}hparams_search={name}"


@contextmanager
def multirun(tmp_path, *overrides: str):
    """The primary config of ``scripts/train.py -m <overrides>``, as the callback sees it."""
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        yield loader.load_configuration(
            "train",
            [
                "experiment=smoke",
                f"paths.data={tmp_path / 'data'}",
                f"paths.output={tmp_path / 'out'}",
                *overrides,
            ],
            RunMode.MULTIRUN,
        )


def problems(tmp_path, *overrides: str) -> str:
    """The refusal message of the registered callback (extra checks included), or ''."""
    with multirun(tmp_path, *overrides) as cfg:
        callback = instantiate(cfg.hydra.callbacks.sweep_checks)
        try:
            check_sweep(cfg, callback.extra_checks)
        except SweepConfigError as exc:
            return str(exc)
    return ""


def run_train_script(tmp_path, *overrides: str, multirun: bool = False, timeout: int = 120):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            *(["-m"] if multirun else []),
            "experiment=smoke",
            f"paths.data={tmp_path / 'data'}",
            f"paths.output={tmp_path / 'out'}",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# ----------------------------------------------------------------------------- before any job
@pytest.mark.slow  # a subprocess each: the full suite runs it
def test_bad_sweep_stops_before_any_job_folder_or_mlflow_run(tmp_path):
    out = run_train_script(
        tmp_path,
        "stages.finetune.sim_ration=0.5,0.9",  # typo
        "hydra.launcher._target_=hydra_plugins.hydra_nolauncher.NoLauncher",
        "seed=0,1",
        multirun=True,
    )
    assert out.returncode == 1
    assert "the sweep was refused before any job started" in out.stderr
    # every problem at once: the key with its closest match, the launcher with its package
    assert "did you mean stages.finetune.sim_ratio?" in out.stderr
    assert "pip install hydra-nolauncher" in out.stderr
    assert "Traceback" not in out.stderr
    # no sweep folder, no multirun.yaml, no data, no MLflow store
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "data").exists()


def test_unknown_key_names_the_closest_keys(tmp_path):
    message = problems(tmp_path, "stages.finetune.sim_ration=0.5,0.9", "seed=0,1")
    assert "stages.finetune.sim_ration=0.5,0.9 (command line)" in message
    assert "did you mean stages.finetune.sim_ratio?" in message
    assert "stages.finetune has: init, max_epochs, real_fraction, sim_ratio" in message
    assert "seed" not in message  # the good sweep is not blamed

    message = problems(tmp_path, "stage.finetune.sim_ratio=0.5,0.9", "adaptaton=none,dann")
    assert "did you mean stages.finetune.sim_ratio?" in message
    assert "did you mean adaptation?" in message


def test_a_group_outside_the_defaults_list_and_a_key_of_some_jobs_only(tmp_path):
    message = problems(tmp_path, "backend=procedural,carla")  # a group of generate.yaml
    assert "config group 'backend' is not in the defaults list of train.yaml" in message
    assert "add it with +backend=..." in message

    # adaptation.dann exists with adaptation=dann only: the none jobs would fail
    message = problems(tmp_path, "adaptation=none,dann", "adaptation.dann.weight=0.5,1.0")
    assert "exists only in some jobs' configs" in message
    assert "with adaptation=none" in message
    assert problems(tmp_path, "adaptation=dann,cyclegan_dann", "adaptation.dann.weight=0.5,1") == ""


def test_the_issue_sweep_passes(tmp_path):
    """Adaptation method, sim ratio, real fraction, randomization preset and seed at once."""
    assert (
        problems(
            tmp_path,
            "adaptation=none,dann",
            "stages.finetune.sim_ratio=0.5,0.9",
            "stages.finetune.real_fraction=0.05,0.1",
            "randomization=light,full",
            "randomization.weather.cloudiness=[0,40],[0,80]",
            "seed=0,1",
            "+stages.finetune.note=a,b",  # additions are not checked
        )
        == ""
    )


def test_presets_get_their_own_dataset_folders(tmp_path):
    """The generated splits' folders are named by their generation config: no two presets
    (or seeds, sizes) share one, and a split pointed at a folder of one's own keeps it."""

    def roots(*overrides: str) -> dict[str, str]:
        with initialize_config_dir(str(CONFIGS), version_base="1.3"):
            cfg = compose("train", ["experiment=smoke", f"paths.data={tmp_path}", *overrides])
        datasets = OmegaConf.to_container(cfg.data.datasets, resolve=True)
        return {role: node["root"] for role, node in datasets.items() if node}

    light, full = roots(), roots("randomization=full")
    assert re.fullmatch(
        re.escape(str(tmp_path / "smoke")) + r"/sim_train-[0-9a-f]{12}", light["sim_train"]
    )
    sim = {"sim_train", "sim_val"}
    assert set(light) == set(full)
    assert all(full[r] != light[r] for r in sim)
    # the real splits render their own camera world: a sim preset never regenerates them
    assert all(full[r] == light[r] for r in set(light) - sim)
    assert roots("randomization=light") == light  # same settings, same folders
    changed = roots("randomization.weather.cloudiness=[0,61]")
    assert all(changed[r] != light[r] for r in sim)
    world = roots("data.generate.camera_world.weather.cloudiness=[0,61]")
    assert all(world[r] != light[r] for r in set(light) - sim)
    assert all(world[r] == light[r] for r in sim)
    seed = roots("data.generate.splits.sim_val.seed=7")
    assert seed["sim_val"] != light["sim_val"] and seed["sim_train"] == light["sim_train"]
    assert roots("data.image.height=32")["real_test"] != light["real_test"]
    own = roots("data.datasets.real_train.root=/datasets/camera")
    assert own == {**light, "real_train": "/datasets/camera"}


def test_a_preset_name_for_data_generate_is_refused_and_unknown_presets_too(tmp_path):
    message = problems(tmp_path, "data.generate.randomization=light,full", "seed=0,1")
    assert "check_randomization: data.generate.randomization=light,full" in message
    assert "write randomization=light,full" in message
    message = problems(tmp_path, "data.generate.randomization=none", "seed=0,1")
    assert "write randomization=none" in message
    message = problems(tmp_path, "randomization=light,lite")
    assert "no option lite in config group 'randomization'" in message
    assert "did you mean light?" in message


def test_optuna_search_space_keys_are_checked(tmp_path):
    with multirun(tmp_path, hparams()) as cfg:
        assert sweeps.check_sweep_keys(cfg) == []
        with open_dict(cfg):
            cfg.hydra.sweeper.params["stages.finetune.sim_ration"] = "interval(0.1, 0.9)"
            cfg.hydra.sweeper.params["adaptation"] = "choice(none, dnn)"
        found = "\n".join(sweeps.check_sweep_keys(cfg))
    assert "stages.finetune.sim_ration=interval(0.1, 0.9) (hydra.sweeper.params)" in found
    assert "did you mean stages.finetune.sim_ratio?" in found
    assert "no option dnn in config group 'adaptation'" in found
    assert "did you mean dann?" in found


def test_optimizing_sweeper_without_a_metric_is_refused(tmp_path):
    message = problems(tmp_path, "hydra/sweeper=optuna", "seed=0,1")
    assert "optimized_metric is not set" in message


def test_missing_launcher_package_names_the_pip_package(tmp_path, monkeypatch):
    real_import = importlib.import_module

    def without_submitit(name, *args, **kwargs):
        if name.startswith("hydra_plugins.hydra_submitit_launcher"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(sweeps.importlib, "import_module", without_submitit)
    with multirun(tmp_path, "hydra/launcher=slurm", "seed=0,1") as cfg:
        found = sweeps.check_plugins(cfg)
    assert len(found) == 1
    assert found[0].startswith("hydra/launcher=slurm: hydra.launcher._target_=")
    assert found[0].endswith("pip install hydra-submitit-launcher")


def test_a_lazily_imported_module_and_sbatch_are_checked(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        sweeps.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "submitit" else real_find_spec(name, *a),
    )
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    with multirun(tmp_path, "hydra/launcher=slurm", "+hydra.launcher.gpus_per_nod=2") as cfg:
        found = "\n".join(sweeps.check_plugins(cfg))
    assert "needs the module 'submitit', which is not installed: pip install submitit" in found
    assert "no 'sbatch' on PATH" in found
    assert "gpus_per_nod is not a setting of SlurmLauncher; did you mean gpus_per_node" in found


def test_extra_checks_refuse_the_sweep_through_the_callback(tmp_path):
    def tracking_server_down(config):
        raise RuntimeError(f"cannot reach {config.tracking.uri}")

    with multirun(tmp_path, "seed=0,1") as cfg:
        SweepChecks().on_multirun_start(cfg)  # nothing to refuse
        SweepChecks(["training.sweeps.check_randomization"]).on_multirun_start(cfg)
        with pytest.raises(SystemExit) as stop:
            SweepChecks([tracking_server_down]).on_multirun_start(cfg)
    assert "tracking_server_down: cannot reach None" in str(stop.value.code)


# ----------------------------------------------------------------------------- configs
def test_optuna_config_composes_with_its_search_space(tmp_path):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", ["experiment=smoke", hparams()], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert sweeper.direction == "maximize" and sweeper.storage is None
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed == 1234
    assert dict(sweeper.params) == {
        "stages.finetune.sim_ratio": "interval(0.5, 0.95)",
        "optimizer.lr": "tag(log, interval(0.0003, 0.01))",
        "adaptation": "choice(none, dann)",
    }
    assert cfg.optimized_metric == "val/real/miou"
    sampler = instantiate(sweeper.sampler)  # optuna imports and takes these settings
    assert type(sampler).__name__ == "TPESampler"


def test_local_launcher_config_composes(tmp_path):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=local"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("hydra_joblib_launcher.joblib_launcher.JoblibLauncher")
    assert launcher.n_jobs == 2


def test_slurm_launcher_writes_an_sbatch_script_for_multi_node_ddp(tmp_path, monkeypatch):
    """Composes and instantiates the SLURM launcher and lets it build its submitit executor
    and sbatch script, stopping before submission (no SLURM here)."""
    import submitit
    from hydra.core.utils import setup_globals

    (tmp_path / "bin").mkdir()
    for tool in ("srun", "sbatch"):  # submitit only looks for them
        (tmp_path / "bin" / tool).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / "bin" / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    overrides = [
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        f"paths.output={tmp_path / 'out'}",
    ]
    setup_globals()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides, return_hydra_config=True)
        launcher = instantiate(cfg.hydra.launcher)
    assert sweeps.check_plugins(cfg) == []  # importable, known settings, an sbatch on PATH
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["tasks_per_node"] == 2 == launcher.params["gpus_per_node"]
    assert launcher.params["nodes"] == 2

    captured = {}

    def capture(executor, fn, *iterables):
        captured["executor"] = executor
        raise KeyboardInterrupt  # stop before anything is submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    launcher.setup(hydra_context=None, task_function=lambda cfg: None, config=cfg)
    with pytest.raises(KeyboardInterrupt):
        launcher.launch([["seed=0"]], initial_job_idx=0)
    script = captured["executor"]._executor._make_submission_file_text("python job.py", "x")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --partition=gpu",
        "#SBATCH --mem=64GB",
        "#SBATCH --time=720",
        "#SBATCH --cpus-per-task=4",
    ):
        assert line in script, script


# ----------------------------------------------------------------------------- objective
def test_objective_is_the_metric_of_the_last_stage():
    results = {
        "source_only": SimpleNamespace(name="source_only", metrics={"val/real/miou": 0.1}),
        "finetune": SimpleNamespace(
            name="finetune", metrics={"val/real/miou": 0.4, "test/real/miou": 0.3}
        ),
    }
    assert objective(OmegaConf.create({"optimized_metric": "val/real/miou"}), results) == 0.4
    assert objective(OmegaConf.create({"optimized_metric": None}), results) is None
    assert objective(OmegaConf.create({}), results) is None
    with pytest.raises(ConfigError, match="did you mean val/real/miou"):
        objective(OmegaConf.create({"optimized_metric": "val/real/mIoU"}), results)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_optuna_smoke_search_reaches_optuna_and_reruns_from_the_cache(tmp_path):
    args = [
        hparams(),
        "hydra.sweeper.n_trials=2",
        "log_model=false",
        "risk.enabled=false",
        "registry.enabled=false",
        "stages.source_only.max_epochs=1",
        "data.loader.batches_per_epoch=4",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    first = run_train_script(tmp_path, *args, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    best = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert 0.0 < best.best_value <= 1.0
    assert set(best.best_params) == {"stages.finetune.sim_ratio", "optimizer.lr", "adaptation"}
    stages = sorted(p.name for p in (tmp_path / "out" / "runs").iterdir())

    again = run_train_script(tmp_path, *args, timeout=900)  # same seed: the same trials
    assert again.returncode == 0, again.stderr[-3000:]
    assert OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml") == best
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == stages
    assert "finished earlier" in again.stdout  # (Hydra logs to stdout)
