"""Data parallelism with torch.distributed: DDP or FSDP2 (``fully_shard``), launched by ``torchrun``.

``torchrun --nproc-per-node=W -m opd_lab ...`` starts W ranks. Every rank draws the same prompts (same sampler
seed), rolls out and scores its contiguous 1/W share of them, and the learner runs each update on the global
mini-batch: the same rows a single process would take, each rank forwarding the ones it holds.

What must be global for the update to equal the single-process one (docs/methods.md's token mean and gate
normalisation are ratios of sums over the whole mini-batch)::

    loss = Σ_ranks Σ m ĝ ℓ / Σ_ranks Σ m            (ĝ: unit mean over all ranks' valid tokens; token mean)

Each rank back-propagates its unnormalised Σ m g ℓ; DDP / FSDP2 average the gradients over the W ranks during
the backward of the last micro-batch (earlier ones accumulate locally: ``no_sync`` /
``set_requires_gradient_sync(False)``), so the learner divides by Z / W with Z = Σ_ranks Σ m, the all-reduced
token count (the gates' normaliser, Σ m g before the unit-mean division and any clip, is all-reduced in a
no-grad pre-pass when an update spans several micro-batches).
Every rank runs the same number of forward and backward passes per update (FSDP2 all-gathers inside each one):
a rank with fewer rows of a mini-batch runs zero-weight micro-batches. Metrics are all-reduced sums, so every
rank holds the same numbers; only rank 0 writes them (wandb, ``metrics.jsonl``) and the evaluation files
(every rank evaluates: under FSDP2 sampling gathers across ranks). Checkpoints: rank 0 (DDP) or every rank
its shard and rank 0 the rest (FSDP2, checkpoint.py).

Besides torchrun, a multi-task SLURM job started by submitit (``hydra/launcher=slurm_multigpu``) joins the same
way: :func:`env_from_slurm` turns SLURM's task variables into torch's ``env://`` ones.

A single process uses :data:`SINGLE`: no collectives, no wrapper, the code path the rest of the project tests.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` (``local_rank`` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp2
    enabled: bool = False  # started by torchrun (or SLURM tasks): a process group, even with one rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------ collectives
    def _reduce(self, values, op: str) -> list[float]:
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device())
        torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
        return t.cpu().tolist()

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over ranks (float64)."""
        return self._reduce(values, "SUM")

    def max(self, *values: float) -> list[float]:
        return self._reduce(values, "MAX")

    def min(self, *values: float) -> list[float]:
        return self._reduce(values, "MIN")

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank (any picklable object)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def comm_device(self) -> str:
        return f"cuda:{self.local_rank}" if torch.distributed.get_backend() == "nccl" else "cpu"

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (``n`` divisible by ``world``)."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


SINGLE = Dist()


def launched_world() -> int | None:
    """``WORLD_SIZE`` set by torchrun (None when started as a plain process)."""
    return int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None


def env_from_slurm(env=os.environ) -> bool:
    """A multi-task SLURM job started by submitit (``hydra/launcher=slurm_multigpu``) has no torchrun: set torch's
    ``env://`` variables from SLURM's (rank, world size, local rank; the job's first node as the master, a port
    derived from the job id). Returns whether it did; torchrun's own variables always win."""
    if "WORLD_SIZE" in env or env.get("SUBMITIT_EXECUTOR") != "slurm" or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return False
    from submitit import JobEnvironment

    job = JobEnvironment()
    env.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank))
    env.setdefault("MASTER_ADDR", job.hostnames[0])
    env.setdefault("MASTER_PORT", str(20000 + int(env["SLURM_JOB_ID"]) % 20000))
    return True


def init(strategy: str, device: str, backend: str = "auto", timeout_min: int = 30) -> Dist:
    """Join the torchrun (or multi-task SLURM) job, if any: the process group and this rank's device. A plain
    process gets SINGLE; ``torchrun --nproc-per-node=1`` a one-rank group (the DDP/FSDP2 code path on one GPU)."""
    env_from_slurm()
    world = launched_world()
    if world is None:
        return SINGLE
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):  # "cuda": one GPU per rank (cuda:<local_rank>); "cuda:i": all ranks on GPU i
        torch.cuda.set_device(local if device == "cuda" else int(device.split(":")[1]))
    if not torch.distributed.is_initialized():  # once per process: a --multirun's later jobs reuse the group
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))
        atexit.register(_shutdown)
    return Dist(rank=rank, world=world, local_rank=local, strategy=strategy, enabled=True)


def rank_device(device: str, dist: Dist) -> str:
    """``cuda`` → ``cuda:<local_rank>`` under torchrun (one GPU per rank); anything else unchanged."""
    if dist.enabled and device == "cuda":
        return f"cuda:{dist.local_rank}"
    return device


def _shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------- wrapping
def wrap(policy: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """``policy`` (a :class:`opd_lab.learner.loop.Policy`) under DDP or FSDP2; unchanged for a single process.

    FSDP2: every decoder layer is its own ``fully_shard`` unit and the root (embeddings, final norm, LM head)
    another, so at most one layer's full parameters exist beyond the root's.
    """
    if not dist.enabled:
        return policy
    if dist.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        dev = next(policy.parameters()).device
        return DistributedDataParallel(policy, device_ids=[dev.index] if dev.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in policy.lm.base_model.layers:
        fully_shard(layer)
    fully_shard(policy)
    # FSDP2 sets up its root lazily in the first forward through the root; π_old scoring and HF sampling call
    # the layers before that, so set it up now (private API: no public one exists as of torch 2.13).
    policy._get_fsdp_state()._lazy_init()
    return policy


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The :class:`Policy` inside a DDP wrapper (FSDP2 shards in place)."""
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


def grad_sync(model: torch.nn.Module, enabled: bool):
    """Context: gradients of the backward passes inside are (not) reduced across ranks."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def paused():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return paused()
    return contextlib.nullcontext()


@contextlib.contextmanager
def full_params(model: torch.nn.Module):
    """No-grad calls that bypass the root's forward (π_old scoring, HF generate) see full root parameters
    under FSDP2 (its layers gather themselves in their own forward hooks); a no-op otherwise (``None`` too)."""
    if is_sharded(model):
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    else:
        yield


def is_sharded(model: torch.nn.Module) -> bool:
    return hasattr(model, "unshard") and hasattr(model, "reshard")


def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Under FSDP2, the language model's full state dict gathered from the shards (every rank must call it;
    keys are the Hugging Face model's own); None otherwise, where the module's own weights are complete."""
    if not is_sharded(model):
        return None
    lm = unwrap(model).lm
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    if getattr(lm.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the embedding, under its other name (save_pretrained drops it too)
    return state
