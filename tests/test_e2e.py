"""The real CLI on tiny models: prepare (tiny SFT budget) → OPD steps for each loss × gates → evaluation."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "model.prepare.teacher_steps=4",
    "model.prepare.student_steps=2",
    "model.prepare.batch_size=8",
    "model.prepare.warmup_steps=1",
    "model.prepare.teacher.hidden_size=32",
    "model.prepare.teacher.intermediate_size=64",
    "model.prepare.teacher.num_attention_heads=1",
    "model.prepare.teacher.num_key_value_heads=1",
    "model.prepare.student.hidden_size=16",
    "model.prepare.student.intermediate_size=32",
    "model.prepare.student.num_attention_heads=1",
    "model.prepare.student.num_key_value_heads=1",
    "task.n_eval=3",
    "task.min_operands=2",
    "task.max_operands=2",
    "task.max_digits=2",
    "rollout.n_prompts=2",
    "rollout.n_samples=2",
    "rollout.mini_batch_size=2",
    "rollout.max_tokens=48",
    "eval.n_samples=2",
    "eval.ks=[1,2]",
    "eval.max_tokens=48",
    "trainer.steps=2",
    "trainer.warmup_steps=1",
    "logger.progress=false",
    "rollout.vllm.max_model_len=160",
]


def assert_pinned_first_step(record):
    """The first training step of the tiny default run (LSM + block64 on the tiny pair, the static engine's
    streams), measured 2026-12-06, identical on every run of one environment; rel 1e-3 absorbs another CPU's last
    bits."""
    assert record["loss"] == pytest.approx(0.0135673, rel=1e-3), record["loss"]
    assert record["teacher_minus_old_logp"] == pytest.approx(-0.0593876, rel=1e-3), record


def run_cli(args, cwd=ROOT, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "opd_lab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "static"])
def test_an_evaluation_only_run_on_an_in_memory_engine_loads_its_model(cache, tmp_path, engine):
    """``variant=teacher`` (eval.only) with an engine that samples from a loaded model (hf, static), not a path."""
    run_dir = tmp_path / "run"
    run_cli([*TINY, f"cache_dir={cache}", "variant=teacher", f"rollout.engine={engine}", f"hydra.run.dir={run_dir}"])
    assert list(pd.read_csv(run_dir / "eval.csv")["model"]) == ["teacher"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["auto", "vllm"])
def test_single_run_outputs(cache, tmp_path, engine):
    """The default run (``rollout.engine=auto``: the static engine on a CPU) and a vLLM run write every output."""
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, f"cache_dir={cache}", f"hydra.run.dir={run_dir}", f"rollout.engine={engine}"])
    if engine == "auto":
        assert "rollout.engine=auto → static" in proc.stdout  # what was chosen, and why, in one line
    assert "pass@1" in proc.stdout and "trained_student" in proc.stdout
    for name in ("config.yaml", "metrics.jsonl", "eval.csv", "eval_per_problem.csv", "status.json"):
        assert (run_dir / name).is_file(), name
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    if engine == "auto":  # the first step pinned (assert_pinned_first_step)
        assert train[0]["response/mean_len"] == 48.0
        assert_pinned_first_step(train[0])
    for key in ("loss", "gate/mean", "gate/min", "gate/max", "gate/std", "gate/frac_below_0.5",
                "drift/mean_abs_delta", "teacher_minus_old_logp", "teacher_support_mass", "student_support_mass",
                "special_masked", "response/mean_len", "tokens_per_s", "mismatch/sampler_old_abs"):
        assert key in train[0], key
    assert any("eval/pass@1" in r for r in recs)
    table = pd.read_csv(run_dir / "eval.csv")
    assert list(table["model"]) == ["base_student", "teacher", "trained_student"]
    assert table[["pass@1", "pass@2"]].apply(lambda c: c.between(0, 1)).all().all()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint")
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    # a quiet console: the run's own lines and bars; vLLM/Triton/transformers/wandb lines and warnings only in the log
    console = proc.stdout + proc.stderr
    for noise in ("Triton", "FutureWarning", "NUMA", "Loading safetensors", "Loading weights", "wandb: Tracking",
                  "Weave", "Writing model shards", "[W"):
        assert noise not in console, noise
    assert "wandb sync" in proc.stdout  # where the offline run is, in one line
    log = (run_dir / "__main__.log").read_text()
    for kept in ("Triton", "FutureWarning", "NUMA binding", "Loading safetensors") if engine == "vllm" else ():
        assert kept in log, kept


@pytest.mark.slow
def test_compiled_student_body_trains_the_pinned_first_step_and_saves_an_eager_checkpoint(cache, tmp_path):
    """``trainer.compile=true``: the learner's and π_old's forwards through the inductor-compiled body give the
    eager run's pinned first step (test_single_run_outputs) and the run saves a checkpoint that loads as is."""
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, f"cache_dir={cache}", f"hydra.run.dir={run_dir}", "trainer.compile=true"])
    assert "trainer.compile=true → the student's transformer body runs compiled" in proc.stdout
    train = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and train[0]["drift/first_update_mean_abs_delta"] == 0.0
    assert_pinned_first_step(train[0])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint")


