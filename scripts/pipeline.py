"""The whole study in one command: every adaptation method's pipeline; see configs/pipeline.yaml.

Exit status as scripts/train.py's: 0 done; 75 (``training.preemption.EXIT_PREEMPTED``)
stopped by SIGTERM during training, checkpoint saved, the study run ``KILLED``: rerun the
same command to resume; 1 an error; 143 a SIGTERM outside training (resumes too).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from core.files import atomic_write_text
from core.runtime import apply_env_defaults, quiet_console
from training.pipeline import run_pipeline
from training.tracking import browse_hint, tracking_uri
from training.tracking_server import check_tracking_config

# before anything imports mlflow (it decides on telemetry when imported); the user's own
# environment values win. One line per stage: hydra.verbose=[pytorch_lightning] for more.
apply_env_defaults()
quiet_console()


@hydra.main(version_base="1.3", config_path="pkg://configs", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    # the server answers, and the local store is created once, under its lock, before the
    # study's parent run opens it (run_train checks again for each method)
    check_tracking_config(cfg)
    _, table = run_pipeline(cfg, overrides)
    if rank_zero_only.rank != 0:
        return
    out = Path(cfg.paths.output) / f"{cfg.name}-pipeline-summary.md"
    atomic_write_text(out, table + "\n")
    print(table)
    print(f"\nsaved to {out}; {browse_hint(tracking_uri(cfg.paths.output, cfg.tracking.uri))}")


if __name__ == "__main__":
    main()
