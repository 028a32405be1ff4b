"""Generate and GenerateStream against the real server and vLLM engine."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from instructloop.clients import AsyncClient, stream_deltas
from instructloop.keys import DATA_FIELD, Keys
from instructloop.v1 import api_pb2, api_pb2_grpc, records_pb2


def _stub(channel) -> api_pb2_grpc.InstructLoopStub:
    return api_pb2_grpc.InstructLoopStub(channel)


def _request(prompt="reverse: abc", n=4, max_tokens=8, seed=None, **kw) -> api_pb2.GenerateRequest:
    sampling = api_pb2.SamplingParams(max_tokens=max_tokens)
    if seed is not None:
        sampling.seed = seed
    for k, v in kw.pop("sampling", {}).items():
        setattr(sampling, k, v)
    return api_pb2.GenerateRequest(prompt=prompt, n=n, sampling=sampling, **kw)


def logged_prompt(redis_server, server, prompt_id) -> records_pb2.PromptRecord | None:
    for _, fields in redis_server.client().xrange(Keys(server.prefix).prompts_stream):
        record = records_pb2.PromptRecord.FromString(fields[DATA_FIELD])
        if record.prompt_id == prompt_id:
            return record
    return None


def test_generate_returns_n_tagged_samples_and_logs_them(channel, server, redis_server):
    stub = _stub(channel)
    served = stub.GetModel(api_pb2.GetModelRequest()).version
    resp = stub.Generate(_request(n=4, max_tokens=8, user_id="alice"))

    assert len(resp.samples) == 4
    assert [s.index for s in resp.samples] == [0, 1, 2, 3]
    assert len({s.sample_id for s in resp.samples}) == 4
    assert resp.version == served and all(s.version == served for s in resp.samples)
    assert resp.prompt_id and resp.logged and resp.prompt_token_count > 0
    for s in resp.samples:
        assert 0 < s.token_count <= 8
        assert s.finish_reason in (api_pb2.FINISH_REASON_STOP, api_pb2.FINISH_REASON_LENGTH)
        if s.finish_reason == api_pb2.FINISH_REASON_LENGTH:
            assert s.token_count == 8

    record = logged_prompt(redis_server, server, resp.prompt_id)
    assert record is not None, "the prompt was not written to the prompts stream"
    assert record.prompt == "reverse: abc" and record.user_id == "alice"
    assert record.version == served and record.sampling.max_tokens == 8
    assert [(s.sample_id, s.text) for s in record.samples] == [
        (s.sample_id, s.text) for s in resp.samples
    ]


def test_seed_makes_sampling_reproducible_and_n_samples_differ(channel):
    stub = _stub(channel)
    a = stub.Generate(_request(n=4, max_tokens=12, seed=7))
    b = stub.Generate(_request(n=4, max_tokens=12, seed=7))
    assert [s.text for s in a.samples] == [s.text for s in b.samples]
    assert a.prompt_id != b.prompt_id
    assert len({s.text for s in a.samples}) > 1, "n samples at temperature 1 should differ"


def test_logprobs_are_returned_per_token(channel):
    resp = _stub(channel).Generate(_request(n=2, max_tokens=5, sampling={"logprobs": 3}))
    for s in resp.samples:
        assert len(s.logprobs) == s.token_count
        for lp in s.logprobs:
            assert lp.logprob <= 0 and len(lp.top) <= 3


def test_chat_input_uses_the_chat_template(channel, server, redis_server):
    chat = api_pb2.Chat(
        messages=[
            api_pb2.ChatMessage(role="system", content="be brief"),
            api_pb2.ChatMessage(role="user", content="sort: c b a"),
        ]
    )
    resp = _stub(channel).Generate(
        api_pb2.GenerateRequest(chat=chat, n=2, sampling=api_pb2.SamplingParams(max_tokens=4))
    )
    assert len(resp.samples) == 2
    record = logged_prompt(redis_server, server, resp.prompt_id)
    # The tiny model's template renders "<|role|>\ncontent\n" and opens an assistant turn.
    assert record.prompt == "<|system|>\nbe brief\n<|user|>\nsort: c b a\n<|assistant|>\n"
    assert [m.content for m in record.chat.messages] == ["be brief", "sort: c b a"]


def test_do_not_log_keeps_the_prompt_out_of_redis(channel, server, redis_server):
    resp = _stub(channel).Generate(_request(n=1, do_not_log=True))
    assert not resp.logged
    assert logged_prompt(redis_server, server, resp.prompt_id) is None


def test_stream_chunks_are_tagged_and_match_unary_output(channel):
    stub = _stub(channel)
    req = _request(n=3, max_tokens=10, seed=11)
    chunks = list(stub.GenerateStream(req))
    *deltas, last = chunks
    assert all(c.WhichOneof("event") == "delta" for c in deltas)
    assert last.WhichOneof("event") == "final"
    final = last.final

    texts, tokens = ["", "", ""], [0, 0, 0]
    for c in deltas:
        texts[c.delta.index] += c.delta.text
        tokens[c.delta.index] += c.delta.token_count
    assert len(deltas) >= 3, "expected incremental chunks, not one blob"

    unary = stub.Generate(req)
    assert texts == [s.text for s in unary.samples]
    assert final.prompt_id and final.version == unary.version and final.logged
    assert [s.index for s in final.samples] == [0, 1, 2]
    assert [s.token_count for s in final.samples] == tokens
    assert all(s.sample_id and s.finish_reason for s in final.samples)


def test_step_deltas_stream_one_message_per_engine_step_with_the_same_text(channel):
    stub = _stub(channel)
    req = _request(n=3, max_tokens=10, seed=11)
    per_sample = list(stub.GenerateStream(req))[:-1]
    req.step_deltas = True
    *steps, last = list(stub.GenerateStream(req))
    assert all(c.WhichOneof("event") == "step" for c in steps)
    assert last.WhichOneof("event") == "final"

    texts, tokens = ["", "", ""], [0, 0, 0]
    for c in steps:
        indexes = [d.index for d in c.step.deltas]
        assert len(indexes) == len(set(indexes)) >= 1, "at most one delta per sample a step"
        for d in c.step.deltas:
            texts[d.index] += d.text
            tokens[d.index] += d.token_count
    assert max(len(c.step.deltas) for c in steps) == 3, "the samples advance together"
    assert len(per_sample) >= 2 * len(steps), (len(per_sample), len(steps))

    unary = stub.Generate(_request(n=3, max_tokens=10, seed=11))
    assert texts == [s.text for s in unary.samples]
    assert [s.token_count for s in last.final.samples] == tokens
    assert all(s.text == "" for s in last.final.samples), "the steps carried the text"


def test_async_sdk_reads_step_deltas(server):
    """AsyncClient.generate_stream(step_deltas=True), read with stream_deltas."""

    async def run() -> tuple[list[str], list[str], list[str]]:
        async with AsyncClient(server.target, timeout=120) as client:
            kw = dict(n=2, max_tokens=8, seed=3, temperature=1.0)
            texts, events = ["", ""], []
            async for chunk in client.generate_stream("sort: c a b", step_deltas=True, **kw):
                events.append(chunk.WhichOneof("event"))
                for d in stream_deltas(chunk):
                    texts[d.index] += d.text
            unary = await client.generate("sort: c a b", **kw)
            return texts, [s.text for s in unary.samples], events

    texts, unary, events = asyncio.run(run())
    assert texts == unary
    assert set(events[:-1]) == {"step"} and events[-1] == "final"


def _wait_engine_idle(server, timeout=5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if server.metric("instructloop_engine_unfinished_requests") == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError("the engine still runs the request after the client went away")


def test_client_disconnect_aborts_the_engine_request(channel, server):
    stub = _stub(channel)
    long_request = _request(n=16, max_tokens=512, sampling={"temperature": 1.0})
    stream = stub.GenerateStream(long_request)
    next(stream)  # generation has started
    assert server.metric("instructloop_engine_unfinished_requests") >= 1
    stream.cancel()
    _wait_engine_idle(server, timeout=3.0)

    # A unary call whose deadline passes is aborted the same way.
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(long_request, timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_engine_idle(server, timeout=3.0)


def test_health_reflection_and_metrics(channel, server):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in reply.list_services_response.service}
    assert {"instructloop.v1.InstructLoop", "grpc.health.v1.Health"} <= names

    before = server.metric("instructloop_requests_total")
    _stub(channel).Generate(_request(n=2, max_tokens=4))
    assert server.metric("instructloop_requests_total") == before + 1
    assert server.metric("instructloop_generated_tokens_total") > 0
    assert server.metric('instructloop_served_version{version="v0"}') == 1
