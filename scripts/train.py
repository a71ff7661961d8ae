"""Train, fine-tune and evaluate on sim/real data; see configs/train.yaml.

Exit status: 0 done; 75 (``training.preemption.EXIT_PREEMPTED``) stopped by SIGTERM during
training (spot reclaim, SLURM preemption) with the stage's checkpoint saved: rerun the
same command to resume; 1 an error; 143 a SIGTERM outside training (resumes too).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict
from pytorch_lightning.utilities import rank_zero_only

from core.files import atomic_write_text
from core.runtime import apply_env_defaults, quiet_console
from training.report import results_table
from training.stages import run_train
from training.sweeps import objective
from training.tracking import browse_hint, tracking_uri

# before anything imports mlflow (it decides on telemetry when imported); the user's own
# environment values win. One line per stage: hydra.verbose=[pytorch_lightning] for more.
apply_env_defaults()
quiet_console()


@hydra.main(version_base="1.3", config_path="pkg://configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and not cfg.tracking.sweep_id:
        with open_dict(cfg):  # every job of one -m launch carries the same sweep id
            cfg.tracking.sweep_id = Path(hc.sweep.dir).name
    results = run_train(cfg)
    if rank_zero_only.rank != 0:  # under DDP every rank runs this script; one reports
        return
    table = results_table(results)
    # one results file per sweep job, so the jobs of a -m launch never overwrite each other
    job = f"-{cfg.tracking.sweep_id}-{hc.job.num}" if hc.mode == RunMode.MULTIRUN else ""
    out = Path(cfg.paths.output) / f"{cfg.name}{job}-results.md"
    atomic_write_text(out, table + "\n")
    print(table)
    print(f"\nsaved to {out}; {browse_hint(tracking_uri(cfg.paths.output, cfg.tracking.uri))}")
    return objective(cfg, results)  # optimized_metric of the last stage (Optuna sweeps)


if __name__ == "__main__":
    main()
