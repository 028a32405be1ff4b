"""Labelers: the simulated users' preference, as a plain Python callable.

The interface (public; `instructloop simulate --labeler module:function` loads any callable
that follows it, from any importable module):

    def my_labeler(prompt: str, samples: Sequence[str]) -> list[int | tuple[int, ...]]:
        '''Rank the samples, best first: each item is a sample index, or a tuple of the
        indices of samples the labeler finds equally good (a tie). Every index appears
        exactly once.'''

    # optional: what this user writes when asked for the ideal answer (a demonstration);
    # return None to write none. Without the attribute, users write no demonstrations.
    my_labeler.demonstrate = lambda prompt: ...

`prompt` is the prompt text exactly as sent (the default tasks end with a newline);
`samples` are the K answers the server generated. The simulator sends the ranking as
a `ranking` feedback (ties give the reward model no pair), and it measures win rates with
the same callable on two samples: `[0]` or `[1]` is a win for that sample, `[(0, 1)]` a tie.

Populations: `--labeler a,b,c` loads several labelers (`load_population`); simulated user
number i uses labeler i mod 3 (round-robin). A population's win rate assigns evaluation
prompt number i to member i mod n the same way (`population_win_rate`). A held-out
population (`--heldout-labeler`) never ranks anything sent to the server: as InstructGPT's
held-out labelers, it only judges at measuring time, so a policy that learned the
training labelers' quirks rather than what is right shows it there.

Shipped labelers:
- `correct_concise` (the default): exact answers first, then answers closer to the
  correct one (difflib similarity, which also penalises extra text), then shorter ones;
  demonstrates the correct answer.
- `correct_polite` (the default held-out labeler of `simulate`): correct-and-concise
  against correct-and-polite, two people who agree on what is right and differ on the
  rest. Correct answers first, as correct_concise (surrounding whitespace ignored), and
  among them the one that stops cleanly (nothing around the answer, not even a newline);
  then, among wrong answers: empty last, then the ones that keep more of the answer's
  characters in any order (multiset F1 of the non-space characters, case-sensitive, in
  steps of 0.1: the input's material, rearranged), then one-line answers before ones that
  run on to another line. It has no length preference: answers equal on all of that tie.
  Where the two differ, for "reverse: abc": "bac" beats "cb" (all the letters, against
  closer to "cba" and shorter for correct_concise) and beats "cbx" (a tie for
  correct_concise: equally close, equally long); "cba" beats "cba\n" (a tie for
  correct_concise). Demonstrates the correct answer, so it can train too.
- `shouting`: prefers answers with a larger share of capital letters, whatever they say
  (a trait unrelated to correctness); demonstrates the correct answer in capitals.
- `brief` and `vowels`: two more preferences unrelated to correctness, with no
  demonstrations, to check that the loop learns a taste it has never seen: the shorter
  non-empty answer (in steps of 2 characters; empty last), and the larger share of
  vowels among the letters.
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections import Counter
from collections.abc import Callable, Sequence

from .tasks import answer

RankItem = int | tuple[int, ...]
Labeler = Callable[[str, Sequence[str]], list[RankItem]]


def rank_by_score(scores: Sequence) -> list[RankItem]:
    """Indices ranked by score, highest first; equal scores form one tied item."""
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    ranking: list[RankItem] = []
    tier: list[int] = []
    for i in order:
        if tier and scores[i] != scores[tier[0]]:
            ranking.append(tier[0] if len(tier) == 1 else tuple(tier))
            tier = []
        tier.append(i)
    if tier:
        ranking.append(tier[0] if len(tier) == 1 else tuple(tier))
    return ranking


def correct_concise(prompt: str, samples: Sequence[str]) -> list[RankItem]:
    """Correct answers first; then answers closer to the correct one (difflib similarity
    2*matches / (len(answer) + len(sample)), in steps of 0.1); among equally close ones,
    the shorter; an empty answer is last."""
    return rank_by_score([correct_concise_key(prompt, s) for s in samples])


def correct_concise_key(prompt: str, text: str) -> tuple[bool, bool, float, int]:
    """What correct_concise ranks by, largest first: (right, non-empty, similarity in
    steps of 0.1, minus the length)."""
    target = answer(prompt) or ""
    text = text.strip()
    similarity = round(difflib.SequenceMatcher(None, text, target).ratio(), 1)
    return text == target, bool(text), similarity, -len(text)


correct_concise.demonstrate = answer  # type: ignore[attr-defined]


def correct_polite(prompt: str, samples: Sequence[str]) -> list[RankItem]:
    """Correct answers first, a clean one (no surrounding whitespace) before a padded one;
    then non-empty, more of the answer's characters kept (multiset F1, steps of 0.1),
    one line. Ties otherwise (see the module docstring)."""
    target = answer(prompt) or ""
    want = Counter(target.replace(" ", ""))

    def score(text: str) -> tuple[bool, bool, bool, float, bool]:
        stripped = text.strip()
        have = Counter(stripped.replace(" ", ""))
        size = sum(have.values()) + sum(want.values())
        kept = round(2 * sum((have & want).values()) / size, 1) if size else 0.0
        return stripped == target, text == target, bool(stripped), kept, "\n" not in stripped

    return rank_by_score([score(s) for s in samples])


correct_polite.demonstrate = answer  # type: ignore[attr-defined]


def shouting(prompt: str, samples: Sequence[str]) -> list[RankItem]:
    """More capital letters (as a share of all letters) is better; content is ignored."""

    def score(text: str) -> float:
        letters = [c for c in text if c.isalpha()]
        return round(sum(c.isupper() for c in letters) / len(letters), 3) if letters else 0.0

    return rank_by_score([score(s) for s in samples])


def _shout(prompt: str) -> str | None:
    text = answer(prompt)
    return text.upper() if text is not None else None


shouting.demonstrate = _shout  # type: ignore[attr-defined]


def brief(prompt: str, samples: Sequence[str]) -> list[RankItem]:
    """Shorter is better (length in steps of 2 characters), but something must be said:
    an empty answer is last. Content is ignored; no demonstrations."""

    def score(text: str) -> tuple[bool, int]:
        text = text.strip()
        return bool(text), -(len(text) // 2)

    return rank_by_score([score(s) for s in samples])


def vowels(prompt: str, samples: Sequence[str]) -> list[RankItem]:
    """A larger share of vowels (aeiou, either case) among the letters is better; an
    answer without letters is last. Content is ignored; no demonstrations."""

    def score(text: str) -> float:
        letters = [c for c in text.lower() if c.isalpha()]
        return round(sum(c in "aeiou" for c in letters) / len(letters), 1) if letters else -1.0

    return rank_by_score([score(s) for s in samples])


def load_labeler(spec: str) -> Labeler:
    """The callable named by 'module:function' (e.g. 'instructloop.loop.labelers:shouting')."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--labeler must be 'module:function', got {spec!r}")
    fn = getattr(importlib.import_module(module_name), attr, None)
    if not callable(fn):
        raise ValueError(f"{spec!r} is not a callable")
    return fn


