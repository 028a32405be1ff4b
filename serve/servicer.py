"""The public gRPC service: proto <-> domain conversion and error mapping, nothing else.

Validation lives in validation.py, Redis in logstore.py and queue.py (the labeling
queue), the model behind engine.py. Every exception maps to a status code in one place,
`_STATUS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from instructloop.v1 import api_pb2, api_pb2_grpc, records_pb2

from . import arena, validation
from .auth import Authenticator
from .config import Limits
from .engine import Engine, EngineError, Lease, SampleDelta, VersionNotLoaded
from .errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .logstore import LogStore
from .metrics import Metrics
from .queue import LabelingQueue, TaskClosed, check_labeler_id
from .ratelimit import OverLimit, RateLimiter
from .versions import VersionFollower

log = logging.getLogger(__name__)
# One line per answered Generate, SubmitFeedback, NextTask and SkipTask call (--no-log-requests
# turns them off: this logger's level goes to WARNING).
requests_log = logging.getLogger("instructloop.serve.requests")

_STATUS = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    EngineError: grpc.StatusCode.UNAVAILABLE,
    VersionNotLoaded: grpc.StatusCode.FAILED_PRECONDITION,
    TaskClosed: grpc.StatusCode.FAILED_PRECONDITION,
}
# Calls that judge, or take work to judge: role labeler or admin, not suspended.
_JUDGING = {
    "SubmitFeedback": ("its feedback is not accepted", "feedback needs a labeler credential"),
    "NextTask": ("it may not take tasks", "labeling tasks need a labeler credential"),
    "SkipTask": ("it may not take tasks", "labeling tasks need a labeler credential"),
}
_FINISH = {
    "stop": api_pb2.FINISH_REASON_STOP,
    "length": api_pb2.FINISH_REASON_LENGTH,
    "abort": api_pb2.FINISH_REASON_ABORT,
}


def _rpc(method):
    """Map domain errors to gRPC statuses and record metrics. A request that a full swap
    ended after its drain deadline (the engine cancelled its task) gets UNAVAILABLE with
    the reason, not CANCELLED."""
    name = method.__name__

    async def fail(self, context, e: Exception):
        code = next((c for kind, c in _STATUS.items() if isinstance(e, kind)), None)
        if code is None:
            log.exception("internal error in %s", name)
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {e.__class__.__name__}"
        else:
            message = str(e)
        if isinstance(e, OverLimit):
            self.metrics.rate_limited.labels(e.kind).inc()
            context.set_trailing_metadata((("retry-after", f"{e.retry_after_s:.1f}"),))
        self.metrics.requests.labels(name, code.name).inc()
        log.info("rpc failed", extra={"method": name, "code": code.name, "error": message})
        await context.abort(code, message)

    def done(self, started: float, code: str = "OK"):
        self.metrics.requests.labels(name, code).inc()
        self.metrics.latency.labels(name).observe(time.perf_counter() - started)

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        started = time.perf_counter()
        try:
            await self._authorize(name, request, context)
            result = await method(self, request, context)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            why = self.engine.take_revoked(task)
            if why is None:  # the client went away, or the server is stopping
                done(self, started, "CANCELLED")
                raise
            task.uncancel()  # a swap ended this request: say so, as UNAVAILABLE
            await fail(self, context, Unavailable(why))
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await fail(self, context, e)
        done(self, started)
        return result

    return unary_wrapper


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


@dataclass
class _Part:
    """One engine call of a request: its lease and the response positions it fills."""

    lease: Lease
    indexes: list[int]


class _Accumulator:
    """Collects streamed deltas into complete samples."""

    def __init__(self, versions: list[str]):
        self.samples = [
            api_pb2.Sample(sample_id=_new_id("s"), index=i, version=v)
            for i, v in enumerate(versions)
        ]

    def add(self, d: SampleDelta) -> list[api_pb2.TokenLogprob]:
        """Append a delta to its sample; returns its logprobs as protos."""
        sample = self.samples[d.index]
        sample.text += d.text
        sample.token_count += len(d.token_ids)
        if d.finish_reason:
            sample.finish_reason = _FINISH.get(d.finish_reason, api_pb2.FINISH_REASON_STOP)
        logprobs = [_logprob(lp) for lp in d.logprobs or []]
        sample.logprobs.extend(logprobs)
        return logprobs

    @property
    def tokens(self) -> int:
        return sum(s.token_count for s in self.samples)


def _sampling_proto(job: validation.GenerateJob) -> api_pb2.SamplingParams:
    """The effective sampling parameters (defaults filled in), as logged."""
    spec = job.spec
    params = api_pb2.SamplingParams(
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k,
        stop=spec.stop,
    )
    if spec.seed is not None:
        params.seed = spec.seed
    if spec.logprobs is not None:
        params.logprobs = spec.logprobs
    return params


def _logprob(lp) -> api_pb2.TokenLogprob:
    return api_pb2.TokenLogprob(
        token_id=lp.token_id,
        token=lp.token,
        logprob=lp.logprob,
        top=[api_pb2.TopLogprob(token_id=t, token=s, logprob=v) for t, s, v in lp.top],
    )


class InstructLoopServicer(api_pb2_grpc.InstructLoopServicer):
    def __init__(
        self,
        engine: Engine,
        store: LogStore,
        limits: Limits,
        metrics: Metrics,
        follower: VersionFollower | None = None,
        *,
        auth: Authenticator,
        rate: RateLimiter,
        queue: LabelingQueue,
    ):
        self.engine = engine
        self.store = store
        self.queue = queue
        self.limits = limits
        self.metrics = metrics
        self.follower = follower
        self.auth = auth
        self.rate = rate
        self._inflight = 0

    # ---- who may call -----------------------------------------------------------------

    async def _authorize(self, method: str, request, context) -> None:
        """Authenticate the caller and check its role for `method`; the request's user_id
        becomes the caller's (another user's id is refused). In open mode a call without
        a credential keeps the user_id it names."""
        caller = await self.auth.caller(context.invocation_metadata())
        if caller is None:
            return
        if method in _JUDGING:
            refused, needs = _JUDGING[method]
            if not caller.may_judge():
                raise PermissionDenied(
                    f"user {caller.user_id!r} has role {caller.role!r}, which may not judge; "
                    f"{needs}"
                )
            if caller.suspended:
                raise PermissionDenied(f"user {caller.user_id!r} is suspended; {refused}")
        if not hasattr(request, "user_id"):
            return
        if request.user_id and request.user_id != caller.user_id:
            raise PermissionDenied(
                f"the credential is user {caller.user_id!r}; it cannot act as user "
                f"{request.user_id[:80]!r} (leave user_id empty)"
            )
        request.user_id = caller.user_id

    # ---- generation -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _parts(self, request: api_pb2.GenerateRequest, n: int) -> AsyncIterator[list[_Part]]:
        """Which versions fill which samples: the pin, or current; a canary-routed request
        with n >= 2 is an arena, half canary and half current."""
        pin, is_canary = (
            self.follower.route(request.version) if self.follower else (request.version, False)
        )
        if is_canary and n >= 2:
            plan = list(zip([pin, None], arena.split_indexes(n), strict=True))
        else:
            plan = [(pin or None, list(range(n)))]
        async with self.engine.leases([p for p, _ in plan]) as leases:
            yield [_Part(lease, indexes) for lease, (_, indexes) in zip(leases, plan, strict=True)]

    def _versions(self, parts: list[_Part], n: int) -> list[str]:
        versions = [""] * n
        for part in parts:
            for i in part.indexes:
                versions[i] = part.lease.version
        return versions

    def _admit(self, request: api_pb2.GenerateRequest) -> validation.GenerateJob:
        if self._inflight >= self.limits.max_concurrent_requests:
            raise ResourceExhausted(
                f"server is at its limit of {self.limits.max_concurrent_requests} concurrent "
                "Generate calls; retry with backoff"
            )
        return validation.validate_generate(
            request,
            self.limits,
            self.engine.encode,
            self.engine.render_chat,
            self.engine.max_model_len,
        )

    async def _run(
        self,
        job: validation.GenerateJob,
        prompt_id: str,
        acc: _Accumulator,
        parts: list[_Part],
        stream: bool,
    ) -> AsyncIterator[list[api_pb2.SampleDelta]]:
        """Drive the engine (one call per part); abort there if we stop early. Streaming,
        yields each engine step's deltas (one per sample that advanced); with
        stream=False the engine hands over whole samples and nothing is yielded."""
        request_ids = [prompt_id] if len(parts) == 1 else [f"{prompt_id}-{k}" for k in range(2)]
        streams = [
            self.engine.generate(
                rid, job.prompt_token_ids, replace(job.spec, n=len(p.indexes)), p.lease, stream
            )
            for rid, p in zip(request_ids, parts, strict=True)
        ]
        # One engine call (the common case) is read directly, without the merge's queue.
        source = arena.merge(streams) if len(streams) > 1 else ((0, d) async for d in streams[0])
        finished = False
        try:
            async for k, deltas in source:
                step = []
                for d in deltas:
                    d.index = parts[k].indexes[d.index]  # engine sample -> response position
                    logprobs = acc.add(d)
                    if stream:
                        step.append(api_pb2.SampleDelta(
                            index=d.index, text=d.text, token_count=len(d.token_ids),
                            logprobs=logprobs,
                        ))  # fmt: skip
                if step:
                    yield step
            finished = True
        finally:
            if not finished:  # client went away or we failed: free the engine's slots
                for rid in request_ids:
                    await self.engine.abort(rid)
            self.metrics.generated_tokens.inc(acc.tokens)

    async def _finish(
        self, job: validation.GenerateJob, prompt_id: str, acc: _Accumulator, version: str
    ) -> api_pb2.GenerateResponse:
        response = api_pb2.GenerateResponse(
            prompt_id=prompt_id,
            version=version,
            samples=acc.samples,
            prompt_token_count=len(job.prompt_token_ids),
        )
        if job.log:
            record = records_pb2.PromptRecord(
                prompt_id=prompt_id,
                prompt=job.prompt_text,
                chat=job.chat,
                sampling=_sampling_proto(job),
                version=version,
                user_id=job.user_id,
                created=_timestamp(time.time()),
                prompt_token_count=len(job.prompt_token_ids),
            )
            for s in acc.samples:
                logged = record.samples.add()
                logged.CopyFrom(s)
                logged.ClearField("logprobs")
            try:
                await self.store.log_prompt(record)
                response.logged = True
                self.metrics.prompts_logged.labels("ok").inc()
            except Unavailable as e:
                # The answer still goes out; the caller sees logged=false and cannot rate it.
                log.warning("prompt not logged", extra={"prompt_id": prompt_id, "error": str(e)})
                self.metrics.prompts_logged.labels("error").inc()
        return response

    async def _generate(
        self, request: api_pb2.GenerateRequest, stream: bool
    ) -> AsyncIterator[list[api_pb2.SampleDelta] | api_pb2.GenerateResponse]:
        """One Generate call: its steps' deltas when streaming, then the response (logged)."""
        started = time.perf_counter()
        job = self._admit(request)
        await self.rate.hit("samples", job.user_id, job.spec.n)
        prompt_id = _new_id("p")
        # Counted from admission, so calls waiting for a lease (during a full swap) count
        # against --max-concurrent-requests too: the queue behind a swap is bounded.
        self._inflight += 1
        self.metrics.inflight.inc()
        try:
            async with self._parts(request, job.spec.n) as parts:
                acc = _Accumulator(self._versions(parts, job.spec.n))
                async for step in self._run(job, prompt_id, acc, parts, stream):
                    yield step
        finally:
            self._inflight -= 1
            self.metrics.inflight.dec()
        response = await self._finish(job, prompt_id, acc, parts[-1].lease.version)
        self._log_generate(response, job, started)
        yield response

    @_rpc
    async def Generate(self, request, context):
        async with contextlib.aclosing(self._generate(request, stream=False)) as items:
            *_, response = [item async for item in items]
        return response

    @_rpc
    async def GenerateStream(self, request, context):
        # context.write, not yield: a write that blocks (a client that stopped reading)
        # is then an await of this handler, where a swap's revocation can reach it.
        async with contextlib.aclosing(self._generate(request, stream=True)) as items:
            async for item in items:
                if isinstance(item, list):
                    if request.step_deltas:
                        step = api_pb2.SampleDeltas(deltas=item)
                        await context.write(api_pb2.GenerateStreamResponse(step=step))
                        continue
                    for delta in item:
                        await context.write(api_pb2.GenerateStreamResponse(delta=delta))
                    continue
                for s in item.samples:
                    s.text = ""  # the deltas carried it
                    s.ClearField("logprobs")
                await context.write(api_pb2.GenerateStreamResponse(final=item))

    def _log_generate(self, response, job, started: float) -> None:
        elapsed = time.perf_counter() - started
        tokens = sum(s.token_count for s in response.samples)
        if elapsed > 0:
            self.metrics.tokens_per_second.observe(tokens / elapsed)
        requests_log.info(
            "generated",
            extra={
                "prompt_id": response.prompt_id,
                "version": response.version,
                "n": job.spec.n,
                "prompt_tokens": response.prompt_token_count,
                "tokens": tokens,
                "seconds": round(elapsed, 4),
                "logged": response.logged,
            },
        )

    # ---- feedback ---------------------------------------------------------------------

    @_rpc
    async def SubmitFeedback(self, request, context):
        kind = request.WhichOneof("kind") or "none"
        try:
            validation.validate_feedback_shape(request, self.limits)
            await self.rate.hit("feedback", request.user_id)
            prompt = await self.store.get_prompt(request.prompt_id)
            request = validation.validate_feedback_against(request, prompt, self.limits)
            record = records_pb2.FeedbackRecord(
                feedback_id=_new_id("f"),
                feedback=request,
                version=prompt.version,
                created=_timestamp(time.time()),
            )
            result = await self.store.submit_feedback(record)
        except Exception as e:
            self.metrics.feedback.labels(kind, type(e).__name__).inc()
            raise
        self.metrics.feedback.labels(kind, "duplicate" if result.duplicate else "ok").inc()
        if not result.duplicate:
            await self._judge_canary(request, prompt)
        requests_log.info(
            "feedback",
            extra={
                "feedback_id": result.feedback_id,
                "prompt_id": request.prompt_id,
                "kind": kind,
                "duplicate": result.duplicate,
                "task": result.task,
            },
        )
        return api_pb2.SubmitFeedbackResponse(
            feedback_id=result.feedback_id, duplicate=result.duplicate
        )

    async def _judge_canary(self, feedback, prompt: records_pb2.PromptRecord) -> None:
        """Count an arena judgement for the canary's live win rate: one outcome per user
        and prompt, however many samples it orders (Registry.record_canary_judgement)."""
        if self.follower is None or len({s.version for s in prompt.samples}) < 2:
            return
        registry = self.follower.registry
        try:
            canary, _ = await registry.canary()
            if canary is None:
                return
            outcome = arena.canary_outcome(feedback, prompt, canary)
            if outcome is not None:
                decision = await registry.record_canary_judgement(
                    canary, feedback.user_id, prompt.prompt_id, outcome
                )
                if decision:
                    log.info("canary decision", extra={"canary": canary, "decision": decision})
        except Exception as e:  # the feedback is stored; the A/B count is best effort
            log.warning("could not count a canary judgement: %s", e)

    # ---- labeling queue -----------------------------------------------------------------

    @_rpc
    async def NextTask(self, request, context):
        check_labeler_id(request.user_id, self.limits)
        await self.rate.hit("tasks", request.user_id)
        lease = await self.queue.next_task(request.user_id)
        record = lease.record
        task = api_pb2.Task(
            task_id=lease.task_id,
            prompt_id=lease.prompt_id,
            prompt=record.prompt,
            samples=record.samples,
            lease_expires=_timestamp(lease.expires_ms / 1000),
            queue_waiting=lease.waiting,
            queue_leased=lease.leased,
            overlap=lease.overlap,
            lease_number=lease.number,
        )
        if record.HasField("chat"):
            task.chat.CopyFrom(record.chat)
        requests_log.info(
            "task leased",
            extra={
                "prompt_id": lease.prompt_id,
                "task_id": lease.task_id,
                "again": lease.again,
                "waiting": lease.waiting,
            },
        )
        return task

    @_rpc
    async def SkipTask(self, request, context):
        check_labeler_id(request.user_id, self.limits)
        dropped, waiting = await self.queue.skip(request)
        requests_log.info(
            "task skipped",
            extra={
                "task_id": request.task_id,
                "cannot_rank": request.cannot_rank,
                "dropped": dropped,
            },
        )
        return api_pb2.SkipTaskResponse(dropped=dropped, queue_waiting=waiting)

    # ---- model ------------------------------------------------------------------------

    @_rpc
    async def GetModel(self, request, context):
        lim = self.limits
        return api_pb2.ModelInfo(
            version=self.engine.version,
            base_model=self.engine.base_model,
            loaded_at=_timestamp(self.engine.loaded_at),
            seconds_since_swap=time.time() - self.engine.loaded_at,
            max_model_len=self.engine.max_model_len,
            limits=api_pb2.ServerLimits(
                max_n=lim.max_n,
                max_tokens=lim.max_tokens,
                max_prompt_tokens=lim.max_prompt_tokens,
                max_prompt_chars=lim.max_prompt_chars,
                rating_min=lim.rating_min,
                rating_max=lim.rating_max,
            ),
            last_swap_error=self.follower.last_swap_error if self.follower else "",
            queue_share=self.queue.cfg.queue_share,
            queue_overlap=self.queue.cfg.queue_overlap,
        )
