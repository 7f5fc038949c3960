"""Multi-teacher OPD through the config and the real CLI on tiny models: bad input stops at start-up naming the
field; one entry in model.teachers is bit-identical to model.teacher; every routing rule trains with either loss
and logs its per-teacher metrics; specialists are built on their slice of the task."""

import json
import math
from pathlib import Path

import pytest

from opd_lab.config import ConfigError
from tests.conftest import compose
from tests.test_e2e import TINY, run_cli

TWO = "++model.teachers={a: {model: embedded}, b: {model: embedded, train_slice: {min_operands: 3}, weight: 2.0}}"


@pytest.mark.parametrize("overrides,field", [
    (["routing=per_sample", TWO, "++routing.by_tag={ops2: a, ops3: nobody}"], "routing.by_tag.ops3"),
    (["routing=per_sample", TWO, "routing.default=zed"], "routing.default"),
    (["routing=per_sample", TWO], "routing.by_tag"),
    (["routing=mixture", "++model.teachers={a: {model: embedded, weight: 0.0}, b: {model: embedded, weight: 0.0}}"],
     "model.teachers.*.weight"),
    (["routing=mixture", "++model.teachers={a: {model: embedded, weight: -1.0}}"], "model.teachers.a.weight"),
    (["routing=mixture", "++model.teachers={a: {model: embedded, weight: inf}, b: {model: embedded}}"],
     "model.teachers.a.weight"),
    (["routing=single", TWO], "routing.rule"),
    (["routing=mixture", "loss=lsm", "rollout.teacher_scorer=vllm", TWO], "rollout.teacher_scorer"),
    (["routing=max_confidence", "routing.confidence=entropy", TWO,
      "model.teachers.a.scorer=vllm"], "model.teachers.a.scorer"),
    (["routing=alignment", TWO, "model.teachers.b.scorer=server", "model.teachers.b.server_url=http://x:1"],
     "model.teachers.b.scorer"),
    (["routing=mixture", "++model.teachers={a: {model: /some/model, train_slice: {max_digits: 1}}}"],
     "model.teachers.a.train_slice"),
    (["routing=mixture", "++model.teachers={a: {model: embedded, scorer: nope}}"], "model.teachers.a.scorer"),
    (["routing=mixture", "++model.teachers={a: {model: embedded}, b: {model: embedded, train_slice: {max_digits: 1}}}"],
     "model.teachers.b.train_slice"),
])
def test_bad_multi_teacher_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    assert field in str(e.value), str(e.value)


def test_a_misspelt_teacher_field_fails_at_composition():
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with pytest.raises((HydraException, OmegaConfBaseException)):
        compose(["routing=mixture", "++model.teachers={a: {modle: embedded}}"])


def test_a_teacher_with_another_vocabulary_stops_start_up(tmp_path, tokenizer):
    """The shared-vocabulary check runs for every teacher, before any weights load, naming its field."""
    from opd_lab.common.distributed import SINGLE
    from opd_lab.run.components import prepare

    other = tmp_path / "other"
    tok = __import__("copy").deepcopy(tokenizer)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    cfg = compose([*TINY, f"cache_dir={tmp_path / 'cache'}", "routing=mixture",
                   f"++model.teachers={{a: {{model: embedded}}, b: {{model: {other}}}}}"])
    with pytest.raises(ConfigError, match="model.teachers.b.model.*vocabulary"):
        prepare(cfg, SINGLE)


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s", "learner/tokens_per_s",
                                                              "score/tokens_per_s", "rollout/tokens_per_s",
                                                              "rollout/seconds", "memory/"))} for r in rows]


@pytest.mark.slow
def test_one_entry_of_model_teachers_is_bit_identical_to_model_teacher(tmp_path):
    cache = tmp_path / "cache"
    common = [*TINY, "rollout.engine=hf", f"cache_dir={cache}", "loss=lsm", "gate=block32"]
    run_cli([*common, f"hydra.run.dir={tmp_path / 'one'}"])
    run_cli([*common, f"hydra.run.dir={tmp_path / 'map'}", "++model.teachers={teacher: {model: embedded}}"])
    assert _metrics(tmp_path / "one") == _metrics(tmp_path / "map")
    assert (tmp_path / "one" / "eval.csv").read_text() == (tmp_path / "map" / "eval.csv").read_text()


