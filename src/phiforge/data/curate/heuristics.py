"""Rule-based quality filters in the style of Gopher (quality + repetition) and C4.

Each rule has a name; a document is dropped by the first rule it fails, and the stage counts drops per rule.
Thresholds default to the published Gopher values (Rae et al. 2021, appendix A) and C4's doc-level rules;
``c4_curly_bracket`` is off by default because it removes all code and LaTeX (the FineMath finding).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

WORD = re.compile(r"\S+")
ALPHA = re.compile(r"[^\W\d_]")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "*", "-", "–", "‣", "▪")
TERMINAL = (".", "!", "?", '"', "'", "”", "’")


@dataclass
class HeuristicsConfig:
    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' and '...' per word
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8
    min_stop_words: int = 2
    max_dup_line_fraction: float = 0.3
    max_dup_line_char_fraction: float = 0.2
    # Gopher: the most frequent n-gram may cover at most this fraction of characters (n = 2, 3, 4)
    max_top_ngram_char_fraction: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    # duplicated n-grams (n = 5..10) may cover at most this fraction of characters
    max_dup_ngram_char_fraction: list[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])
    c4_lorem_ipsum: bool = True
    c4_curly_bracket: bool = False
    c4_max_javascript_lines: float = 0.5
    min_terminal_punct_lines: float = 0.0  # C4 keeps only lines ending in terminal punctuation; 0 = off


def _top_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    return count * sum(len(w) for w in gram) / total_chars if count > 1 else 0.0


def _dup_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Characters of words inside n-grams that occur more than once, each word counted once (Gopher)."""
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        if gram in seen:
            covered[i:i + n] = [True] * n
        seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c) / total_chars


def check(text: str, c: HeuristicsConfig) -> str | None:
    """The first rule ``text`` fails, as 'rule (detail)', or None when it passes them all."""
    words = WORD.findall(text)
    n = len(words)
    if n < c.min_words:
        return f"gopher_min_words ({n} < {c.min_words})"
    if n > c.max_words:
        return f"gopher_max_words ({n} > {c.max_words})"
    mean_len = sum(map(len, words)) / n
    if not c.min_mean_word_length <= mean_len <= c.max_mean_word_length:
        return f"gopher_mean_word_length ({mean_len:.1f})"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > c.max_symbol_word_ratio:
        return f"gopher_symbol_ratio ({symbols / n:.2f})"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if sum(ln.startswith(BULLETS) for ln in lines) / len(lines) > c.max_bullet_lines:
        return "gopher_bullet_lines"
    if sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) > c.max_ellipsis_lines:
        return "gopher_ellipsis_lines"
    alpha = sum(bool(ALPHA.search(w)) for w in words) / n
    if alpha < c.min_alpha_words:
        return f"gopher_alpha_words ({alpha:.2f})"
    lower = [w.lower().strip(".,;:!?\"'()") for w in words]
    stops = sum(w in STOP_WORDS for w in lower)
    if stops < c.min_stop_words:
        return f"gopher_stop_words ({stops} < {c.min_stop_words})"
    return _repetition(text, lines, lower, c) or _c4(text, lines, c)


def _repetition(text: str, lines: list[str], words: list[str], c: HeuristicsConfig) -> str | None:
    counts = Counter(lines)
    dup_lines = sum(k for k in counts.values() if k > 1)
    if dup_lines / len(lines) > c.max_dup_line_fraction:
        return f"gopher_dup_lines ({dup_lines}/{len(lines)})"
    dup_chars = sum(len(line) * k for line, k in counts.items() if k > 1)
    if dup_chars / max(len(text), 1) > c.max_dup_line_char_fraction:
        return "gopher_dup_line_chars"
    total = sum(map(len, words)) or 1
    for n, limit in enumerate(c.max_top_ngram_char_fraction, start=2):
        frac = _top_ngram_fraction(words, n, total)
        if frac > limit:
            return f"gopher_top_{n}gram ({frac:.2f} > {limit})"
    for n, limit in enumerate(c.max_dup_ngram_char_fraction, start=5):
        frac = _dup_ngram_fraction(words, n, total)
        if frac > limit:
            return f"gopher_dup_{n}gram ({frac:.2f} > {limit})"
    return None


def _c4(text: str, lines: list[str], c: HeuristicsConfig) -> str | None:
    lower = text.lower()
    if c.c4_lorem_ipsum and "lorem ipsum" in lower:
        return "c4_lorem_ipsum"
    if c.c4_curly_bracket and "{" in text:
        return "c4_curly_bracket"
    if sum("javascript" in ln.lower() for ln in lines) / len(lines) > c.c4_max_javascript_lines:
        return "c4_javascript"
    terminal = sum(ln.endswith(TERMINAL) for ln in lines) / len(lines)
    if terminal < c.min_terminal_punct_lines:
        return f"c4_terminal_punct ({terminal:.2f})"
    return None


def rule_names(c: HeuristicsConfig) -> list[str]:
    """Every rule name the stats can show, in check order."""
    names = ["gopher_min_words", "gopher_max_words", "gopher_mean_word_length", "gopher_symbol_ratio",
             "gopher_bullet_lines", "gopher_ellipsis_lines", "gopher_alpha_words", "gopher_stop_words",
             "gopher_dup_lines", "gopher_dup_line_chars"]
    names += [f"gopher_top_{n}gram" for n in range(2, 2 + len(c.max_top_ngram_char_fraction))]
    names += [f"gopher_dup_{n}gram" for n in range(5, 5 + len(c.max_dup_ngram_char_fraction))]
    return names + ["c4_lorem_ipsum", "c4_curly_bracket", "c4_javascript", "c4_terminal_punct"]
