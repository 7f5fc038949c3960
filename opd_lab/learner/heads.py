"""Log-probs of chosen ids from a causal LM, without a float32 [B, T, V] copy.

Everything the losses and gates need from a model at response position t is a handful of numbers: the
log-sum-exp lse_t = log Σ_V exp(z_t) and the logits z_t at a few ids (the sampled token y_t, the support S_t).
Two paths compute them:

- plain: the model's logits ``[B, T, V]`` (model dtype), then a float32 log-sum-exp over chunks of positions
  and a gather-then-upcast of the chosen columns;
- chunked: the final hidden states ``[B, T, H]`` go through the LM head ``chunk_size`` positions at a time,
  so at most ``[B, chunk, V]`` logits exist at once, in the forward and in the fused backward pass, which
  recomputes them (and is sparse when only the K chosen logits carry gradient, as in renormalised LSM).

Both return the same ``(lse_B_T, z_B_T_K)``; the learner builds log π(v) = z_v − lse from them, through
:class:`Policy`, the student's training forward (π_old is scored by the same forward). Teacher scoring
(scoring.py) takes the chunked path without gradients and keeps only what the losses need (sampled-token
log-prob, top-K ids and log-probs, log-probs at requested ids), never logits.
The chunked path assumes the usual causal-LM head ``logits = hidden @ W_head^T`` (no soft-capping/scaling).

Temperature: when the rollout temperature T_s ≠ 1, logits are divided by T_s before any log-softmax, for the
student and the teacher alike (docs/methods.md).
"""

from __future__ import annotations

import weakref

import torch

from opd_lab.common.distributed import unwrap
from opd_lab.core.losses import at_least_f32
from opd_lab.rollout.base import RolloutBatch


def _prompt_lengths(batch: RolloutBatch) -> torch.Tensor:
    """p_b, the real (left-padded) prompt tokens of each row, on the CPU; every row needs one."""
    p_B = batch.attention_mask_B_L[:, : batch.prompt_len].sum(-1).cpu()
    if p_B.numel() and int(p_B.min()) < 1:
        raise ValueError("every row of a rollout batch needs at least one prompt token (the first response token "
                         "is predicted from the last prompt position)")
    return p_B


