"""The gradient-alignment diagnostic app: a stubbed success oracle with exactly known Q, end-of-response candidates,
and the CLI on tiny models (the maths: test_alignment.py)."""

import subprocess
import sys

import pandas as pd
import pytest
import torch

from opd_lab.core.alignment import ideal_gradient, node_logits
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
    import opd_lab.run.components
    import opd_lab.tasks
    from opd_lab import diagnose
    from opd_lab.models.loading import load_model, load_tokenizer, resolve_paths
    from opd_lab.tasks import encode_prompts
    from tests.conftest import compose

    cfg = compose([*[t for t in TINY if not t.startswith(("rollout.", "eval.", "trainer.steps"))],
                   "rollout.engine=hf", f"cache_dir={tmp_path / 'cache'}", "logger.progress=false",
                   "+diagnose=default", "diagnose.n_questions=2", "diagnose.rollouts_per_question=1",
                   "diagnose.every_k=5", "diagnose.max_nodes=3", "diagnose.continuations=3",
                   f"diagnose.out_dir={tmp_path / 'out'}"])
    tok = load_tokenizer(resolve_paths(cfg).tokenizer)
    monkeypatch.setattr(opd_lab.run.components, "make_engine", lambda *a, **k: OracleEngine(tok))
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
    import opd_lab.run.components
    import opd_lab.tasks
    from opd_lab import diagnose
    from opd_lab.models.loading import load_tokenizer, resolve_paths
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
    monkeypatch.setattr(opd_lab.run.components, "make_engine", lambda *a, **k: engine)
    monkeypatch.setattr(opd_lab.tasks, "grade", lambda text, problem: text.removesuffix("<|im_end|>").endswith("GOOD"))
    df = diagnose.run(cfg, tmp_path / "run")
    assert sorted(set(df["position"])) == [0, 5, 10]
    at_eos = df[df["position"] == 5].iloc[0]
    assert at_eos["sampled_token_q"] == 0.0  # "12+34<|im_end|>" is graded as it stands
    assert df[df["position"] == 10].iloc[0]["sampled_token_q"] == float(tok.convert_tokens_to_ids("6") % 2 == 0)
    continuations = engine.seen[1:]
    assert continuations and all(p[-1] != eos for prompts, _ in continuations for p in prompts)
    assert max(spec.max_tokens for _, spec in continuations) == 40 - 0 - 1  # node 0's remaining budget


class LateOracleEngine(OracleEngine):
    """As :class:`OracleEngine`, but a continuation prompt's first call always fails (Q = 0 for every candidate
    after round one); later calls with the same prompt succeed iff its last token is even, except from a node
    whose prefix ends with ``hopeless`` (a late node of a failing rollout: it never succeeds). ``fail=True``: every
    continuation fails."""

    def __init__(self, tokenizer, fail=False, hopeless=()):
        super().__init__(tokenizer)
        self.fail, self.hopeless, self.prompts_seen = fail, list(hopeless), set()

    def generate(self, prompts, spec):
        if self.calls == 0:
            return super().generate(prompts, spec)
        h = len(self.hopeless)
        fresh = [self.fail or (h and p[-1 - h : -1] == self.hopeless) or tuple(p) not in self.prompts_seen
                 for p in prompts]
        self.prompts_seen |= {tuple(p) for p in prompts}
        # the parent decides GOOD/BAD from the last token: make it odd (id 1) where the continuation must fail
        out = super().generate([p[:-1] + [1] if f else p for p, f in zip(prompts, fresh, strict=True)], spec)
        self.seen[-1] = (prompts, spec)
        return out


