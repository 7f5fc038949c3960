"""The OPD learner: rollout → π_old and teacher scores → R passes of gated loss over mini-batches → step.

One optimizer update (:func:`optimizer_update`) computes, for every micro-batch of its mini-batch, the current
log-probs, the drift δ_t = log π_θ − log π_old, the raw gate and the per-token loss, and back-propagates the
*unnormalised* sum Σ m g ℓ. The token-mean and the gate's unit-mean normalisation are scalars over the whole
update, so they are applied to the accumulated gradient at the end:

    loss = Σ m ĝ ℓ / Σ m,  ĝ = g · Σ m / Σ m g   ⇒   loss = Σ m g ℓ / Σ m g

which makes the update independent of how the mini-batch is split into micro-batches. With a gate clip the
normaliser is needed before the clip, so a no-grad pre-pass computes it first.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from opd_lab.config import Config, LSMLossConfig, SpecialMask
from opd_lab.distributed import SINGLE, Dist, full_params, grad_sync, unwrap
from opd_lab.gates import drift_gate
from opd_lab.losses import LossInputs, get_loss, masked_sum
from opd_lab.rollout.base import RolloutBatch, RolloutEngine, SamplingSpec
from opd_lab.scoring import (
    build_support,
    head_stats_chunked,
    head_stats_plain,
    response_hidden,
    response_logits,
    score_student_old,
)


# ----------------------------------------------------------------------------------------- token tables
def token_table(tokenizer, predicate) -> torch.Tensor:
    """Bool ``[V]``: ``predicate(decoded token string)`` for every id of ``tokenizer``."""
    V = len(tokenizer)
    strings = tokenizer.convert_ids_to_tokens(list(range(V)))
    decoded = [tokenizer.convert_tokens_to_string([s]) if s is not None else "" for s in strings]
    return torch.tensor([bool(predicate(d)) for d in decoded], dtype=torch.bool)


def special_mask_B_T(response_ids_B_T: torch.Tensor, response_mask_B_T: torch.Tensor, special_V: torch.Tensor,
                     mode: str) -> torch.Tensor:
    """1 where a sampled token is a masked special token: every occurrence (``all``) or the first per row."""
    is_special = special_V[response_ids_B_T] & response_mask_B_T.bool()
    if mode == SpecialMask.none.value:
        return torch.zeros_like(response_mask_B_T)
    if mode == SpecialMask.all.value:
        return is_special.long()
    first = is_special & (torch.cumsum(is_special.long(), dim=-1) == 1)
    return first.long()


# --------------------------------------------------------------------------------------------- step data
@dataclass
class StepData:
    """A scored rollout batch: everything the R passes need, aligned ``[B, T(, S)]``."""

    batch: RolloutBatch
    loss_mask_B_T: torch.Tensor
    special_B_T: torch.Tensor
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


def score_batch(cfg: Config, policy, teacher_scorer, batch: RolloutBatch, special_V, newline_V,
                score_batch_size: int = 64, dist: Dist = SINGLE) -> StepData:
    """π_old and teacher scores for a rollout batch, the loss mask and (LSM) the support S_t.

    ``policy`` is the learner's (possibly wrapped) :class:`Policy`; under torchrun ``batch`` is this rank's share
    and the token-mean statistics are over all ranks.
    """
    t0 = time.perf_counter()
    T_s = cfg.rollout.temperature
    lsm = isinstance(cfg.loss, LSMLossConfig)
    support = cfg.loss.support.value if lsm else "teacher"
    need_old_topk = lsm and support in ("student", "union")
    K = cfg.loss.top_k if lsm else 0
    policy = as_policy(policy)
    with full_params(policy):
        old_logp, old_topk = score_student_old(unwrap(policy).lm, batch, T_s, K if need_old_topk else 0,
                                               score_batch_size, cfg.trainer.chunk_size)
    t1 = time.perf_counter()
    teach = teacher_scorer(batch, K if support != "student" else 0, T_s, old_topk if need_old_topk else None)
    t2 = time.perf_counter()
    resp_ids, resp_mask = batch.response_ids_B_T, batch.response_mask_B_T
    special = special_mask_B_T(resp_ids, resp_mask, special_V, cfg.loss.mask_special.value)
    data = StepData(
        batch=batch,
        loss_mask_B_T=resp_mask * (1 - special),
        special_B_T=special,
        newline_B_T=newline_V[resp_ids].long() * resp_mask,
        old_logp_B_T=old_logp,
        teacher_logp_B_T=teach.logp_B_T,
    )
    if lsm:
        data.support_ids_B_T_S, data.teacher_support_logp_B_T_S, data.support_mask_B_T_S = build_support(
            support, resp_ids, teach, old_topk, cfg.loss.add_sampled_token)
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
    log-sum-exp and the logits at ``ids_B_T_K`` of every response position (scoring.py), float32."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, batch: RolloutBatch, ids_B_T_K: torch.Tensor, temperature: float, chunk_size: int,
                loss_path: str, autocast_bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast_bf16):
            if loss_path == "chunked":
                hidden = response_hidden(self.lm, batch)
                w = self.lm.get_output_embeddings().weight
                return head_stats_chunked(hidden, w, ids_B_T_K, temperature, chunk_size)
            return head_stats_plain(response_logits(self.lm, batch, temperature), ids_B_T_K, chunk_size)


def as_policy(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` if it is a (wrapped) :class:`Policy`, else a :class:`Policy` over the language model ``model``."""
    return model if isinstance(unwrap(model), Policy) else Policy(model)


