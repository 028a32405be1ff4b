"""SubmitFeedback and bad input against the real server, read back from the real Redis."""

from __future__ import annotations

import math

import grpc
import pytest

from instructloop.clients import Client
from instructloop.keys import DATA_FIELD, Keys
from instructloop.redis_embedded import EmbeddedRedis
from instructloop.v1 import api_pb2, api_pb2_grpc, records_pb2

# Every test that reads Redis back runs on one Redis and on a real 3-master Redis Cluster,
# each with its own server.
pytestmark = pytest.mark.redis_kinds("single", "cluster")


@pytest.fixture
def client(server):
    with Client(server.target, timeout=60) as c:
        yield c


def feedback_records(redis_server, server) -> dict[str, records_pb2.FeedbackRecord]:
    entries = redis_server.client().xrange(Keys(server.prefix).feedback_stream)
    records = [records_pb2.FeedbackRecord.FromString(f[DATA_FIELD]) for _, f in entries]
    return {r.feedback_id: r for r in records}


def _ids(resp) -> list[str]:
    return [s.sample_id for s in resp.samples]


def test_each_feedback_kind_is_stored_and_readable(client, server, redis_server):
    gen = client.generate("sort: d b a", n=4, max_tokens=6, user_id="carol")
    s = _ids(gen)

    ranked = client.rank(gen.prompt_id, [s[2], (s[0], s[3]), s[1]], user_id="u-rank")
    rated = client.rate(gen.prompt_id, {s[0]: 6.5, s[1]: 2}, user_id="u-rate")
    demo = client.demonstrate(gen.prompt_id, "a b d", user_id="u-rank")
    pair = client.generate("reverse: xy", n=2, max_tokens=4)
    chose = client.choose(pair.prompt_id, pair.samples[1].sample_id, user_id="u-choose")

    stored = feedback_records(redis_server, server)
    r = stored[ranked.feedback_id]
    assert r.feedback.prompt_id == gen.prompt_id and r.feedback.user_id == "u-rank"
    assert [list(t.sample_ids) for t in r.feedback.ranking.tiers] == [[s[2]], [s[0], s[3]], [s[1]]]
    assert r.version == gen.version

    scores = {x.sample_id: x.score for x in stored[rated.feedback_id].feedback.rating.scores}
    assert scores == {s[0]: 6.5, s[1]: 2.0}

    assert stored[demo.feedback_id].feedback.demonstration.text == "a b d"

    choice = stored[chose.feedback_id].feedback.choice
    # With two samples the rejected one is filled in by the server.
    assert (choice.chosen_sample_id, choice.rejected_sample_id) == (
        pair.samples[1].sample_id,
        pair.samples[0].sample_id,
    )


def test_idempotent_retry_returns_the_first_result_and_stores_once(client, server, redis_server):
    gen = client.generate("uppercase: hello", n=3, max_tokens=4)
    s = _ids(gen)
    first = client.rank(gen.prompt_id, s, user_id="dora", idempotency_key="retry-1")
    again = client.rank(gen.prompt_id, s, user_id="dora", idempotency_key="retry-1")
    assert not first.duplicate and again.duplicate
    assert again.feedback_id == first.feedback_id
    stored = [r for r in feedback_records(redis_server, server).values()]
    assert sum(r.feedback.prompt_id == gen.prompt_id for r in stored) == 1

    # A second, different judgement by the same user is refused ...
    with pytest.raises(grpc.RpcError) as err:
        client.rank(gen.prompt_id, s[::-1], user_id="dora", idempotency_key="retry-2")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # ... and so is reusing a key for different content.
    with pytest.raises(grpc.RpcError) as err:
        client.rank(gen.prompt_id, s[::-1], user_id="dora", idempotency_key="retry-1")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency key" in err.value.details()


def test_idempotency_keys_of_different_users_never_collide(client, server, redis_server):
    # User "a" with key "b:c" and user "a:b" with key "c" once shared one Redis key, so the
    # second user's first judgement was refused as a reused key.
    gen = client.generate("uppercase: hello", n=2, max_tokens=4)
    s = _ids(gen)
    first = client.rank(gen.prompt_id, s, user_id="idem-a", idempotency_key="b:c")
    other = client.rank(gen.prompt_id, s[::-1], user_id="idem-a:b", idempotency_key="c")
    assert not other.duplicate and other.feedback_id != first.feedback_id
    stored = feedback_records(redis_server, server)
    users = {stored[f.feedback_id].feedback.user_id for f in (first, other)}
    assert users == {"idem-a", "idem-a:b"}


def _generate_bad(client, **overrides):
    request = api_pb2.GenerateRequest(prompt="hi", n=1)
    for path, value in overrides.items():
        target = request
        *parents, leaf = path.split(".")
        for p in parents:
            target = getattr(target, p)
        if isinstance(value, list):
            getattr(target, leaf).extend(value)
        else:
            setattr(target, leaf, value)
    return api_pb2_grpc.InstructLoopStub(client.channel).Generate(request, timeout=30)


BAD_GENERATE = [
    ({"prompt": ""}, "prompt is empty"),
    ({"n": 17}, "n=17"),
    ({"sampling.max_tokens": 100_000}, "max_tokens"),
    ({"sampling.temperature": -1.0}, "temperature"),
    ({"n": 2, "sampling.temperature": 0.0}, "greedy"),
    ({"sampling.top_p": 0.0}, "top_p"),
    ({"sampling.top_p": 1.5}, "top_p"),
    ({"sampling.top_k": -3}, "top_k"),
    ({"sampling.stop": ["x"] * 9}, "stop"),
    ({"sampling.stop": ["y" * 65]}, "stop"),
    ({"sampling.logprobs": 50}, "logprobs"),
    ({"prompt": "a" * 16_385}, "characters"),
    ({"prompt": "\u4e00" * 1500}, "tokens"),
    ({"user_id": "u" * 129}, "user_id"),
]


