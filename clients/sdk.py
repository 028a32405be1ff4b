"""Typed Python SDK for the instructloop public API (instructloop.v1.InstructLoop).

Two clients with the same methods: `Client` (blocking) and `AsyncClient` (asyncio).
Both are thin: they build the request messages from Python arguments, call the generated
stubs and return the response messages unchanged. Errors are the `grpc.RpcError` the
server raised; `code()` and `details()` say what went wrong.

Retries are gRPC's own (a retryPolicy in the channel's service config): a call that
fails with UNAVAILABLE is retried with exponential backoff inside one deadline.

A target may name one server or load balancer (`host:50051`) or several replicas:
`ipv4:10.0.0.1:50051,10.0.0.2:50051` or `dns:///replicas.example:50051` (every address
the name resolves to). Calls go round robin over the addresses; with several addresses
(or health_check=True) a replica that reports NOT_SERVING, as one does while a
full-weight swap drains it, gets no new calls until it serves again. Feedback
calls always carry an idempotency key (one uuid4 per call when none is given), so a
retried SubmitFeedback is recorded once.

Every call carries the caller's credential (`token`, from `instructloop users add`); the
server derives the user id from it, so user_id arguments can stay empty.

    with Client("localhost:50051", token=os.environ["INSTRUCTLOOP_TOKEN"]) as client:
        response = client.generate("Write a haiku about queues.", n=4)
        ids = [s.sample_id for s in response.samples]
        client.rank(response.prompt_id, [ids[2], (ids[0], ids[1]), ids[3]])

A labeler can also take prompts other users sent from the labeling queue (NextTask):

        task = client.next_task()           # grpc.RpcError NOT_FOUND when there is none
        client.rank(task.prompt_id, [...])  # the comparison closes the lease
        client.skip_task(task.task_id, "not my language", cannot_rank=True)  # or give it back
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import grpc
import grpc.aio

from instructloop.v1 import api_pb2, api_pb2_grpc

from . import wire
from .wire import Metadata, RankItem, stream_deltas

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "Client",
    "default_target",
    "default_user_token",
    "stream_deltas",
    "tls_credentials",
]

DEFAULT_TARGET = "localhost:50051"


def default_target() -> str:
    """The server address: $INSTRUCTLOOP_TARGET, else localhost:50051."""
    return os.environ.get("INSTRUCTLOOP_TARGET") or DEFAULT_TARGET


def credential(env: str, filename: str, data_dir: str | None = None) -> str:
    """$env, else the file DATA_DIR/filename ($INSTRUCTLOOP_DATA_DIR or ./data), else ""."""
    token = os.environ.get(env, "")
    if token:
        return token
    path = Path(data_dir or os.environ.get("INSTRUCTLOOP_DATA_DIR", "./data")) / filename
    return path.read_text().strip() if path.is_file() else ""


def default_user_token(data_dir: str | None = None) -> str:
    """The caller's credential: $INSTRUCTLOOP_TOKEN, else the file DATA_DIR/user-token
    (`instructloop up` writes it), else ""."""
    return credential("INSTRUCTLOOP_TOKEN", "user-token", data_dir)


def tls_credentials(ca_file: str | None = None) -> grpc.ChannelCredentials | None:
    """TLS channel credentials trusting the CA in ca_file (PEM), else the one named by
    $INSTRUCTLOOP_TLS_CA; None (a plaintext channel) when neither is set."""
    ca_file = ca_file or os.environ.get("INSTRUCTLOOP_TLS_CA")
    if not ca_file:
        return None
    with open(ca_file, "rb") as f:
        return grpc.ssl_channel_credentials(root_certificates=f.read())


class _Base:
    """What both clients share: target, default deadline and call metadata."""

    def __init__(
        self,
        target: str | None,
        timeout: float | None,
        max_attempts: int,
        metadata: Metadata | None,
        token: str | None,
    ) -> None:
        self.target = target or default_target()
        self.timeout = timeout
        self.max_attempts = max_attempts
        token = default_user_token() if token is None else token
        pairs = wire.normalize_metadata(metadata)
        if token and not any(key == "authorization" for key, _ in pairs):
            pairs = [("authorization", f"Bearer {token}"), *pairs]
        self.metadata = tuple(pairs) or None

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


# --- blocking client --------------------------------------------------------------------


class Client(_Base):
    """Blocking client. Use as a context manager, or call close() when done."""

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float | None = 60.0,
        max_attempts: int = 4,
        metadata: Metadata | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        health_check: bool | None = None,
    ) -> None:
        """Connect lazily to target (default: $INSTRUCTLOOP_TARGET or localhost:50051).

        token is the caller's credential, sent as `authorization: Bearer <token>` with
        every call (default: default_user_token(); "" sends none, for a server in open
        mode); timeout is the default deadline in seconds of each call (None: no
        deadline); max_attempts bounds gRPC's retries on UNAVAILABLE (at most 5);
        metadata is sent with every call; credentials make the channel a TLS channel
        (default: TLS trusting $INSTRUCTLOOP_TLS_CA when it is set, see tls_credentials);
        health_check: skip replicas that report NOT_SERVING (default: when the target
        names several addresses; pass True for `dns:///` of a headless service, never
        for one load-balanced address).
        """
        super().__init__(target, timeout, max_attempts, metadata, token)
        if health_check is None:
            health_check = wire.several_addresses(self.target)
        options = wire.channel_options(max_attempts, health_check)
        credentials = credentials or tls_credentials()
        if credentials is None:
            self.channel = grpc.insecure_channel(self.target, options=options)
        else:
            self.channel = grpc.secure_channel(self.target, credentials, options=options)
        self._stub = api_pb2_grpc.InstructLoopStub(self.channel)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        n: int = 1,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Iterable[str] = (),
        logprobs: int | None = None,
        user_id: str = "",
        log: bool = True,
        version: str = "",
        timeout: float | None = None,
    ) -> api_pb2.GenerateResponse:
        """Sample n answers to a plain-text prompt or a chat (list of role/content dicts).

        `version` pins a model version still loaded on the server (FAILED_PRECONDITION
        otherwise); by default the current version answers.
        """
        request = wire.generate_request(
            prompt, messages, n, max_tokens, temperature, top_p, top_k, seed, stop,
            logprobs, user_id, log, version,
        )  # fmt: skip
        return self._stub.Generate(request, timeout=self._timeout(timeout), metadata=self.metadata)

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        n: int = 1,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Iterable[str] = (),
        logprobs: int | None = None,
        user_id: str = "",
        log: bool = True,
        version: str = "",
        step_deltas: bool = False,
        timeout: float | None = None,
    ) -> Iterator[api_pb2.GenerateStreamResponse]:
        """Like generate, streamed: deltas, then one final GenerateResponse.

        With step_deltas each message carries one engine step's deltas of every sample
        (`step`) instead of one sample's (`delta`): up to n times fewer messages. stream_deltas()
        reads either. The call starts on the first next(). Leaving the iteration early
        (break, an exception, close()) cancels the RPC, so the server aborts the
        generation.
        """
        request = wire.generate_request(
            prompt, messages, n, max_tokens, temperature, top_p, top_k, seed, stop,
            logprobs, user_id, log, version, step_deltas,
        )  # fmt: skip
        return _iterate(
            lambda: self._stub.GenerateStream(
                request, timeout=self._timeout(timeout), metadata=self.metadata
            )
        )

    def submit_feedback(
        self, request: api_pb2.SubmitFeedbackRequest, *, timeout: float | None = None
    ) -> api_pb2.SubmitFeedbackResponse:
        """Send a SubmitFeedbackRequest as is (an idempotency key is added if missing)."""
        return self._stub.SubmitFeedback(
            wire.with_idempotency_key(request),
            timeout=self._timeout(timeout),
            metadata=self.metadata,
        )

    def rank(
        self,
        prompt_id: str,
        ranking: Sequence[RankItem],
        *,
        user_id: str = "",
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> api_pb2.SubmitFeedbackResponse:
        """Rank samples best to worst; an item is a sample id or a tuple of tied ids."""
        request = wire.feedback_request(
            prompt_id, user_id, idempotency_key, ranking=wire.ranking(ranking)
        )
        return self.submit_feedback(request, timeout=timeout)

    def choose(
        self,
        prompt_id: str,
        chosen: str,
        rejected: str = "",
        *,
        user_id: str = "",
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> api_pb2.SubmitFeedbackResponse:
        """Prefer chosen over rejected (rejected may be empty when there are two samples)."""
        choice = api_pb2.Choice(chosen_sample_id=chosen, rejected_sample_id=rejected)
        request = wire.feedback_request(prompt_id, user_id, idempotency_key, choice=choice)
        return self.submit_feedback(request, timeout=timeout)

    def demonstrate(
        self,
        prompt_id: str,
        text: str,
        *,
        user_id: str = "",
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> api_pb2.SubmitFeedbackResponse:
        """Send the answer the user would have wanted."""
        demo = api_pb2.Demonstration(text=text)
        request = wire.feedback_request(prompt_id, user_id, idempotency_key, demonstration=demo)
        return self.submit_feedback(request, timeout=timeout)

    def rate(
        self,
        prompt_id: str,
        scores: Mapping[str, float],
        *,
        user_id: str = "",
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> api_pb2.SubmitFeedbackResponse:
        """Score samples on the server's rating scale: {sample_id: score}."""
        request = wire.feedback_request(
            prompt_id, user_id, idempotency_key, rating=wire.rating(scores)
        )
        return self.submit_feedback(request, timeout=timeout)

    def next_task(self, *, user_id: str = "", timeout: float | None = None) -> api_pb2.Task:
        """Lease one item of the labeling queue: a prompt another user sent and its
        samples. Judge it with rank/choose/rate(task.prompt_id, ...), or give it back with
        skip_task. While the lease is live the same task comes back. grpc.RpcError
        NOT_FOUND when nothing is there for this user (the message says why)."""
        return self._stub.NextTask(
            api_pb2.NextTaskRequest(user_id=user_id),
            timeout=self._timeout(timeout),
            metadata=self.metadata,
        )

    def skip_task(
        self,
        task_id: str,
        reason: str = "",
        cannot_rank: bool = False,
        *,
        user_id: str = "",
        timeout: float | None = None,
    ) -> api_pb2.SkipTaskResponse:
        """Give a leased task back (it goes to other labelers, never back to you), or,
        with cannot_rank and a reason, say it cannot be ranked."""
        request = wire.skip_task_request(task_id, reason, cannot_rank, user_id)
        return self._stub.SkipTask(request, timeout=self._timeout(timeout), metadata=self.metadata)

    def get_model(self, *, timeout: float | None = None) -> api_pb2.ModelInfo:
        """Describe the model version the answering replica serves, and its limits."""
        return self._stub.GetModel(
            api_pb2.GetModelRequest(), timeout=self._timeout(timeout), metadata=self.metadata
        )


