"""Log-probs of chosen ids from a causal LM, without a float32 [B, T, V] copy.

Everything the losses and gates need from a model at response position t is a handful of numbers: the
log-sum-exp lse_t = log Σ_V exp(z_t) and the logits z_t at a few ids (the sampled token y_t, the support S_t).
Two paths compute them:

- plain: the model's logits ``[B, T, V]`` (model dtype), then a float32 log-sum-exp over chunks of positions
  and a gather-then-upcast of the chosen columns;
- chunked: the final hidden states ``[B, T, H]`` go through the LM head ``chunk_size`` positions at a time,
  under activation checkpointing, so at most ``[B, chunk, V]`` logits exist at once, in the forward and in
  the backward pass (recomputed there).

Both return the same ``(lse_B_T, z_B_T_K)``; the learner builds log π(v) = z_v − lse from them. Scoring
(π_old, teacher) always takes the chunked path without gradients and keeps only what the losses need
(sampled-token log-prob, top-K ids and log-probs, log-probs at requested ids), never logits.
The chunked path assumes the usual causal-LM head ``logits = hidden @ W_head^T`` (no soft-capping/scaling).

Temperature: when the rollout temperature T_s ≠ 1, logits are divided by T_s before any log-softmax, for the
student and the teacher alike (METHODS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_lab.rollout.base import RolloutBatch


def response_logits(model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """Logits ``[B, T, V]`` (model dtype) predicting each response token, divided by ``temperature``."""
    device = next(model.parameters()).device
    ids = batch.input_ids_B_L.to(device)
    att = batch.attention_mask_B_L.to(device)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    P = batch.prompt_len
    out = model(input_ids=ids[:, :-1], attention_mask=att[:, :-1], position_ids=pos[:, :-1],
                logits_to_keep=ids.shape[1] - P)
    logits = out.logits  # positions P-1 .. L-2 predict response tokens 0 .. T-1
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def response_hidden(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` at the positions that predict each response token."""
    device = next(model.parameters()).device
    ids = batch.input_ids_B_L.to(device)
    att = batch.attention_mask_B_L.to(device)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    out = model.base_model(input_ids=ids[:, :-1], attention_mask=att[:, :-1], position_ids=pos[:, :-1])
    T = ids.shape[1] - batch.prompt_len
    return out.last_hidden_state[:, -T:]


def _head_chunk(h_B_C_H: torch.Tensor, w_V_H: torch.Tensor, ids_B_C_K: torch.Tensor, temperature: float):
    logits = h_B_C_H @ w_V_H.t()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.logsumexp(logits.float(), dim=-1), logits.gather(-1, ids_B_C_K).float()


def head_stats_chunked(
    hidden_B_T_H: torch.Tensor,
    head_weight_V_H: torch.Tensor,
    ids_B_T_K: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse_B_T, z_B_T_K)`` in float32 from hidden states, ``chunk_size`` positions of logits at a time.

    With autograd on, each chunk runs under non-reentrant activation checkpointing: its ``[B, chunk, V]``
    logits are freed after the forward and recomputed in the backward pass.
    """
    lse, z = [], []
    grad = torch.is_grad_enabled() and (hidden_B_T_H.requires_grad or head_weight_V_H.requires_grad)
    for s in range(0, hidden_B_T_H.shape[1], chunk_size):
        args = (hidden_B_T_H[:, s : s + chunk_size], head_weight_V_H, ids_B_T_K[:, s : s + chunk_size], temperature)
        if grad:
            lse_c, z_c = torch.utils.checkpoint.checkpoint(_head_chunk, *args, use_reentrant=False)
        else:
            lse_c, z_c = _head_chunk(*args)
        lse.append(lse_c)
        z.append(z_c)
    return torch.cat(lse, dim=1), torch.cat(z, dim=1)


def head_stats_plain(logits_B_T_V: torch.Tensor, ids_B_T_K: torch.Tensor,
                     chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse_B_T, z_B_T_K)`` in float32 from full logits (already divided by the temperature)."""
    return logsumexp_chunked(logits_B_T_V, chunk_size), gather_float(logits_B_T_V, ids_B_T_K)


