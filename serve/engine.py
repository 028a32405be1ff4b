"""The engine seam: the narrow interface the server needs from an inference engine.

`Engine` is what the servicer depends on: tokenize/render, generate (streaming deltas),
abort, health, and a weight-swap entry point. `VllmEngine` implements it on vLLM's
`AsyncLLM`. Nothing else in serve/ imports vLLM.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidArgument

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


@dataclass(frozen=True)
class Lease:
    """The version one request runs on, held from admission until its last token."""

    version: str
    adapter: Any = None  # engine-specific adapter handle (vLLM LoRARequest) or None


class VersionNotLoaded(Exception):
    """A request pinned a version this replica does not hold (maps to FAILED_PRECONDITION)."""


class Engine(abc.ABC):
    """What the server needs from an inference engine.

    Versions: the engine holds one set of full weights (`weights_version`) and, where
    adapters are supported, LoRA adapters on top of them. `version` is what new
    unpinned requests get. A request takes a `lease` first; the lease fixes the version
    it runs on, so the version a response names is the one whose weights produced it.
    """

    base_model: str
    version: str
    weights_version: str
    loaded_at: float
    max_model_len: int
    supports_adapters: bool

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, as the model will see it (BOS included)."""

    @abc.abstractmethod
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """A conversation rendered as prompt text, ending with an open assistant turn."""

    @abc.abstractmethod
    def leases(self, pins: Sequence[str | None]) -> AbstractAsyncContextManager[list[Lease]]:
        """Admit one request's engine calls, each on its pin (None: the current version),
        all at once; waits out a full swap."""

    @abc.abstractmethod
    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        spec: SamplingSpec,
        lease: Lease,
        stream: bool = True,
    ) -> AsyncIterator[list[SampleDelta]]:
        """Deltas for the n samples until every sample has finished; with stream=False,
        each sample arrives whole, once (no per-token work for unary calls)."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise EngineError when the engine cannot serve."""

    @abc.abstractmethod
    async def swap_full(self, weights_dir: str, version: str) -> dict[str, float]:
        """Replace the full weights in place: new requests wait, in-flight ones finish on
        the old weights, then the reload, then the new version serves. Returns the
        seconds of its parts: {"drain": ..., "load": ...}."""

    @abc.abstractmethod
    async def load_adapter(self, adapter_dir: str, version: str) -> None:
        """Load a LoRA adapter for the current full weights, without serving it yet."""

    @abc.abstractmethod
    async def set_current(self, version: str) -> None:
        """Serve a loaded version (the full weights or an adapter) to unpinned requests."""

    @abc.abstractmethod
    def loaded_versions(self) -> list[str]: ...

    @abc.abstractmethod
    def num_unfinished_requests(self) -> int: ...

    @abc.abstractmethod
    def shutdown(self) -> None: ...


