"""``python -m opd_lab.evaluate [overrides]``: evaluate one model, no training.

The model is the untrained student (``eval.only=student``, the default), the teacher (``eval.only=teacher``) or
any saved checkpoint (``eval.checkpoint=<folder>``), on every benchmark of the task, with ``eval.n_samples``
samples per problem through the configured rollout engine (vLLM by default; ``rollout.engine=hf``). Writes to
its run directory ``eval.csv`` (macro mean), ``eval_benchmarks.csv`` (pass@k per benchmark plus the macro mean)
and ``eval_per_problem.csv`` (unbiased pass@k per problem, correct and truncated counts).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from opd_lab.__main__ import CONF_DIR, run_job


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def app(cfg: DictConfig) -> float:
    return run_job(cfg, evaluate_only=True)


if __name__ == "__main__":
    app()
