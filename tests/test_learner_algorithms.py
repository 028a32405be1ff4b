"""`instructloop learn --algorithm dpo|grpo|rloo|sft`: each one's round publishes through
the same gate, store and registry as PPO's, and the serving replica hot-swaps to it.

One real server (vLLM on the tiny model) and one learner data dir for the module: each
algorithm runs one real round (TRL's trainer, a few steps) on new logged feedback, from
the version the previous test promoted. Then: the version records its algorithm, its
weights moved (DPO: the chosen answers gained log-probability over the rejected ones),
and the server answers with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import torch
from conftest import launch_server, stop_server, wait_serving

from instructloop.cli import main
from instructloop.clients import Client
from instructloop.keys import DATA_FIELD, Keys
from instructloop.learner import rounds, synthetic
from instructloop.learner.algorithms import RewardModelScore, dpo_pairs, ptx_texts, train_policy
from instructloop.learner.config import (
    AlignConfig,
    LearnerConfig,
    PPOConfig,
    RewardConfig,
    RoundConfig,
    SFTStepConfig,
)
from instructloop.learner.consumer import ConsumerConfig
from instructloop.learner.dataset import (
    Comparison,
    Dataset,
    DatasetConfig,
    Demonstration,
    user_split,
)
from instructloop.learner.main import Configs, run
from instructloop.learner.ppo import PPOStopped, load_policy, rollout_of
from instructloop.learner.reward import load_reward_model
from instructloop.pretrain import PretrainConfig, pretraining_corpus
from instructloop.registry import Registry, load_registry_key
from instructloop.secretfile import load_secret
from instructloop.store import ModelStore
from instructloop.users import UserStore

PREFIX = "algos"
HELDOUT = 0.25
SALT = "5eed" * 16  # a fixed split key: the gate always has held-out prompts
PERMISSIVE = dict(win_rate_threshold=-1.0, max_kl=1e9)  # promotion is not what is tested
PPO = PPOConfig(iterations=2, rollout_prompts=8, max_new_tokens=8, max_prompt_length=32)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------- units


def test_dpo_pairs_are_the_rankings_pairs_and_ties_give_none():
    c = Comparison("f1", "p1", "u1", "P:", ["a", "b", "c", "d"], tiers=[1, 0, 1, 2])
    tied = Comparison("f2", "p2", "u1", "Q:", ["x", "y"], tiers=[0, 0])
    # b (tier 0) beats a, c, d; a and c (tier 1, tied with each other) beat d.
    assert dpo_pairs([c, tied]) == [
        {"prompt": "P:", "chosen": "b", "rejected": "a"},
        {"prompt": "P:", "chosen": "a", "rejected": "d"},
        {"prompt": "P:", "chosen": "b", "rejected": "c"},
        {"prompt": "P:", "chosen": "b", "rejected": "d"},
        {"prompt": "P:", "chosen": "c", "rejected": "d"},
    ]


def test_the_reward_function_is_our_reward_models_score(tiny_model, tmp_path):
    prompts, answers = ["reverse: abc\n", "sort: b a\n"], ["cba", "a b b a"]
    rm, rm_tokenizer = load_reward_model(tiny_model)  # a score head of its own, saved
    rm.save_pretrained(tmp_path / "rm")
    rm_tokenizer.save_pretrained(tmp_path / "rm")
    reward = RewardModelScore(tmp_path / "rm")
    got = reward(prompts=prompts, completions=answers, completion_ids=None)
    # The same RM through HF's own pooling (the last non-pad token), one text at a time.
    model, tokenizer = load_reward_model(tmp_path / "rm")
    with torch.no_grad():
        want = [
            model(**tokenizer(p + a + tokenizer.eos_token, return_tensors="pt")).logits[0, 0]
            for p, a in zip(prompts, answers, strict=True)
        ]
    assert got == pytest.approx([w.item() for w in want], abs=1e-5)
    assert reward.step_means == [pytest.approx(sum(got) / 2)] and reward.samples == 2


def test_grpo_is_held_to_our_reference_not_its_start(tiny_model, tmp_path):
    """TRL builds GRPO's reference from the policy's config name; train_policy points it
    at ref_dir. With a reference other than the start, the KL of the first step (taken
    before any update) is not 0, as it would be against the start."""
    from instructloop.tinymodel import TinyModelConfig, build_tiny_model

    other = build_tiny_model(tmp_path / "other", TinyModelConfig(seed=7))
    m = train_policy(
        "grpo", ppo_cfg=PPO, align_cfg=AlignConfig(rl_num_generations=4, rl_episodes=4,
        rl_batch_size=4), prompts=["reverse: abc\n"], comparisons=[], policy_dir=tiny_model,
        reward_dir=tiny_model, ref_dir=other, out_dir=tmp_path / "out",
    )  # fmt: skip
    assert (m["episodes"], m["steps"]) == (4, 1)
    assert m["kl_first"] > 0.01, m
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert str(other) not in json.dumps(saved)  # the name was put back before saving


@pytest.mark.parametrize("algorithm", ["dpo", "grpo"])
def test_a_trl_trainer_stops_at_the_step_after_the_stop_event_and_saves_nothing(
    algorithm, tiny_model, tmp_path
):
    """What SIGTERM does to a learner training with a TRL trainer: the signal sets the
    round's stop event, our callback ends training at the end of the step in hand, and
    train_policy raises PPOStopped with nothing saved (the round is abandoned, as PPO's)."""
    stop = threading.Event()
    stop.set()  # set before the first step ends: training stops after it, of 2
    comparisons = [Comparison("f1", "p1", "u1", "reverse: ab\n", ["ba", "ab"], tiers=[0, 1])]
    with pytest.raises(PPOStopped, match=f"{algorithm} stopped at step 1"):
        train_policy(
            algorithm, ppo_cfg=PPO, prompts=["reverse: abc\n"], comparisons=comparisons * 4,
            align_cfg=AlignConfig(dpo_batch_size=2, dpo_max_steps=2, rl_num_generations=2,
                                  rl_episodes=4, rl_batch_size=2),
            policy_dir=tiny_model, reward_dir=tiny_model, ref_dir=tiny_model,
            out_dir=tmp_path / "out", stop=stop,
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_ptx_text_is_the_demonstrations_or_the_pretraining_corpus():
    demo = Demonstration("f1", "p1", "u1", "reverse: ab\n", "ba")
    assert ptx_texts(PPOConfig(ptx_coef=0.0), [demo]) == []
    assert ptx_texts(PPOConfig(ptx_coef=0.1), [demo]) == ["reverse: ab\nba"]
    corpus = ptx_texts(PPOConfig(ptx_coef=0.1, ptx_data="corpus", ptx_documents=3), [demo])
    assert corpus == pretraining_corpus(PretrainConfig().seed, 3)  # what the base learned
    assert not set(corpus) & set(pretraining_corpus(99991, 50))  # never the held-out docs


def test_refused_at_start(monkeypatch, capsys):
    def cfgs(algorithm: str, kind: str = "full") -> Configs:
        return Configs(
            LearnerConfig(device="cpu"), ConsumerConfig(), RoundConfig(kind=kind),
            SFTStepConfig(), RewardConfig(), PPOConfig(), AlignConfig(algorithm=algorithm),
        )  # fmt: skip

    with pytest.raises(ValueError, match="--kind lora"):
        cfgs("dpo", kind="lora")
    with pytest.raises(ValueError, match="rl-num-generations"):
        Configs(
            LearnerConfig(device="cpu"), ConsumerConfig(), RoundConfig(), SFTStepConfig(),
            RewardConfig(), PPOConfig(rollout_prompts=6), AlignConfig(algorithm="grpo"),
        )  # fmt: skip
    assert cfgs("ppo", kind="lora").ppo.lora  # PPO keeps LoRA
    # The command refuses before it consumes or trains anything, with a one-line reason.
    assert main(["learn", "--algorithm", "grpo", "--kind", "lora"]) == 2
    assert "--kind lora is ppo's" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="torchrun"):
        cfgs("rloo")


# ---------------------------------------------------------------------------- rounds


@pytest.fixture(scope="module")
def deployment(tiny_model, single_redis, tmp_path_factory):
    """A server and a learner dir sharing DATA_DIR: the store, registry key, split key."""
    work = tmp_path_factory.mktemp("algorithms")
    (work / "split-salt").write_text(SALT + "\n")
    server = launch_server(tiny_model, single_redis.url, work, PREFIX, "--poll-interval-s", "1")
    try:
        wait_serving(server.target, server.proc, server.log_path, 300)
        with Client(server.target, timeout=60) as client:
            yield work, single_redis, client
    finally:
        assert stop_server(server) == 0, server.log_tail()


def configs(work, url: str, algorithm: str) -> Configs:
    return Configs(
        learner=LearnerConfig(
            redis_url=url, redis_prefix=PREFIX, model_store=str(work / "store"),
            data_dir=str(work / "learner"), heldout_fraction=HELDOUT, max_rounds=1,
        ),
        consumer=ConsumerConfig(consumer="test", block_ms=50),
        round=RoundConfig(min_comparisons=10, gate_prompts=4, gate_samples_per_prompt=1,
                          **PERMISSIVE),  # fmt: skip
        sft=SFTStepConfig(min_demonstrations=4, max_steps=2, batch_size=4, learning_rate=1e-3),
        rm=RewardConfig(learning_rate=1e-3, batch_prompts=8, max_length=64),
        ppo=PPO,
        align=AlignConfig(
            algorithm=algorithm, dpo_learning_rate=1e-3, dpo_batch_size=8,
            rl_learning_rate=1e-4, rl_num_generations=4,
        ),
    )  # fmt: skip


def registry_call(url: str, work, fn):
    async def go():
        client = aioredis.Redis.from_url(url)
        try:
            key = load_registry_key(work / "registry-key")
            return await fn(Registry(client, Keys(PREFIX), key))
        finally:
            await client.aclose()

    return asyncio.run(go())


def log_feedback(redis, seed: int, demonstrations: bool = True) -> tuple[list, list]:
    """New rankings, and (unless told not to) demonstrations for half their prompts
    (enough for an SFT run), XADDed as the server logs them."""
    data = synthetic.preference_data(16, k=4, n_users=20, seed=seed)
    demos = [
        (p, synthetic.demonstration_record(f"demo{seed}-{i}", p, " good good", p.user_id))
        for i, (p, _) in enumerate(data[:8] if demonstrations else ())
    ]
    r, keys = redis.client(), Keys(PREFIX)
    for prompt, feedback in data + demos:
        r.xadd(keys.prompts_stream, {DATA_FIELD: prompt.SerializeToString()})
        r.xadd(keys.feedback_stream, {DATA_FIELD: feedback.SerializeToString()})
    return data, demos


def is_train(feedback) -> bool:
    return user_split(feedback.feedback.user_id, HELDOUT, SALT.encode()) == "train"


def mean_logratio(policy_dir, pairs) -> float:
    """Mean over pairs of log pi(chosen) - log pi(rejected), each answer ending in EOS."""
    policy, tokenizer = load_policy(policy_dir)
    prompts = [p["prompt"] for p in pairs]

    def logp(key: str) -> torch.Tensor:
        ro = rollout_of(policy, policy, tokenizer, prompts, [p[key] for p in pairs], PPO)
        return (ro.logp * ro.mask).sum(-1)  # [B]

    return (logp("chosen") - logp("rejected")).mean().item()


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "grpo", "rloo"])
def test_round_publishes_and_hot_swaps(deployment, algorithm):
    work, redis, client = deployment
    url = redis.url
    serving = client.get_model().version
    data, demos = log_feedback(redis, seed=40 + ["sft", "dpo", "grpo", "rloo"].index(algorithm))

    t0 = time.perf_counter()
    assert run(configs(work, url, algorithm)) == 0
    seconds = time.perf_counter() - t0
    store = ModelStore(work / "store")
    state = json.loads((work / "learner" / "state.json").read_text())
    [m] = [v for v in store.list() if v.id == state["last_version"]]
    sft = store.verify(state["sft_version"])  # this round's SFT-only version

    # The same path as PPO's: lineage, the gate's verdict, the algorithm on record.
    assert m.gate["algorithm"] == algorithm and m.gate["passed"], m.gate
    assert m.gate["reason"].startswith(f"{algorithm}: win rate")
    assert m.parent == serving and m.kind == "full"
    trained = {f.feedback_id for _, f in data + demos if is_train(f)}
    assert trained <= set(m.feedback_ids)
    assert sft.metrics["round"] == m.metrics["round"] == state["round"]
    info = registry_call(url, work, lambda reg: reg.get(m.id))
    assert info.gate.passed and "algorithm" not in info.gate.measures  # numbers only
    assert registry_call(url, work, lambda reg: reg.alias("current")) == m.id

    # It trained (or, for sft, it is exactly the SFT policy).
    weights = (store.path(m.id) / "model.safetensors").read_bytes()
    same = weights == (store.path(sft.id) / "model.safetensors").read_bytes()
    assert same if algorithm == "sft" else not same
    if algorithm == "dpo":
        comparisons = [
            Comparison(f.feedback_id, p.prompt_id, p.user_id, p.prompt,
                       [s.text for s in p.samples],
                       [0 if i in f.feedback.ranking.tiers[0].sample_ids else 1
                        for i in (s.sample_id for s in p.samples)])
            for p, f in data if is_train(f)
        ]  # fmt: skip
        pairs = dpo_pairs(comparisons)
        assert m.metrics["policy_pairs"] >= len(pairs) > 0
        before, after = (
            mean_logratio(store.path(sft.id), pairs),
            mean_logratio(store.path(m.id), pairs),
        )
        assert after > before + 0.1, (before, after)  # chosen answers gained on rejected ones
        assert m.metrics["policy_margin_last"] > 0
    if algorithm in ("grpo", "rloo"):
        assert m.metrics["policy_episodes"] == PPO.iterations * PPO.rollout_prompts
        assert m.metrics["policy_steps"] == 2
        assert math.isfinite(m.metrics["policy_score_first"])
        assert math.isfinite(m.metrics["policy_kl_last"])

    # The replica hot-swaps to it.
    deadline = time.monotonic() + 60
    while client.get_model().version != m.id:
        assert time.monotonic() < deadline, f"server still on {client.get_model().version}"
        time.sleep(0.2)
    assert client.generate("reverse: abc\n", max_tokens=4, log=False).version == m.id
    print(f"\n{algorithm} round: {seconds:.1f}s, metrics {m.metrics}")


