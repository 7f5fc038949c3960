"""The rollout-engine interface and the batch it returns.

Layout of a :class:`RolloutBatch` (B = number of sequences = prompts × n, P = padded prompt length, T = padded
response length, L = P + T)::

    input_ids_B_L:   [ left-padded prompt (P) | response, right-padded (T) ]
    response_mask_B_T: 1 on generated tokens (including the final <|im_end|>), 0 on right padding

Log-probs of response token t come from the logits at position P + t − 1. Engines and teacher scorers are
built by name from :data:`ENGINES` here and :data:`opd_lab.learner.scoring.SCORERS` (lazy: ``import opd_lab`` never
imports vLLM). This module is what engines and scorers depend on; it depends on nothing of opd_lab but the registry
and the teacher-scores record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from opd_lab.common.registry import Registry
from opd_lab.core.teacher_scores import TeacherScores


@dataclass(frozen=True)
class SamplingSpec:
    """What to sample: ``n`` responses per prompt at ``temperature``/``top_p``, at most ``max_tokens``.

    ``prompt_offset``: the global index of the first prompt (a rank's share under torchrun); engines seed every
    (prompt, sample) stream with :func:`sample_seed` of the global prompt index, so samples do not depend on how
    the batch is split over calls or ranks.
    """

    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    prompt_offset: int = 0


@dataclass
class RolloutBatch:
    """Token ids, masks and the sampler's per-token log-probs log π_s(y_t | h_t) of a batch of responses."""

    input_ids_B_L: torch.Tensor
    attention_mask_B_L: torch.Tensor
    prompt_len: int
    response_mask_B_T: torch.Tensor
    sampler_logp_B_T: torch.Tensor
    truncated_B: torch.Tensor
    prompt_index_B: torch.Tensor
    response_text: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    prompt_tags: list[str] = field(default_factory=list)  # per prompt: its problem's tag (per-sample routing)

    @property
    def tags_B(self) -> list[str]:
        """Each row's problem tag (empty strings when the batch carries none)."""
        return [self.prompt_tags[i] if self.prompt_tags else "" for i in self.prompt_index_B.tolist()]

    @property
    def response_ids_B_T(self) -> torch.Tensor:
        return self.input_ids_B_L[:, self.prompt_len :]

    @property
    def size(self) -> int:
        return self.input_ids_B_L.shape[0]

    def select(self, idx: torch.Tensor, trim: bool = False) -> RolloutBatch:
        """Rows ``idx`` (a 1-D index tensor) as a new batch; column layout is unchanged, or with ``trim`` cut after
        the longest of these rows' responses (T' ≤ T response columns; response token t stays at column t)."""
        T = int(self.response_mask_B_T[idx].sum(1).max().clamp(min=1)) if trim else self.response_mask_B_T.shape[1]
        L = self.prompt_len + T
        return RolloutBatch(
            input_ids_B_L=self.input_ids_B_L[idx, :L],
            attention_mask_B_L=self.attention_mask_B_L[idx, :L],
            prompt_len=self.prompt_len,
            response_mask_B_T=self.response_mask_B_T[idx, :T],
            sampler_logp_B_T=self.sampler_logp_B_T[idx, :T],
            truncated_B=self.truncated_B[idx],
            prompt_index_B=self.prompt_index_B[idx],
            response_text=[self.response_text[i] for i in idx.tolist()] if self.response_text else [],
            prompt_tags=self.prompt_tags,
        )


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sampling stream: sample ``sample_index`` of the prompt with global index ``prompt_index``
    in a call seeded ``seed``. A hash of the triple (splitmix64 rounds), so every (prompt, sample) has its own
    stream, the same however the batch is split into calls or ranks (seed + i + j would make sample j + 1 of
    prompt i share sample j of prompt i + 1's noise). Fits in 63 bits."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (prompt_index & _MASK64))
    h = _splitmix64(h ^ (sample_index & _MASK64))
    return h >> 1


class RolloutEngine(Protocol):
    """What the learner and the evaluator need from a sampler."""

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> RolloutBatch:
        """Sample ``spec.n`` responses for each prompt (token ids, no padding); rows are prompt-major."""
        ...

    def sync_weights(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> float:
        """Load the learner's current weights (``state_dict``: the full weights when ``model`` is sharded);
        returns the seconds it took."""
        ...

    def close(self) -> None: ...


class TeacherScorer(Protocol):
    """Scores a rollout batch with the teacher: log q of the sampled tokens, its top-K and log q at extra ids."""

    def __call__(self, batch: RolloutBatch, top_k: int, temperature: float,
                 query_ids_B_T_Q: torch.Tensor | None = None) -> TeacherScores: ...

    def close(self) -> None: ...


@dataclass
class BuildContext:
    """What an engine or a teacher scorer is built from (each registered builder takes what it needs)."""

    cfg: Any  # the run's Config
    tokenizer: Any
    path: str  # the model's folder or hub id (vLLM loads the weights from it)
    stop_ids: tuple[int, ...]
    model: torch.nn.Module | None = None  # the loaded model (HF engine and HF scorer use it in place)
    sharded_root: torch.nn.Module | None = None  # its FSDP2 root under torchrun (HF engine)


# name → builder(BuildContext); "module:function" paths stay unimported until asked for (no vLLM on `import opd_lab`)
ENGINES: Registry = Registry("rollout engine")
ENGINES.add("hf", "opd_lab.rollout.hf:build_engine")
ENGINES.add("vllm", "opd_lab.rollout.vllm:build_engine")
ENGINES.add("static", "opd_lab.rollout.static:build_engine")


@dataclass(frozen=True)
class EngineTraits:
    """What a run must know of an engine before building it (no import of the engine's module)."""

    in_memory: bool  # samples from a loaded module (BuildContext.model; async: its own copy); else loads ``path``
    in_process_vllm: bool  # a vLLM engine in this process: one per process, and inline (not threaded) under torchrun


TRAITS: Registry[EngineTraits] = Registry("rollout engine")
TRAITS.add("hf", EngineTraits(in_memory=True, in_process_vllm=False))
TRAITS.add("static", EngineTraits(in_memory=True, in_process_vllm=False))
TRAITS.add("vllm", EngineTraits(in_memory=False, in_process_vllm=True))


def engine_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """What an engine's own copy of the student loads at a weight sync: ``state_dict`` (FSDP2's gathered full
    state, which leaves out a tied ``lm_head.weight``) with the tied head restored, or the module's own state."""
    if state_dict is None:
        return model.state_dict()
    if "lm_head.weight" not in state_dict and getattr(model.config, "tie_word_embeddings", False):
        return {**state_dict, "lm_head.weight": state_dict["model.embed_tokens.weight"]}
    return state_dict


def pad_prompts(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists to ``[N, P]`` ids and attention mask."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p) :] = 1
    return ids, mask


def assemble_batch(
    prompts: list[list[int]],
    responses: list[list[int]],
    sampler_logps: list[list[float]],
    truncated: list[bool],
    n: int,
    pad_id: int,
    texts: list[str],
) -> RolloutBatch:
    """Build a :class:`RolloutBatch` from per-row responses (row i answers prompt i // n)."""
    B = len(responses)
    rep_prompts = [prompts[i // n] for i in range(B)]
    p_ids, p_mask = pad_prompts(rep_prompts, pad_id)
    T = max(1, max(len(r) for r in responses))
    r_ids = torch.full((B, T), pad_id, dtype=torch.long)
    r_mask = torch.zeros((B, T), dtype=torch.long)
    s_logp = torch.zeros((B, T), dtype=torch.float32)
    for i, (r, lp) in enumerate(zip(responses, sampler_logps, strict=True)):
        r_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        r_mask[i, : len(r)] = 1
        s_logp[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return RolloutBatch(
        input_ids_B_L=torch.cat([p_ids, r_ids], dim=1),
        attention_mask_B_L=torch.cat([p_mask, r_mask], dim=1),
        prompt_len=p_ids.shape[1],
        response_mask_B_T=r_mask,
        sampler_logp_B_T=s_logp,
        truncated_B=torch.tensor(truncated, dtype=torch.bool),
        prompt_index_B=torch.arange(B) // n,
        response_text=texts,
    )


def unpadded_sequences(batch: RolloutBatch) -> list[list[int]]:
    """Each row's prompt + response token ids without padding (what a prompt-log-prob scorer is sent)."""
    return [batch.input_ids_B_L[i][batch.attention_mask_B_L[i].bool()].tolist() for i in range(batch.size)]


def scores_from_prompt_logprobs(batch: RolloutBatch, seqs: list[list[int]],
                                entries: list[list[dict[int, tuple[float, int]] | None]], top_k: int):
    """:class:`~opd_lab.core.teacher_scores.TeacherScores` from vLLM prompt log-probs (in-process or served).

    ``entries[i][p]`` maps token id → (log-prob, rank) at position ``p`` of ``seqs[i]``: the top-K of the
    distribution predicting token ``p`` plus the actual token ``seqs[i][p]``. Response token t of row i sits at
    ``p = len(seqs[i]) − n_resp + t``. Returns log q(y_t) ``[B, T]`` and (``top_k`` > 0) the top-K ids and
    log-probs ``[B, T, K]`` in rank order.
    """
    k = max(top_k, 1)
    B, T = batch.response_mask_B_T.shape
    logp = torch.zeros(B, T)
    tk_ids = torch.zeros(B, T, k, dtype=torch.long)
    tk_logp = torch.full((B, T, k), -1e30)
    for i, seq in enumerate(seqs):
        n_resp = int(batch.response_mask_B_T[i].sum())
        n_prompt = len(seq) - n_resp
        for t in range(n_resp):
            entry = entries[i][n_prompt + t]
            logp[i, t] = entry[seq[n_prompt + t]][0]
            ranked = sorted((rank, tok, lp) for tok, (lp, rank) in entry.items() if rank <= k)
            for j, (_, tok, lp) in enumerate(ranked[:k]):
                tk_ids[i, t, j] = tok
                tk_logp[i, t, j] = lp
    return TeacherScores(logp_B_T=logp, topk_ids_B_T_K=tk_ids if top_k > 0 else None,
                         topk_logp_B_T_K=tk_logp if top_k > 0 else None)
