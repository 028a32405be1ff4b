"""PPO throughput and the time of one learner round, split into its parts.

Runs one real round of the learner process (instructloop.learner.main.run) against an
embedded redis-server and a fresh model store: synthetic rankings and demonstrations are
XADDed as the server logs them, the base model is registered as v0, and the learner
consumes, runs SFT -> RM -> PPO -> gate and publishes v1. The numbers come from the
published version's metrics:

  - PPO episodes/s (episodes / PPO time) and PPO time split into rollout (HF generate, or
    with --rollout-engine vllm a colocated vLLM engine and its weight syncs, + policy and
    reference log-probs), scoring (RM + value model + GAE) and update;
  - the round's wall time split into phases (resolve, sft, reward model, ppo, gate,
    publish), publish being the rest of the wall time.

It also reads back every checkpoint the round wrote to the store (tensor dtypes from the
safetensors headers, config dtype): what the server will load.

Against TRL's PPOTrainer on the same settings: bench/ppo_vs_trl.py.

    python bench/ppo.py [--out bench/results/ppo.json] [--model DIR | --model-size 100m]
                        [--device cuda] [--kind lora] [--rollout-engine vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path

import redis.asyncio as aioredis
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from instructloop.keys import DATA_FIELD, Keys
from instructloop.learner import synthetic
from instructloop.learner.config import (
    LearnerConfig,
    PPOConfig,
    RewardConfig,
    RoundConfig,
    SFTStepConfig,
)
from instructloop.learner.consumer import ConsumerConfig
from instructloop.learner.device import resolve_device
from instructloop.learner.main import Configs, run
from instructloop.redis_embedded import EmbeddedRedis, free_port
from instructloop.registry import Registry
from instructloop.store import ModelStore
from instructloop.tinymodel import MODEL_SIZES, TinyModelConfig, build_tiny_model
from instructloop.v1 import admin_pb2

PHASES = ("resolve", "sft", "reward_model", "ppo", "gate")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", help="HF model dir (default: build one of --model-size)")
    model.add_argument(
        "--model-size", choices=list(MODEL_SIZES), default="tiny",
        help="shape of the locally built random-init model (instructloop.tinymodel)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="learner device: auto, cpu, cuda, cuda:N")
    p.add_argument("--kind", choices=("full", "lora"), default="full", help="what PPO trains")
    p.add_argument("--prompts", type=int, default=128, help="ranked prompts logged")
    p.add_argument("--k", type=int, default=4, help="answers ranked per prompt")
    p.add_argument("--demonstrations", type=int, default=32, help="demonstrations logged")
    p.add_argument(
        "--rollout-engine", choices=("hf", "vllm"), default="hf", help="what samples rollouts"
    )
    p.add_argument("--iterations", type=int, default=16, help="PPO iterations")
    p.add_argument("--rollout-prompts", type=int, default=16, help="episodes per iteration")
    p.add_argument("--minibatch-size", type=int, default=8, help="episodes per PPO step")
    p.add_argument("--ppo-epochs", type=int, default=4, help="passes over each rollout")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length limit")
    p.add_argument("--sft-steps", type=int, default=10, help="SFT steps")
    p.add_argument("--gate-prompts", type=int, default=32, help="held-out prompts of the gate")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    p.add_argument("--out", default="bench/results/ppo.json", help="JSON result file")
    return p.parse_args()


def log_records(url: str, prefix: str, args) -> None:
    import redis

    client, keys = redis.Redis.from_url(url), Keys(prefix)
    data = synthetic.preference_data(args.prompts, k=args.k, n_users=40, seed=0)
    demos = [
        (p, synthetic.demonstration_record(f"demo{i}", p, " good answer", p.user_id))
        for i, (p, _) in enumerate(data[: args.demonstrations])
    ]
    for prompt, feedback in data + demos:
        client.xadd(keys.prompts_stream, {DATA_FIELD: prompt.SerializeToString()})
        client.xadd(keys.feedback_stream, {DATA_FIELD: feedback.SerializeToString()})
    client.close()


async def register_base(url: str, prefix: str, model_dir: Path) -> None:
    client = aioredis.Redis.from_url(url)
    info = admin_pb2.VersionInfo(id="v0", kind="base", path=str(model_dir))
    await Registry(client, Keys(prefix)).ensure_base(info)
    await client.aclose()


def saved_checkpoints(store: ModelStore) -> dict:
    """Per version in the store: its kind, tensor dtypes (safetensors headers), config dtype."""
    out = {}
    for m in store.list():
        path = store.path(m.id)
        dtypes: Counter = Counter()
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(f, framework="pt") as st:  # the header only: no tensor is read
                names = st.keys()  # (safe_open is no mapping: it has keys() but no __iter__)
                dtypes.update(str(st.get_slice(k).get_dtype()) for k in names)
        config = path / "config.json"
        config_dtype = json.loads(config.read_text()).get("dtype") if config.exists() else None
        out[m.id] = {"kind": m.kind, "tensor_dtypes": dict(dtypes), "config_dtype": config_dtype}
    return out


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as work:
        work = Path(work)
        model_dir = (
            Path(args.model)
            if args.model
            else build_tiny_model(work / args.model_size, TinyModelConfig.of_size(args.model_size))
        )
        params = AutoModelForCausalLM.from_pretrained(model_dir).num_parameters()
        server = EmbeddedRedis(work / "redis", port=free_port()).start()
        try:
            prefix = "bench"
            asyncio.run(register_base(server.url, prefix, model_dir))
            log_records(server.url, prefix, args)
            cfgs = Configs(
                learner=LearnerConfig(
                    redis_url=server.url, redis_prefix=prefix, model_store=str(work / "store"),
                    data_dir=str(work / "learner"), heldout_fraction=0.2, max_rounds=1,
                    device=str(device),
                ),
                consumer=ConsumerConfig(consumer="bench", block_ms=50),
                round=RoundConfig(
                    min_comparisons=1, kind=args.kind, gate_prompts=args.gate_prompts,
                    gate_samples_per_prompt=1, win_rate_threshold=-1.0, max_kl=1e9,
                ),
                sft=SFTStepConfig(min_demonstrations=1, max_steps=args.sft_steps),
                rm=RewardConfig(),
                ppo=PPOConfig(
                    iterations=args.iterations, rollout_prompts=args.rollout_prompts,
                    minibatch_size=args.minibatch_size, ppo_epochs=args.ppo_epochs,
                    max_new_tokens=args.max_new_tokens, log_every=4,
                    rollout_engine=args.rollout_engine,
                ),
            )  # fmt: skip
            t0 = time.perf_counter()
            run(cfgs)
            wall = time.perf_counter() - t0
        finally:
            server.stop()
        # the candidate (in lora mode the SFT weights are a version of their own, before it)
        store = ModelStore(work / "store")
        [manifest] = [m for m in store.list() if "ppo_episodes" in m.metrics]
        m = manifest.metrics
        checkpoints = saved_checkpoints(store)

    ppo_s = m["ppo_rollout_s"] + m["ppo_scoring_s"] + m["ppo_update_s"]
    phases = {name: m.get(f"phase_{name}_s", 0.0) for name in PHASES}
    phases["consume_publish_rest"] = wall - sum(phases.values())
    result = {
        "benchmark": "ppo",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": args.model or f"{args.model_size} (instructloop.tinymodel, random init)",
        "parameters": params,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "gpu_peak_allocated_gib": (
                torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            ),
        },
        "ppo": {
            "episodes": m["ppo_episodes"],
            "episodes_per_s": m["ppo_episodes"] / ppo_s,
            "seconds": ppo_s,
            "rollout_s": m["ppo_rollout_s"],
            "scoring_s": m["ppo_scoring_s"],
            "update_s": m["ppo_update_s"],
        },
        "round": {"wall_s": wall, **{f"{k}_s": v for k, v in phases.items()}},
        "saved_checkpoints": checkpoints,
        "version_metrics": m,
    }

    pp = result["ppo"]
    print(
        f"\nPPO on {params / 1e6:.2f}M params, {args.kind}, rollouts by {args.rollout_engine}, "
        f"{device}{' (' + result['machine']['gpu'] + ')' if result['machine']['gpu'] else ''}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(f"{'part':<18} {'seconds':>8} {'share':>6}")
    for part in ("rollout", "scoring", "update"):
        print(f"{part:<18} {pp[part + '_s']:>8.2f} {pp[part + '_s'] / ppo_s:>6.0%}")
    print(f"{'PPO total':<18} {ppo_s:>8.2f}   {pp['episodes']:.0f} episodes, "
          f"{pp['episodes_per_s']:.2f} episodes/s")  # fmt: skip
    print(f"\n{'round phase':<18} {'seconds':>8} {'share':>6}")
    for name, secs in phases.items():
        print(f"{name:<18} {secs:>8.2f} {secs / wall:>6.0%}")
    print(f"{'round (wall)':<18} {wall:>8.2f}")
    for vid, c in checkpoints.items():
        print(
            f"saved {vid} ({c['kind']}): tensors {c['tensor_dtypes']}, config {c['config_dtype']}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
