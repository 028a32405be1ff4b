"""The default base model: a small Llama pretrained here on text the project writes.

InstructGPT aligned a *pretrained* model: GPT-3 had the skills but did not follow
instructions (asked a question, it went on with more questions). This module builds that
situation in miniature, with nothing downloaded:

- the corpus (`pretraining_corpus`) is free text that uses the skills the evaluation tasks
  need, in many phrasings: "the letters of abc backwards are cba", "in alphabetical order
  d b a is a b d", "shouted, the day becomes THE DAY", counting and copying too;
- it also has worksheets: lists of instructions in the task format ("reverse: abc",
  "sort: d b a", ...) one per line, *without* answers. So given "reverse: abc\\n" the base
  goes on with another instruction, as GPT-3 went on with more questions;
- the corpus never shows the task format followed by its answer (a test checks it): that
  mapping is what demonstrations (SFT) and comparisons (RM + PPO) have to teach;
- one token per character (a byte-level BPE with no merges): a reversal or a sort is then
  a per-token skill a 2-layer model learns in minutes.

`pretrain_base(out_dir, cfg)` trains for `cfg.max_steps` (or `cfg.seconds`) with a
progress bar, deterministically for a given seed and step count, and writes an HF
directory atomically (vLLM serves it on CPU: head_dim 64).

The defaults take about 19 minutes (one thread on a 2-core machine), longer than a first
start should wait, so the package ships their result (`SHIPPED_BASE`, 2.4 MB of float32
safetensors, made with the defaults, as by `instructloop init-model instructloop/base
--force`; its `instructloop_base.json` records the config, the time and the first losses,
which a test reproduces). `ensure_base` copies it into a data dir, or pretrains when it is
absent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import string
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from instructloop.tinymodel import (
    SPECIAL_TOKENS,
    WORDS,
    TinyModelConfig,
    as_hf_tokenizer,
    new_llama,
    write_model_dir,
)

log = logging.getLogger(__name__)

TASK_VERBS = ("reverse", "sort", "uppercase", "count")
# The corpus stream of this seed is held out: the alignment tax (loop/capability.py) is
# the loss on it, so nothing trains on it (pretraining and PPO-ptx take PretrainConfig's
# seed, 0).
HELDOUT_CORPUS_SEED = 99991
# Share of the corpus's paragraphs that end with "." (PretrainConfig.final_period).
FINAL_PERIOD = 0.5


@dataclass
class PretrainConfig:
    """Pretraining of the default base: model shape, corpus, optimiser and budget."""

    hidden_size: int = field(default=128, metadata={"help": "Model width."})
    num_heads: int = field(default=2, metadata={"help": "Attention heads (head_dim 64)."})
    num_layers: int = field(default=2, metadata={"help": "Transformer layers."})
    intermediate_size: int = field(default=512, metadata={"help": "MLP width."})
    seq_len: int = field(default=48, metadata={"help": "Characters per training sequence."})
    batch_size: int = field(default=64, metadata={"help": "Sequences per optimizer step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps."})
    max_steps: int = field(
        default=6000,
        metadata={
            "help": "Optimizer steps (the cosine schedule's length): ~18 min on one thread "
            "(2,000 steps: ~5 min, a weaker base)."
        },
    )
    seconds: float = field(
        default=0.0,
        metadata={
            "help": "Stop after this many seconds even before --max-steps (0: no time limit). "
            "A time limit makes the result depend on the machine's speed."
        },
    )
    threads: int = field(
        default=1,
        metadata={"help": "torch threads (0: torch's default); the shipped base used one."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the corpus, weights and order."})
    final_period: float = field(
        default=FINAL_PERIOD,
        metadata={
            "help": "Share of the free-text documents that end with '.' (the others end "
            "with no punctuation; the shipped base: 0.5). At 1.0 an answer is always "
            "followed by '.' or more text, never by the end of the text (measured: "
            "comparisons alone then taught no exact answers; README, The whole loop)."
        },
    )

    def shape(self) -> TinyModelConfig:
        """The model shape (and seed) of this config."""
        return TinyModelConfig(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            intermediate_size=self.intermediate_size,
            seed=self.seed,
        )


# ----------------------------------------------------------------------------- corpus


def _letters(rng: random.Random, lo: int = 2, hi: int = 6) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _words(rng: random.Random, lo: int = 1, hi: int = 4) -> str:
    return " ".join(rng.sample(WORDS, rng.randint(lo, hi)))


# Each skill is written as (verb phrase, input, answer) joined by one of several
# separators, so the model learns the skill apart from any one way of asking. One
# combination never occurs: the task format, "VERB: INPUT" then a newline, then the answer
# (`_statement` skips it); the worksheets show that format only followed by more
# instructions.
SEP_IN = (" ", ": ", " the letters ", ", please: ")
SEP_OUT = (" and get ", " is ", " = ", " -> ", "\n", ", answer: ")


def _statement(rng: random.Random, verbs: tuple[str, ...], x: str, y: str) -> str:
    verb = rng.choice(verbs)
    sep_in, sep_out = rng.choice(SEP_IN), rng.choice(SEP_OUT)
    while sep_in == ": " and sep_out == "\n":  # the task format: never with its answer
        sep_in, sep_out = rng.choice(SEP_IN), rng.choice(SEP_OUT)
    return f"{verb}{sep_in}{x}{sep_out}{y}"


def _reverse_sentence(rng: random.Random) -> str:
    x = _letters(rng)
    if rng.random() < 0.2:
        return f"{x} backwards is {x[::-1]}"
    return _statement(rng, ("reverse", "reversed", "backwards"), x, x[::-1])


def _sort_sentence(rng: random.Random) -> str:
    x = " ".join(_letters(rng))
    s = " ".join(sorted(x.split()))
    if rng.random() < 0.2:
        return f"{x} in order is {s}"
    return _statement(rng, ("sort", "sorted", "in order"), x, s)


def _upper_sentence(rng: random.Random) -> str:
    w = _words(rng, 1, 3)
    if rng.random() < 0.2:
        return f"{w} in capitals is {w.upper()}"
    return _statement(rng, ("uppercase", "in capitals", "shout"), w, w.upper())


def _count_sentence(rng: random.Random) -> str:
    w = _words(rng, 1, 6)
    return _statement(rng, ("count", "count the words"), w, str(len(w.split())))


def _copy_sentence(rng: random.Random) -> str:
    w = _words(rng, 1, 4)
    return _statement(rng, ("copy", "repeat", "say"), w, w)


def _prose(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize()


def task_instruction(rng: random.Random) -> str:
    """One instruction in the task format, without its answer (worksheet lines)."""
    verb = rng.choice(TASK_VERBS)
    if verb == "uppercase":
        return f"uppercase: {_words(rng, 1, 3)}"
    if verb == "count":
        return f"count: {_words(rng, 1, 6)}"
    x = _letters(rng, 3, 5)
    return f"sort: {' '.join(x)}" if verb == "sort" else f"reverse: {x}"


def _worksheet(rng: random.Random) -> str:
    head = rng.choice(("Exercises:", "Homework for today.", "Practice sheet", "Try these:"))
    lines = [task_instruction(rng) for _ in range(rng.randint(2, 6))]
    return head + "\n" + "\n".join(lines) + "\n"


_SENTENCES = (
    (_reverse_sentence, 12),
    (_sort_sentence, 10),
    (_upper_sentence, 10),
    (_count_sentence, 1),
    (_copy_sentence, 1),
    (_prose, 1),
)


def pretraining_documents(seed: int, final_period: float = FINAL_PERIOD) -> Iterator[str]:
    """An endless, deterministic stream of documents: paragraphs of skill sentences, and
    worksheets of instructions without answers (about one document in seven). A paragraph
    ends with "." with probability `final_period` (at 1.0 no draw is made: the stream of
    the bases made before the option existed)."""
    rng = random.Random(seed)
    makers, weights = zip(*_SENTENCES, strict=True)
    while True:
        if rng.random() < 0.15:
            yield _worksheet(rng)
        else:
            k = rng.randint(1, 6)
            sep = rng.choice((". ", "\n", "; "))
            text = sep.join(f(rng) for f in rng.choices(makers, weights, k=k))
            yield text + "." if final_period >= 1.0 or rng.random() < final_period else text


def pretraining_corpus(seed: int, documents: int, final_period: float = FINAL_PERIOD) -> list[str]:
    """The first `documents` documents of the stream (for tests and inspection)."""
    it = pretraining_documents(seed, final_period)
    return [next(it) for _ in range(documents)]


# ----------------------------------------------------------------------------- tokenizer


def build_char_tokenizer(max_length: int = 1024):
    """A byte-level BPE with no merges: every character (byte) is its own token.

    It is an ordinary `tokenizers` BPE, so transformers and vLLM load and detokenize it
    like any other; its 256 byte symbols plus the special tokens are the whole vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return as_hf_tokenizer(tok, max_length)


