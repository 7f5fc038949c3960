"""Reference rollout engine: transformers ``generate`` on the learner's own module (no weight copy)."""

from __future__ import annotations

import time

import torch

from opd_lab.common.distributed import full_params
from opd_lab.models.token_ids import ends_with_stop
from opd_lab.rollout.base import BuildContext, RolloutBatch, SamplingSpec, assemble_batch, engine_state, pad_prompts


class HFEngine:
    """Samples with ``model.generate``; π_s is the processed (temperature + top-p) distribution.

    The engine holds a reference to the learner's module, so :meth:`sync_weights` has nothing to copy.
    Sampling is seeded per call from ``spec.seed`` (and ``spec.prompt_offset``) inside a forked RNG, leaving the
    global torch RNG as it was. ``sharded_root``: the FSDP2 root the module belongs to (torchrun,
    ``trainer.parallel=fsdp2``); its parameters are gathered while sampling and every rank keeps stepping until
    all are done (``synced_gpus``), since each forward all-gathers.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 256,
                 sharded_root: torch.nn.Module | None = None, stop_ids: tuple[int, ...] | None = None) -> None:
        self.model = model
        self.sharded_root = sharded_root
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stop_ids = tuple(stop_ids) if stop_ids is not None else (tokenizer.eos_token_id,)
        self.pad_id = tokenizer.pad_token_id

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> RolloutBatch:
        from transformers import GenerationConfig

        t0 = time.perf_counter()
        device = next(self.model.parameters()).device
        gen_cfg = GenerationConfig(
            do_sample=True,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=0,
            max_new_tokens=spec.max_tokens,
            eos_token_id=list(self.stop_ids),
            pad_token_id=self.pad_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        responses: list[list[int]] = []
        logps: list[list[float]] = []
        truncated: list[bool] = []
        was_training = self.model.training
        self.model.eval()
        rows = [p for p in prompts for _ in range(spec.n)]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), full_params(self.sharded_root):
            torch.manual_seed(spec.seed + 7919 * spec.prompt_offset)
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                ids, mask = pad_prompts(chunk, self.pad_id)
                out = self.model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg,
                    **({"synced_gpus": True} if self.sharded_root is not None else {}),
                )
                gen = out.sequences[:, ids.shape[1] :].cpu()
                scores = torch.stack(out.scores, dim=1).float().cpu()  # [b, T, V] processed logits
                lp = torch.log_softmax(scores, dim=-1).gather(-1, gen.unsqueeze(-1)).squeeze(-1)
                for i in range(gen.shape[0]):
                    toks = gen[i].tolist()
                    n_tok = next((t + 1 for t, tok in enumerate(toks) if tok in self.stop_ids), len(toks))
                    responses.append(toks[:n_tok])
                    logps.append(lp[i, :n_tok].tolist())
                    truncated.append(not ends_with_stop(toks[:n_tok], self.stop_ids))
        self.model.train(was_training)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=False)
        batch = assemble_batch(prompts, responses, logps, truncated, spec.n, self.pad_id, texts)
        dt = time.perf_counter() - t0
        n_tokens = int(batch.response_mask_B_T.sum())
        batch.stats = {"rollout/seconds": dt, "rollout/tokens_per_s": n_tokens / max(dt, 1e-9)}
        return batch

    def sync_weights(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> float:
        if model is not self.model:
            self.model.load_state_dict(engine_state(model, state_dict))
        return 0.0

    def close(self) -> None:
        pass


def build_engine(ctx: BuildContext) -> HFEngine:
    return HFEngine(ctx.model, ctx.tokenizer, sharded_root=ctx.sharded_root, stop_ids=ctx.stop_ids)