@pytest.mark.parametrize(("overrides", "mentions"), BAD_GENERATE)
def test_bad_generate_input_is_invalid_argument(client, overrides, mentions):
    with pytest.raises(grpc.RpcError) as err:
        _generate_bad(client, **overrides)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert mentions in err.value.details()


def test_bad_chat_and_missing_input(client):
    stub = api_pb2_grpc.InstructLoopStub(client.channel)
    for request, mentions in [
        (api_pb2.GenerateRequest(n=1), "set either prompt"),
        (api_pb2.GenerateRequest(chat=api_pb2.Chat()), "no messages"),
        (
            api_pb2.GenerateRequest(
                chat=api_pb2.Chat(messages=[api_pb2.ChatMessage(role="wizard", content="x")])
            ),
            "role",
        ),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert mentions in err.value.details()


def test_oversized_message_is_resource_exhausted(client):
    with pytest.raises(grpc.RpcError) as err:
        huge = api_pb2.GenerateRequest(prompt="a" * (2 << 20))
        api_pb2_grpc.InstructLoopStub(client.channel).Generate(huge, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_bad_feedback_gets_precise_codes_and_writes_nothing(client, server, redis_server):
    gen = client.generate("count: a b c", n=4, max_tokens=4)
    other = client.generate("count: d e", n=2, max_tokens=4)
    unlogged = client.generate("count: f", n=2, max_tokens=4, log=False)
    s, foreign = _ids(gen), other.samples[0].sample_id
    before = len(feedback_records(redis_server, server))

    def req(**kw) -> api_pb2.SubmitFeedbackRequest:
        kw.setdefault("prompt_id", gen.prompt_id)
        kw.setdefault("user_id", "eve")
        return api_pb2.SubmitFeedbackRequest(**kw)

    def ranking(*tiers) -> api_pb2.Ranking:
        return api_pb2.Ranking(tiers=[api_pb2.RankTier(sample_ids=list(t)) for t in tiers])

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        (req(user_id="", ranking=ranking([s[0]], [s[1]])), invalid, "user_id is required"),
        (req(prompt_id="", ranking=ranking([s[0]], [s[1]])), invalid, "prompt_id is required"),
        (req(), invalid, "set one feedback kind"),
        (req(ranking=ranking([s[0]], [foreign])), invalid, "is not a sample of prompt"),
        (req(ranking=ranking([s[0]], [s[0]])), invalid, "more than once"),
        (req(ranking=ranking([s[0]])), invalid, "at least 2 samples"),
        (req(ranking=ranking([s[0]], [])), invalid, "empty tier"),
        (req(choice=api_pb2.Choice(chosen_sample_id=s[0])), invalid, "rejected_sample_id"),
        (
            req(choice=api_pb2.Choice(chosen_sample_id=s[1], rejected_sample_id=s[1])),
            invalid,
            "same sample",
        ),
        (req(rating=api_pb2.Rating()), invalid, "no scores"),
        (
            req(rating=api_pb2.Rating(scores=[api_pb2.SampleScore(sample_id=s[0], score=9)])),
            invalid,
            "must be in",
        ),
        (
            req(
                rating=api_pb2.Rating(scores=[api_pb2.SampleScore(sample_id=s[0], score=math.nan)])
            ),
            invalid,
            "must be in",
        ),
        (req(demonstration=api_pb2.Demonstration(text="  ")), invalid, "empty"),
        (req(demonstration=api_pb2.Demonstration(text="x" * 16_385)), invalid, "characters"),
        (
            req(prompt_id="p-doesnotexist", ranking=ranking([s[0]], [s[1]])),
            grpc.StatusCode.NOT_FOUND,
            "unknown or expired",
        ),
        (
            req(prompt_id=unlogged.prompt_id, demonstration=api_pb2.Demonstration(text="x")),
            grpc.StatusCode.NOT_FOUND,
            "unknown or expired",
        ),
    ]
    for request, code, mentions in cases:
        with pytest.raises(grpc.RpcError) as err:
            client.submit_feedback(request)
        assert err.value.code() == code, (request, err.value.details())
        assert mentions in err.value.details(), err.value.details()

    assert len(feedback_records(redis_server, server)) == before, "bad feedback was stored"
    assert client.get_model().version, "the server must survive bad input"


@pytest.mark.redis_kinds("single")  # SIGKILLs and restarts the one redis-server
def test_acknowledged_feedback_survives_a_redis_crash(client, server, redis_server):
    gen = client.generate("reverse: redis", n=2, max_tokens=4)
    ack = client.choose(gen.prompt_id, gen.samples[0].sample_id, user_id="frank")

    redis_server.stop(kill=True)  # SIGKILL: no chance to flush anything on the way out
    try:
        # Redis is down: generation still serves (unlogged); feedback says UNAVAILABLE.
        down = client.generate("reverse: down", n=1, max_tokens=4)
        assert not down.logged
        with pytest.raises(grpc.RpcError) as err:
            client.demonstrate(gen.prompt_id, "sider", user_id="frank", timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        EmbeddedRedis.start(redis_server)

    stored = feedback_records(redis_server, server)
    assert ack.feedback_id in stored, "acknowledged feedback was lost in the crash"
    # The server reconnects by itself and keeps accepting feedback.
    again = client.demonstrate(gen.prompt_id, "sider", user_id="frank")
    assert again.feedback_id in feedback_records(redis_server, server)
