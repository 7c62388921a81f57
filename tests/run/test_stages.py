"""The run's tokenize stage: documents streamed to N tokenizer workers give the tokens of one sequential pass."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from phiforge.data.packing import TokenizeConfig, load_shards, tokenize_corpus
from phiforge.run.pipeline import RunContext
from phiforge.run.sections import TokenizeSection
from phiforge.run.stages import held_out, stage_tokenize
from phiforge.tokenizers.tokenizer import train_tokenizer


def tokens(folder: Path) -> np.ndarray:
    return np.concatenate([np.asarray(s.tokens()) for s in load_shards(folder)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the water cycle moves heat light energy cells plants numbers add carry sum story friend".split()
    docs = root / "docs"
    docs.mkdir()
    for part in range(3):
        with open(docs / f"part{part}.jsonl", "w") as fh:
            for k in range(41 + part):
                text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) + "."
                fh.write(json.dumps({"id": f"p{part}-{k}", "text": text}) + "\n")
    train_tokenizer(sorted(docs.glob("*.jsonl")), root / "tokenizer", 300, None)
    return docs, root / "tokenizer"


def test_parallel_tokenize_stage_gives_the_tokens_of_one_sequential_pass(tmp_path: Path,
                                                                          corpus: tuple[Path, Path]) -> None:
    docs, tokenizer = corpus
    # the reference: the former stage's way, a split JSONL per side tokenized as one file
    split = {"train": [], "heldout": []}
    for path in sorted(docs.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            split["heldout" if held_out(record["id"], 0.2) else "train"].append(json.dumps({"text": record["text"]}))
    reference = {}
    for side, lines in split.items():
        (tmp_path / f"{side}.jsonl").write_text("\n".join(lines) + "\n")
        tokenize_corpus(TokenizeConfig([str(tmp_path / f"{side}.jsonl")], str(tmp_path / "ref" / side),
                                       str(tokenizer), progress=False))
        reference[side] = tokens(tmp_path / "ref" / side)
    for workers, block in ((1, 4096), (2, 9)):
        run = tmp_path / f"run-{workers}"
        (run / "tokenizer").mkdir(parents=True)
        for f in tokenizer.iterdir():
            (run / "tokenizer" / f.name).write_bytes(f.read_bytes())
        ctx = RunContext(run, {"run": {"documents": str(docs)}}, progress=False)
        stats = stage_tokenize(TokenizeSection(heldout_fraction=0.2, workers=workers, block_docs=block), ctx)
        assert stats["documents"] == {side: len(lines) for side, lines in split.items()}
        for side in split:
            assert np.array_equal(tokens(run / "tokenize" / side), reference[side]), (workers, side)
        assert stats["shards"]["train"] == -(-len(split["train"]) // block)
        assert not (run / "tokenize" / "split").exists()  # no concatenated JSONL
    # a rerun skips finished blocks and gives the same folder
    again = stage_tokenize(TokenizeSection(heldout_fraction=0.2, workers=2, block_docs=9), ctx)
    assert again == stats and np.array_equal(tokens(run / "tokenize" / "train"), reference["train"])
