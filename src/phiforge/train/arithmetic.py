"""Generated GSM8K-style questions (``arithmetic:N[:SEED]`` as a data path): one-step word problems a small
teacher solves part of the time, as PTS queries or as SFT chats that teach the answer format."""

from __future__ import annotations

import random
from typing import Any

from phiforge.train.config import TrainConfigError

ARITHMETIC = "arithmetic:"
_NAMES = ("Tom", "Sara", "Ben", "Mia", "Sam", "Lily", "Noah", "Emma")
_ITEMS = ("apples", "pencils", "cookies", "marbles", "stickers", "books", "shells", "cards")


def arithmetic_questions(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """N one-step GSM8K-style word problems with small numbers, alternately addition and subtraction.

    Real GSM8K is out of reach of a small teacher (p(success) ~ 0: nothing to find); these are solved
    part of the time (SmolLM2-135M-Instruct: about 0.2-0.6), so PTS has p-jumps to find.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        if i % 2 == 0:
            a, b = rng.randint(2, 6), rng.randint(3, 9)
            event, when, answer, step = f"buys {b} more", "now", a + b, f"{a} + {b}"
        else:
            a, b = rng.randint(5, 9), rng.randint(1, 4)
            event, when, answer, step = f"gives {b} away", "left", a - b, f"{a} - {b}"
        question = f"{name} has {a} {item} and {event}. How many {item} does {name} have {when}?"
        out.append({"id": f"arithmetic-{seed}-{i}", "question": question, "answer": f"#### {answer}",
                    "solution": f"{step} = {answer}\n#### {answer}"})
    return out


def parse_arithmetic(path: str, key: str = "data.path") -> tuple[int, int]:
    """``arithmetic:N`` or ``arithmetic:N:SEED`` -> (N, SEED); SEED 0 when not given."""
    parts = path[len(ARITHMETIC):].split(":")
    if len(parts) > 2 or not all(p.isdigit() for p in parts) or int(parts[0]) < 1:
        raise TrainConfigError(f"{key} {path!r}: expected {ARITHMETIC}N or {ARITHMETIC}N:SEED with N >= 1")
    return int(parts[0]), int(parts[1]) if len(parts) == 2 else 0


def arithmetic_chats(path: str, key: str = "data.path") -> list[dict[str, Any]]:
    """``arithmetic:N[:SEED]`` as chat records (question -> one-line worked solution and ``#### answer``): SFT
    data that teaches a small model the format and, in part, the sums PTS then searches (other seeds)."""
    return [{"id": q["id"], "messages": [{"role": "user", "content": q["question"]},
                                         {"role": "assistant", "content": q["solution"]}]}
            for q in arithmetic_questions(*parse_arithmetic(path, key))]
