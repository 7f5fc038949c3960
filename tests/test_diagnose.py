"""The gradient-alignment diagnostic app: a stubbed success oracle with exactly known Q, end-of-response candidates,
and the CLI on tiny models (the maths: test_alignment.py)."""

import subprocess
import sys

import pandas as pd
import pytest
import torch

from opd_lab.alignment import ideal_gradient, node_logits
from opd_lab.rollout.base import RolloutBatch
from tests.test_e2e import ROOT, TINY


class OracleEngine:
    """First call: fixed rollouts. Later calls (continuations, ended by the EOS token as a real engine's are):
    success iff the continuation's first token (the prompt's last token) is even, so Q(h_t, v) = 1[v even]
    exactly. Every call's prompts and spec are recorded."""

    ROLLOUT = "12+34\n4+2=6\n1+3=4\n=46\n\\boxed{46}"

    def __init__(self, tokenizer, rollout=ROLLOUT):
        self.tok, self.calls, self.rollout, self.seen = tokenizer, 0, rollout, []

    def generate(self, prompts, spec):
        self.calls += 1
        self.seen.append((prompts, spec))
        if self.calls == 1:
            texts = [self.rollout] * (len(prompts) * spec.n)
            ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        else:
            texts = ["GOOD" if p[-1] % 2 == 0 else "BAD" for p in prompts for _ in range(spec.n)]
            ids = [self.tok(t, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id] for t in texts]
            texts = [self.tok.decode(x) for x in ids]
        T = max(map(len, ids))
        resp = torch.tensor([x + [0] * (T - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids])
        B = resp.shape[0]
        return RolloutBatch(input_ids_B_L=torch.cat([torch.zeros(B, 1, dtype=torch.long), resp], 1),
                            attention_mask_B_L=torch.cat([torch.ones(B, 1, dtype=torch.long), mask], 1), prompt_len=1,
                            response_mask_B_T=mask, sampler_logp_B_T=torch.zeros(B, T),
                            truncated_B=torch.zeros(B, dtype=torch.bool),
                            prompt_index_B=torch.arange(B) // spec.n, response_text=texts)

    def close(self):
        pass


def test_stubbed_oracle_gives_exact_q_and_analytic_g_star(monkeypatch, tmp_path):
    import opd_lab.runtime
    import opd_lab.tasks
    from opd_lab import diagnose
    from opd_lab.models import load_model, load_tokenizer, resolve_paths
    from opd_lab.tasks import encode_prompts
    from tests.conftest import compose

    cfg = compose([*[t for t in TINY if not t.startswith(("rollout.", "eval.", "trainer.steps"))],
                   "rollout.engine=hf", f"cache_dir={tmp_path / 'cache'}", "logger.progress=false",
                   "+diagnose=default", "diagnose.n_questions=2", "diagnose.rollouts_per_question=1",
                   "diagnose.every_k=5", "diagnose.max_nodes=3", "diagnose.continuations=3",
                   f"diagnose.out_dir={tmp_path / 'out'}"])
    tok = load_tokenizer(resolve_paths(cfg).tokenizer)
    monkeypatch.setattr(opd_lab.runtime, "make_engine", lambda *a, **k: OracleEngine(tok))
    monkeypatch.setattr(opd_lab.tasks, "grade", lambda text, problem: text.removesuffix("<|im_end|>").endswith("GOOD"))
    df = diagnose.run(cfg, tmp_path / "run")
    assert len(df) == 2 * 3 * 2 * 3  # 2 rollouts × 3 nodes × 2 teachers × 3 losses
    student = load_model(resolve_paths(cfg).student, "float32", "cpu", trainable=False)
    resp = tok("12+34\n4+2=6\n1+3=4\n=46\n\\boxed{46}", add_special_tokens=False)["input_ids"]
    problems = sorted(set(df["question"]))
    from opd_lab.tasks import build_task

    probs = build_task(cfg.task).eval_problems()
    for (j, t), g in df[df["loss"] == "full_rkl"].groupby(["question", "position"]):
        prompt = encode_prompts(tok, [probs[j]])[0]
        pi = torch.softmax(node_logits(student, prompt, resp, [t])[0].double(), -1)
        cands = list(dict.fromkeys(torch.topk(pi, 3).indices.tolist() + [resp[t]]))
        q = torch.tensor([float(v % 2 == 0) for v in cands])
        g_star, value = ideal_gradient(pi.float(), torch.tensor(cands), q, "drop")
        row = g.iloc[0]
        assert row["sampled_token_q"] == float(resp[t] % 2 == 0)
        assert row["value"] == pytest.approx(value, abs=1e-6)
        assert row["g_star_norm"] == pytest.approx(float(g_star.norm()), rel=1e-5)
        assert row["q_se_max"] == 0.0  # Q is 0 or 1: no sampling error
    assert len(problems) == 2
    for name in ("nodes.csv", "summary.csv", "summary.md", "alignment_by_position.png",
                 "alignment_correct_vs_incorrect.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name


def test_end_of_response_candidate_is_graded_not_continued(monkeypatch, tmp_path):
    """Q(h_t, EOS) is the grade of the prefix itself (no continuation after <|im_end|>, whose id 2 is even, so
    the oracle's continuation would have said 1), and continuations get the rollout's remaining budget."""
    import opd_lab.runtime
    import opd_lab.tasks
    from opd_lab import diagnose
    from opd_lab.models import load_tokenizer, resolve_paths
    from tests.conftest import compose

    cfg = compose([*[t for t in TINY if not t.startswith(("rollout.", "eval.", "trainer.steps"))],
                   "rollout.engine=hf", "rollout.max_tokens=40", f"cache_dir={tmp_path / 'cache'}",
                   "logger.progress=false", "+diagnose=default", "diagnose.n_questions=1",
                   "diagnose.rollouts_per_question=1", "diagnose.every_k=5", "diagnose.max_nodes=3",
                   "diagnose.continuations=2", "diagnose.teachers={teacher: {model: teacher}}",
                   "diagnose.losses=[full_rkl]", f"diagnose.out_dir={tmp_path / 'out'}"])
    tok = load_tokenizer(resolve_paths(cfg).tokenizer)
    eos = tok.eos_token_id
    assert eos % 2 == 0
    engine = OracleEngine(tok, rollout="12+34<|im_end|>4+2=6\n=46\n\\boxed{46}")
    monkeypatch.setattr(opd_lab.runtime, "make_engine", lambda *a, **k: engine)
    monkeypatch.setattr(opd_lab.tasks, "grade", lambda text, problem: text.removesuffix("<|im_end|>").endswith("GOOD"))
    df = diagnose.run(cfg, tmp_path / "run")
    assert sorted(set(df["position"])) == [0, 5, 10]
    at_eos = df[df["position"] == 5].iloc[0]
    assert at_eos["sampled_token_q"] == 0.0  # "12+34<|im_end|>" is graded as it stands
    assert df[df["position"] == 10].iloc[0]["sampled_token_q"] == float(tok.convert_tokens_to_ids("6") % 2 == 0)
    continuations = engine.seen[1:]
    assert continuations and all(p[-1] != eos for prompts, _ in continuations for p in prompts)
    assert max(spec.max_tokens for _, spec in continuations) == 40 - 0 - 1  # node 0's remaining budget


@pytest.mark.slow
def test_diagnose_cli_on_tiny_models(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "opd_lab.diagnose", *TINY, f"cache_dir={tmp_path / 'cache'}",
                           "diagnose.n_questions=2", "diagnose.continuations=2", "diagnose.max_nodes=2",
                           "diagnose.every_k=4", "diagnose.rest=share", "diagnose.node_mode=top_entropy",
                           f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "continuations" in proc.stdout  # the cost estimate is printed before the work
    df = pd.read_csv(run_dir / "nodes.csv")
    assert set(df.columns) >= {"question", "rollout", "correct", "position", "entropy", "teacher", "loss",
                               "alignment", "g_star_norm", "q_se_mean", "q_se_max", "value", "q_rest"}
    assert set(df["loss"]) == {"sampled_token", "lsm", "full_rkl"}
    assert set(df["teacher"]) == {"teacher", "student_with_answer"}
    assert df["alignment"].dropna().between(-1 - 1e-6, 1 + 1e-6).all()
    assert df[["value", "q_min", "q_max", "q_rest"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (df["entropy"] >= 0).all() and (df["g_star_norm"] >= 0).all()
    summary = pd.read_csv(run_dir / "summary.csv")
    assert set(summary["rollouts"]) == {"all", "correct", "incorrect"}
