"""TRL's DistillationTrainer on the embedded models: the reference side of ``scripts/bench_step.py``.

Runs in the separate TRL environment (``bash scripts/setup_trl_env.sh`` → ``.venv-trl``; TRL is never a
dependency of opd-lab):

    .venv-trl/bin/python scripts/bench_trl.py --student S --teacher T --prompts prompts.json --steps 9 --out r.json

On-policy generalized-JSD distillation with β = 1 (reverse KL), HF ``generate`` for the student's completions,
``--batch`` prompts per step, one AdamW update per step, float32 on the CPU (no gradient checkpointing: nothing to
save at this size). Writes, per step, the seconds (from the step's start to its end, generation included) and
the completion tokens trained (TRL's ``completions/mean_length`` × batch).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--prompts", required=True, help="a JSON list of user messages")
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    torch.set_num_threads(args.threads)
    messages = json.load(open(args.prompts))
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": m}]} for m in messages])
    tok = AutoTokenizer.from_pretrained(args.student, padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    cfg = DistillationConfig(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "trl_out"), use_cpu=True, bf16=False,
        gradient_checkpointing=False, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, beta=1.0, logging_steps=1, report_to=[], save_strategy="no",
        shuffle_dataset=False, seed=0, disable_tqdm=True, dataloader_num_workers=0)

    steps: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            steps.append({"seconds": time.perf_counter() - self.t0})

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs and steps:
                steps[-1]["tokens"] = logs["completions/mean_length"] * args.batch

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=data,
                                  processing_class=tok, callbacks=[Timer()])
    trainer.train()
    json.dump({"steps": steps, "trl": __import__("trl").__version__}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
