import random, time, statistics
import torch
from pathlib import Path
from opd_lab.learner.heads import Policy
from opd_lab.learner.scoring import length_groups
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
engine = StaticEngine(student, tok, stop_token_ids(tok, str(root / "student")))
with torch.no_grad():
    batch = engine.generate(encode_prompts(tok, ArithmeticTask().train_problems(8, random.Random(5)), ), SamplingSpec(4, 1.0, 1.0, 256, 0))
lens = batch.response_mask_B_T.sum(1)
print("T", batch.response_mask_B_T.shape[1], "mean", float(lens.float().mean()), "pad", 1 - float(lens.float().mean()) / batch.response_mask_B_T.shape[1])
pol = Policy(student)
def fb(b):
    ids = b.response_ids_B_T.unsqueeze(-1)
    lse, z = pol(b, ids, 1.0, 256, "chunked", False)
    ((z[..., 0] - lse) * b.response_mask_B_T).sum().backward()
def run(G, tokens):
    t = time.perf_counter()
    if G == 1:
        fb(batch)
    else:
        for idx in length_groups(batch, 64, tokens):
            fb(batch.select(idx, trim=True))
    return time.perf_counter() - t
cfgs = [(1, 0), (2, 4096), (4, 2048), (8, 1024)]
for c in cfgs: run(*c)
res = {c: [] for c in cfgs}
for _ in range(10):
    for c in cfgs:
        res[c].append(run(*c))
for c, v in res.items():
    print(c, "median %.4f" % statistics.median(v), "min %.4f" % min(v), "groups", len(length_groups(batch, 64, c[1])) if c[0] > 1 else 1)