def _causal_inputs(model: torch.nn.Module, batch: RolloutBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs for prompt + response minus the last token, packed to the left, and ``at_B_T``: the input
    positions whose outputs predict response tokens 0 .. T−1.

    A batch stores rows as [left padding, prompt, response, right padding] (:func:`~opd_lab.rollout.base.pad_prompts`).
    Here each row is shifted left by its padding, so its p_b real prompt tokens sit at positions 0 .. p_b − 1 and
    response token t at p_b + t, and everything that follows a row's real tokens is at its end. A causal model's
    output at a position depends only on the positions before it, so no attention mask is needed: the attention
    runs as plain causal attention (which skips the masked half of every score matrix) instead of with a
    ``[B, L, L]`` padding mask. Position ids count from each row's first real token, as with the mask; the outputs at
    real positions are the same function of the same tokens (only the kernel's summation order differs:
    tests/learner/test_scoring.py bounds it)."""
    device = next(model.parameters()).device
    P, L = batch.prompt_len, batch.input_ids_B_L.shape[1]
    T = L - P
    p_B = _prompt_lengths(batch)
    n = int(p_B.max()) + T - 1  # packed input length: the longest prompt + response, minus the last token
    col_B_N = ((P - p_B)[:, None] + torch.arange(n)).clamp_(max=L - 1)  # past a row's end: no real position reads it
    ids = batch.input_ids_B_L
    packed = ids.gather(1, col_B_N.to(ids.device)).to(device)
    pos = torch.arange(n, device=device).expand(packed.shape[0], n)
    at_B_T = ((p_B - 1)[:, None] + torch.arange(T)).to(device)
    return {"input_ids": packed, "position_ids": pos}, at_B_T


def _at(x_B_N_D: torch.Tensor, at_B_T: torch.Tensor) -> torch.Tensor:
    """``x[b, at[b, t]]`` → ``[B, T, D]``."""
    return x_B_N_D.gather(1, at_B_T[..., None].expand(-1, -1, x_B_N_D.shape[-1]))


def response_logits(model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """Logits ``[B, T, V]`` (model dtype) predicting each response token, divided by ``temperature``.

    The model's own head (whatever it does to the logits) runs from the earliest response-predicting position of
    the batch: T + max p_b − min p_b positions per row, the spread of prompt lengths more than T."""
    inputs, at_B_T = _causal_inputs(model, batch)
    first = int(_prompt_lengths(batch).min()) - 1
    logits = _at(model(**inputs, logits_to_keep=inputs["input_ids"].shape[1] - first).logits, at_B_T - first)
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def response_hidden(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` at the positions that predict each response token (through the compiled
    transformer body when :func:`compile_body` attached one)."""
    inputs, at_B_T = _causal_inputs(model, batch)
    body = _COMPILED.get(model, model.base_model)
    return _at(body(**inputs).last_hidden_state, at_B_T)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → its compiled body (compile_body)


def compile_body(model: torch.nn.Module) -> torch.nn.Module:
    """``trainer.compile``: attach ``torch.compile(model.base_model, dynamic=True)`` (inductor) for
    :func:`response_hidden` (the student's: the learner's chunked forward and π_old's). It is kept outside the module
    (a weak map), so parameter names, state dicts, checkpoints, copies and the engines' weight sync are those of
    the eager model, and the LM head, the loss path and every engine's sampling stay eager (a module that later
    replaces ``model.base_model`` would need compiling again). Returns ``model``."""
    _COMPILED[model] = torch.compile(model.base_model, dynamic=True)
    return model


def head_logits(h_B_C_H: torch.Tensor, w_V_H: torch.Tensor, temperature: float) -> torch.Tensor:
    """One chunk of logits ``h W^T / T_s`` (model dtype, a fresh tensor the caller may overwrite)."""
    logits = h_B_C_H @ w_V_H.t()
    return logits.div_(temperature) if temperature != 1.0 else logits


# x86 CPUs take a ~10x slower path for exp() of arguments below about -87 (float32 underflow). Shifted
# logits that low contribute < e^-80 ≈ 1.8e-35 each to a log-sum-exp (and to softmax), so clamp first.
_EXP_FLOOR = -80.0


def logsumexp_last(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """log Σ exp(x) over the last dim; on CPU shifted by the max and clamped at −80 before ``exp``.

    ``inplace=True`` overwrites ``x`` (a temporary the caller no longer needs) to save a pass and a copy.
    """
    if x.device.type != "cpu":
        return torch.logsumexp(x, dim=-1)
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    y = x.sub_(m) if inplace else x - m
    return m.squeeze(-1) + y.clamp_(min=_EXP_FLOOR).exp_().sum(-1).log()


def softmax_from_lse(x: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(x − lse) with the same CPU clamp as :func:`logsumexp_last` (a new tensor)."""
    y = x - lse.unsqueeze(-1)
    if x.device.type == "cpu":
        y.clamp_(min=_EXP_FLOOR)
    return y.exp_()


# The sparse backward gathers [B, C, K, H] rows of W and index-adds [B·C·K, H] rows (memory-bound, ~47 ms per
# 16 × 256 positions at K = 33, H = 128 on this project's 2-core CPU, whatever V); the dense one scatters into
# [B, C, V] and runs two matmuls (1.2 ms at V = 101, 12 ms at 1,000, 60 ms at 4,000): crossover near V ≈ 100·K.
SPARSE_MIN_VOCAB_PER_ID = 64


class _ChunkedHead(torch.autograd.Function):
    """(lse, z) = (log Σ_V exp(h W^T / T_s), (h W^T / T_s)[ids]) over position chunks, with a fused backward.

    Forward keeps only h, W, ids and lse. Backward recomputes each chunk's logits: when lse receives a
    gradient the chunk's dense logit gradient softmax·g_lse + scatter(g_z) goes through the two head matmuls;
    when it does not (renormalised LSM: the loss sees only the K support logits) the backward is sparse,
    O(B·T·K·H) instead of O(B·T·V·H): ∂h = Σ_k g_z,k W[id_k] / T_s and ∂W[id_k] += g_z,k h / T_s, for a vocabulary
    larger than :data:`SPARSE_MIN_VOCAB_PER_ID` × K; up to that a dense float32 scatter and two float32 matmuls
    are faster (the same gradient, summed in another order, at the sparse path's precision under autocast too).
    """

    @staticmethod
    def forward(ctx, h_B_T_H, w_V_H, ids_B_T_K, temperature, chunk_size, sparse_min=SPARSE_MIN_VOCAB_PER_ID):
        ctx.set_materialize_grads(False)
        device_type = h_B_T_H.device.type  # the backward recomputes the logits under the forward's autocast
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        lse, z = [], []
        with torch.no_grad():
            for s in range(0, h_B_T_H.shape[1], chunk_size):
                logits = head_logits(h_B_T_H[:, s : s + chunk_size], w_V_H, temperature)
                z.append(at_least_f32(logits.gather(-1, ids_B_T_K[:, s : s + chunk_size])))
                lse.append(logsumexp_last(at_least_f32(logits), inplace=True))
        lse_B_T, z_B_T_K = torch.cat(lse, 1), torch.cat(z, 1)
        ctx.save_for_backward(h_B_T_H, w_V_H, ids_B_T_K, lse_B_T)
        ctx.temperature, ctx.chunk_size, ctx.sparse_min = temperature, chunk_size, sparse_min
        return lse_B_T, z_B_T_K

    @staticmethod
    def backward(ctx, g_lse_B_T, g_z_B_T_K):
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            return _ChunkedHead._backward(ctx, g_lse_B_T, g_z_B_T_K)

    @staticmethod
    def _backward(ctx, g_lse_B_T, g_z_B_T_K):
        h, w, ids, lse = ctx.saved_tensors
        T_s, C = ctx.temperature, ctx.chunk_size
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        if g_z_B_T_K is None:
            g_z_B_T_K = torch.zeros(ids.shape, dtype=lse.dtype, device=h.device)
        sparse = g_lse_B_T is None and w.shape[0] > ctx.sparse_min * ids.shape[-1]
        for s in range(0, h.shape[1], C):
            h_c, ids_c, g_z = h[:, s : s + C], ids[:, s : s + C], at_least_f32(g_z_B_T_K[:, s : s + C]) / T_s
            if sparse:  # only the K chosen columns carry gradient
                if need_h:
                    grad_h[:, s : s + C] = torch.einsum("bck,bckh->bch", g_z, at_least_f32(w[ids_c])).to(h.dtype)
                if need_w:
                    rows = (g_z.unsqueeze(-1) * at_least_f32(h_c).unsqueeze(-2)).reshape(-1, h.shape[-1])
                    grad_w.index_add_(0, ids_c.reshape(-1), rows.to(w.dtype))
                continue
            if g_lse_B_T is None:  # the K chosen columns as a dense [B, C, V] gradient, in float32 like the sparse path
                g = torch.zeros((*ids_c.shape[:2], w.shape[0]), dtype=g_z.dtype, device=h.device)
                g.scatter_add_(-1, ids_c, g_z)
                with torch.autocast(h.device.type, enabled=False):
                    if need_h:
                        grad_h[:, s : s + C] = (g @ at_least_f32(w)).to(h.dtype)
                    if need_w:
                        grad_w += (g.reshape(-1, g.shape[-1]).t() @ at_least_f32(h_c).reshape(-1, h.shape[-1])).to(
                            w.dtype)
                continue
            logits = at_least_f32(head_logits(h_c, w, T_s))
            g = softmax_from_lse(logits, lse[:, s : s + C]) * (at_least_f32(g_lse_B_T[:, s : s + C, None]) / T_s)
            g.scatter_add_(-1, ids_c, g_z)
            g = g.to(h.dtype)
            if need_h:
                grad_h[:, s : s + C] = g @ w
            if need_w:
                grad_w += g.reshape(-1, g.shape[-1]).t() @ h_c.reshape(-1, h.shape[-1])
        return grad_h, grad_w, None, None, None, None


def head_stats_chunked(
    hidden_B_T_H: torch.Tensor,
    head_weight_V_H: torch.Tensor,
    ids_B_T_K: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 256,
    sparse_min: float = SPARSE_MIN_VOCAB_PER_ID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse_B_T, z_B_T_K)`` in float32 from hidden states, ``chunk_size`` positions of logits at a time.

    At most one chunk of ``[B, chunk, V]`` logits (and its float32 copy) exists, in the forward pass and in the
    fused backward (:class:`_ChunkedHead`), which recomputes them. ``sparse_min``: the backward without a
    log-sum-exp gradient takes the sparse path when V > ``sparse_min`` · K (0: always; ``inf``: never).
    """
    return _ChunkedHead.apply(hidden_B_T_H, head_weight_V_H, ids_B_T_K, temperature, chunk_size, sparse_min)


class _PlainHead(torch.autograd.Function):
    """(lse, z) from full logits ``[B, T, V]``: float32 only per chunk; one logit-gradient buffer in backward."""

    @staticmethod
    def forward(ctx, logits_B_T_V, ids_B_T_K, chunk_size):
        ctx.set_materialize_grads(False)
        with torch.no_grad():
            lse = logsumexp_chunked(logits_B_T_V, chunk_size)
            z = gather_float(logits_B_T_V, ids_B_T_K)
        ctx.save_for_backward(logits_B_T_V, ids_B_T_K, lse)
        ctx.chunk_size = chunk_size
        return lse, z

    @staticmethod
    def backward(ctx, g_lse_B_T, g_z_B_T_K):
        logits, ids, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        C = ctx.chunk_size
        for s in range(0, logits.shape[1], C):
            if g_lse_B_T is not None:
                p = softmax_from_lse(at_least_f32(logits[:, s : s + C]), lse[:, s : s + C])
                grad[:, s : s + C] = (p * at_least_f32(g_lse_B_T[:, s : s + C, None])).to(grad.dtype)
        if g_z_B_T_K is not None:
            grad.scatter_add_(-1, ids, g_z_B_T_K.to(grad.dtype))
        return grad, None, None


def head_stats_plain(logits_B_T_V: torch.Tensor, ids_B_T_K: torch.Tensor,
                     chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse_B_T, z_B_T_K)`` in float32 from full logits (already divided by the temperature)."""
    return _PlainHead.apply(logits_B_T_V, ids_B_T_K, chunk_size)


def logsumexp_chunked(logits_B_T_V: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """float32 log Σ_V exp(z) per position, upcasting at most ``chunk_size`` positions at a time."""
    T = logits_B_T_V.shape[1]
    parts = [logsumexp_last(at_least_f32(logits_B_T_V[:, s : s + chunk_size])) for s in range(0, T, chunk_size)]
    return torch.cat(parts, dim=1) if parts else logits_B_T_V.new_zeros(logits_B_T_V.shape[:2]).float()


def gather_float(logits_B_T_V: torch.Tensor, ids_B_T_K: torch.Tensor) -> torch.Tensor:
    """Logits at ``ids`` as float32 ``[B, T, K]`` (gather first, then upcast)."""
    return at_least_f32(logits_B_T_V.gather(-1, ids_B_T_K))



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
