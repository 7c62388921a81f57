"""Gopher / C4 rules: each rule fires on the text it targets and real prose passes them all."""

from __future__ import annotations

from curate_corpus import research_paragraphs

from phiforge.data.curate.heuristics import HeuristicsConfig, check, rule_names

PROSE = ("The water cycle describes how water moves between the land, the oceans and the air. Heat from the sun "
         "makes water evaporate from the surface of the sea, and the vapour rises until it cools and condenses "
         "into clouds. When the droplets in a cloud grow heavy enough they fall as rain or snow, and rivers carry "
         "that water back to the sea, where the cycle begins again with the next warm day.")


def test_real_prose_passes() -> None:
    c = HeuristicsConfig()
    assert check(PROSE, c) is None
    passed = [p for p in research_paragraphs() if len(p.split()) >= 50 and check(p, c) is None]
    assert passed  # the research notes are dense but readable


def test_each_rule_fires() -> None:
    c = HeuristicsConfig()
    cases = {
        "gopher_min_words": "Too short to be a document.",
        "gopher_mean_word_length": " ".join(["supercalifragilisticexpialidocious"] * 60),
        "gopher_symbol_ratio": PROSE + " #tag" * 20,
        "gopher_alpha_words": PROSE + " 123 456 789 1011" * 30,
        "gopher_stop_words": " ".join(f"word{i} alpha beta gamma delta" for i in range(15)),
        "gopher_dup_lines": "\n".join([PROSE] + ["Buy cheap shoes today at our store."] * 10),
        "gopher_top_2gram": PROSE + " big deal" * 60,
        "c4_lorem_ipsum": PROSE + " Lorem ipsum dolor sit amet.",
    }
    for rule, text in cases.items():
        reason = check(text, c)
        assert reason is not None and reason.split(" ")[0] == rule, (rule, reason)
        assert rule in rule_names(c)
    assert check(PROSE + " {x}", c) is None  # C4's curly-bracket rule is off by default (code, LaTeX)
    assert check(PROSE + " {x}", HeuristicsConfig(c4_curly_bracket=True)) == "c4_curly_bracket"
