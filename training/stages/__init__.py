"""The stage engine: one stage protocol, one plan, one loop.

* :mod:`~training.stages.specs` -- the config resolved into frozen specs of plain values;
* :mod:`~training.stages.plan` -- adaptation components built and checked, stage hashes;
* :mod:`~training.stages.store` -- the stage store (folder, done marker, MLflow run,
  checkpoint resume, retries, failure marking);
* :mod:`~training.stages.data` -- generated splits, dataset nodes, T-10 screening;
* :mod:`~training.stages.segmenter` -- one segmentation stage;
* :mod:`~training.stages.monitoring` -- risk register, job-failure alert, model registry;
* :mod:`~training.stages.parent` -- the pipeline's MLflow parent run;
* :mod:`~training.stages.loop` -- :func:`run_train`, the body of ``scripts/train.py``.
"""

from training.stages.loop import check_config, run_train
from training.stages.segmenter import StageResult

__all__ = ["StageResult", "check_config", "run_train"]
