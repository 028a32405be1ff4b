"""Records as the server logs them, built locally: for tests, benchmarks and dry runs.

`preference_data` makes a learnable synthetic preference: every prompt has K answers of
random words, and the answers that contain a marker word are ranked above the others.
A reward model that learns to spot the word ranks held-out answers correctly.
"""

from __future__ import annotations

import random

from instructloop.v1 import api_pb2, records_pb2

WORDS = (  # noqa: SIM905  (one string reads better than 60 quoted words)
    "the of and to in is you that it was for on are as with they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which she do "
    "how their if will up other about out many then them these so some her would make like"
).split()


def prompt_record(
    prompt_id: str, prompt: str, answers: list[str], user_id: str, version: str = "v0"
) -> records_pb2.PromptRecord:
    """A logged Generate call with one sample per answer (sample ids '<prompt_id>-s<i>')."""
    rec = records_pb2.PromptRecord(prompt_id=prompt_id, prompt=prompt, user_id=user_id)
    rec.version = version
    for i, text in enumerate(answers):
        rec.samples.add(sample_id=f"{prompt_id}-s{i}", index=i, text=text, version=version)
    rec.created.GetCurrentTime()
    return rec


def _feedback(feedback_id: str, prompt: records_pb2.PromptRecord, user_id: str, **kind):
    rec = records_pb2.FeedbackRecord(
        feedback_id=feedback_id,
        feedback=api_pb2.SubmitFeedbackRequest(prompt_id=prompt.prompt_id, user_id=user_id, **kind),
        version=prompt.version,
    )
    rec.created.GetCurrentTime()
    return rec


def ranking_record(
    feedback_id: str, prompt: records_pb2.PromptRecord, tiers: list[list[int]], user_id: str
) -> records_pb2.FeedbackRecord:
    """A ranking of the prompt's samples: tiers of sample indices, best first."""
    ranking = api_pb2.Ranking(
        tiers=[
            api_pb2.RankTier(sample_ids=[prompt.samples[i].sample_id for i in tier])
            for tier in tiers
        ]
    )
    return _feedback(feedback_id, prompt, user_id, ranking=ranking)


def choice_record(
    feedback_id: str, prompt: records_pb2.PromptRecord, chosen: int, rejected: int, user_id: str
) -> records_pb2.FeedbackRecord:
    choice = api_pb2.Choice(
        chosen_sample_id=prompt.samples[chosen].sample_id,
        rejected_sample_id=prompt.samples[rejected].sample_id,
    )
    return _feedback(feedback_id, prompt, user_id, choice=choice)


def rating_record(
    feedback_id: str, prompt: records_pb2.PromptRecord, scores: list[float], user_id: str
) -> records_pb2.FeedbackRecord:
    rating = api_pb2.Rating(
        scores=[
            api_pb2.SampleScore(sample_id=prompt.samples[i].sample_id, score=s)
            for i, s in enumerate(scores)
        ]
    )
    return _feedback(feedback_id, prompt, user_id, rating=rating)


def demonstration_record(
    feedback_id: str, prompt: records_pb2.PromptRecord, text: str, user_id: str
) -> records_pb2.FeedbackRecord:
    demo = api_pb2.Demonstration(text=text)
    return _feedback(feedback_id, prompt, user_id, demonstration=demo)


def preference_data(
    n_prompts: int,
    k: int = 4,
    n_users: int = 20,
    seed: int = 0,
    word: str = "good",
    answer_words: int = 6,
) -> list[tuple[records_pb2.PromptRecord, records_pb2.FeedbackRecord]]:
    """Prompts with K answers, ranked: answers containing `word` first (tied), then the rest.

    Half the answers (rounded down, at least one) carry the word at a random position.
    """
    rng = random.Random(seed)
    out = []
    for p in range(n_prompts):
        user = f"user{rng.randrange(n_users)}"
        prompt = f"{rng.choice(['write', 'list', 'say'])} {' '.join(rng.sample(WORDS, 3))}:"
        good = set(rng.sample(range(k), max(1, k // 2)))
        answers = []
        for i in range(k):
            words = [rng.choice(WORDS) for _ in range(answer_words)]
            if i in good:
                words[rng.randrange(answer_words)] = word
            answers.append(" " + " ".join(words))
        rec = prompt_record(f"p{seed}-{p}", prompt, answers, user)
        tiers = [sorted(good), [i for i in range(k) if i not in good]]
        out.append((rec, ranking_record(f"f{seed}-{p}", rec, tiers, user)))
    return out