def logsumexp_chunked(logits_B_T_V: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """float32 log Σ_V exp(z) per position, upcasting at most ``chunk_size`` positions at a time."""
    T = logits_B_T_V.shape[1]
    parts = [torch.logsumexp(logits_B_T_V[:, s : s + chunk_size].float(), dim=-1) for s in range(0, T, chunk_size)]
    return torch.cat(parts, dim=1) if parts else logits_B_T_V.new_zeros(logits_B_T_V.shape[:2]).float()


def gather_float(logits_B_T_V: torch.Tensor, ids_B_T_K: torch.Tensor) -> torch.Tensor:
    """Logits at ``ids`` as float32 ``[B, T, K]`` (gather first, then upcast)."""
    return logits_B_T_V.gather(-1, ids_B_T_K).float()


@dataclass
class TeacherScores:
    """Teacher outputs for a rollout batch (all float32 log-probs over the full vocabulary, ``[B, T, ...]``)."""

    logp_B_T: torch.Tensor  # log q(y_t | h_t)
    topk_ids_B_T_K: torch.Tensor | None = None
    topk_logp_B_T_K: torch.Tensor | None = None
    query_logp_B_T_Q: torch.Tensor | None = None  # log q at the requested extra ids


@torch.no_grad()
def score_teacher(
    teacher: torch.nn.Module,
    batch: RolloutBatch,
    top_k: int = 0,
    temperature: float = 1.0,
    query_ids_B_T_Q: torch.Tensor | None = None,
    batch_size: int = 64,
    chunk_size: int = 256,
) -> TeacherScores:
    """Teacher log-probs of the sampled tokens, its top-K (``top_k`` > 0) and log-probs at extra ids.

    Runs ``batch_size`` sequences at a time and the LM head ``chunk_size`` positions at a time: the largest
    tensor is ``[batch_size, chunk_size, V]`` logits, never ``[B, T, V]``.
    """
    logp, tk_ids, tk_logp, q_logp = [], [], [], []
    w = teacher.get_output_embeddings().weight
    for s in range(0, batch.size, batch_size):
        idx = torch.arange(s, min(s + batch_size, batch.size))
        sub = batch.select(idx)
        h = response_hidden(teacher, sub)
        y = sub.response_ids_B_T.to(h.device)
        q = query_ids_B_T_Q[idx].to(h.device) if query_ids_B_T_Q is not None else None
        parts: dict[str, list[torch.Tensor]] = {"lp": [], "ti": [], "tl": [], "ql": []}
        for c in range(0, h.shape[1], chunk_size):
            logits = h[:, c : c + chunk_size] @ w.t()
            if temperature != 1.0:
                logits = logits / temperature
            lse = torch.logsumexp(logits.float(), dim=-1)
            parts["lp"].append(gather_float(logits, y[:, c : c + chunk_size, None])[..., 0] - lse)
            if top_k > 0:
                vals, ids = torch.topk(logits, top_k, dim=-1)
                parts["ti"].append(ids)
                parts["tl"].append(vals.float() - lse[..., None])
            if q is not None:
                parts["ql"].append(gather_float(logits, q[:, c : c + chunk_size]) - lse[..., None])
        logp.append(torch.cat(parts["lp"], 1).cpu())
        if top_k > 0:
            tk_ids.append(torch.cat(parts["ti"], 1).cpu())
            tk_logp.append(torch.cat(parts["tl"], 1).cpu())
        if q is not None:
            q_logp.append(torch.cat(parts["ql"], 1).cpu())
    return TeacherScores(
        logp_B_T=torch.cat(logp),
        topk_ids_B_T_K=torch.cat(tk_ids) if tk_ids else None,
        topk_logp_B_T_K=torch.cat(tk_logp) if tk_logp else None,
        query_logp_B_T_Q=torch.cat(q_logp) if q_logp else None,
    )


class HFTeacherScorer:
    """Teacher scoring with a transformers forward of the frozen teacher (any support, any temperature)."""

    def __init__(self, teacher: torch.nn.Module, batch_size: int = 64, chunk_size: int = 256) -> None:
        self.teacher, self.batch_size, self.chunk_size = teacher, batch_size, chunk_size

    def __call__(self, batch: RolloutBatch, top_k: int, temperature: float,
                 query_ids_B_T_Q: torch.Tensor | None = None) -> TeacherScores:
        return score_teacher(self.teacher, batch, top_k, temperature, query_ids_B_T_Q, self.batch_size,
                             self.chunk_size)

    def close(self) -> None:
        pass


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


def dedup_mask(ids_B_T_S: torch.Tensor) -> torch.Tensor:
    """1 on the first occurrence of each id along the last dim, 0 on repeats."""
    sorted_ids, order = torch.sort(ids_B_T_S, dim=-1, stable=True)
    first_sorted = torch.ones_like(sorted_ids, dtype=torch.bool)
    first_sorted[..., 1:] = sorted_ids[..., 1:] != sorted_ids[..., :-1]
    keep = torch.empty_like(first_sorted)
    keep.scatter_(-1, order, first_sorted)
    return keep.long()


def build_support(
    support: str,
    response_ids_B_T: torch.Tensor,
    teacher: TeacherScores,
    old_topk_ids_B_T_K: torch.Tensor | None,
    add_sampled_token: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support S_t as ``(ids_B_T_S, teacher_logp_B_T_S, mask_B_T_S)``.

    ``support`` ∈ teacher (teacher top-K), student (π_old's top-K: fixed at rollout time), union (both).
    ``add_sampled_token`` appends y_t. Teacher log-probs at non-teacher ids come from ``teacher.query_logp``,
    which must hold log q at ``old_topk_ids`` (student/union support).
    """
    ids, logp = [], []
    if support in ("teacher", "union"):
        assert teacher.topk_ids_B_T_K is not None and teacher.topk_logp_B_T_K is not None
        ids.append(teacher.topk_ids_B_T_K)
        logp.append(teacher.topk_logp_B_T_K)
    if support in ("student", "union"):
        assert old_topk_ids_B_T_K is not None and teacher.query_logp_B_T_Q is not None
        K = old_topk_ids_B_T_K.shape[-1]
        ids.append(old_topk_ids_B_T_K)
        logp.append(teacher.query_logp_B_T_Q[..., :K])
    if add_sampled_token:
        ids.append(response_ids_B_T.unsqueeze(-1))
        logp.append(teacher.logp_B_T.unsqueeze(-1))
    ids_S = torch.cat(ids, dim=-1)
    return ids_S, torch.cat(logp, dim=-1), dedup_mask(ids_S)
