"""Multi-teacher routing as pure functions on tensors: from N teachers' scores of one rollout batch to the single
target the loss sees, and the routing weights w_{t,i} that say how much of token t came from teacher i.

Symbols as in docs/methods.md: q_i (teacher i), π_old, y_t, S_t (the loss's support). Shapes: B rows, T response
positions, N teachers, K top-K ids, Q query ids, C candidate ids.

- Hard rules choose one teacher per token, i*_t (``choice_B_T``), and the target is that teacher's scores unchanged:
  the sampled-token loss takes log q_{i*}(y_t), LSM the top-K support S_t of q_{i*} and its log-probs there.
  ``w_{t,i} = 1[i = i*_t]``.
  - ``per_sample``: i*_t is the same for every token of a row, set by its problem's tag.
  - ``max_confidence``: i*_t = argmax_i max_v q_i(v|h_t) (``top1``) or argmin_i H(q_i(·|h_t)) (``entropy``).
  - ``min_kl``: i*_t = argmin_i D_i(t), the teacher closest to the student on the loss's support:
    LSM, D_i = KL(π̂_old ‖ q̂_i) renormalised on the support S_t^i the loss would take from teacher i (its own top-K
    with ``support=teacher``; π_old's top-K, shared by every teacher, with ``student``; both with ``union``): the
    LSM loss at π_θ = π_old. π_old here is a no-grad forward of the sampling policy at those ids (the routing
    decision only: the loss keeps the learner's own π_old);
    the sampled-token loss, whose support is the sampled token, D_i = k3 = e^{r_i} − 1 − r_i with
    r_i = log q_i(y_t) − log π_old(y_t): the non-negative sampled estimate of KL(π_old ‖ q_i).
  Ties go to the first teacher in ``model.teachers`` order.
- Soft rules (``mixture``, ``alignment``) give every token the weighted mixture, with w_i normalised to Σ w_i = 1:
  ``log`` space, log q(v) = Σ_i w_i log q_i(v) (the sampled-token reward is Σ_i w_i r_i, whose expectation is
  −Σ_i w_i KL(π‖q_i); LSM's renormalisation on S_t makes q̂ the normalised geometric mixture there); ``prob`` space,
  q(v) = Σ_i w_i q_i(v), a proper mixture distribution. The teacher support S_t of a mixture is its top-K among the
  union of the teachers' top-K ids, scored by every teacher at every candidate id: an approximation of the
  mixture's own top-K, exact when that lies in the union (always when N·K ≥ V, or when the teachers agree), not in
  general (a token second for every teacher can top the mixture).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from opd_lab.core.losses import dedup_mask
from opd_lab.core.teacher_scores import TeacherScores


# ------------------------------------------------------------------------------------------- hard routing
def take_choice(scores: list[TeacherScores], choice_B_T: torch.Tensor) -> TeacherScores:
    """The scores of teacher ``choice_B_T[b, t]`` at every (b, t): each field gathered along the teacher axis."""
    idx = choice_B_T.long()

    def pick(get):
        parts = [get(s) for s in scores]
        if any(p is None for p in parts):
            return None
        stacked = torch.stack(parts, dim=2)  # [B, T, N, ...]
        shape = (*idx.shape, 1, *stacked.shape[3:])
        return stacked.gather(2, idx.view(*idx.shape, 1, *([1] * (stacked.dim() - 3))).expand(shape)).squeeze(2)

    return TeacherScores(logp_B_T=pick(lambda s: s.logp_B_T), topk_ids_B_T_K=pick(lambda s: s.topk_ids_B_T_K),
                         topk_logp_B_T_K=pick(lambda s: s.topk_logp_B_T_K),
                         query_logp_B_T_Q=pick(lambda s: s.query_logp_B_T_Q),
                         entropy_B_T=pick(lambda s: s.entropy_B_T))


def one_hot_weights(choice_B_T: torch.Tensor, n: int) -> torch.Tensor:
    """w_{t,i} = 1[i = i*_t] as ``[B, T, N]`` float."""
    return torch.nn.functional.one_hot(choice_B_T.long(), n).float()


def per_sample_choice(row_teacher_B: torch.Tensor, T: int) -> torch.Tensor:
    """i*_t of every token of a row: the row's teacher, ``[B]`` → ``[B, T]``."""
    return row_teacher_B.long()[:, None].expand(-1, T)


