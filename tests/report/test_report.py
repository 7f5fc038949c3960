"""opd_lab.report: confidence intervals by hand, status bookkeeping, and a real tiny sweep through Hydra
multirun."""

import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from opd_lab.report.sources import load_sweep, setting_of
from opd_lab.report.tables import by_tag_markdown, paired, paired_markdown, summarise, summary_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_summary_counts_failed_and_unfinished_runs_and_uses_only_completed_ones():
    runs = pd.DataFrame([
        {"job": 0, "variant": "a", "seed": 0, "status": "completed", "final/pass@1": 0.2, "error": ""},
        {"job": 1, "variant": "a", "seed": 1, "status": "completed", "final/pass@1": 0.4, "error": ""},
        {"job": 2, "variant": "a", "seed": 2, "status": "failed", "final/pass@1": float("nan"), "error": "boom"},
        {"job": 3, "variant": "b", "seed": 0, "status": "unfinished", "final/pass@1": float("nan"), "error": ""},
        {"job": 4, "variant": "b", "seed": 1, "status": "not_started", "final/pass@1": float("nan"), "error": ""},
    ])
    s = summarise(runs).set_index("variant")
    assert list(s.index) == ["a", "b"]
    assert s.loc["a", ["n_completed", "n_failed", "n_unfinished"]].tolist() == [2, 1, 0]
    assert s.loc["b", ["n_completed", "n_failed", "n_unfinished"]].tolist() == [0, 0, 2]
    assert s.loc["a", "pass@1_mean"] == pytest.approx(0.3)
    assert s.loc["a", "pass@1_ci95"] == pytest.approx(12.7062047 * math.sqrt(0.02) / math.sqrt(2))  # t_{.975,1}
    md = summary_markdown(s.reset_index(), runs, "t")
    assert "| a | 2 | 0.300 ± " in md and "boom" in md and "not_started" in md and "unfinished" in md


def _cfg(gate="none", tau=1.0, seed=0, reuse=2, mb=16, lr=3e-4, staleness=0):
    return {"loss": {"name": "lsm", "top_k": 32}, "variant": "",
            "gate": {"kind": gate, "block_size": 64 if gate == "block" else None, "tau": tau},
            "rollout": {"n_prompts": 8, "n_samples": 4, "reuse": reuse, "mini_batch_size": mb, "staleness": staleness},
            "trainer": {"seed": seed, "lr": lr, "steps": 40}, "eval": {"seed": seed}, "logger": {"progress": False}}


def test_setting_and_pairing_key():
    s = setting_of(_cfg("block", reuse=4, mb=8, staleness=2), eval_only=False)
    assert (s["gate"], s["U"], s["staleness"], s["ungated"]) == ("block64", 16, 2, False)
    assert setting_of(_cfg("block", tau=0.0), False)["ungated"]  # τ = 0: every gate is 1
    # the seed and the gate do not enter the key; anything else does
    assert setting_of(_cfg(seed=1), False)["_pair_key"] == setting_of(_cfg("block", seed=2), False)["_pair_key"]
    assert setting_of(_cfg(lr=1e-3), False)["_pair_key"] != setting_of(_cfg(), False)["_pair_key"]
    assert setting_of(_cfg(), eval_only=True)["_pair_key"] is None


def test_paired_differences_by_hand():
    """Δ = gated − ungated with the same setting and seed, then a t interval over seeds; another setting's
    ungated run is never a baseline."""
    rows = []
    values = {"none": [0.50, 0.40, 0.60], "block": [0.55, 0.50, 0.62]}
    for gate, vals in values.items():
        for seed, v in enumerate(vals):
            rows.append({"variant": f"g={gate}", "seed": seed, "status": "completed", "final/pass@1": v,
                         **setting_of(_cfg(gate, seed=seed), False)})
    rows.append({"variant": "other lr", "seed": 0, "status": "completed", "final/pass@1": 0.9,
                 **setting_of(_cfg("none", lr=1e-3), False)})
    pairs = paired(pd.DataFrame(rows)).set_index("variant")
    assert list(pairs.index) == ["g=block"] and pairs.loc["g=block", "baseline"] == "g=none"
    d = [0.05, 0.10, 0.02]
    mean, sd = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    assert pairs.loc["g=block", "n_pairs"] == 3
    assert pairs.loc["g=block", "delta_pass@1_mean"] == pytest.approx(mean)
    assert pairs.loc["g=block", "delta_pass@1_ci95"] == pytest.approx(4.3026527 * sd / math.sqrt(3), rel=1e-6)
    assert "+0.057 ± " in paired_markdown(pairs.reset_index())


def test_every_paired_comparison_states_its_power():
    """Beside each Δ: the smallest true Δ its pairs detect with 80% power at their measured spread, and the seeds
    that would detect the published +0.018 on pass@8."""
    from opd_lab.core.stats import min_detectable_effect, seeds_needed

    rows = []
    values = {"none": [0.50, 0.40, 0.60, 0.45], "block": [0.55, 0.50, 0.62, 0.44],
              "shift": [0.53, 0.43, 0.63, 0.48]}  # every difference +0.03 (up to float noise): no spread measured
    for gate, vals in values.items():
        for seed, v in enumerate(vals):
            rows.append({"variant": f"g={gate}", "seed": seed, "status": "completed", "final/pass@1": v / 2,
                         "final/pass@8": v, **setting_of(_cfg(gate, seed=seed), False)})
    pairs = paired(pd.DataFrame(rows)).set_index("variant")
    assert pairs.loc["g=shift", "delta_pass@8_std"] == 0.0
    shift = [line for line in paired_markdown(pairs.reset_index()).splitlines() if line.startswith("| g=shift")]
    assert shift[-1] == "| g=shift | g=none | 4 | – (no spread: s = 0) | – (no spread: s = 0) | – |"
    pairs = pairs.drop(index="g=shift")
    d = [0.05, 0.10, 0.02, -0.01]
    sd = math.sqrt(sum((x - sum(d) / 4) ** 2 for x in d) / 3)
    assert pairs.loc["g=block", "delta_pass@8_std"] == pytest.approx(sd)
    assert pairs.loc["g=block", "delta_pass@8_mde80"] == pytest.approx(min_detectable_effect(sd, 4))
    assert pairs.loc["g=block", "delta_pass@1_mde80"] == pytest.approx(min_detectable_effect(sd / 2, 4))
    md = paired_markdown(pairs.reset_index())
    assert "### Power of the paired comparisons" in md and "seeds to detect +0.018 on pass@8" in md
    row = next(line for line in md.splitlines()[md.splitlines().index("### Power of the paired comparisons"):]
               if line.startswith("| g=block"))
    assert row == (f"| g=block | g=none | 4 | {min_detectable_effect(sd / 2, 4):.3f} | "
                   f"{min_detectable_effect(sd, 4):.3f} | {seeds_needed(0.018, sd)} |")
    # against a named baseline variant (routing comparisons): MDEs, but no gating gain to set them beside
    md = paired_markdown(paired(pd.DataFrame(rows), baseline="g=none").reset_index(), "g=none")
    assert "### Power of the paired comparisons" in md and "seeds to detect" not in md