def test_sft_round_without_new_demonstrations_is_skipped(deployment, caplog):
    """No new demonstrations: --algorithm sft has nothing to offer; the round is skipped
    with a log line that says why, and publishes nothing."""
    work, redis, _ = deployment
    cfgs = configs(work, redis.url, "sft")
    loop = asyncio.new_event_loop()
    aclient = aioredis.Redis.from_url(redis.url)
    dataset = Dataset(
        DatasetConfig(
            path=str(work / "learner" / "dataset.sqlite3"), heldout_fraction=HELDOUT,
            split_salt=load_secret(work / "split-salt", "split salt"),
        )
    )  # fmt: skip
    # New rankings and no new demonstrations (run alone, the module's earlier rounds have
    # not logged any: without these the round would stop at "no comparisons and no RM").
    for prompt, feedback in synthetic.preference_data(16, k=4, n_users=20, seed=50):
        dataset.add_prompt(prompt)
        dataset.add_feedback(feedback)
    store = ModelStore(work / "store")
    learner = rounds.Learner(
        work / "learner", dataset, store,
        Registry(aclient, Keys(PREFIX), load_registry_key(work / "registry-key")),
        UserStore(aclient, Keys(PREFIX)), loop, cfgs.round, cfgs.sft, cfgs.rm, cfgs.ppo,
        align_cfg=cfgs.align,
    )  # fmt: skip
    try:
        before = [v.id for v in store.list()]
        state = learner.state.round
        assert learner.due(now=time.time() + 1e6) is None  # not even on a timer
        with caplog.at_level(logging.INFO, logger="instructloop.learner.rounds"):
            assert learner.run_round("test") is None
        assert "--algorithm sft: 0 new training demonstrations" in caplog.text
        assert [v.id for v in store.list()] == before and learner.state.round == state
    finally:
        loop.run_until_complete(aclient.aclose())
        loop.close()
        dataset.close()


