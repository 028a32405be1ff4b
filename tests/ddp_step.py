"""A reward-model step, a PPO update and an SFT step on fixed global batches: in one
process, or under torchrun (each rank its shard). Rank 0 saves the gradients, the updated
weights and every rank's count of what the losses are means over, for
test_learner_distributed.py to compare.

    python tests/ddp_step.py MODEL_DIR OUT.pt
    torchrun --nproc_per_node 2 ... tests/ddp_step.py MODEL_DIR OUT.pt

The shards are deliberately unequal: with two ranks, rank 0 holds two of the RM's three
prompts and the long PPO responses and ptx texts, rank 1 the rest; a second RM step has
one prompt, so rank 1's shard is empty; one of SFT's four demonstrations is much longer
than the others. A loss averaged per rank and then over ranks would differ from the
global mean.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from instructloop.learner import distributed
from instructloop.learner.config import PPOConfig, RewardConfig
from instructloop.learner.dataset import Comparison
from instructloop.learner.ppo import experience, load_policy, ppo_step, rollout_of, train_ppo
from instructloop.learner.reward import (
    ValueHead,
    load_reward_model,
    reward_step,
    train_reward_model,
)

NO_CLIP = 1e9  # gradient clipping off: the raw gradients are what is compared
# SGD, not the trainers' AdamW: Adam's first step is lr * sign(grad), which turns float
# noise in a near-zero gradient into a full-size weight difference. With SGD the updated
# weights differ exactly as much as the gradients do.

COMPARISONS = [  # K = 4, 2, 3: rank 0 gets the first and last (2 prompts), rank 1 one
    Comparison("f1", "p1", "u1", "sort: d c b a", [" a b c d", " d c", " b", " a b"], [0, 1, 2, 3]),
    Comparison("f2", "p2", "u2", "reverse: abc", [" cba", " abc abc abc"], [0, 1]),
    Comparison("f3", "p3", "u3", "upper: hi", [" HI", " hi there you", " Hi"], [0, 2, 1]),
]
PROMPTS = ["sort: b a", "reverse: xy", "upper: word", "sort: c a b"]
RESPONSES = [  # ranks 0 and 1 alternate: rank 0 gets the long ones
    " a b and then some more words of a long answer",
    " yx",
    " WORD is the answer to this question as you asked",
    " a",
]
DEMONSTRATIONS = [  # SFT's global batch of 4: whichever rank gets the first has more tokens
    ("sort: d c b a e f g h", " a b c d e f g h and a long explanation of how it was sorted"),
    ("upper: a", " A"),
    ("reverse: ab", " ba"),
    ("sort: b a", " a b"),
]
PTX = ["sort: c b a a b c and a long demonstration text to learn from", "upper: x X"]


def grads_and_weights(named) -> tuple[dict, dict]:
    """Gradients and weights by name, full tensors (a sharded one is gathered: every rank
    must call this, in the same order)."""
    grads, weights = {}, {}
    for name, p in named:
        if p.requires_grad:
            grads[name] = full(p.grad).clone()
            weights[name] = full(p).clone()
    return grads, weights


def full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def sft_step(model_dir: str) -> dict:
    """The weight change of one SGD step of TRL's SFTTrainer with run_sft's arguments."""
    import tempfile

    from datasets import Dataset as HFDataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from instructloop.learner.config import SFTStepConfig
    from instructloop.learner.sft import trainer_args

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = HFDataset.from_list([{"prompt": p, "completion": c} for p, c in DEMONSTRATIONS])
    cfg = SFTStepConfig(max_steps=1, batch_size=4, learning_rate=0.1, max_length=64)
    with tempfile.TemporaryDirectory() as scratch:
        args = trainer_args(cfg, scratch, on_cuda=False, optim="sgd", max_grad_norm=NO_CLIP)
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def rm_and_ppo(model_dir: str, sharding: str, save_dir: Path | None = None) -> dict:
    """Two RM steps and one PPO update, the models wrapped as `sharding` says (ddp, fsdp).
    save_dir: the updated policy is saved there as train_ppo saves it."""
    world, rank = distributed.world_size(), distributed.rank()
    result: dict = {}

    # ---- one reward-model step on the 3 prompts
    torch.manual_seed(0)
    rm, tokenizer = load_reward_model(model_dir)
    rm.train()
    head = distributed.wrap(ValueHead(rm), "cpu", sharding)
    optim = torch.optim.SGD(rm.parameters(), lr=1e-2)
    rm_cfg = RewardConfig(max_length=64, max_grad_norm=NO_CLIP)
    loss, pairs = reward_step(head, optim, tokenizer, COMPARISONS, rm_cfg, "cpu")
    result["rm_loss"], result["rm_pairs"] = loss, pairs
    result["rm_grads"], result["rm_weights"] = grads_and_weights(rm.named_parameters())
    counts = torch.zeros(world)
    counts[rank] = len(distributed.shard(COMPARISONS))
    result["rm_prompts_per_rank"] = distributed.all_sum(counts).tolist()
    # A batch smaller than the world: rank 1 forwards a prompt times 0 (DDP needs its backward).
    reward_step(head, optim, tokenizer, COMPARISONS[1:2], rm_cfg, "cpu")
    result["rm_small_batch_grads"], _ = grads_and_weights(rm.named_parameters())

    # ---- one PPO update (+ ptx) on the 4 episodes
    torch.manual_seed(0)
    cfg = PPOConfig(
        max_new_tokens=16, max_prompt_length=32, max_grad_norm=NO_CLIP, ptx_coef=0.5,
        ptx_batch_size=2,
    )  # fmt: skip
    policy, ptok = load_policy(model_dir)
    ref, _ = load_policy(model_dir)
    reward_model, rtok = load_reward_model(model_dir)
    value_model, _ = load_reward_model(model_dir)
    for m in (ref, reward_model):
        m.requires_grad_(False)
    for m in (policy, ref, reward_model, value_model):
        m.eval()
    value_head, reward_head = ValueHead(value_model), ValueHead(reward_model)
    policy_net = distributed.wrap(policy, "cpu", sharding)
    value_net = distributed.wrap(value_head, "cpu", sharding)
    ref = distributed.wrap(ref, "cpu", sharding)
    reward_head = distributed.wrap(reward_head, "cpu", sharding)
    optim = torch.optim.SGD(
        [{"params": list(policy.parameters())}, {"params": value_model.parameters()}], lr=1e-2
    )
    prompts, responses = distributed.shard(PROMPTS), distributed.shard(RESPONSES)
    ro = rollout_of(policy, ref, ptok, prompts, responses, cfg)
    exp = experience(ro, reward_head, rtok, value_head, cfg)
    stats = ppo_step(
        policy=policy_net, value_head=value_net, optim=optim, ro=ro, exp=exp,
        idx=torch.arange(len(prompts)), cfg=cfg, tokenizer=ptok,
        ptx_texts=distributed.shard(PTX),
    )  # fmt: skip
    result["ppo_stats"] = stats
    result["policy_grads"], result["policy_weights"] = grads_and_weights(policy.named_parameters())
    result["value_grads"], result["value_weights"] = grads_and_weights(
        value_model.named_parameters()
    )
    counts = torch.zeros(world)
    counts[rank] = ro.mask.sum()
    result["ppo_tokens_per_rank"] = distributed.all_sum(counts).tolist()
    # What this rank holds of the policy's weights: all of them, or its shard under FSDP.
    result["policy_numel_held"] = sum(
        (p.to_local() if isinstance(p, DTensor) else p).numel() for p in policy.parameters()
    )
    result["policy_numel"] = sum(p.numel() for p in policy.parameters())
    if save_dir is not None:  # as train_ppo saves: gathered on every rank, written by rank 0
        state = distributed.full_state_dict(policy)
        if distributed.is_main():
            policy.save_pretrained(save_dir, state_dict=state)
    return result


def sharded_runs(model_dir: str, work: Path) -> dict:
    """train_reward_model and train_ppo themselves with sharding "fsdp" (one process: as
    plain). The RM's checkpoint is compared with one process's; PPO samples with HF
    generate (synced_gpus on two ranks), so its result is only loaded, not compared."""
    comparisons = [*COMPARISONS, *COMPARISONS]  # 2 steps of 3 prompts
    rm_cfg = RewardConfig(batch_prompts=3, max_length=64, eval_batch_size=4)
    metrics = train_reward_model(
        rm_cfg, comparisons, model_dir, work / "rm", heldout=COMPARISONS[:2], sharding="fsdp"
    )
    dist_barrier()  # rank 0 has written the RM the next run loads
    cfg = PPOConfig(
        iterations=1, rollout_prompts=4, minibatch_size=4, ppo_epochs=1, max_new_tokens=6,
        max_prompt_length=32,
    )  # fmt: skip
    train_ppo(cfg, PROMPTS, model_dir, work / "rm", work / "ppo", sharding="fsdp")
    return {"rm_metrics": metrics}


def dist_barrier() -> None:
    distributed.all_sum(0.0)


def main(model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    world = distributed.world_size()
    work = Path(out).with_suffix("")  # checkpoints: OUT/fsdp-policy, OUT/rm, OUT/ppo
    result: dict = {"world": world, "work": str(work)}
    # One process: "ddp" and "fsdp" are both the plain model; two ranks run both.
    result["ddp"] = rm_and_ppo(model_dir, "ddp")
    if world > 1:
        result["fsdp"] = rm_and_ppo(model_dir, "fsdp", save_dir=work / "fsdp-policy")
    else:
        result["fsdp"] = result["ddp"]
    result.update(sharded_runs(model_dir, work))

    # ---- one SFT step with run_sft's Trainer arguments (SGD, no clipping)
    result["sft_updates"] = sft_step(model_dir)
    if distributed.is_main():
        torch.save(result, out)
    distributed.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
