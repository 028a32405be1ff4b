"""Architecture families through the whole service, each against Llama in the same run.

For each family of instructloop/families.py (a tiny random-init model of that
architecture with a tokenizer and chat template like the real family's, built here):
  1. serve: our server (a subprocess on vLLM, LoRA enabled, real Redis) starts on it;
  2. generate: a plain prompt and a chat, greedy; the chat's token ids are checked for
     one BOS where the family has one;
  3. feedback through the public API: prompts sampled with n=4, ranked by a fixed rule
     by several users, and some demonstrations;
  4. learn (full): a learner round (SFT on the demonstrations, reward model, PPO), which
     publishes a full-weight version and promotes it through a permissive gate;
  5. swap (full): the time until the server answers from that version;
  6. learn (LoRA) on new feedback, and swap (LoRA): the same with a peft adapter whose
     target modules peft found in the model ("all-linear"), loaded by vLLM as a LoRA.
A step that fails records its error and the family goes on to what does not need it.
Where vLLM has no LoRA for the architecture (GPT-2 in vLLM 0.32), the server runs
without --enable-lora and the LoRA steps are recorded as not run, with the reason.
The times are against Llama's in the same run (ratio), since the machine is shared.

    python bench/families.py                      # all families
    python bench/families.py --families qwen2,gpt2
Prints a table and writes bench/results/families.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest's server launcher

from benchlib import write_result  # noqa: E402  (bench/ is on sys.path as a script)

TOKEN = "bench-admin-token"
GREEDY = {"n": 1, "max_tokens": 8, "temperature": 0.0}
SWAP_TIMEOUT_S = 120.0
STEPS = ("build", "serve", "generate", "learn_full", "swap_full", "learn_lora", "swap_lora")


def give_feedback(client, seed: int, prompts: int = 32, users: int = 16) -> None:
    """Sample prompts with n=4 and rank them (more distinct letters first, ties tied);
    every fourth prompt also gets a demonstration (its answer)."""
    import random

    from instructloop.loop.tasks import answer, make_prompt

    rng = random.Random(seed)
    for i in range(prompts):
        prompt, user = make_prompt(rng), f"u{seed}-{i % users}"
        # The learner splits train and held-out by the prompt's user.
        reply = client.generate(prompt, n=4, max_tokens=8, temperature=1.0, user_id=user)
        by_score: dict[int, list[str]] = {}
        for s in reply.samples:
            by_score.setdefault(-len(set(s.text)), []).append(s.sample_id)
        ranking = [tuple(ids) if len(ids) > 1 else ids[0] for _, ids in sorted(by_score.items())]
        if len(ranking) > 1:
            client.rank(reply.prompt_id, ranking, user_id=user)
        if i % 4 == 0:
            client.demonstrate(reply.prompt_id, answer(prompt), user_id=user)


def learner_configs(work: Path, redis_url: str, prefix: str, kind: str):
    from instructloop.learner.config import (
        LearnerConfig,
        PPOConfig,
        RewardConfig,
        RoundConfig,
        SFTStepConfig,
    )
    from instructloop.learner.consumer import ConsumerConfig
    from instructloop.learner.main import Configs

    return Configs(
        # The learner's secrets sit beside its data dir: in the server's data dir, so it
        # signs versions with the server's registry key.
        learner=LearnerConfig(
            redis_url=redis_url, redis_prefix=prefix, model_store=str(work / "store"),
            data_dir=str(work / "server" / "learner"), heldout_fraction=0.25, max_rounds=1,
        ),
        consumer=ConsumerConfig(consumer="bench", block_ms=50),
        round=RoundConfig(
            min_comparisons=16, kind=kind, gate_prompts=8, gate_samples_per_prompt=1,
            win_rate_threshold=-1.0, max_kl=1e9,
        ),
        sft=SFTStepConfig(min_demonstrations=4, max_steps=4, batch_size=4, learning_rate=1e-3),
        rm=RewardConfig(learning_rate=1e-3, batch_prompts=8, max_length=64),
        ppo=PPOConfig(
            iterations=2, rollout_prompts=8, minibatch_size=8, ppo_epochs=1,
            max_new_tokens=8, max_prompt_length=48, learning_rate=1e-4,
        ),
    )  # fmt: skip


def wait_version(client, version: str) -> float:
    """Seconds until a greedy Generate names `version` (raises after SWAP_TIMEOUT_S, with
    the server's last swap error)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < SWAP_TIMEOUT_S:
        reply = client.generate("reverse: abc\n", **GREEDY)
        if all(s.version == version for s in reply.samples) and reply.version == version:
            return time.perf_counter() - t0
        time.sleep(0.2)
    raise TimeoutError(
        f"not serving {version} after {SWAP_TIMEOUT_S:.0f}s; server says: "
        f"{client.get_model().last_swap_error or 'no swap error'}"
    )


def one_bos(model_dir: Path, reply_tokens: int, messages: list[dict]) -> str:
    """'yes' when the chat prompt the server encoded holds exactly one BOS, 'no (count)'
    when not, 'n/a' for a family whose tokenizer adds none."""
    from transformers import AutoTokenizer

    from instructloop.serve.engine import render_chat

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.encode(render_chat(tok, messages))
    if len(ids) != reply_tokens:
        return f"no (server encoded {reply_tokens} tokens, here {len(ids)})"
    if tok.bos_token_id is None or tok.encode("")[:1] != [tok.bos_token_id]:
        return "n/a"  # the family's tokenizer adds no BOS
    return "yes" if ids.count(tok.bos_token_id) == 1 else f"no ({ids.count(tok.bos_token_id)})"


def run_family(name: str, work: Path, redis_url: str) -> dict:
    from conftest import start_servers, stop_server

    from instructloop.clients import Client
    from instructloop.families import FAMILIES, build_family_model
    from instructloop.learner.main import run
    from instructloop.serve.engine import lora_unsupported
    from instructloop.store import ModelStore

    prefix = f"bench-family-{name}"
    row: dict = {"family": name, "architecture": FAMILIES[name].architecture, "seconds": {}}
    failed: dict[str, str] = {}
    row["errors"] = failed
    server = client = None

    def step(key: str, fn):
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # recorded in the table: the point is to see what fails
            failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc()
            return None
        row["seconds"][key] = round(time.perf_counter() - t0, 2)
        print(f"  {name}: {key} {row['seconds'][key]:.1f}s", flush=True)
        return out

    try:
        model = step("build", lambda: build_family_model(name, work / "model"))
        if model is None:
            return row
        no_lora = lora_unsupported(str(model))
        if no_lora:
            row["errors"]["lora"] = f"not run: {no_lora} (the server refuses --enable-lora)"
        extra = ("--model-store", str(work / "store"), "--admin-token", TOKEN,
                 "--poll-interval-s", "1", *([] if no_lora else ["--enable-lora"]))  # fmt: skip
        workdirs = [work / "server"]
        servers = step("serve", lambda: start_servers(model, redis_url, workdirs, prefix, *extra))
        if servers is None:
            return row
        (server,) = servers
        client = Client(server.target, timeout=60)
        messages = [{"role": "user", "content": "reverse: abc"}]

        def generate():
            plain = client.generate("reverse: abc\n", **GREEDY)
            chat = client.generate(messages=messages, **GREEDY)
            row["plain"] = plain.samples[0].text
            row["chat"] = chat.samples[0].text
            row["chat_one_bos"] = one_bos(model, chat.prompt_token_count, messages)
            assert plain.version == chat.version == "v0", (plain.version, chat.version)

        step("generate", generate)
        store = ModelStore(work / "store")

        def learn(kind: str, seed: int) -> str:
            give_feedback(client, seed)
            code = run(learner_configs(work, redis_url, prefix, kind))
            if code != 0:
                raise RuntimeError(f"learner exited {code}")
            latest = store.list()[-1]
            if latest.kind != kind:
                raise RuntimeError(f"the round published a {latest.kind} version, not {kind}")
            if kind == "lora":
                adapter = json.loads((store.path(latest.id) / "adapter_config.json").read_text())
                row["lora_targets"] = sorted(
                    {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]}
                )
            return latest.id

        full = step("learn_full", lambda: learn("full", 1))
        if full:
            step("swap_full", lambda: wait_version(client, full))
        lora = None if no_lora else step("learn_lora", lambda: learn("lora", 2))
        if lora:
            step("swap_lora", lambda: wait_version(client, lora))
    finally:
        if client is not None:
            client.close()
        if server is not None:
            stop_server(server)
    return row


