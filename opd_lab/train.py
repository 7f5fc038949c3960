"""The main job (``python -m opd_lab``): start → evaluate the untrained baselines → OPD loop → evaluate → save.

With ``eval.only`` set it is the evaluation-only job of an untrained model (a benchmark's base-student or teacher
row). Under torchrun every rank runs this; rank 0 decides the run directory and writes everything.
"""

from __future__ import annotations

import copy
from contextlib import closing
from pathlib import Path

import pandas as pd
import torch

from opd_lab.common import distributed, preemption
from opd_lab.config import Config, staleness_notes
from opd_lab.learner import checkpoint
from opd_lab.learner.evaluation import EvalResult, cached_eval
from opd_lab.learner.heads import Policy
from opd_lab.learner.loop import Run, train
from opd_lab.models.loading import load_model
from opd_lab.models.token_ids import stop_token_ids
from opd_lab.rollout.base import TRAITS
from opd_lab.run import components, jobs
from opd_lab.run.directory import finish_run, keep_until_step, recorded_failure, run_label
from opd_lab.run.tracking import NullTracker, Tracker


def main(cfg: Config, run_dir: Path) -> dict[str, float]:
    """Run one OPD experiment into ``run_dir``; returns the final evaluation metrics of the student."""
    preemption.install()  # in a SLURM job, SIGTERM is a pre-emption notice: stop at a checkpoint
    started = jobs.start(cfg, run_dir)
    if not isinstance(started, jobs.Started):
        return started.get("final", {})
    dist, run_dir, setup = started.dist, started.run_dir, started.setup
    if cfg.eval.only is not None:
        return jobs.evaluate_only(cfg, run_dir, setup)
    for note in staleness_notes(cfg) if dist.is_main else []:
        print(f"opd-lab: {note}", flush=True)
    device = distributed.rank_device(cfg.trainer.device, dist)
    student, teacher = components.load_models(cfg, setup.paths, device)
    if cfg.trainer.compile and dist.is_main:
        print("opd-lab: trainer.compile=true → the student's transformer body runs compiled (torch.compile, inductor) "
              "in the learner's forwards; the first steps include its compilation", flush=True)
    loaded = components.load_teachers(cfg, setup.paths, teacher, device)
    table, frames = evaluate_baselines(cfg, setup, student, loaded, dist)

    state = checkpoint.latest(run_dir, cfg) if started.resume_dir is not None else None
    if dist.is_main:
        keep_until_step(run_dir, state.step if state else 0)
    if state is not None:
        checkpoint.restore_rng(state)
        resume_weights(cfg, state, student, device, dist)
    # rollout.staleness: an in-process engine samples its own copy while the learner updates the student
    in_memory = TRAITS.get(cfg.rollout.engine.value).in_memory
    engine_model = copy.deepcopy(student) if cfg.rollout.staleness and in_memory else None
    policy = distributed.wrap(Policy(student), dist)  # FSDP2 resume loads its shards into this (checkpoint.restore)
    tracker = Tracker(cfg, run_dir, name=f"{run_label(cfg)}-seed{cfg.trainer.seed}",
                      resume_id=state.wandb_id if state else None) if dist.is_main else NullTracker()
    sharded_root = policy if distributed.is_sharded(policy) and not engine_model else None
    engine = components.make_engine(cfg, engine_model or student, setup.tokenizer, setup.paths.student,
                                    setup.tokens.stop, sharded_root=sharded_root)
    teachers = components.make_teachers(cfg, setup.tokenizer, loaded)
    with recorded_failure(run_dir, tracker, dist.is_main), closing(engine), closing(teachers):
        run = Run(cfg, policy, engine, teachers, setup.tokenizer, setup.tokens, setup.task, tracker, run_dir, dist)
        final = train(run, state)
        weights = distributed.gathered_state_dict(policy)  # every rank (FSDP2 gathers); rank 0 saves
        if dist.is_main:
            table["trained_student"] = final
            checkpoint.save_final(student, setup.tokenizer, run_dir / "checkpoint", weights)
            frames += [pd.read_csv(f, dtype={"question": str, "answer": str})
                       for f in sorted((run_dir / "evals").glob("student_step_*.csv"))]
            finish_run(cfg, run_dir, tracker, table, frames, final)
        dist.barrier()
    return final


def evaluate_baselines(cfg: Config, setup: components.Setup, student: torch.nn.Module,
                       teachers: components.LoadedTeachers, dist):
    """pass@k of the untrained student and of each teacher (``eval.baselines``; rank 0; cached across runs by
    :func:`~opd_lab.learner.evaluation.eval_key`): their rows of the result table (``teacher``, or
    ``teacher_<name>`` for each of several ``model.teachers``) and their per-problem frames."""
    table: dict[str, dict[str, float]] = {}
    frames = []
    if cfg.eval.baselines and dist.is_main:
        rows = [("base_student", student, setup.paths.student, None)]
        multi = len(teachers.names) > 1
        rows += [(f"teacher_{n}" if multi else "teacher", m, p, d)
                 for n, m, p, d in zip(teachers.names, teachers.models, teachers.paths, teachers.devices, strict=True)]
        for name, model, path, device in rows:
            stop = stop_token_ids(setup.tokenizer, path)
            moved = teachers.one_at_a_time and model is not None and device is not None
            if moved:
                model.to(device)
            try:
                res: EvalResult = cached_eval(
                    cfg, path, lambda m=model, p=path, s=stop: components.make_engine(cfg, m, setup.tokenizer, p, s),
                    setup.tokenizer, setup.task, stop, device)
            finally:
                if moved:
                    model.to("cpu")
            table[name] = res.metrics
            frames.append(res.per_problem.assign(model=name, step=0))
    dist.barrier()
    return table, frames


def resume_weights(cfg: Config, state: checkpoint.TrainState, student: torch.nn.Module, device: str, dist) -> None:
    """Continue from the checkpoint's weights (the baselines used the base student); FSDP2 shards are loaded later,
    into the wrapped policy."""
    if state.shards is None:
        student.load_state_dict(load_model(str(state.path), cfg.model.dtype, device, trainable=True).state_dict())
    if dist.is_main:
        print(f"opd-lab: resuming from {state.path} (step {state.step})", flush=True)
