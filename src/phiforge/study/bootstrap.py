"""Paired bootstrap of the difference between two arms' scores on the same items.

Each arm has a [seeds, items] matrix of per-item scores (accuracy 0/1 on a benchmark item, the mean NLL of
a held-out window). A replicate draws the items with replacement, the same draw for both arms (they are
paired: both answered the same questions), and each arm's seeds with replacement (so the interval also
carries the seed-to-seed spread); the replicate's difference is the mean over the drawn seeds of the mean
over the drawn items, arm A minus arm B. The interval is the percentile interval of the replicates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from phiforge.errors import EvalError


@dataclass(frozen=True)
class Difference:
    difference: float  # mean(A) - mean(B) on all items and seeds
    low: float
    high: float
    level: float
    replicates: int
    items: int

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float | int | bool]:
        return {**asdict(self), "significant": self.significant}


def draws(rng: np.random.Generator, replicates: int, items: int, seeds_a: int, seeds_b: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The indices a bootstrap uses, in the order it draws them: items [R, n], seeds of A [R, Sa], of B [R, Sb]."""
    return (rng.integers(0, items, size=(replicates, items)), rng.integers(0, seeds_a, size=(replicates, seeds_a)),
            rng.integers(0, seeds_b, size=(replicates, seeds_b)))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, replicates: int = 2000, seed: int = 0,
                     level: float = 0.95) -> Difference:
    """A minus B, with its ``level`` percentile interval; a and b are [seeds, items] on the same items."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise EvalError(f"paired bootstrap needs the same items for both arms; got {a.shape[1]} and {b.shape[1]}")
    items, seeds_a, seeds_b = draws(np.random.default_rng(seed), replicates, a.shape[1], a.shape[0], b.shape[0])
    # per seed and replicate: the mean over the replicate's items; then the mean over the replicate's seeds
    per_a = a[:, items].mean(axis=2)  # [Sa, R]
    per_b = b[:, items].mean(axis=2)
    rows = np.arange(replicates)
    mean_a = per_a[seeds_a, rows[:, None]].mean(axis=1)
    mean_b = per_b[seeds_b, rows[:, None]].mean(axis=1)
    diffs = mean_a - mean_b
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return Difference(float(a.mean() - b.mean()), float(low), float(high), level, replicates, a.shape[1])
