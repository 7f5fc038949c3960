"""The OPD learner: rollout → π_old and teacher scores → R passes of gated loss over mini-batches → step.

One optimizer update (:func:`optimizer_update`) minimises the gated token-mean over its whole mini-batch

    loss = Σ m ĝ ℓ / Σ m,   ĝ = normalise_gates(exp(−τ(|m_G| − c)))   (c, Σ m g, Σ m over the whole update)

Each micro-batch computes the current log-probs, the drift δ_t = log π_θ − log π_old, the group drifts m_G and
the per-token loss ℓ_t, and back-propagates its share Σ m ĝ ℓ / Σ m. The shift c and the gate mean are scalars
of the whole update (every micro-batch of the mini-batch on every rank): with one micro-batch per rank they come
from that forward (two scalar all-reduces), with several a no-grad pre-pass computes them first. So the update
does not depend on how the mini-batch is split into micro-batches or ranks.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from opd_lab.config import Config, LSMLossConfig
from opd_lab.distributed import SINGLE, Dist, full_params, grad_sync, unwrap
from opd_lab.gates import group_drift, min_abs_drift, normalise_gates, shifted_gate
from opd_lab.losses import LossInputs, get_loss, masked_sum
from opd_lab.optim import adamw_with_schedule
from opd_lab.rollout.base import RolloutBatch, RolloutEngine, SamplingSpec
from opd_lab.scoring import (
    build_support,
    head_stats_chunked,
    head_stats_plain,
    response_hidden,
    response_logits,
    score_student_old,
)
from opd_lab.tokens import TokenIds, special_mask_B_T


# --------------------------------------------------------------------------------------------- step data
@dataclass
class StepData:
    """A scored rollout batch: everything the R passes need, aligned ``[B, T(, S)]``."""

    batch: RolloutBatch
    loss_mask_B_T: torch.Tensor
    newline_B_T: torch.Tensor
    old_logp_B_T: torch.Tensor
    teacher_logp_B_T: torch.Tensor
    support_ids_B_T_S: torch.Tensor | None = None
    teacher_support_logp_B_T_S: torch.Tensor | None = None
    support_mask_B_T_S: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    def rows(self, idx: torch.Tensor, device: torch.device | str = "cpu") -> dict:
        """Rows ``idx`` of every tensor, on ``device`` (the rollout batch itself stays on the CPU)."""
        def pick(t):
            return None if t is None else t[idx].to(device)

        return {
            "batch": self.batch.select(idx),
            "response_mask": pick(self.batch.response_mask_B_T),
            "loss_mask": pick(self.loss_mask_B_T),
            "newline": pick(self.newline_B_T),
            "old_logp": pick(self.old_logp_B_T),
            "teacher_logp": pick(self.teacher_logp_B_T),
            "support_ids": pick(self.support_ids_B_T_S),
            "teacher_support_logp": pick(self.teacher_support_logp_B_T_S),
            "support_mask": pick(self.support_mask_B_T_S),
        }


def update_plan(cfg: Config, step: int, local_rows: int, dist: Dist = SINGLE) -> list[list[torch.Tensor]]:
    """The mini-batches of every pass over a step's rollout batch: ``plan[r][u]`` are this rank's rows of update u
    of pass r (one permutation of the global batch per pass, seeded by the step, so any rank count takes the
    same sequences; W equal, contiguous rank shards of ``local_rows`` rows)."""
    lo = dist.rank * local_rows
    gen = torch.Generator().manual_seed(cfg.trainer.seed * 1_000_003 + step)
    plan = []
    for _ in range(cfg.rollout.reuse):
        perm = torch.randperm(local_rows * dist.world, generator=gen)
        plan.append([mb[(mb >= lo) & (mb < lo + local_rows)] - lo for mb in perm.split(cfg.rollout.mini_batch_size)])
    return plan


def score_batch(cfg: Config, policy, teacher_scorer, batch: RolloutBatch, tokens: TokenIds, step: int = 0,
                score_batch_size: int = 64, dist: Dist = SINGLE) -> StepData:
    """π_old and teacher scores for a rollout batch, the loss mask and (LSM) the support S_t.

    ``policy`` is the learner's (possibly wrapped) :class:`Policy` at the weights that sampled ``batch``. π_old
    is its training forward (:func:`micro_batch_forward`: same precision, same autocast, same micro-batch rows
    and shapes as the first pass of the update ``plan`` of ``step``), so on the first update π_θ = π_old
    exactly: δ ≡ 0 and every gate is 1. Under torchrun ``batch`` is this rank's share and the token-mean
    statistics are over all ranks.
    """
    t0 = time.perf_counter()
    T_s = cfg.rollout.temperature
    lsm = isinstance(cfg.loss, LSMLossConfig)
    support = cfg.loss.support.value if lsm else "teacher"
    need_old_topk = lsm and support in ("student", "union")
    K = cfg.loss.top_k if lsm else 0
    policy = as_policy(policy)
    resp_ids, resp_mask = batch.response_ids_B_T, batch.response_mask_B_T
    special = special_mask_B_T(resp_ids, resp_mask, list(tokens.special), cfg.loss.mask_special.value)
    data = StepData(batch=batch, loss_mask_B_T=resp_mask * (1 - special),
                    newline_B_T=tokens.newline_V[resp_ids].long() * resp_mask,
                    old_logp_B_T=torch.zeros(resp_mask.shape), teacher_logp_B_T=torch.zeros(resp_mask.shape))
    first_pass = update_plan(cfg, step, batch.size, dist)[0]
    with torch.no_grad():
        for mb in first_pass:
            for m in _micro_batches(mb, cfg.trainer.grad_accum, dist):
                _, _, x = micro_batch_forward(cfg, policy, _rows(data, m, _device(policy)), need_loss=False)
                if m is not None:
                    data.old_logp_B_T[m] = x.logp_B_T.float().cpu()
    old_topk = None
    if need_old_topk:  # the student's own top-K ids at rollout time (the student/union support)
        with full_params(policy):
            _, old_topk = score_student_old(unwrap(policy).lm, batch, T_s, K, score_batch_size,
                                            cfg.trainer.chunk_size)
    t1 = time.perf_counter()
    teach = teacher_scorer(batch, K if support != "student" else 0, T_s, old_topk)
    t2 = time.perf_counter()
    data.teacher_logp_B_T = teach.logp_B_T
    if lsm:
        data.support_ids_B_T_S, data.teacher_support_logp_B_T_S, data.support_mask_B_T_S = build_support(
            support, resp_ids, teach, old_topk, cfg.loss.add_sampled_token)
    old_logp = data.old_logp_B_T
    m, lm = resp_mask.bool(), data.loss_mask_B_T.bool()
    n_tok, n_loss, abs_sum, k3_sum, gap_sum, n_special = dist.sum(
        m.sum(), lm.sum(), (batch.sampler_logp_B_T - old_logp)[m].abs().sum(),
        _k3(old_logp - batch.sampler_logp_B_T)[m].sum(),  # k3 estimator of KL(π_s || π_old) on sampled tokens
        (teach.logp_B_T - old_logp)[lm].sum(), special.sum())
    data.stats = {
        "time/score_old_s": t1 - t0,
        "time/score_teacher_s": t2 - t1,
        "score/tokens_per_s": 2 * n_tok / dist.world / max(t2 - t0, 1e-9),
        "mismatch/sampler_old_abs": abs_sum / max(n_tok, 1.0),
        "mismatch/sampler_old_kl": k3_sum / max(n_tok, 1.0),
        "teacher_minus_old_logp": gap_sum / max(n_loss, 1.0),
        "special_masked": n_special,
    }
    return data


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_ratio) - 1 - log_ratio


# ------------------------------------------------------------------------------------ one optimizer step
class Policy(torch.nn.Module):
    """The student's training forward as one module, so that DDP and FSDP2 see every parameter use inside
    ``forward`` (the chunked path reads the LM-head weight directly): returns ``(lse_B_T, z_B_T_K)``, the
    log-sum-exp and the logits at ``ids_B_T_K`` of every response position (scoring.py), float32.

    ``autocast_bf16`` runs the forward (and the chunked head's recomputation in its backward) under bf16
    autocast on the module's device type, CPU included."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, batch: RolloutBatch, ids_B_T_K: torch.Tensor, temperature: float, chunk_size: int,
                loss_path: str, autocast_bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        device_type = next(self.parameters()).device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast_bf16):
            if loss_path == "chunked":
                hidden = response_hidden(self.lm, batch)
                w = self.lm.get_output_embeddings().weight
                return head_stats_chunked(hidden, w, ids_B_T_K, temperature, chunk_size)
            return head_stats_plain(response_logits(self.lm, batch, temperature), ids_B_T_K, chunk_size)


