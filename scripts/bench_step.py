"""Where the time of one OPD step goes: rollout, π_old scoring, teacher scoring, learner; HF vs vLLM.

    .venv/bin/python scripts/bench_step.py [--steps 3] [--engines hf,vllm] [hydra overrides...]

Runs the real learner functions on the configured models (the embedded default unless overridden) and prints,
per engine, mean seconds and tokens/s of each part over ``--steps`` steps (after one warm-up step), plus the
rollout speed-up of each engine over HF.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from opd_lab.config import register_configs, to_run_config
from opd_lab.learner import make_optimizer, rollout_spec
from opd_lab.models import load_model, load_tokenizer, resolve_paths
from opd_lab.runtime import make_engine
from opd_lab.scoring import HFTeacherScorer, score_batch
from opd_lab.tasks import build_task, encode_prompts
from opd_lab.tokens import TokenIds
from opd_lab.update import first_pass_micro_batches, train_step

ROOT = Path(__file__).resolve().parent.parent


def bench(cfg, engine_name: str, steps: int) -> dict[str, float]:
    cfg = copy.deepcopy(cfg)
    cfg.rollout.engine = type(cfg.rollout.engine)(engine_name)
    paths = resolve_paths(cfg)
    tok = load_tokenizer(paths.tokenizer)
    student = load_model(paths.student, cfg.model.dtype, cfg.trainer.device, trainable=True)
    teacher = HFTeacherScorer(load_model(paths.teacher, cfg.model.dtype, cfg.trainer.device, trainable=False))
    t0 = time.perf_counter()
    tokens = TokenIds.build(tok, list(cfg.model.special_tokens), paths.student)
    engine = make_engine(cfg, student, tok, paths.student, tokens.stop)
    startup = time.perf_counter() - t0
    opt, sched = make_optimizer(cfg, student)
    task, rng = build_task(cfg.task), random.Random(0)
    rows = []
    for step in range(steps + 1):
        prompts = encode_prompts(tok, task.train_problems(cfg.rollout.n_prompts, rng))
        t0 = time.perf_counter()
        batch = engine.generate(prompts, rollout_spec(cfg, step))
        t1 = time.perf_counter()
        data = score_batch(cfg, student, teacher, batch, tokens, first_pass_micro_batches(cfg, step, batch.size))
        t2 = time.perf_counter()
        train_step(cfg, student, opt, sched, data, step)
        t3 = time.perf_counter()
        sync = engine.sync_weights(student)
        n = float(batch.response_mask_B_T.sum())
        if step > 0:  # step 0 warms up
            rows.append({"rollout_s": t1 - t0, "score_old_s": data.stats["time/score_old_s"],
                         "score_teacher_s": data.stats["time/score_teacher_s"], "learner_s": t3 - t2,
                         "sync_s": sync, "step_s": time.perf_counter() - t0, "tokens": n})
    engine.close()
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    mean["startup_s"] = startup
    mean["rollout_tok_s"] = mean["tokens"] / mean["rollout_s"]
    mean["score_tok_s"] = 2 * mean["tokens"] / (mean["score_old_s"] + mean["score_teacher_s"])
    mean["learner_tok_s"] = cfg.rollout.reuse * mean["tokens"] / mean["learner_s"]
    mean["step_tok_s"] = mean["tokens"] / mean["step_s"]
    return mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--engines", default="hf,vllm")
    args, overrides = ap.parse_known_args()
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        raw = compose(config_name="config", overrides=overrides)
    raw.output_dir = "unused"
    cfg = to_run_config(raw)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    results = {e: bench(cfg, e, args.steps) for e in args.engines.split(",")}
    keys = ["startup_s", "tokens", "rollout_s", "rollout_tok_s", "score_old_s", "score_teacher_s", "score_tok_s",
            "learner_s", "learner_tok_s", "sync_s", "step_s", "step_tok_s"]
    print(f"\nOne OPD step: {cfg.rollout.n_prompts} prompts x {cfg.rollout.n_samples} samples, reuse "
          f"{cfg.rollout.reuse}, loss {cfg.loss.name}, mean of {args.steps} steps after a warm-up step")
    print(f"{'':<16}" + "".join(f"{e:>12}" for e in results))
    for k in keys:
        print(f"{k:<16}" + "".join(f"{r[k]:>12.3f}" for r in results.values()))
    if "hf" in results:
        for e, r in results.items():
            if e != "hf":
                print(f"rollout speed-up {e}/hf: {r['rollout_tok_s'] / results['hf']['rollout_tok_s']:.2f}x; "
                      f"step speed-up: {results['hf']['step_s'] / r['step_s']:.2f}x")


if __name__ == "__main__":
    main()
