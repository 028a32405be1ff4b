"""Task measures of a version, read from its checkpoint: what a right answer rate is.

A win rate against v0 says only that a version is preferred to the base; against a base
that prints noise, anything less noisy wins. So every version is also measured on what a
user of the task set cares about, a right answer:

- exact match, greedy: the share of held-out evaluation prompts whose greedy answer is
  exactly the correct one (loop/tasks.py `answer`; surrounding whitespace ignored);
- exact match at the evaluation temperature: the same for one sample per prompt, the
  samples the labeler win rates are computed on.

The checkpoint is the version's directory in the model store (VersionInfo.path; a LoRA
adapter is applied over its base version's weights), the same files every replica
loads (`load_checkpoint`, which capability.py's corpus loss uses too), decoded with
transformers on CPU: so versions that never serve (the SFT-only
policy of a round, rejected candidates) are measured the same way as served ones. The
loop test checks that this decoding gives the server's own greedy answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .tasks import answer


@dataclass
class Answers:
    """One version's answers to the evaluation prompts."""

    greedy: list[str]
    sampled: list[str]

    def exact_match(self, prompts: Sequence[str]) -> tuple[float, float]:
        """(greedy, sampled) exact-match rates on `prompts`."""
        return exact_match(prompts, self.greedy), exact_match(prompts, self.sampled)


def is_correct(prompt: str, text: str) -> bool:
    target = answer(prompt)
    return target is not None and text.strip() == target


def exact_match(prompts: Sequence[str], texts: Sequence[str]) -> float:
    if not prompts:
        return float("nan")
    return sum(is_correct(p, t) for p, t in zip(prompts, texts, strict=True)) / len(prompts)


def load_checkpoint(path: str | Path, base_path: str | Path | None = None):
    """The model (eval mode, float32, CPU) and tokenizer (left padding) of a version's
    checkpoint: a full checkpoint, or a LoRA adapter at `path` merged over `base_path`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if base_path is not None:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(base_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


class CheckpointDecoder:
    """Decodes the evaluation prompts with a version's checkpoint (transformers, CPU)."""

    def __init__(
        self,
        prompts: Sequence[str],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        threads: int = 1,
        batch_size: int = 64,
    ):
        import torch

        self.prompts = list(prompts)
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        self.batch_size = batch_size
        torch.set_num_threads(threads)

    def load(self, path: str | Path, base_path: str | Path | None = None):
        """The model and tokenizer of a full checkpoint, or of an adapter over base_path."""
        return load_checkpoint(path, base_path)

    def answers(self, path: str | Path, base_path: str | Path | None = None) -> Answers:
        return self.answers_of(*self.load(path, base_path))

    def answers_of(self, model, tokenizer) -> Answers:
        """The answers of a loaded model (eval mode; its tokenizer pads on the left)."""
        import torch

        torch.manual_seed(self.seed)  # the same sampling noise for every version
        greedy = self._decode(model, tokenizer, sample=False)
        if self.temperature <= 0:  # the "sampled" answers are the greedy ones
            return Answers(greedy, list(greedy))
        return Answers(greedy, self._decode(model, tokenizer, sample=True))

    def _decode(self, model, tokenizer, sample: bool) -> list[str]:
        import torch

        out: list[str] = []
        for i in range(0, len(self.prompts), self.batch_size):
            chunk = self.prompts[i : i + self.batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True)
            kwargs = (
                {"do_sample": True, "temperature": self.temperature, "top_k": 0, "top_p": 1.0}
                if sample
                else {"do_sample": False}
            )
            with torch.no_grad():
                ids = model.generate(
                    **enc,
                    max_new_tokens=self.max_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **kwargs,
                )  # [B, prompt + new]
            new = ids[:, enc["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
        return out