def test_start_from_reference_trains_the_reference_not_the_serving_policy(deployment):
    """--start-from-reference with no new demonstrations: the round's GRPO starts from the
    reference (the latest SFT policy), not from the serving version the earlier rounds
    trained; at a learning rate too small to move a weight, the candidate IS the
    reference's weights. Without the option it would be the serving version's."""
    from safetensors.torch import load_file

    work, redis, client = deployment
    serving = client.get_model().version
    state = json.loads((work / "learner" / "state.json").read_text())
    reference = state["sft_dir"]
    assert reference, "the module's earlier rounds ran SFT"
    log_feedback(redis, seed=60, demonstrations=False)
    cfgs = configs(work, redis.url, "grpo")
    cfgs.align.start_from_reference = True
    cfgs.align.rl_learning_rate = 1e-30
    assert run(cfgs) == 0

    store = ModelStore(work / "store")
    state = json.loads((work / "learner" / "state.json").read_text())
    [m] = [v for v in store.list() if v.id == state["last_version"]]
    assert m.parent == serving and m.gate["started_from"] == "reference", m.gate
    assert m.metrics["sft_demonstrations"] == 0 and state["sft_dir"] == reference  # no SFT ran

    def weights(path) -> dict:
        return load_file(str(path) + "/model.safetensors")

    cand, ref, serv = weights(store.path(m.id)), weights(reference), weights(store.path(serving))
    assert all(torch.equal(cand[k], ref[k]) for k in ref)
    assert not all(torch.equal(cand[k], serv[k]) for k in serv)
    with pytest.raises(ValueError, match="--kind lora"):
        Configs(
            LearnerConfig(device="cpu"), ConsumerConfig(), RoundConfig(kind="lora"),
            SFTStepConfig(), RewardConfig(), PPOConfig(), AlignConfig(start_from_reference=True),
        )  # fmt: skip