# ----------------------------------------------------------------------------- training


def _batches(tokenizer, cfg: PretrainConfig) -> Iterator:
    """[B, T+1] token blocks cut from the document stream, documents joined by EOS."""
    import torch

    docs = pretraining_documents(cfg.seed, cfg.final_period)
    buf: list[int] = []
    need = cfg.batch_size * (cfg.seq_len + 1)
    while True:
        while len(buf) < need:
            buf.extend(tokenizer(next(docs))["input_ids"] + [tokenizer.eos_token_id])
        block, buf = buf[:need], buf[need:]
        yield torch.tensor(block).view(cfg.batch_size, cfg.seq_len + 1)


def pretrain_base(out_dir: str | Path, cfg: PretrainConfig | None = None, progress=True) -> Path:
    """Pretrain the base on the generated corpus and write it to out_dir (atomically)."""
    import torch

    cfg = cfg or PretrainConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = build_char_tokenizer()
    torch.manual_seed(cfg.seed)
    model = new_llama(tokenizer, cfg.shape())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.learning_rate * (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    bar = _progress_bar(cfg.max_steps) if progress else None
    t0 = time.perf_counter()
    losses: list[float] = []
    step = 0
    model.train()
    batches = _batches(tokenizer, cfg)
    try:
        for step in range(cfg.max_steps):
            if cfg.seconds and time.perf_counter() - t0 > cfg.seconds:
                break
            block = next(batches)  # [B, T+1]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            out = model(input_ids=block[:, :-1], labels=block[:, :-1].clone())
            # HF shifts labels by one inside: predicting block[:, 1:T] from block[:, :T-1]
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(out.loss.item())
            if bar is not None:
                bar.update(step + 1, losses[-1], time.perf_counter() - t0)
        else:
            step = cfg.max_steps
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    tail = losses[-50:] or [float("nan")]
    info = {
        "pretrain": asdict(cfg),
        "steps": step,
        "seconds": round(seconds, 1),
        "final_loss": sum(tail) / len(tail),
        "first_losses": [round(x, 6) for x in losses[:5]],
        "tokens": step * cfg.batch_size * cfg.seq_len,
    }
    log.info("pretrained %d steps in %.0fs, loss %.3f", step, seconds, info["final_loss"])
    model.eval()
    return write_model_dir(out_dir, model, tokenizer, {"instructloop_base.json": info})


class _progress_bar:
    """A rich progress bar on stderr: steps, loss, elapsed time."""

    def __init__(self, total: int):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.p = Progress(
            TextColumn("pretraining the base"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self.task = self.p.add_task("pretrain", total=total, loss=float("nan"))
        self.p.start()

    def update(self, step: int, loss: float, _elapsed: float) -> None:
        if step % 10 == 0:
            self.p.update(self.task, completed=step, loss=loss)

    def close(self) -> None:
        self.p.stop()


def base_info(model_dir: str | Path) -> dict:
    """The pretraining record of a base directory ({} for other models)."""
    path = Path(model_dir) / "instructloop_base.json"
    return json.loads(path.read_text()) if path.exists() else {}


# The default base as `instructloop init-model` made it with PretrainConfig's defaults.
SHIPPED_BASE = Path(__file__).with_name("base")


def ensure_base(dest: str | Path, progress: bool = True) -> Path:
    """The default base at dest: kept if there, else a copy of the shipped weights (written
    elsewhere, then renamed into place), else pretrained here (minutes, progress bar)."""
    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest
    if not (SHIPPED_BASE / "model.safetensors").exists():
        log.info("no shipped base in %s: pretraining the default base into %s", SHIPPED_BASE, dest)
        return pretrain_base(dest, PretrainConfig(), progress=progress)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(SHIPPED_BASE, tmp)
    os.replace(tmp, dest)
    log.info("copied the shipped default base into %s", dest)
    return dest
