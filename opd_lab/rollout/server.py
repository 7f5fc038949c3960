"""Teacher scoring by a running vLLM server (``rollout.teacher_scorer=server``).

The teacher is served once (``vllm serve <teacher> --max-logprobs K``, on other GPUs or another machine) and
any number of learners score against it. Each request is a batch of token-id prompts (prompt + response, no
padding) to the OpenAI-compatible ``/v1/completions`` endpoint with ``max_tokens=1`` and vLLM's
``prompt_logprobs=K``: the server returns, at every prompt position, the top-K log-probs and the actual token's,
the same numbers as the in-process vLLM scorer (temperature 1, teacher support; checked at start-up).
No client library is needed: the standard library's urllib speaks JSON over HTTP.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import torch

from opd_lab.core.teacher_scores import TeacherScores
from opd_lab.rollout.base import BuildContext, RolloutBatch, scores_from_prompt_logprobs, unpadded_sequences


class ServerTeacherScorer:
    """``__call__(batch, top_k, temperature)`` → :class:`TeacherScores` from a vLLM server at ``cfg.url``."""

    def __init__(self, cfg, retries: int = 3) -> None:
        self.url = cfg.url.rstrip("/")
        self.timeout, self.batch_size, self.retries = cfg.timeout_s, cfg.batch_size, retries
        key = os.environ.get(cfg.api_key_env)
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        self.model = cfg.model or self._first_model()

    def _request(self, path: str, payload: dict | None = None) -> dict:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers=self.headers,
                                     method="POST" if data is not None else "GET")
        for attempt in range(self.retries):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:  # the server answered: a bad request is not retried
                raise RuntimeError(f"teacher server {self.url}{path}: HTTP {e.code}: {e.read().decode()[:500]}") from e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.retries - 1:
                    raise ConnectionError(
                        f"teacher server {self.url} unreachable after {self.retries} tries ({e}); check "
                        "rollout.teacher_server.url and that `vllm serve` is up") from e
                time.sleep(2.0 * (attempt + 1))
        raise AssertionError("unreachable")

    def _first_model(self) -> str:
        return self._request("/v1/models")["data"][0]["id"]

    def __call__(self, batch: RolloutBatch, top_k: int, temperature: float,
                 query_ids_B_T_Q: torch.Tensor | None = None) -> TeacherScores:
        if temperature != 1.0 or query_ids_B_T_Q is not None:
            raise ValueError("the teacher server returns temperature-1 top-K log-probs only: use "
                             "rollout.teacher_scorer=hf for rollout.temperature != 1 or a student/union support")
        seqs = unpadded_sequences(batch)
        entries: list[list[dict[int, tuple[float, int]] | None]] = []
        for s in range(0, len(seqs), self.batch_size):
            chunk = seqs[s : s + self.batch_size]
            out = self._request("/v1/completions", {
                "model": self.model, "prompt": chunk, "max_tokens": 1, "temperature": 1.0,
                "prompt_logprobs": max(top_k, 1)})
            choices = sorted(out["choices"], key=lambda c: c["index"])
            if len(choices) != len(chunk):
                raise RuntimeError(f"teacher server returned {len(choices)} choices for {len(chunk)} prompts")
            for c in choices:
                entries.append([{int(tok): (v["logprob"], v["rank"]) for tok, v in pos.items()} if pos else None
                                for pos in c["prompt_logprobs"]])
        return scores_from_prompt_logprobs(batch, seqs, entries, top_k)

    def close(self) -> None:
        pass


def build_teacher_scorer(ctx: BuildContext) -> ServerTeacherScorer:
    return ServerTeacherScorer(ctx.cfg.rollout.teacher_server)
