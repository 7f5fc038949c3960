"""End-to-end OPD step time of opd-lab's real loop against TRL's DistillationTrainer, on the same models and settings.

    bash scripts/setup_trl_env.sh                      # once: TRL in its own environment (.venv-trl)
    .venv/bin/python scripts/bench_step.py [--reps 3] [--steps 8] [--configs auto,auto_k1,vllm] [--no-trl]

Settings (the issue's): the embedded teacher and student, 32 sequences per step (opd-lab: 8 prompts × 4 samples;
TRL: 32 prompts), up to 256 new tokens, T = 1, top-p 1, one AdamW update per step (``rollout.reuse=1
mini_batch_size=32 gate=none``), ``--steps`` measured steps after one warm-up step. opd-lab runs its real loop
(``python -m opd_lab``; nothing re-implemented here) and the timings come from its ``metrics.jsonl``; TRL runs
``scripts/bench_trl.py`` under ``.venv-trl``. The repetitions are interleaved (TRL, then every opd-lab
configuration, ``--reps`` times), since timings on shared machines drift. ``--main`` adds the main job's settings
(reuse 2, mini-batch 16, LSM + block64) for each engine.

Prints, per system: s/step (mean over repetitions of the mean over steps, and the range of the repetitions), the
breakdown (rollout, π_old, teacher, learner, engine sync, time the learner waited for the rollout), trained
completion tokens/s end to end, and the ratio of tokens/s to TRL's. Then the machine's own ceiling, measured in
the same run (before and after the repetitions, the best of the two): matmul GFLOP/s at 2048² in float32 and
bf16 and at the embedded models' shapes, and copy bandwidth; and per phase of each opd-lab system, the useful
arithmetic (FLOP on the real, unpadded tokens, from the models' shapes: 2·N_matmul per token plus causal
attention 2·d·L² per layer and sequence; backward = 2× forward), the achieved GFLOP/s, its share of the float32
matmul peak, and the share of response slots that were padding. ``--configs`` names: hf, static, static_k1,
vllm, vllm_k1, auto (the default engine), auto_k1, t1 suffixes (``static_t1``: one intra-op thread), bf16
suffixes (``static_bf16``: ``trainer.autocast_bf16`` and ``rollout.teacher_autocast_bf16``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDENT, TEACHER = ROOT / "opd_lab/assets/embedded/student", ROOT / "opd_lab/assets/embedded/teacher"
COMMON = ["rollout.n_prompts=8", "rollout.n_samples=4", "rollout.max_tokens=256", "rollout.temperature=1.0",
          "eval.baselines=false", "eval.n_samples=1", "eval.ks=[1]", "logger.wandb.mode=disabled",
          "logger.progress=false", "trainer.warmup_steps=0", "trainer.threads=2"]
TRL_LIKE = ["rollout.reuse=1", "rollout.mini_batch_size=32", "gate=none", "rollout.top_p=1.0"]
MAIN = ["rollout.reuse=2", "rollout.mini_batch_size=16", "loss=lsm", "gate=block64"]
ENGINES = {"hf": ["rollout.engine=hf"], "static": ["rollout.engine=static"], "vllm": ["rollout.engine=vllm"],
           "auto": []}
SUFFIXES = {"k1": ["rollout.staleness=1"], "t1": ["trainer.threads=1"],
            "bf16": ["trainer.autocast_bf16=true", "rollout.teacher_autocast_bf16=true"]}


def config_overrides(name: str) -> list[str]:
    """``static_k1_bf16`` → the static engine's overrides, then staleness 1, then bf16 (a later override of the same
    key wins)."""
    engine, *suffixes = name.split("_")
    if engine not in ENGINES or any(x not in SUFFIXES for x in suffixes):
        raise SystemExit(f"unknown configuration {name!r}: an engine of {sorted(ENGINES)} with suffixes of "
                         f"{sorted(SUFFIXES)}, e.g. static_k1")
    return ENGINES[engine] + [o for x in suffixes for o in SUFFIXES[x]]


def merged(*groups: list[str]) -> list[str]:
    """Overrides with one value per key, the last one given."""
    out: dict[str, str] = {}
    for o in (o for g in groups for o in g):
        out[o.split("=", 1)[0]] = o
    return list(out.values())
PARTS = [("rollout/seconds", "rollout"), ("time/score_old_s", "π_old"), ("time/score_teacher_s", "teacher"),
         ("time/learner_s", "learner"), ("time/sync_s", "sync"), ("time/rollout_wait_s", "waited")]


def run_opd(overrides: list[str], steps: int, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "opd_lab", *merged(COMMON, overrides), f"trainer.steps={steps + 1}",
           f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"})
    if proc.returncode:
        raise RuntimeError(f"{' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{"seconds": r["time/step_s"], "tokens": r["response/mean_len"] * 32, "response_len": r["response/mean_len"],
             "prompt_len": r.get("prompt/mean_len", 0.0), "padding": r.get("response/padding_frac", float("nan")),
             **{name: r.get(key, 0.0) for key, name in PARTS}} for r in recs if "loss" in r][1:]  # skip warm-up


def run_trl(steps: int, out: Path, prompts: Path) -> list[dict]:
    py = ROOT / ".venv-trl/bin/python"
    if not py.exists():
        raise SystemExit("TRL is not installed: bash scripts/setup_trl_env.sh (or pass --no-trl)")
    proc = subprocess.run([str(py), str(ROOT / "scripts/bench_trl.py"), "--student", str(STUDENT), "--teacher",
                           str(TEACHER), "--prompts", str(prompts), "--steps", str(steps + 1), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode:
        raise RuntimeError(f"TRL failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())["steps"][1:]


# ------------------------------------------------------------------------------------------- the ceiling
def machine_peak(threads: int, shapes: list[tuple[int, int, int]], device: str = "cpu") -> dict[str, float]:
    """Best-of-5 matmul GFLOP/s (float32 and bf16 at 2048², float32 at each ``(M, K, N)`` shape) and copy GB/s of a
    256 MiB buffer (read + write), at ``threads`` intra-op threads, on ``device`` (a GPU: synchronised)."""
    import time

    import torch

    torch.set_num_threads(threads)

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def best(fn, work: float, n: int = 5) -> float:
        fn()
        sync()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return work / min(times)

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(2048, 2048, dtype=dtype, device=device) for _ in range(2))
        out[f"matmul_{name}_2048"] = best(lambda a=a, b=b: a @ b, 2 * 2048**3) / 1e9
    model_rates = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        model_rates.append(best(lambda a=a, b=b: a @ b, 2 * m * k * n) / 1e9)
    out["matmul_fp32_model_shapes"] = sum(model_rates) / len(model_rates)
    x = torch.empty(64 * 2**20, device=device)
    y = torch.empty_like(x)
    out["copy_gb_s"] = best(lambda: y.copy_(x), 2 * x.numel() * 4) / 1e9
    return out


def model_shape(path: Path) -> dict[str, float]:
    """N_matmul (the parameters every token multiplies: the layers' projections and the LM head), the layer count
    and the attention width d = heads · head_dim, from the model's config.json."""
    c = json.loads((path / "config.json").read_text())
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    H, inter, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    per_layer = H * q + 2 * H * kv + q * H + 3 * H * inter
    return {"n_mm": c["num_hidden_layers"] * per_layer + V * H, "layers": c["num_hidden_layers"], "d": q, "H": H,
            "I": inter}


def forward_flop(shape: dict[str, float], seq_len: float) -> float:
    """Useful FLOP of one causal forward over ``seq_len`` real tokens."""
    return 2 * shape["n_mm"] * seq_len + 2 * shape["layers"] * shape["d"] * seq_len**2


def phase_flop(overrides: list[str], student: dict, teacher: dict, prompt_len: float, response_len: float,
               rows: int = 32) -> dict[str, float]:
    """Useful FLOP per step of each phase for a configuration: rollout (prefill + decode ≈ one forward of the
    student over prompt + response), π_old (rows the learner's first update does not supply: all of a stale
    batch, else the first pass's later mini-batches), teacher (one forward), learner (reuse passes of forward +
    backward = 3 forwards, plus π_prox's forward for a stale batch with a correction)."""
    conf = dict(o.split("=", 1) for o in merged(COMMON, overrides))
    reuse, mini = int(conf.get("rollout.reuse", 2)), int(conf.get("rollout.mini_batch_size", 16))
    stale = int(conf.get("rollout.staleness", 0)) > 0
    L = prompt_len + response_len
    fs, ft = forward_flop(student, L), forward_flop(teacher, L)
    old_rows = rows if stale else rows - min(mini, rows)
    return {"rollout": rows * fs, "π_old": old_rows * fs, "teacher": rows * ft, "learner": reuse * rows * 3 * fs}


def summarise(reps: list[list[dict]]) -> dict:
    per_rep_s = [statistics.mean(s["seconds"] for s in rep) for rep in reps]
    per_rep_tps = [sum(s["tokens"] for s in rep) / sum(s["seconds"] for s in rep) for rep in reps]
    out = {"s_step": statistics.mean(per_rep_s), "s_min": min(per_rep_s), "s_max": max(per_rep_s),
           "tok_s": statistics.mean(per_rep_tps), "tok_min": min(per_rep_tps), "tok_max": max(per_rep_tps)}
    for _, name in [*PARTS, (None, "response_len"), (None, "prompt_len"), (None, "padding")]:
        vals = [s.get(name) for rep in reps for s in rep if name in s]
        out[name] = statistics.mean(vals) if vals else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--configs", default="auto,auto_k1,vllm")
    ap.add_argument("--main", action="store_true", help="also the main job's settings (reuse 2, mini-batch 16)")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--json", help="also write the raw per-step records here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a Hydra override for every opd-lab system (repeatable), e.g. --set trainer.device=cuda")
    ap.add_argument("--peak-device", default="cpu", help="where the machine's peaks are measured (cpu, cuda)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of the ceiling measurement")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_step_"))
    student_shape, teacher_shape = model_shape(STUDENT), model_shape(TEACHER)
    shapes = [(8192, s["H"], n) for s in (student_shape, teacher_shape) for n in (s["H"], s["I"])]
    peaks = [machine_peak(args.threads, shapes, args.peak_device)]
    sys.path.insert(0, str(ROOT))
    from opd_lab.tasks.arith import ArithmeticTask

    prompts = work / "prompts.json"
    problems = ArithmeticTask().train_problems(32 * (args.steps + 1), random.Random(0))
    prompts.write_text(json.dumps([p.question for p in problems]))
    systems = {} if args.no_trl else {"TRL DistillationTrainer": None}
    for name in args.configs.split(","):
        systems[f"opd-lab {name}"] = TRL_LIKE + config_overrides(name) + args.set
        if args.main:
            systems[f"opd-lab {name} (main job settings)"] = MAIN + config_overrides(name) + args.set
    raw: dict[str, list] = {name: [] for name in systems}
    for rep in range(args.reps):
        for name, overrides in systems.items():
            out = work / f"{len(raw[name])}_{name.replace(' ', '_').replace('(', '').replace(')', '')}"
            raw[name].append(run_trl(args.steps, out.with_suffix(".json"), prompts) if overrides is None
                             else run_opd(overrides, args.steps, out))
            print(f"rep {rep + 1}/{args.reps} {name}: {statistics.mean(s['seconds'] for s in raw[name][-1]):.3f} "
                  "s/step", file=sys.stderr, flush=True)
    peaks.append(machine_peak(args.threads, shapes, args.peak_device))
    peak = {k: max(p[k] for p in peaks) for k in peaks[0]}
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": raw, "peaks": peaks}, indent=1))
    table = {name: summarise(reps) for name, reps in raw.items()}
    ref = table.get("TRL DistillationTrainer")
    print(f"\n32 sequences/step, ≤256 new tokens, T=1, top-p 1, one update/step; {args.steps} steps × {args.reps} "
          "repetitions (interleaved)\n")
    head = ["system", "s/step (range)", *[n for _, n in PARTS], "trained tok/s (range)", "× TRL"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, r in table.items():
        parts = ["–" if r[n] != r[n] else f"{r[n]:.3f}" for _, n in PARTS]
        ratio = f"{r['tok_s'] / ref['tok_s']:.2f}" if ref else "–"
        print(f"| {name} | {r['s_step']:.3f} ({r['s_min']:.3f}–{r['s_max']:.3f}) | " + " | ".join(parts) +
              f" | {r['tok_s']:,.0f} ({r['tok_min']:,.0f}–{r['tok_max']:,.0f}) | {ratio} |")
    print(f"\nThe machine ({args.peak_device}), measured in this run at {args.threads} threads (best of before/after): "
          "matmul float32 "
          f"{peak['matmul_fp32_2048']:.0f} GFLOP/s at 2048², {peak['matmul_fp32_model_shapes']:.0f} GFLOP/s at the "
          f"models' shapes (8192×H @ H×{{H, I}}), bf16 {peak['matmul_bf16_2048']:.0f} GFLOP/s at 2048²; copy "
          f"{peak['copy_gb_s']:.0f} GB/s.\n")
    print("Useful arithmetic per phase (real tokens only), achieved GFLOP/s and its share of the float32 matmul peak "
          "at 2048²; the last column is the share of response slots that were padding.\n")
    head = ["system", *[f"{n} GFLOP → GFLOP/s (% peak)" for n in ("rollout", "π_old", "teacher", "learner")],
            "step GFLOP/s (% peak)", "padding"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, overrides in systems.items():
        if overrides is None:
            continue
        r = table[name]
        flop = phase_flop(overrides, student_shape, teacher_shape, r["prompt_len"], r["response_len"])
        cells = []
        for part in ("rollout", "π_old", "teacher", "learner"):
            rate = flop[part] / r[part] / 1e9 if r[part] > 1e-3 else float("nan")
            cells.append("–" if not flop[part] else
                         f"{flop[part] / 1e9:.1f} → {rate:.0f} ({100 * rate / peak['matmul_fp32_2048']:.0f}%)")
        step_rate = sum(flop.values()) / r["s_step"] / 1e9
        share = 100 * step_rate / peak["matmul_fp32_2048"]
        print(f"| {name} | " + " | ".join(cells) + f" | {step_rate:.0f} ({share:.0f}%) | {r['padding']:.2f} |")


if __name__ == "__main__":
    main()
