"""phiforge topics: dedup, balance and resume against a scripted teacher on 127.0.0.1; the embedded teacher (slow)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from openai_server import FaultyOpenAIServer, default_answer, http_config

from phiforge.cli import main
from phiforge.data.curate.classifier import get_embedder
from phiforge.data.synth import run_synth
from phiforge.data.synth.seeds import load_topics
from phiforge.data.synth.topics import TopicsConfig, normalize, parse_list, run_topics
from phiforge.data.synth.writer import read_records
from phiforge.run.report import build_report

POOL = [t.name for t in load_topics()]  # 300 distinct real topics to hand out
TAXONOMY = """# a seed taxonomy: areas, subjects, topics
# alpha
volcanic eruptions
## castles
medieval castle design
# beta
prime factorization
# gamma
gamma lore
"""


def _pick(*parts: Any) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def scripted(body: dict[str, Any]) -> str:
    """Numbered lists as a chat teacher writes them, with the noise dedup must catch: the same topic in
    other case and punctuation, the same words reordered (an embedding duplicate), chatter, overlong lines.
    Area gamma only ever repeats itself, so it stalls and is closed."""
    prompt, seed = body["messages"][-1]["content"], body["seed"]
    if m := re.search(r"taught within (.+?)\. Each", prompt):
        area = m.group(1)
        names = ["gamma studies"] if area == "gamma" else [f"{area} subject {k}" for k in range(_pick(seed) % 3 + 2)]
        return "Here are the subjects:\n" + "\n".join(f"{i + 1}. {n}" for i, n in enumerate(names))
    if not (m := re.search(r'\(([^()]+)\)\. Each item', prompt)):
        return default_answer(body)  # a synth document prompt
    area = m.group(1)
    if area == "gamma":
        return "1. Gamma lore\n2. gamma lore!"
    start = _pick(seed, area) % len(POOL)
    fresh = [POOL[(start + k) % len(POOL)] for k in range(5)]
    lines = [f"{i + 1}. {t.capitalize()}" for i, t in enumerate(fresh)]
    lines += [f"6. {fresh[0].upper()}!", f"7) {' '.join(reversed(fresh[1].split()))} - the same, reordered",
              "8. Sure, these are great topics to study in any class at all, really", "- Introduction"]
    return "Sure! Here is the list:\n" + "\n".join(lines)


def config(tmp_path: Path, base_url: str, out: str, *extra: str) -> TopicsConfig:
    taxonomy = tmp_path / "taxonomy.txt"
    taxonomy.write_text(TAXONOMY)
    return TopicsConfig.from_dict({}, [f"run.out_dir={tmp_path / out}", "run.num_topics=60", "run.progress=false",
                                       f"taxonomy.file={taxonomy}", "teacher.kind=openai",
                                       f"teacher.base_url={base_url}", "teacher.model=scripted",
                                       "teacher.concurrency=4", "grow.requests_per_area=3", "grow.patience=2", *extra])


def read(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "topics.jsonl").read_text().splitlines()]


def test_dedup_balance_and_resume(tmp_path: Path) -> None:
    with FaultyOpenAIServer(faults=False, answer=scripted) as srv:
        stats = run_topics(config(tmp_path, srv.base_url, "reference"))
        # resume: a run stopped after two rounds, then killed mid-journal-write (a torn line and embedding rows
        # of a round that never committed), goes on to exactly the uninterrupted run's topics
        partial = run_topics(config(tmp_path, srv.base_url, "resumed", "run.max_rounds=2"))
        out = tmp_path / "resumed"
        with open(out / "journal.jsonl", "ab") as fh:
            fh.write(b'{"round": 3, "topics": [{"topic": "torn')
        with open(out / "embeddings.f32", "ab") as fh:
            fh.write(np.ones(384 * 2, np.float32).tobytes())
        resumed = run_topics(config(tmp_path, srv.base_url, "resumed"))
        # synth on the grown file: documents carry the subject; the coverage goes into the run report
        run = tmp_path / "run"
        run_synth(http_config(tmp_path, srv.base_url, 12, f"seeds.topics={out / 'topics.txt'}",
                              "filter.min_words=1", out=run / "synth"))
    grown = {t["topic"]: t for t in read(out)}
    docs = read_records(run / "synth")
    assert docs and all(d["metadata"].get("subject", "") == grown[d["metadata"]["topic"]]["subject"] for d in docs)
    html = build_report(run).read_text()
    assert "Topics (phiforge topics)" in html and "shortfall" in html  # the scalars; dicts are bar charts
    assert not partial["complete"] and partial["topics"] < 60 and partial["rounds"] == 3  # seed round + 2
    assert resumed["resumed_rounds"] == 3 and resumed["complete"]
    assert read(out) == read(tmp_path / "reference")
    assert (out / "topics.txt").read_text() == (tmp_path / "reference" / "topics.txt").read_text()

    topics = read(tmp_path / "reference")
    # dedup: no two topics share a normalized text or are within the similarity threshold of each other
    keys = [normalize(t["topic"]) for t in topics]
    assert len(set(keys)) == len(keys) == stats["topics"] == 60
    vectors = get_embedder("all-minilm-l6-v2").embed([t["topic"] for t in topics])
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, 0)
    assert sims.max() < 0.85 and abs(stats["nn_similarity"]["max"] - sims.max()) < 1e-3
    assert [t["nn_similarity"] for t in topics] == pytest.approx(sims.max(1), abs=1e-3)
    rejected = stats["rejected_by_reason"]
    assert rejected["duplicate: text"] > 0 and rejected["duplicate: embedding"] > 0
    assert rejected["format: length"] > 0 and rejected["format: generic"] > 0
    assert not any(t["topic"].lower().startswith("sure") or t["topic"] == "Introduction" for t in topics)
    # balance: gamma stalls (closed after grow.patience rounds) and alpha and beta share the rest equally
    assert stats["closed_areas"] == ["gamma"] and stats["per_area"]["gamma"] == 1
    assert (stats["per_area"]["alpha"], stats["per_area"]["beta"]) == (30, 29)  # the remainder to the first
    assert sum(stats["nn_similarity_histogram"].values()) == 60
    # taxonomy paths: seeds keep theirs, grown topics sit under a teacher-made subject of their area
    by_topic = {t["topic"]: t for t in topics}
    assert by_topic["medieval castle design"]["path"] == ["alpha", "castles", "medieval castle design"]
    assert by_topic["volcanic eruptions"]["path"] == ["alpha", "volcanic eruptions"]
    grown = [t for t in topics if t["source"] == "teacher"]
    assert grown and all(t["subject"].startswith(t["area"]) or t["subject"] == "castles" for t in grown)
    # the topics file round-trips through synth's reader with areas and subjects
    loaded = load_topics(tmp_path / "reference" / "topics.txt")
    assert sorted((t.name, t.area, t.subject) for t in loaded) == \
        sorted((t["topic"], t["area"], t["subject"]) for t in topics)


def test_parse_and_normalize() -> None:
    text = "Sure! Here are topics:\n1. **Black holes**: where light is trapped\n2) Stars (hot)\n- Galaxies - big\n\n"
    assert parse_list(text) == ["Sure! Here are topics", "Black holes", "Stars", "Galaxies"]
    assert normalize("The Black Holes!") == normalize("black hole") == "black hole"
    assert normalize("Élan vital") == "elan vital" and normalize("glass") == "glass"


def test_bad_taxonomy_and_changed_config_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="taxonomy.areas: \\['nope'\\] are not areas"):
        run_topics(TopicsConfig.from_dict({}, [f"run.out_dir={tmp_path}", "taxonomy.areas=['nope']"]))
    with pytest.raises(ValueError, match="dedup.similarity must be in"):
        TopicsConfig.from_dict({}, ["dedup.similarity=1.5"])
    with FaultyOpenAIServer(faults=False, answer=scripted) as srv:
        run_topics(config(tmp_path, srv.base_url, "out", "run.num_topics=6"))
        with pytest.raises(ValueError, match=r"different config \(changed: \['dedup.similarity'\]\)"):
            run_topics(config(tmp_path, srv.base_url, "out", "run.num_topics=6", "dedup.similarity=0.8"))
    assert main(["topics", "--out", str(tmp_path / "x"), "grow.patience=0"]) == 2


@pytest.mark.slow
def test_embedded_teacher_grows_the_built_in_areas(tmp_path: Path) -> None:
    """The built-in 300 topics to 420 with SmolLM2-135M-Instruct (the 2,000-topic run is in the README)."""
    stats = run_topics(TopicsConfig.from_dict({}, [f"run.out_dir={tmp_path}", "run.num_topics=420",
                                                   "run.progress=false"]))
    assert stats["complete"] and stats["topics"] == 420 and stats["seed_topics"] <= 300
    assert set(stats["per_area"].values()) == {70} and stats["nn_similarity"]["max"] < 0.85
    assert len(load_topics(tmp_path / "topics.txt")) == 420
