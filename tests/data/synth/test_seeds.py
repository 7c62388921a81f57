from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from phiforge.data.synth import SynthConfig, run_synth
from phiforge.data.synth.seeds import (
    AUDIENCES,
    FORMATS,
    STYLES,
    SeedError,
    check_choices,
    load_passages,
    load_topics,
    sample_seed,
)


def test_builtin_topics_cover_six_areas() -> None:
    topics = load_topics()
    areas = Counter(t.area for t in topics)
    assert len(topics) == 300 and len({t.name for t in topics}) == 300
    assert set(areas) == {"science", "mathematics", "daily life", "history", "psychology", "programming"}
    assert min(areas.values()) == 50


def test_empty_topic_list_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "topics.txt"
    empty.write_text("# science\n\n   \n")
    with pytest.raises(SeedError, match=r"topics.txt: the topic list is empty"):
        load_topics(empty)
    config = SynthConfig.from_dict({"seeds": {"topics": str(empty)}, "run": {"out_dir": str(tmp_path / "o")}})
    with pytest.raises(SeedError, match="empty"):
        run_synth(config)  # fails before any teacher is loaded
    with pytest.raises(SeedError, match="no such topics file"):
        load_topics(tmp_path / "missing.txt")


def test_sampling_is_per_document_deterministic_and_combinatorial() -> None:
    topics = load_topics()
    args = (topics, list(AUDIENCES), list(FORMATS), list(STYLES))
    seeds = [sample_seed(i, 7, *args) for i in range(600)]
    assert seeds[123] == sample_seed(123, 7, *args)  # no dependence on the other documents
    assert seeds[5] != sample_seed(5, 8, *args)
    assert {s.format for s in seeds} == set(FORMATS) and {s.style for s in seeds} == set(STYLES)
    assert {s.audience for s in seeds} == set(AUDIENCES)
    assert all(s.audience == "young children" for s in seeds if s.format == "story")
    assert all(s.audience != "young children" for s in seeds if s.format == "python")
    assert len({s.topic for s in seeds}) > 200
    balanced = [sample_seed(i, 7, *args, balance_formats=True) for i in range(60)]
    assert Counter(s.format for s in balanced) == dict.fromkeys(FORMATS, 10)


def test_web_passages(tmp_path: Path) -> None:
    text = tmp_path / "web.txt"
    text.write_text(("word " * 400).strip() + "\n\nA second, short passage.\n")
    passages = load_passages(text)
    assert len(passages) == 2 and len(passages[0].text) <= 1000 and passages[0].text.endswith("word")
    assert passages[0].id.startswith("web.txt:1:")
    seeds = [sample_seed(i, 0, load_topics(), list(AUDIENCES), list(FORMATS), list(STYLES), passages, 0.5)
             for i in range(200)]
    with_passage = [s for s in seeds if s.passage_id]
    assert 60 < len(with_passage) < 140 and all(s.passage in {p.text for p in passages} for s in with_passage)
    assert "passage" not in with_passage[0].metadata() and with_passage[0].metadata()["passage_id"]

    bad = tmp_path / "web.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(SeedError, match=r"web.jsonl:2: expected an object with a string field 'text'"):
        load_passages(bad)


def test_unknown_choice_names_the_key() -> None:
    with pytest.raises(SeedError, match=r"seeds.formats: unknown \['poem'\]"):
        check_choices("formats", ["poem"], FORMATS)
    with pytest.raises(SeedError, match="seeds.audiences"):
        SynthConfig.from_dict({"seeds": {"audiences": ["toddlers"]}})
