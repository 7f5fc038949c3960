"""A Qwen3-shaped model with random weights and the embedded tokenizer, saved as a local ``save_pretrained`` folder:
the paper-scale shapes (hidden size, depth, heads, a 151,936-row vocabulary) without a download.

    .venv/bin/python scripts/make_random_qwen3.py --shape 0.6b --out /tmp/qwen3_0.6b_random [--seed 0]
        [--dtype bfloat16] [--layers N]

Shapes are Qwen3's published configs (``0.6b``: hidden 1024, 28 layers, 16 query / 8 key-value heads of 128,
MLP 3072, tied embeddings; ``1.7b``: 2048, 28, 16/8, 6144, tied). The tokenizer is the embedded one (101 tokens): the
rows past it are never produced by the prompts, and a sampled id past it decodes to nothing, as an unused row of a
real vocabulary would. For timing and memory (the chunked head at V = 151,936, the engines, bf16), not for quality.
``--layers`` shortens the stack (a CPU smoke test of the same code path).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "opd_lab" / "assets" / "embedded" / "student"
SHAPES = {
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=6144, tie_word_embeddings=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape's")
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = Qwen3Config(vocab_size=151936, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **shape)
    torch.manual_seed(args.seed)
    model = Qwen3ForCausalLM(config).to(getattr(torch, args.dtype))
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for f in TOKENIZER.glob("*.jinja"):
        shutil.copy(f, out / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.shape}-shaped Qwen3 ({config.num_hidden_layers} layers, {n / 1e6:.0f} M parameters, {args.dtype}, "
          f"V = {config.vocab_size}) with random weights: {out}")


if __name__ == "__main__":
    main()
