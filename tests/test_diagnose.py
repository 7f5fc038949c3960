"""Gradient-alignment diagnostic: g* by hand and as the autograd steepest-ascent direction, cosine limits, d_t of each
loss against autograd/analytic forms, a stubbed success oracle with exactly known Q, and the CLI on tiny models."""

import math
import subprocess
import sys

import pandas as pd
import pytest
import torch

from opd_lab.diagnose import choose_nodes, cosine, distill_gradient, ideal_gradient, node_logits
from opd_lab.losses import full_reverse_kl
from opd_lab.rollout.base import RolloutBatch
from tests.test_e2e import ROOT, TINY


def test_ideal_gradient_by_hand_all_candidates():
    pi = torch.tensor([0.5, 0.3, 0.2])
    g, v = ideal_gradient(pi, torch.tensor([0, 1, 2]), torch.tensor([1.0, 0.0, 0.5]), "drop")
    assert v == pytest.approx(0.6)  # 0.5·1 + 0.3·0 + 0.2·0.5
    assert torch.allclose(g, torch.tensor([0.5 * 0.4, 0.3 * -0.6, 0.2 * -0.1]))


def test_ideal_gradient_is_the_steepest_ascent_of_success_probability():
    z = torch.tensor([0.3, -1.0, 0.7, 0.1], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([0.9, 0.1, 0.4, 0.0], dtype=torch.float64)
    (torch.softmax(z, -1) * q).sum().backward()  # P(success) = Σ_v π(v) Q(v)
    g, _ = ideal_gradient(torch.softmax(z.detach(), -1), torch.arange(4), q, "drop")
    assert torch.allclose(g.double(), z.grad, atol=1e-7)


def test_ideal_gradient_rest_modes():
    pi = torch.tensor([0.5, 0.3, 0.2])
    g, v = ideal_gradient(pi, torch.tensor([0, 1]), torch.tensor([1.0, 0.0]), "drop")
    assert v == pytest.approx(0.625)  # π renormalised on {0, 1}: 0.625·1
    assert torch.allclose(g, torch.tensor([0.625 * 0.375, 0.375 * -0.625, 0.0]))
    g, v = ideal_gradient(pi, torch.tensor([0]), torch.tensor([1.0]), "share", q_rest=0.25)
    assert v == pytest.approx(0.5 + 0.5 * 0.25)
    assert torch.allclose(g, torch.tensor([0.5 * 0.375, 0.3 * -0.375, 0.2 * -0.375]))


def test_alignment_limits():
    g = torch.tensor([0.2, -0.18, -0.02])
    assert cosine(g, g) == pytest.approx(1.0)
    assert cosine(g, -g) == pytest.approx(-1.0)
    assert cosine(g, 3 * g) == pytest.approx(1.0)
    assert math.isnan(cosine(g, torch.zeros(3)))


def test_full_rkl_gradient_equals_autograd_and_closed_form():
    torch.manual_seed(0)
    z, q_logits = torch.randn(11, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    logq = torch.log_softmax(q_logits, -1)
    d = distill_gradient("full_rkl", z, logq, token=3).double()
    zz = z.clone().requires_grad_(True)
    full_reverse_kl(zz.view(1, 1, -1), q_logits.view(1, 1, -1)).sum().backward()
    assert torch.allclose(d, -zz.grad, atol=1e-6)
    log_pi = torch.log_softmax(z, -1)
    kl = (log_pi.exp() * (log_pi - logq)).sum()
    assert torch.allclose(d, -log_pi.exp() * (log_pi - logq - kl), atol=1e-6)


def test_sampled_token_and_lsm_gradients():
    torch.manual_seed(1)
    z, logq = torch.randn(9, dtype=torch.float64), torch.log_softmax(torch.randn(9, dtype=torch.float64), -1)
    y = 4
    pi = torch.softmax(z, -1)
    adv = float(logq[y] - torch.log(pi[y]))
    e = torch.zeros(9, dtype=torch.float64)
    e[y] = 1
    d = distill_gradient("sampled_token", z, logq, token=y).double()
    assert torch.allclose(d, adv * (e - pi), atol=1e-6)  # at π_θ = π_old: d = A (e_y − π)
    d = distill_gradient("lsm", z, logq, token=y, top_k=3).double()
    outside = torch.ones(9, dtype=torch.bool)
    outside[torch.topk(logq, 3).indices] = False
    assert torch.all(d[outside] == 0) and d[~outside].abs().sum() > 0
    assert d.sum().abs() < 1e-6  # renormalised: gradient is orthogonal to a constant shift of the logits


def test_choose_nodes():
    ent = torch.tensor([0.1, 2.0, 0.3, 5.0, 0.2, 4.0, 1.0])
    assert choose_nodes(ent, "every_k", 2, 10) == [0, 2, 4]
    assert choose_nodes(ent, "every_k", 2, 2) == [0, 2]
    assert choose_nodes(ent, "top_entropy", 0, 2) == [3, 5]  # the last position is never a node


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
