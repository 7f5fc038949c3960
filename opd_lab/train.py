"""The main job: validate → seed → build → evaluate baselines → OPD loop → evaluate → save."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from opd_lab import checkpoint, distributed
from opd_lab.config import Config, ConfigError, LSMLossConfig, as_flat_dict
from opd_lab.evaluation import EvalResult, benchmark_csv, encode_prompts, evaluate
from opd_lab.models import check_same_vocab, load_model, load_tokenizer, loading, resolve_paths
from opd_lab.rollout.base import get_engine_class
from opd_lab.tasks import build_task
from opd_lab.tokens import TokenIds, stop_token_ids
from opd_lab.tracking import Tracker, gate_name, read_metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_engine(cfg: Config, model, tokenizer, path: str, stop_ids: tuple[int, ...], sharded_root=None):
    """The configured rollout engine over ``model`` (HF; ``sharded_root``: its FSDP2 root) or the weights at
    ``path`` (vLLM), stopping at ``stop_ids`` (tokens.stop_token_ids)."""
    cls = get_engine_class(cfg.rollout.engine.value)
    if cfg.rollout.engine.value == "hf":
        return cls(model, tokenizer, sharded_root=sharded_root, stop_ids=stop_ids)
    return cls(path, tokenizer, cfg, stop_ids=stop_ids)


def make_teacher_scorer(cfg: Config, teacher, tokenizer, path: str):
    """The configured teacher placement: an HF forward of the loaded teacher (on ``rollout.teacher_device``),
    in-process vLLM prompt log-probs over the weights at ``path``, or a vLLM server."""
    kind = cfg.rollout.teacher_scorer.value
    if kind == "hf":
        from opd_lab.scoring import HFTeacherScorer

        return HFTeacherScorer(teacher, chunk_size=cfg.trainer.chunk_size)
    if kind == "server":
        from opd_lab.rollout.server import ServerTeacherScorer

        return ServerTeacherScorer(cfg.rollout.teacher_server)
    from opd_lab.rollout.vllm import VLLMTeacherScorer

    return VLLMTeacherScorer(path, tokenizer, cfg)


def eval_key(cfg: Config, path: str, prompts: list[list[int]], stop_ids: tuple[int, ...]) -> str:
    """The cache key of an untrained model's evaluation: everything that changes its prompts or responses.

    The weight files; the evaluation settings and the task; the rendered prompts themselves (tokenizer, chat
    template, thinking mode, system prompt); the stop set; the model group except how the embedded pair is
    built (dtype, special tokens …); the engine and its vLLM settings (``max_model_len`` caps responses); the
    device and the autocast precision.
    """
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    model = {k: v for k, v in as_flat_dict(cfg.model).items() if not k.startswith("prepare.")}
    blob = json.dumps({"path": str(Path(path).resolve()) if files else path, "files": stamp,
                       "eval": as_flat_dict(cfg.eval), "task": as_flat_dict(cfg.task), "model": model,
                       "engine": cfg.rollout.engine.value, "vllm": as_flat_dict(cfg.rollout.vllm),
                       "device": cfg.trainer.device, "autocast_bf16": cfg.trainer.autocast_bf16,
                       "stop": list(stop_ids),
                       "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_prompt_lengths(cfg: Config, tokenizer, task, training: bool = True, n_longest: int = 64) -> None:
    """With a vLLM engine, prompt + response must fit ``rollout.vllm.max_model_len`` (vLLM would cap the
    response silently): checked on every evaluation prompt and (``training``) the longest training prompts by
    characters; the engine checks every prompt again when it samples."""
    if "vllm" not in (cfg.rollout.engine.value, cfg.rollout.teacher_scorer.value):
        return
    encode = prompt_encoder(cfg)
    limit = cfg.rollout.vllm.max_model_len
    checks = [("eval.max_tokens", cfg.eval.max_tokens, task.eval_problems())]
    if training:
        train = task.train_pool() if hasattr(task, "train_pool") else task.train_problems(256, random.Random(0))
        checks.append(("rollout.max_tokens", cfg.rollout.max_tokens,
                       sorted(train, key=lambda p: len(p.prompt or p.question), reverse=True)[:n_longest]))
    for field_name, cap, problems in checks:
        longest = max((len(p) for p in encode(tokenizer, problems)), default=0)
        if longest + cap > limit:
            raise ConfigError(f"{field_name}={cap} is invalid: the longest prompt has {longest} tokens and "
                              f"rollout.vllm.max_model_len={limit}: allowed {field_name} <= {limit - longest} (or "
                              "raise rollout.vllm.max_model_len)")


def prompt_encoder(cfg: Config):
    """``encode(tokenizer, problems)`` with the task's system prompt and the model's thinking-mode setting."""
    return functools.partial(encode_prompts, system_prompt=getattr(cfg.task, "system_prompt", None),
                             enable_thinking=cfg.model.enable_thinking)


def run_eval(cfg: Config, engine, tokenizer, task) -> EvalResult:
    e = cfg.eval
    return evaluate(engine, tokenizer, task.eval_problems(), e.n_samples, list(e.ks), e.temperature, e.top_p,
                    e.max_tokens, e.seed, encode=prompt_encoder(cfg))


def cached_eval(cfg: Config, path: str, build_engine, tokenizer, task, stop_ids: tuple[int, ...]) -> EvalResult:
    """Evaluate an untrained model once per :func:`eval_key` (weights, prompts, precision, engine …); reuse the
    cached result."""
    prompts = prompt_encoder(cfg)(tokenizer, task.eval_problems())
    cache = Path(cfg.cache_dir) / "evals" / f"{eval_key(cfg, path, prompts, stop_ids)}"
    if (cache / "metrics.json").exists():
        return EvalResult(pd.read_csv(cache / "per_problem.csv", dtype={"question": str, "answer": str}),
                          json.loads((cache / "metrics.json").read_text()))
    engine = build_engine()
    try:
        res = run_eval(cfg, engine, tokenizer, task)
    finally:
        engine.close()
    cache.mkdir(parents=True, exist_ok=True)
    res.per_problem.to_csv(cache / "per_problem.csv", index=False)
    tmp = cache / "metrics.json.tmp"
    tmp.write_text(json.dumps(res.metrics))
    os.replace(tmp, cache / "metrics.json")
    return res


def save_checkpoint(model, tokenizer, out: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``save_pretrained`` (of ``state_dict`` when given: the gathered weights of a sharded model) into a
    temporary folder, then rename over ``out`` (never a half-written folder)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    old = out.with_name(out.name + ".old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def format_table(rows: dict[str, dict[str, float]], ks: list[int]) -> str:
    cols = [f"pass@{k}" for k in ks] + ["truncated_frac"]
    lines = [f"{'model':<16}" + "".join(f"{c:>15}" for c in cols)]
    for name, m in rows.items():
        lines.append(f"{name:<16}" + "".join(f"{m[c]:>15.4f}" for c in cols))
    return "\n".join(lines)


def keep_until_step(run_dir: Path, step: int) -> None:
    """Drop what a killed run logged after its last checkpoint (``metrics.jsonl`` lines, per-step evaluations),
    so a resumed run's records continue from ``step`` exactly as an uninterrupted run's would."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        kept = [r for r in read_metrics(path) if r.get("step", step + 1) <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    for f in (run_dir / "evals").glob("student_step_*.csv"):
        if int(f.stem.rsplit("_", 1)[1]) > step:
            f.unlink()


