"""Architecture families other than the default Llama: built here, no downloads.

Every family: its tokenizer and chat template are the real family's shape, a chat
prompt reaches the model with one BOS, and peft finds LoRA target modules in the model
itself. One family (Gemma: SentencePiece-style tokens, a template that writes BOS, its
own head_dim) goes the whole way through the service, as bench/families.py runs each:
the server on vLLM, Generate plain and chat, feedback through the API, a learner round
with full weights and one with LoRA, and the hot swap to each.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from instructloop.families import FAMILIES, build_family_model

BENCH = Path(__file__).resolve().parents[1] / "bench"

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse: abc"}]
# What each family's real template opens the assistant's turn with.
ASSISTANT_TURN = {
    "llama": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2": "<|im_start|>assistant\n",
    "qwen3": "<|im_start|>assistant\n",
    "mistral": "reverse: abc [/INST]",
    "gemma": "<start_of_turn>model\n",
    "phi3": "<|assistant|>\n",
    "gpt2": "assistant:",  # no template in the real family: the server's plain rendering
    "gpt_neox": "assistant:",
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_tokenizer_template_one_bos_and_lora_targets(name, tmp_path):
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructloop.serve.engine import render_chat

    family = FAMILIES[name]
    out = build_family_model(name, tmp_path / name)
    assert json.loads((out / "config.json").read_text())["architectures"] == [family.architecture]
    tok = AutoTokenizer.from_pretrained(out)
    text = render_chat(tok, CHAT)
    assert text.endswith(ASSISTANT_TURN[name]), text
    assert "be brief" in text and "reverse: abc" in text
    ids = tok.encode(text)
    if family.add_bos:  # the template's BOS and the tokenizer's do not both reach the model
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id, ids[:4]
    else:
        assert tok.bos_token_id is None or tok.bos_token_id not in ids[:1]
    assert tok.eos_token == family.special["eos"] and tok.pad_token_id is not None

    model = AutoModelForCausalLM.from_pretrained(out)
    assert_keeps_packed_sequences_apart(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    targets = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert targets and "lm_head" not in targets, targets


def assert_keeps_packed_sequences_apart(model) -> None:
    """What PPO's packing (learner/ppo.py pack) relies on for this architecture: two
    sequences in one row, position ids restarting at the second, give the second the
    outputs it gets alone."""
    import torch

    from instructloop.learner.ppo import PACKING_MODEL_TYPES

    assert model.config.model_type in PACKING_MODEL_TYPES
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]]) % model.config.vocab_size
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, 3:]
        alone = model(input_ids=ids[:, 3:], position_ids=pos[:, 3:], use_cache=False).logits[0]
        joined = model(input_ids=ids, use_cache=False).logits[0, 3:]  # one sequence of 7
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(joined, alone, atol=1e-3)  # the first three would change it


def test_gemma_serves_learns_full_and_lora_and_swaps(redis_server, tmp_path, one_torch_thread):
    # bench/ is on the path only for this import: its serve.py would shadow the server
    # package for every test module collected after.
    sys.path.insert(0, str(BENCH))
    try:
        from families import run_family
    finally:
        sys.path.remove(str(BENCH))

    row = run_family("gemma", tmp_path, redis_server.url)
    assert row["errors"] == {}, row["errors"]
    assert row["chat_one_bos"] == "yes"
    assert set(row["seconds"]) >= {"serve", "generate", "learn_full", "swap_full", "swap_lora"}
    assert {"q_proj", "v_proj", "down_proj"} <= set(row["lora_targets"])


def test_enable_lora_on_an_architecture_vllm_cannot_adapt_is_refused_at_start(
    redis_server, tmp_path
):
    """vLLM 0.32 has no LoRA for GPT-2; its own error comes from inside the engine process
    as the cause of a failed start. The server says why, and what to do, before that."""
    import subprocess

    model = build_family_model("gpt2", tmp_path / "gpt2")
    proc = subprocess.run(
        [sys.executable, "-m", "instructloop.cli", "serve", "--model", str(model),
         "--redis-url", redis_server.url, "--data-dir", str(tmp_path / "server"),
         "--port", "0", "--metrics-port", "0", "--enable-lora"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--enable-lora: vLLM has no LoRA support for GPT2LMHeadModel" in proc.stderr
    assert "learn --kind full" in proc.stderr
