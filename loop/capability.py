"""The alignment tax: what RLHF costs the base on text the labelers never rank.

InstructGPT measured the "alignment tax" as the drop of the aligned model on public NLP
benchmarks that no labeler judged, and added PPO-ptx to pay less of it. Our labelers rank
answers to three task prompts only (tasks.py TASKS); the default base
(instructloop.pretrain) knows more: free-text reversing, sorting, capitals, counting and
copying, in many phrasings. So the measure of what a version lost elsewhere is its
language-model loss on that corpus:

    corpus_loss = mean over every predicted token of -log p(token | the text before it)

in nats per token, on HELD-OUT documents: `pretraining_corpus(seed=99991, documents=N)`.
The seed 99991 is reserved for this measure: the base was pretrained on the stream of seed
0 (PretrainConfig.seed), and the learner's PPO-ptx corpus mix (`--ppo-ptx-data corpus`)
takes its text from that same pretraining stream, never from seed 99991: so the measure
reads text no stage trained on, and PPO-ptx's effect on the tax is a fair question.

The text is scored as pretraining saw it: documents as `<s> doc </s>`, joined, cut into
blocks of the pretraining context (48 tokens), each position predicting the next. Not
document by document: the base never saw a position past 48, and its loss on longer
documents (~2.5 nats/token instead of 0.83) would measure that, not what it knows. The
mean is over all predicted tokens together, so the batch size does not change the value.

The tax of a version is its corpus_loss minus v0's: > 0 is capability the base had and
the version lost, < 0 is corpus skill it gained (SFT on task answers can help, since the
corpus writes the same skills). The shipped base scores 0.853 (a random-init model of
its shape 5.62); the 200 default documents (~23k tokens) take about 1.5 s on one CPU
thread, plus loading the checkpoint.

`count_exact_match` is a second, more readable probe of the same kind: the share of
"count: WORDS = " prompts the version continues with the right number of words (a skill
of the corpus that no task asks; the shipped base gets 0.54, a random-init model 0).

The checkpoints are read as the evaluation reads them (evaluate.py `load_checkpoint`: a full
checkpoint, or a LoRA adapter merged over its base), in float32 on CPU, deterministically.
"""

from __future__ import annotations

from pathlib import Path

from instructloop.pretrain import HELDOUT_CORPUS_SEED, PretrainConfig, pretraining_corpus

BLOCK = PretrainConfig().seq_len  # tokens per scored block: the pretraining context length


def corpus_loss(
    path: str | Path,
    base_path: str | Path | None = None,
    *,
    documents: int = 200,
    seed: int = HELDOUT_CORPUS_SEED,
    batch_size: int = 32,
    threads: int = 1,
) -> float:
    """Mean negative log-likelihood (nats/token) of the checkpoint at `path` (an adapter
    over `base_path` when given) on `documents` held-out corpus documents of `seed`."""
    import torch

    from .evaluate import load_checkpoint

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_checkpoint(path, base_path)
    stream: list[int] = []  # the documents as pretraining saw them: <s> doc </s>, joined
    for text in pretraining_corpus(seed=seed, documents=documents):
        stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [stream[i : i + BLOCK] for i in range(0, len(stream), BLOCK)]
    blocks = [b for b in blocks if len(b) > 1]  # a one-token tail predicts nothing
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        chunk = blocks[i : i + batch_size]
        for group in (chunk[:-1], chunk[-1:]) if len(chunk[-1]) < BLOCK else (chunk,):
            if not group:
                continue
            ids = torch.tensor(group)  # [B, T]: the last block of the stream may be shorter
            with torch.no_grad():
                logits = model(input_ids=ids).logits  # [B, T, V]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),  # [B*(T-1), V]
                ids[:, 1:].reshape(-1),  # [B*(T-1)]: each position predicts the next token
                reduction="sum",
            )
            total += nll.item()
            count += ids[:, 1:].numel()
    return total / count


def count_exact_match(
    path: str | Path,
    base_path: str | Path | None = None,
    *,
    prompts: int = 200,
    seed: int = HELDOUT_CORPUS_SEED,
    threads: int = 1,
) -> float:
    """A second skill no labeler ranks: counting words, in the corpus's own phrasing.

    The share of `prompts` prompts "count: WORDS = " (1 to 4 words of the corpus
    vocabulary: the prompt stays inside the 48-token pretraining context) whose greedy
    next token is the number of words. `_count_sentence` in instructloop.pretrain writes
    this skill with several phrasings; this is one of them, its answer one digit. The
    task set's "count: WORDS" format (loop/tasks.py `answer`) is never asked of the
    labelers, so nothing trains it after pretraining. Chance is about 1/4 for a model
    that only learned that a digit 1-4 follows.
    """
    import random

    import torch

    from instructloop.tinymodel import WORDS

    from .evaluate import load_checkpoint

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_checkpoint(path, base_path)  # left padding: greedy continuations
    rng = random.Random(seed)
    items = [rng.sample(WORDS, rng.randint(1, 4)) for _ in range(prompts)]
    enc = tokenizer([f"count: {' '.join(w)} = " for w in items], return_tensors="pt", padding=True)
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # [B, T] as unpadded
    with torch.no_grad():
        logits = model(**enc, position_ids=positions).logits[:, -1]  # [B, V]: the next token
    first = tokenizer.batch_decode(logits.argmax(-1)[:, None])
    return sum(t == str(len(w)) for t, w in zip(first, items, strict=True)) / prompts