def write_status(run_dir: Path, status: str, **extra) -> None:
    """``status.json`` (running / completed / failed), written atomically so a reader never sees half a file."""
    tmp = run_dir / "status.json.tmp"
    tmp.write_text(json.dumps({"status": status, **extra}, default=str))
    os.replace(tmp, run_dir / "status.json")


@contextmanager
def recorded_failure(run_dir: Path, tracker: Tracker, writes: bool = True):
    """On any exception (Ctrl-C included): ``status.json`` says failed with the error (unless ``writes`` is off:
    torchrun ranks other than 0), the wandb run is marked failed, and the exception goes on."""
    try:
        yield
    except BaseException as e:
        if writes:
            write_status(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        tracker.finish(1)
        raise


def run_label(cfg: Config) -> str:
    """The variant's name: ``cfg.variant`` or ``<loss>-<gate>`` (``eval-<target>`` for an evaluation-only run)."""
    if cfg.variant:
        return cfg.variant
    if cfg.eval.only is not None:
        return f"eval-{cfg.eval.only.value}"
    return f"{cfg.loss.name}-{gate_name(cfg)}"


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class NullTracker:
    """The tracker of ranks other than 0 under torchrun: they compute the same metrics and log nothing."""

    run_id = None

    def log(self, step: int, metrics: dict) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def main(cfg: Config, run_dir: Path) -> dict[str, float]:
    """Run one OPD experiment into ``run_dir``; returns the final evaluation metrics of the student.

    With ``eval.only`` set it is an evaluation-only run of that untrained model (base student or teacher).
    Under torchrun every rank calls this; rank 0 decides the run directory and writes everything.
    """
    dist = distributed.init(cfg.trainer.parallel.value, cfg.trainer.device, cfg.trainer.dist_backend.value,
                            cfg.trainer.dist_timeout_min)
    if dist.enabled:
        if cfg.rollout.n_prompts % dist.world:
            raise ConfigError(f"rollout.n_prompts={cfg.rollout.n_prompts} is invalid with {dist.world} ranks: allowed "
                              "a multiple of the number of ranks (each rank rolls out an equal share)")
        if cfg.eval.only is not None:
            raise ConfigError("eval.only is set: an evaluation-only run uses one process (run it without torchrun)")
        vllm = "vllm" in (cfg.rollout.engine.value, cfg.rollout.teacher_scorer.value)
        if vllm and _in_multirun():
            raise ConfigError("rollout.engine/teacher_scorer=vllm with --multirun under torchrun: a second vLLM "
                              "engine in the same torchrun processes hangs; sweep with hydra/launcher=slurm_multigpu "
                              "(one job per grid point) or one torchrun per job, or use rollout.engine=hf")
    resume_dir = checkpoint.find_run_to_resume(cfg, run_dir) if cfg.eval.only is None and dist.is_main else None
    run_dir, resume_dir = dist.broadcast((run_dir, resume_dir))  # rank 0's: torchrun ranks may differ in ${now:}
    if resume_dir is not None:
        if resume_dir != run_dir and dist.is_main:
            print(f"opd-lab: trainer.resume={cfg.trainer.resume}: continuing {resume_dir}", flush=True)
        run_dir = resume_dir
        status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
        if status.get("status") == "completed":
            print(f"opd-lab: {run_dir} already completed; nothing to resume", flush=True)
            return status.get("final", {})
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        write_status(run_dir, "running", pid=os.getpid(), world=dist.world)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    seed_everything(cfg.trainer.seed)
    task = build_task(cfg.task)
    if dist.is_main:  # the embedded pair is built once, by rank 0, before the others look for it
        paths = resolve_paths(cfg)
    dist.barrier()
    if not dist.is_main:
        paths = resolve_paths(cfg)
    with loading("model.tokenizer" if cfg.model.tokenizer else "model.student", paths.tokenizer):
        tokenizer = load_tokenizer(paths.tokenizer, cfg.model.chat_template)
    with loading("model.teacher", paths.teacher):
        check_same_vocab(tokenizer, load_tokenizer(paths.teacher, cfg.model.chat_template))
    if isinstance(cfg.loss, LSMLossConfig) and cfg.loss.top_k > len(tokenizer):
        raise ConfigError(f"loss.top_k={cfg.loss.top_k} is invalid: allowed 1..{len(tokenizer)} (vocabulary size)")
    tokens = TokenIds.build(tokenizer, list(cfg.model.special_tokens), paths.student)
    if hasattr(task, "load_train") and cfg.eval.only is None:
        task.load_train()  # a bad training-set path fails here, before any model loads
    check_prompt_lengths(cfg, tokenizer, task, training=cfg.eval.only is None)
    if cfg.eval.only is not None:
        return evaluate_only(cfg, run_dir, paths, tokenizer, task)
    device = distributed.rank_device(cfg.trainer.device, dist)
    with loading("model.student", paths.student):
        student = load_model(paths.student, cfg.model.dtype, device, trainable=True)
    hf_teacher = cfg.rollout.teacher_scorer.value == "hf" or cfg.rollout.engine.value == "hf"
    teacher = None
    if hf_teacher:
        with loading("model.teacher", paths.teacher):
            teacher = load_model(paths.teacher, cfg.model.dtype, cfg.rollout.teacher_device or device,
                                 trainable=False)

    table: dict[str, dict[str, float]] = {}
    frames = []
    if cfg.eval.baselines and dist.is_main:
        for name, model, path in (("base_student", student, paths.student), ("teacher", teacher, paths.teacher)):
            stop = stop_token_ids(tokenizer, path)
            res = cached_eval(cfg, path, lambda m=model, p=path, s=stop: make_engine(cfg, m, tokenizer, p, s),
                              tokenizer, task, stop)
            table[name] = res.metrics
            frames.append(res.per_problem.assign(model=name, step=0))
    dist.barrier()

    state = checkpoint.latest(run_dir, cfg) if resume_dir is not None else None
    if dist.is_main:
        keep_until_step(run_dir, state.step if state else 0)
    if state is not None and state.shards is None:  # continue from the checkpoint's weights (baselines used the base)
        student.load_state_dict(load_model(str(state.path), cfg.model.dtype, device, trainable=True).state_dict())
    if state is not None and dist.is_main:
        print(f"opd-lab: resuming from {state.path} (step {state.step})", flush=True)
    from opd_lab.learner import Policy, run_training

    policy = distributed.wrap(Policy(student), dist)  # FSDP2 resume loads its shards into this (run_training)
    tracker = Tracker(cfg, run_dir, name=f"{run_label(cfg)}-seed{cfg.trainer.seed}",
                      resume_id=state.wandb_id if state else None) if dist.is_main else NullTracker()
    engine = make_engine(cfg, student, tokenizer, paths.student, tokens.stop,
                         sharded_root=policy if distributed.is_sharded(policy) else None)
    teacher_scorer = make_teacher_scorer(cfg, teacher, tokenizer, paths.teacher)
    final: dict[str, float] = {}
    with recorded_failure(run_dir, tracker, dist.is_main), closing(engine), closing(teacher_scorer):
        def on_step(step: int) -> None:
            nonlocal final
            if step == cfg.trainer.steps or (cfg.eval.every and step % cfg.eval.every == 0):
                res = run_eval(cfg, engine, tokenizer, task)  # every rank: FSDP2 sampling gathers across ranks
                final = res.metrics
                if dist.is_main:
                    tracker.log(step, {f"eval/{k}": v for k, v in res.metrics.items()})
                    (run_dir / "evals").mkdir(exist_ok=True)
                    res.per_problem.assign(model="student", step=step).to_csv(
                        run_dir / "evals" / f"student_step_{step:06d}.csv", index=False)

        def save_state(step: int, policy, optimizer, scheduler, sampler_rng, guard: dict) -> None:
            checkpoint.save(run_dir, cfg, step, policy, tokenizer, optimizer, scheduler, sampler_rng, guard,
                            tracker.run_id, dist)

        run_training(cfg, policy, teacher_scorer, tokenizer, tokens, engine, task, tracker, prompt_encoder(cfg),
                     on_step, state=state, save_state=save_state, dist=dist)
        if cfg.trainer.steps == 0:
            on_step(0)
        weights = distributed.gathered_state_dict(policy)  # every rank (FSDP2 gathers); rank 0 saves
        if dist.is_main:
            table["trained_student"] = final
            save_checkpoint(student, tokenizer, run_dir / "checkpoint", weights)
            frames += [pd.read_csv(f, dtype={"question": str, "answer": str})
                       for f in sorted((run_dir / "evals").glob("student_step_*.csv"))]
            finish_run(cfg, run_dir, tracker, table, frames, final)
        dist.barrier()
    return final


def evaluate_only(cfg: Config, run_dir: Path, paths, tokenizer, task) -> dict[str, float]:
    """Evaluate one model with the configured engine and no training: ``eval.checkpoint`` when set, else the
    untrained ``eval.only`` model (a benchmark's base-student/teacher row)."""
    target = cfg.eval.only.value
    path = paths.student if target == "student" else paths.teacher
    name = "base_student" if target == "student" else "teacher"
    if cfg.eval.checkpoint:
        path, name = cfg.eval.checkpoint, "checkpoint"
    tracker = Tracker(cfg, run_dir, name=f"{run_label(cfg)}-seed{cfg.trainer.seed}")
    with recorded_failure(run_dir, tracker):
        stop = stop_token_ids(tokenizer, path)

        def build():
            model = None
            if cfg.rollout.engine.value == "hf":
                model = load_model(path, cfg.model.dtype, cfg.trainer.device, trainable=False)
            return make_engine(cfg, model, tokenizer, path, stop)

        res = cached_eval(cfg, path, build, tokenizer, task, stop)
        tracker.log(0, {f"eval/{k}": v for k, v in res.metrics.items()})
        finish_run(cfg, run_dir, tracker, {name: res.metrics}, [res.per_problem.assign(model=name, step=0)],
                   res.metrics)
    return res.metrics


def finish_run(cfg: Config, run_dir: Path, tracker: Tracker, table: dict[str, dict[str, float]], frames,
               final: dict[str, float]) -> None:
    """Write the evaluation tables, the wandb summary and ``status.json``; print the table."""
    per_problem = pd.concat(frames)
    per_problem.to_csv(run_dir / "eval_per_problem.csv", index=False)
    benchmark_csv(per_problem, list(cfg.eval.ks)).to_csv(run_dir / "eval_benchmarks.csv", index=False)
    pd.DataFrame([{"model": k, **v} for k, v in table.items()]).to_csv(run_dir / "eval.csv", index=False)
    tracker.summary({f"final/{k}": v for k, v in final.items()}
                    | {f"{n}/{k}": v for n, m in table.items() if n != "trained_student" for k, v in m.items()})
    write_status(run_dir, "completed", final=final, steps=0 if cfg.eval.only else cfg.trainer.steps,
                 variant=run_label(cfg))
    print("\n" + format_table(table, list(cfg.eval.ks)), flush=True)
    print(f"\nrun directory: {run_dir}", flush=True)
    tracker.finish(0)
