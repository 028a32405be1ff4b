"""One reward-model step and one PPO update on a fixed global batch: in one process, or
under torchrun (each rank its shard). Rank 0 saves the gradients, the updated weights
and every rank's count of what the losses are means over, for test_learner_distributed.py
to compare.

    python tests/ddp_step.py MODEL_DIR OUT.pt
    torchrun --nproc_per_node 2 ... tests/ddp_step.py MODEL_DIR OUT.pt

The shards are deliberately unequal: with two ranks, rank 0 holds two of the RM's three
prompts and the long PPO responses and ptx texts, rank 1 the rest. A loss averaged per
rank and then over ranks would then differ from the global mean.
"""

from __future__ import annotations

import sys

import torch

from instructloop.learner import distributed
from instructloop.learner.config import PPOConfig, RewardConfig
from instructloop.learner.dataset import Comparison
from instructloop.learner.ppo import experience, load_policy, ppo_step, rollout_of
from instructloop.learner.reward import ValueHead, load_reward_model, reward_step

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
PTX = ["sort: c b a a b c and a long demonstration text to learn from", "upper: x X"]


def grads_and_weights(named) -> tuple[dict, dict]:
    grads, weights = {}, {}
    for name, p in named:
        if p.requires_grad:
            grads[name] = p.grad.detach().clone()
            weights[name] = p.detach().clone()
    return grads, weights


def main(model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    world, rank = distributed.world_size(), distributed.rank()
    result: dict = {"world": world}

    # ---- one reward-model step on the 3 prompts
    torch.manual_seed(0)
    rm, tokenizer = load_reward_model(model_dir)
    rm.train()
    head = distributed.wrap(ValueHead(rm), "cpu")
    optim = torch.optim.SGD(rm.parameters(), lr=1e-2)
    rm_cfg = RewardConfig(max_length=64, max_grad_norm=NO_CLIP)
    loss, pairs = reward_step(head, optim, tokenizer, COMPARISONS, rm_cfg, "cpu")
    result["rm_loss"], result["rm_pairs"] = loss, pairs
    result["rm_grads"], result["rm_weights"] = grads_and_weights(rm.named_parameters())
    counts = torch.zeros(world)
    counts[rank] = len(distributed.shard(COMPARISONS))
    result["rm_prompts_per_rank"] = distributed.all_sum(counts).tolist()

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
    policy_net = distributed.wrap(policy, "cpu")
    value_net = distributed.wrap(ValueHead(value_model), "cpu")
    optim = torch.optim.SGD(
        [{"params": list(policy.parameters())}, {"params": value_model.parameters()}], lr=1e-2
    )
    prompts, responses = distributed.shard(PROMPTS), distributed.shard(RESPONSES)
    ro = rollout_of(policy, ref, ptok, prompts, responses, cfg)
    exp = experience(ro, reward_model, rtok, value_model, cfg)
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
    if distributed.is_main():
        torch.save(result, out)
    distributed.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