def micro_batch_forward(cfg: Config, policy, rows: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], LossInputs]:
    """Forward one micro-batch through ``policy`` (:class:`Policy`, maybe DDP/FSDP2-wrapped): per-token loss ℓ_t,
    loss metrics and the loss inputs (with grad).

    Only lse_t and the logits at [y_t, S_t] leave the model (``trainer.loss_path`` picks how, see scoring.py).
    """
    batch = rows["batch"]
    t = cfg.trainer
    device = next(policy.parameters()).device
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
    loss_B_T, metrics = get_loss(cfg.loss.name)(x, cfg.loss)
    return loss_B_T, metrics, x


def _gate(cfg: Config, x: LossInputs, rows: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    delta = (x.logp_B_T - x.old_logp_B_T).detach()
    g, extras = drift_gate(delta, x.mask_B_T, rows["response_mask"], cfg.gate.kind.value,
                           cfg.gate.tau, cfg.gate.block_size, rows["newline"])
    return g, extras, delta


def _micro_batches(idx: torch.Tensor, grad_accum: int, dist: Dist) -> list[torch.Tensor | None]:
    """This rank's rows ``idx`` in ≤ ``grad_accum`` micro-batches, padded with ``None`` (a zero-weight micro-batch)
    to the largest count on any rank: every rank runs as many forward/backward passes (FSDP2 gathers in each)."""
    micro: list[torch.Tensor | None] = [m for m in torch.tensor_split(idx, grad_accum) if m.numel() > 0]
    n = int(dist.max(len(micro))[0])
    return micro + [None] * (n - len(micro))


def optimizer_update(cfg: Config, policy, optimizer, data: StepData, idx: torch.Tensor,
                     dist: Dist = SINGLE) -> dict[str, float]:
    """One AdamW update on this rank's mini-batch rows ``idx`` (``trainer.grad_accum`` micro-batches).

    With W ranks each back-propagates its Σ m g ℓ; DDP/FSDP2 average gradients over ranks in the last
    micro-batch's backward, and the gradient is divided by Z / W with Z = Σ_ranks Σ m g (module docstring).
    """
    policy = as_policy(policy)
    micro = _micro_batches(idx, cfg.trainer.grad_accum, dist)
    device = next(policy.parameters()).device

    def rows_of(m):
        if m is not None:
            return data.rows(m, device)
        rows = data.rows(torch.zeros(1, dtype=torch.long), device)  # a zero-weight micro-batch: local row 0
        rows["loss_mask"] = torch.zeros_like(rows["loss_mask"])  # with no valid token: every sum below is 0
        return rows

    clip = cfg.gate.clip_min is not None or cfg.gate.clip_max is not None
    n_valid = dist.sum(sum(float(data.loss_mask_B_T[m].sum()) for m in micro if m is not None))[0]
    scale = None
    if clip:  # the clip acts on normalised gates, so get Σ m g first
        with torch.no_grad():
            z_pre = 0.0
            for m in micro:
                rows = rows_of(m)
                _, _, x = micro_batch_forward(cfg, policy, rows)
                g, _, _ = _gate(cfg, x, rows)
                z_pre += float(masked_sum(g, x.mask_B_T))
        scale = n_valid / max(dist.sum(z_pre)[0], 1e-30)

    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = defaultdict(float)
    gates = []
    for i, m in enumerate(micro):
        rows = rows_of(m)
        with grad_sync(policy, i == len(micro) - 1):
            loss_B_T, metrics, x = micro_batch_forward(cfg, policy, rows)
            g, extras, delta = _gate(cfg, x, rows)
            if scale is not None:
                g = (g * scale).clamp(min=cfg.gate.clip_min, max=cfg.gate.clip_max)
            mask = x.mask_B_T.to(loss_B_T.device)
            masked_sum(loss_B_T * g, mask).backward()
        sums["gate_denom"] += float(masked_sum(g, mask)) if scale is None else 0.0  # Z (no _sum: not a metric)
        sums["loss_sum"] += float(masked_sum(loss_B_T.detach() * g, mask))
        sums["ungated_loss_sum"] += float(masked_sum(loss_B_T.detach(), mask))
        sums["abs_delta_sum"] += float(masked_sum(delta.abs(), mask))
        sums["cancel_sum"] += float(masked_sum(extras["cancel_B_T"], mask))
        for k, v in metrics.items():
            sums[f"{k}_sum"] += float(masked_sum(v, mask))
        gates.append(g.detach()[mask.bool()])
    keys = sorted(sums)
    totals = dict(zip(keys, dist.sum(*(sums[k] for k in keys)), strict=True))  # one all-reduce for every sum
    denom = n_valid if scale is not None else totals["gate_denom"]
    for p in policy.parameters():
        if p.grad is not None:
            p.grad.div_(max(denom, 1e-30) / dist.world)
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
    out = {k[: -len("_sum")]: v / n for k, v in totals.items() if k.endswith("_sum") and k != "loss_sum"}
    out["loss"] = totals.get("loss_sum", 0.0) / (denom if scale is None else n)
    out["grad_norm"] = grad_norm
    out["tokens"] = n_valid
    out["guard/skipped"] = 0.0 if finite else 1.0
    out.update(gate_metrics(torch.cat(gates) * (n_valid / max(denom, 1e-30) if scale is None else 1.0), dist))
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
    """R passes over the scored batch in shuffled mini-batches; metrics averaged over the updates.

    The permutation is over the global batch (W equal, contiguous rank shards of ``data.batch.size`` rows), so a
    mini-batch holds the same sequences whatever W is; each rank updates with the rows of it that it holds.
    """
    B = data.batch.size
    lo = dist.rank * B
    gen = torch.Generator().manual_seed(cfg.trainer.seed * 1_000_003 + step)
    per_update: list[dict[str, float]] = []
    for _ in range(cfg.rollout.reuse):
        perm = torch.randperm(B * dist.world, generator=gen)
        for mb in perm.split(cfg.rollout.mini_batch_size):
            local = mb[(mb >= lo) & (mb < lo + B)] - lo
            per_update.append(optimizer_update(cfg, policy, optimizer, data, local, dist))
            scheduler.step()
    keys = per_update[0].keys()
    out = {k: sum(u[k] for u in per_update) / len(per_update) for k in keys if k not in ("tokens", "guard/skipped")}
    out["guard/skipped_updates"] = sum(u["guard/skipped"] for u in per_update)
    out["guard/trailing_bad_updates"] = next(
        (i for i, u in enumerate(reversed(per_update)) if not u["guard/skipped"]), len(per_update))
    out["gate/min"] = min(u.get("gate/min", 1.0) for u in per_update)
    out["gate/max"] = max(u.get("gate/max", 1.0) for u in per_update)
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


def lr_factor(update: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` updates, then constant or cosine decay to ``min_ratio`` at ``total``."""
    if update < warmup:
        return (update + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    frac = min(1.0, (update - warmup) / (total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def make_optimizer(cfg: Config, model):
    """AdamW and its schedule, stepped once per optimizer update (``updates_per_step`` per training step)."""
    t = cfg.trainer
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    per_step = cfg.rollout.reuse * (cfg.rollout.batch_size // cfg.rollout.mini_batch_size)
    warm, total = t.warmup_steps * per_step, t.steps * per_step
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda u: lr_factor(u, warm, total, t.lr_schedule.value, t.min_lr_ratio))
    return opt, sched


def run_training(cfg: Config, policy, teacher_scorer, tokenizer, engine: RolloutEngine, task, tracker,
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
    special_set = set(cfg.loss.special_tokens)
    special_V = token_table(tokenizer, lambda s: s in special_set)
    newline_V = token_table(tokenizer, lambda s: "\n" in s)
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
    every = cfg.trainer.checkpoint_every
    share = dist.shard(cfg.rollout.n_prompts)
    lm = unwrap(policy).lm
    bar = tqdm(range(start, cfg.trainer.steps), desc="OPD", disable=not (cfg.logger.progress and dist.is_main),
               dynamic_ncols=True, initial=start, total=cfg.trainer.steps)
    for step in bar:
        t0 = time.perf_counter()
        problems = task.train_problems(cfg.rollout.n_prompts, rng)[share]
        batch = engine.generate(encode_prompts(tokenizer, problems), rollout_spec(cfg, step, share.start))
        data = score_batch(cfg, policy, teacher_scorer, batch, special_V, newline_V, dist=dist)
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
