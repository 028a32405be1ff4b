"""The default base: its corpus, its tokenizer, and that pretraining is reproducible.

What the base can do after pretraining (it does not answer the task format, and SFT and
RLHF make it) is measured on the real loop in test_loop.py.
"""

from __future__ import annotations

import json
import re

import pytest

from instructloop.loop.tasks import answer, make_prompt
from instructloop.pretrain import (
    SHIPPED_BASE,
    PretrainConfig,
    build_char_tokenizer,
    ensure_base,
    pretrain_base,
    pretraining_corpus,
)

START = r"(?:^|\n|\. |; )"  # where a statement starts ("reverse" is also a word of the prose)
TASK_LINE = re.compile(r"^(reverse|sort|uppercase|count): (.+)$")


def test_corpus_never_shows_an_instruction_followed_by_its_answer():
    docs = pretraining_corpus(seed=0, documents=20_000)
    instructions = 0
    for doc in docs:
        lines = doc.split("\n")
        for line, after in zip(lines, lines[1:], strict=False):
            if TASK_LINE.match(line):
                instructions += 1
                # whatever follows an instruction on the next line, it is not its answer
                assert after.strip() != answer(line + "\n"), doc
        # and no answer follows an instruction on the same line or after ": "
        for m in re.finditer(r"(reverse|sort|uppercase|count): ([^\n]+)\n([^\n]*)", doc):
            assert m.group(3).strip() != answer(f"{m.group(1)}: {m.group(2)}\n"), doc
    assert instructions > 5_000  # worksheets are there: the base has seen the format

    # The skills are there, as free text, with the evaluation's inputs: every task has
    # examples whose answers are the tasks' answers.
    text = "\n".join(docs)
    for phrase in ("backwards is", "and get", "in order is", "in capitals is", "words"):
        assert phrase in text
    reversals = re.findall(START + r"reverse ([a-z]+) and get ([a-z]+)\b", text)
    assert len(reversals) > 150 and all(b == a[::-1] for a, b in reversals)
    sorts = re.findall(START + r"sort ((?:[a-z] )*[a-z]) and get ((?:[a-z] )*[a-z])\b", text)
    assert len(sorts) > 150 and all(b == " ".join(sorted(a.split())) for a, b in sorts)


def test_final_period_ends_that_share_of_the_paragraphs():
    from instructloop.pretrain import FINAL_PERIOD, pretraining_documents

    def paragraphs(docs):  # worksheets end with an instruction line, not a sentence
        return [d for d in docs if not d.endswith("\n")]

    # At 1.0 every paragraph ends with "." and no extra draw is made (the stream of the
    # bases made before the option existed): an answer is never followed by the end.
    always = pretraining_corpus(seed=0, documents=2_000, final_period=1.0)
    assert all(d.endswith(".") for d in paragraphs(always))

    assert FINAL_PERIOD == PretrainConfig().final_period == 0.5
    assert pretraining_corpus(seed=0, documents=50) == pretraining_corpus(0, 50, 0.5)
    stream = pretraining_documents(0)
    half = paragraphs([next(stream) for _ in range(2_000)])
    share = sum(d.endswith(".") for d in half) / len(half)
    assert 0.4 < share < 0.6, share
    for doc in half:  # still never the task format followed by its answer
        lines = doc.split("\n")
        for line, after in zip(lines, lines[1:], strict=False):
            if TASK_LINE.match(line):
                assert after.strip() != answer(line + "\n"), doc


def test_char_tokenizer_gives_each_character_its_own_token():
    tok = build_char_tokenizer()
    import random

    rng = random.Random(0)
    for _ in range(50):
        prompt = make_prompt(rng)
        target = answer(prompt)
        ids = tok(prompt + target, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(prompt + target)  # one token per character
        assert tok.decode(ids) == prompt + target
    assert tok("ab")["input_ids"][0] == tok.bos_token_id
    assert len(tok) == 256 + 6  # the byte alphabet and the special tokens


@pytest.mark.usefixtures("one_torch_thread")
def test_pretraining_is_deterministic_and_writes_a_loadable_base(tmp_path):
    """Two short runs of the script with one seed give the same losses and weights: the
    README's command reproduces its first steps."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = PretrainConfig(max_steps=4, batch_size=8, seq_len=32, warmup_steps=2)
    a = pretrain_base(tmp_path / "a", cfg, progress=False)
    b = pretrain_base(tmp_path / "b", cfg, progress=False)
    info_a = json.loads((a / "instructloop_base.json").read_text())
    info_b = json.loads((b / "instructloop_base.json").read_text())
    assert info_a["steps"] == 4 and info_a["first_losses"] == info_b["first_losses"]
    assert info_a["first_losses"][0] > info_a["first_losses"][-1]  # it learns
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    other = pretrain_base(tmp_path / "c", PretrainConfig(**{**cfg.__dict__, "seed": 1}), False)
    wc = load_file(other / "model.safetensors")
    assert not torch.equal(wa["lm_head.weight"], wc["lm_head.weight"])

    model = AutoModelForCausalLM.from_pretrained(a)
    cfg_json = json.loads((a / "config.json").read_text())
    assert cfg_json["hidden_size"] // cfg_json["num_attention_heads"] == 64  # vLLM on CPU
    assert model.config.vocab_size == 262


@pytest.mark.usefixtures("one_torch_thread")
def test_the_shipped_base_is_what_the_script_makes_with_its_defaults(tmp_path):
    """The shipped weights came from `instructloop init-model` with PretrainConfig's
    defaults: their record names that config, and a short run of the script with it
    repeats the recorded first steps (the schedule's warm-up does not depend on the run's
    length). ensure_base copies them into a data dir."""
    shipped = json.loads((SHIPPED_BASE / "instructloop_base.json").read_text())
    default = PretrainConfig()
    assert shipped["pretrain"] == default.__dict__
    assert shipped["steps"] == default.max_steps
    recorded = shipped["first_losses"]
    short = PretrainConfig(**{**default.__dict__, "max_steps": len(recorded), "threads": 1})
    again = pretrain_base(tmp_path / "short", short, progress=False)
    losses = json.loads((again / "instructloop_base.json").read_text())["first_losses"]
    assert losses == pytest.approx(recorded, abs=1e-4)

    dest = ensure_base(tmp_path / "data" / "models" / "base")
    assert (dest / "model.safetensors").read_bytes() == (
        SHIPPED_BASE / "model.safetensors"
    ).read_bytes()
    assert ensure_base(dest) == dest  # kept once there
