"""Train, fine-tune and evaluate on sim/real data; see configs/train.yaml."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from simulation.dataset import atomic_write_text
from training.report import results_table
from training.run import run_train


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    results = run_train(cfg)
    table = results_table(results)
    out = Path(cfg.paths.output) / f"{cfg.name}-results.md"
    atomic_write_text(out, table + "\n")
    print(table)
    print(
        f"\nsaved to {out}; browse the runs with:  mlflow ui --backend-store-uri "
        f"sqlite:///{(Path(cfg.paths.output) / 'mlflow.db').resolve()}"
    )


if __name__ == "__main__":
    main()
