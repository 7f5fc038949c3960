"""Would length-bucketing the teacher's no-grad forward pay? Time response_hidden on a real 32-row batch padded to
its longest row, against the same rows sorted by length in G buckets, each cut to its own longest response."""
import random, time, statistics
import torch
from opd_lab.learner.heads import response_hidden
from opd_lab.models.loading import load_model, load_tokenizer
from opd_lab.models.token_ids import stop_token_ids
from opd_lab.rollout.base import SamplingSpec, RolloutBatch
from opd_lab.rollout.static import StaticEngine
from opd_lab.tasks import encode_prompts
from opd_lab.tasks.arith import ArithmeticTask
from pathlib import Path
torch.set_num_threads(2)
root = Path("opd_lab/assets/embedded")
tok = load_tokenizer(str(root / "student"))
student = load_model(str(root / "student"), "float32", "cpu", trainable=False)
teacher = load_model(str(root / "teacher"), "float32", "cpu", trainable=False)
engine = StaticEngine(student, tok, stop_token_ids(tok, str(root / "student")))
batch = engine.generate(encode_prompts(tok, ArithmeticTask().train_problems(8, random.Random(3))),
                        SamplingSpec(4, 1.0, 1.0, 256, 0))
lens = batch.response_mask_B_T.sum(1)
print("rows", batch.size, "T", batch.response_mask_B_T.shape[1], "mean len", float(lens.float().mean()),
      "padding", 1 - float(lens.sum()) / lens.numel() / batch.response_mask_B_T.shape[1] * lens.numel() / batch.size)

def cut(b, idx):
    s = b.select(idx)
    T = int(s.response_mask_B_T.sum(1).max())
    P = s.prompt_len
    return RolloutBatch(s.input_ids_B_L[:, :P + T], s.attention_mask_B_L[:, :P + T], P, s.response_mask_B_T[:, :T],
                        s.sampler_logp_B_T[:, :T], s.truncated_B, s.prompt_index_B)

order = torch.argsort(lens)
def run(G):
    parts = [cut(batch, ix) for ix in order.chunk(G)] if G > 1 else [batch]
    t = time.perf_counter()
    with torch.no_grad():
        for p in parts:
            response_hidden(teacher, p)
    return time.perf_counter() - t
for G in (1, 2, 4, 8, 16):
    run(G)
res = {G: [] for G in (1, 2, 4, 8, 16)}
for _ in range(15):
    for G in (1, 2, 4, 8, 16):
        res[G].append(run(G))
for G, v in res.items():
    print(G, "median %.4f s" % statistics.median(v), "min %.4f" % min(v))
