"""Build the small default policy locally: a Llama-architecture model and its BPE tokenizer.

Nothing is downloaded. The tokenizer is trained with `tokenizers` on a synthetic corpus
made here (short instructions and their answers, plus common English words), and the
model is randomly initialised. head_dim is 64: vLLM's CPU attention refuses head_dim 16.
The result is an ordinary HF-format directory; any other HF model directory works in
its place. MODEL_SIZES names the shapes the benchmarks build: the default ("tiny") and
a GPT-2-small-like "100m" for the learner on a GPU.
"""

from __future__ import annotations

import json
import os
import random
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Renders a conversation as "<|role|>\ncontent\n" blocks and opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have "
    "from or one had by word but not what all were we when your can said there use an "
    "each which she do how their if will up other about out many then them these so some "
    "her would make like him into time has look two more write go see number no way "
    "could people my than first water been call who oil its now find long down day did "
    "get come made may part answer question short sort reverse uppercase lowercase count "
    "list good bad yes please thanks hello world model learn rank best worst sample "
    "prompt"
).split()


@dataclass
class TinyModelConfig:
    """Shape of the default policy. The defaults start in vLLM on 2 CPU cores in ~20 s."""

    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary size."})
    hidden_size: int = field(default=128, metadata={"help": "Model width."})
    num_heads: int = field(
        default=2, metadata={"help": "Attention heads (head_dim = hidden/heads)."}
    )
    num_layers: int = field(default=2, metadata={"help": "Transformer layers."})
    intermediate_size: int = field(default=512, metadata={"help": "MLP width."})
    max_position_embeddings: int = field(default=1024, metadata={"help": "Context length."})
    seed: int = field(default=0, metadata={"help": "Seed for the corpus and the weights."})

    @classmethod
    def of_size(cls, name: str, **overrides) -> TinyModelConfig:
        """The shape MODEL_SIZES[name] (any field can still be overridden)."""
        if name not in MODEL_SIZES:
            raise ValueError(f"model size {name!r}: one of {', '.join(MODEL_SIZES)}")
        return cls(**{**MODEL_SIZES[name], **overrides})


# Named shapes over the defaults above; parameter counts with the 1,024-token vocabulary
# (untied input and output embeddings: 2 x 1,024 x hidden of them).
MODEL_SIZES: dict[str, dict] = {
    "tiny": {},  # 2 layers, hidden 128, 2 heads: 787,072 parameters
    # 12 layers, hidden 768, 12 heads of 64, MLP 3072 (GPT-2 small's shape):
    # 114,838,272 parameters (a reward or value model on it: 114,052,608)
    "100m": {"hidden_size": 768, "num_heads": 12, "num_layers": 12, "intermediate_size": 3072},
}


def synthetic_corpus(seed: int, lines: int = 20_000) -> list[str]:
    """Instruction-like lines ("reverse: abc" -> "cba") and word salad, deterministic."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        letters = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))
        words = rng.sample(WORDS, rng.randint(2, 6))
        task = rng.randrange(5)
        if task == 0:
            out.append(f"reverse: {letters}\n{letters[::-1]}")
        elif task == 1:
            out.append(f"sort: {' '.join(letters)}\n{' '.join(sorted(letters))}")
        elif task == 2:
            out.append(f"uppercase: {' '.join(words)}\n{' '.join(words).upper()}")
        elif task == 3:
            out.append(f"count: {' '.join(words)}\n{len(words)}")
        else:
            out.append(
                " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))).capitalize() + "."
            )
    return out


def build_tokenizer(cfg: TinyModelConfig):
    """Train a byte-level BPE tokenizer and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(cfg.seed), trainer=trainer)
    return as_hf_tokenizer(tok, cfg.max_position_embeddings)


def as_hf_tokenizer(tok, max_length: int):
    """A `tokenizers` tokenizer with SPECIAL_TOKENS as a transformers fast tokenizer:
    BOS before every text, the chat template, <pad> and </s>."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
    )


def new_llama(tokenizer, cfg: TinyModelConfig):
    """A randomly initialised Llama of shape cfg over the tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def write_model_dir(out_dir: str | os.PathLike, model, tokenizer, extra: dict[str, dict]) -> Path:
    """Save model, tokenizer and extra JSON files to out_dir: written elsewhere, fsynced,
    then renamed into place, so a reader never sees half a model."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=False)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, data in extra.items():
        (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def build_tiny_model(out_dir: str | os.PathLike, cfg: TinyModelConfig | None = None) -> Path:
    """Write tokenizer and random-init Llama weights to out_dir (atomically) and return it."""
    import torch

    cfg = cfg or TinyModelConfig()
    tokenizer = build_tokenizer(cfg)
    torch.manual_seed(cfg.seed)
    model = new_llama(tokenizer, cfg)
    return write_model_dir(out_dir, model, tokenizer, {"instructloop_tiny.json": asdict(cfg)})