def _adaptive_cfg(tmp_path, *extra):
    from tests.conftest import compose

    return compose([*[t for t in TINY if not t.startswith(("rollout.", "eval.", "trainer.steps"))],
                    "rollout.engine=hf", f"cache_dir={tmp_path / 'cache'}", "logger.progress=false",
                    "+diagnose=default", "diagnose.n_questions=2", "diagnose.rollouts_per_question=1",
                    "diagnose.every_k=5", "diagnose.max_nodes=3", "diagnose.continuations=2",
                    "diagnose.teachers={teacher: {model: teacher}}", "diagnose.losses=[full_rkl]",
                    f"diagnose.out_dir={tmp_path / 'out'}", *extra])


def _run_adaptive(monkeypatch, tmp_path, cfg, fail=False, hopeless_from=None):
    import opd_lab.run.components
    import opd_lab.tasks
    from opd_lab import diagnose
    from opd_lab.models.loading import load_tokenizer, resolve_paths

    tok = load_tokenizer(resolve_paths(cfg).tokenizer)
    resp = tok(OracleEngine.ROLLOUT, add_special_tokens=False)["input_ids"]
    engine = LateOracleEngine(tok, fail=fail, hopeless=resp[:hopeless_from] if hopeless_from else ())
    monkeypatch.setattr(opd_lab.run.components, "make_engine", lambda *a, **k: engine)
    monkeypatch.setattr(opd_lab.tasks, "grade", lambda text, problem: text.removesuffix("<|im_end|>").endswith("GOOD"))
    return diagnose.run(cfg, tmp_path / "run"), engine, tok


def test_adaptive_q_resamples_all_zero_nodes_until_some_q_differs(monkeypatch, tmp_path):
    """Round one gives Q = 0 everywhere (g* = 0); round two's new samples succeed for even tokens, so the nodes at
    t = 0, 5 (candidates of both parities) become defined at 2M per candidate; the hopeless node t = 10 keeps
    all-equal Q and stops at the cap. Later rounds are new seeds; no count exceeds max_continuations."""
    cfg = _adaptive_cfg(tmp_path, "diagnose.max_continuations=8")
    df, engine, tok = _run_adaptive(monkeypatch, tmp_path, cfg, hopeless_from=10)
    df = df[df["teacher"] == "teacher"]
    assert len(df) == 2 * 3 and sorted(set(df["position"])) == [0, 5, 10]
    assert (df["continuations"] > 2).all() and (df["continuations"] <= 8).all()  # every node was resampled
    defined, undefined = df[df["defined"]], df[~df["defined"]]
    assert set(defined["position"]) == {0, 5} and set(undefined["position"]) == {10}
    # defined after round two: Q(v) = (0·2 + 1[v even]·2) / 4
    assert (defined["continuations"] == 4).all() and (defined["rounds"] == 2).all()
    assert (defined["q_min"] == 0.0).all() and (defined["q_max"] == 0.5).all()
    assert defined["alignment"].notna().all()
    assert defined["q_se_max"].tolist() == pytest.approx([(0.25 / 4) ** 0.5] * 4)  # SE √(Q(1−Q)/n), n = 4
    # rounds 2, 4, 8: all-equal Q up to the cap, still undefined and counted
    assert (undefined["continuations"] == 8).all() and (undefined["rounds"] == 3).all()
    assert undefined["alignment"].isna().all() and (undefined["q_min"] == undefined["q_max"]).all()
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index(["teacher", "rollouts"])
    assert summary.loc[("teacher", "all"), "undefined"] == len(undefined) == 2
    (p1, s1), (p2, s2), (p3, s3) = engine.seen[1:]  # one engine call per round (chunk = 256)
    assert (s1.n, s2.n, s3.n) == (2, 2, 4)  # per candidate: 2, +2 → 4, +4 → 8
    assert p2 == p1 and set(map(tuple, p3)) < set(map(tuple, p1))  # round two: every node; three: the undefined
    assert len({s1.seed, s2.seed, s3.seed}) == 3 and s1.seed == 0  # round one as before; later rounds new samples
    assert (tmp_path / "out" / "matched.csv").stat().st_size > 0


