"""The OPD loop, on one screen: rollout → π_old and teacher scores → R passes of gated updates → sync the engine →
log → (evaluate) → (checkpoint). Each piece lives in its own module: pipeline.py (the rollout batches, synchronous
or ``rollout.staleness`` steps ahead), scoring.py (the scored batch), update.py (the passes of optimizer updates),
monitors.py (guard, collapse signals, memory), checkpoint.py (save, restore), evaluation.py (pass@k).

Under torchrun every rank draws the same prompts and rolls out its contiguous share (distributed.py); the logged
metrics are over all ranks, so every rank holds the same numbers and rank 0 writes them.
"""

from __future__ import annotations

import random
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch

from opd_lab.common import preemption
from opd_lab.common.distributed import SINGLE, Dist, unwrap
from opd_lab.config import Config
from opd_lab.core.optim import adamw_with_schedule
from opd_lab.learner import checkpoint
from opd_lab.learner.evaluation import run_eval
from opd_lab.learner.monitors import UpdateGuard, collapse_signals, cuda_memory, rollout_metrics
from opd_lab.learner.scoring import old_stats, proximal_stats, score_batch, score_proximal
from opd_lab.learner.update import old_scoring_plan, proximal_plan, train_step
from opd_lab.models.token_ids import TokenIds
from opd_lab.rollout.base import TRAITS, RolloutBatch, RolloutEngine, SamplingSpec
from opd_lab.rollout.pipeline import Rollouts
from opd_lab.tasks import Task, prompt_encoder


@dataclass
class Run:
    """What the loop drives: the (possibly DDP/FSDP2-wrapped) :class:`~opd_lab.learner.heads.Policy`, the engine,
    the teachers (:class:`~opd_lab.learner.teachers.Teachers`: one, or several and their routing), the task and its
    tokenizer, the tracker and the run directory."""

    cfg: Config
    policy: torch.nn.Module
    engine: RolloutEngine
    teachers: object
    tokenizer: object
    tokens: TokenIds
    task: Task
    tracker: object
    run_dir: Path
    dist: Dist = SINGLE


def train(run: Run, state: checkpoint.TrainState | None = None) -> dict[str, float]:
    """``trainer.steps`` OPD steps (continuing from ``state``); returns the last evaluation's metrics."""
    cfg, dist = run.cfg, run.dist
    optimizer, scheduler = make_optimizer(cfg, run.policy)
    sampler, guard = random.Random(cfg.trainer.seed), UpdateGuard(cfg.trainer.max_bad_updates)
    snapshots = checkpoint.restore(state, run.policy, optimizer, scheduler, sampler, guard, dist) if state else {}
    if state is not None and state.routing_weights is not None:
        run.teachers.weights = torch.tensor(state.routing_weights, dtype=torch.float64)
    if aligning(run):  # the alignment probe set is held out from training
        from opd_lab.diagnostic.teacher_weights import reserve_probe

        reserve_probe(cfg, run.task)
    rollouts = make_rollouts(run, sampler)
    start = state.step if state else 0
    rollouts.start(start, snapshots, engine_version=None if state else 0)
    final: dict[str, float] = {}
    with closing(rollouts):
        bar = progress(cfg, start, dist)
        for step in bar:
            t0 = time.perf_counter()
            batch, rollout_stats = rollouts.get(step)
            align = refresh_teacher_weights(run, rollouts, step)  # routing.rule=alignment, every N steps
            old_rows, deferred = old_scoring_plan(cfg, step, batch.size, rollouts.current(step), dist)
            with rollouts.behaviour(step):  # π_old = π_b: the policy that sampled the batch
                scored = score_batch(cfg, run.policy, run.teachers, batch, run.tokens, old_rows, dist,
                                     deferred_rows=deferred)
            prox = proximal_plan(cfg, step, batch.size, rollouts.current(step), dist)
            if prox is not None:  # a stale batch whose loss or gate reads π_prox: the weights at the step's start
                score_proximal(cfg, run.policy, scored, *prox)
            t1 = time.perf_counter()
            metrics = train_step(cfg, run.policy, optimizer, scheduler, scored, step, dist)
            t2 = time.perf_counter()
            if deferred is not None:  # the first update supplied the deferred rows' π_old
                scored.stats |= old_stats(scored, dist)
            if prox is not None:  # … or their π_prox
                scored.stats |= proximal_stats(scored, dist)
            sync_s = rollouts.after_step(step)
            metrics |= rollout_stats | align | step_metrics(run, batch, scored.stats, (t0, t1, t2), sync_s, scheduler)
            log_step(run, step + 1, metrics, guard)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", len=f"{metrics['response/mean_len']:.0f}")
            if step + 1 == cfg.trainer.steps or (cfg.eval.every and (step + 1) % cfg.eval.every == 0):
                with rollouts.paused():
                    final = evaluate_student(run, step + 1)
            last = step + 1 == cfg.trainer.steps
            periodic = cfg.trainer.checkpoint_every and (step + 1) % cfg.trainer.checkpoint_every == 0 and not last
            preempted = not last and preemption_noticed(run)  # SLURM's SIGTERM: save, stop; the requeue resumes
            if periodic or preempted:
                save_checkpoint(run, step + 1, rollouts, optimizer, scheduler, guard)
            if preempted:
                if dist.is_main:
                    print(f"opd-lab: pre-empted; checkpoint at step {step + 1}, the re-queued job resumes from it",
                          flush=True)
                raise preemption.Preempted(step + 1)
    return final if cfg.trainer.steps else evaluate_student(run, 0)


