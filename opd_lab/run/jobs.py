"""What every job shares: the Hydra entry's config handling, the start of a job (process group, run directory,
set-up), and the evaluation-only job (``python -m opd_lab.evaluate`` and the benchmark's untrained variants).

The apps (``opd_lab.train`` behind ``python -m opd_lab``, ``opd_lab.evaluate``, ``opd_lab.diagnose``,
``opd_lab.report.cli``) import these library pieces, never each other.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from opd_lab.common import console, distributed
from opd_lab.common.distributed import Dist
from opd_lab.config import Config, ConfigError, register_configs, to_run_config
from opd_lab.learner.evaluation import cached_eval
from opd_lab.models.loading import load_model
from opd_lab.models.token_ids import stop_token_ids
from opd_lab.rollout.base import TRAITS
from opd_lab.run import components
from opd_lab.run.directory import finish_run, in_multirun, recorded_failure, run_label, write_status
from opd_lab.run.tracking import Tracker

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()


def config_error(e: ConfigError) -> None:
    """Report a config error: exit 2 in a single run; in a multirun, mark this job failed and let the others go on."""
    from hydra.core.hydra_config import HydraConfig

    print(f"opd-lab: config error: {e}", file=sys.stderr)
    if not in_multirun():
        sys.exit(2)
    out = Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_status(out, "failed", error=f"config error: {e}")
    raise e


def run_job(cfg: DictConfig, main: Callable[[Config, Path], dict[str, float]],
            check: Callable[[Config], None] | None = None) -> float:
    """Validate ``cfg`` (and ``check`` it), then ``main(run_cfg, output_dir)``; a :class:`ConfigError`, raised
    before or during start-up, becomes one line on stderr (:func:`config_error`). Returns the final pass@1."""
    final: dict[str, float] = {}
    try:
        run = to_run_config(cfg)
        components.check_registered(run)
        console.configure(run.logger.verbose)
        chosen = components.resolve_engine(run)
        if chosen and int(os.environ.get("RANK", "0")) == 0:
            print(f"opd-lab: {chosen}", flush=True)
        if check is not None:
            check(run)
        final = main(run, Path(run.output_dir))
    except ConfigError as e:
        config_error(e)
    return final.get("pass@1", float("nan"))


@dataclass
class Started:
    """A job that has its process group, its run directory and its set-up (components.Setup)."""

    dist: Dist
    run_dir: Path
    resume_dir: Path | None
    setup: components.Setup


def start(cfg: Config, run_dir: Path) -> Started | dict:
    """Join the torchrun group (if any), open the run directory and prepare the run; a run that already completed
    returns its final status instead (``trainer.resume``: nothing to do)."""
    dist = distributed.init(cfg.trainer.parallel.value, cfg.trainer.device, cfg.trainer.dist_backend.value,
                            cfg.trainer.dist_timeout_min)
    components.check_launch(cfg, dist, in_multirun())
    run_dir, resume_dir, finished = components.open_run_dir(cfg, run_dir, dist)
    if finished is not None:
        return finished
    return Started(dist, run_dir, resume_dir, components.prepare(cfg, dist))


def evaluate_only(cfg: Config, run_dir: Path, setup: components.Setup) -> dict[str, float]:
    """Evaluate one model with the configured engine and no training: ``eval.checkpoint`` when set, else the
    untrained ``eval.only`` model (a benchmark's base-student/teacher row)."""
    target = cfg.eval.only.value
    path = setup.paths.student if target == "student" else setup.paths.teacher
    name = "base_student" if target == "student" else "teacher"
    if cfg.eval.checkpoint:
        path, name = cfg.eval.checkpoint, "checkpoint"
    tracker = Tracker(cfg, run_dir, name=f"{run_label(cfg)}-seed{cfg.trainer.seed}")
    with recorded_failure(run_dir, tracker):
        stop = stop_token_ids(setup.tokenizer, path)

        def build():
            model = None
            if TRAITS.get(cfg.rollout.engine.value).in_memory:  # vLLM loads the path itself
                model = load_model(path, cfg.model.dtype, cfg.trainer.device, trainable=False)
            return components.make_engine(cfg, model, setup.tokenizer, path, stop)

        res = cached_eval(cfg, path, build, setup.tokenizer, setup.task, stop)
        tracker.log(0, {f"eval/{k}": v for k, v in res.metrics.items()})
        finish_run(cfg, run_dir, tracker, {name: res.metrics}, [res.per_problem.assign(model=name, step=0)],
                   res.metrics)
    return res.metrics