RULES = [("per_sample", "lsm", ["++routing.by_tag={ops2: a, ops3: b}"]),
         ("mixture", "lsm", ["routing.mixture_space=prob"]),
         ("mixture", "sampled_token", []),
         ("min_kl", "lsm", []),
         ("min_kl", "sampled_token", []),
         ("max_confidence", "sampled_token", ["routing.confidence=entropy"]),
         ("alignment", "lsm", ["routing.alignment.every=1", "routing.alignment.n_questions=1",
                               "routing.alignment.rollouts_per_question=1", "routing.alignment.max_nodes=2",
                               "routing.alignment.continuations=1", "routing.alignment.max_continuations=2",
                               "routing.alignment.every_k=4"])]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
@pytest.mark.parametrize("rule,loss,extra", RULES, ids=[f"{r}-{loss}" for r, loss, _ in RULES])
def test_every_rule_trains_and_logs_per_teacher_metrics(cache, tmp_path, rule, loss, extra):
    run_dir = tmp_path / "run"
    run_cli([*TINY, "task.max_operands=3", "rollout.engine=hf", f"cache_dir={cache}", f"loss={loss}",
             "gate=block32", f"routing={rule}", TWO, *extra, f"hydra.run.dir={run_dir}", "loss.top_k=8"
             if loss == "lsm" else "loss.clip_eps=0.2"])
    rows = [r for r in _metrics(run_dir) if "loss" in r]
    assert len(rows) == 2
    for r in rows:
        frac = [r[f"routing/frac/{n}"] for n in ("a", "b")]
        assert sum(frac) == pytest.approx(1.0)
        assert r["routing/entropy"] == pytest.approx(-sum(f * math.log(f) for f in frac if f > 0))
        assert all(f"teacher/{n}/minus_old_logp" in r for n in ("a", "b"))
        soft = rule in ("mixture", "alignment")
        assert any(f"teacher/{n}/loss" in r for n in ("a", "b")) != soft  # per-teacher loss: hard rules only
        if rule == "mixture":  # weights 1 : 2 at every token
            assert frac == pytest.approx([1 / 3, 2 / 3])
        # the shares on the rows of each tag present in the step's batch (2 prompts: one tag or both)
        tags = {k.split("/")[2] for k in r if k.startswith("routing/by_tag/")}
        assert tags and tags <= {"ops2", "ops3"}
        by_tag = {tag: [r[f"routing/by_tag/{tag}/frac/{n}"] for n in ("a", "b")] for tag in tags}
        assert all(sum(f) == pytest.approx(1.0) for f in by_tag.values())
        if rule == "per_sample":  # ops2 → a, ops3 → b
            assert all(f == ([1.0, 0.0] if tag == "ops2" else [0.0, 1.0]) for tag, f in by_tag.items())
    if rule == "alignment":  # refreshed every step: the logged weights are the ones the step's mixture used
        for r in rows:
            w = [r[f"routing/weight/{n}"] for n in ("a", "b")]
            assert sum(w) == pytest.approx(1.0) and [r[f"routing/frac/{n}"] for n in ("a", "b")] == pytest.approx(w)
            assert 0 <= r["routing/alignment_defined_frac"] <= 1
    table = (run_dir / "eval.csv").read_text()
    assert "teacher_a" in table and "teacher_b" in table and "trained_student" in table


def test_a_specialist_is_trained_on_its_slice_and_cached_apart(tmp_path):
    """An embedded teacher with a train slice is keyed (and built) apart from the generalist."""
    from opd_lab.models.loading import resolve_paths

    cfg = compose([*TINY, "task.max_operands=3", f"cache_dir={tmp_path}", TWO, "routing=mixture"])
    assert cfg.model.teachers["b"].train_slice.min_operands == 3
    paths = resolve_paths(cfg)
    assert paths.teachers["a"] == paths.teacher and paths.teachers["b"] != paths.teacher
    info = json.loads((Path(paths.teachers["b"]) / "prepare.json").read_text())
    assert info["task"]["min_operands"] == 3 and info["task"]["max_operands"] == 3


