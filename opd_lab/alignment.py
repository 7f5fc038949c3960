"""The maths of the gradient-alignment diagnostic (METHODS.md, "Diagnostic: gradient alignment"), as functions on
tensors: the ideal logit-space gradient g*_t from Q estimates, each loss's distillation gradient d_t by autograd
through the learner's own loss functions, their cosine a_t, node selection and the model reads they need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opd_lab.config import SampledTokenLossConfig
from opd_lab.losses import full_reverse_kl, lsm_loss, sampled_token_loss
from opd_lab.registry import Registry


def ideal_gradient(pi_V: torch.Tensor, cand_ids: torch.Tensor, q_cand: torch.Tensor, rest: str,
                   q_rest: float | None = None) -> tuple[torch.Tensor, float]:
    """g*_t ``[V]`` and V(h_t) from the student's probabilities ``pi_V`` and Q at the candidate ids.

    ``rest="drop"``: π restricted to the candidates and renormalised, g* = 0 elsewhere.
    ``rest="share"``: every non-candidate token takes Q = ``q_rest``.
    """
    pi = pi_V.double()
    q_full = torch.full_like(pi, float("nan"))
    q_full[cand_ids] = q_cand.double()
    in_c = torch.zeros_like(pi, dtype=torch.bool)
    in_c[cand_ids] = True
    if rest == "drop":
        p = torch.where(in_c, pi, torch.zeros_like(pi))
        p = p / p.sum()
        value = float((p[in_c] * q_full[in_c]).sum())
        g = torch.where(in_c, p * (torch.nan_to_num(q_full) - value), torch.zeros_like(pi))
    elif rest == "share":
        if q_rest is None:
            raise ValueError("rest='share' needs q_rest")
        q_full[~in_c] = q_rest
        value = float((pi * q_full).sum())
        g = pi * (q_full - value)
    else:
        raise ValueError(f"rest={rest!r}: allowed drop, share")
    return g.float(), value


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b); NaN when either is the zero vector."""
    na, nb = float(a.double().norm()), float(b.double().norm())
    if na == 0.0 or nb == 0.0:
        return math.nan
    return float((a.double() @ b.double()) / (na * nb))


def _sampled_token_node(z: torch.Tensor, logq: torch.Tensor, token: int, top_k: int) -> torch.Tensor:
    """ℓ_t of :func:`~opd_lab.losses.sampled_token_loss` at π_θ = π_old (first pass), with the one-token advantage
    r_t = log q(y_t) − log π(y_t) (γ = 0)."""
    logp = torch.log_softmax(z, -1)[token]
    cfg = SampledTokenLossConfig()
    ell, _ = sampled_token_loss(logp.view(1, 1), logp.detach().view(1, 1), logq[token].view(1, 1), torch.ones(1, 1),
                                cfg.clip_eps, cfg.dual_clip, 0.0, cfg.clip_log_ratio)
    return ell


def _lsm_node(z: torch.Tensor, logq: torch.Tensor, token: int, top_k: int) -> torch.Tensor:
    """ℓ_t of :func:`~opd_lab.losses.lsm_loss` on the teacher's top-K support (renormalised)."""
    support = torch.topk(logq, min(top_k, logq.numel())).indices
    ell, _ = lsm_loss(z[support].view(1, 1, -1), logq[support].view(1, 1, -1), torch.ones(1, 1, support.numel()),
                      renormalise=True)
    return ell


def _full_rkl_node(z: torch.Tensor, logq: torch.Tensor, token: int, top_k: int) -> torch.Tensor:
    """ℓ_t of :func:`~opd_lab.losses.full_reverse_kl` over the whole vocabulary."""
    return full_reverse_kl(z.view(1, 1, -1), logq.view(1, 1, -1))


# the diagnostic's losses: name → ℓ_t(z_V, log q_V, y_t, K) at one node (names: config.DIAGNOSTIC_LOSS_NAMES)
DIAGNOSTIC_LOSSES: Registry = Registry("diagnostic loss")
DIAGNOSTIC_LOSSES.add("sampled_token", _sampled_token_node)
DIAGNOSTIC_LOSSES.add("lsm", _lsm_node)
DIAGNOSTIC_LOSSES.add("full_rkl", _full_rkl_node)


def distill_gradient(loss: str, z_V: torch.Tensor, teacher_logp_V: torch.Tensor, token: int,
                     top_k: int = 32) -> torch.Tensor:
    """d_t = −∂ℓ_t/∂z_t ``[V]`` at one node, by autograd through the loss functions the learner uses
    (:data:`DIAGNOSTIC_LOSSES`)."""
    z = z_V.detach().double().clone().requires_grad_(True)
    ell = DIAGNOSTIC_LOSSES.get(loss)(z, teacher_logp_V.detach().double(), token, top_k)
    (grad,) = torch.autograd.grad(ell.sum(), z)
    return (-grad).float()


def entropy(logits_N_V: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits_N_V.double(), -1)
    return -(logp.exp() * logp).sum(-1).float()


def choose_nodes(ent_T: torch.Tensor, mode: str, every_k: int, max_nodes: int) -> list[int]:
    """Response positions to probe: every k-th (0, k, 2k, …) or the highest-entropy ones, at most ``max_nodes``,
    never the last position (a node needs a continuation)."""
    T = ent_T.numel() - 1
    if T <= 0:
        return []
    if mode == "every_k":
        return list(range(0, T, every_k))[:max_nodes]
    top = torch.topk(ent_T[:T], min(max_nodes, T)).indices
    return sorted(top.tolist())


def response_states(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """Final hidden states ``[T, H]`` at the nodes h_t that predict response tokens t = 0 … T−1."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + response_ids[:-1]], device=device)
    with torch.no_grad():
        return model.base_model(input_ids=ids).last_hidden_state[0, len(prompt_ids) - 1 :]


def head(model, h_N_H: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[N, V]`` (on the CPU) of hidden states ``h_N_H``."""
    with torch.no_grad():
        return (h_N_H.float() @ model.get_output_embeddings().weight.float().T).cpu()


def node_logits(model, prompt_ids: list[int], response_ids: list[int], positions: list[int]) -> torch.Tensor:
    """Float32 logits ``[N, V]`` predicting response token t (the node h_t) for each t in ``positions``."""
    return head(model, response_states(model, prompt_ids, response_ids)[positions])


def response_entropy(model, h_T_H: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Entropy ``[T]`` of π_θ(·|h_t) at every node, ``chunk`` positions at a time (never a [T, V] tensor)."""
    return torch.cat([entropy(head(model, h_T_H[i : i + chunk])) for i in range(0, h_T_H.shape[0], chunk)])


@dataclass
class Teacher:
    name: str
    model: torch.nn.Module
    context: str | None

    def prompt(self, tokenizer, problem, encode) -> list[int]:
        """The teacher's prompt: the student's, with ``context`` (filled in) as the system message when set."""
        if not self.context:
            return encode(tokenizer, [problem])[0]
        system = self.context.format(answer=problem.answer, question=problem.question)
        return encode(tokenizer, [problem], system_prompt=system)[0]