@pytest.mark.slow
def test_verbose_console_shows_library_lines(cache, tmp_path):
    proc = run_cli([*TINY, f"cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}", "logger.verbose=true",
                    "rollout.engine=vllm", "trainer.steps=1", "trainer.warmup_steps=0", "eval.baselines=false"])
    assert "Triton" in proc.stdout + proc.stderr and "NUMA binding" in proc.stderr
    assert "Triton" in (tmp_path / "run" / "__main__.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("engine,gates", [("hf", "none,block32,span"), ("vllm", "sequence")])
def test_multirun_losses_and_gates(cache, tmp_path, engine, gates):
    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY if not o.startswith("trainer.steps")]
    run_cli(["--multirun", *tiny, f"cache_dir={cache}", f"hydra.sweep.dir={sweep}", f"rollout.engine={engine}",
             "loss=sampled_token,lsm", f"gate={gates}", "trainer.steps=2"])
    statuses = [json.loads(p.read_text())["status"] for p in sweep.glob("*/status.json")]
    assert statuses == ["completed"] * (2 * len(gates.split(",")))
    for p in sweep.glob("*/metrics.jsonl"):
        first = json.loads(p.read_text().splitlines()[0])
        assert first["loss"] == first["loss"] and first["rollout/tokens_per_s"] > 0


@pytest.mark.slow
def test_prepare_is_deterministic(tmp_path):
    """Two builds from the same seed give byte-identical weights (what scripts/build_embedded.py relies on)."""
    from opd_lab.models.embedded import build_embedded
    from tests.conftest import compose

    cfg = compose([o for o in TINY if o.startswith(("model.prepare", "task."))])
    digests = []
    for name in ("a", "b"):
        build_embedded(cfg.model.prepare, cfg.task, tmp_path / name, progress=False)
        digests.append({p.relative_to(tmp_path / name).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted((tmp_path / name).rglob("*.safetensors"))})
    assert digests[0] == digests[1] and len(digests[0]) == 2


@pytest.mark.slow
def test_long_horizon_experiment_on_the_shipped_long_pair(tmp_path):
    """``experiment=long``: the shipped long-horizon pair (no training), ~530–790-token responses through the
    default engine and the learner, evaluated on the first ``eval.limit`` held-out problems."""
    run_dir = tmp_path / "run"
    run_cli(["experiment=long", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}", "logger.progress=false",
             "rollout.n_prompts=2", "rollout.n_samples=2", "rollout.mini_batch_size=2", "trainer.steps=1",
             "eval.limit=3", "eval.n_samples=2"])
    assert not (tmp_path / "cache" / "embedded").exists()  # the shipped folders, no build
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][0]
    assert 450 <= train["response/mean_len"] <= 896, train["response/mean_len"]
    assert train["drift/first_update/by_block/8"] == train["drift/first_update/by_block/8"]  # a 9th 64-token block
    per_problem = pd.read_csv(run_dir / "eval_per_problem.csv")
    assert per_problem.groupby("model").size().to_dict() == {"base_student": 3, "teacher": 3, "student": 3}
    assert (per_problem["mean_len"] > 450).all()
