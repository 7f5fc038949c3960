"""Pre-emption of a SLURM job: the scheduler's SIGTERM is a notice, the run stops at a checkpoint, the requeue resumes.

When SLURM pre-empts or requeues a job (``scontrol requeue``, a pre-emption with ``PreemptMode=REQUEUE``, a node
drain) it sends SIGTERM to every process of the job and SIGKILL ``KillWait``/``GraceTime`` seconds later. Inside a
submitit job the main process ignores SIGTERM (submitit's own notice is USR2, before a time-out), but every child
process dies at once: the wandb service among them, so the next ``wandb.log`` raised ``ConnectionResetError``, the
run was recorded as failed and submitit reported the job as finished with that error while SLURM was re-queueing it.

Here a SIGTERM in a SLURM job only sets :data:`NOTICE` (the previous handler still runs). From then on the tracker
writes ``metrics.jsonl`` alone, and the training loop, at the end of the current step, saves a checkpoint and
raises :class:`Preempted`. It is a ``SystemExit``: neither Hydra nor submitit records it as the job's result, so
the sweep keeps waiting and the re-queued job (same run directory, ``trainer.resume=auto``) continues from that
checkpoint — or from the last periodic one if SIGKILL came first. ``status.json`` says ``preempted`` meanwhile.
"""

from __future__ import annotations

import os
import signal
import threading

NOTICE = threading.Event()


class Preempted(SystemExit):
    """The run stopped at a checkpoint after the scheduler's pre-emption notice (exit status 143 = 128 + SIGTERM)."""

    def __init__(self, step: int) -> None:
        super().__init__(143)
        self.step = step

    def __str__(self) -> str:
        return f"pre-empted by the scheduler (SIGTERM); checkpoint at step {self.step}"


def in_slurm_job(env=os.environ) -> bool:
    return "SLURM_JOB_ID" in env


def install(env=os.environ) -> bool:
    """In a SLURM job's main thread, make SIGTERM a pre-emption notice (chained to the previous handler);
    returns whether it did. Elsewhere SIGTERM keeps its meaning. Outside the training loop (the baselines'
    evaluation, the final one) a notice changes nothing: SIGKILL follows, and the requeue starts that part again."""
    if not in_slurm_job(env) or threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "_opd_notice", False):
        return True

    def notice(signum, frame):
        NOTICE.set()
        if callable(previous):  # submitit's: it logs the signal
            previous(signum, frame)

    notice._opd_notice = True
    signal.signal(signal.SIGTERM, notice)
    return True


def noticed() -> bool:
    return NOTICE.is_set()
