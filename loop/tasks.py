"""The default task set: short instructions with one correct answer.

A prompt is "TASK: INPUT\\n" and its answer is the text after the newline. The default
base (instructloop.pretrain) saw this format only in worksheets, followed by more
instructions, never by an answer: demonstrations and comparisons teach it to answer.

    reverse: abc\\n        -> cba
    sort: d b a\\n         -> a b d
    uppercase: the day\\n  -> THE DAY

The trailing newline marks where the answer starts, and it keeps the learner's
deduplication (a prompt that contains another prompt is dropped) from treating
"reverse: ab" as a variant of "reverse: abc".
"""

from __future__ import annotations

import random
import string

from instructloop.tinymodel import WORDS

TASKS = ("reverse", "sort", "uppercase")


def make_prompt(rng: random.Random, tasks: tuple[str, ...] = TASKS) -> str:
    """One random prompt of the task set."""
    task = rng.choice(tasks)
    if task == "uppercase":
        return f"uppercase: {' '.join(rng.sample(WORDS, rng.randint(1, 3)))}\n"
    letters = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
    if task == "sort":
        return f"sort: {' '.join(letters)}\n"
    return f"reverse: {letters}\n"


def answer(prompt: str) -> str | None:
    """The correct answer to a task prompt, or None if the prompt is not one of ours."""
    task, sep, arg = prompt.strip().partition(": ")
    if not sep:
        return None
    if task == "reverse":
        return arg[::-1]
    if task == "sort":
        return " ".join(sorted(arg.split()))
    if task == "uppercase":
        return arg.upper()
    if task == "count":
        return str(len(arg.split()))
    return None
