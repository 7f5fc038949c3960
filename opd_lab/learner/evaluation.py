"""pass@k with the unbiased estimator, held-out evaluation of a model through a rollout engine, and the cache of
untrained models' evaluations."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from opd_lab.common import atomic
from opd_lab.config import Config, as_flat_dict
from opd_lab.rollout.base import RolloutEngine, SamplingSpec
from opd_lab.tasks import Problem, encode_prompts, grade, prompt_encoder


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 − C(n−c, k) / C(n, k) for n samples with c correct (n ≥ k).

    Computed as the stable product 1 − Π_{i=n−c+1}^{n} (1 − k/i), which avoids huge binomials.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def benchmark_table(per_problem: pd.DataFrame, ks: list[int]) -> pd.DataFrame:
    """Per benchmark (index, in first-seen order): problems, pass@k (mean over its problems), truncated fraction."""
    g = per_problem.groupby("benchmark", sort=False)
    out = g[[f"pass@{k}" for k in ks]].mean()
    out.insert(0, "problems", g.size())
    out["truncated_frac"] = g["truncated"].sum() / g["n"].sum()
    return out


def benchmark_csv(per_problem: pd.DataFrame, ks: list[int]) -> pd.DataFrame:
    """Per (model, step): a row per benchmark and a ``macro_mean`` row (the mean of the benchmarks' pass@k)."""
    rows = []
    for (model, step), g in per_problem.groupby(["model", "step"], sort=False):
        table = benchmark_table(g, ks)
        for bench, r in table.iterrows():
            rows.append({"model": model, "step": step, "benchmark": bench, **r.to_dict()})
        macro = {f"pass@{k}": table[f"pass@{k}"].mean() for k in ks}
        rows.append({"model": model, "step": step, "benchmark": "macro_mean", "problems": table["problems"].sum(),
                     **macro, "truncated_frac": g["truncated"].sum() / g["n"].sum()})
    return pd.DataFrame(rows)


@dataclass
class EvalResult:
    """Per-problem table and the aggregate metrics of one evaluation."""

    per_problem: pd.DataFrame
    metrics: dict[str, float]


def evaluate(
    engine: RolloutEngine,
    tokenizer,
    problems: list[Problem],
    n_samples: int,
    ks: list[int],
    temperature: float,
    top_p: float,
    max_tokens: int,
    seed: int,
    encode=encode_prompts,
) -> EvalResult:
    """Sample ``n_samples`` responses per problem, grade them, and report pass@k for each k.

    Metrics: ``pass@k`` (the macro mean over benchmarks of the mean over each benchmark's problems; with one
    benchmark, the mean over problems), ``pass@k/<benchmark>`` when there are several, ``truncated_frac``
    (responses that hit ``max_tokens`` without an end token; they count as wrong), ``mean_response_len``.
    ``encode(tokenizer, problems)`` renders the prompts (chat template options bound by the caller).
    """
    spec = SamplingSpec(n=n_samples, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    batch = engine.generate(encode(tokenizer, problems), spec)
    lengths = batch.response_mask_B_T.sum(-1).tolist()
    rows = []
    for j, p in enumerate(problems):
        idx = range(j * n_samples, (j + 1) * n_samples)
        correct = [(not bool(batch.truncated_B[i])) and grade(batch.response_text[i], p) for i in idx]
        trunc = sum(int(batch.truncated_B[i]) for i in idx)
        row = {"benchmark": p.source, "tag": p.tag, "question": p.question, "answer": p.answer, "n": n_samples,
               "correct": sum(correct),
               "truncated": trunc, "mean_len": sum(lengths[i] for i in idx) / n_samples}
        for k in ks:
            row[f"pass@{k}"] = pass_at_k(n_samples, sum(correct), k)
        rows.append(row)
    df = pd.DataFrame(rows)
    per_bench = benchmark_table(df, ks)
    metrics = {f"pass@{k}": float(per_bench[f"pass@{k}"].mean()) for k in ks}
    if len(per_bench) > 1:
        for bench, r in per_bench.iterrows():
            metrics |= {f"pass@{k}/{bench}": float(r[f"pass@{k}"]) for k in ks}
    metrics["truncated_frac"] = float(df["truncated"].sum() / (n_samples * len(problems)))
    metrics["mean_response_len"] = float(df["mean_len"].mean())
    return EvalResult(df, metrics)


def eval_set(cfg: Config, task) -> list:
    """The held-out problems evaluated: the task's split, or its first ``eval.limit``."""
    return task.eval_problems()[: cfg.eval.limit]


def run_eval(cfg: Config, engine, tokenizer, task) -> EvalResult:
    e = cfg.eval
    return evaluate(engine, tokenizer, eval_set(cfg, task), e.n_samples, list(e.ks), e.temperature, e.top_p,
                    e.max_tokens, e.seed, encode=prompt_encoder(cfg))


def cached_eval(cfg: Config, path: str, build_engine, tokenizer, task, stop_ids: tuple[int, ...],
                device: str | None = None) -> EvalResult:
    """Evaluate an untrained model once per :func:`eval_key` (weights, prompts, precision, engine, the device it
    runs on: ``device``, else ``trainer.device`` …); reuse the cached result."""
    prompts = prompt_encoder(cfg)(tokenizer, eval_set(cfg, task))
    cache = Path(cfg.cache_dir) / "evals" / f"{eval_key(cfg, path, prompts, stop_ids, device)}"
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
    atomic.write_text(cache / "metrics.json", json.dumps(res.metrics))
    return res


_NOT_IN_EVAL_KEY = ("only", "baselines", "every")


def eval_key(cfg: Config, path: str, prompts: list[list[int]], stop_ids: tuple[int, ...],
             device: str | None = None) -> str:
    """The cache key of an untrained model's evaluation: everything that changes its prompts or responses.

    The weight files; the evaluation settings and the task; the rendered prompts themselves (tokenizer, chat
    template, thinking mode, system prompt); the stop set; the model group except how the embedded pair is
    built (dtype, special tokens …); the engine and its vLLM settings (``max_model_len`` caps responses); the
    device the model runs on (``device``: a teacher's own, else ``trainer.device``) and the autocast precision.
    """
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    model = {k: v for k, v in as_flat_dict(cfg.model).items() if not k.startswith(("prepare.", "teachers"))}
    # what a run does with its evaluation (an evaluation-only run, the baselines of a trained one, how often it
    # evaluates the student) is not part of it: an eval-only variant and a trained run share the baselines' entries
    evaluation = {k: v for k, v in as_flat_dict(cfg.eval).items() if k not in _NOT_IN_EVAL_KEY}
    blob = json.dumps({"path": str(Path(path).resolve()) if files else path, "files": stamp,
                       "eval": evaluation, "task": as_flat_dict(cfg.task), "model": model,
                       "engine": cfg.rollout.engine.value, "vllm": as_flat_dict(cfg.rollout.vllm),
                       "device": device or cfg.trainer.device, "autocast_bf16": cfg.trainer.autocast_bf16,
                       "stop": list(stop_ids),
                       "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
