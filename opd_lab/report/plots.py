"""The sweep report's plots (``python -m opd_lab.report``): pass@k per variant, pass@k over training steps, the
training curves that show drift (gate std, gates below 0.5, mean |δ|, δ at the first update of each step), the
drift map (final pass@k and drift against U = updates per rollout batch and the async staleness k) and, for
multi-teacher runs, the teachers' token shares and the routing entropy over training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from opd_lab.run.tracking import read_metrics

CURVES = (
    ("loss", "loss"),
    ("teacher_minus_old_logp", "teacher − old log-ratio"),
    ("gate/std", "gate std"),
    ("gate/frac_below_0.5", "fraction of gates < 0.5"),
    ("drift/mean_abs_delta", "mean |δ|"),
    ("drift/first_update_mean_abs_delta", "|δ| at the first update"),
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_of(run_dir: Path, keys=tuple(k for k, _ in CURVES), train: bool = True) -> pd.DataFrame:
    """Per-step metrics of one run: ``step`` plus ``keys`` (training records, or the evaluation ones)."""
    recs = [{"step": r["step"], **{k: r.get(k, math.nan) for k in keys}}
            for r in read_metrics(Path(run_dir) / "metrics.jsonl") if ("loss" in r) == train and
            (train or any(k in r for k in keys))]
    return pd.DataFrame(recs, columns=["step", *keys])


def plot_pass_at_k(runs: pd.DataFrame, summary: pd.DataFrame, path: Path, title: str) -> None:
    plt = _plt()
    ks = [c.removesuffix("_mean") for c in summary.columns if c.startswith("pass@") and c.endswith("_mean")]
    variants = list(summary["variant"])
    x = np.arange(len(variants))
    width = 0.8 / max(1, len(ks))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(variants) + 2), 4.2))
    done = runs[runs["status"] == "completed"]
    for i, k in enumerate(ks):
        off = (i - (len(ks) - 1) / 2) * width
        ci = summary[f"{k}_ci95"].fillna(0).to_numpy()
        ax.bar(x + off, summary[f"{k}_mean"], width, yerr=ci, capsize=3, label=k, alpha=0.8)
        for j, v in enumerate(variants):
            pts = done.loc[done["variant"] == v, f"final/{k}"].dropna()
            ax.scatter(np.full(len(pts), x[j] + off), pts, s=10, color="black", zorder=3)
    ax.set_xticks(x, variants, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out pass@k")
    ax.set_title(f"{title}: mean ± 95% CI over seeds (dots: seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _per_variant(runs: pd.DataFrame, keys, train: bool):
    trained = runs[(runs["run_dir"] != "") & (runs["steps_done"] > 0)]
    for variant, g in trained.groupby("variant", sort=False):
        frames = [f.set_index("step") for f in (curves_of(Path(d), keys, train) for d in g["run_dir"]) if len(f)]
        if frames:
            yield variant, frames


def _panels(runs: pd.DataFrame, path: Path, title: str, panels, train: bool, smooth: int) -> None:
    """One panel per metric; per variant the mean over seeds (rolling over ``smooth`` records), band min–max."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for variant, frames in _per_variant(runs, [k for k, _ in panels], train):
        for ax, (key, label) in zip(axes[0], panels, strict=True):
            table = pd.concat([f[key].rename(i) for i, f in enumerate(frames)], axis=1).sort_index()
            table = table.rolling(smooth, min_periods=1).mean()
            line = ax.plot(table.index, table.mean(axis=1), label=variant, lw=1.3, marker="o" if not train else None,
                           ms=3)[0]
            ax.fill_between(table.index, table.min(axis=1), table.max(axis=1), color=line.get_color(), alpha=0.15)
            ax.set_title(label)
            ax.set_xlabel("step")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(runs: pd.DataFrame, path: Path, title: str, smooth: int = 5) -> None:
    """Training curves: loss, teacher − old, and the drift the gates react to (no gate mean: it is 1 by
    construction)."""
    _panels(runs, path, f"{title}: mean over seeds (band: min–max), rolling mean over {smooth} steps", CURVES,
            train=True, smooth=smooth)


def plot_routing(runs: pd.DataFrame, keys: list[str], path: Path, title: str, smooth: int = 5) -> None:
    """Multi-teacher runs: each teacher's share of the loss tokens (``routing/frac/<name>``) and the routing
    entropy over training steps."""
    _panels(runs, path, f"{title}: routing (mean over seeds, band: min–max), rolling mean over {smooth} steps",
            [(k, k.removeprefix("routing/").replace("frac/", "share of ")) for k in keys], train=True,
            smooth=smooth)


def plot_eval_curves(runs: pd.DataFrame, ks: list[str], path: Path, title: str) -> None:
    """Held-out pass@k at every evaluation step (``eval.every``): a collapse shows, not only the final value."""
    _panels(runs, path, f"{title}: held-out pass@k over training (mean over seeds, band: min–max)",
            [(f"eval/{k}", k) for k in ks], train=False, smooth=1)


def plot_drift_map(runs: pd.DataFrame, ks: list[str], path: Path, title: str) -> None:
    """Final pass@k and drift (mean |δ| over training) against U at staleness 0, and against k at the default U,
    one line per (loss, gate); error bars: 95% CI over seeds."""
    from opd_lab.core.stats import mean_ci95

    plt = _plt()
    done = runs[runs["status"] == "completed"]
    U0 = int(done.loc[done["staleness"] > 0, "U"].iloc[0]) if (done["staleness"] > 0).any() else None
    metrics = [(f"final/{k}", f"final {k}") for k in ks] + [("mean/drift/mean_abs_delta", "mean |δ| over training")]
    axes_x = [("U", done[done["staleness"] == 0], "U = updates per rollout batch (staleness 0)")]
    if U0 is not None:
        axes_x.append(("staleness", done[done["U"] == U0], f"staleness k (U = {U0})"))
    fig, axes = plt.subplots(len(axes_x), len(metrics), figsize=(4.3 * len(metrics), 3.6 * len(axes_x)),
                             squeeze=False)
    for row, (xkey, part, xlabel) in enumerate(axes_x):
        for col, (mkey, mlabel) in enumerate(metrics):
            ax = axes[row][col]
            for (loss, gate), g in part.groupby(["loss", "gate"], sort=True):
                xs = sorted(g[xkey].unique())
                stats = [mean_ci95(g.loc[g[xkey] == x, mkey].tolist()) for x in xs]
                ax.errorbar(xs, [s[0] for s in stats], yerr=[np.nan_to_num(s[2]) for s in stats], marker="o",
                            capsize=3, label=f"{loss} / {gate}")
            ax.set_xscale("log", base=2) if xkey == "U" else None
            ax.set_xlabel(xlabel)
            ax.set_title(mlabel)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
