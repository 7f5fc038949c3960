"""Where the loop's rollout batches come from: synchronous, or ``rollout.staleness`` = k steps ahead, generated in
a background thread while the learner trains (docs/methods.md, "Asynchronous rollouts").

Versions: v_s are the weights after s steps. The batch of step s is sampled from v_{max(0, s−k)}: with k = 0 from
the current weights, exactly the synchronous loop; with k ≥ 1 the engine generates batch s + k from v_s while
the learner trains on batch s, so its staleness is min(s, k) steps. π_old is the policy that sampled the batch:
the learner keeps a snapshot of each version some pending batch was sampled from and scores π_old with it
(:meth:`Rollouts.behaviour`). The engine always holds the newest weights it was given: it is synced after every
step, then starts the next batch; evaluation waits until it is idle.

Everything is deterministic, whatever the threads' timing: prompts are drawn in batch order from the sampler,
every (prompt, sample) has its own seeded stream, and a checkpoint stores the sampler state before the first
pending batch and the snapshots of the versions the pending batches use, so a resumed run regenerates its
in-flight batches exactly (:meth:`state`, and :meth:`start` with the checkpoint's snapshots).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from opd_lab.common.distributed import gathered_state_dict, is_sharded, unwrap
from opd_lab.rollout.base import RolloutBatch


class Rollouts:
    """The rollout batches of steps ``start``, ``start + 1``, … for the loop.

    ``draw(sampler)`` returns one step's prompts (token ids, this rank's share), or ``(prompts, tags)`` with each
    prompt's problem tag (per-sample routing), and ``spec(step)`` its SamplingSpec; ``concurrent=False`` runs
    every generation inline at the moment it would have started (the same batches: used where a background thread
    cannot run the engine, e.g. vLLM under torchrun).
    """

    def __init__(self, engine, policy, staleness: int, sampler: random.Random, draw: Callable, spec: Callable,
                 concurrent: bool = True, updates_per_step: int = 1) -> None:
        self.engine, self.policy, self.k, self.updates_per_step = engine, policy, staleness, updates_per_step
        self.sampler, self.draw, self.spec = sampler, draw, spec
        self.concurrent = concurrent and staleness > 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts") if self.concurrent else None
        self.pending: dict[int, Future | RolloutBatch] = {}  # step → its batch (or the generation in flight)
        self.sampler_before: dict[int, tuple] = {}  # step → the sampler state before its prompts were drawn
        self.snapshots: dict[int, list[torch.Tensor]] = {}  # version → this rank's parameter tensors
        self.engine_version: int | None = 0  # the version the engine holds (None: unknown)
        self.wait_s = 0.0  # time the learner waited for the engine since the last batch was handed out

    # ------------------------------------------------------------------------------------------- versions
    def version(self, step: int) -> int:
        """The weights the batch of ``step`` is sampled from: v_{max(0, step − k)}."""
        return max(0, step - self.k)

    def start(self, step: int, snapshots: dict[int, list[torch.Tensor]] | None = None,
              engine_version: int | None = 0) -> None:
        """Begin at ``step`` (the current weights are v_step; the engine holds ``engine_version``, None when
        unknown: a resumed run). With k ≥ 1 the batches ``step .. step + k`` are put in flight, each from its
        version (resuming: the older versions come from the checkpoint's ``snapshots``)."""
        self.engine_version = engine_version
        if not self.k:
            self._sync_engine(step)
            return
        params = list(self.policy.parameters())
        restored = {v: [_like(p, t) for p, t in zip(params, ts, strict=True)] for v, ts in (snapshots or {}).items()}
        self.snapshots = {**restored, step: self._take()}  # v_step: the current weights
        for s in range(step, step + self.k + 1):
            self._sync_engine(self.version(s), live=self.version(s) == step)
            self._submit(s)

    def get(self, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        """The batch of ``step`` (waiting for it if it is still being generated) and its rollout metrics."""
        if step not in self.pending:  # synchronous: generate it now from the current weights
            self._submit(step)
        batch = self._result(self.pending.pop(step))
        self.sampler_before.pop(step, None)
        gen_s = batch.stats.get("rollout/seconds", 0.0)
        stale = step - self.version(step)
        stats = {"rollout/staleness": float(stale), "rollout/staleness_updates": float(stale * self.updates_per_step),
                 "time/rollout_wait_s": self.wait_s,
                 "time/rollout_hidden_frac": max(0.0, 1.0 - self.wait_s / gen_s) if gen_s > 0 else 0.0}
        self.wait_s = 0.0
        return batch, stats

    def current(self, step: int) -> bool:
        """Whether the batch of ``step`` was sampled by the current weights (π_old = π_θ before the first update)."""
        return self.version(step) == step

    def behaviour(self, step: int):
        """Context: the policy that sampled the batch of ``step`` (its snapshot swapped into the learner's modules)
        for π_old scoring; the current weights are back afterwards."""
        return contextlib.nullcontext() if self.current(step) else self._swapped(self.snapshots[self.version(step)])

    def after_step(self, step: int) -> float:
        """Step ``step`` is done (the weights are v_{step+1}): keep a snapshot if a pending batch will use them, drop
        the ones no batch needs, sync the engine (once it is idle) and put batch ``step + 1 + k`` in flight.
        Returns the seconds the weight sync took."""
        nxt = step + 1
        if self.k:
            self.snapshots[nxt] = self._take()
            for v in [v for v in self.snapshots if v < self.version(nxt)]:
                del self.snapshots[v]
        sync_s = self._sync_engine(nxt)
        if self.k:
            self._submit(nxt + self.k)
        return sync_s

    @contextlib.contextmanager
    def paused(self):
        """Evaluation: wait until the engine is idle (it holds the newest weights, synced by :meth:`after_step`)."""
        self._idle()
        yield

    # ---------------------------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        """What a resumed run needs to regenerate the pending batches: the sampler before the first of them, and
        the snapshots of the versions they were sampled from (older than the current weights)."""
        first = min(self.sampler_before) if self.sampler_before else None
        return {"sampler": self.sampler_before[first] if first is not None else self.sampler.getstate(),
                "snapshots": {v: [_local(t) for t in ts] for v, ts in self.snapshots.items()
                              if first is not None and self.version(first) <= v < first}}

    # ------------------------------------------------------------------------------------------- internals
    def _take(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.policy.parameters()]

    def _sync_engine(self, version: int, live: bool = True) -> float:
        """Give the engine the weights v_version (the live ones, or a snapshot swapped in for the sync) once it is
        idle; nothing when it holds them already."""
        t0 = time.perf_counter()
        self._idle()
        self.wait_s += time.perf_counter() - t0
        if version == self.engine_version:
            return 0.0
        with contextlib.nullcontext() if live else self._swapped(self.snapshots[version]):
            sync_s = self.engine.sync_weights(unwrap(self.policy).lm, gathered_state_dict(self.policy))
        self.engine_version = version
        return sync_s

    @contextlib.contextmanager
    def _swapped(self, snapshot: list[torch.Tensor]):
        """The snapshot's values copied into the parameters (and the live values back afterwards). By value, not
        by rebinding ``p.data``: FSDP2 gathers from its own sharded storage, which a rebinding never reaches; and
        FSDP2's root keeps its gathered parameters after a forward, so it is resharded at both ends of the swap
        (the next forward gathers the values in place now)."""
        sharded = is_sharded(self.policy)
        params = list(self.policy.parameters())
        with torch.no_grad():
            if sharded:
                self.policy.reshard()
            live = self._take()
            for p, s in zip(params, snapshot, strict=True):
                p.detach().copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                if sharded:
                    self.policy.reshard()
                for p, d in zip(params, live, strict=True):
                    p.detach().copy_(d)

    def _submit(self, step: int) -> None:
        self.sampler_before[step] = self.sampler.getstate()
        drawn, spec = self.draw(self.sampler), self.spec(step)
        prompts, tags = drawn if isinstance(drawn, tuple) else (drawn, [])
        if self.pool is None:  # inline: the learner waits for the whole generation
            t0 = time.perf_counter()
            self.pending[step] = self._generate(prompts, tags, spec)
            self.wait_s += time.perf_counter() - t0
        else:
            self.pending[step] = self.pool.submit(self._generate, prompts, tags, spec)

    def _generate(self, prompts: list[list[int]], tags: list[str], spec) -> RolloutBatch:
        batch = self.engine.generate(prompts, spec)
        batch.prompt_tags = list(tags)
        return batch

    def _idle(self) -> None:
        """Wait for the generation in flight (if any) to finish."""
        for item in list(self.pending.values()):
            if isinstance(item, Future):
                item.result()

    def _result(self, item) -> RolloutBatch:
        if isinstance(item, Future):
            t0 = time.perf_counter()
            batch = item.result()
            self.wait_s += time.perf_counter() - t0
            return batch
        return item

    def close(self) -> None:
        if self.pool is not None:
            self._idle()
            self.pool.shutdown(wait=True)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A snapshot tensor as a plain CPU tensor (an FSDP2 parameter's local shard)."""
    return (t.to_local() if hasattr(t, "to_local") else t).detach().cpu()


def _like(param: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A restored snapshot tensor in the form of ``param`` (device, and the DTensor sharding under FSDP2)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(t.to(param.to_local().device), param.device_mesh, param.placements)
    return t.to(param.device)