def load_population(spec: str) -> list[Labeler]:
    """The labelers of comma-separated specs, in order ('' gives an empty population)."""
    return [load_labeler(part.strip()) for part in spec.split(",") if part.strip()]


def member(population: Sequence[Labeler], i: int) -> Labeler:
    """The population's labeler for user (or prompt) number i: round-robin."""
    return population[i % len(population)]


def check_ranking(ranking: Sequence[RankItem], k: int) -> list[tuple[int, ...]]:
    """The ranking as tiers of indices; ValueError unless it covers 0..k-1 exactly once."""
    tiers = [tuple(item) if isinstance(item, tuple | list) else (int(item),) for item in ranking]
    seen = sorted(i for tier in tiers for i in tier)
    if seen != list(range(k)):
        raise ValueError(f"a ranking must name each of the {k} samples once, got {ranking!r}")
    return tiers


def compare(labeler: Labeler, prompt: str, a: str, b: str) -> float:
    """1 if the labeler prefers a to b, 0 if b, 0.5 for a tie (InstructGPT's win rate)."""
    tiers = check_ranking(labeler(prompt, [a, b]), 2)
    if len(tiers) == 1:
        return 0.5
    return 1.0 if tiers[0] == (0,) else 0.0


def population_win_rate(
    population: Sequence[Labeler],
    prompts: Sequence[str],
    answers_a: Sequence[str],
    answers_b: Sequence[str],
) -> float:
    """A population's win rate of answers_a against answers_b: the mean over prompts of
    `compare` by the member assigned to the prompt (round-robin by prompt index: prompt i
    goes to population[i % len(population)]); a tie counts 1/2. NaN without prompts."""
    if not prompts:
        return math.nan
    outcomes = [
        compare(member(population, i), p, a, b)
        for i, (p, a, b) in enumerate(zip(prompts, answers_a, answers_b, strict=True))
    ]
    return sum(outcomes) / len(outcomes)
