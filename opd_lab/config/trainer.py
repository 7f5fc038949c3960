"""The ``trainer``, ``eval`` and ``logger`` groups: optimisation, evaluation, tracking."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from opd_lab.config.base import LRSchedule, _check

DEFAULT_WARMUP_STEPS = 3  # trainer.warmup_steps when unset (fewer when the run is shorter)
DEFAULT_EVAL_K = 8  # eval.ks when unset: pass@1 and pass@8 (pass@n_samples when fewer are drawn)


# ------------------------------------------------------------------------------------------------ trainer
class LossPath(str, Enum):
    plain = "plain"
    chunked = "chunked"


class Parallel(str, Enum):
    """How ranks started by torchrun share the learner (``trainer.parallel``; ignored by a single process)."""

    ddp = "ddp"  # DistributedDataParallel: every rank holds the whole student and its Adam moments
    fsdp2 = "fsdp2"  # fully_shard per decoder layer + root: weights, gradients and Adam moments sharded


class DistBackend(str, Enum):
    auto = "auto"  # nccl on CUDA, gloo on CPU
    nccl = "nccl"
    gloo = "gloo"


@dataclass
class TrainerConfig:
    """Optimisation: ``steps`` rollout batches, each giving reuse × (batch / mini_batch_size) AdamW updates."""

    steps: int = 40
    # a constant 3e-4 lifts pass@1 on the embedded default, then collapses after ~30 steps; cosine decay keeps it
    lr: float = 3e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    # steps of linear warm-up (the schedule counts their AdamW updates); null: 3, or trainer.steps − 1 when the run
    # is shorter (a smoke test's trainer.steps=2 warms up for 1 step); an explicit value must be < trainer.steps
    warmup_steps: int | None = None
    lr_schedule: LRSchedule = LRSchedule.cosine  # after warm-up: cosine decay to min_lr_ratio·lr, or constant
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    loss_path: LossPath = LossPath.chunked  # chunked: LM head over chunk_size positions at a time, recomputed
    chunk_size: int = 1024  # positions per log-sum-exp / LM-head chunk
    checkpoint_every: int = 0  # steps between resumable checkpoints (0: only the final model)
    keep_checkpoints: int = 2  # how many resumable checkpoints to keep (newest)
    resume: str = "never"  # never | auto (this run dir, or the latest unfinished run with the same config) | a run dir
    max_bad_updates: int = 3  # abort after this many consecutive updates skipped for a non-finite loss/grad norm
    autocast_bf16: bool = False  # bf16 autocast of the student forward, π_old included (log-prob maths stays float32)
    # torch.compile (inductor, dynamic shapes) of the student's transformer body for the learner's and π_old's
    # forwards (loss_path=chunked); costs a compilation in the first steps (docs/speed.md)
    compile: bool = False
    parallel: Parallel = Parallel.ddp  # under torchrun: ddp | fsdp2 (docs/scaling.md)
    dist_backend: DistBackend = DistBackend.auto
    dist_timeout_min: int = 30  # a collective waiting longer than this fails the run (a dead rank)

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "trainer.steps", self.steps, "an integer >= 0")
        if self.warmup_steps is None:
            self.warmup_steps = min(DEFAULT_WARMUP_STEPS, max(self.steps - 1, 0))
        _check(self.lr > 0, "trainer.lr", self.lr, "lr > 0")
        _check(self.weight_decay >= 0, "trainer.weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "trainer.beta1/beta2", (self.beta1, self.beta2),
               "values in [0, 1)")
        _check(self.warmup_steps >= 0, "trainer.warmup_steps", self.warmup_steps, ">= 0")
        _check(self.steps == 0 or self.warmup_steps < self.steps, "trainer.warmup_steps", self.warmup_steps,
               f"fewer than trainer.steps={self.steps} (warm-up would take every update of the run)")
        _check(0 <= self.min_lr_ratio <= 1, "trainer.min_lr_ratio", self.min_lr_ratio, "0 <= min_lr_ratio <= 1")
        _check(self.grad_clip is None or self.grad_clip > 0, "trainer.grad_clip", self.grad_clip, "null or > 0")
        _check(self.grad_accum >= 1, "trainer.grad_accum", self.grad_accum, "an integer >= 1")
        _check(not (self.compile and self.loss_path == LossPath.plain), "trainer.compile", self.compile,
               "false with trainer.loss_path=plain (the plain path runs the whole model eagerly; use chunked)")
        _check(not (self.compile and self.parallel == Parallel.fsdp2), "trainer.compile", self.compile,
               "false with trainer.parallel=fsdp2 (a compiled body under FSDP2 is not tested; ddp or one process)")
        _check(self.checkpoint_every >= 0, "trainer.checkpoint_every", self.checkpoint_every,
               "0 (final model only) or a step interval >= 1")
        _check(self.keep_checkpoints >= 1, "trainer.keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
        _check(bool(self.resume), "trainer.resume", self.resume, "never, auto, or a run directory")
        _check(self.max_bad_updates >= 1, "trainer.max_bad_updates", self.max_bad_updates, "an integer >= 1")
        _check(self.device == "cpu" or self.device.startswith("cuda"), "trainer.device", self.device,
               "'cpu' or 'cuda[:i]'")
        _check(self.chunk_size >= 1, "trainer.chunk_size", self.chunk_size, "an integer >= 1")
        _check(self.dist_timeout_min >= 1, "trainer.dist_timeout_min", self.dist_timeout_min, "an integer >= 1")
        _check(self.dist_backend != DistBackend.nccl or self.device.startswith("cuda"), "trainer.dist_backend",
               self.dist_backend.value, "gloo or auto with trainer.device=cpu (nccl needs CUDA)")
        _check(not (self.parallel == Parallel.fsdp2 and self.device.startswith("cuda")
                    and self.dist_backend == DistBackend.gloo), "trainer.dist_backend", self.dist_backend.value,
               "nccl or auto with trainer.parallel=fsdp2 on CUDA (FSDP2's collectives on CUDA tensors need NCCL; "
               "gloo crashed on an H100)")


# ----------------------------------------------------------------------------------------------- evaluate
class EvalTarget(str, Enum):
    student = "student"
    teacher = "teacher"


@dataclass
class EvalConfig:
    """pass@k on the held-out split with n samples per problem (unbiased estimator).

    ``only`` makes the run evaluation-only: null trains then evaluates; ``student``/``teacher`` evaluates that
    untrained model and trains nothing (the two untrained variants of a benchmark, whatever ``trainer.steps``).
    """

    n_samples: int = 8
    ks: list[int] | None = None  # null: [1, 8], or [1, n_samples] when fewer than 8 samples are drawn
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 1234
    every: int = 0
    baselines: bool = True
    only: EvalTarget | None = None
    checkpoint: str | None = None  # evaluation only: a saved model folder to evaluate instead of eval.only
    limit: int | None = None  # the first N held-out problems only (a quick look; null: the whole held-out split)

    def __post_init__(self) -> None:
        _check(self.n_samples >= 1, "eval.n_samples", self.n_samples, "an integer >= 1")
        if self.ks is not None:  # null is resolved by to_run_config (default_ks): the schema's own default is null
            _check(len(self.ks) > 0 and all(1 <= k <= self.n_samples for k in self.ks), "eval.ks", self.ks,
                   f"a non-empty list of k with 1 <= k <= eval.n_samples={self.n_samples}")
            _check(len(set(self.ks)) == len(self.ks), "eval.ks", list(self.ks), "distinct values of k")
        _check(self.temperature > 0, "eval.temperature", self.temperature, "temperature > 0")
        _check(0 < self.top_p <= 1, "eval.top_p", self.top_p, "0 < top_p <= 1")
        _check(self.limit is None or self.limit >= 1, "eval.limit", self.limit, "null or an integer >= 1")
        _check(self.every >= 0, "eval.every", self.every, "0 (only at the end) or a step interval >= 1")

    def default_ks(self) -> list[int]:
        """``eval.ks`` when unset: [1, 8], or [1, n_samples] when fewer than 8 samples are drawn."""
        return sorted({1, min(DEFAULT_EVAL_K, self.n_samples)})


# ------------------------------------------------------------------------------------------------- logger
class WandbMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "opd-lab"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True
    verbose: bool = False  # true: libraries' log lines, warnings and bars on the console too (always in the log file)