def row_teachers(tags_B: list[str], by_tag: dict[str, str], default: str | None, names: list[str]) -> torch.Tensor:
    """Each row's teacher index from its problem tag (``routing.by_tag``, else ``routing.default``)."""
    out = []
    for tag in tags_B:
        name = by_tag.get(tag, default)
        if name is None:
            raise ValueError(f"routing.by_tag has no teacher for problem tag {tag!r} and routing.default is null: "
                             f"add routing.by_tag.{tag}=<teacher> or set routing.default (tags: {sorted(by_tag)})")
        out.append(names.index(name))
    return torch.tensor(out, dtype=torch.long)


def max_confidence_choice(scores: list[TeacherScores], confidence: str) -> torch.Tensor:
    """argmax_i of the top-1 log-prob (``top1``) or argmin_i of the entropy (``entropy``), ``[B, T]``."""
    if confidence == "top1":
        if any(s.topk_logp_B_T_K is None for s in scores):
            raise ValueError("routing.confidence=top1 needs every teacher's top-1 log-prob (top_k >= 1)")
        return torch.stack([s.topk_logp_B_T_K[..., 0] for s in scores], dim=-1).argmax(-1)
    if any(s.entropy_B_T is None for s in scores):
        raise ValueError("routing.confidence=entropy needs every teacher's entropy (an hf scorer)")
    return torch.stack([s.entropy_B_T for s in scores], dim=-1).argmin(-1)


def sampled_kl_k3(teacher_logp_B_T: torch.Tensor, old_logp_B_T: torch.Tensor) -> torch.Tensor:
    """k3 = e^r − 1 − r, r = log q_i(y_t) − log π_old(y_t): the sampled estimate of KL(π_old ‖ q_i) (≥ 0)."""
    r = (teacher_logp_B_T - old_logp_B_T).double()
    return (torch.expm1(r) - r).float()


def support_kl(old_logp_B_T_S: torch.Tensor, teacher_logp_B_T_S: torch.Tensor,
               mask_B_T_S: torch.Tensor) -> torch.Tensor:
    """KL(π̂_old ‖ q̂_i) renormalised on a support S_t (``mask_B_T_S``: its real entries), ``[B, T]``."""
    m = mask_B_T_S.bool()
    neg = torch.finfo(torch.float64).min
    lp = torch.log_softmax(old_logp_B_T_S.double().masked_fill(~m, neg), -1)
    lq = torch.log_softmax(teacher_logp_B_T_S.double().masked_fill(~m, neg), -1)
    return (lp.exp() * (lp - lq).masked_fill(~m, 0.0)).sum(-1).float()


def min_kl_choice(distance_B_T_N: torch.Tensor) -> torch.Tensor:
    """argmin_i D_i(t) (ties: the first teacher), ``[B, T]``."""
    return distance_B_T_N.argmin(-1)


# ------------------------------------------------------------------------------------------- soft routing
def normalised_weights(weights_N: list[float] | torch.Tensor) -> torch.Tensor:
    """w_i / Σ_j w_j (float64); a non-positive sum is an error."""
    w = torch.as_tensor(weights_N, dtype=torch.float64)
    if not bool((w >= 0).all()) or float(w.sum()) <= 0:
        raise ValueError(f"teacher weights {w.tolist()} are invalid: allowed weights >= 0 with a positive sum")
    return w / w.sum()