def test_adaptive_q_always_failing_node_stays_undefined_at_the_cap(monkeypatch, tmp_path):
    """A stub where every continuation fails: every node (rest=share: the rest estimate included) is resampled
    2 → 4 → 7 (the last round clipped to the cap), stays undefined, and is counted in the summary."""
    cfg = _adaptive_cfg(tmp_path, "diagnose.max_continuations=7", "diagnose.rest=share")
    df, engine, tok = _run_adaptive(monkeypatch, tmp_path, cfg, fail=True)
    df = df[df["teacher"] == "teacher"]
    assert len(df) == 2 * 3
    assert (df["continuations"] == 7).all() and (df["rounds"] == 3).all()
    assert (~df["defined"]).all() and df["alignment"].isna().all()
    assert (df["q_max"] == 0).all() and (df["q_rest"] == 0).all() and (df["q_se_max"] == 0).all()
    assert [spec.n for _, spec in engine.seen[1:]] == [1, 2, 1, 2, 1, 3]  # rest (1 per token), then candidates
    # 7 samples per candidate and 7 rest tokens per node, except those that end the response (graded, not continued)
    n_cands = df.groupby(["question", "position"])["n_candidates"].first()
    assert sum(len(p) * spec.n for p, spec in engine.seen[1:]) == 7 * int((n_cands + 1).sum())
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index(["teacher", "rollouts"])
    assert summary.loc[("teacher", "all"), "undefined"] == len(df)
    assert summary.loc[("teacher", "all"), "undefined_frac"] == 1.0
    assert "(100.0%)" in (tmp_path / "out" / "summary.md").read_text()


def test_cap_equal_to_m_is_one_round_as_before(monkeypatch, tmp_path):
    """max_continuations = continuations: exactly the historical engine calls (n = M per candidate, seeds
    seed·1_000_003 + chunk start, diagnose.chunk prompts per call) and no further round, even where Q is all 0."""
    cfg = _adaptive_cfg(tmp_path, "diagnose.max_continuations=2", "diagnose.chunk=5", "diagnose.seed=3")
    df, engine, tok = _run_adaptive(monkeypatch, tmp_path, cfg)
    df = df[df["teacher"] == "teacher"]
    calls = engine.seen[1:]
    n_jobs = int(df["n_candidates"].sum())  # no EOS candidate here: every candidate is continued
    assert [len(p) for p, _ in calls] == [min(5, n_jobs - s) for s in range(0, n_jobs, 5)]
    assert [spec.seed for _, spec in calls] == [3 * 1_000_003 + s for s in range(0, n_jobs, 5)]
    assert all(spec.n == 2 for _, spec in calls)
    assert (df["continuations"] == 2).all() and (df["rounds"] == 1).all()
    assert (df["q_max"] == 0).all() and (~df["defined"]).all()  # round one fails everywhere: not resampled
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index(["teacher", "rollouts"])
    assert summary.loc[("teacher", "all"), "undefined"] == len(df)


def test_max_continuations_below_m_is_rejected():
    from opd_lab.config import ConfigError, DiagnoseConfig

    with pytest.raises(ConfigError, match=r"diagnose.max_continuations=4 is invalid: allowed an integer >= "):
        DiagnoseConfig(continuations=8, max_continuations=4)
    assert DiagnoseConfig().max_continuations == 64


@pytest.mark.slow
def test_diagnose_cli_on_tiny_models(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "opd_lab.diagnose", *TINY, f"cache_dir={tmp_path / 'cache'}",
                           "diagnose.n_questions=2", "diagnose.continuations=2", "diagnose.max_nodes=2",
                           "diagnose.every_k=4", "diagnose.rest=share", "diagnose.node_mode=top_entropy",
                           f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "continuations" in proc.stdout  # the cost estimate is printed before the work
    for noise in ("Triton", "FutureWarning", "cpu_worker.py", "[W"):  # a quiet console: engine lines in the log only
        assert noise not in proc.stdout + proc.stderr, noise
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