def test_gate_reward_model_second_judges_with_an_rm_the_candidate_never_saw(deployment):
    """--gate-reward-model second: the round trains a second RM beside its own (same
    comparisons and start, the next seed) and the gate's verdict is that RM's: the gate
    run again on the same prompts with the second RM gives the recorded numbers to the
    digit, with the round's own RM other ones."""
    from safetensors.torch import load_file

    from instructloop.learner.gate import evaluate_gate

    work, redis, _ = deployment
    log_feedback(redis, seed=70)
    cfgs = configs(work, redis.url, "ppo")
    cfgs.round.gate_reward_model = "second"
    assert run(cfgs) == 0

    state = json.loads((work / "learner" / "state.json").read_text())
    rm, second = Path(state["rm_dir"]), Path(state["gate_rm_dir"])
    assert rm.parent == second.parent and rm != second  # both from this round
    store = ModelStore(work / "store")
    [m] = [v for v in store.list() if v.id == state["last_version"]]
    assert m.gate["reward_model"] == "second", m.gate
    assert 0.0 <= m.metrics["gate_rm_heldout_accuracy"] <= 1.0, m.metrics
    a, b = load_file(str(rm / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)

    dataset = Dataset(
        DatasetConfig(
            path=str(work / "learner" / "dataset.sqlite3"), heldout_fraction=HELDOUT,
            split_salt=load_secret(work / "split-salt", "split salt"),
        )
    )  # fmt: skip
    try:
        prompts = dataset.gate_prompts(cfgs.round.gate_prompts, state["round"])
    finally:
        dataset.close()
    assert prompts

    parent = registry_call(redis.url, work, lambda registry: registry.get(m.parent))
    serving = Path(parent.path) if parent.kind == "base" else store.path(parent.id)

    def gate_with(reward_dir: Path) -> dict:
        return evaluate_gate(
            cfgs.round, cfgs.ppo, store.path(m.id), serving, Path(state["sft_dir"]),
            reward_dir, prompts,
        )  # fmt: skip

    again, own = gate_with(second), gate_with(rm)
    for key in ("win_rate", "candidate_score", "serving_score", "kl"):
        assert again[key] == m.gate[key], (key, again, m.gate)
    assert own["candidate_score"] != m.gate["candidate_score"]
    assert own["kl"] == m.gate["kl"]  # the same samples, judged by another RM