def mix(values_N: list[torch.Tensor], w_N: torch.Tensor, space: str) -> torch.Tensor:
    """The mixture of N teachers' log-probs at the same ids: Σ_i w_i v_i (``log``) or log Σ_i w_i e^{v_i}
    (``prob``); float32."""
    v = torch.stack([x.double() for x in values_N], dim=0)
    w = w_N.double().view(-1, *([1] * (v.dim() - 1)))
    if space == "log":  # a teacher with weight 0 contributes 0, also where its log-prob is −inf
        return torch.where(w > 0, w * v, torch.zeros_like(v)).sum(0).float()
    logw = torch.where(w > 0, w.log(), torch.full_like(w, -math.inf))
    return torch.logsumexp(logw + v, dim=0).float()


def candidates(topk_ids_N: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The union of the teachers' top-K ids at each position: ``(ids_B_T_C, first_B_T_C)`` with C = N·K and
    ``first`` 1 on the first occurrence of each id (repeats are masked)."""
    ids = torch.cat(topk_ids_N, dim=-1)
    return ids, dedup_mask(ids)


def mixture_topk(cand_ids_B_T_C: torch.Tensor, cand_mask_B_T_C: torch.Tensor, mix_logp_B_T_C: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixture's top-K among the candidates: ``(ids_B_T_K, logp_B_T_K)`` in descending order."""
    vals = mix_logp_B_T_C.masked_fill(~cand_mask_B_T_C.bool(), -math.inf)
    top, pos = vals.topk(min(k, vals.shape[-1]), dim=-1)
    return cand_ids_B_T_C.gather(-1, pos), top


def mixture_scores(scores: list[TeacherScores], w_N: torch.Tensor, space: str, top_k: int,
                   cand: tuple[torch.Tensor, torch.Tensor] | None = None,
                   cand_logp_N: list[torch.Tensor] | None = None, n_query: int = 0) -> TeacherScores:
    """The mixture's scores: log q(y_t), log q at the query ids (the first ``n_query`` of each teacher's
    ``query_logp``) and, with ``top_k`` > 0, its top-K among the candidates ``cand`` scored by every teacher
    (``cand_logp_N[i]``: teacher i's log-probs at ``cand`` ids)."""
    logp = mix([s.logp_B_T for s in scores], w_N, space)
    query = None
    if n_query:
        query = mix([s.query_logp_B_T_Q[..., :n_query] for s in scores], w_N, space)
    ids = top = None
    if top_k:
        assert cand is not None and cand_logp_N is not None
        ids, top = mixture_topk(cand[0], cand[1], mix(cand_logp_N, w_N, space), top_k)
    return TeacherScores(logp_B_T=logp, topk_ids_B_T_K=ids, topk_logp_B_T_K=top, query_logp_B_T_Q=query)


def constant_weights(w_N: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """w_{t,i} = w_i at every token, ``[B, T, N]`` float."""
    return w_N.float().view(1, 1, -1).expand(B, T, -1).clone()


# ------------------------------------------------------------------------------------------------ metrics
def routing_metrics(w_B_T_N: torch.Tensor, mask_B_T: torch.Tensor, names: list[str],
                    total: Callable[..., list[float]] | None = None) -> dict[str, float]:
    """Per-teacher token fraction f_i = Σ_t m_t w_{t,i} / Σ_t m_t and the routing entropy (:func:`fraction_metrics`).
    ``total`` sums the counts over ranks (``Dist.sum``); by default they are this process's."""
    m = mask_B_T.bool()
    sums = [m.sum(), *(w_B_T_N[..., i][m].double().sum() for i in range(len(names)))]
    sums = total(*sums) if total is not None else sums
    n = max(float(sums[0]), 1.0)
    return fraction_metrics([float(x) / n for x in sums[1:]], names)


def fraction_metrics(frac_N: list[float], names: list[str]) -> dict[str, float]:
    """``routing/frac/<name>`` = f_i and ``routing/entropy`` = H(f) = −Σ_i f_i log f_i (nats; 0 when one teacher takes
    every token, log N when they share them equally)."""
    out = {f"routing/frac/{name}": f for name, f in zip(names, frac_N, strict=True)}
    out["routing/entropy"] = -sum(f * math.log(f) for f in frac_N if f > 0)
    return out
