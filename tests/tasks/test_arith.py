import random
import statistics

from opd_lab.tasks import reference_response
from opd_lab.tasks.arith import ArithmeticTask, extract_boxed, grade_exact, worked_solution


def test_worked_solution_is_correct_column_addition():
    sol = worked_solution([4821, 307], width=5)
    assert sol.splitlines() == ["04821+00307", "1+7+0=08", "2+0+0=02", "8+3+0=11", "4+0+1=05", "0+0+0=00",
                                "=05128"]


def test_splits_are_seeded_and_disjoint():
    a, b = ArithmeticTask(), ArithmeticTask()
    assert [p.question for p in a.eval_problems()] == [p.question for p in b.eval_problems()]
    held = {p.question for p in a.eval_problems()}
    train = a.train_problems(3000, random.Random(0))
    assert not held & {p.question for p in train}
    assert [p.question for p in a.train_problems(5, random.Random(7))] == \
        [p.question for p in b.train_problems(5, random.Random(7))]
    for p in train[:200]:
        assert int(p.answer) == sum(int(x) for x in p.question.split("+"))
        assert p.solution.splitlines()[-1] == f"={int(p.answer):0{a.width}d}"


def test_response_lengths_in_range(tokenizer):
    task = ArithmeticTask()
    lens = [len(tokenizer(reference_response(p) + "<|im_end|>")["input_ids"])
            for p in task.train_problems(300, random.Random(1))]
    assert 100 <= min(lens) and max(lens) <= 300 and 150 <= statistics.mean(lens) <= 220


def test_grader():
    assert grade_exact("...\n</think>\n\\boxed{123}<|im_end|>", "123")
    assert not grade_exact("\\boxed{0123}", "123")
    assert grade_exact("\\boxed{1} then \\boxed{123}", "123")  # the last box counts
    assert extract_boxed("no box") is None


def test_tokenizer_roundtrip_and_specials(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    text = "<|im_start|>user\n12+3<|im_end|>\n<|im_start|>assistant\n<think>\n1+2\n</think>\n\\boxed{15}<|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    for s in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert len(tokenizer(s)["input_ids"]) == 1
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids and again.eos_token == "<|im_end|>"
    prompt = again.apply_chat_template([{"role": "user", "content": "1+2"}], tokenize=False,
                                       add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n1+2<|im_end|>\n<|im_start|>assistant\n"


def test_long_task_responses_are_500_to_900_tokens(tokenizer):
    """task=arith_long (9–13 operands of 2–3 digits, width 5 like the default): 8–12 pair blocks per response."""
    from tests.conftest import compose

    cfg = compose(["experiment=long"])
    t = cfg.task
    task = ArithmeticTask(t.min_operands, t.max_operands, t.min_digits, t.max_digits, t.n_eval, t.eval_seed)
    assert task.width == ArithmeticTask().width == 5 and len(task.eval_problems()) == 256
    lens = [len(tokenizer(reference_response(p) + "<|im_end|>")["input_ids"])
            for p in task.train_problems(300, random.Random(1))]
    assert 500 <= min(lens) and max(lens) <= 850 < cfg.rollout.max_tokens and 600 <= statistics.mean(lens) <= 700
