"""What a teacher scorer returns for a rollout batch: the typed record every engine's scorer fills and the routing
rules and losses read (docs/methods.md, "Multi-teacher routing")."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TeacherScores:
    """Teacher outputs for a rollout batch (all float32 log-probs over the full vocabulary, ``[B, T, ...]``)."""

    logp_B_T: torch.Tensor  # log q(y_t | h_t)
    topk_ids_B_T_K: torch.Tensor | None = None
    topk_logp_B_T_K: torch.Tensor | None = None
    query_logp_B_T_Q: torch.Tensor | None = None  # log q at the requested extra ids
    entropy_B_T: torch.Tensor | None = None  # H(q(·|h_t)) (asked of an hf scorer by routing.confidence=entropy)
