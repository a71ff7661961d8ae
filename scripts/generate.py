"""Generate a domain-randomized driving dataset; see configs/generate.yaml."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from simulation.generation import run_generate


@hydra.main(version_base="1.3", config_path="pkg://configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    result = run_generate(cfg)
    print(
        f"{result.frames} frames in {result.seconds:.1f} s "
        f"({result.frames_per_second:.1f} frames/s) -> {result.root}"
        + ("" if result.complete else " (incomplete: other jobs still writing)")
    )


if __name__ == "__main__":
    main()
