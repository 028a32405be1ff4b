"""bench/ppo_vs_trl.py compares our PPO with TRL's on the same reward model: TRL reads our
RM dir through ppo_trl_side.reward_model_for_trl. These tests check that TRL's reading
(trl.experimental.utils.get_reward, which TRL's PPOTrainer scores rewards and values
with; the project's TRL has the same function as 1.10's, reading the last hidden state)
gives our scores and our per-token values, reward_offset included. No TRL 1.10 venv is
needed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from instructloop.learner.reward import load_reward_model, score_texts, token_values
from instructloop.pretrain import SHIPPED_BASE

BENCH = Path(__file__).resolve().parents[1] / "bench"


def trl_side():
    """bench/ppo_trl_side.py as a module, without putting bench/ on sys.path (its
    serve.py would shadow the server package)."""
    spec = importlib.util.spec_from_file_location("ppo_trl_side", BENCH / "ppo_trl_side.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_reads_our_reward_model_as_we_do(tmp_path, one_torch_thread):
    from trl.experimental.utils import get_reward

    # an RM dir as train_reward_model saves one: the base with a score head and an offset
    model, tokenizer = load_reward_model(SHIPPED_BASE)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    model.config.reward_offset = 0.75
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    ours, tokenizer = load_reward_model(tmp_path / "rm")
    trl_rm = trl_side().reward_model_for_trl(tmp_path / "rm")

    prompts = ["reverse: abc\n", "sort: d b a\n", "uppercase: the day\n"]
    answers = ["cba", "a b d and more words", "THE"]
    expected = score_texts(ours, tokenizer, prompts, answers)  # [3]

    # TRL's layout: left-padded query ids, then the response ids (EOS, then pads)
    pad = tokenizer.pad_token_id
    queries = [tokenizer(p)["input_ids"] for p in prompts]
    responses = []
    for p, a, q in zip(prompts, answers, queries, strict=True):
        full = tokenizer(p + a + tokenizer.eos_token)["input_ids"]
        assert full[: len(q)] == q  # the prompt's tokens are a prefix of the text's
        responses.append(full[len(q) :])
    P, R = max(map(len, queries)), max(map(len, responses))
    rows = [
        [pad] * (P - len(q)) + q + r + [pad] * (R - len(r))
        for q, r in zip(queries, responses, strict=True)
    ]
    query_responses = torch.tensor(rows)
    with torch.no_grad():
        logits, scores, _ = get_reward(trl_rm, query_responses, pad, P)

    assert abs(expected).max() > 0.1  # the scores say something (the offset alone: -0.75)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    # the value model reads the same head at every token: TRL's values are ours
    attn = query_responses != pad
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        values = token_values(ours, query_responses, attn.long(), pos)  # [3, P+R]
    torch.testing.assert_close(logits.squeeze(-1)[attn], values[attn], atol=1e-4, rtol=1e-4)
    # without the wrapper, TRL would read every reward 0.75 too high
    with torch.no_grad():
        _, raw, _ = get_reward(ours, query_responses, pad, P)
    torch.testing.assert_close(raw - 0.75, expected, atol=1e-4, rtol=1e-4)
