"""Tiny random-init models of the architecture families users deploy, built locally.

Each family gets the transformers architecture of the real one (Llama, Qwen2, Qwen3,
Mistral, Gemma, Phi-3, GPT-2, GPT-NeoX) at the default policy's shape (2 layers, width
128, 2 heads of 64: vLLM's CPU attention refuses head_dim 16), and a tokenizer trained
here that carries the real family's special tokens, pre-tokenizer style and chat
template: ChatML for Qwen, `[INST]` for Mistral, `<start_of_turn>` for Gemma, `<|end|>`
turns for Phi-3, Llama 3's header tokens, and no template for GPT-2 and GPT-NeoX, whose
real releases have none. Nothing is downloaded. They exist to show that serving, the
learner (SFT, reward model, PPO; full weights and LoRA) and hot swaps do not assume one
architecture: see bench/families.py and tests/test_families.py.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .tinymodel import TinyModelConfig, synthetic_corpus, write_model_dir

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Mistral's template has no system role; like the real one, it puts a system message in
# front of the first user turn.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] + '\n\n' %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}"
    "[INST] {% if loop.first %}{{ sys }}{% endif %}{{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant'"
    " else m['role'] %}<start_of_turn>{{ role }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """How one family's tiny model and tokenizer are made."""

    name: str
    architecture: str  # the transformers class, as config.json names it
    special: dict[str, str | None]  # bos, eos, pad (None: the family has no such token)
    extra_special: tuple[str, ...] = ()
    chat_template: str | None = None
    # "bytelevel" (GPT-2, Llama 3, Qwen, Phi-3's GPT-2 style) or "metaspace"
    # (SentencePiece style: Mistral, Gemma)
    pretokenizer: str = "bytelevel"
    add_bos: bool = False  # the tokenizer puts BOS in front of every text
    config: dict[str, Any] = field(default_factory=dict)  # architecture-specific fields

    def special_tokens(self) -> list[str]:
        listed = [t for t in self.special.values() if t] + list(self.extra_special)
        return list(dict.fromkeys(listed))


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "llama", "LlamaForCausalLM",
            {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>"},
            ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"),
            LLAMA3_TEMPLATE, add_bos=True,
        ),
        Family(
            "qwen2", "Qwen2ForCausalLM",
            {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>"},
            ("<|im_start|>",), CHATML_TEMPLATE,
        ),
        Family(
            "qwen3", "Qwen3ForCausalLM",
            {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>"},
            ("<|im_start|>",), CHATML_TEMPLATE, config={"head_dim": 64},
        ),
        Family(
            "mistral", "MistralForCausalLM",
            {"bos": "<s>", "eos": "</s>", "pad": "<unk>"},
            ("[INST]", "[/INST]"), MISTRAL_TEMPLATE, pretokenizer="metaspace", add_bos=True,
            config={"sliding_window": None},
        ),
        Family(
            "gemma", "GemmaForCausalLM",
            {"bos": "<bos>", "eos": "<end_of_turn>", "pad": "<pad>"},
            ("<start_of_turn>", "<eos>"), GEMMA_TEMPLATE, pretokenizer="metaspace",
            add_bos=True, config={"head_dim": 64},
        ),
        Family(
            "phi3", "Phi3ForCausalLM",
            {"bos": "<s>", "eos": "<|end|>", "pad": "<|endoftext|>"},
            ("<|user|>", "<|assistant|>", "<|system|>"), PHI3_TEMPLATE,
        ),
        Family(
            "gpt2", "GPT2LMHeadModel",
            {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>"},
        ),
        Family(
            "gpt_neox", "GPTNeoXForCausalLM",
            {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|padding|>"},
            config={"rotary_pct": 1.0},
        ),
    ]
}  # fmt: skip


def build_family_tokenizer(family: Family, cfg: TinyModelConfig):
    """A BPE tokenizer trained here on the synthetic corpus, with the family's special
    tokens, pre-tokenizer style and chat template, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if family.pretokenizer == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet: list[str] = []
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=family.special_tokens(),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(cfg.seed), trainer=trainer)
    bos = family.special["bos"]
    if family.add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=family.special["eos"],
        pad_token=family.special["pad"],
        additional_special_tokens=[t for t in family.extra_special if t],
        chat_template=family.chat_template,
        model_max_length=cfg.max_position_embeddings,
    )


def family_config(family: Family, tokenizer, cfg: TinyModelConfig):
    """The transformers config of the family's architecture at shape cfg."""
    import transformers

    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
        "dtype": "float32",
    }
    if family.name == "gpt2":
        shape = {
            "n_embd": cfg.hidden_size, "n_head": cfg.num_heads, "n_layer": cfg.num_layers,
            "n_inner": cfg.intermediate_size, "n_positions": cfg.max_position_embeddings,
        }  # fmt: skip
    else:
        shape = {
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "max_position_embeddings": cfg.max_position_embeddings,
        }
        if family.name != "gpt_neox":
            shape["num_key_value_heads"] = cfg.num_heads
    model_type = _model_type(family.architecture)
    return transformers.AutoConfig.for_model(model_type, **ids, **shape, **family.config)


def _model_type(architecture: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for model_type, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if cls == architecture:
            return model_type
    raise ValueError(f"no transformers causal LM named {architecture}")


def build_family_model(
    name: str, out_dir: str | os.PathLike, cfg: TinyModelConfig | None = None
) -> Path:
    """Write family `name`'s tokenizer and random-init weights to out_dir (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM

    if name not in FAMILIES:
        raise ValueError(f"family {name!r}: one of {', '.join(FAMILIES)}")
    family, cfg = FAMILIES[name], cfg or TinyModelConfig()
    tokenizer = build_family_tokenizer(family, cfg)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(family_config(family, tokenizer, cfg))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    info = {"family": name, **asdict(cfg)}
    return write_model_dir(out_dir, model, tokenizer, {"instructloop_tiny.json": info})
