"""A pure-torch sampler for small Qwen3-architecture models: a static KV cache and no per-token overhead.

HF ``generate`` spends most of a decode step of a 0.4 M-parameter model in Python and dispatch, not arithmetic
(FACTS.md). This engine decodes the same model with as few ops per step as the architecture allows:

- the weights are packed once per call (fused q/k/v and gate/up projections; ``sync_weights`` has nothing to copy:
  it reads the learner's module, like the HF engine);
- one preallocated KV cache ``[layers, B, kv_heads, P + max_tokens, head_dim]`` written in place, RoPE from
  precomputed tables, ``scaled_dot_product_attention`` with grouped-query heads over the prompt and two batched
  matmuls for each decode step's single query (:func:`decode_attention`);
- sampling from the processed distribution π_s (temperature, then top-p as HF and vLLM define it: the smallest
  set of most likely tokens whose mass reaches p) by the inverse CDF of one uniform per (row, position), drawn
  up front from the row's own stream (:func:`~opd_lab.rollout.base.sample_seed`): every (prompt, sample) is
  reproducible whatever the batch split, and the sampler's log-probs are reported like HF's and vLLM's.

It serves Qwen3 (``model_type == "qwen3"``) with the default RoPE and full attention; anything else is a
start-up error pointing at ``rollout.engine=hf``. ``tests/rollout/test_static.py`` checks that it samples the same
distribution as the HF reference (token frequencies and log-prob statistics on a fixed prompt set).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opd_lab.common.distributed import full_params
from opd_lab.models.token_ids import ends_with_stop
from opd_lab.rollout.base import (
    BuildContext,
    RolloutBatch,
    SamplingSpec,
    assemble_batch,
    engine_state,
    pad_prompts,
    sample_seed,
)


def check_supported(config) -> None:
    """The static engine implements plain Qwen3: default RoPE, full attention, no soft-capping."""
    problems = []
    if getattr(config, "model_type", None) != "qwen3":
        problems.append(f"model_type={getattr(config, 'model_type', None)!r} (needs 'qwen3')")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope.get('rope_type')!r} (needs 'default')")
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        problems.append("sliding-window layers")
    if problems:
        raise ValueError(f"rollout.engine=static serves plain Qwen3 models; this one has {', '.join(problems)}: "
                         "use rollout.engine=hf or vllm")


def decode_attention(q_B_N_1_D: torch.Tensor, k_B_G_L_D: torch.Tensor, v_B_G_L_D: torch.Tensor,
                     bias_B_1_1_L: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√D + bias) v for one query per row, N query heads over G kv heads (query head j reads kv head
    j // (N/G), as ``enable_gqa``): two batched matmuls on the cache, where the CPU's flash-attention kernel spends
    ~0.26 ms a call on a single query (profile of a decode step: 39% of it at one thread). ``bias`` is 0 at the
    slots a row attends to and −inf elsewhere (a row's left padding). Returns ``[B, N, 1, D]``."""
    B, N, _, D = q_B_N_1_D.shape
    G = k_B_G_L_D.shape[1]
    scores = torch.matmul(q_B_N_1_D.reshape(B, G, N // G, D), k_B_G_L_D.transpose(-1, -2))
    scores = scores.mul_(D**-0.5).add_(bias_B_1_1_L)  # scaled after the product, as the flash kernel does
    p = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))  # bf16: in float32
    return torch.matmul(p.to(v_B_G_L_D.dtype), v_B_G_L_D).view(B, N, 1, D)


@dataclass
class _Layer:
    ln1: torch.Tensor
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    w_o: torch.Tensor
    ln2: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor


