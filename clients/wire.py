"""Wire helpers shared by Client and AsyncClient: channel options and request builders.

Pure conversions from Python values to instructloop.v1 messages and channel options; no
I/O. Imports only the generated messages.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from instructloop.v1 import api_pb2

SERVICE = "instructloop.v1.InstructLoop"

Metadata = Mapping[str, str] | Sequence[tuple[str, str]]
# A ranking item: one sample id, or several tied sample ids.
RankItem = str | Sequence[str]


# --- channel setup --------------------------------------------------------------------


def several_addresses(target: str) -> bool:
    """Whether a target names several servers itself (`ipv4:10.0.0.1:50051,10.0.0.2:50051`),
    rather than one address that may be a load balancer."""
    return "," in target


def channel_options(max_attempts: int, health_check: bool = False) -> list[tuple[str, Any]]:
    """Channel options: round_robin over every address the target resolves to, gRPC's
    built-in retry on UNAVAILABLE, and with health_check gRPC's client-side health
    checking: a replica that reports NOT_SERVING for the public service (as one does
    while a full-weight swap drains it) gets no new calls until it serves again.

    Health checking is for targets that name the replicas themselves (several
    addresses, or `dns:///` of a headless service); behind one load-balanced address a
    single replica's NOT_SERVING would stop the whole channel. gRPC caps maxAttempts at
    5 and needs at least 2 for a retryPolicy; with max_attempts <= 1 calls are not
    retried.
    """
    method_config: dict[str, Any] = {"name": [{"service": SERVICE}]}
    if max_attempts >= 2:
        method_config["retryPolicy"] = {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.2s",
            "maxBackoff": "5s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    service_config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [method_config],
    }
    if health_check:
        service_config["healthCheckConfig"] = {"serviceName": SERVICE}
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config)),
        # Many samples with logprobs can exceed the 4 MiB default.
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]


def normalize_metadata(metadata: Metadata | None) -> tuple[tuple[str, str], ...]:
    """Call metadata as gRPC takes it: a tuple of (lowercase key, value) pairs."""
    items = metadata.items() if isinstance(metadata, Mapping) else (metadata or ())
    # gRPC requires lowercase header names.
    return tuple((key.lower(), value) for key, value in items)


# --- request builders -----------------------------------------------------------------


def generate_request(
    prompt: str | None,
    messages: Sequence[Mapping[str, str]] | None,
    n: int,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: Iterable[str],
    logprobs: int | None,
    user_id: str,
    log: bool,
    version: str = "",
    step_deltas: bool = False,
) -> api_pb2.GenerateRequest:
    """A GenerateRequest from a plain prompt or chat messages (exactly one of them)."""
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of prompt or messages")
    sampling = api_pb2.SamplingParams(max_tokens=max_tokens, stop=list(stop))
    # Optional fields: unset means the server default, so only set what was given.
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if top_k is not None:
        sampling.top_k = top_k
    if seed is not None:
        sampling.seed = seed
    if logprobs is not None:
        sampling.logprobs = logprobs
    request = api_pb2.GenerateRequest(
        n=n,
        sampling=sampling,
        user_id=user_id,
        do_not_log=not log,
        version=version,
        step_deltas=step_deltas,
    )
    if prompt is not None:
        request.prompt = prompt
    else:
        assert messages is not None
        chat = [api_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
        request.chat.CopyFrom(api_pb2.Chat(messages=chat))
    return request


def stream_deltas(message: api_pb2.GenerateStreamResponse) -> Sequence[api_pb2.SampleDelta]:
    """The sample deltas a GenerateStream message carries, in either form: one `delta`, or
    an engine step's `step` (requests with step_deltas); none in the `final` message."""
    event = message.WhichOneof("event")
    if event == "step":
        return message.step.deltas
    return (message.delta,) if event == "delta" else ()


def with_idempotency_key(request: api_pb2.SubmitFeedbackRequest) -> api_pb2.SubmitFeedbackRequest:
    """A copy of request with an idempotency key (uuid4 hex) if it had none."""
    if request.idempotency_key:
        return request
    keyed = api_pb2.SubmitFeedbackRequest()
    keyed.CopyFrom(request)
    keyed.idempotency_key = uuid.uuid4().hex
    return keyed


def feedback_request(
    prompt_id: str, user_id: str, idempotency_key: str, **kind: Any
) -> api_pb2.SubmitFeedbackRequest:
    """A SubmitFeedbackRequest of one kind (ranking=, choice=, demonstration=, rating=)."""
    return with_idempotency_key(
        api_pb2.SubmitFeedbackRequest(
            prompt_id=prompt_id, user_id=user_id, idempotency_key=idempotency_key, **kind
        )
    )


def ranking(items: Sequence[RankItem]) -> api_pb2.Ranking:
    """A Ranking, best first; an item is one sample id or a sequence of tied ids."""
    tiers = [
        api_pb2.RankTier(sample_ids=[item] if isinstance(item, str) else list(item))
        for item in items
    ]
    return api_pb2.Ranking(tiers=tiers)


def rating(scores: Mapping[str, float]) -> api_pb2.Rating:
    """A Rating from {sample_id: score}."""
    return api_pb2.Rating(
        scores=[api_pb2.SampleScore(sample_id=sid, score=s) for sid, s in scores.items()]
    )


def skip_task_request(
    task_id: str, reason: str, cannot_rank: bool, user_id: str
) -> api_pb2.SkipTaskRequest:
    """A SkipTaskRequest: give a leased task back, or say it cannot be ranked (with a
    reason)."""
    if cannot_rank and not reason.strip():
        raise ValueError("cannot_rank needs a reason")
    return api_pb2.SkipTaskRequest(
        task_id=task_id, reason=reason, cannot_rank=cannot_rank, user_id=user_id
    )
