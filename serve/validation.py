"""Request validation: proto requests in, checked domain objects out, or a precise error.

Everything here is pure: no I/O, no engine calls beyond tokenizing. Each error message
names the field, the value's problem, and the limit or the fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from instructloop.v1 import api_pb2, records_pb2

from .config import Limits
from .engine import SamplingSpec
from .errors import InvalidArgument

CHAT_ROLES = ("system", "user", "assistant")
MAX_SEED = 2**63 - 1


@dataclass
class GenerateJob:
    """A validated Generate request, ready for the engine."""

    prompt_text: str
    prompt_token_ids: list[int]
    spec: SamplingSpec
    user_id: str
    log: bool
    chat: api_pb2.Chat | None = None


def _check_id(name: str, value: str, limits: Limits, required: bool) -> None:
    if required and not value:
        raise InvalidArgument(f"{name} is required")
    if len(value) > limits.max_id_chars:
        raise InvalidArgument(
            f"{name} is {len(value)} characters; the limit is {limits.max_id_chars}"
        )


def _sampling(req: api_pb2.GenerateRequest, limits: Limits) -> SamplingSpec:
    s = req.sampling
    n = req.n or 1
    if n > limits.max_n:
        raise InvalidArgument(f"n={n} is over the limit of {limits.max_n} samples per request")
    max_tokens = s.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        raise InvalidArgument(
            f"sampling.max_tokens={max_tokens} is over the limit of {limits.max_tokens}"
        )
    temperature = s.temperature if s.HasField("temperature") else 1.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(f"sampling.temperature={temperature} must be a number >= 0")
    if temperature == 0 and n > 1:
        raise InvalidArgument(
            f"temperature 0 is greedy decoding: all n={n} samples would be the same; "
            "use n=1, or a temperature > 0 to sample different answers"
        )
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InvalidArgument(f"sampling.top_p={top_p} must be in (0, 1]")
    top_k = s.top_k if s.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidArgument(f"sampling.top_k={top_k} must be >= 0 (0 turns top-k off)")
    seed = s.seed if s.HasField("seed") else None
    if seed is not None and seed > MAX_SEED:
        raise InvalidArgument(f"sampling.seed={seed} must be below 2**63")
    if len(s.stop) > limits.max_stop:
        raise InvalidArgument(
            f"sampling.stop has {len(s.stop)} strings; the limit is {limits.max_stop}"
        )
    for stop in s.stop:
        if not stop or len(stop) > limits.max_stop_chars:
            raise InvalidArgument(
                f"each stop string must be 1..{limits.max_stop_chars} characters; got {stop!r:.80}"
            )
    logprobs = s.logprobs if s.HasField("logprobs") else None
    if logprobs is not None and logprobs > limits.max_logprobs:
        raise InvalidArgument(
            f"sampling.logprobs={logprobs} is over the limit of {limits.max_logprobs}"
        )
    return SamplingSpec(
        n=n,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(s.stop),
        logprobs=logprobs,
    )


def _prompt_text(
    req: api_pb2.GenerateRequest, limits: Limits, render_chat: Callable[[list[dict]], str]
) -> tuple[str, api_pb2.Chat | None]:
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidArgument("set either prompt (plain text) or chat (a list of messages)")
    if which == "prompt":
        if not req.prompt:
            raise InvalidArgument("prompt is empty")
        if len(req.prompt) > limits.max_prompt_chars:
            raise InvalidArgument(
                f"prompt is {len(req.prompt)} characters; the limit is {limits.max_prompt_chars}"
            )
        return req.prompt, None
    messages = req.chat.messages
    if not messages:
        raise InvalidArgument("chat has no messages")
    if len(messages) > limits.max_chat_messages:
        raise InvalidArgument(
            f"chat has {len(messages)} messages; the limit is {limits.max_chat_messages}"
        )
    total = 0
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise InvalidArgument(
                f"chat.messages[{i}].role is {m.role!r}; use one of {', '.join(CHAT_ROLES)}"
            )
        total += len(m.content)
    if total > limits.max_prompt_chars:
        raise InvalidArgument(
            f"chat content is {total} characters; the limit is {limits.max_prompt_chars}"
        )
    text = render_chat([{"role": m.role, "content": m.content} for m in messages])
    return text, req.chat


def validate_generate(
    req: api_pb2.GenerateRequest,
    limits: Limits,
    encode: Callable[[str], list[int]],
    render_chat: Callable[[list[dict]], str],
    max_model_len: int,
) -> GenerateJob:
    """Check a Generate request against the limits and the model's context length."""
    _check_id("user_id", req.user_id, limits, required=False)
    _check_id("version", req.version, limits, required=False)
    spec = _sampling(req, limits)
    text, chat = _prompt_text(req, limits, render_chat)
    token_ids = encode(text)
    if len(token_ids) > limits.max_prompt_tokens:
        raise InvalidArgument(
            f"prompt is {len(token_ids)} tokens; the limit is {limits.max_prompt_tokens}"
        )
    if len(token_ids) + spec.max_tokens > max_model_len:
        raise InvalidArgument(
            f"prompt ({len(token_ids)} tokens) + max_tokens ({spec.max_tokens}) exceeds the "
            f"model's context of {max_model_len} tokens; lower max_tokens or shorten the prompt"
        )
    return GenerateJob(
        prompt_text=text,
        prompt_token_ids=token_ids,
        spec=spec,
        user_id=req.user_id,
        log=not req.do_not_log,
        chat=chat,
    )