def test_build_script_builds_the_specialists_of_model_embedded_specialists(tmp_path):
    """scripts/build_embedded.py model=embedded_specialists --specialists --check composes (several teachers need a
    multi-teacher rule; the script supplies one) and trains each specialist; tiny models differ from the shipped
    ones, so --check reports the difference and exits 1, writing nothing."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    tiny = [o for o in TINY if o.startswith("model.prepare")]
    proc = subprocess.run([sys.executable, "scripts/build_embedded.py", "model=embedded_specialists", "--specialists",
                           "--check", *tiny], cwd=root, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert "teacher_ops3: key" in out and "teacher_ops4: key" in out, out[-3000:]
    assert proc.returncode == 1 and "teacher_ops4: DIFFERENT" in out, out[-3000:]


@pytest.mark.slow
def test_qwen3_multi_teacher_experiment_on_tiny_local_models(tmp_path):
    """experiment=qwen3_math_multi_teacher (math + general teacher, per-sample routing by the data source) trains
    end to end with the project's tiny models in place of the hub ids, on benchmark-layout fixtures."""
    from opd_lab.models.loading import resolve_paths
    from tests.tasks.test_math import write_fixtures

    cache = tmp_path / "cache"
    paths = resolve_paths(compose([*TINY, f"cache_dir={cache}"]))
    data = write_fixtures(tmp_path / "data")
    run_dir = tmp_path / "run"
    tiny = [t for t in TINY if not t.startswith(("task.", "model.prepare."))]
    run_cli([*tiny, "experiment=qwen3_math_multi_teacher", f"model.student={paths.student}",
             f"model.teacher={paths.teacher}", f"model.teachers.math.model={paths.teacher}",
             f"model.teachers.general.model={paths.student}", "model.dtype=float32", "trainer.device=cpu",
             "rollout.engine=hf", f"task.train.path={data['dapo']}", "task.train.question_field=prompt.0.content",
             "task.train.answer_field=reward_model.ground_truth", "task.eval.amc23.question_field=question",
             *[f"task.eval.{b}.path={data[b]}" for b in ("aime24", "aime25", "math500", "amc23")],
             f"cache_dir={cache}", f"hydra.run.dir={run_dir}"])
    rows = [r for r in _metrics(run_dir) if "loss" in r]
    assert len(rows) == 2
    assert all(r["routing/frac/math"] == 1.0 and r["routing/frac/general"] == 0.0 for r in rows)  # math_dapo → math
    table = (run_dir / "eval.csv").read_text()
    assert "teacher_math" in table and "teacher_general" in table


@pytest.mark.parametrize("by_tag,default,match", [
    ("{ops2: a, opz3: b}", None, "routing.by_tag.opz3"),
    ("{ops2: a}", None, "routing.by_tag has no teacher for the tags ops3"),
])
def test_per_sample_tags_are_checked_against_the_task_at_start_up(tmp_path, by_tag, default, match):
    from opd_lab.common.distributed import SINGLE
    from opd_lab.run.components import prepare

    cfg = compose([*TINY, "task.max_operands=3", f"cache_dir={tmp_path}", TWO, "routing=per_sample",
                   f"++routing.by_tag={by_tag}"])
    with pytest.raises(ConfigError, match=match):
        prepare(cfg, SINGLE)
    prepare(compose([*TINY, "task.max_operands=3", f"cache_dir={tmp_path}", TWO, "routing=per_sample",
                     "++routing.by_tag={ops2: a}", "routing.default=b"]), SINGLE)  # a default covers the rest