def _iterate(start: Callable[[], Any]) -> Iterator[api_pb2.GenerateStreamResponse]:
    call = start()
    try:
        yield from call
    finally:
        call.cancel()  # a no-op when the stream already ended


# --- asyncio client ---------------------------------------------------------------------


class AsyncClient(_Base):
    """asyncio client with the same methods as Client. Use `async with`, or await close()."""

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float | None = 60.0,
        max_attempts: int = 4,
        metadata: Metadata | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        health_check: bool | None = None,
    ) -> None:
        """Same arguments as Client. Create it inside the event loop that will use it."""
        super().__init__(target, timeout, max_attempts, metadata, token)
        if health_check is None:
            health_check = wire.several_addresses(self.target)
        options = wire.channel_options(max_attempts, health_check)
        credentials = credentials or tls_credentials()
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            self.channel = grpc.aio.secure_channel(self.target, credentials, options=options)
        self._stub = api_pb2_grpc.InstructLoopStub(self.channel)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        n: int = 1,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Iterable[str] = (),
        logprobs: int | None = None,
        user_id: str = "",
        log: bool = True,
        version: str = "",
        timeout: float | None = None,
    ) -> api_pb2.GenerateResponse:
        """Sample n answers to a plain-text prompt or a chat (list of role/content dicts).

        `version` pins a model version still loaded on the server (FAILED_PRECONDITION
        otherwise); by default the current version answers.
        """
        request = wire.generate_request(
            prompt, messages, n, max_tokens, temperature, top_p, top_k, seed, stop,
            logprobs, user_id, log, version,
        )  # fmt: skip
        return await self._stub.Generate(
            request, timeout=self._timeout(timeout), metadata=self.metadata
        )

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        n: int = 1,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Iterable[str] = (),
        logprobs: int | None = None,
        user_id: str = "",
        log: bool = True,
        version: str = "",
        step_deltas: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[api_pb2.GenerateStreamResponse]:
        """Like generate, streamed: `async for` over deltas, then one final response.

        step_deltas as in Client.generate_stream. Leaving the iteration cancels the RPC.
        After a `break`, the iterator is closed when it is garbage-collected; wrap it in
        contextlib.aclosing() to cancel at once.
        """
        request = wire.generate_request(
            prompt, messages, n, max_tokens, temperature, top_p, top_k, seed, stop,
            logprobs, user_id, log, version, step_deltas,
        )  # fmt: skip
        return _aiterate(
            lambda: self._stub.GenerateStream(
                request, timeout=self._timeout(timeout), metadata=self.metadata
            )
        )

    async def submit_feedback(
        self, request: api_pb2.SubmitFeedbackRequest, *, timeout: float | None = None
    ) -> api_pb2.SubmitFeedbackResponse:
        """Send a SubmitFeedbackRequest as is (an idempotency key is added if missing)."""
        return await self._stub.SubmitFeedback(
            wire.with_idempotency_key(request),
            timeout=self._timeout(timeout),
            metadata=self.metadata,
        )

    async def rank(
        self,
        prompt_id: str,
        ranking: Sequence[RankItem],
        *,
        user_id: str = "",
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> api_pb2.SubmitFeedbackResponse:
        """Rank samples best to worst; an item is a sample id or a tuple of tied ids."""
        request = wire.feedback_request(
            prompt_id, user_id, idempotency_key, ranking=wire.ranking(ranking)
        )
        return await self.submit_feedback(request, timeout=timeout)

    async def choose(
        self,
        prompt_id: str,
        chosen: str,
        rejected: str = "",
        *,
        user_id: str = "",
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> api_pb2.SubmitFeedbackResponse:
        """Prefer chosen over rejected (rejected may be empty when there are two samples)."""
        choice = api_pb2.Choice(chosen_sample_id=chosen, rejected_sample_id=rejected)
        request = wire.feedback_request(prompt_id, user_id, idempotency_key, choice=choice)
        return await self.submit_feedback(request, timeout=timeout)

    async def demonstrate(
        self,
        prompt_id: str,
        text: str,
        *,
        user_id: str = "",
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> api_pb2.SubmitFeedbackResponse:
        """Send the answer the user would have wanted."""
        demo = api_pb2.Demonstration(text=text)
        request = wire.feedback_request(prompt_id, user_id, idempotency_key, demonstration=demo)
        return await self.submit_feedback(request, timeout=timeout)

    async def rate(
        self,
        prompt_id: str,
        scores: Mapping[str, float],
        *,
        user_id: str = "",
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> api_pb2.SubmitFeedbackResponse:
        """Score samples on the server's rating scale: {sample_id: score}."""
        request = wire.feedback_request(
            prompt_id, user_id, idempotency_key, rating=wire.rating(scores)
        )
        return await self.submit_feedback(request, timeout=timeout)

    async def next_task(self, *, user_id: str = "", timeout: float | None = None) -> api_pb2.Task:
        """Lease one item of the labeling queue (see Client.next_task)."""
        return await self._stub.NextTask(
            api_pb2.NextTaskRequest(user_id=user_id),
            timeout=self._timeout(timeout),
            metadata=self.metadata,
        )

    async def skip_task(
        self,
        task_id: str,
        reason: str = "",
        cannot_rank: bool = False,
        *,
        user_id: str = "",
        timeout: float | None = None,
    ) -> api_pb2.SkipTaskResponse:
        """Give a leased task back, or say it cannot be ranked (see Client.skip_task)."""
        request = wire.skip_task_request(task_id, reason, cannot_rank, user_id)
        return await self._stub.SkipTask(
            request, timeout=self._timeout(timeout), metadata=self.metadata
        )

    async def get_model(self, *, timeout: float | None = None) -> api_pb2.ModelInfo:
        """Describe the model version the answering replica serves, and its limits."""
        return await self._stub.GetModel(
            api_pb2.GetModelRequest(), timeout=self._timeout(timeout), metadata=self.metadata
        )


async def _aiterate(start: Callable[[], Any]) -> AsyncIterator[api_pb2.GenerateStreamResponse]:
    call = start()
    try:
        async for message in call:
            yield message
    finally:
        call.cancel()  # a no-op when the stream already ended
