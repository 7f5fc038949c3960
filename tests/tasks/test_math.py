"""Paper-scale task path on project-written fixtures: each benchmark's real field layout (a handful of invented
problems), loading through the configured mapping, chat-template prompts, math-verify grading, truncation, and
per-benchmark / macro pass@k from ``python -m opd_lab.evaluate``."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from opd_lab.config import ConfigError, DatasetConfig, MathTaskConfig
from opd_lab.learner.evaluation import benchmark_csv, evaluate
from opd_lab.rollout.base import RolloutBatch
from opd_lab.tasks import encode_prompts, user_message
from opd_lab.tasks.math import MathTask, get_field, grade_math, last_boxed, load_problems

ROOT = Path(__file__).resolve().parents[2]

# Invented problems in each benchmark's published column layout.
AIME24 = [{"id": 60, "problem": "Find the sum 12+30.", "solution": "It is 42.", "answer": "42",
           "url": "https://example.org/1", "year": "2024"},
          {"id": 61, "problem": "Find 2*3.", "solution": "6", "answer": "6", "url": "u", "year": "2024"}]
AIME25 = [{"problem": "Compute 7+8.", "answer": "15", "id": "0"}]
MATH500 = [{"problem": "Simplify 2/4.", "solution": "It is \\boxed{\\frac{1}{2}}.", "answer": "\\frac{1}{2}",
            "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
           {"problem": "Which option is right?", "solution": "(A)", "answer": "\\text{(A)}",
            "subject": "Algebra", "level": 2, "unique_id": "test/algebra/2.json"}]
AMC23 = [{"id": 0, "question": "What is 3+4?", "answer": 7.0, "url": "https://example.org/amc"}]
DAPO = [{"data_source": "math_dapo", "prompt": [{"content": "What is 5+5?", "role": "user"}], "ability": "MATH",
         "reward_model": {"ground_truth": "10", "style": "rule-lighteval/MATH_v2"}, "extra_info": {"index": "a1"}}]


def write_fixtures(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in (("aime24", AIME24), ("aime25", AIME25), ("amc23", AMC23), ("dapo", DAPO)):
        paths[name] = d / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["math500"] = d / "math500.parquet"
    pd.DataFrame(MATH500).to_parquet(paths["math500"])
    return paths


def math_cfg(paths) -> MathTaskConfig:
    return MathTaskConfig(
        train=DatasetConfig(path=str(paths["dapo"]), question_field="prompt.0.content",
                            answer_field="reward_model.ground_truth"),
        eval={"aime24": DatasetConfig(path=str(paths["aime24"])), "aime25": DatasetConfig(path=str(paths["aime25"])),
              "math500": DatasetConfig(path=str(paths["math500"])),
              "amc23": DatasetConfig(path=str(paths["amc23"]), question_field="question")})


def test_dotted_field_paths():
    assert get_field(DAPO[0], "prompt.0.content") == "What is 5+5?"
    assert get_field(DAPO[0], "reward_model.ground_truth") == "10"
    with pytest.raises(KeyError):
        get_field(DAPO[0], "prompt.0.missing")


def test_loading_through_the_field_mapping(tmp_path):
    task = MathTask(math_cfg(write_fixtures(tmp_path)))
    probs = task.eval_problems()
    assert [p.source for p in probs] == ["aime24", "aime24", "aime25", "math500", "math500", "amc23"]
    assert probs[0].question == "Find the sum 12+30." and probs[0].answer == "42"
    assert probs[-1].answer == "7"  # AMC23 float answers become integers
    assert probs[3].answer == "\\frac{1}{2}" and probs[3].grader == "math"
    assert probs[0].prompt.startswith("Find the sum 12+30.\n\n") and probs[0].prompt.endswith("\\boxed{}.")
    train = task.train_problems(3, random.Random(0))
    assert {p.question for p in train} == {"What is 5+5?"} and train[0].answer == "10"


def test_prompt_rendering_with_the_chat_template(tmp_path, tokenizer):
    cfg = math_cfg(write_fixtures(tmp_path))
    cfg.system_prompt = "Be brief."
    prob = MathTask(cfg).eval_problems()[0]
    msgs = user_message(prob, cfg.system_prompt)
    assert [m["role"] for m in msgs] == ["system", "user"]
    ids = encode_prompts(tokenizer, [prob], system_prompt=cfg.system_prompt)[0]
    text = tokenizer.decode(ids)
    assert text == tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert "<|im_start|>user\nFind the sum 12+30.\n\nPlease reason step by step" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("response,answer,ok", [
    ("so \\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("The choice is \\boxed{\\text{(A)}}", "A", True),
    ("\\boxed{\\text{(A)}}", "\\text{(A)}", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True),
    ("first \\boxed{41} then \\boxed{42}", "42", True),    # the last boxed answer counts
    ("first \\boxed{42} then \\boxed{41}", "42", False),
    ("\\boxed{43}", "42", False),
    ("no box: 42", "42", False),
    ("\\boxed{\\frac{1}{2", "\\frac{1}{2}", False),          # unclosed (cut off)
])
def test_math_verify_grading(response, answer, ok):
    assert grade_math(response, answer) is ok


def test_last_boxed_matches_nested_braces():
    assert last_boxed("a \\boxed{x} b \\boxed{\\frac{a}{\\sqrt{b}}} c") == "\\frac{a}{\\sqrt{b}}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed{1") is None and last_boxed("none") is None


class ScriptedEngine:
    """Returns fixed response texts (and truncation flags) in prompt order, n per prompt."""

    def __init__(self, responses, truncated):
        self.responses, self.truncated = responses, truncated

    def generate(self, prompts, spec):
        B = len(self.responses)
        assert B == len(prompts) * spec.n
        return RolloutBatch(
            input_ids_B_L=torch.zeros(B, 2, dtype=torch.long), attention_mask_B_L=torch.ones(B, 2, dtype=torch.long),
            prompt_len=1, response_mask_B_T=torch.ones(B, 1, dtype=torch.long),
            sampler_logp_B_T=torch.zeros(B, 1), truncated_B=torch.tensor(self.truncated),
            prompt_index_B=torch.arange(B) // spec.n, response_text=list(self.responses))


def test_truncation_counting_and_per_benchmark_pass_at_k(tmp_path, tokenizer):
    probs = MathTask(math_cfg(write_fixtures(tmp_path))).eval_problems()  # aime24 ×2, aime25, math500 ×2, amc23
    ok = {"42": "\\boxed{42}", "6": "\\boxed{6}", "15": "\\boxed{15}", "\\frac{1}{2}": "\\boxed{0.5}",
          "\\text{(A)}": "\\boxed{A}", "7": "\\boxed{7}"}
    responses, truncated = [], []
    for p in probs:  # 2 samples each: first correct, second wrong; the amc23 correct one is truncated
        responses += [ok[p.answer], "\\boxed{999}"]
        truncated += [p.source == "amc23", False]
    res = evaluate(ScriptedEngine(responses, truncated), tokenizer, probs, 2, [1, 2], 1.0, 1.0, 16, 0)
    df = res.per_problem
    assert df["correct"].tolist() == [1, 1, 1, 1, 1, 0] and df["truncated"].tolist() == [0, 0, 0, 0, 0, 1]
    m = res.metrics
    assert m["pass@1/aime24"] == 0.5 and m["pass@1/amc23"] == 0.0 and m["pass@2/math500"] == 1.0
    assert m["pass@1"] == pytest.approx((0.5 + 0.5 + 0.5 + 0.0) / 4)  # macro mean over benchmarks
    assert m["truncated_frac"] == pytest.approx(1 / 12)
    table = benchmark_csv(df.assign(model="m", step=0), [1, 2]).set_index("benchmark")
    assert list(table.index) == ["aime24", "aime25", "math500", "amc23", "macro_mean"]
    assert table.loc["macro_mean", "pass@2"] == pytest.approx(0.75)
    assert table.loc["amc23", "truncated_frac"] == 0.5 and table.loc["macro_mean", "problems"] == 6


def test_missing_paths_and_fields_name_the_config_field(tmp_path):
    paths = write_fixtures(tmp_path)
    with pytest.raises(ConfigError, match=r"task\.eval\.aime24\.path='/nonexistent/a\.jsonl': no such file"):
        load_problems(DatasetConfig(path="/nonexistent/a.jsonl"), "task.eval.aime24", "aime24", "{question}")
    with pytest.raises(ConfigError, match=r"task\.eval\.amc23: record 0 has no field 'problem'"):
        load_problems(DatasetConfig(path=str(paths["amc23"])), "task.eval.amc23", "amc23", "{question}")
    with pytest.raises(ConfigError, match="task.prompt_template"):
        MathTaskConfig(prompt_template="no placeholder", eval={"a": DatasetConfig(path="x.jsonl")})


def _cli(module, args, timeout=900):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_errors_name_the_field(tmp_path):
    proc = _cli("opd_lab.evaluate", ["task=math", "task.eval.aime24.path=/nonexistent/aime24.jsonl"])
    assert proc.returncode == 2
    assert "opd-lab: config error: task.eval.aime24.path='/nonexistent/aime24.jsonl': no such file" in proc.stderr
    assert "Traceback" not in proc.stderr
    paths = write_fixtures(tmp_path)
    local = [f"task.eval.{b}.path={paths[b]}" for b in ("aime24", "aime25", "math500", "amc23")]
    proc = _cli("opd_lab.evaluate", ["model=qwen3_0.6b_4b", "task=math", "trainer.device=cpu", *local,
                                     "task.eval.amc23.question_field=question"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "config error: model.student='Qwen/Qwen3-0.6B' could not be loaded" in proc.stderr
    proc = _cli("opd_lab.evaluate", ["eval.checkpoint=/nonexistent/ckpt"])
    assert proc.returncode == 2 and "eval.checkpoint='/nonexistent/ckpt': no such folder" in proc.stderr


@pytest.mark.slow
def test_evaluate_cli_on_a_tiny_model(tmp_path):
    """python -m opd_lab.evaluate on the four fixture benchmarks with a tiny embedded model (vLLM engine)."""
    from tests.test_e2e import TINY

    paths = write_fixtures(tmp_path / "data")
    run_dir = tmp_path / "run"
    tiny = [t for t in TINY if not t.startswith("task.")]
    args = [*tiny, "task=math", f"task.train.path={paths['dapo']}", "task.eval.amc23.question_field=question",
            *[f"task.eval.{b}.path={paths[b]}" for b in ("aime24", "aime25", "math500", "amc23")],
            "eval.n_samples=3", "eval.ks=[1,2]", "eval.max_tokens=24", "rollout.vllm.max_model_len=256",
            f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"]
    proc = _cli("opd_lab.evaluate", args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    per_problem = pd.read_csv(run_dir / "eval_per_problem.csv")
    assert per_problem["benchmark"].tolist() == ["aime24", "aime24", "aime25", "math500", "math500", "amc23"]
    assert (per_problem["n"] == 3).all() and per_problem["truncated"].between(0, 3).all()
    table = pd.read_csv(run_dir / "eval_benchmarks.csv").set_index("benchmark")
    assert list(table.index) == ["aime24", "aime25", "math500", "amc23", "macro_mean"]
    for k in (1, 2):
        assert table.loc["macro_mean", f"pass@{k}"] == pytest.approx(table[f"pass@{k}"].iloc[:4].mean())
    summary = pd.read_csv(run_dir / "eval.csv")
    assert summary["model"].tolist() == ["base_student"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
