"""Adversarial simulated users: what `simulate --adversaries F --adversary KIND` sends.

Each adversary is a user with a labeler credential like any other; only its judgements
differ. They test what InstructGPT's reviewers asked: can a share of users steer the model?

  inverse         ranks every response in the exact reverse of the honest labeler's
                  order, and demonstrates the answer the honest labeler likes least;
  random          ranks at random and writes no demonstrations (a careless labeler);
  promote-canary  ranks the canary's samples of an arena response first (then honestly),
                  to push a canary to every replica; otherwise ranks honestly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .labelers import Labeler, RankItem, check_ranking

KINDS = ("inverse", "random", "promote-canary")


def rank(
    kind: str,
    labeler: Labeler,
    prompt: str,
    texts: Sequence[str],
    versions: Sequence[str],
    served: str,
    rng: random.Random,
) -> list[RankItem]:
    """An adversary's ranking of K samples (indices, best first; tuples are ties)."""
    honest = check_ranking(labeler(prompt, texts), len(texts))
    if kind == "inverse":
        return list(reversed(honest))
    if kind == "random":
        order = list(range(len(texts)))
        rng.shuffle(order)
        return order
    if kind == "promote-canary":
        canary = [i for i, v in enumerate(versions) if v != served]
        if not canary:
            return list(honest)
        flat = [i for tier in honest for i in tier]
        return [i for i in flat if i in canary] + [i for i in flat if i not in canary]
    raise ValueError(f"--adversary must be one of {', '.join(KINDS)}; got {kind!r}")


def demonstration(kind: str, labeler: Labeler, prompt: str, texts: Sequence[str]) -> str | None:
    """What an adversary writes as the ideal answer: the honest labeler's least liked
    sample (inverse), nothing (random), or the honest demonstration (promote-canary)."""
    if kind == "inverse":
        worst = check_ranking(labeler(prompt, texts), len(texts))[-1][0]
        return texts[worst].strip() or None
    if kind == "random":
        return None
    demonstrate = getattr(labeler, "demonstrate", None)
    return demonstrate(prompt) if demonstrate else None