def test_the_probe_set_is_held_out_from_training_and_evaluation():
    from opd_lab.tasks.arith import ArithmeticTask

    task = ArithmeticTask(min_operands=2, max_operands=2, min_digits=1, max_digits=1, n_eval=20)
    probe = task.probe_problems(5, seed=0)
    assert probe == task.probe_problems(5, seed=0) and len({p.question for p in probe}) == 5
    assert not {p.question for p in probe} & {p.question for p in task.eval_problems()}
    import random

    before = {p.question for p in task.train_problems(400, random.Random(1))}
    assert before & {p.question for p in probe}  # a small task: the probe questions are drawn in training…
    task.reserve(probe)
    after = {p.question for p in task.train_problems(400, random.Random(1))}
    assert not after & {p.question for p in probe}  # …until reserved


def test_alignment_weights_are_the_softmax_of_the_mean_defined_alignment(monkeypatch, tokenizer):
    """The refresh's aggregation: ā_i over defined nodes only, w = softmax(ā/τ); no defined node keeps w."""
    import torch

    from opd_lab.config import RoutingConfig
    from opd_lab.diagnostic import teacher_weights as TA
    from opd_lab.learner.teachers import Teachers
    from opd_lab.tasks.arith import ArithmeticTask

    rows = [{"teacher": "a", "alignment": 0.9, "defined": True}, {"teacher": "a", "alignment": 0.5, "defined": True},
            {"teacher": "a", "alignment": float("nan"), "defined": False},
            {"teacher": "b", "alignment": 0.1, "defined": True}, {"teacher": "b", "alignment": -0.9, "defined": False}]
    monkeypatch.setattr(TA, "sample_rollouts", lambda diag: None)
    monkeypatch.setattr(TA, "find_nodes", lambda diag, r: [])
    monkeypatch.setattr(TA, "estimate_q", lambda diag, probes: {})
    monkeypatch.setattr(TA, "score_alignment", lambda diag, probes, wins: [r for r in rows
                                                                          if r["teacher"] == diag.teachers[0].name])
    cfg = compose(["routing=alignment", "routing.alignment.temperature=0.5", TWO])
    t = Teachers(["a", "b"], [None, None], cfg.routing, models=[torch.nn.Linear(1, 1)] * 2)
    task = ArithmeticTask(n_eval=4)
    out = TA.alignment_weights(cfg, torch.nn.Linear(1, 1), None, tokenizer, task, (0,), t, step=0)
    want = torch.softmax(torch.tensor([0.7 / 0.5, 0.1 / 0.5], dtype=torch.float64), 0)
    assert torch.allclose(t.weights, want)
    assert out["routing/alignment/a"] == pytest.approx(0.7) and out["routing/alignment/b"] == pytest.approx(0.1)
    assert out["routing/alignment_defined_frac"] == pytest.approx(3 / 5)
    rows[:] = [{**r, "defined": False} for r in rows]
    TA.alignment_weights(cfg, torch.nn.Linear(1, 1), None, tokenizer, task, (0,), t, step=1)
    assert torch.allclose(t.weights, want)  # nothing defined: the weights stay
    assert TA.softmax_weights([0.2, float("nan")], 1.0).tolist() == [1.0, 0.0]
    assert RoutingConfig().rule == "single"


def test_alignment_weights_survive_a_checkpoint(tmp_path, tokenizer):
    import random

    import torch

    from opd_lab.core.optim import adamw_with_schedule
    from opd_lab.learner import checkpoint
    from tests.conftest import tiny_model

    cfg = compose(["routing=alignment", TWO])
    model = tiny_model(tokenizer, 32, 1)
    opt, sched = adamw_with_schedule(model.parameters(), 1e-3, (0.9, 0.99), 0.0, 1, 10, "cosine", 0.1)
    checkpoint.save(tmp_path, cfg, 3, model, tokenizer, opt, sched, random.Random(0).getstate(),
                    {"run": 0, "total": 0}, None, routing_weights=[0.25, 0.75])
    state = checkpoint.latest(tmp_path, cfg)
    assert state.step == 3 and state.routing_weights == [0.25, 0.75]
    assert torch.tensor(state.routing_weights).sum() == 1
