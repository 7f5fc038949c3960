"""Training checkpoints that survive a kill at any moment, and ``trainer.resume``.

A checkpoint is a folder ``<run>/checkpoints/step_NNNNNN/`` holding the student (``save_pretrained``,
safetensors), ``trainer_state.pt`` (optimizer, LR scheduler, the prompt sampler's RNG, torch/numpy/python global
RNG states, the update guard, the step counter, the wandb run id; with ``rollout.staleness`` the snapshots of the
weights the pending rollout batches were sampled from, so a resumed run regenerates them exactly) and
``manifest.json`` (SHA-256 of every file and
the config fingerprint). It is written into a temporary folder and renamed into place, so a folder with that name
is complete; the manifest also catches files damaged afterwards. Resume takes the newest checkpoint that verifies
and says which ones it skipped and why. The last ``trainer.keep_checkpoints`` are kept.

Under torchrun, rank 0 writes the checkpoint (DDP: every rank holds the same weights and Adam moments). With
FSDP2 (``trainer.parallel=fsdp2``) the weights and Adam moments stay sharded: every rank writes its shard with
``torch.distributed.checkpoint`` into ``shards/`` (a shared file system), rank 0 the rest (config, tokenizer,
``trainer_state.pt`` without the optimizer) and the manifest; resume loads each rank's shard back
(resharding if the number of ranks changed).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opd_lab.common import atomic
from opd_lab.config import Config, ConfigError, as_flat_dict

# Fields that may change between a run and its resumption (where things go and how they are logged).
RESUMABLE_CHANGES = ("output_dir", "cache_dir", "logger.", "trainer.resume", "trainer.checkpoint_every",
                     "trainer.keep_checkpoints", "trainer.threads", "trainer.max_bad_updates", "eval.every",
                     "trainer.dist_backend", "trainer.dist_timeout_min", "rollout.teacher_device",
                     "rollout.teacher_server.")


def fingerprint(cfg: Config) -> dict[str, Any]:
    """The config fields a checkpoint must agree with to be resumed (everything but :data:`RESUMABLE_CHANGES`)."""
    flat = as_flat_dict(cfg)
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in flat.items()
            if not k.startswith(RESUMABLE_CHANGES)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class TrainState:
    """What the loop needs to continue exactly where a checkpoint left it."""

    step: int
    optimizer: dict
    scheduler: dict
    sampler_rng: tuple
    guard: dict
    wandb_id: str | None
    path: Path
    rng: dict[str, Any]  # torch/numpy/python global RNG states (:func:`restore_rng`)
    shards: Path | None = None  # FSDP2: the torch.distributed.checkpoint folder of weights and optimizer
    rollout_snapshots: dict[int, list[torch.Tensor]] | None = None  # rollout.staleness: versions pending batches use
    routing_weights: list[float] | None = None  # routing.rule=alignment: the teachers' weights at the checkpoint


def rng_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": random.getstate()}


def restore_rng(state: TrainState) -> None:
    """Resume step: the torch, numpy and python global RNGs as they were at the checkpoint."""
    set_rng_states(state.rng)


def restore(state: TrainState, policy, optimizer, scheduler, sampler_rng: random.Random, guard,
            dist=None) -> dict[int, list[torch.Tensor]]:
    """Resume step: the optimizer (FSDP2: this rank's shards of the weights and Adam moments), the LR schedule,
    the prompt sampler (as it was before the first batch still to generate), the update guard. Returns the
    snapshots of the weights the pending batches were sampled from (``rollout.staleness``; the pipeline
    regenerates them). The unsharded weights are loaded into the model before it is wrapped (train.py)."""
    if state.shards is not None:
        load_shards(policy, optimizer, state.shards)
    else:
        optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    sampler_rng.setstate(state.sampler_rng)
    guard.run, guard.total = state.guard["run"], state.guard["total"]
    if state.rollout_snapshots is not None:
        return state.rollout_snapshots
    rank = dist.rank if dist is not None else 0
    path = state.path / "snapshots" / f"rank{rank}.pt"  # sharded: this rank's shards of each version
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else {}


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, key, *rest = states["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), *rest))
    random.setstate(_tuplify(states["python"]))


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save(run_dir: Path, cfg: Config, step: int, model, tokenizer, optimizer, scheduler, sampler_state: tuple,
         guard: dict, wandb_id: str | None, dist=None, rollout_snapshots: dict | None = None,
         routing_weights: list[float] | None = None) -> Path:
    """Write ``checkpoints/step_<step>`` atomically (temporary folder → rename) and prune old ones.

    ``model``: the language model, or the learner's (DDP/FSDP2-wrapped) Policy under torchrun, where every rank
    calls this with its ``dist`` (:class:`opd_lab.common.distributed.Dist`).
    """
    from opd_lab.common.distributed import SINGLE, is_sharded, unwrap

    dist = dist or SINGLE
    root = run_dir / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    lm = getattr(unwrap(model), "lm", model)
    sharded = is_sharded(model)
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(lm, optimizer)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / "shards"))  # every rank, its shard
        if rollout_snapshots:  # every rank, its shards of the versions the pending batches were sampled from
            (tmp / "snapshots").mkdir(exist_ok=True)
            torch.save(rollout_snapshots, tmp / "snapshots" / f"rank{dist.rank}.pt")
        dist.barrier()
    if dist.is_main:
        if sharded:
            lm.config.save_pretrained(tmp)
        else:
            lm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": None if sharded else optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "sampler_rng": sampler_state, "rng": rng_states(),
                    "guard": guard, "wandb_id": wandb_id, "world": dist.world,
                    "rollout_snapshots": None if sharded else rollout_snapshots,
                    "routing_weights": routing_weights}, tmp / "trainer_state.pt")
        files = {str(f.relative_to(tmp)): _sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": files, "config": fingerprint(cfg)},
                                                      indent=1))
        atomic.fsync_tree(tmp)  # flush file contents before the rename makes the folder visible
        atomic.replace_dir(tmp, final)
        keep = max(1, cfg.trainer.keep_checkpoints)
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def save_final(model, tokenizer, out: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The final model: ``save_pretrained`` (of ``state_dict`` when given: the gathered weights of a sharded model)
    into a temporary folder, then renamed over ``out`` (never a half-written folder)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    atomic.replace_dir(tmp, out)


def load_shards(policy, optimizer, shards: Path) -> None:
    """FSDP2 resume: this rank's shards of the weights and the optimizer state from ``shards`` (every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from opd_lab.common.distributed import unwrap

    lm = unwrap(policy).lm
    msd, osd = get_state_dict(lm, optimizer)
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=str(shards))
    set_state_dict(lm, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def verify(path: Path) -> dict:
    """The manifest of a checkpoint folder whose files all match their recorded SHA-256; raises otherwise."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise ValueError(f"{name} is missing")
        if _sha256(f) != digest:
            raise ValueError(f"{name} does not match its checksum (truncated or corrupted)")
    return manifest


def latest(run_dir: Path, cfg: Config) -> TrainState | None:
    """The newest checkpoint of ``run_dir`` that verifies (None if there is none); a config that differs from the
    checkpoint's in a field that matters is a :class:`ConfigError` listing the fields. Reading a checkpoint
    changes nothing: :func:`restore_rng` and :func:`restore` are the explicit steps of a resume."""
    candidates = sorted((run_dir / "checkpoints").glob("step_*"), reverse=True)
    for path in candidates:
        try:
            manifest = verify(path)
            state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        except Exception as e:
            print(f"opd-lab: checkpoint {path} is unusable ({type(e).__name__}: {e}); trying an earlier one",
                  file=sys.stderr, flush=True)
            continue
        old, new = manifest["config"], fingerprint(cfg)
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:8])
            raise ConfigError(f"trainer.resume: checkpoint {path} was written with a different config ({shown}"
                              f"{', ...' if len(diff) > 8 else ''}); resume with the original settings or start "
                              "a new run (trainer.resume=never)")
        return TrainState(step=state["step"], optimizer=state["optimizer"], scheduler=state["scheduler"],
                          sampler_rng=_tuplify(state["sampler_rng"]), guard=state["guard"],
                          wandb_id=state["wandb_id"], path=path, rng=state["rng"],
                          rollout_snapshots=state.get("rollout_snapshots"),
                          routing_weights=state.get("routing_weights"),
                          shards=path / "shards" if (path / "shards").is_dir() else None)
    if candidates:
        print(f"opd-lab: no usable checkpoint in {run_dir / 'checkpoints'}; starting from step 0",
              file=sys.stderr, flush=True)
    return None


def find_run_to_resume(cfg: Config, output_dir: Path) -> Path | None:
    """``trainer.resume``: ``never`` → None; a folder → that run; ``auto`` → ``output_dir`` if it has checkpoints
    or a final status, else the most recent run beside it (``outputs/<date>/<time>`` or a sweep's job folders)
    with checkpoints, the same config fingerprint, and no ``completed`` status."""
    mode = cfg.trainer.resume
    if mode == "never":
        return None
    if mode != "auto":
        p = Path(mode).expanduser()
        if not (p / "checkpoints").is_dir():
            raise ConfigError(f"trainer.resume={mode!r}: no checkpoints/ folder there; set trainer.resume to a run "
                              "directory written with trainer.checkpoint_every > 0, or to auto/never")
        return p
    if (output_dir / "checkpoints").is_dir() or (output_dir / "status.json").exists():
        return output_dir
    want = fingerprint(cfg)
    found = []
    for d in {*output_dir.parent.glob("*"), *output_dir.parent.parent.glob("*/*")}:
        if d == output_dir or not (d / "checkpoints").is_dir():
            continue
        status = json.loads((d / "status.json").read_text()).get("status") if (d / "status.json").exists() else ""
        manifests = sorted((d / "checkpoints").glob("step_*/manifest.json"))
        if status == "completed" or not manifests:
            continue
        try:
            if json.loads(manifests[-1].read_text())["config"] == want:
                found.append(d)
        except (OSError, ValueError, KeyError):
            continue
    return max(found, key=lambda d: d.stat().st_mtime) if found else None
