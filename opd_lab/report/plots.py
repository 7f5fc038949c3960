"""The sweep report's plots (``python -m opd_lab.report``): pass@k per variant, pass@k over training steps, the
training curves that show drift (gate std, gates below 0.5, mean |δ|, δ at the first update of each step), the
drift map (final pass@k and drift against U = updates per rollout batch and the async staleness k) and, for
multi-teacher runs, the teachers' token shares and the routing entropy over training.

Every figure is a grid of panels (at most :data:`NCOLS` a row) with one legend outside the data, and each plot
function returns a :class:`Plot`: the long table of exactly what was drawn (the report writes it to
``plot_data/<figure>.csv``) and a line for the summary; a figure with nothing to show is not written and the
function returns :class:`Skipped` with the reason instead. Panels that would be empty or flat in every run
(``|δ| at the first update`` is 0 by construction without staleness) are left out and named in the line."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from opd_lab.core.gates import POSITION_BLOCK
from opd_lab.report.sources import by_position_of
from opd_lab.run.tracking import read_metrics

NCOLS = 3
CURVES = (
    ("loss", "loss"),
    ("teacher_minus_old_logp", "teacher − old log-ratio"),
    ("gate/std", "gate std"),
    ("gate/frac_below_0.5", "fraction of gates < 0.5"),
    ("drift/mean_abs_delta", "mean |δ|"),
    ("drift/first_update_mean_abs_delta", "|δ| at the first update"),
)
BASELINE_STYLE = {"base_student": dict(color="0.45", ls="--", label="untrained student"),
                  "teacher": dict(color="black", ls=":", label="teacher")}
DATA_COLUMNS = ["panel", "series", "x", "y", "lo", "hi"]


@dataclass
class Plot:
    """A written figure: ``data`` (:data:`DATA_COLUMNS`: per panel and series, x, the plotted y and its band or
    interval) and ``note``, what it shows and which panels were left out."""

    data: pd.DataFrame
    note: str
    panels: list[str] = field(default_factory=list)


@dataclass
class Skipped:
    reason: str


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


def _colours(names: list[str]) -> dict[str, str]:
    """One colour per series name, the same in every panel of a figure."""
    cycle = _plt().rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


def _grid(n: int, panel_w: float = 4.4, panel_h: float = 3.3):
    """A figure of ``n`` panels, at most :data:`NCOLS` a row; unused axes hidden. Returns (fig, axes[:n])."""
    plt = _plt()
    ncols = min(NCOLS, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols, panel_h * nrows + 0.8), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _finish(fig, axes, path: Path, title: str) -> None:
    """One legend for the figure, below the panels (outside the data), the title above; save and close."""
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    ncol = min(4, max(1, len(labels)))
    rows = math.ceil(len(labels) / ncol) if labels else 0
    height = fig.get_size_inches()[1]
    bottom = min(0.4, (0.3 * rows + 0.15) / height) if rows else 0.02
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=ncol, fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.35 / height))
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def _baseline_lines(ax, baselines: dict[str, dict[str, float]], key: str, rows: list, panel: str) -> None:
    """Horizontal lines for the untrained student and the teacher(s) at their ``key`` value."""
    for model, values in baselines.items():
        if key not in values or not np.isfinite(values[key]):
            continue
        style = dict(BASELINE_STYLE.get(model.split("_")[0] if model.startswith("teacher") else model,
                                        BASELINE_STYLE["teacher"]))
        style["label"] = model.replace("_", " ") if model.startswith("teacher_") else style["label"]
        ax.axhline(values[key], lw=1.1, zorder=1, **style)
        rows.append({"panel": panel, "series": f"baseline:{model}", "x": math.nan, "y": values[key],
                     "lo": math.nan, "hi": math.nan})


def baselines_of(runs: pd.DataFrame) -> dict[str, dict[str, float]]:
    """The untrained models' held-out pass@k (``eval.csv`` rows other than ``trained_student`` of the completed
    runs that evaluated them, averaged over those runs: cached per evaluation seed, so a sweep with one seed per
    run may hold a few draws), e.g. ``{"base_student": {"pass@1": …}, "teacher": {…}}``."""
    values: dict[str, list[dict[str, float]]] = {}
    for d in runs.loc[(runs["status"] == "completed") & (runs["run_dir"] != ""), "run_dir"]:
        path = Path(d) / "eval.csv"
        if not path.exists():
            continue
        for _, row in pd.read_csv(path).iterrows():
            if row["model"] != "trained_student":
                values.setdefault(row["model"], []).append(
                    {k: float(v) for k, v in row.items() if str(k).startswith("pass@")})
    return {m: pd.DataFrame(v).mean().to_dict() for m, v in values.items()}


def plot_pass_at_k(runs: pd.DataFrame, summary: pd.DataFrame, baselines: dict, path: Path,
                   title: str) -> Plot | Skipped:
    """One panel per k: final held-out pass@k per variant (bar: mean over seeds, error bar: 95% CI, dots: the
    seeds), with the untrained student and the teacher as lines."""
    ks = [c.removesuffix("_mean") for c in summary.columns if c.startswith("pass@") and c.endswith("_mean")
          and "/" not in c]
    shown = summary[summary["n_completed"] > 0]
    if not ks or shown.empty:
        return Skipped("no completed run")
    variants = list(shown["variant"])
    done = runs[runs["status"] == "completed"]
    fig, axes = _grid(len(ks), panel_w=max(4.4, 0.55 * len(variants) + 1.5), panel_h=3.6)
    x = np.arange(len(variants))
    rows: list[dict] = []
    for ax, k in zip(axes, ks, strict=True):
        mean, ci = shown[f"{k}_mean"].to_numpy(), shown[f"{k}_ci95"].fillna(0).to_numpy()
        ax.bar(x, mean, 0.7, yerr=ci, capsize=3, color="tab:blue", alpha=0.75, label="mean ± 95% CI over seeds")
        for j, v in enumerate(variants):
            pts = done.loc[done["variant"] == v, f"final/{k}"].dropna()
            ax.scatter(np.full(len(pts), x[j]), pts, s=10, color="black", zorder=3,
                       label="one seed" if j == 0 else None)
            rows.append({"panel": k, "series": v, "x": j, "y": mean[j], "lo": mean[j] - ci[j], "hi": mean[j] + ci[j]})
        _baseline_lines(ax, baselines, k, rows, k)
        ax.set_xticks(x, variants, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"held-out {k}", fontsize=9)
    n = sorted(set(shown["n_completed"].astype(int)))
    _finish(fig, axes, path, f"{title}: final held-out pass@k per variant, {n_text(n)} seeds each")
    return Plot(pd.DataFrame(rows, columns=DATA_COLUMNS), f"final pass@k of {len(variants)} variants", ks)


def n_text(n: list[int]) -> str:
    return str(n[0]) if len(n) == 1 else f"{n[0]}–{n[-1]}"


def _per_variant(runs: pd.DataFrame, keys, train: bool):
    trained = runs[(runs["run_dir"] != "") & (runs["steps_done"] > 0)]
    for variant, g in trained.groupby("variant", sort=False):
        frames = [f.set_index("step") for f in (curves_of(Path(d), keys, train) for d in g["run_dir"]) if len(f)]
        if frames:
            losses = list(g["loss"]) if "loss" in g else [None] * len(frames)
            yield variant, frames, losses


def smoothing_window(n_steps: int) -> int:
    """The rolling window of a training curve: 1 (none) up to 79 steps, then one 40th of the run (5 at 200)."""
    return max(1, n_steps // 40)


def _panels(runs: pd.DataFrame, path: Path, title: str, panels, train: bool, baselines: dict | None = None,
            split_loss: bool = False, drop_flat: bool = True) -> Plot | Skipped:
    """One panel per metric (the ``loss`` panel split per loss name when ``split_loss`` and the runs mix losses:
    their scales differ); per variant the mean over seeds (rolling, :func:`smoothing_window`), band min–max. A
    panel with no value, or (``drop_flat``) one value in every run, is left out and named in the note."""
    series: dict[str, list[tuple[str, pd.DataFrame]]] = {}
    n_steps = 0
    for variant, frames, losses in _per_variant(runs, [k for k, _ in panels], train):
        for key, _ in panels:
            by_loss = {}
            for f, loss in zip(frames, losses, strict=True):
                by_loss.setdefault(loss if split_loss and key == "loss" else None, []).append(f[key])
            for loss, cols in by_loss.items():
                table = pd.concat([c.rename(i) for i, c in enumerate(cols)], axis=1).sort_index()
                n_steps = max(n_steps, len(table))
                series.setdefault(f"{key}\t{loss or ''}", []).append((variant, table))
    labels = dict(panels)
    drawn, flat = [], []
    for name, items in series.items():
        values = pd.concat([t.stack() for _, t in items]) if items else pd.Series(dtype=float)
        values = values[np.isfinite(values)]
        constant = not values.empty and float(values.max() - values.min()) <= 1e-12
        (flat if values.empty or (drop_flat and constant) else drawn).append((name, values))
    if not drawn:
        return Skipped("no metric varies in any run" if series else "no run logged a step")
    order = {key: i for i, (key, _) in enumerate(panels)}
    drawn.sort(key=lambda item: (order[item[0].split("\t")[0]], item[0]))  # a loss's panels side by side
    window = smoothing_window(n_steps) if train else 1
    colours = _colours(list(dict.fromkeys(v for items in series.values() for v, _ in items)))
    fig, axes = _grid(len(drawn))
    rows: list[dict] = []
    for ax, (name, _) in zip(axes, drawn, strict=True):
        key, loss = name.split("\t")
        panel = labels[key] + (f" ({loss})" if loss else "")
        for variant, table in series[name]:
            table = table.rolling(window, min_periods=1).mean()
            mean = table.mean(axis=1)
            ax.plot(table.index, mean, label=variant, lw=1.3, marker="o" if len(table) <= 20 else None, ms=3,
                    color=colours[variant])
            ax.fill_between(table.index, table.min(axis=1), table.max(axis=1), color=colours[variant], alpha=0.15)
            rows += [{"panel": panel, "series": variant, "x": s, "y": m, "lo": lo, "hi": hi} for s, m, lo, hi in
                     zip(table.index, mean, table.min(axis=1), table.max(axis=1), strict=True)]
        if baselines and key.startswith("eval/"):
            _baseline_lines(ax, baselines, key.removeprefix("eval/"), rows, panel)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("step")
    smooth = f", rolling mean over {window} steps" if window > 1 else ""
    _finish(fig, axes, path, f"{title}{smooth}")
    left_out = [_flat_text(labels, name, values) for name, values in flat]
    note = f"{len(drawn)} panels" + (f"; left out: {'; '.join(left_out)}" if left_out else "")
    return Plot(pd.DataFrame(rows, columns=DATA_COLUMNS), note, [r for r in dict.fromkeys(x["panel"] for x in rows)])


def _flat_text(labels: dict, name: str, values: pd.Series) -> str:
    key, loss = name.split("\t")
    what = labels[key] + (f" ({loss})" if loss else "")
    return f"{what} (not logged)" if values.empty else f"{what} (constant {float(values.iloc[0]):.3g} in every run)"


def plot_curves(runs: pd.DataFrame, path: Path, title: str) -> Plot | Skipped:
    """Training curves: loss (per loss), teacher − old, and the drift the gates react to (no gate mean: it is 1
    by construction)."""
    return _panels(runs, path, f"{title}: training curves per variant, mean over seeds (band: min–max)", CURVES,
                   train=True, split_loss=True)


def plot_routing(runs: pd.DataFrame, keys: list[str], path: Path, title: str) -> Plot | Skipped:
    """Multi-teacher runs: each teacher's share of the loss tokens (``routing/frac/<name>``) and the routing
    entropy over training steps."""
    return _panels(runs, path, f"{title}: routing per variant, mean over seeds (band: min–max)",
                   [(k, k.removeprefix("routing/").replace("frac/", "share of ")) for k in keys], train=True)


def plot_eval_curves(runs: pd.DataFrame, ks: list[str], baselines: dict, path: Path, title: str) -> Plot | Skipped:
    """Held-out pass@k at every evaluation step (``eval.every``): a collapse shows, not only the final value.
    Skipped when no run was evaluated at two or more steps (the final values are ``pass_at_k.png``)."""
    keys = [f"eval/{k}" for k in ks]
    most = max((len(f) for _, frames, _ in _per_variant(runs, keys, train=False) for f in frames), default=0)
    if most < 2:
        return Skipped("each run was evaluated once, at its end (eval.every=0): the final values are in "
                       "pass_at_k.png")
    return _panels(runs, path, f"{title}: held-out pass@k during training, mean over seeds (band: min–max)",
                   [(f"eval/{k}", f"held-out {k}") for k in ks], train=False, baselines=baselines, drop_flat=False)


def plot_drift_map(runs: pd.DataFrame, ks: list[str], path: Path, title: str) -> Plot | Skipped:
    """Final pass@k and drift (mean |δ| over training) against U at staleness 0, and against k at the default U,
    one line per (loss, gate); error bars: 95% CI over seeds."""
    from opd_lab.core.stats import mean_ci95

    done = runs[runs["status"] == "completed"]
    if done.empty:
        return Skipped("no completed run")
    U0 = int(done.loc[done["staleness"] > 0, "U"].iloc[0]) if (done["staleness"] > 0).any() else None
    metrics = [(f"final/{k}", f"final {k}") for k in ks] + [("mean/drift/mean_abs_delta", "mean |δ| over training")]
    axes_x = [("U", done[done["staleness"] == 0], "U = updates per rollout batch (staleness 0)")]
    if U0 is not None:
        axes_x.append(("staleness", done[done["U"] == U0], f"staleness k (U = {U0})"))
    plt = _plt()
    fig, axes = plt.subplots(len(axes_x), len(metrics), figsize=(4.3 * len(metrics), 3.4 * len(axes_x) + 0.8),
                             squeeze=False)
    rows: list[dict] = []
    for row, (xkey, part, xlabel) in enumerate(axes_x):
        for col, (mkey, mlabel) in enumerate(metrics):
            ax = axes[row][col]
            for (loss, gate), g in part.groupby(["loss", "gate"], sort=True):
                xs = sorted(g[xkey].unique())
                stats = [mean_ci95(g.loc[g[xkey] == x, mkey].tolist()) for x in xs]
                ys, ci = [s[0] for s in stats], [float(np.nan_to_num(s[2])) for s in stats]
                ax.errorbar(xs, ys, yerr=ci, marker="o", capsize=3, label=f"{loss} / {gate}")
                rows += [{"panel": f"{mlabel} vs {xkey}", "series": f"{loss} / {gate}", "x": x, "y": y, "lo": y - c,
                          "hi": y + c} for x, y, c in zip(xs, ys, ci, strict=True)]
            ax.set_xscale("log", base=2) if xkey == "U" else None
            ax.set_xlabel(xlabel)
            ax.set_title(mlabel, fontsize=9)
    _finish(fig, list(axes.ravel()), path, f"{title}: final pass@k and drift against U and staleness, per loss / "
            "gate (mean ± 95% CI over seeds)")
    return Plot(pd.DataFrame(rows, columns=DATA_COLUMNS), f"{len(axes_x)} × {len(metrics)} panels",
                list(dict.fromkeys(r["panel"] for r in rows)))


BY_POSITION = (("drift/first_update", "|δ| at the first update"), ("drift/last_update", "|δ| at the last update"),
               ("gate/first_update", "gate at the first update"), ("gate/last_update", "gate at the last update"))


def plot_drift_by_position(runs: pd.DataFrame, path: Path, title: str, block: int = POSITION_BLOCK) -> Plot | Skipped:
    """Mean |δ| and the gate by response position (blocks of ``block`` tokens), at the first and the last update
    of a step, averaged over the run's steps; per variant the mean over seeds, band min–max. Shows whether drift
    grows along a response and where the gate acts. A panel flat in every run (|δ| at the first update is 0
    without staleness) is left out and named."""
    per: dict[str, dict[str, list[dict[int, float]]]] = {}
    trained = runs[(runs["run_dir"] != "") & (runs["steps_done"] > 0)]
    for variant, g in trained.groupby("variant", sort=False):
        for d in g["run_dir"]:
            for what, blocks in by_position_of(Path(d)).items():
                per.setdefault(what, {}).setdefault(variant, []).append(blocks)
    panels = [(w, label) for w, label in BY_POSITION if w in per]
    if not panels:
        return Skipped("no run logged drift by position (runs made before the drift/*/by_block/* metrics)")
    flat, drawn = [], []
    for w, label in panels:
        values = [v for runs_ in per[w].values() for blocks in runs_ for v in blocks.values()]
        (flat if max(values) - min(values) <= 1e-12 else drawn).append((w, label, values))
    if not drawn:
        return Skipped("every panel is flat in every run")
    colours = _colours(list(dict.fromkeys(v for w, _, _ in drawn for v in per[w])))
    fig, axes = _grid(len(drawn))
    rows: list[dict] = []
    for ax, (w, label, _) in zip(axes, drawn, strict=True):
        for variant, blocks in per[w].items():
            table = pd.DataFrame(blocks).sort_index(axis=1)  # one row per seed, one column per block
            mean, lo, hi = table.mean(), table.min(), table.max()
            ax.plot(mean.index, mean, marker="o", ms=3, lw=1.3, label=variant, color=colours[variant])
            ax.fill_between(mean.index, lo, hi, color=colours[variant], alpha=0.15)
            rows += [{"panel": label, "series": variant, "x": b, "y": mean[b], "lo": lo[b], "hi": hi[b]}
                     for b in mean.index]
        ticks = sorted({b for blocks in per[w].values() for r in blocks for b in r})
        slanted = len(ticks) > 6  # long responses: 14 blocks of 64 tokens at 896 tokens would overlap flat
        ax.set_xticks(ticks, [f"{b * block}–{(b + 1) * block - 1}" for b in ticks], fontsize=7,
                      rotation=45 if slanted else 0, ha="right" if slanted else "center")
        if w.startswith("drift/"):  # |δ| spans decades between a healthy and a collapsed run
            ax.set_yscale("log", nonpositive="mask")
        ax.set_title(label + (" (log scale)" if w.startswith("drift/") else ""), fontsize=9)
        ax.set_xlabel("response positions (tokens)")
    _finish(fig, axes, path, f"{title}: drift and gate along the response, mean over steps and seeds "
            "(band: min–max over seeds)")
    left_out = [f"{label} (constant {values[0]:.3g} in every run)" for _, label, values in flat]
    note = f"{len(drawn)} panels" + (f"; left out: {'; '.join(left_out)}" if left_out else "")
    return Plot(pd.DataFrame(rows, columns=DATA_COLUMNS), note, [label for _, label, _ in drawn])
