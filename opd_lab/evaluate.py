"""``python -m opd_lab.evaluate [overrides]``: evaluate one model, no training.

The model is the untrained student (``eval.only=student``, the default), the teacher (``eval.only=teacher``) or
any saved checkpoint (``eval.checkpoint=<folder>``), on every benchmark of the task, with ``eval.n_samples``
samples per problem through the configured rollout engine (vLLM by default; ``rollout.engine=hf``). Writes to
its run directory ``eval.csv`` (macro mean), ``eval_benchmarks.csv`` (pass@k per benchmark plus the macro mean)
and ``eval_per_problem.csv`` (unbiased pass@k per problem, correct and truncated counts).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from opd_lab.common import plugins
from opd_lab.config import Config, ConfigError
from opd_lab.run import jobs


def require_target(cfg: Config) -> None:
    if cfg.eval.only is None:
        raise ConfigError("eval.only=null is invalid here: allowed student or teacher (python -m "
                          "opd_lab.evaluate trains nothing; set eval.checkpoint to evaluate a trained model)")


def main(cfg: Config, run_dir: Path) -> dict[str, float]:
    started = jobs.start(cfg, run_dir)
    if not isinstance(started, jobs.Started):
        return started.get("final", {})
    return jobs.evaluate_only(cfg, started.run_dir, started.setup)


@hydra.main(version_base="1.3", config_path=jobs.CONF_DIR, config_name="evaluate")
def app(cfg: DictConfig) -> float:
    return jobs.run_job(cfg, main, check=require_target)


if __name__ == "__main__":
    plugins.load_from_argv()  # before Hydra composes: a plugin may store the schema its YAML names
    app()