def save_checkpoint(run: Run, step: int, rollouts: Rollouts, optimizer, scheduler, guard: UpdateGuard) -> None:
    """Everything a resumed run needs after ``step`` steps (checkpoint.py), including the in-flight batches."""
    pending = rollouts.state()
    checkpoint.save(run.run_dir, run.cfg, step, run.policy, run.tokenizer, optimizer, scheduler,
                    pending["sampler"], {"run": guard.run, "total": guard.total}, run.tracker.run_id,
                    run.dist, rollout_snapshots=pending["snapshots"],
                    routing_weights=run.teachers.weights.tolist() if aligning(run) else None)


def preemption_noticed(run: Run) -> bool:
    """Whether the scheduler sent its pre-emption notice (preemption.py); under torchrun or SLURM tasks, on any
    rank, so that all ranks stop at the same step."""
    noticed = preemption.noticed()
    if run.dist.enabled and preemption.in_slurm_job():
        noticed = run.dist.max(float(noticed))[0] > 0
    return noticed


def make_rollouts(run: Run, sampler: random.Random) -> Rollouts:
    """The rollout batches of the run: this rank's share of each step's prompts (every rank draws the same ones),
    sampled synchronously or ``rollout.staleness`` steps ahead in a background thread (inline under torchrun with
    vLLM, whose engines take part in collectives)."""
    cfg, dist = run.cfg, run.dist
    share = dist.shard(cfg.rollout.n_prompts)
    encode = prompt_encoder(cfg)

    def draw(rng: random.Random) -> tuple[list[list[int]], list[str]]:
        problems = run.task.train_problems(cfg.rollout.n_prompts, rng)[share]
        return encode(run.tokenizer, problems), [p.tag for p in problems]

    concurrent = not (dist.enabled and TRAITS.get(cfg.rollout.engine.value).in_process_vllm)
    return Rollouts(run.engine, run.policy, cfg.rollout.staleness, sampler, draw,
                    lambda step: rollout_spec(cfg, step, share.start), concurrent=concurrent,
                    updates_per_step=cfg.rollout.reuse * (cfg.rollout.batch_size // cfg.rollout.mini_batch_size))


def aligning(run: Run) -> bool:
    """Whether the teachers' weights come from gradient alignment (``routing.rule=alignment``, several teachers)."""
    return run.teachers.rule == "alignment"


def refresh_teacher_weights(run: Run, rollouts: Rollouts, step: int) -> dict[str, float]:
    """``routing.rule=alignment``: every ``routing.alignment.every`` steps (from step 0) the teachers' weights are
    the softmax of their alignment on the probe set (teacher_alignment.py), with the engine idle and holding the
    current weights; returns the refresh's metrics (empty on other steps)."""
    if not aligning(run) or step % run.cfg.routing.alignment.every:
        return {}
    from opd_lab.common.distributed import full_params
    from opd_lab.diagnostic.teacher_weights import alignment_weights

    with rollouts.paused(), full_params(run.policy):
        return alignment_weights(run.cfg, unwrap(run.policy).lm, run.engine, run.tokenizer, run.task,
                                 run.tokens.stop, run.teachers, step)


def make_optimizer(cfg: Config, model):
    """AdamW and its schedule, stepped once per optimizer update (``updates_per_step`` per training step)."""
    t = cfg.trainer
    per_step = cfg.rollout.reuse * (cfg.rollout.batch_size // cfg.rollout.mini_batch_size)
    return adamw_with_schedule(model.parameters(), t.lr, (t.beta1, t.beta2), t.weight_decay,
                               t.warmup_steps * per_step, t.steps * per_step, t.lr_schedule.value, t.min_lr_ratio)


def progress(cfg: Config, start: int, dist: Dist):
    from tqdm.auto import tqdm

    return tqdm(range(start, cfg.trainer.steps), desc="OPD", disable=not (cfg.logger.progress and dist.is_main),
                dynamic_ncols=True, initial=start, total=cfg.trainer.steps)


def rollout_spec(cfg: Config, step: int, prompt_offset: int = 0) -> SamplingSpec:
    r = cfg.rollout
    return SamplingSpec(n=r.n_samples, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
                        seed=cfg.trainer.seed * 1_000_003 + step, prompt_offset=prompt_offset)


def step_metrics(run: Run, batch: RolloutBatch, score_stats: dict, times: tuple[float, float, float],
                 sync_s: float, scheduler) -> dict[str, float]:
    """The rollout's and the scoring's statistics, response lengths and collapse fractions, timings, LR, memory."""
    t0, t1, t2 = times
    response, n_tok = rollout_metrics(batch, run.dist)
    now = time.perf_counter()
    return {**batch.stats, **score_stats, **response,
            "time/learner_s": t2 - t1, "time/sync_s": sync_s, "time/step_s": now - t0,
            "learner/tokens_per_s": n_tok * run.cfg.rollout.reuse / max(t2 - t1, 1e-9),
            "tokens_per_s": n_tok / max(now - t0, 1e-9), "lr": scheduler.get_last_lr()[0],
            **cuda_memory(unwrap(run.policy).lm)}


def log_step(run: Run, step: int, metrics: dict[str, float], guard: UpdateGuard) -> None:
    """Count skipped updates and collapse signals (warnings on rank 0), log, then abort after too many bad updates."""
    main = run.dist.is_main
    metrics["guard/consecutive_bad_updates"] = guard.update(step, metrics, warn=main)
    metrics |= collapse_signals(metrics, step, warn=main)
    run.tracker.log(step, metrics)
    guard.check(step, metrics)


def evaluate_student(run: Run, step: int) -> dict[str, float]:
    """pass@k of the current student (every rank: FSDP2 sampling gathers across ranks); rank 0 logs it and writes
    ``evals/student_step_<step>.csv``."""
    res = run_eval(run.cfg, run.engine, run.tokenizer, run.task)
    if run.dist.is_main:
        run.tracker.log(step, {f"eval/{k}": v for k, v in res.metrics.items()})
        (run.run_dir / "evals").mkdir(exist_ok=True)
        res.per_problem.assign(model="student", step=step).to_csv(
            run.run_dir / "evals" / f"student_step_{step:06d}.csv", index=False)
    return res.metrics