def lora_unsupported(model_dir: str) -> str | None:
    """Why vLLM cannot serve LoRA adapters on this model (its architecture's vLLM class
    lacks LoRA support: GPT-2 in vLLM 0.32), or None when it can. vLLM itself says so only
    from inside its engine process, as the cause of a failed start."""
    import json

    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora

    config = json.loads((Path(model_dir) / "config.json").read_text())
    for arch in config.get("architectures") or []:
        if arch in ModelRegistry.models:
            if supports_lora(ModelRegistry.models[arch].load_model_cls()):
                return None
            return f"vLLM has no LoRA support for {arch}"
    return None  # unknown here: vLLM decides at start


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """The conversation through the tokenizer's chat template, as prompt text that
    encode() turns into what the model saw in training. Templates of Llama 3, Mistral
    and Gemma write BOS themselves, and their tokenizers add it to every text too: the
    template's BOS is left out here, or the model would see two (everything downstream,
    the learner included, encodes the logged prompt text with the tokenizer's own BOS)."""
    if not getattr(tokenizer, "chat_template", None):
        return _render_plain(messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer.encode("")[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


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
    """vLLM AsyncLLM behind the Engine interface.

    Full-weight swaps follow the recipe verified on vLLM (pause with in-flight requests
    finishing, reload_weights in place, resume), behind a writer-preferring gate so no
    request is admitted under one version and run on another. LoRA versions are loaded
    with add_lora under a never-reused id; switching to one is a pointer move, and
    in-flight requests finish on the adapter they started with.
    """

    def __init__(
        self,
        model: str,
        version: str = "v0",
        max_model_len: int = 0,
        kv_cache_gib: int = 1,
        dtype: str = "auto",
        max_num_seqs: int = 256,
        enforce_eager: bool = True,
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        max_loras: int = 4,
        drain_timeout_s: float = 30.0,
    ):
        # vLLM reads these at import/engine start; set them before importing it.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        if dtype == "auto" and current_platform.is_cpu():
            # vllm-cpu 0.32 kills its worker (SIGILL) running bf16 on AMX CPUs: always with
            # LoRA, now and then without (the first request of a fresh server, seen in 6 of
            # 12 starts of `instructloop up` on one machine; 0 of 3 in float32).
            dtype = "float32"
            log.info("CPU engine: using float32 weights (dtype auto)")
        args = AsyncEngineArgs(
            model=model,
            dtype=dtype,
            max_model_len=max_model_len or None,
            max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager,
            disable_log_stats=True,
            enable_lora=enable_lora,
            max_lora_rank=max_lora_rank,
            max_loras=max_loras,
        )
        t0 = time.monotonic()
        self._llm = AsyncLLM.from_engine_args(args)
        self._tokenizer = self._llm.get_tokenizer()
        self.base_model = model
        self.version = self.weights_version = version
        self.loaded_at = time.time()
        self.max_model_len = self._llm.model_config.max_model_len
        self.supports_adapters = enable_lora
        self._max_loras = max_loras
        self._weights_dir = model
        self._adapters: dict[str, Any] = {}  # version -> LoRARequest, oldest first
        self._lora_ids = itertools.count(1)  # vLLM adapter ids are never reused
        self._in_use: collections.Counter[str] = collections.Counter()
        self.keep: set[str] = set()  # versions eviction must spare (e.g. the canary)
        self._gate = asyncio.Condition()
        self._swapping = False
        self.drain_timeout_s = drain_timeout_s
        self._holders: dict[asyncio.Task, int] = {}  # tasks holding leases -> lease count
        self._revoked: dict[asyncio.Task, str] = {}  # tasks a swap ended -> why
        log.info("vLLM engine ready in %.1fs (model %s)", time.monotonic() - t0, model)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return render_chat(self._tokenizer, messages)

    # ---- admission --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def leases(self, pins: Sequence[str | None]) -> AsyncIterator[list[Lease]]:
        # All leases are taken under one hold of the gate: taking them one by one could
        # deadlock against a full swap that waits for the first to be released.
        task = asyncio.current_task()
        async with self._gate:
            await self._gate.wait_for(lambda: not self._swapping)
            leases = [self._resolve(pin or self.version) for pin in pins]
            for lease in leases:
                self._in_use[lease.version] += 1
            self._holders[task] = self._holders.get(task, 0) + 1
        try:
            yield leases
        finally:
            async with self._gate:
                for lease in leases:
                    self._in_use[lease.version] -= 1
                self._holders[task] -= 1
                if not self._holders[task]:
                    del self._holders[task]
                self._gate.notify_all()

    def _resolve(self, version: str) -> Lease:
        if version == self.weights_version:
            return Lease(version)
        if version in self._adapters:
            return Lease(version, self._adapters[version])
        raise VersionNotLoaded(
            f"version {version} is not loaded on this replica "
            f"(loaded: {', '.join(self.loaded_versions())})"
        )

    # ---- generation -------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        spec: SamplingSpec,
        lease: Lease,
        stream: bool = True,
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
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )
        prompt = {"prompt_token_ids": prompt_token_ids}
        try:
            async for out in self._llm.generate(
                prompt, params, request_id, lora_request=lease.adapter
            ):
                yield [
                    SampleDelta(
                        index=o.index,
                        text=o.text,
                        token_ids=o.token_ids,
                        logprobs=_logprobs(o, spec.logprobs) if spec.logprobs is not None else None,
                        finish_reason=o.finish_reason,
                    )
                    for o in out.outputs
                ]
        except asyncio.CancelledError:
            raise
        except Exception as e:
            from vllm.exceptions import VLLMClientError
            from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

            if isinstance(e, VLLMClientError):  # the engine's own request validation
                raise InvalidArgument(f"the engine refused the request: {e}") from e
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

    # ---- versions ---------------------------------------------------------------------

    async def swap_full(self, weights_dir: str, version: str) -> dict[str, float]:
        t0 = time.perf_counter()
        async with self._gate:
            await self._gate.wait_for(lambda: not self._swapping)
            self._swapping = True  # from here new requests wait
            try:
                await self._drain(version)
            except BaseException:
                self._swapping = False
                self._gate.notify_all()
                raise
        t1 = time.perf_counter()
        try:
            await self._llm.pause_generation(mode="wait")
            try:
                await self._reload(weights_dir)
            finally:
                await self._llm.resume_generation()
            for old in list(self._adapters):  # adapters belonged to the old weights
                await self._llm.remove_lora(self._adapters.pop(old).lora_int_id)
            self._weights_dir = weights_dir
            self.version = self.weights_version = version
            self.loaded_at = time.time()
        finally:
            async with self._gate:
                self._swapping = False
                self._gate.notify_all()
        return {"drain": t1 - t0, "load": time.perf_counter() - t1}

    async def _drain(self, version: str) -> None:
        """Wait (holding the gate's lock between waits) until no lease is held: at most
        drain_timeout_s, then end the requests still holding one (a stream whose client
        stopped reading holds its lease as long as its writes block)."""
        drained = lambda: sum(self._in_use.values()) == 0  # noqa: E731
        try:
            await asyncio.wait_for(self._gate.wait_for(drained), self.drain_timeout_s)
            return
        except TimeoutError:
            pass
        why = (
            f"this replica is swapping to {version}, and this request still held the old "
            f"version after the {self.drain_timeout_s:g}s drain deadline; retry it"
        )
        lagging = list(self._holders)
        # Reasons of tasks that ended some other way are not kept (the dict stays bounded).
        self._revoked = {t: w for t, w in self._revoked.items() if not t.done()}
        log.warning("swap to %s: ending %d request(s) after the drain deadline",
                    version, len(lagging))  # fmt: skip
        for task in lagging:
            self._revoked[task] = why
            task.cancel()
        await self._gate.wait_for(drained)

    def take_revoked(self, task: asyncio.Task) -> str | None:
        """Why a swap ended this task's request (cancelling it), or None if it did not."""
        return self._revoked.pop(task, None)

    async def _reload(self, weights_dir: str) -> None:
        try:
            await self._llm.collective_rpc("reload_weights", kwargs={"weights_path": weights_dir})
        except Exception as e:
            log.error("reload of %s failed (%s); restoring %s", weights_dir, e, self._weights_dir)
            await self._llm.collective_rpc(
                "reload_weights", kwargs={"weights_path": self._weights_dir}
            )
            raise EngineError(f"could not load weights from {weights_dir}: {e}") from e

    async def load_adapter(self, adapter_dir: str, version: str) -> None:
        if not self.supports_adapters:
            raise EngineError("this replica runs without LoRA (start it with --enable-lora)")
        if version in self._adapters:
            return
        from vllm.lora.request import LoRARequest

        lora_id = next(self._lora_ids)
        request = LoRARequest(f"{version}#{lora_id}", lora_id, adapter_dir)
        try:
            await self._llm.add_lora(request)
        except Exception as e:
            raise EngineError(f"could not load adapter {adapter_dir}: {e}") from e
        self._adapters[version] = request
        await self._evict()

    async def set_current(self, version: str) -> None:
        if version != self.weights_version and version not in self._adapters:
            raise VersionNotLoaded(f"version {version} is not loaded")
        self.version = version
        self.loaded_at = time.time()
        await self._evict()

    async def _evict(self) -> None:
        """Keep at most max_loras adapters; never the current one or one in use."""
        for version in list(self._adapters):
            if len(self._adapters) <= self._max_loras:
                return
            if version != self.version and version not in self.keep and not self._in_use[version]:
                await self._llm.remove_lora(self._adapters.pop(version).lora_int_id)

    def loaded_versions(self) -> list[str]:
        return [self.weights_version, *self._adapters]

    def num_unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    def shutdown(self) -> None:
        self._llm.shutdown()
