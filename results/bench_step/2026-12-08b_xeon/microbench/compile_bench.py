"""Eager vs torch.compile (inductor, dynamic shapes) of the teacher's no-grad forward and of the student's
forward+backward, on real rollouts of the embedded pair (the shapes of the step benchmark), 2 threads."""
import random, time, statistics, sys
import torch
from pathlib import Path
from opd_lab.learner.heads import Policy, response_hidden
from opd_lab.models.loading import load_model, load_tokenizer
from opd_lab.models.token_ids import stop_token_ids
from opd_lab.rollout.base import SamplingSpec
from opd_lab.rollout.static import StaticEngine
from opd_lab.tasks import encode_prompts
from opd_lab.tasks.arith import ArithmeticTask
torch.set_num_threads(2)
root = Path("opd_lab/assets/embedded")
tok = load_tokenizer(str(root / "student"))
student = load_model(str(root / "student"), "float32", "cpu", trainable=True)
teacher = load_model(str(root / "teacher"), "float32", "cpu", trainable=False)
engine = StaticEngine(student, tok, stop_token_ids(tok, str(root / "student")))
with torch.no_grad():
    batches = [engine.generate(encode_prompts(tok, ArithmeticTask().train_problems(8, random.Random(s))),
                               SamplingSpec(4, 1.0, 1.0, 256, s)) for s in range(4)]
print("widths", [b.response_mask_B_T.shape[1] for b in batches])
which, mode = sys.argv[1], sys.argv[2]
if which == "teacher":
    if mode == "compiled":
        teacher.model = torch.compile(teacher.model, dynamic=True)
    run = lambda b: response_hidden(teacher, b)
    ctx = torch.no_grad
else:
    if mode == "compiled":
        student.model = torch.compile(student.model, dynamic=True)
    pol = Policy(student)
    def run(b):
        lse, z = pol(b, b.response_ids_B_T.unsqueeze(-1), 1.0, 1024, "chunked", False)
        ((z[..., 0] - lse) * b.response_mask_B_T).sum().backward()
    import contextlib; ctx = contextlib.nullcontext
t0 = time.perf_counter()
with ctx():
    for b in batches:
        run(b)
print(which, mode, "first calls %.1f s" % (time.perf_counter() - t0))
times = []
with ctx():
    for _ in range(5):
        for b in batches:
            t = time.perf_counter(); run(b); times.append(time.perf_counter() - t)
print(which, mode, "median %.4f s  min %.4f" % (statistics.median(times), min(times)))