def as_policy(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` if it is a (wrapped) :class:`Policy`, else a :class:`Policy` over the language model ``model``."""
    return model if isinstance(unwrap(model), Policy) else Policy(model)


def _device(policy) -> torch.device:
    return next(policy.parameters()).device


def _rows(data: StepData, m: torch.Tensor | None, device) -> dict:
    """Rows ``m`` of ``data`` on ``device``; ``None`` is a zero-weight micro-batch (local row 0, no valid token)."""
    if m is not None:
        return data.rows(m, device)
    rows = data.rows(torch.zeros(1, dtype=torch.long), device)
    rows["loss_mask"] = torch.zeros_like(rows["loss_mask"])  # with no valid token: every sum below is 0
    return rows


def micro_batch_forward(cfg: Config, policy, rows: dict, need_loss: bool = True):
    """Forward one micro-batch through ``policy`` (:class:`Policy`, maybe DDP/FSDP2-wrapped): per-token loss ℓ_t,
    loss metrics and the loss inputs (with grad); ``need_loss=False`` returns ``(None, {}, inputs)``.

    Only lse_t and the logits at [y_t, S_t] leave the model (``trainer.loss_path`` picks how, see scoring.py).
    """
    batch = rows["batch"]
    t = cfg.trainer
    device = _device(policy)
    ids = batch.response_ids_B_T.to(device).unsqueeze(-1)
    if rows["support_ids"] is not None:
        ids = torch.cat([ids, rows["support_ids"].to(device)], dim=-1)
    lse, z = policy(batch, ids, cfg.rollout.temperature, t.chunk_size, t.loss_path.value, t.autocast_bf16)
    x = LossInputs(
        logp_B_T=z[..., 0] - lse,
        old_logp_B_T=rows["old_logp"],
        teacher_logp_B_T=rows["teacher_logp"],
        mask_B_T=rows["loss_mask"],
        student_lse_B_T=lse,
    )
    if rows["support_ids"] is not None:
        x.support_logits_B_T_S = z[..., 1:]
        x.teacher_support_logp_B_T_S = rows["teacher_support_logp"]
        x.support_mask_B_T_S = rows["support_mask"]
    if not need_loss:
        return None, {}, x
    loss_B_T, metrics = get_loss(cfg.loss.name)(x, cfg.loss)
    return loss_B_T, metrics, x


def _group_drift(cfg: Config, x: LossInputs, rows: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(δ, m_G, sign-cancellation flags) of one micro-batch."""
    delta = (x.logp_B_T - x.old_logp_B_T).detach()
    m_G, cancel = group_drift(delta, x.mask_B_T, rows["response_mask"], cfg.gate.kind.value, cfg.gate.block_size,
                              rows["newline"])
    return delta, m_G, cancel


def _micro_batches(idx: torch.Tensor, grad_accum: int, dist: Dist) -> list[torch.Tensor | None]:
    """This rank's rows ``idx`` in ≤ ``grad_accum`` micro-batches, padded with ``None`` (a zero-weight micro-batch)
    to the largest count on any rank: every rank runs as many forward/backward passes (FSDP2 gathers in each)."""
    micro: list[torch.Tensor | None] = [m for m in torch.tensor_split(idx, grad_accum) if m.numel() > 0]
    n = int(dist.max(len(micro))[0])
    return micro + [None] * (n - len(micro))


def gate_normaliser(cfg: Config, parts: list[tuple[torch.Tensor, torch.Tensor]], dist: Dist) -> tuple[float, float]:
    """The shift c = min |m_G| and the mean Σ m g / Σ m of the shift-stable raw gates over the whole update, from
    the ``(m_G_B_T, loss_mask_B_T)`` of each of this rank's micro-batches (two scalar all-reduces)."""
    shift = dist.min(min((min_abs_drift(m_G, mask) for m_G, mask in parts), default=math.inf))[0]
    z, n = dist.sum(sum(float(masked_sum(shifted_gate(m_G, mask, cfg.gate.tau, shift), mask)) for m_G, mask in parts),
                    sum(float(mask.sum()) for _, mask in parts))
    return shift, z / max(n, 1.0)


def optimizer_update(cfg: Config, policy, optimizer, data: StepData, idx: torch.Tensor,
                     dist: Dist = SINGLE) -> dict[str, float]:
    """One AdamW update on this rank's mini-batch rows ``idx`` (``trainer.grad_accum`` micro-batches).

    Each micro-batch back-propagates Σ m ĝ ℓ · W / N, where ĝ = :func:`~opd_lab.gates.normalise_gates` of the
    shift-stable raw gates with the shift and the mean over the whole update (all micro-batches and ranks) and
    N = Σ_ranks Σ m; DDP/FSDP2 average the gradients over the W ranks. With one micro-batch per rank the
    update's shift and mean come from that forward itself; with several, a no-grad pre-pass computes them first.
    """
    policy = as_policy(policy)
    micro = _micro_batches(idx, cfg.trainer.grad_accum, dist)
    device = _device(policy)
    gated = cfg.gate.kind.value != "none"
    n_valid = dist.sum(sum(float(data.loss_mask_B_T[m].sum()) for m in micro if m is not None))[0]
    norm = None
    if gated and len(micro) > 1:  # the update's gate normaliser before any backward
        with torch.no_grad():
            parts = []
            for m in micro:
                rows = _rows(data, m, device)
                _, _, x = micro_batch_forward(cfg, policy, rows, need_loss=False)
                parts.append((_group_drift(cfg, x, rows)[1], x.mask_B_T))
        norm = gate_normaliser(cfg, parts, dist)

    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = defaultdict(float)
    gates = []
    for i, m in enumerate(micro):
        rows = _rows(data, m, device)
        with grad_sync(policy, i == len(micro) - 1):
            loss_B_T, metrics, x = micro_batch_forward(cfg, policy, rows)
            delta, m_G, cancel = _group_drift(cfg, x, rows)
            mask = x.mask_B_T.to(loss_B_T.device)
            g = torch.ones_like(delta)
            if gated:
                shift, mean = norm if norm is not None else gate_normaliser(cfg, [(m_G, mask)], dist)
                g = normalise_gates(shifted_gate(m_G, mask, cfg.gate.tau, shift), mask, cfg.gate.clip_min,
                                    cfg.gate.clip_max, mean)
            (masked_sum(loss_B_T * g, mask) * (dist.world / max(n_valid, 1.0))).backward()
        sums["loss_sum"] += float(masked_sum(loss_B_T.detach() * g, mask))
        sums["ungated_loss_sum"] += float(masked_sum(loss_B_T.detach(), mask))
        sums["abs_delta_sum"] += float(masked_sum(delta.abs(), mask))
        sums["cancel_sum"] += float(masked_sum(cancel, mask))
        for k, v in metrics.items():
            sums[f"{k}_sum"] += float(masked_sum(v, mask))
        gates.append(g.detach()[mask.bool()])
    keys = sorted(sums)
    totals = dict(zip(keys, dist.sum(*(sums[k] for k in keys)), strict=True))  # one all-reduce for every sum
    grad_norm = torch.nn.utils.clip_grad_norm_(
        policy.parameters(), cfg.trainer.grad_clip if cfg.trainer.grad_clip is not None else math.inf)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    # Guard: a non-finite loss or gradient norm skips this update (the weights and Adam moments stay as they were).
    finite = math.isfinite(totals.get("loss_sum", 0.0)) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)

    n = max(n_valid, 1.0)
    out = {k[: -len("_sum")]: v / n for k, v in totals.items() if k.endswith("_sum")}
    out["grad_norm"] = grad_norm
    out["tokens"] = n_valid
    out["guard/skipped"] = 0.0 if finite else 1.0
    out.update(gate_metrics(torch.cat(gates), dist))
    out["gate/cancel_rate"] = out.pop("cancel")
    out["drift/mean_abs_delta"] = out.pop("abs_delta")
    return out


def gate_metrics(gate_N: torch.Tensor, dist: Dist = SINGLE) -> dict[str, float]:
    """Mean, min, max, std and fraction below 0.5 of the normalised gates ``gate_N`` of all ranks."""
    g = gate_N.double()
    n, s, ss, below = dist.sum(g.numel(), g.sum(), (g * g).sum(), (g < 0.5).sum())
    if not n:
        return {}
    lo = dist.min(g.min() if g.numel() else math.inf)[0]
    hi = dist.max(g.max() if g.numel() else -math.inf)[0]
    mean = s / n
    return {"gate/mean": mean, "gate/min": lo, "gate/max": hi, "gate/std": math.sqrt(max(ss / n - mean * mean, 0.0)),
            "gate/frac_below_0.5": below / n}


def train_step(cfg: Config, policy, optimizer, scheduler, data: StepData, step: int,
               dist: Dist = SINGLE) -> dict[str, float]:
    """R passes over the scored batch in the mini-batches of :func:`update_plan`; metrics averaged over the
    updates (``drift/first_update_mean_abs_delta``: the first update's, 0 when π_old is the current policy).

    The permutation is over the global batch (W equal, contiguous rank shards of ``data.batch.size`` rows), so a
    mini-batch holds the same sequences whatever W is; each rank updates with the rows of it that it holds.
    """
    per_update: list[dict[str, float]] = []
    for pass_ in update_plan(cfg, step, data.batch.size, dist):
        for local in pass_:
            per_update.append(optimizer_update(cfg, policy, optimizer, data, local, dist))
            scheduler.step()
    keys = per_update[0].keys()
    out = {k: sum(u[k] for u in per_update) / len(per_update) for k in keys if k not in ("tokens", "guard/skipped")}
    out["guard/skipped_updates"] = sum(u["guard/skipped"] for u in per_update)
    out["guard/trailing_bad_updates"] = next(
        (i for i, u in enumerate(reversed(per_update)) if not u["guard/skipped"]), len(per_update))
    out["gate/min"] = min(u.get("gate/min", 1.0) for u in per_update)
    out["gate/max"] = max(u.get("gate/max", 1.0) for u in per_update)
    out["drift/first_update_mean_abs_delta"] = per_update[0]["drift/mean_abs_delta"]
    out["drift/last_update_mean_abs_delta"] = per_update[-1]["drift/mean_abs_delta"]
    out["updates"] = len(per_update)
    return out


# ------------------------------------------------------------------------------------------- the loop
class UpdateGuard:
    """Counts consecutive skipped (non-finite) updates across steps; aborts after ``max_bad`` in a row."""

    def __init__(self, max_bad: int) -> None:
        self.max_bad, self.run, self.total = max_bad, 0, 0

    def update(self, step: int, m: dict[str, float], warn: bool = True) -> int:
        """Count a step's skipped updates (saying so on stderr when ``warn``); returns the current run of bad
        updates."""
        skipped = int(m["guard/skipped_updates"])
        self.total += skipped
        self.run = self.run + skipped if skipped == m["updates"] else int(m["guard/trailing_bad_updates"])
        if skipped and warn:
            print(f"opd-lab: step {step}: skipped {skipped}/{int(m['updates'])} updates with a non-finite loss or "
                  f"gradient norm (loss={m['loss']}, grad_norm={m['grad_norm']}, "
                  f"teacher_minus_old_logp={m.get('teacher_minus_old_logp')}); {self.run} bad in a row",
                  file=sys.stderr, flush=True)
        return self.run

    def check(self, step: int, m: dict[str, float]) -> None:
        if self.run >= self.max_bad:
            raise FloatingPointError(
                f"aborting at step {step}: {self.run} consecutive optimizer updates had a non-finite loss or "
                f"gradient norm (trainer.max_bad_updates={self.max_bad}); last loss={m['loss']}, "
                f"grad_norm={m['grad_norm']}. Lower trainer.lr, check the teacher scores, or raise the limit.")


def repetition_B(response_ids_B_T: torch.Tensor, response_mask_B_T: torch.Tensor, n: int = 4) -> torch.Tensor:
    """Bool ``[B]``: a response whose distinct n-grams are under 20% of its n-grams (a degenerate loop)."""
    out = []
    for ids, m in zip(response_ids_B_T, response_mask_B_T.bool(), strict=True):
        toks = ids[m]
        if toks.numel() - n + 1 < 32:
            out.append(False)
            continue
        grams = toks.unfold(0, n, 1)  # [L−n+1, n], no Python tuples: responses run to thousands of tokens
        out.append(torch.unique(grams, dim=0).shape[0] < 0.2 * grams.shape[0])
    return torch.tensor(out, dtype=torch.bool)


def collapse_signals(metrics: dict[str, float], step: int, warn: bool = True) -> dict[str, float]:
    """Warnings worth a look: most responses at the length cap, or most stuck in a repetition loop."""
    rep, trunc = metrics["response/repetition_frac"], metrics["response/truncated_frac"]
    for name, frac in (("at the length cap", trunc), ("repeating themselves (distinct 4-grams < 20%)", rep)):
        if frac > 0.5 and warn:
            print(f"opd-lab: warning: step {step}: {frac:.0%} of responses are {name}: possible collapse",
                  file=sys.stderr, flush=True)
    return {"collapse/warning": float(trunc > 0.5 or rep > 0.5)}


def cuda_memory(model: torch.nn.Module) -> dict[str, float]:
    """Peak CUDA memory of this step on the model's device (GiB; allocated by tensors and reserved by the caching
    allocator), then the peak is reset; nothing on the CPU."""
    dev = next(model.parameters()).device
    if dev.type != "cuda":
        return {}
    out = {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated(dev) / 2**30,
           "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(dev) / 2**30}
    torch.cuda.reset_peak_memory_stats(dev)
    return out


def rollout_spec(cfg: Config, step: int, prompt_offset: int = 0) -> SamplingSpec:
    r = cfg.rollout
    return SamplingSpec(n=r.n_samples, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
                        seed=cfg.trainer.seed * 1_000_003 + step, prompt_offset=prompt_offset)


def make_optimizer(cfg: Config, model):
    """AdamW and its schedule, stepped once per optimizer update (``updates_per_step`` per training step)."""
    t = cfg.trainer
    per_step = cfg.rollout.reuse * (cfg.rollout.batch_size // cfg.rollout.mini_batch_size)
    return adamw_with_schedule(model.parameters(), t.lr, (t.beta1, t.beta2), t.weight_decay,
                               t.warmup_steps * per_step, t.steps * per_step, t.lr_schedule.value, t.min_lr_ratio)


def run_training(cfg: Config, policy, teacher_scorer, tokenizer, tokens: TokenIds, engine: RolloutEngine, task, tracker,
                 encode_prompts, on_step=None, state=None, save_state=None, dist: Dist = SINGLE) -> None:
    """The loop: for each step, rollout → score → R passes → sync the engine → log (→ eval via ``on_step``)
    (→ ``save_state`` every ``trainer.checkpoint_every`` steps). ``state`` (a :class:`opd_lab.checkpoint.TrainState`)
    continues a checkpointed run: optimizer, schedule, prompt sampler and step counter as they were.

    ``policy``: the student's :class:`Policy` (DDP/FSDP2-wrapped under torchrun) or the language model itself.
    Under torchrun every rank draws the same prompts and rolls out its contiguous share (distributed.py); the
    logged metrics are over all ranks, so every rank holds the same numbers."""
    from tqdm.auto import tqdm

    from opd_lab.distributed import gathered_state_dict

    policy = as_policy(policy)
    optimizer, scheduler = make_optimizer(cfg, policy)
    rng = random.Random(cfg.trainer.seed)
    guard = UpdateGuard(cfg.trainer.max_bad_updates)
    start = 0
    if state is not None:
        if state.shards is not None:  # FSDP2: this rank's shard of the weights and of the Adam moments
            from opd_lab.checkpoint import load_shards

            load_shards(policy, optimizer, state.shards)
        else:
            optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        rng.setstate(state.sampler_rng)
        guard.run, guard.total = state.guard["run"], state.guard["total"]
        start = state.step
        engine.sync_weights(unwrap(policy).lm, gathered_state_dict(policy))  # the engine samples the restored weights
    every = cfg.trainer.checkpoint_every
    share = dist.shard(cfg.rollout.n_prompts)
    lm = unwrap(policy).lm
    bar = tqdm(range(start, cfg.trainer.steps), desc="OPD", disable=not (cfg.logger.progress and dist.is_main),
               dynamic_ncols=True, initial=start, total=cfg.trainer.steps)
    for step in bar:
        t0 = time.perf_counter()
        problems = task.train_problems(cfg.rollout.n_prompts, rng)[share]
        batch = engine.generate(encode_prompts(tokenizer, problems), rollout_spec(cfg, step, share.start))
        data = score_batch(cfg, policy, teacher_scorer, batch, tokens, step, dist=dist)
        t1 = time.perf_counter()
        metrics = train_step(cfg, policy, optimizer, scheduler, data, step, dist)
        t2 = time.perf_counter()
        sync_s = engine.sync_weights(lm, gathered_state_dict(policy))
        lengths = batch.response_mask_B_T.sum(-1).float()
        n_tok, n_trunc, n_rep = dist.sum(
            lengths.sum(), batch.truncated_B.sum(),
            repetition_B(batch.response_ids_B_T, batch.response_mask_B_T).sum())
        n_seq = batch.size * dist.world
        metrics.update(batch.stats)
        metrics.update(data.stats)
        metrics.update({
            "response/mean_len": n_tok / n_seq,
            "response/truncated_frac": n_trunc / n_seq,
            "response/repetition_frac": n_rep / n_seq,
            "time/learner_s": t2 - t1,
            "time/sync_s": sync_s,
            "time/step_s": time.perf_counter() - t0,
            "learner/tokens_per_s": n_tok * cfg.rollout.reuse / max(t2 - t1, 1e-9),
            "tokens_per_s": n_tok / max(time.perf_counter() - t0, 1e-9),
            "lr": scheduler.get_last_lr()[0],
            **cuda_memory(lm),
        })
        bad_run = guard.update(step + 1, metrics, warn=dist.is_main)
        metrics["guard/consecutive_bad_updates"] = bad_run
        metrics.update(collapse_signals(metrics, step + 1, warn=dist.is_main))
        tracker.log(step + 1, metrics)
        guard.check(step + 1, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", len=f"{metrics['response/mean_len']:.0f}")
        if on_step is not None:
            on_step(step + 1)
        if save_state is not None and every and (step + 1) % every == 0 and step + 1 < cfg.trainer.steps:
            save_state(step + 1, policy, optimizer, scheduler, rng, {"run": guard.run, "total": guard.total})
