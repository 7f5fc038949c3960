"""The static engine's rollout (32 rows, ≤256 tokens) eager vs with the per-layer pre-/post-attention parts and the
sampler's head compiled (inductor), cache writes and decode attention eager."""
import random, sys, time, statistics
import torch
import torch.nn.functional as F
from pathlib import Path
from opd_lab.models.loading import load_model, load_tokenizer
from opd_lab.models.token_ids import stop_token_ids
from opd_lab.rollout.base import SamplingSpec
from opd_lab.rollout import static as S
from opd_lab.tasks import encode_prompts
from opd_lab.tasks.arith import ArithmeticTask
torch.set_num_threads(2)
root = Path("opd_lab/assets/embedded")
tok = load_tokenizer(str(root / "student"))
student = load_model(str(root / "student"), "float32", "cpu", trainable=False)
eng = S.StaticEngine(student, tok, stop_token_ids(tok, str(root / "student")))
mode = sys.argv[1]
if mode == "compiled":
    self = eng
    def pre(h, ln1, w_qkv, b_qkv, q_norm, k_norm, cos, sin):
        B, Sq = h.shape[:2]
        nq, nk, hd = self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.head_dim
        qkv = F.linear(self._rms(h, ln1), w_qkv, b_qkv)
        q = self._rms(qkv[..., :nq].view(B, Sq, self.n_heads, hd), q_norm).transpose(1, 2)
        k = self._rms(qkv[..., nq : nq + nk].view(B, Sq, self.n_kv, hd), k_norm).transpose(1, 2)
        v = qkv[..., nq + nk :].view(B, Sq, self.n_kv, hd).transpose(1, 2)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin), v
    def post(h, att, w_o, ln2, w_gate_up, w_down):
        B, Sq = h.shape[:2]
        h = h + F.linear(att.transpose(1, 2).reshape(B, Sq, -1), w_o)
        gate, up = F.linear(self._rms(h, ln2), w_gate_up).chunk(2, dim=-1)
        return h + F.linear(F.silu(gate) * up, w_down)
    cpre, cpost = torch.compile(pre, dynamic=False), torch.compile(post, dynamic=False)
    def _forward(w, x, pos, cache, at, key_mask, rope):
        layers, embed, norm_w, _ = w
        B, Sq = x.shape
        cos, sin = rope[0][pos].unsqueeze(1), rope[1][pos].unsqueeze(1)
        h = F.embedding(x, embed)
        k_cache, v_cache = cache
        decode = key_mask.dtype != torch.bool
        for i, L in enumerate(layers):
            f = cpre if decode else pre
            q, k, v = f(h, L.ln1, L.w_qkv, L.b_qkv, L.q_norm, L.k_norm, cos, sin)
            k_cache[i, :, :, at : at + Sq] = k
            v_cache[i, :, :, at : at + Sq] = v
            keys, values = k_cache[i, :, :, : at + Sq], v_cache[i, :, :, : at + Sq]
            if not decode:
                att = F.scaled_dot_product_attention(q, keys, values, attn_mask=key_mask, enable_gqa=True)
            else:
                att = S.decode_attention(q, keys, values, key_mask)
            h = (cpost if decode else post)(h, att, L.w_o, L.ln2, L.w_gate_up, L.w_down)
        return self._rms(h, norm_w)
    eng._forward = _forward
prompts = [encode_prompts(tok, ArithmeticTask().train_problems(8, random.Random(s))) for s in range(6)]
spec = lambda s: SamplingSpec(4, 1.0, 1.0, 256, s)
t0 = time.perf_counter(); b0 = eng.generate(prompts[0], spec(0)); print(mode, "first call %.1f s" % (time.perf_counter() - t0))
times = []
for r in range(2):
    for s in range(1, 6):
        t = time.perf_counter(); b = eng.generate(prompts[s], spec(s)); times.append(time.perf_counter() - t)
print(mode, "median %.4f s min %.4f" % (statistics.median(times), min(times)), "tokens", int(b.response_mask_B_T.sum()))
torch.save({"lp": b.sampler_logp_B_T, "ids": b.input_ids_B_L}, f"/tmp/ana/dec_{mode}.pt")
