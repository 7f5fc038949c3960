"""Speed and peak memory of the learner's loss path (final hidden states → loss → backward).

    .venv/bin/python scripts/bench_loss.py                                    # CPU-sized default, V = 32768
    .venv/bin/python scripts/bench_loss.py --device cuda --dtype bfloat16 --V 151936 --T 8192 --B 1 --H 2048

Variants, each run in its own subprocess so that peak memory is its own (CPU: peak RSS growth; CUDA:
``max_memory_allocated`` growth over the inputs):
  plain    opd-lab: full [B, T, V] logits in model dtype, float32 log-sum-exp per chunk, gather then upcast
  chunked  opd-lab: LM head over ``--chunk`` positions at a time under activation checkpointing
  naive    reference written here: float32 [B, T, V] log-softmax of the whole vocabulary, then gather
  trl      TRL's ``generalized_jsd_loss`` with β = 1 on full student and teacher logits (if ``trl`` is installed)

For each it prints time of forward+backward (median of ``--repeats``), peak memory, and the ratios of the
naive/TRL cost to opd-lab's (how many times faster / smaller opd-lab is than the best alternative), and checks
that opd-lab's loss and gradients match the naive reference (float32: 1e-5 relative).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from opd_lab.core.losses import lsm_loss, sampled_token_loss  # noqa: E402
from opd_lab.learner.heads import head_stats_chunked, head_stats_plain  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(a):
    g = torch.Generator().manual_seed(0)
    dt, dev = DTYPES[a.dtype], torch.device(a.device)
    h = (torch.randn(a.B, a.T, a.H, generator=g) / a.H**0.25).to(dev, dt).requires_grad_(True)
    w = (torch.randn(a.V, a.H, generator=g) / a.H**0.25).to(dev, dt).requires_grad_(True)
    y = torch.randint(0, a.V, (a.B, a.T), generator=g).to(dev)
    support = torch.randint(0, a.V, (a.B, a.T, a.K), generator=g).to(dev)
    q_logp = torch.log_softmax(torch.randn(a.B, a.T, a.K + 8, generator=g), -1)[..., : a.K].to(dev)
    old = (-torch.rand(a.B, a.T, generator=g) * 3).to(dev)
    mask = torch.ones(a.B, a.T, device=dev)
    mask[:, : a.T // 8] = 0  # some masked positions
    return h, w, y, support, q_logp, old, mask


def loss_from_stats(a, lse, z, q_logp, old, mask):
    """The same reduction for every variant: token-mean of the chosen loss."""
    if a.loss == "lsm":
        per_tok, _ = lsm_loss(z[..., 1:], q_logp, torch.ones_like(q_logp))
    else:
        per_tok, _ = sampled_token_loss(z[..., 0] - lse, old, q_logp[..., 0], mask)
    return (per_tok * mask).sum() / mask.sum()


def run_variant(a, name, inputs):
    h, w, y, support, q_logp, old, mask = inputs
    ids = torch.cat([y.unsqueeze(-1), support], -1)
    if name == "plain":
        lse, z = head_stats_plain(h @ w.t(), ids, a.chunk)
        return loss_from_stats(a, lse, z, q_logp, old, mask)
    if name == "chunked":
        lse, z = head_stats_chunked(h, w, ids, 1.0, a.chunk)
        return loss_from_stats(a, lse, z, q_logp, old, mask)
    if name == "naive":
        logp = torch.log_softmax((h @ w.t()).float(), dim=-1)  # float32 [B, T, V]
        z = logp.gather(-1, ids)
        return loss_from_stats(a, torch.zeros_like(z[..., 0]), z, q_logp, old, mask)
    if name == "trl":
        try:  # TRL moved GKD to trl.experimental in 2025
            from trl.experimental.gkd import GKDTrainer
        except ImportError:
            from trl import GKDTrainer

        student = h @ w.t()
        with torch.no_grad():  # a full teacher logit tensor is what this API needs
            teacher = student.detach() + torch.randn_like(student) * 0.1
        return GKDTrainer.generalized_jsd_loss(student, teacher, beta=1.0)
    raise ValueError(name)


def peak_now(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current(device):
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(a):
    torch.set_num_threads(a.threads)
    inputs = make_inputs(a)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = current(a.device)
    times = []
    for i in range(a.repeats + 1):
        for t in inputs[:2]:
            t.grad = None
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = run_variant(a, a.worker, inputs)
        loss.backward()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        if i > 0 or a.repeats == 0:
            times.append(time.perf_counter() - t0)
    peak = peak_now(a.device) - base
    grads = [inputs[0].grad.float().flatten(), inputs[1].grad.float().flatten()]
    torch.save({"loss": loss.item(), "grad": torch.cat(grads).cpu()}, a.out)
    print(json.dumps({"time_s": sorted(times)[len(times) // 2], "peak_bytes": peak, "loss": loss.item()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--V", type=int, default=32768)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--loss", choices=["lsm", "sampled_token"], default="lsm")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="plain,chunked,naive,trl")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)

    import importlib.util
    import tempfile

    variants = [v for v in a.variants.split(",") if v != "trl" or importlib.util.find_spec("trl")]
    res, saved = {}, {}
    tmp = tempfile.mkdtemp()
    for v in variants:
        out = os.path.join(tmp, f"{v}.pt")
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", v, "--out", out]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            res[v] = {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
            continue
        res[v] = json.loads(p.stdout.strip().splitlines()[-1])
        saved[v] = torch.load(out)
    print(f"\nloss path forward+backward: loss={a.loss} B={a.B} T={a.T} V={a.V} H={a.H} K={a.K} chunk={a.chunk} "
          f"device={a.device} dtype={a.dtype} (median of {a.repeats})")
    alts = [v for v in ("naive", "trl") if "time_s" in res.get(v, {})]
    best_t = min((res[v]["time_s"] for v in alts), default=None)
    best_m = min((res[v]["peak_bytes"] for v in alts), default=None)
    head = ["time s", "peak MiB", "alt/time", "alt/mem"]
    print(f"{'variant':<10}" + "".join(f"{h:>10}" if h != "peak MiB" else f"{h:>12}" for h in head)
          + f"{'loss':>14}{'grad rel err':>14}")
    ref = saved.get("naive")
    for v, r in res.items():
        if "error" in r:
            print(f"{v:<10} failed: {r['error']}")
            continue
        t_ratio = f"{best_t / r['time_s']:.2f}x" if best_t else "-"
        m_ratio = f"{best_m / max(r['peak_bytes'], 1):.2f}x" if best_m else "-"
        err = "-"
        if ref is not None and v in ("plain", "chunked"):
            e = ((saved[v]["grad"] - ref["grad"]).norm() / ref["grad"].norm()).item()
            loss_rel = abs(saved[v]["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
            err = f"{e:.1e}"
            tol = 1e-5 if a.dtype == "float32" else 2e-2
            r["match"] = e <= tol and loss_rel <= tol
        print(f"{v:<10}{r['time_s']:>10.3f}{r['peak_bytes'] / 2**20:>12.1f}{t_ratio:>10}{m_ratio:>10}"
              f"{r['loss']:>14.6f}{err:>14}")
    bad = [v for v in ("plain", "chunked") if res.get(v, {}).get("match") is False]
    print("alt/time, alt/mem: best alternative (naive or TRL) divided by this variant (> 1: opd-lab is better)")
    if bad:
        print(f"MISMATCH vs the naive reference: {bad}")
        sys.exit(1)
    print("opd-lab values match the naive reference")


if __name__ == "__main__":
    main()
