"""Build the embedded default: tokenizer, Qwen3-architecture teacher and student trained from scratch by SFT.

``resolve_embedded`` returns the folders to load, in this order of preference:
1. the copy shipped as package data (``opd_lab/assets/embedded``) when its key equals this config's key;
2. ``<cache_dir>/embedded/<key>`` from an earlier prepare;
3. a fresh prepare into the cache (atomic: built in a temporary folder, then renamed).

The key is a hash of the prepare and task configs and ``PREPARE_VERSION``. Training is deterministic on CPU
for a fixed ``threads`` count, so ``python scripts/build_embedded.py`` rebuilds the shipped folders
bit-for-bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from opd_lab.config import ArithTaskConfig, EmbeddedModelSize, PrepareConfig, as_flat_dict
from opd_lab.evaluation import encode_prompts
from opd_lab.tasks import build_task, reference_response
from opd_lab.tokenizer import build_tokenizer

PREPARE_VERSION = 1
ASSETS = Path(__file__).parent / "assets" / "embedded"


def prepare_key(pcfg: PrepareConfig, task_cfg: ArithTaskConfig) -> str:
    blob = json.dumps(
        {"v": PREPARE_VERSION, "prepare": as_flat_dict(pcfg), "task": as_flat_dict(task_cfg)}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def qwen3_config(size: EmbeddedModelSize, tokenizer, max_positions: int = 1024):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads,
        head_dim=size.head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def sft_batch(tokenizer, problems) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids_B_L``, ``attention_mask_B_L`` and ``labels_B_L`` (−100 off the response)."""
    prompts = encode_prompts(tokenizer, problems)
    eos = tokenizer.eos_token_id
    seqs, labels = [], []
    for p_ids, prob in zip(prompts, problems, strict=True):
        r_ids = tokenizer(reference_response(prob), add_special_tokens=False)["input_ids"] + [eos]
        seqs.append(p_ids + r_ids)
        labels.append([-100] * len(p_ids) + r_ids)
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), L), -100, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (s, y) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(y)] = torch.tensor(y)
        att[i, : len(s)] = 1
    return ids, att, lab


def train_sft(model, tokenizer, task, steps: int, batch_size: int, lr: float, warmup: int, seed: int,
              desc: str, progress: bool = True) -> list[float]:
    """Teacher-forced SFT on fresh task problems; linear warm-up then cosine decay to 10% of ``lr``."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_at(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        frac = (s - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for _ in bar:
        ids, att, lab = sft_batch(tokenizer, task.train_problems(batch_size, rng))
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    return losses


def build_embedded(pcfg: PrepareConfig, task_cfg: ArithTaskConfig, out_dir: Path, progress: bool = True) -> None:
    """Write ``tokenizer/``, ``teacher/``, ``student/`` and ``prepare.json`` into ``out_dir``."""
    from transformers import Qwen3ForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(pcfg.threads)
    try:
        tokenizer = build_tokenizer()
        task = build_task(task_cfg)
        info = {"key": prepare_key(pcfg, task_cfg), "prepare": asdict(pcfg), "task": asdict(task_cfg)}
        for role, size, steps, seed in (
            ("teacher", pcfg.teacher, pcfg.teacher_steps, pcfg.seed),
            ("student", pcfg.student, pcfg.student_steps, pcfg.seed + 1),
        ):
            torch.manual_seed(seed)
            model = Qwen3ForCausalLM(qwen3_config(size, tokenizer))
            losses = train_sft(model, tokenizer, task, steps, pcfg.batch_size, pcfg.lr, pcfg.warmup_steps,
                               seed, desc=f"prepare {role}", progress=progress)
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.save_pretrained(out_dir / role, safe_serialization=True)
            tokenizer.save_pretrained(out_dir / role)
            info[f"{role}_final_loss"] = sum(losses[-20:]) / len(losses[-20:])
            info[f"{role}_params"] = sum(p.numel() for p in model.parameters())
        tokenizer.save_pretrained(out_dir / "tokenizer")
        (out_dir / "prepare.json").write_text(json.dumps(info, indent=2, default=str))
    finally:
        torch.set_num_threads(threads)


def _complete(d: Path) -> bool:
    return all((d / sub).is_dir() for sub in ("tokenizer", "teacher", "student")) and (d / "prepare.json").exists()


def resolve_embedded(pcfg: PrepareConfig, task_cfg: ArithTaskConfig, cache_dir: str | os.PathLike,
                     progress: bool = True) -> Path:
    """Folder holding the embedded tokenizer/teacher/student for this config, building it if needed."""
    key = prepare_key(pcfg, task_cfg)
    if _complete(ASSETS) and json.loads((ASSETS / "prepare.json").read_text())["key"] == key:
        return ASSETS
    target = Path(cache_dir) / "embedded" / key
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        build_embedded(pcfg, task_cfg, tmp, progress=progress)
        if _complete(target):  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