def test_per_tag_counts_are_the_runs_that_have_the_values():
    """A legacy runs.csv has no per-tag columns: a per-tag cell (and its paired Δ) counts only the runs, or pairs,
    that have the value, never the variant's whole run count."""
    rows = []
    for gate, vals in {"none": [0.50, 0.40, 0.60], "block": [0.55, 0.50, 0.62]}.items():
        for seed, v in enumerate(vals):
            rows.append({"variant": f"g={gate}", "seed": seed, "status": "completed", "final/pass@1": v,
                         "final/ops3/pass@1": v + 0.1 if seed == 0 or (seed == 1 and gate == "none") else math.nan,
                         **setting_of(_cfg(gate, seed=seed), False)})
    runs = pd.DataFrame(rows)
    summary = summarise(runs).set_index("variant")
    assert summary.loc["g=none", "n_completed"] == 3
    assert summary.loc["g=none", "ops3/pass@1_n"] == 2 and summary.loc["g=block", "ops3/pass@1_n"] == 1
    text = by_tag_markdown(summary.reset_index())
    assert "| g=none | 2 | 0.550 ± " in text and "| g=block | 1 | 0.650 |" in text
    pairs = paired(runs).set_index("variant")
    assert pairs.loc["g=block", "n_pairs"] == 3 and pairs.loc["g=block", "delta_ops3/pass@1_n"] == 1
    assert pairs.loc["g=block", "delta_ops3/pass@1_mean"] == pytest.approx(0.05)
    assert "| 3 | +0.057 ± " in paired_markdown(pairs.reset_index())  # the overall Δ: 3 pairs
    assert "+0.050 (n=1)" in paired_markdown(pairs.reset_index())  # the per-tag Δ: the one pair that has it