class StaticEngine:
    """Samples a Qwen3 ``model`` in place (no weight copy) with a static KV cache; ``batch_size`` rows per call.

    ``sharded_root``: the FSDP2 root the module belongs to (torchrun): the weights are gathered while packing.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, stop_ids: tuple[int, ...], batch_size: int = 256,
                 sharded_root: torch.nn.Module | None = None) -> None:
        check_supported(model.config)
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, tuple(stop_ids)
        self.batch_size, self.sharded_root = batch_size, sharded_root
        self.pad_id = tokenizer.pad_token_id
        c = model.config
        self.n_heads, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self.theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 1e6))

    # --------------------------------------------------------------------------------------------- weights
    def _pack(self) -> tuple[list[_Layer], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused per-layer weights, the embedding, the final norm and the LM head, read from the model now."""
        with full_params(self.sharded_root), torch.no_grad():
            base = self.model.base_model
            layers = []
            for layer in base.layers:
                a, m = layer.self_attn, layer.mlp
                bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
                layers.append(_Layer(
                    layer.input_layernorm.weight.detach().clone(),
                    torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(), bias,
                    a.q_norm.weight.detach().clone(), a.k_norm.weight.detach().clone(),
                    a.o_proj.weight.detach().clone(),
                    layer.post_attention_layernorm.weight.detach().clone(),
                    torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(), m.down_proj.weight.detach().clone()))
            return (layers, base.embed_tokens.weight.detach().clone(), base.norm.weight.detach().clone(),
                    self.model.get_output_embeddings().weight.detach().clone())

    # ------------------------------------------------------------------------------------------- the model
    def _rope(self, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
        freqs = torch.arange(length, dtype=torch.float)[:, None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1).to(device)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def _forward(self, w, x: torch.Tensor, pos: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], at: int,
                 key_mask: torch.Tensor, rope) -> torch.Tensor:
        """Hidden states ``[B, S, H]`` of tokens ``x`` ``[B, S]`` at positions ``pos`` ``[B, S]``, written into the
        cache at slots ``at .. at+S−1`` and attending over slots ``< at+S`` allowed by ``key_mask``: a boolean
        ``[B, 1, S, at+S]`` (the prompt), or for one token per row (S = 1) an additive bias ``[B, 1, 1, at+1]`` of 0
        and −inf (:func:`decode_attention`)."""
        layers, embed, norm_w, _ = w
        B, S = x.shape
        cos, sin = rope[0][pos].unsqueeze(1), rope[1][pos].unsqueeze(1)  # [B, 1, S, hd]
        h = F.embedding(x, embed)
        nq, nk, hd = self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.head_dim
        k_cache, v_cache = cache
        for i, L in enumerate(layers):
            qkv = F.linear(self._rms(h, L.ln1), L.w_qkv, L.b_qkv)
            q = self._rms(qkv[..., :nq].view(B, S, self.n_heads, hd), L.q_norm).transpose(1, 2)
            k = self._rms(qkv[..., nq : nq + nk].view(B, S, self.n_kv, hd), L.k_norm).transpose(1, 2)
            k_cache[i, :, :, at : at + S] = self._rotate(k, cos, sin)
            v_cache[i, :, :, at : at + S] = qkv[..., nq + nk :].view(B, S, self.n_kv, hd).transpose(1, 2)
            q, keys, values = self._rotate(q, cos, sin), k_cache[i, :, :, : at + S], v_cache[i, :, :, : at + S]
            if key_mask.dtype == torch.bool:  # the prompt: S queries, a boolean mask
                att = F.scaled_dot_product_attention(q, keys, values, attn_mask=key_mask, enable_gqa=True)
            else:  # a decode step: one query per row, an additive key bias
                att = decode_attention(q, keys, values, key_mask)
            h = h + F.linear(att.transpose(1, 2).reshape(B, S, nq), L.w_o)
            gate, up = F.linear(self._rms(h, L.ln2), L.w_gate_up).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, L.w_down)
        return self._rms(h, norm_w)

    # ---------------------------------------------------------------------------------------------- sampling
    @staticmethod
    def processed_logits(logits_B_V: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        """The sampler's logits: divided by the temperature, tokens outside the top-p set at −inf (the smallest
        set of most likely tokens whose mass reaches ``top_p``, at least one)."""
        z = logits_B_V.float() / temperature
        if top_p < 1.0:
            probs, order = torch.softmax(z, -1).sort(dim=-1, descending=True)
            before = probs.cumsum(-1) - probs  # mass of the more likely tokens
            drop = torch.zeros_like(z, dtype=torch.bool).scatter(-1, order, before >= top_p)
            z = z.masked_fill(drop, float("-inf"))
        return z

    @staticmethod
    def inverse_cdf(logp_B_V: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
        """The token whose CDF interval holds ``u`` ∈ (0, 1] (a zero-probability token is never chosen)."""
        cdf = logp_B_V.exp().cumsum(-1)
        idx = torch.searchsorted(cdf, (u_B * cdf[:, -1]).unsqueeze(-1))
        return idx.clamp_(max=logp_B_V.shape[-1] - 1).squeeze(-1)

    def _uniforms(self, spec: SamplingSpec, rows: range, T: int) -> torch.Tensor:
        """``[rows, T]`` uniforms in (0, 1]: row r is sample r % n of prompt r // n, from its own stream."""
        out = torch.empty(len(rows), T)
        for i, r in enumerate(rows):
            g = torch.Generator().manual_seed(sample_seed(spec.seed, spec.prompt_offset + r // spec.n, r % spec.n))
            out[i] = 1.0 - torch.rand(T, generator=g)
        return out

    @torch.inference_mode()
    def _sample_chunk(self, w, prompts: list[list[int]], u_B_T: torch.Tensor, spec: SamplingSpec):
        device = w[1].device
        ids, mask = pad_prompts(prompts, self.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        B, P = ids.shape
        T = spec.max_tokens
        dtype = w[1].dtype
        shape = (len(w[0]), B, self.n_kv, P + T, self.head_dim)
        cache = (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        rope = self._rope(P + T, device, dtype)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        real = mask.bool()  # [B, P]: the prompt slots that hold tokens (not left padding)
        eye = torch.eye(P, dtype=torch.bool, device=device)  # a padding query attends to itself: no all-masked row
        allowed = (torch.ones(P, P, dtype=torch.bool, device=device).tril() & real[:, None]) | eye
        h = self._forward(w, ids, pos, cache, 0, allowed[:, None], rope)[:, -1]
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long)
        logps = torch.zeros(B, T)
        done = torch.zeros(B, dtype=torch.bool)
        stop = torch.tensor(self.stop_ids, device=device)
        next_pos = pos[:, -1] + 1
        # decode_attention's key bias: 0 at a row's real prompt slots, each response slot set to 0 once written
        bias = torch.full((B, 1, 1, P + T), float("-inf"), dtype=dtype, device=device)
        bias[:, 0, 0, :P].masked_fill_(real, 0.0)
        n = 0
        for t in range(T):
            z = self.processed_logits(F.linear(h, w[3]), spec.temperature, spec.top_p)
            logp = torch.log_softmax(z, -1)
            tok = self.inverse_cdf(logp, u_B_T[:, t].to(device))
            tokens[:, t], logps[:, t] = tok.cpu(), logp.gather(-1, tok[:, None])[:, 0].cpu()
            n = t + 1
            done |= torch.isin(tok, stop).cpu()
            if bool(done.all()) or t == T - 1:
                break
            bias[..., P + t] = 0.0
            h = self._forward(w, tok[:, None], next_pos[:, None], cache, P + t, bias[..., : P + t + 1], rope)[:, -1]
            next_pos = next_pos + 1
        return tokens[:, :n], logps[:, :n]

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> RolloutBatch:
        t0 = time.perf_counter()
        w = self._pack()
        rows = [p for p in prompts for _ in range(spec.n)]
        responses, logps, truncated = [], [], []
        for start in range(0, len(rows), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(rows)))
            toks, lps = self._sample_chunk(w, rows[chunk.start : chunk.stop], self._uniforms(spec, chunk,
                                                                                               spec.max_tokens), spec)
            for i in range(toks.shape[0]):
                ids = toks[i].tolist()
                n_tok = next((j + 1 for j, tok in enumerate(ids) if tok in self.stop_ids), len(ids))
                responses.append(ids[:n_tok])
                logps.append(lps[i, :n_tok].tolist())
                truncated.append(not ends_with_stop(ids[:n_tok], self.stop_ids))
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=False)
        batch = assemble_batch(prompts, responses, logps, truncated, spec.n, self.pad_id, texts)
        dt = time.perf_counter() - t0
        batch.stats = {"rollout/seconds": dt, "rollout/tokens_per_s": float(batch.response_mask_B_T.sum()) / dt}
        return batch

    def sync_weights(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> float:
        """The weights are read from the model at every call: nothing to copy unless ``model`` is another module."""
        if model is not self.model:
            self.model.load_state_dict(engine_state(model, state_dict))
        return 0.0

    def close(self) -> None:
        pass


def build_engine(ctx: BuildContext) -> StaticEngine:
    return StaticEngine(ctx.model, ctx.tokenizer, ctx.stop_ids, sharded_root=ctx.sharded_root)
