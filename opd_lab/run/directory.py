"""A run directory's bookkeeping: its status file, what a resumed run keeps, failure records, the final
evaluation tables and the printed result table (shared by the training and evaluation jobs)."""

from __future__ import annotations

import json
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from opd_lab.common import atomic
from opd_lab.common.preemption import Preempted, in_slurm_job
from opd_lab.config import Config
from opd_lab.learner.evaluation import benchmark_csv
from opd_lab.run.tracking import Tracker, gate_name, read_metrics


def write_status(run_dir: Path, status: str, **extra) -> None:
    """``status.json`` (running / completed / failed / preempted / interrupted), written atomically: a reader never
    sees half."""
    atomic.write_text(run_dir / "status.json", json.dumps({"status": status, **extra}, default=str))


def keep_until_step(run_dir: Path, step: int) -> None:
    """Drop what a killed run logged after its last checkpoint (``metrics.jsonl`` lines, per-step evaluations),
    so a resumed run's records continue from ``step`` exactly as an uninterrupted run's would."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        kept = [r for r in read_metrics(path) if r.get("step", step + 1) <= step]
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    for f in (run_dir / "evals").glob("student_step_*.csv"):
        if int(f.stem.rsplit("_", 1)[1]) > step:
            f.unlink()


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def resume_command(run_dir: Path) -> str:
    """The command that continues this run (a sweep: the whole sweep, whose completed jobs return at once)."""
    keep = [a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "hydra.sweep.dir=", "trainer.resume="))]
    where = f"hydra.sweep.dir={run_dir.parent}" if in_multirun() else f"hydra.run.dir={run_dir}"
    return shlex.join(["python", "-m", "opd_lab", *keep, where, "trainer.resume=auto"])


@contextmanager
def recorded_failure(run_dir: Path, tracker: Tracker, writes: bool = True):
    """On any exception: ``status.json`` says failed with the error (unless ``writes`` is off: torchrun ranks other
    than 0), the wandb run is marked failed, and the exception goes on; Ctrl-C says ``interrupted``, prints one line
    with the resume command and exits with 130. A SLURM pre-emption
    (:class:`~opd_lab.common.preemption.Preempted`) says ``preempted`` and leaves the wandb run to its resumed job."""
    try:
        yield
    except BaseException as e:
        if isinstance(e, Preempted) or (isinstance(e, SystemExit) and in_slurm_job()):
            # the scheduler's signal (a SystemExit: submitit's own exit after it re-queued a timed-out job):
            # resumable, and the wandb service got the signal too
            if writes:
                write_status(run_dir, "preempted", error=str(e) if isinstance(e, Preempted) else
                             "stopped by the scheduler's signal after submitit re-queued the job")
            raise
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C: one line and the way back, no traceback
            if writes:
                write_status(run_dir, "interrupted", error="KeyboardInterrupt (Ctrl-C)")
                print(f"\nopd-lab: interrupted; resume from the last checkpoint with: {resume_command(run_dir)}",
                      file=sys.stderr, flush=True)
            tracker.finish(1)
            raise SystemExit(130) from None
        if writes:
            write_status(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        tracker.finish(1)
        raise


def run_label(cfg: Config) -> str:
    """The variant's name: ``cfg.variant`` or ``<loss>-<gate>`` (``eval-<target>`` for an evaluation-only run)."""
    if cfg.variant:
        return cfg.variant
    if cfg.eval.only is not None:
        return f"eval-{cfg.eval.only.value}"
    return f"{cfg.loss.name}-{gate_name(cfg.gate)}"


def format_table(rows: dict[str, dict[str, float]], ks: list[int]) -> str:
    cols = [f"pass@{k}" for k in ks] + ["truncated_frac"]
    lines = [f"{'model':<16}" + "".join(f"{c:>15}" for c in cols)]
    for name, m in rows.items():
        lines.append(f"{name:<16}" + "".join(f"{m[c]:>15.4f}" for c in cols))
    return "\n".join(lines)


def finish_run(cfg: Config, run_dir: Path, tracker: Tracker, table: dict[str, dict[str, float]], frames,
               final: dict[str, float]) -> None:
    """Write the evaluation tables, the wandb summary and ``status.json``; print the table."""
    per_problem = pd.concat(frames)
    per_problem.to_csv(run_dir / "eval_per_problem.csv", index=False)
    benchmark_csv(per_problem, list(cfg.eval.ks)).to_csv(run_dir / "eval_benchmarks.csv", index=False)
    pd.DataFrame([{"model": k, **v} for k, v in table.items()]).to_csv(run_dir / "eval.csv", index=False)
    tracker.summary({f"final/{k}": v for k, v in final.items()}
                    | {f"{n}/{k}": v for n, m in table.items() if n != "trained_student" for k, v in m.items()})
    write_status(run_dir, "completed", final=final, steps=0 if cfg.eval.only else cfg.trainer.steps,
                 variant=run_label(cfg))
    print("\n" + format_table(table, list(cfg.eval.ks)), flush=True)
    print(f"\nrun directory: {run_dir}", flush=True)
    tracker.finish(0)
