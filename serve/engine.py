"""The engine seam: the narrow interface the server needs from an inference engine.

`Engine` is what the servicer depends on: tokenize/render, generate (streaming deltas),
abort, health, and a weight-swap entry point. `VllmEngine` implements it on vLLM's
`AsyncLLM`. Nothing else in serve/ imports vLLM.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingSpec:
    """Validated sampling parameters for one request (n samples)."""

    n: int = 1
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class SampleDelta:
    """New output of one sample since its previous delta."""

    index: int
    text: str
    token_ids: Sequence[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" once the sample ends


class EngineError(Exception):
    """The engine failed or is unavailable (maps to UNAVAILABLE)."""


class Engine(abc.ABC):
    """What the server needs from an inference engine."""

    base_model: str
    version: str
    loaded_at: float
    max_model_len: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, as the model will see it (BOS included)."""

    @abc.abstractmethod
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """A conversation rendered as prompt text, ending with an open assistant turn."""

    @abc.abstractmethod
    def generate(
        self, request_id: str, prompt_token_ids: list[int], spec: SamplingSpec
    ) -> AsyncIterator[list[SampleDelta]]:
        """Stream deltas for the n samples until every sample has finished."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise EngineError when the engine cannot serve."""

    @abc.abstractmethod
    async def swap_weights(self, weights_dir: str, version: str) -> None:
        """Replace the served weights in place; in-flight requests finish first."""

    @abc.abstractmethod
    def num_unfinished_requests(self) -> int: ...

    @abc.abstractmethod
    def shutdown(self) -> None: ...


def _render_plain(messages: list[dict[str, str]]) -> str:
    """Fallback for tokenizers without a chat template."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def _logprobs(output, k: int) -> list[TokenLogprob]:
    """vLLM's per-token {token_id: Logprob} maps -> the sampled token and its top k."""
    result = []
    for token_id, alternatives in zip(output.token_ids, output.logprobs or [], strict=False):
        chosen = alternatives[token_id]
        top = [(tid, lp) for tid, lp in alternatives.items() if lp.rank and lp.rank <= k]
        top.sort(key=lambda kv: kv[1].rank)
        result.append(
            TokenLogprob(
                token_id=token_id,
                token=chosen.decoded_token or "",
                logprob=chosen.logprob,
                top=[(tid, lp.decoded_token or "", lp.logprob) for tid, lp in top],
            )
        )
    return result


class VllmEngine(Engine):
    """vLLM AsyncLLM behind the Engine interface."""

    def __init__(
        self,
        model: str,
        version: str = "v0",
        max_model_len: int = 0,
        kv_cache_gib: int = 1,
        dtype: str = "auto",
        max_num_seqs: int = 256,
        enforce_eager: bool = True,
    ):
        # vLLM reads these at import/engine start; set them before importing it.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=model,
            dtype=dtype,
            max_model_len=max_model_len or None,
            max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager,
            disable_log_stats=True,
        )
        t0 = time.monotonic()
        self._llm = AsyncLLM.from_engine_args(args)
        self._tokenizer = self._llm.get_tokenizer()
        self.base_model = model
        self.version = version
        self.loaded_at = time.time()
        self.max_model_len = self._llm.model_config.max_model_len
        log.info("vLLM engine ready in %.1fs (model %s)", time.monotonic() - t0, model)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if getattr(self._tokenizer, "chat_template", None):
            return self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return _render_plain(messages)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], spec: SamplingSpec
    ) -> AsyncIterator[list[SampleDelta]]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=spec.n,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k if spec.top_k > 0 else -1,
            seed=spec.seed,
            stop=list(spec.stop) or None,
            logprobs=spec.logprobs,
            output_kind=RequestOutputKind.DELTA,
        )
        prompt = {"prompt_token_ids": prompt_token_ids}
        try:
            async for out in self._llm.generate(prompt, params, request_id):
                deltas = [
                    SampleDelta(
                        index=o.index,
                        text=o.text,
                        token_ids=o.token_ids,
                        logprobs=_logprobs(o, spec.logprobs) if spec.logprobs is not None else None,
                        finish_reason=o.finish_reason,
                    )
                    for o in out.outputs
                ]
                yield deltas
        except asyncio.CancelledError:
            raise
        except Exception as e:
            from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

            if isinstance(e, EngineDeadError | EngineGenerateError):
                raise EngineError(f"engine failed: {e.__class__.__name__}: {e}") from e
            raise

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def check_health(self) -> None:
        try:
            await self._llm.check_health()
        except Exception as e:
            raise EngineError(f"engine unhealthy: {e}") from e

    async def swap_weights(self, weights_dir: str, version: str) -> None:
        """Verified recipe on vLLM: pause (in-flight requests finish), reload, resume."""
        await self._llm.pause_generation(mode="wait")
        try:
            await self._llm.collective_rpc("reload_weights", kwargs={"weights_path": weights_dir})
            self.version = version
            self.loaded_at = time.time()
        finally:
            await self._llm.resume_generation()

    def num_unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    def shutdown(self) -> None:
        self._llm.shutdown()
