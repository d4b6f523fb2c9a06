"""Verifiable tasks and their checkers: prompts a tiny model can learn in a few hundred CPU steps, scored by code.

Library code: the ``toy``/``toy_format``/``exact_match`` rewards (``rewards.py``), the evaluation's gold reward
(``eval/verifiable.py``) and the toy kit's datasets (``toy.py``) all read them here. Every stage's tests and the
demo train on these. SFT learns them from demonstrations, the reward model and DPO
learn them from (correct, corrupted) pairs, PPO/GRPO improve `gold_reward` and evaluation reports
`exact_match`. Because the score comes from code rather than a learned reward model, we can check that an RL
stage improved real correctness and did not just exploit its reward model.

Design choices, and why:
- Answers are a few tokens long, so a 4-layer model learns them quickly and a rollout is short.
- Each task has one fixed phrasing that names it ("Add 23 and 58."), so `task_of` finds the task from the
  prompt alone and the model sees which skill a prompt asks for.
- Items are separated by spaces ("c a t") so that each letter or digit gets its own token. That makes reverse
  and sort position-by-position operations over tokens, which attention does easily.
- The prompt spaces are large (at least 10,000 prompts per task), so a 200-row evaluation set can be held out
  from thousands of training rows.
- `gold_reward` gives partial credit that rises with correctness (closeness of a number, share of positions
  right). Every wrong answer scores below 1.0, and extra output only lowers the score, so a policy cannot
  gain reward by writing more.

This module imports only the standard library.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

# Short, common words. Each word and its upper-case form become single BPE tokens, so copy/upper/count
# are token-level skills. 48 words in 1-3 word phrases give ~113k distinct prompts.
WORDS: tuple[str, ...] = (
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "fox",
    "owl",
    "bee",
    "sun",
    "moon",
    "star",
    "sky",
    "sea",
    "tree",
    "leaf",
    "rock",
    "fire",
    "ice",
    "rain",
    "snow",
    "wind",
    "bird",
    "fish",
    "frog",
    "cake",
    "milk",
    "tea",
    "egg",
    "rice",
    "salt",
    "book",
    "pen",
    "door",
    "key",
    "cup",
    "box",
    "ship",
    "car",
    "road",
    "hill",
    "lake",
    "gold",
    "iron",
    "wood",
    "rose",
    "lion",
    "bear",
    "wolf",
)
LETTERS: str = "abcdefghijklmnopqrstuvwxyz"
_INT_RE = re.compile(r"-?\d+")


def normalize(text: str) -> str:
    """Collapse runs of whitespace and strip the ends; case is kept (upper-casing is a task)."""
    return " ".join(text.split())


def exact_match(response: str, reference: str) -> bool:
    """True when `response` equals `reference` after whitespace normalisation (case-sensitive)."""
    return normalize(response) == normalize(reference)


def _parse_int(text: str) -> int | None:
    """The integer `text` spells, or None. The whole response must be one integer: "81." or "81 81" are
    not answers, so a policy cannot collect credit by listing several numbers."""
    stripped = text.strip()
    return int(stripped) if _INT_RE.fullmatch(stripped) else None


def number_credit(response: str, reference: str, scale: float) -> float:
    """Partial credit for a numeric answer: 0.9 at distance 0 falling linearly to 0 at distance `scale`.

    The top is 0.9 rather than 1.0 so that a wrong-but-close number always stays below an exact answer."""
    value, target = _parse_int(response), _parse_int(reference)
    if value is None or target is None:
        return 0.0
    return 0.9 * max(0.0, 1.0 - abs(value - target) / scale)


def position_credit(response: str, reference: str) -> float:
    """Share of whitespace-separated positions that hold the right item.

    The denominator is the longer of the two lengths, so extra items lower the score: padding a response
    never pays. A fully right list that also has the right length is an exact match and is scored 1.0 by
    `gold_reward` before this is called; otherwise this is at most (n-1)/n or n/(n+1), both below 1."""
    got, want = response.split(), reference.split()
    if not got or not want:
        return 0.0
    hits = sum(g == w for g, w in zip(got, want))
    return hits / max(len(got), len(want))


@dataclass(frozen=True)
class Task:
    """One verifiable task: how to draw an instance, phrase it, answer it and score an answer.

    `draw` returns the instance's arguments; `prompt`, `answer` and `sentence` (a plain-text statement with
    its answer, for continued pretraining) are functions of them. `pattern` recognises this task's prompts and
    `answer_pattern` the shape of an answer (right or wrong: "81" for add, "t a c" for reverse), matched on the
    whitespace-normalised response by `format_reward`.
    `credit` gives partial credit for a non-exact answer; it must stay below 1.0.
    `corrupt_once` proposes a plausible wrong answer (it may return the reference; `corrupt` retries).
    """

    name: str
    pattern: re.Pattern[str]
    answer_pattern: re.Pattern[str]
    draw: Callable[[random.Random], tuple]
    prompt: Callable[..., str]
    answer: Callable[..., str]
    sentence: Callable[..., str]
    credit: Callable[[str, str], float]
    corrupt_once: Callable[[str, random.Random], str]

    def generate(self, rng: random.Random) -> tuple[str, str]:
        """Draw one instance: (user prompt text, reference answer)."""
        args = self.draw(rng)
        return self.prompt(*args), self.answer(*args)

    def generate_text(self, rng: random.Random) -> tuple[str, str]:
        """Draw one instance as plain text: (user prompt text, a sentence stating the answer).

        The prompt is returned too so the caller can keep held-out prompts out of the pretraining text."""
        args = self.draw(rng)
        return self.prompt(*args), self.sentence(*args)

    def reward(self, response: str, reference: str) -> float:
        """Gold reward in [0, 1] for this task; see `gold_reward`."""
        if exact_match(response, reference):
            return 1.0
        return min(max(self.credit(response, reference), 0.0), 0.99)


# ---- corruption helpers: each makes the mistake a model is likely to make ------------------------------------


def _swap_two(items: list[str], rng: random.Random) -> list[str]:
    """Swap two positions that hold different items (a near miss for reverse/sort)."""
    distinct = [(i, j) for i in range(len(items)) for j in range(i + 1, len(items)) if items[i] != items[j]]
    if not distinct:
        return items
    i, j = rng.choice(distinct)
    out = list(items)
    out[i], out[j] = out[j], out[i]
    return out


def _corrupt_number(reference: str, rng: random.Random, deltas: tuple[int, ...]) -> str:
    value = int(reference) + rng.choice(deltas) * rng.choice((-1, 1))
    return str(abs(value))  # abs keeps it a plausible (non-negative) answer; may equal reference, retried


def _corrupt_letters(reference: str, rng: random.Random) -> str:
    items = reference.split()
    if rng.random() < 0.5:
        return " ".join(_swap_two(items, rng))
    out = list(items)
    out[rng.randrange(len(out))] = rng.choice(LETTERS)  # one wrong letter
    return " ".join(out)


def _corrupt_digits(reference: str, rng: random.Random) -> str:
    items = reference.split()
    if rng.random() < 0.5:
        return " ".join(_swap_two(items, rng))
    out = list(items)
    out[rng.randrange(len(out))] = str(rng.randrange(10))  # one wrong digit
    return " ".join(out)


def _corrupt_words(reference: str, rng: random.Random) -> str:
    items = reference.split()
    roll = rng.random()
    if roll < 0.3 and len(items) > 1:
        del items[rng.randrange(len(items))]  # a dropped word
        return " ".join(items)
    if roll < 0.6 and len(items) > 1:
        return " ".join(_swap_two(items, rng))
    i = rng.randrange(len(items))
    word = rng.choice(WORDS)
    items[i] = word.upper() if items[i].isupper() else word  # a substituted word, in the same case
    return " ".join(items)


def _corrupt_upper(reference: str, rng: random.Random) -> str:
    items = reference.split()
    if rng.random() < 0.5:
        return " ".join(items).lower()  # forgot to upper-case at all
    i = rng.randrange(len(items))
    items[i] = items[i].lower()  # forgot one word
    return " ".join(items)


# ---- instance drawing ------------------------------------------------------------------------------------------


def _draw_add(rng: random.Random) -> tuple[int, int]:
    return rng.randrange(100), rng.randrange(100)


def _draw_letters(rng: random.Random) -> tuple[list[str]]:
    return ([rng.choice(LETTERS) for _ in range(rng.randint(3, 5))],)


def _draw_digits(rng: random.Random) -> tuple[list[int]]:
    return ([rng.randrange(10) for _ in range(rng.randint(3, 5))],)


def _draw_words(rng: random.Random) -> tuple[list[str]]:
    return ([rng.choice(WORDS) for _ in range(rng.randint(1, 3))],)


def _draw_many_letters(rng: random.Random) -> tuple[list[str]]:
    return ([rng.choice(LETTERS) for _ in range(rng.randint(3, 12))],)


def _draw_count(rng: random.Random) -> tuple[list[str]]:
    return ([rng.choice(WORDS) for _ in range(rng.randint(2, 7))],)


def _join(items: list) -> str:
    return " ".join(str(x) for x in items)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="add",
            pattern=re.compile(r"Add \d+ and \d+\."),
            answer_pattern=_INT_RE,  # one integer, as `_parse_int` reads it
            draw=_draw_add,
            prompt=lambda a, b: f"Add {a} and {b}.",
            answer=lambda a, b: str(a + b),
            sentence=lambda a, b: f"{a} plus {b} equals {a + b}.",
            # Sums range 0..198; a miss by 20 or more earns nothing.
            credit=lambda r, ref: number_credit(r, ref, scale=20.0),
            corrupt_once=lambda ref, rng: _corrupt_number(ref, rng, deltas=(1, 1, 2, 10)),
        ),
        Task(
            name="reverse",
            pattern=re.compile(r"Reverse: [a-z](?: [a-z])+"),
            answer_pattern=re.compile(r"[a-z](?: [a-z])*"),
            draw=_draw_letters,
            prompt=lambda xs: f"Reverse: {_join(xs)}",
            answer=lambda xs: _join(xs[::-1]),
            sentence=lambda xs: f"The reverse of {_join(xs)} is {_join(xs[::-1])}.",
            credit=position_credit,
            corrupt_once=_corrupt_letters,
        ),
        Task(
            name="sort",
            pattern=re.compile(r"Sort: \d(?: \d)+"),
            answer_pattern=re.compile(r"[0-9](?: [0-9])*"),
            draw=_draw_digits,
            prompt=lambda xs: f"Sort: {_join(xs)}",
            answer=lambda xs: _join(sorted(xs)),
            sentence=lambda xs: f"Sorted, {_join(xs)} becomes {_join(sorted(xs))}.",
            credit=position_credit,
            corrupt_once=_corrupt_digits,
        ),
        Task(
            name="copy",
            pattern=re.compile(r"Repeat: [a-z]+(?: [a-z]+)*"),
            answer_pattern=re.compile(r"[a-z]+(?: [a-z]+)*"),
            draw=_draw_words,
            prompt=lambda ws: f"Repeat: {_join(ws)}",
            answer=lambda ws: _join(ws),
            sentence=lambda ws: f"Repeating {_join(ws)} gives {_join(ws)}.",
            credit=position_credit,
            corrupt_once=_corrupt_words,
        ),
        Task(
            name="upper",
            pattern=re.compile(r"Uppercase: [a-z]+(?: [a-z]+)*"),
            answer_pattern=re.compile(r"[A-Z]+(?: [A-Z]+)*"),
            draw=_draw_words,
            prompt=lambda ws: f"Uppercase: {_join(ws)}",
            answer=lambda ws: _join(ws).upper(),
            sentence=lambda ws: f"In capitals, {_join(ws)} is {_join(ws).upper()}.",
            credit=position_credit,
            corrupt_once=_corrupt_upper,
        ),
        Task(
            name="count",
            pattern=re.compile(r"Count the words: [a-z]+(?: [a-z]+)*"),
            answer_pattern=_INT_RE,
            draw=_draw_count,
            prompt=lambda ws: f"Count the words: {_join(ws)}",
            answer=lambda ws: str(len(ws)),
            sentence=lambda ws: f"The list {_join(ws)} has {len(ws)} words.",
            # Counts range 2..7; off by 4 or more earns nothing.
            credit=lambda r, ref: number_credit(r, ref, scale=4.0),
            # Mostly near misses, sometimes a far one: a reward model that never saw "2" rejected for seven
            # words scores it as well as "7" (seen in the demo, where PPO found exactly that).
            corrupt_once=lambda ref, rng: _corrupt_number(ref, rng, deltas=(1, 1, 2, 3)),
        ),
        Task(
            name="letters",
            pattern=re.compile(r"Count the letters: [a-z](?: [a-z])+"),
            answer_pattern=_INT_RE,
            draw=_draw_many_letters,
            prompt=lambda xs: f"Count the letters: {_join(xs)}",
            answer=lambda xs: str(len(xs)),
            sentence=lambda xs: f"The letters {_join(xs)} are {len(xs)} letters.",
            # Counts range 3..12: long lists are where a small model miscounts by one or two.
            credit=lambda r, ref: number_credit(r, ref, scale=4.0),
            corrupt_once=lambda ref, rng: _corrupt_number(ref, rng, deltas=(1, 1, 2, 3, 5)),
        ),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
# What the toy kit draws from unless told otherwise ("letters" joined later, for the demo, and is opt-in so
# that every earlier dataset stays byte-identical).
DEFAULT_TASKS: tuple[str, ...] = ("add", "reverse", "sort", "copy", "upper", "count")


def get_task(task_name: str) -> Task:
    """The task called `task_name`; raises ValueError naming the known tasks."""
    try:
        return TASKS[task_name]
    except KeyError:
        raise ValueError(f"unknown task {task_name!r}; expected one of {', '.join(TASK_NAMES)}") from None


def task_of(prompt_text: str) -> str:
    """The name of the task whose phrasing `prompt_text` uses (matched on the whole, stripped prompt).

    Raises ValueError when no task matches, so a prompt that drifted from the fixed phrasing is caught rather
    than scored as zero."""
    text = prompt_text.strip()
    for task in TASKS.values():
        if task.pattern.fullmatch(text):
            return task.name
    raise ValueError(f"prompt {text[:80]!r} matches no toy task ({', '.join(TASK_NAMES)})")


def gold_reward(task_name: str, response: str, reference: str) -> float:
    """Ground-truth reward in [0, 1]: 1.0 for an exact match, else partial credit below 1.0 that rises with
    correctness (numbers: closeness; lists: share of positions right, with extra items counted as wrong),
    and 0.0 for an empty or unparseable response."""
    return get_task(task_name).reward(response, reference)


def format_reward(task_name: str, response: str) -> float:
    """1.0 when `response` has the shape of an answer to `task_name` (one integer for add and count, single
    lower-case letters for reverse, single digits for sort, lower-case words for copy, upper-case words for
    upper; whitespace-normalised, so "c  a\nt" counts as "c a t"), else 0.0. Right or wrong is not checked: this
    is a format reward that needs no reference."""
    return 1.0 if get_task(task_name).answer_pattern.fullmatch(normalize(response)) else 0.0


def score_prompt(prompt_text: str, response: str, reference: str) -> float:
    """`gold_reward` for a prompt whose task is read from its text (rows without a "task" field)."""
    return gold_reward(task_of(prompt_text), response, reference)


def corrupt(task_name: str, reference: str, rng: random.Random) -> str:
    """A plausible wrong answer for `reference` (off-by-one number, one swap, a dropped word...), never equal
    to it under `exact_match`. Used for the rejected side of preference pairs."""
    task = get_task(task_name)
    for _ in range(100):
        candidate = task.corrupt_once(reference, rng)
        if not exact_match(candidate, reference):
            return candidate
    # Unreachable for references the tasks produce; kept so a caller's odd reference cannot loop forever.
    return normalize(reference) + " " + normalize(reference)
