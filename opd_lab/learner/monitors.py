"""What the loop watches every step: non-finite updates (guard), collapse signals (truncation, repetition loops),
peak memory, and the step's rollout and timing metrics."""

from __future__ import annotations

import sys

import torch

from opd_lab.common.distributed import SINGLE, Dist
from opd_lab.rollout.base import RolloutBatch


class UpdateGuard:
    """Counts consecutive skipped (non-finite) updates across steps; aborts after ``max_bad`` in a row."""

    def __init__(self, max_bad: int) -> None:
        self.max_bad, self.run, self.total = max_bad, 0, 0

    def update(self, step: int, m: dict[str, float], warn: bool = True) -> int:
        """Count a step's skipped updates (saying so on stderr when ``warn``); returns the current run of bad
        updates."""
        skipped = int(m["guard/skipped_updates"])
        self.total += skipped
        self.run = self.run + skipped if skipped == m["updates"] else int(m["guard/trailing_bad_updates"])
        if skipped and warn:
            print(f"opd-lab: step {step}: skipped {skipped}/{int(m['updates'])} updates with a non-finite loss or "
                  f"gradient norm (loss={m['loss']}, grad_norm={m['grad_norm']}, "
                  f"teacher_minus_old_logp={m.get('teacher_minus_old_logp')}); {self.run} bad in a row",
                  file=sys.stderr, flush=True)
        return self.run

    def check(self, step: int, m: dict[str, float]) -> None:
        if self.run >= self.max_bad:
            raise FloatingPointError(
                f"aborting at step {step}: {self.run} consecutive optimizer updates had a non-finite loss or "
                f"gradient norm (trainer.max_bad_updates={self.max_bad}); last loss={m['loss']}, "
                f"grad_norm={m['grad_norm']}. Lower trainer.lr, check the teacher scores, or raise the limit.")


def repetition_B(response_ids_B_T: torch.Tensor, response_mask_B_T: torch.Tensor, n: int = 4) -> torch.Tensor:
    """Bool ``[B]``: a response whose distinct n-grams are under 20% of its n-grams (a degenerate loop)."""
    out = []
    for ids, m in zip(response_ids_B_T, response_mask_B_T.bool(), strict=True):
        toks = ids[m]
        if toks.numel() - n + 1 < 32:
            out.append(False)
            continue
        grams = toks.unfold(0, n, 1)  # [L−n+1, n], no Python tuples: responses run to thousands of tokens
        out.append(torch.unique(grams, dim=0).shape[0] < 0.2 * grams.shape[0])
    return torch.tensor(out, dtype=torch.bool)


def collapse_signals(metrics: dict[str, float], step: int, warn: bool = True) -> dict[str, float]:
    """Warnings worth a look: most responses at the length cap, or most stuck in a repetition loop."""
    rep, trunc = metrics["response/repetition_frac"], metrics["response/truncated_frac"]
    for name, frac in (("at the length cap", trunc), ("repeating themselves (distinct 4-grams < 20%)", rep)):
        if frac > 0.5 and warn:
            print(f"opd-lab: warning: step {step}: {frac:.0%} of responses are {name}: possible collapse",
                  file=sys.stderr, flush=True)
    return {"collapse/warning": float(trunc > 0.5 or rep > 0.5)}


def cuda_memory(model: torch.nn.Module) -> dict[str, float]:
    """Peak CUDA memory of this step on the model's device (GiB; allocated by tensors and reserved by the caching
    allocator), then the peak is reset; nothing on the CPU."""
    dev = next(model.parameters()).device
    if dev.type != "cuda":
        return {}
    out = {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated(dev) / 2**30,
           "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(dev) / 2**30}
    torch.cuda.reset_peak_memory_stats(dev)
    return out


def rollout_metrics(batch: RolloutBatch, dist: Dist = SINGLE) -> tuple[dict[str, float], float]:
    """Mean response and prompt lengths, the fractions of truncated and repetitive responses and the fraction of the
    batch's response slots that are right padding (work a padded forward spends on nothing), over all ranks; and
    the number of response tokens."""
    lengths = batch.response_mask_B_T.sum(-1).float()
    n_tok, n_trunc, n_rep, n_prompt, n_slots = dist.sum(
        lengths.sum(), batch.truncated_B.sum(), repetition_B(batch.response_ids_B_T, batch.response_mask_B_T).sum(),
        batch.attention_mask_B_L[:, : batch.prompt_len].sum(), batch.response_mask_B_T.numel())
    n_seq = batch.size * dist.world
    return {"response/mean_len": n_tok / n_seq, "response/truncated_frac": n_trunc / n_seq,
            "response/repetition_frac": n_rep / n_seq, "prompt/mean_len": n_prompt / n_seq,
            "response/padding_frac": 1.0 - n_tok / max(n_slots, 1.0)}, n_tok