def test_variants_are_named_by_what_varies_across_all_parts(tmp_path):
    """A sweep run in parts, each fixing one override (its loss): the loss must name the variants, or both
    losses' runs would merge into one variant and pair with each other."""
    import yaml

    from opd_lab.report.sources import load_sweeps

    parts = []
    for loss in ("sampled_token", "lsm"):
        part = tmp_path / loss
        jobs = [[f"drift={d}", f"loss={loss}", f"gate={g}", f"trainer.seed={s}"]
                for d in ("u2", "u8") for g in ("none", "block64") for s in (0, 1)]
        for num, overrides in enumerate(jobs):
            (part / str(num) / ".hydra").mkdir(parents=True)
            (part / str(num) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
            (part / str(num) / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
        parts.append(part)
    runs = load_sweeps(parts)
    assert len(runs) == 16 and runs["variant"].nunique() == 8
    assert "drift=u2 loss=lsm gate=none" in set(runs["variant"])


def test_missing_sweep_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such sweep directory"):
        load_sweep(tmp_path / "nope")
    proc = subprocess.run([sys.executable, "-m", "opd_lab.report.cli", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "holds no Hydra job directories" in proc.stderr


@pytest.mark.slow
def test_tiny_sweep_then_report(tmp_path):
    """2 variants × 2 seeds through Hydra multirun, plus a variant that fails: the others complete and the report
    lists the failures; runs.csv, CI columns, Markdown and PNGs are written."""
    from tests.test_e2e import TINY

    extra = tmp_path / "conf" / "variant"
    extra.mkdir(parents=True)
    (extra / "broken.yaml").write_text("# @package _global_\nmodel:\n  student: /nonexistent/student\n"
                                       "variant: broken\n")
    sweep_dir = tmp_path / "sweep"
    args = [sys.executable, "-m", "opd_lab", "--config-dir", str(ROOT / "sweeps"), "--config-name", "six_variant",
            "--multirun", *TINY, "rollout.engine=hf", f"cache_dir={tmp_path / 'cache'}",
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"hydra.sweep.dir={sweep_dir}",
            "variant=sampled_token,broken,lsm_block64", "trainer.seed=0,1", "eval.every=1"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "WANDB_MODE": "offline"})
    assert proc.returncode != 0  # Hydra re-raises the failed jobs' error after the whole sweep ran
    statuses = {p.parent.name: json.loads(p.read_text())["status"] for p in sweep_dir.glob("*/status.json")}
    assert statuses == {"0": "completed", "1": "completed", "2": "failed", "3": "failed", "4": "completed",
                        "5": "completed"}, proc.stderr[-3000:]

    out = tmp_path / "results"
    rep = subprocess.run([sys.executable, "-m", "opd_lab.report.cli", str(sweep_dir), "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 6 and sorted(runs["job"]) == list(range(6))
    assert runs.set_index("job").loc[[2, 3], "status"].tolist() == ["failed", "failed"]
    assert runs.set_index("job").loc[2, "error"].startswith("config error: model.student")
    assert runs.loc[runs["status"] == "completed", "steps_done"].tolist() == [2, 2, 2, 2]
    summary = pd.read_csv(out / "summary.csv").set_index("variant")
    assert list(summary.index) == ["sampled_token", "broken", "lsm_block64"]
    assert summary.loc["broken", "n_failed"] == 2 and summary.loc["broken", "n_completed"] == 0
    for col in ("pass@1_mean", "pass@1_std", "pass@1_ci95", "pass@2_mean", "pass@2_ci95"):
        assert col in summary.columns, col
    assert summary.loc[["sampled_token", "lsm_block64"], "n_completed"].tolist() == [2, 2]
    assert summary.loc[["sampled_token", "lsm_block64"], "pass@1_ci95"].notna().all()
    md = (out / "summary.md").read_text()
    assert "Runs that did not complete" in md and "broken" in md
    for png in ("pass_at_k.png", "curves.png", "pass_at_k_over_steps.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        width, height = png_size(out / png)
        assert width <= 1600 and height >= 350 and width / height < 3.5, (png, width, height)  # a grid, not a strip
    check_plot_data(out, summary)

    # --keep-runs: the small files of every job are kept under <out>/runs/<part>/, and the kept part alone gives
    # the same report (a sweep run over several sessions, whose run directories are not kept)
    kept_out = tmp_path / "kept"
    rep = subprocess.run([sys.executable, "-m", "opd_lab.report.cli", str(sweep_dir), "--out", str(kept_out),
                          "--keep-runs"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    part = kept_out / "runs" / f"{sweep_dir.parent.name}_{sweep_dir.name}"
    assert (part / "multirun.yaml").exists() and (part / "0" / "metrics.jsonl").exists()
    assert not list(part.rglob("*.safetensors")) and not list(part.rglob("wandb"))
    again = tmp_path / "again"
    rep = subprocess.run([sys.executable, "-m", "opd_lab.report.cli", str(part), "--out", str(again)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_csv(again / "summary.csv"), pd.read_csv(out / "summary.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(kept_out / "summary.csv"), pd.read_csv(out / "summary.csv"))
    # a kept part passed to a new report (the next session's) keeps its name there
    rep = subprocess.run([sys.executable, "-m", "opd_lab.report.cli", str(part), "--out", str(tmp_path / "next"),
                          "--keep-runs"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert [p.name for p in (tmp_path / "next" / "runs").iterdir()] == [part.name]


def test_pairing_ignores_fields_that_older_runs_lack():
    """Runs made before a schema field existed pair with newer ones that have it (at its default)."""
    from opd_lab.report.tables import common_pair_keys

    old, new = setting_of(_cfg(seed=0), False)["_pair_key"], setting_of(_cfg("block", seed=0), False)["_pair_key"]
    grown = json.dumps({**json.loads(new), "routing.rule": "single"}, sort_keys=True)
    keys = common_pair_keys(pd.Series([old, grown]))
    assert keys.iloc[0] == keys.iloc[1]
    other = json.dumps({**json.loads(new), "trainer.lr": 1.0}, sort_keys=True)
    assert common_pair_keys(pd.Series([old, other])).nunique() == 2  # a shared field that differs still counts


def test_paired_to_a_baseline_variant_by_hand():
    """--baseline: every other variant against the baseline variant's run with the same seed, although their
    settings differ (another teacher, another routing); per-tag pass@k is paired the same way."""
    rows = []
    values = {"gen": [0.50, 0.40, 0.60], "routed": [0.55, 0.50, 0.62], "other": [0.30, 0.30, 0.30]}
    for i, (variant, vals) in enumerate(values.items()):
        for seed, v in enumerate(vals):
            rows.append({"variant": variant, "seed": seed, "status": "completed", "final/pass@1": v,
                         "final/ops3/pass@1": v + 0.1, **setting_of(_cfg(lr=10.0 ** -(i + 2), seed=seed), False)})
    runs = pd.DataFrame(rows)
    assert paired(runs).empty  # no gate varies: nothing to pair with an ungated run of the same setting
    pairs = paired(runs, baseline="gen").set_index("variant")
    assert list(pairs.index) == ["routed", "other"] and set(pairs["baseline"]) == {"gen"}
    d = [0.05, 0.10, 0.02]
    mean, sd = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    assert pairs.loc["routed", "n_pairs"] == 3
    assert pairs.loc["routed", "delta_pass@1_mean"] == pytest.approx(mean)
    assert pairs.loc["routed", "delta_ops3/pass@1_mean"] == pytest.approx(mean)
    assert pairs.loc["routed", "delta_pass@1_ci95"] == pytest.approx(4.3026527 * sd / math.sqrt(3), rel=1e-6)
    assert pairs.loc["other", "delta_pass@1_mean"] == pytest.approx(-0.2)
    md = paired_markdown(pairs.reset_index(), "gen")
    assert "to gen with the same seed" in md and "(variant − gen)" in md and "+0.057 ± " in md
    with pytest.raises(ValueError, match="--baseline 'nope'.*gen, routed, other"):
        paired(runs, baseline="nope")


def _evals(folder: Path, name: str, rows: list[tuple[str, float, float]], **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"benchmark": "arith", "tag": t, "question": f"q{i}", "answer": "1", "pass@1": p1, "pass@8": p8,
                   **extra} for i, (t, p1, p8) in enumerate(rows)]).to_csv(folder / name, index=False)


def test_final_pass_at_k_per_tag_from_the_last_evaluation(tmp_path):
    from opd_lab.report.sources import final_by_tag
    from opd_lab.report.tables import baselines_by_tag, by_tag_markdown

    _evals(tmp_path / "evals", "student_step_000002.csv", [("ops3", 0.0, 0.0), ("ops4", 0.0, 0.0)])
    _evals(tmp_path / "evals", "student_step_000010.csv",
           [("ops3", 1.0, 1.0), ("ops3", 0.5, 1.0), ("ops4", 0.25, 0.5), ("ops4", 0.0, 0.0), ("ops4", 0.5, 1.0)])
    f = final_by_tag(tmp_path)
    assert f == pytest.approx({"final/ops3/pass@1": 0.75, "final/ops3/pass@8": 1.0,
                               "final/ops4/pass@1": 0.25, "final/ops4/pass@8": 0.5})
    _evals(tmp_path / "one", "student_step_000010.csv", [("ops3", 1.0, 1.0)])
    assert final_by_tag(tmp_path / "one") == {} and final_by_tag(tmp_path / "none") == {}

    runs = pd.DataFrame([{"variant": "a", "seed": s, "status": "completed", "run_dir": str(tmp_path), "error": "",
                          "final/pass@1": 0.5, **{k: v + s / 10 for k, v in f.items()}} for s in range(2)])
    _evals(tmp_path, "eval_per_problem.csv", [("ops3", 0.9, 1.0), ("ops4", 0.1, 0.4)], model="teacher_ops3")
    # another variant's run evaluated another teacher (and the same one again: its first numbers are kept)
    _evals(tmp_path / "b", "eval_per_problem.csv", [("ops3", 0.2, 0.3), ("ops4", 0.8, 1.0)], model="teacher_ops4")
    pd.concat([pd.read_csv(tmp_path / "b" / "eval_per_problem.csv"),
               pd.read_csv(tmp_path / "eval_per_problem.csv").assign(**{"pass@1": 0.0})]).to_csv(
        tmp_path / "b" / "eval_per_problem.csv", index=False)
    runs.loc[1, "run_dir"] = str(tmp_path / "b")
    teachers = baselines_by_tag(runs)
    md = by_tag_markdown(summarise(runs), teachers)
    assert "| a | 2 | 0.800 ± " in md and "ops4/pass@8" in md
    assert "| teacher_ops3 (baseline, not trained) | – | 0.900 | 1.000 | 0.100 | 0.400 |" in md
    assert "| teacher_ops4 (baseline, not trained) | – | 0.200 | 0.300 | 0.800 | 1.000 |" in md
    # an evaluation-only variant named like a baseline model has its own row; that model's baseline row goes
    only = runs.iloc[:1].assign(variant="teacher_ops3", seed=0, **{k: v for k, v in f.items()})
    md = by_tag_markdown(summarise(pd.concat([runs, only])), teachers)
    assert "| teacher_ops3 | 1 | 0.750 | 1.000 | 0.250 | 0.500 |" in md
    assert "teacher_ops3 (baseline" not in md and "| teacher_ops4 (baseline, not trained) |" in md


def test_multi_teacher_runs_get_routing_columns_a_routing_plot_and_per_tag_tables(tmp_path):
    """A sweep of two multi-teacher jobs written by hand: the report keeps each teacher's token share and the
    routing entropy (last 10% of steps), plots them, and tabulates the final pass@k per tag."""
    from opd_lab.report.cli import report

    sweep = tmp_path / "sweep"
    for job, seed in enumerate((0, 1)):
        d = sweep / str(job)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- variant=mt_min_kl\n- trainer.seed={seed}\n")
        (d / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {job}\n")
        (d / "config.yaml").write_text(yaml.safe_dump({**_cfg(seed=seed), "variant": "mt_min_kl"}))
        (d / "status.json").write_text(json.dumps({"status": "completed", "final": {"pass@1": 0.5, "pass@8": 0.9}}))
        recs = [{"step": s, "loss": 1.0, "routing/frac/ops3": f, "routing/frac/ops4": 1 - f, "routing/entropy": 0.5}
                for s, f in enumerate([0.2] * 9 + [0.6], start=1)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        _evals(d / "evals", "student_step_000010.csv", [("ops3", 1.0, 1.0), ("ops4", 0.0 + seed / 2, 1.0)])
    runs, summary = report(sweep, tmp_path / "out")
    assert runs["last10pct/routing/frac/ops3"].tolist() == pytest.approx([0.6, 0.6])
    assert runs["mean/routing/frac/ops4"].tolist() == pytest.approx([0.76, 0.76])
    assert summary.set_index("variant").loc["mt_min_kl", "ops4/pass@1_mean"] == pytest.approx(0.25)
    assert (tmp_path / "out" / "routing.png").read_bytes()[:4] == b"\x89PNG"
    assert "### Final pass@k per tag" in (tmp_path / "out" / "summary.md").read_text()


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_plot_data(out: Path, summary: pd.DataFrame) -> None:
    """The tiny six-variant sweep's figures drew what the tables say: pass@k bars at the summary's means with the
    untrained student and teacher lines, a loss panel per loss, the flat |δ|-at-the-first-update panel left out
    and named in summary.md, and pass@k at both evaluation steps."""
    bars = pd.read_csv(out / "plot_data" / "pass_at_k.csv")
    assert set(bars["panel"]) == {"pass@1", "pass@2"}
    assert {"baseline:base_student", "baseline:teacher"} <= set(bars["series"])
    for _, r in bars[~bars["series"].str.startswith("baseline:")].iterrows():
        assert r["y"] == pytest.approx(summary.loc[r["series"], f"{r['panel']}_mean"])
    base = pd.read_csv(out / "runs.csv")
    first = next(d for d in base.loc[base["status"] == "completed", "run_dir"])
    evals = pd.read_csv(Path(first) / "eval.csv").set_index("model")
    line = bars[(bars["series"] == "baseline:teacher") & (bars["panel"] == "pass@1")]["y"].iloc[0]
    assert line == pytest.approx(evals.loc["teacher", "pass@1"])  # one evaluation seed: every run holds the same
    curves = pd.read_csv(out / "plot_data" / "curves.csv")
    assert {"loss (sampled_token)", "loss (lsm)", "mean |δ|"} <= set(curves["panel"])
    assert "|δ| at the first update" not in set(curves["panel"])
    md = (out / "summary.md").read_text()
    assert "|δ| at the first update (constant 0 in every run)" in md.split("`curves.png`")[1]
    position = pd.read_csv(out / "plot_data" / "drift_by_position.csv")  # one 64-token block at 48 tokens
    assert set(position["panel"]) >= {"|δ| at the last update"} and set(position["x"]) == {0}
    assert "|δ| at the first update (constant 0 in every run)" in md.split("`drift_by_position.png`")[1]
    table = md.split("## Drift and gate by response position (tokens 0–63, blocks of 64)")[1]
    assert "| lsm_block64 | mean abs δ | 2 | " in table and "| lsm_block64 | gate | 2 | " in table
    assert "| sampled_token | gate |" not in table  # no gate, no gate row
    assert "| sampled_token | token share | 2 | 1 ± 0 |" in table  # one block: it holds every token
    steps = pd.read_csv(out / "plot_data" / "pass_at_k_over_steps.csv")
    assert sorted(steps.loc[steps["series"] == "lsm_block64", "x"].dropna().unique()) == [1, 2]


def test_a_figure_with_nothing_to_show_is_not_drawn_and_the_summary_says_why(tmp_path):
    """eval.every=0 (one evaluation per run): no pass@k-over-steps figure, a line in summary.md instead; a stale
    copy from an earlier report is removed with --force."""
    from opd_lab.report.cli import main

    for num, gate in enumerate(("none", "block")):
        _job(tmp_path / "sweep", num, [f"gate={'block64' if gate == 'block' else gate}"], _cfg(gate),
             {"pass@1": 0.5, "pass@8": 0.7})
    out = tmp_path / "out"
    out.mkdir()
    (out / "pass_at_k_over_steps.png").write_bytes(b"stale")
    assert main([str(tmp_path / "sweep"), "--out", str(out), "--force"]) == 0
    assert not (out / "pass_at_k_over_steps.png").exists() and (out / "pass_at_k.png").exists()
    md = (out / "summary.md").read_text()
    assert "- `pass_at_k_over_steps.png`: not drawn: each run was evaluated once, at its end (eval.every=0)" in md
    assert "- `curves.png`: 1 panels" in md and "(data: `plot_data/curves.csv`)" in md


def _job(part: Path, num: int, overrides: list[str], cfg: dict, final: dict) -> None:
    d = part / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "status.json").write_text(json.dumps({"status": "completed", "final": final}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))


def test_an_earlier_reports_runs_csv_is_a_source_equal_to_its_run_directories(tmp_path):
    """A sweep whose first seeds' run directories are gone (only their report's runs.csv is left) and whose last
    seed is a new part: reporting runs.csv + the new part gives the same summary and paired differences as the
    directories of both, also from a runs.csv written before it kept the pair key (the pairing then keys on the
    setting columns, and still never pairs two drift points); bookkeeping overrides of one part name nothing."""
    from opd_lab.report.cli import main, report

    points = {"u2": (1, 16), "u8": (2, 8)}  # drift point → (reuse, mini-batch): U = 2, 8
    old, new = tmp_path / "old", tmp_path / "new"
    for part, seeds, extra in ((old, (0, 1), []), (new, (2,), ["trainer.threads=1"])):
        num = 0
        for d, (reuse, mb) in points.items():
            for g in ("none", "block"):
                for s in seeds:
                    p1 = 0.1 * s + (0.3 if d == "u8" else 0.0) + (0.05 * (s + 1) if g == "block" else 0.0)
                    _job(part, num, [f"drift={d}", f"gate={'block64' if g == 'block' else g}", f"trainer.seed={s}",
                                     *extra], _cfg(g, seed=s, reuse=reuse, mb=mb), {"pass@1": p1, "pass@8": p1 + 0.2})
                    num += 1
    cols = ["variant", "n_completed", "pass@1_mean", "pass@1_ci95", "pass@8_mean"]
    ref_runs, ref = report([old, new], tmp_path / "ref")
    ref_pairs = pd.read_csv(tmp_path / "ref" / "paired.csv")
    assert ref_runs["variant"].nunique() == 4 and set(ref["n_completed"]) == {3}
    assert ref_pairs.set_index("variant").loc["drift=u8 gate=block64", "delta_pass@1_mean"] == pytest.approx(0.1)

    report(old, tmp_path / "old_report")
    legacy = pd.read_csv(tmp_path / "old_report" / "runs.csv").drop(columns=["pair_key"])
    legacy.to_csv(tmp_path / "legacy.csv", index=False)
    for source in (tmp_path / "old_report" / "runs.csv", tmp_path / "legacy.csv"):
        out = tmp_path / f"from_{source.stem}"
        runs, summary = report([source, new], out)
        pd.testing.assert_frame_equal(summary[cols], ref[cols])
        pd.testing.assert_frame_equal(pd.read_csv(out / "paired.csv"), ref_pairs)
        assert (runs["run_dir"] == "").sum() == 8 and (out / "drift_map.png").exists()

    with pytest.raises(ValueError, match="8 completed runs appear more than once.*u2 gate=none trainer.seed=0 in "):
        report([tmp_path / "old_report" / "runs.csv", old], tmp_path / "dup")
    with pytest.raises(ValueError, match="would be overwritten"):
        report([tmp_path / "old_report" / "runs.csv", new], tmp_path / "old_report")
    # --keep-runs into the runs.csv's own folder: the csv is kept under runs/ first; the same command run again
    # would read the combined runs.csv it wrote (every seed twice, or a part lost): an error naming the kept sources
    rep = tmp_path / "old_report"
    args = [str(rep / "runs.csv"), str(new), "--out", str(rep), "--keep-runs"]
    assert main(args) == 2  # the folder holds an earlier report: refused unless --force
    args.append("--force")
    assert main(args) == 0
    pd.testing.assert_frame_equal(pd.read_csv(rep / "summary.csv")[cols], ref[cols])
    assert (rep / "runs" / "old_report_runs.csv").exists() and (rep / "runs" / f"{tmp_path.name}_new").is_dir()
    assert main(args) == 2
    assert main([*sorted(map(str, (rep / "runs").iterdir())), "--out", str(rep), "--keep-runs", "--force"]) == 0
    # the kept parts of that report, kept by the next one: their names stay (no "runs_" prefix on the csv either)
    nxt = tmp_path / "next_report"
    assert main([*sorted(map(str, (rep / "runs").iterdir())), "--out", str(nxt), "--keep-runs"]) == 0
    assert sorted(p.name for p in (nxt / "runs").iterdir()) == sorted(p.name for p in (rep / "runs").iterdir())
    from opd_lab.report.archive import keep_runs

    (tmp_path / "a" / "runs").mkdir(parents=True)
    (tmp_path / "b" / "runs").mkdir(parents=True)
    for x in "ab":
        shutil.copytree(new, tmp_path / x / "runs" / "part")
    with pytest.raises(ValueError, match="two sources would be kept as"):  # never one silently over the other
        keep_runs([tmp_path / "a" / "runs" / "part", tmp_path / "b" / "runs" / "part"], tmp_path / "clash")
    pd.testing.assert_frame_equal(pd.read_csv(rep / "summary.csv")[cols], ref[cols])


def test_a_legacy_runs_csv_pairs_on_every_other_axis_of_its_sweep(tmp_path):
    """A runs.csv without pair keys, over an axis outside its setting columns (the temperature, an override):
    gated runs still pair only with the ungated run of their own temperature (never both: an error), including a
    new part's runs; bookkeeping overrides of a part name nothing even when no axis varies."""
    from opd_lab.report.cli import report
    from opd_lab.report.sources import load_sweeps
    from opd_lab.report.tables import paired

    def sweep(part, seeds, extra=()):
        num = 0
        for t in ("0.7", "1.0"):
            for g in ("none", "block"):
                for s in seeds:
                    p1 = (0.2 if t == "0.7" else 0.6) + (0.05 if g == "block" else 0.0) + 0.01 * s
                    cfg = _cfg(g, seed=s)
                    cfg["rollout"]["temperature"] = float(t)
                    _job(part, num, [f"rollout.temperature={t}", f"gate={'block64' if g == 'block' else g}",
                                     f"trainer.seed={s}", *extra], cfg, {"pass@1": p1})
                    num += 1
    sweep(tmp_path / "a", (0, 1))
    sweep(tmp_path / "b", (2,), ["logger.progress=false"])
    report(tmp_path / "a", tmp_path / "ra")
    pd.read_csv(tmp_path / "ra" / "runs.csv").drop(columns=["pair_key"]).to_csv(tmp_path / "legacy.csv", index=False)
    pairs = paired(load_sweeps([tmp_path / "legacy.csv", tmp_path / "b"])).set_index("variant")
    assert pairs["n_pairs"].tolist() == [3, 3]
    assert pairs["delta_pass@1_mean"].tolist() == pytest.approx([0.05, 0.05])

    # two ungated runs the setting cannot tell apart (a field the config does not record): an error, not 2 pairs
    rows = [{"variant": v, "seed": 0, "status": "completed", "final/pass@1": p, **setting_of(_cfg(g), False)}
            for v, g, p in (("t=0.7 none", "none", 0.2), ("t=1.0 none", "none", 0.6), ("t=0.7 block", "block", 0.3))]
    with pytest.raises(ValueError, match="t=0.7 block: more than one reference run.*t=0.7 none, t=1.0 none"):
        paired(pd.DataFrame(rows))

    for part, seeds, extra in (("c", (0, 1), []), ("d", (2,), ["trainer.threads=1"])):
        for s in seeds:
            _job(tmp_path / part, s, [f"trainer.seed={s}", *extra], _cfg(seed=s), {"pass@1": 0.5})
    assert set(load_sweeps([tmp_path / "c", tmp_path / "d"])["variant"]) == {"default"}


def test_runs_csv_edge_cases(tmp_path):
    """An eval.seed sweep is not a duplicate run; a runs.csv from a report too old to pair is a clear error; a
    list value's spaces do not split an override."""
    from opd_lab.report.cli import main
    from opd_lab.report.sources import _split_overrides, load_sweeps

    for num, s in enumerate((0, 1, 2)):
        _job(tmp_path / "ev", num, ["variant=base_student", "trainer.seed=0", f"eval.seed={s}"],
             {**_cfg(seed=0), "variant": "base_student", "eval": {"seed": s, "only": "student"}}, {"pass@1": 0.1 * s})
    assert len(load_sweeps([tmp_path / "ev"])) == 3
    pd.DataFrame([{"job": 0, "overrides": "gate=none trainer.seed=0", "variant": "gate=none", "seed": 0,
                   "status": "completed", "final/pass@1": 0.5}]).to_csv(tmp_path / "old.csv", index=False)
    assert main([str(tmp_path / "old.csv"), "--out", str(tmp_path / "o")]) == 2
    assert _split_overrides("a=[x, y] b='p q' c=1") == ["a=[x, y]", "b='p q'", "c=1"]


def test_a_job_that_a_later_part_completed_is_superseded_not_failed_or_unfinished(tmp_path):
    """A part's failed and unfinished jobs, re-run to completion in a later part, are listed as superseded (their
    former status and error kept) and counted neither as failed nor as unfinished; read back from a runs.csv alone
    they are failed and unfinished again, and beside the later part superseded again; a failure in a later part,
    or beside a completed run in its own part, is not superseded."""
    from opd_lab.report.cli import report
    from opd_lab.report.sources import load_sweeps

    a, b = tmp_path / "a", tmp_path / "b"
    for s in (0, 1, 2):
        _job(a, s, ["gate=none", f"trainer.seed={s}"], _cfg(seed=s), {"pass@1": 0.5})
    (a / "1" / "status.json").write_text(json.dumps({"status": "failed", "error": "KeyError: 'gate/mean'"}))
    (a / "2" / "status.json").unlink()
    _job(b, 0, ["gate=none", "trainer.seed=1", "trainer.threads=1"], _cfg(seed=1), {"pass@1": 0.7})
    _job(b, 1, ["gate=none", "trainer.seed=2", "trainer.threads=1"], _cfg(seed=2), {"pass@1": 0.9})

    alone = summarise(load_sweeps([a])).iloc[0]
    assert [alone["n_completed"], alone["n_failed"], alone["n_unfinished"]] == [1, 1, 1]
    runs, summary = report([a, b], tmp_path / "r")
    row = summary.iloc[0]
    assert [row["n_completed"], row["n_failed"], row["n_unfinished"]] == [3, 0, 0]
    assert row["pass@1_mean"] == pytest.approx(0.7)
    gone = runs[runs["status"] == "superseded"].set_index("seed")["error"]
    assert gone[1] == f"failed (KeyError: 'gate/mean'); completed in {b}" and gone[2] == f"unfinished; completed in {b}"
    assert "| superseded | failed (KeyError: 'gate/mean'); completed in" in (tmp_path / "r" / "summary.md").read_text()

    report([a], tmp_path / "ra")
    back = load_sweeps([tmp_path / "ra" / "runs.csv"]).set_index("seed")
    assert back.loc[1, ["status", "error"]].tolist() == ["failed", "KeyError: 'gate/mean'"]
    assert back.loc[2, "status"] == "unfinished"
    r2 = report([tmp_path / "r" / "runs.csv"], tmp_path / "r2")[1].iloc[0]
    assert [r2["n_completed"], r2["n_failed"], r2["n_unfinished"]] == [3, 0, 0]
    kept = pd.read_csv(tmp_path / "r" / "runs.csv")  # the former status in its own columns
    gone_rows = kept[kept["status"] == "superseded"].set_index("seed")
    assert gone_rows.loc[1, ["former_status", "former_error"]].tolist() == ["failed", "KeyError: 'gate/mean'"]
    assert gone_rows.loc[2, "former_status"] == "unfinished" and gone_rows.loc[2, "superseded_by"] == str(b)
    legacy = tmp_path / "legacy" / "runs.csv"  # a runs.csv from before those columns: the error text is parsed
    legacy.parent.mkdir()
    kept.drop(columns=["former_status", "former_error", "superseded_by"]).to_csv(legacy, index=False)
    cols = ["seed", "status", "former_status", "former_error"]  # (error and superseded_by name the source's path)
    new, old = (load_sweeps([s])[cols].fillna("") for s in (tmp_path / "r" / "runs.csv", legacy))
    # marked again within the csv's own parts, from the columns or from the text
    assert new.to_dict("records") == old.to_dict("records")
    assert sorted(new.loc[new["status"] == "superseded", "former_status"]) == ["failed", "unfinished"]
    again = summarise(load_sweeps([tmp_path / "ra" / "runs.csv", b])).iloc[0]
    assert [again["n_completed"], again["n_failed"], again["n_unfinished"]] == [3, 0, 0]

    # only a later part supersedes: a failure after a completed run of the same job (a re-run that broke) stays a
    # failure, and so does a failure beside a completed run of the same variant label in its own part
    late = summarise(load_sweeps([b, a])).iloc[0]
    assert [late["n_completed"], late["n_failed"], late["n_unfinished"]] == [3, 1, 1]
    c = tmp_path / "c"
    for num, lr in enumerate((3e-4, 1e-3)):
        _job(c, num, ["variant=mt_alignment", f"trainer.lr={lr}", "trainer.seed=0"],
             {**_cfg(seed=0, lr=lr), "variant": "mt_alignment"}, {"pass@1": 0.5})
    (c / "1" / "status.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: nan"}))
    own = load_sweeps([c])
    assert own["status"].tolist() == ["completed", "failed"]


def test_the_report_never_overwrites_a_folder_that_holds_files(tmp_path):
    """Committed results (or an earlier report) are replaced only with --force; an empty or new --out is written."""
    from opd_lab.report.cli import main

    sweep = tmp_path / "sweep"
    _job(sweep, 0, ["gate=none", "trainer.seed=0"], _cfg("none", seed=0), {"pass@1": 0.5})
    kept = tmp_path / "results" / "study"
    kept.mkdir(parents=True)
    (kept / "summary.md").write_text("committed\n")
    assert main([str(sweep), "--out", str(kept)]) == 2
    assert (kept / "summary.md").read_text() == "committed\n" and not (kept / "runs.csv").exists()
    assert main([str(sweep), "--out", str(kept), "--keep-runs"]) == 2 and not (kept / "runs").exists()
    assert main([str(sweep), "--out", str(tmp_path / "new")]) == 0 and (tmp_path / "new" / "runs.csv").exists()
    assert main([str(sweep), "--out", str(kept), "--force"]) == 0
    assert (kept / "summary.md").read_text() != "committed\n"


def test_final_per_problem_is_the_last_student_evaluation(tmp_path):
    """A run's final per-problem evaluation, and so its per-tag pass@k, are the last step's student rows of
    ``eval_per_problem.csv`` (the baselines' rows and earlier evaluations are not), ``evals/`` only without it."""
    from opd_lab.report.sources import final_by_tag, final_per_problem

    rows = [("ops3", 0.5, 1.0), ("ops4", 0.25, 0.5)]
    _evals(tmp_path, "a.csv", rows, model="student", step=40)
    _evals(tmp_path, "b.csv", [("ops3", 0.0, 0.0), ("ops4", 0.0, 0.0)], model="student", step=20)
    _evals(tmp_path, "c.csv", [("ops3", 0.9, 0.9), ("ops4", 0.9, 0.9)], model="base_student", step=0)
    pd.concat([pd.read_csv(tmp_path / f) for f in ("c.csv", "b.csv", "a.csv")]).to_csv(
        tmp_path / "eval_per_problem.csv", index=False)
    assert final_per_problem(tmp_path)["pass@1"].tolist() == [0.5, 0.25]
    assert final_by_tag(tmp_path) == {"final/ops3/pass@1": 0.5, "final/ops3/pass@8": 1.0,
                                      "final/ops4/pass@1": 0.25, "final/ops4/pass@8": 0.5}
    assert final_per_problem(tmp_path / "nothing") is None
    _evals(tmp_path / "many" / "evals", "student_step_000001.csv",
           [("ops10", 1.0, 1.0), ("ops9", 0.0, 0.0), ("ops11", 1.0, 1.0)])
    assert list(final_by_tag(tmp_path / "many"))[::2] == ["final/ops9/pass@1", "final/ops10/pass@1",
                                                         "final/ops11/pass@1"]  # numbers in tags sort as numbers
    # an evaluation-only run (eval.only) holds one model: its rows are that run's final evaluation
    only = tmp_path / "only"
    _evals(only, "eval_per_problem.csv", [("ops3", 0.75, 1.0), ("ops4", 0.0, 0.25)], model="base_student", step=0)
    assert final_per_problem(only)["pass@1"].tolist() == [0.75, 0.0]
    assert final_by_tag(only) == {"final/ops3/pass@1": 0.75, "final/ops3/pass@8": 1.0,
                                  "final/ops4/pass@1": 0.0, "final/ops4/pass@8": 0.25}


def test_every_paired_comparison_sets_the_problems_standard_error_beside_the_seeds(tmp_path):
    """The standard error of a comparison's mean Δ over evaluation problems: each problem's Δpass@k averaged over the
    pairs, std over the problems / √problems per benchmark, combined as the macro mean, √(Σ SE_b²)/B; beside it the
    standard error over seeds, s/√n."""
    from opd_lab.report.sources import per_problem_differences

    per_problem = {  # (gate, seed) → pass@8 on 4 problems of benchmark "arith" and 3 of "other"
        ("none", 0): [0.0, 0.5, 1.0, 0.5, 0.0, 1.0, 0.5], ("block", 0): [0.5, 0.5, 1.0, 1.0, 0.5, 1.0, 0.0],
        ("none", 1): [1.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5], ("block", 1): [1.0, 0.0, 0.0, 0.5, 1.0, 0.5, 0.5],
        ("none", 2): [0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 0.0], ("block", 2): [1.0, 0.5, 0.5, 1.0, 0.5, 0.5, 1.0]}
    rows = []
    for (gate, seed), p8 in per_problem.items():
        d = tmp_path / f"{gate}{seed}"
        d.mkdir()
        frame = pd.DataFrame([{"benchmark": "arith" if i < 4 else "other", "tag": "ops3", "question": f"q{i}",
                               "answer": "1", "pass@1": v / 2, "pass@8": v} for i, v in enumerate(p8)])
        pd.concat([frame.assign(model="base_student", step=10), frame.assign(model="student", step=10)]).assign(
            **{"pass@1": lambda f: f["pass@1"].where(f["model"] == "student", 0.9)}).to_csv(
            d / "eval_per_problem.csv", index=False)  # a same-step row of another model is not the student's
        rows.append({"variant": f"g={gate}", "seed": seed, "status": "completed", "run_dir": str(d),
                     "final/pass@1": sum(p8) / 14, "final/pass@8": sum(p8) / 7,
                     **setting_of(_cfg(gate, seed=seed), False)})
    pairs = paired(pd.DataFrame(rows)).set_index("variant")
    mean_d = [sum(per_problem[("block", s)][i] - per_problem[("none", s)][i] for s in range(3)) / 3 for i in range(7)]

    def se(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))

    want = math.sqrt(se(mean_d[:4]) ** 2 + se(mean_d[4:]) ** 2) / 2
    assert pairs.loc["g=block", "delta_pass@8_problem_se"] == pytest.approx(want)
    assert pairs.loc["g=block", "delta_pass@1_problem_se"] == pytest.approx(want / 2)
    md = paired_markdown(pairs.reset_index())
    seeds = pairs.loc["g=block", "delta_pass@8_std"] / math.sqrt(3)
    row = next(line for line in md.splitlines()[md.splitlines().index("### Seeds against evaluation problems"):]
               if line.startswith("| g=block"))
    assert row == (f"| g=block | g=none | 3 | {seeds / 2:.3f} / {want / 2:.3f} ({want / seeds:.1f}) | "
                   f"{seeds:.3f} / {want:.3f} ({want / seeds:.1f}) |")
    # a problem answered twice, or another set of problems: no per-problem difference, and no standard error
    dup = tmp_path / "dup"
    dup.mkdir()
    f = pd.read_csv(tmp_path / "block0" / "eval_per_problem.csv")
    pd.concat([f, f[f["question"] == "q0"]]).to_csv(dup / "eval_per_problem.csv", index=False)
    assert per_problem_differences(dup, tmp_path / "none0", ["pass@8"]) is None
    f[f["question"] != "q6"].to_csv(dup / "eval_per_problem.csv", index=False)
    assert per_problem_differences(dup, tmp_path / "none0", ["pass@8"]) is None
    runs = pd.DataFrame(rows)
    runs.loc[1, "run_dir"] = str(dup)  # g=block seed 0
    assert math.isnan(paired(runs).set_index("variant").loc["g=block", "delta_pass@8_problem_se"])
    # without run directories (a legacy runs.csv) there is nothing to measure, and no table
    no_dirs = paired(pd.DataFrame(rows).drop(columns="run_dir"))
    assert "delta_pass@8_problem_se" not in no_dirs and "Seeds against evaluation problems" not in paired_markdown(
        no_dirs)
