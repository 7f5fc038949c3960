"""Build the embedded default: tokenizer, Qwen3-architecture teacher and student trained from scratch by SFT.

``resolve_role`` returns the folder of the teacher or the student, in this order of preference:
1. the copy shipped as package data (``opd_lab/assets/embedded/<role>``, or ``<role>_<name>`` for a teacher trained
   on a slice of the task: ``model.teachers.<name>.train_slice``) when its key equals this config's;
2. ``<cache_dir>/embedded/<role>-<key>`` from an earlier prepare;
3. a fresh SFT run into the cache (atomic: built in a temporary folder, then renamed).

Each role's key hashes only what determines its weights (its size, steps, schedule and seed, the shared
optimiser settings, the task config, the identity of the weights it starts from when ``model.prepare.<role>_init``
is set, and ``PREPARE_VERSION``), so changing the student never retrains the teacher. A role with an ``init``
is fine-tuned from those weights (the long-horizon pair, ``model=embedded_long``, starts from the default
pair). Training is deterministic on CPU for a fixed ``threads`` count, so ``python scripts/build_embedded.py``
rebuilds the shipped folders bit-for-bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from opd_lab.common import atomic
from opd_lab.config import ArithTaskConfig, ConfigError, EmbeddedModelSize, PrepareConfig, as_flat_dict
from opd_lab.core.optim import adamw_with_schedule
from opd_lab.models.tokenizer import build_tokenizer
from opd_lab.tasks import build_task, encode_prompts, reference_response

PREPARE_VERSION = 1
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "embedded"


ROLES = ("teacher", "student")


def init_folder(pcfg: PrepareConfig, role: str) -> Path | None:
    """The folder whose weights initialise ``role`` (``model.prepare.<role>_init``), or None (from scratch)."""
    name = getattr(pcfg, f"{role}_init")
    if name is None:
        return None
    folder = ASSETS / name if (ASSETS / name / "config.json").is_file() else Path(name).expanduser()
    if not (folder / "config.json").is_file():
        shipped = sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file())
        raise ConfigError(f"model.prepare.{role}_init={name!r}: no model folder there; allowed a folder under "
                          f"{ASSETS} ({', '.join(shipped)}) or a path to a saved model folder")
    return folder


def weights_key(folder: Path) -> str:
    """Identity of a model folder's weights: its embedded build key, else the SHA-256 of its weight files."""
    key = _key_of(folder)
    if key is not None:
        return key
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def role_settings(pcfg: PrepareConfig, role: str) -> dict:
    """Everything that determines one role's weights (the seed of the student is ``seed + 1``); a role started
    from trained weights adds their identity (``init``), so re-training those re-trains this role."""
    st = {
        "size": asdict(getattr(pcfg, role)),
        "steps": getattr(pcfg, f"{role}_steps"),
        "schedule": getattr(pcfg, f"{role}_schedule").value,
        "seed": pcfg.seed + ROLES.index(role),
        "batch_size": pcfg.batch_size,
        "lr": pcfg.lr,
        "warmup_steps": pcfg.warmup_steps,
        "threads": pcfg.threads,
    }
    init = init_folder(pcfg, role)
    if init is not None:  # only then: the keys of the roles trained from scratch are unchanged
        st["init"] = weights_key(init)
    return st


def role_key(pcfg: PrepareConfig, task_cfg: ArithTaskConfig, role: str) -> str:
    """Cache key of one role: changing the student's settings never retrains the teacher."""
    blob = json.dumps({"v": PREPARE_VERSION, "role": role, "train": role_settings(pcfg, role),
                       "task": as_flat_dict(task_cfg)}, sort_keys=True)
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
              desc: str, progress: bool = True, schedule: str = "cosine") -> list[float]:
    """Teacher-forced SFT on fresh task problems; linear warm-up, then cosine decay to 10% of ``lr``
    (``schedule='cosine'``) or a constant ``lr`` (``'constant'``)."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    # Cosine to 10% of lr one step after the last (total = steps + 1): the schedule the shipped weights were
    # trained with, kept so that scripts/build_embedded.py --check rebuilds them bit for bit.
    opt, sched = adamw_with_schedule(model.parameters(), lr, (0.9, 0.98), 0.0, warmup, steps + 1, schedule, 0.1)
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


def build_role(pcfg: PrepareConfig, task_cfg: ArithTaskConfig, role: str, out_dir: Path,
               progress: bool = True) -> dict:
    """Train one role from scratch by SFT and ``save_pretrained`` it (with the tokenizer) into ``out_dir``."""
    from transformers import Qwen3ForCausalLM

    st = role_settings(pcfg, role)
    threads = torch.get_num_threads()
    torch.set_num_threads(pcfg.threads)
    try:
        tokenizer = build_tokenizer()
        task = build_task(task_cfg)
        torch.manual_seed(st["seed"])
        model = Qwen3ForCausalLM(qwen3_config(getattr(pcfg, role), tokenizer))
        init = init_folder(pcfg, role)
        if init is not None:
            start = Qwen3ForCausalLM.from_pretrained(init, torch_dtype=torch.float32)
            wanted = asdict(getattr(pcfg, role)) | {"vocab_size": model.config.vocab_size}
            mismatch = {k: (v, getattr(start.config, k)) for k, v in wanted.items() if getattr(start.config, k) != v}
            if mismatch:
                raise ConfigError(f"model.prepare.{role}_init={getattr(pcfg, f'{role}_init')!r}: its shape differs "
                                  f"from model.prepare.{role} (field: (size wanted, size there)): {mismatch}")
            model.load_state_dict(start.state_dict())
            del start
        losses = train_sft(model, tokenizer, task, st["steps"], pcfg.batch_size, pcfg.lr, pcfg.warmup_steps,
                           st["seed"], desc=f"prepare {role}", progress=progress, schedule=st["schedule"])
    finally:
        torch.set_num_threads(threads)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = {"key": role_key(pcfg, task_cfg, role), "settings": st, "task": asdict(task_cfg),
            "final_loss": sum(losses[-20:]) / len(losses[-20:]), "params": sum(p.numel() for p in model.parameters())}
    (out_dir / "prepare.json").write_text(json.dumps(info, indent=2, default=str))
    return info


def build_embedded(pcfg: PrepareConfig, task_cfg: ArithTaskConfig, out_dir: Path, progress: bool = True) -> None:
    """Write ``teacher/`` and ``student/`` (each a model + tokenizer folder with its ``prepare.json``)."""
    for role in ROLES:
        build_role(pcfg, task_cfg, role, out_dir / role, progress)


def _key_of(folder: Path) -> str | None:
    try:
        return json.loads((folder / "prepare.json").read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def resolve_role(pcfg: PrepareConfig, task_cfg: ArithTaskConfig, role: str, cache_dir: str | os.PathLike,
                 progress: bool = True) -> Path:
    """Folder of one embedded model for this config: shipped copy, cached copy, or a fresh build (atomic)."""
    key = role_key(pcfg, task_cfg, role)
    for shipped in [ASSETS / role, *sorted(ASSETS.glob(f"{role}_*"))]:  # teacher, teacher_ops3 (a specialist), …
        if _key_of(shipped) == key:
            return shipped
    target = Path(cache_dir) / "embedded" / f"{role}-{key}"
    if _key_of(target) == key:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{role}-{key}-", dir=target.parent))
    try:
        build_role(pcfg, task_cfg, role, tmp, progress)
        if _key_of(target) == key:  # another process finished first
            shutil.rmtree(tmp)
        else:
            atomic.replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