def main() -> int:
    from instructloop.families import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "families.json"))
    args = parser.parse_args()
    names = [n for n in args.families.split(",") if n]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    if "llama" not in names:
        names.insert(0, "llama")  # the baseline of the ratios

    import os

    import torch

    from instructloop.redis_embedded import EmbeddedRedis, free_port

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-families-") as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis", port=free_port()).start()
        try:
            for name in names:
                print(f"{name}:", flush=True)
                rows.append(run_family(name, Path(tmp) / name, redis.url))
        finally:
            redis.stop()
    base = rows[0]["seconds"]
    print()
    header = f"{'family':9} {'architecture':20} " + " ".join(f"{s:>10}" for s in STEPS)
    print(header + "  LoRA targets / errors")
    for row in rows:
        cells = []
        for s in STEPS:
            if s in row["seconds"]:
                ratio = row["seconds"][s] / base[s] if base.get(s) else float("nan")
                cells.append(f"{row['seconds'][s]:5.1f}/{ratio:3.1f}x")
            else:
                cells.append(f"{'FAIL' if s in row['errors'] else '-':>10}")
        notes = (
            ",".join(row.get("lora_targets", []))
            + " "
            + "; ".join(f"{k}: {v}" for k, v in row["errors"].items())
        )
        print(f"{row['family']:9} {row['architecture']:20} " + " ".join(f"{c:>10}" for c in cells)
              + "  " + notes.strip())  # fmt: skip
    print("(seconds / ratio to llama in this run)")
    write_result(args.out, args, families=rows)
    refused = {"lora"}  # vLLM's own limit, recorded, not a failure of ours
    return 0 if all(set(r["errors"]) <= refused for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