def validate_feedback_shape(req: api_pb2.SubmitFeedbackRequest, limits: Limits) -> None:
    """Checks that need no stored data: ids, the kind, sizes."""
    _check_id("prompt_id", req.prompt_id, limits, required=True)
    _check_id("user_id", req.user_id, limits, required=True)
    _check_id("idempotency_key", req.idempotency_key, limits, required=False)
    kind = req.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("set one feedback kind: ranking, choice, demonstration or rating")
    if kind == "demonstration":
        text = req.demonstration.text
        if not text.strip():
            raise InvalidArgument("demonstration.text is empty")
        if len(text) > limits.max_demonstration_chars:
            raise InvalidArgument(
                f"demonstration.text is {len(text)} characters; "
                f"the limit is {limits.max_demonstration_chars}"
            )


def _known(sample_id: str, field: str, record: records_pb2.PromptRecord) -> None:
    known = [s.sample_id for s in record.samples]
    if sample_id not in known:
        raise InvalidArgument(
            f"{field} {sample_id!r} is not a sample of prompt {record.prompt_id}; "
            f"its samples are {', '.join(known)}"
        )


def _no_repeats(ids: list[str], field: str) -> None:
    seen = set()
    for sample_id in ids:
        if sample_id in seen:
            raise InvalidArgument(f"{field} names sample {sample_id!r} more than once")
        seen.add(sample_id)


def validate_feedback_against(
    req: api_pb2.SubmitFeedbackRequest, record: records_pb2.PromptRecord, limits: Limits
) -> api_pb2.SubmitFeedbackRequest:
    """Check sample ids against the logged prompt. Returns the request as it will be stored
    (a choice on a two-sample prompt gets its rejected sample filled in)."""
    kind = req.WhichOneof("kind")
    if kind == "ranking":
        tiers = req.ranking.tiers
        ids = [sid for tier in tiers for sid in tier.sample_ids]
        if any(not tier.sample_ids for tier in tiers):
            raise InvalidArgument("ranking has an empty tier; every tier needs a sample id")
        if len(ids) < 2:
            raise InvalidArgument("a ranking needs at least 2 samples, best first")
        _no_repeats(ids, "ranking")
        for sid in ids:
            _known(sid, "ranking sample", record)
    elif kind == "choice":
        chosen, rejected = req.choice.chosen_sample_id, req.choice.rejected_sample_id
        if not chosen:
            raise InvalidArgument("choice.chosen_sample_id is required")
        _known(chosen, "choice.chosen_sample_id", record)
        if not rejected:
            others = [s.sample_id for s in record.samples if s.sample_id != chosen]
            if len(others) != 1:
                raise InvalidArgument(
                    f"prompt {record.prompt_id} has {len(record.samples)} samples: "
                    "set choice.rejected_sample_id too"
                )
            rejected = others[0]
            filled = api_pb2.SubmitFeedbackRequest()
            filled.CopyFrom(req)
            filled.choice.rejected_sample_id = rejected
            req = filled
        if chosen == rejected:
            raise InvalidArgument("choice names the same sample as chosen and rejected")
        _known(rejected, "choice.rejected_sample_id", record)
    elif kind == "rating":
        scores = req.rating.scores
        if not scores:
            raise InvalidArgument("rating has no scores")
        _no_repeats([s.sample_id for s in scores], "rating")
        for s in scores:
            _known(s.sample_id, "rating sample", record)
            if not math.isfinite(s.score) or not limits.rating_min <= s.score <= limits.rating_max:
                raise InvalidArgument(
                    f"rating score {s.score} for {s.sample_id!r} must be in "
                    f"[{limits.rating_min}, {limits.rating_max}]"
                )
    return req
