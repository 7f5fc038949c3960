"""Scoring a rollout batch: the teacher's log-probs (top-K, at requested ids), π_old, the loss mask and the
support S_t, into one typed :class:`ScoredBatch` that flows unchanged from scoring to the loss.

Teacher scoring never builds a ``[B, T, V]`` tensor: ``batch_size`` sequences at a time and the LM head
``chunk_size`` positions at a time (heads.py); the hf scorer takes the rows in order of response length, each
group cut to its own longest response (``rollout.teacher_batch_tokens``). What is scored is what the loss
declares it needs (:class:`~opd_lab.core.losses.ScoreNeeds`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from opd_lab.common.distributed import SINGLE, Dist, full_params, unwrap
from opd_lab.common.registry import Registry
from opd_lab.core.losses import LOSSES, PolicyOutputs, ScoreNeeds, at_least_f32, dedup_mask
from opd_lab.core.routing import routing_metrics
from opd_lab.core.teacher_scores import TeacherScores
from opd_lab.learner.heads import as_policy, gather_float, head_logits, logsumexp_last, response_hidden
from opd_lab.learner.teachers import Teachers
from opd_lab.models.token_ids import TokenIds, special_mask_B_T
from opd_lab.rollout.base import BuildContext, RolloutBatch


@torch.no_grad()
def score_teacher(
    teacher: torch.nn.Module,
    batch: RolloutBatch,
    top_k: int = 0,
    temperature: float = 1.0,
    query_ids_B_T_Q: torch.Tensor | None = None,
    batch_size: int = 64,
    chunk_size: int = 256,
    entropy: bool = False,
    autocast_bf16: bool = False,
    max_tokens: int = 0,
) -> TeacherScores:
    """Teacher log-probs of the sampled tokens, its top-K (``top_k`` > 0), log-probs at extra ids and (``entropy``)
    the entropy H(q(·|h_t)) of its distribution at each position.

    Runs ``batch_size`` sequences at a time and the LM head ``chunk_size`` positions at a time: the largest
    tensor is ``[batch_size, chunk_size, V]`` logits, never ``[B, T, V]``. ``max_tokens`` > 0
    (``rollout.teacher_batch_tokens``): the rows are taken in order of response length, in groups of at most
    ``batch_size`` rows and about ``max_tokens`` padded tokens (:func:`length_groups`), each cut to its own
    longest response, so short rows are not padded to the batch's longest; the outputs at real positions are the
    same function of the same tokens (only the kernels' summation order differs), and positions past a group's
    width hold the padding values of :func:`~opd_lab.rollout.base.scores_from_prompt_logprobs` (log q 0, top-K
    ids 0 with log-prob −1e30, entropy 0). ``autocast_bf16``: the transformer body under bf16 autocast
    (``rollout.teacher_autocast_bf16``); the LM head and the log-softmax stay in the teacher's precision (at
    least float32).
    """
    w = teacher.get_output_embeddings().weight
    B, T = batch.response_mask_B_T.shape
    Q = query_ids_B_T_Q.shape[-1] if query_ids_B_T_Q is not None else 0
    f = at_least_f32(torch.empty(0, dtype=w.dtype)).dtype
    out = {"lp": torch.zeros(B, T, dtype=f), "ti": torch.zeros(B, T, top_k, dtype=torch.long),
           "tl": torch.full((B, T, top_k), -1e30, dtype=f), "ql": torch.full((B, T, Q), -1e30, dtype=f),
           "h": torch.zeros(B, T, dtype=f)}
    device_type = w.device.type
    trim = max_tokens > 0
    groups = (length_groups(batch, batch_size, max_tokens) if trim
              else [torch.arange(s, min(s + batch_size, B)) for s in range(0, B, batch_size)])
    for idx in groups:
        sub = batch.select(idx, trim=trim)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast_bf16):
            h = response_hidden(teacher, sub)
        h = h.to(w.dtype)  # the LM head in the teacher's own precision
        y = sub.response_ids_B_T.to(h.device)
        q = query_ids_B_T_Q[idx, : h.shape[1]].to(h.device) if query_ids_B_T_Q is not None else None
        parts: dict[str, list[torch.Tensor]] = {"lp": [], "ti": [], "tl": [], "ql": [], "h": []}
        for c in range(0, h.shape[1], chunk_size):
            logits = head_logits(h[:, c : c + chunk_size], w, temperature)
            lse = logsumexp_last(at_least_f32(logits))
            parts["lp"].append(gather_float(logits, y[:, c : c + chunk_size, None])[..., 0] - lse)
            if top_k > 0:
                vals, ids = torch.topk(logits, top_k, dim=-1)
                parts["ti"].append(ids)
                parts["tl"].append(at_least_f32(vals) - lse[..., None])
            if q is not None:
                parts["ql"].append(gather_float(logits, q[:, c : c + chunk_size]) - lse[..., None])
            if entropy:
                lp_V = at_least_f32(logits) - lse[..., None]
                parts["h"].append(-(lp_V.exp() * lp_V).sum(-1))
        width = h.shape[1]
        for key, chunks in parts.items():
            if chunks:
                out[key][idx, :width] = torch.cat(chunks, 1).cpu()
    return TeacherScores(
        logp_B_T=out["lp"],
        topk_ids_B_T_K=out["ti"] if top_k > 0 else None,
        topk_logp_B_T_K=out["tl"] if top_k > 0 else None,
        query_logp_B_T_Q=out["ql"] if query_ids_B_T_Q is not None else None,
        entropy_B_T=out["h"] if entropy else None,
    )


def length_groups(batch: RolloutBatch, max_rows: int, max_tokens: int) -> list[torch.Tensor]:
    """Row indices in order of response length, cut into consecutive groups of at most ``max_rows`` rows whose
    padded response size (rows × the group's longest response; the forward adds the prompts) stays within
    ``max_tokens`` (a group holds at least one row), so that each group can be scored cut to its own longest
    response (``RolloutBatch.select(trim=True)``); no group for an empty batch."""
    n_B = batch.response_mask_B_T.sum(1)
    order = torch.argsort(n_B, stable=True)
    if len(order) == 0:
        return []
    groups, start = [], 0
    for end in range(1, len(order) + 1):
        full = end - start > max_rows or (end - start) * int(n_B[order[end - 1]]) > max_tokens
        if full and end - 1 > start:
            groups.append(order[start:end - 1])
            start = end - 1
    groups.append(order[start:])
    return groups


class HFTeacherScorer:
    """Teacher scoring with a transformers forward of the frozen teacher (any support, any temperature); the
    ``hf`` entry of :data:`SCORERS`."""

    def __init__(self, teacher: torch.nn.Module, batch_size: int = 64, chunk_size: int = 256,
                 autocast_bf16: bool = False, max_tokens: int = 0) -> None:
        self.teacher, self.batch_size, self.chunk_size = teacher, batch_size, chunk_size
        self.autocast_bf16, self.max_tokens = autocast_bf16, max_tokens

    def __call__(self, batch: RolloutBatch, top_k: int, temperature: float,
                 query_ids_B_T_Q: torch.Tensor | None = None, entropy: bool = False) -> TeacherScores:
        return score_teacher(self.teacher, batch, top_k, temperature, query_ids_B_T_Q, self.batch_size,
                             self.chunk_size, entropy, self.autocast_bf16, self.max_tokens)

    def close(self) -> None:
        pass


def build_teacher_scorer(ctx: BuildContext) -> HFTeacherScorer:
    """The ``hf`` teacher scorer: the loaded teacher (``ctx.model``), LM head ``trainer.chunk_size`` positions at a
    time, bf16 autocast when ``rollout.teacher_autocast_bf16``, rows grouped by length within
    ``rollout.teacher_batch_tokens``."""
    return HFTeacherScorer(ctx.model, chunk_size=ctx.cfg.trainer.chunk_size,
                           autocast_bf16=ctx.cfg.rollout.teacher_autocast_bf16,
                           max_tokens=ctx.cfg.rollout.teacher_batch_tokens)


# name (``rollout.teacher_scorer``) → builder(BuildContext); the vLLM ones stay unimported until asked for
SCORERS: Registry = Registry("teacher scorer")
SCORERS.add("hf", build_teacher_scorer)
SCORERS.add("vllm", "opd_lab.rollout.vllm:build_teacher_scorer")
SCORERS.add("server", "opd_lab.rollout.server:build_teacher_scorer")


@torch.no_grad()
def score_student_old(
    model: torch.nn.Module,
    batch: RolloutBatch,
    temperature: float = 1.0,
    top_k: int = 0,
    batch_size: int = 64,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π_old(y_t|h_t) ``[B, T]`` and, if ``top_k`` > 0, π_old's top-K ids ``[B, T, K]`` (student support)."""
    scores = score_teacher(model, batch, top_k, temperature, None, batch_size, chunk_size)
    return scores.logp_B_T, scores.topk_ids_B_T_K


def build_support(needs: ScoreNeeds, response_ids_B_T: torch.Tensor, teacher: TeacherScores,
                  old_topk_ids_B_T_K: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support S_t as ``(ids_B_T_S, teacher_logp_B_T_S, mask_B_T_S)``: the teacher's top-K
    (``needs.teacher_top_k``), then π_old's top-K (``needs.student_top_k``: fixed at rollout time, whose teacher
    log-probs are ``teacher.query_logp``), then y_t (``needs.add_sampled_token``); repeated ids are masked."""
    ids, logp = [], []
    if needs.teacher_top_k:
        assert teacher.topk_ids_B_T_K is not None and teacher.topk_logp_B_T_K is not None
        ids.append(teacher.topk_ids_B_T_K)
        logp.append(teacher.topk_logp_B_T_K)
    if needs.student_top_k:
        assert old_topk_ids_B_T_K is not None and teacher.query_logp_B_T_Q is not None
        K = old_topk_ids_B_T_K.shape[-1]
        ids.append(old_topk_ids_B_T_K)
        logp.append(teacher.query_logp_B_T_Q[..., :K])
    if needs.add_sampled_token:
        ids.append(response_ids_B_T.unsqueeze(-1))
        logp.append(teacher.logp_B_T.unsqueeze(-1))
    ids_S = torch.cat(ids, dim=-1)
    return ids_S, torch.cat(logp, dim=-1), dedup_mask(ids_S)


# ------------------------------------------------------------------------------------------ scored batch
@dataclass
class ScoredBatch:
    """A rollout batch with everything its R passes of updates need, aligned ``[B, T(, S)]``: the loss mask m_t,
    newline flags (span gate), log π_old, log q at y_t and (losses that read one) the support S_t."""

    batch: RolloutBatch
    loss_mask_B_T: torch.Tensor
    newline_B_T: torch.Tensor
    old_logp_B_T: torch.Tensor
    teacher_logp_B_T: torch.Tensor
    support_ids_B_T_S: torch.Tensor | None = None
    teacher_support_logp_B_T_S: torch.Tensor | None = None
    support_mask_B_T_S: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)
    # bool [B]: rows whose log-probs under the step's starting weights the first update's forward supplies: their
    # log π_old (a batch sampled by those weights) or, for a stale batch, their log π_prox (``pending_field``)
    pending_B: torch.Tensor | None = None
    pending_field: str = "old_logp_B_T"
    # log π_prox, the learner's weights at the start of the step, where they differ from π_old = π_b (a stale batch
    # whose loss or gate needs them); None: π_prox = π_b
    prox_logp_B_T: torch.Tensor | None = None
    # several teachers (teachers.py): the routing weights w_{t,i}, every teacher's log q_i(y_t), their names
    route_B_T_N: torch.Tensor | None = None
    teacher_logp_each_B_T_N: torch.Tensor | None = None
    teacher_names: tuple[str, ...] = ()

    @property
    def response_mask_B_T(self) -> torch.Tensor:
        return self.batch.response_mask_B_T

    def select(self, idx: torch.Tensor, device: torch.device | str = "cpu") -> ScoredBatch:
        """Rows ``idx`` with every tensor on ``device`` (the rollout batch itself stays on the CPU)."""
        def pick(t):
            return None if t is None else t[idx].to(device)

        return ScoredBatch(self.batch.select(idx), pick(self.loss_mask_B_T), pick(self.newline_B_T),
                           pick(self.old_logp_B_T), pick(self.teacher_logp_B_T), pick(self.support_ids_B_T_S),
                           pick(self.teacher_support_logp_B_T_S), pick(self.support_mask_B_T_S),
                           pending_B=None if self.pending_B is None else self.pending_B[idx],
                           pending_field=self.pending_field, prox_logp_B_T=pick(self.prox_logp_B_T),
                           route_B_T_N=pick(self.route_B_T_N), teacher_names=self.teacher_names)

    def defer(self, rows: torch.Tensor, field_name: str) -> None:
        """Rows ``rows`` of ``field_name`` (``old_logp_B_T`` or ``prox_logp_B_T``) wait for the first update's
        forward (NaN until then)."""
        self.pending_B = torch.zeros(self.batch.size, dtype=torch.bool)
        self.pending_B[rows] = True
        self.pending_field = field_name
        getattr(self, field_name)[rows] = float("nan")

    def take_pending(self, idx: torch.Tensor | None, rows: ScoredBatch, logp_B_T: torch.Tensor) -> None:
        """Rows ``idx`` (``rows`` = their selection) were just forwarded by the step's starting weights, before any
        update: where their log π_old (or log π_prox) is pending, it is this forward's ``logp_B_T`` (the same
        computation the scoring pass would have made, so no second forward is needed). ``idx=None``: a zero-weight
        micro-batch."""
        if rows.pending_B is None or not bool(rows.pending_B.any()):
            return
        name = rows.pending_field
        pending = rows.pending_B.to(logp_B_T.device)[:, None]
        mine = getattr(rows, name)
        setattr(rows, name, torch.where(pending, logp_B_T.detach().to(mine.dtype), mine))
        rows.pending_B = torch.zeros_like(rows.pending_B)
        if idx is not None:
            getattr(self, name)[idx] = getattr(rows, name).cpu()
            self.pending_B[idx] = False

    def without_loss(self) -> ScoredBatch:
        """The same rows with no valid token (a zero-weight micro-batch: every masked sum is 0)."""
        return replace(self, loss_mask_B_T=torch.zeros_like(self.loss_mask_B_T))


def policy_forward(cfg, policy: torch.nn.Module, scored: ScoredBatch) -> PolicyOutputs:
    """The student's training forward (:class:`~opd_lab.learner.heads.Policy`, maybe DDP/FSDP2-wrapped) on a
    micro-batch: log π_θ(y_t|h_t), lse_t and the logits at S_t; only these leave the model (``trainer.loss_path``)."""
    t = cfg.trainer
    device = next(policy.parameters()).device
    ids = scored.batch.response_ids_B_T.to(device).unsqueeze(-1)
    if scored.support_ids_B_T_S is not None:
        ids = torch.cat([ids, scored.support_ids_B_T_S.to(device)], dim=-1)
    lse, z = policy(scored.batch, ids, cfg.rollout.temperature, t.chunk_size, t.loss_path.value, t.autocast_bf16)
    return PolicyOutputs(z[..., 0] - lse, lse, z[..., 1:] if scored.support_ids_B_T_S is not None else None)


def score_batch(cfg, policy: torch.nn.Module, teachers: Teachers, batch: RolloutBatch, tokens: TokenIds,
                old_micro_batches: list[torch.Tensor | None] | None = None, dist: Dist = SINGLE,
                score_batch_size: int = 64, deferred_rows: torch.Tensor | None = None) -> ScoredBatch:
    """π_old and teacher scores of a rollout batch, the loss mask and the support S_t the loss needs.

    ``policy`` is the learner's (possibly wrapped) :class:`~opd_lab.learner.heads.Policy` at the weights that sampled
    ``batch``. π_old is its training forward on ``old_micro_batches`` (this rank's rows; ``None``: a zero-weight
    micro-batch that keeps FSDP2's collectives in step), which the learner passes as the micro-batches of the
    first pass of its updates: same precision, autocast, rows and shapes, so that on the first update
    π_θ = π_old exactly (δ ≡ 0, every gate 1). ``deferred_rows`` (the first update's rows, when the policy that
    sampled the batch is the current one) are not scored here: the first update's own forward supplies their
    π_old (:meth:`ScoredBatch.take_pending`), and the statistics that need π_old wait for :func:`old_stats`. Under
    torchrun ``batch`` is this rank's share and the token-mean statistics are over all ranks.
    """
    t0 = time.perf_counter()
    T_s = cfg.rollout.temperature
    needs = LOSSES.get(cfg.loss.name).needs(cfg.loss)
    policy = as_policy(policy)
    resp_ids, resp_mask = batch.response_ids_B_T, batch.response_mask_B_T
    special = special_mask_B_T(resp_ids, resp_mask, list(tokens.special), cfg.loss.mask_special.value)
    scored = ScoredBatch(batch=batch, loss_mask_B_T=resp_mask * (1 - special),
                         newline_B_T=tokens.newline_V[resp_ids].long() * resp_mask,
                         old_logp_B_T=torch.zeros(resp_mask.shape, dtype=logp_dtype(policy)),
                         teacher_logp_B_T=torch.zeros(resp_mask.shape))
    if deferred_rows is not None:
        scored.defer(deferred_rows, "old_logp_B_T")
    forward_logp(cfg, policy, scored, old_micro_batches, "old_logp_B_T")
    old_topk = None
    if needs.student_top_k:  # π_old's own top-K ids at rollout time (the student/union support)
        with full_params(policy):
            _, old_topk = score_student_old(unwrap(policy).lm, batch, T_s, needs.student_top_k, score_batch_size,
                                            cfg.trainer.chunk_size)
    t1 = time.perf_counter()
    def old_at(query_ids_B_T_Q):  # π_old at y_t and at extra ids (routing.rule=min_kl), no grad
        if query_ids_B_T_Q is None and deferred_rows is None:  # y_t only: the learner's π_old forward above
            return scored.old_logp_B_T, None
        with full_params(policy):
            s = score_teacher(unwrap(policy).lm, batch, 0, T_s, query_ids_B_T_Q, score_batch_size,
                              cfg.trainer.chunk_size)
        return s.logp_B_T, s.query_logp_B_T_Q

    routed = teachers.score(batch, needs, T_s, old_topk, old_at,
                            lambda sc: build_support(needs, resp_ids, sc, old_topk))
    teach = routed.scores
    t2 = time.perf_counter()
    scored.teacher_logp_B_T = teach.logp_B_T
    if routed.weights_B_T_N is not None:
        scored.route_B_T_N, scored.teacher_logp_each_B_T_N = routed.weights_B_T_N, routed.each_logp_B_T_N
        scored.teacher_names = tuple(teachers.names)
    if needs.support:
        scored.support_ids_B_T_S, scored.teacher_support_logp_B_T_S, scored.support_mask_B_T_S = build_support(
            needs, resp_ids, teach, old_topk)
    scored.stats = scoring_stats(scored, special, t1 - t0, t2 - t1, dist, with_old=deferred_rows is None)
    return scored


def scoring_stats(scored: ScoredBatch, special_B_T: torch.Tensor, old_s: float, teacher_s: float, dist: Dist,
                  with_old: bool) -> dict[str, float]:
    """A scored batch's step metrics: timings, masked special tokens, the routing shares (several teachers) and,
    unless π_old waits for the first update (``with_old`` false), the statistics that need π_old."""
    n_tok, n_special = dist.sum(scored.batch.response_mask_B_T.sum(), special_B_T.sum())
    stats = {"time/score_old_s": old_s, "time/score_teacher_s": teacher_s,
             "score/tokens_per_s": 2 * n_tok / dist.world / max(old_s + teacher_s, 1e-9), "special_masked": n_special}
    if scored.route_B_T_N is not None:
        stats |= routing_metrics(scored.route_B_T_N, scored.loss_mask_B_T, list(scored.teacher_names), dist.sum)
        stats |= routing_by_tag(scored, scored.batch.tags_B, dist)
    if with_old:
        stats |= old_stats(scored, dist)
    return stats


def logp_dtype(policy: torch.nn.Module) -> torch.dtype:
    """The precision log π_old and log π_prox are kept in: the model's, at least float32 (a float64 student keeps
    δ = 0 exactly at its first update)."""
    return at_least_f32(torch.empty(0, dtype=next(policy.parameters()).dtype)).dtype


@torch.no_grad()
def forward_logp(cfg, policy: torch.nn.Module, scored: ScoredBatch, micro_batches: list[torch.Tensor | None] | None,
                 field_name: str) -> None:
    """``scored.<field_name>`` = log p(y_t|h_t) of the policy's current weights, from its training forward on
    ``micro_batches`` (this rank's rows; ``None`` entries are zero-weight micro-batches that keep FSDP2's collectives
    in step; ``micro_batches=None``: every row at once)."""
    device = next(policy.parameters()).device
    out = getattr(scored, field_name)
    for m in micro_batches if micro_batches is not None else [torch.arange(scored.batch.size)]:
        rows = scored.select(m if m is not None else torch.zeros(1, dtype=torch.long), device)
        logp = policy_forward(cfg, policy, rows).logp_B_T
        if m is not None:
            out[m] = logp.to(out.dtype).cpu()


def score_proximal(cfg, policy: torch.nn.Module, scored: ScoredBatch, micro_batches: list[torch.Tensor | None],
                   deferred_rows: torch.Tensor) -> None:
    """log π_prox of a stale batch: the learner's weights at the start of the step (``policy`` as it is now), on the
    micro-batches of the first pass after the first update (``micro_batches``); the first update's rows
    (``deferred_rows``) take it from that update's own forward (:meth:`ScoredBatch.take_pending`). One no-grad
    forward of the batch at most; its statistics wait for :func:`proximal_stats`."""
    scored.prox_logp_B_T = torch.zeros_like(scored.old_logp_B_T)
    scored.defer(deferred_rows, "prox_logp_B_T")
    forward_logp(cfg, as_policy(policy), scored, micro_batches, "prox_logp_B_T")


def proximal_stats(scored: ScoredBatch, dist: Dist = SINGLE) -> dict[str, float]:
    """``staleness/prox_behaviour_abs``: mean |log π_prox − log π_b| over the response tokens of all ranks."""
    m = scored.response_mask_B_T.bool()
    n, total = dist.sum(m.sum(), (scored.prox_logp_B_T - scored.old_logp_B_T)[m].abs().sum())
    return {"staleness/prox_behaviour_abs": total / max(n, 1.0)}


def old_stats(scored: ScoredBatch, dist: Dist = SINGLE) -> dict[str, float]:
    """The statistics that need log π_old, over all ranks: the sampler/π_old mismatch (mean |log π_s − log π_old|
    and the k3 estimate of KL(π_s ‖ π_old)) and the teacher − old log-ratio on loss tokens."""
    old, sampler = scored.old_logp_B_T, scored.batch.sampler_logp_B_T
    m, lm = scored.response_mask_B_T.bool(), scored.loss_mask_B_T.bool()
    n_tok, n_loss, abs_sum, k3_sum, gap_sum = dist.sum(
        m.sum(), lm.sum(), (sampler - old)[m].abs().sum(), _k3(old - sampler)[m].sum(),
        (scored.teacher_logp_B_T - old)[lm].sum())
    out = {"mismatch/sampler_old_abs": abs_sum / max(n_tok, 1.0),
           "mismatch/sampler_old_kl": k3_sum / max(n_tok, 1.0),
           "teacher_minus_old_logp": gap_sum / max(n_loss, 1.0)}
    if scored.teacher_logp_each_B_T_N is not None:  # each teacher's log q_i − log π_old on loss tokens
        gaps = dist.sum(*((scored.teacher_logp_each_B_T_N[..., i] - old)[lm].sum()
                          for i in range(len(scored.teacher_names))))
        out |= {f"teacher/{name}/minus_old_logp": g / max(n_loss, 1.0)
                for name, g in zip(scored.teacher_names, gaps, strict=True)}
    return out


def routing_by_tag(scored: ScoredBatch, tags_B: list[str], dist: Dist = SINGLE) -> dict[str, float]:
    """``routing/by_tag/<tag>/frac/<name>`` and ``…/entropy``: the teachers' token shares on the rows of each problem
    tag in the global batch (does a per-token rule send the 4-operand problems' tokens to the 4-operand
    specialist?). Every rank takes the union of the ranks' tags (a tag without rows here adds zero counts) and the
    counts are summed over ranks, so the shares are those of one process holding every rank's rows."""
    tags = sorted({t for rank_tags in dist.gather(sorted(set(tags_B))) for t in rank_tags if t})
    names, out = list(scored.teacher_names), {}
    for tag in tags:
        rows = torch.tensor([t == tag for t in tags_B], dtype=torch.bool, device=scored.loss_mask_B_T.device)
        shares = routing_metrics(scored.route_B_T_N[rows], scored.loss_mask_B_T[rows], names, dist.sum)
        out |= {f"routing/by_tag/{tag}/{k.removeprefix('routing/')}": v for k, v in shares.items()}
    return out


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_ratio) - 1 - log_ratio
