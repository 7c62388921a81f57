"""A real corpus for training tests: GSM8K questions + answers, a BPE tokenizer trained on them, token shards.

Built once per test session under pytest's base temp folder; every training test module reuses it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import phiforge
from phiforge.data.packing import TokenizeConfig, tokenize_corpus
from phiforge.tokenizers.tokenizer import train_bpe

GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks" / "gsm8k"
VOCAB = 1024


@dataclass(frozen=True)
class Corpus:
    tokenizer: Path
    train_tokens: Path  # token folder of train.jsonl (two shards)
    val_tokens: Path  # token folder of test.jsonl: a truly held-out source


def gsm8k_texts(split: str) -> list[str]:
    rows = [json.loads(line) for line in (GSM8K / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    return [f"{r['question']}\n{r['answer']}" for r in rows]


def build_corpus(root: Path) -> Corpus:
    corpus = Corpus(root / "tokenizer", root / "tokens-train", root / "tokens-val")
    if (corpus.val_tokens / "index.json").exists():
        return corpus
    train = gsm8k_texts("train")
    docs = root / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    half = len(train) // 2
    for name, part in (("train-0.jsonl", train[:half]), ("train-1.jsonl", train[half:])):
        (docs / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    (docs / "test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in gsm8k_texts("test")))
    train_bpe(train, VOCAB).save(corpus.tokenizer)
    for inputs, out in (([docs / "train-0.jsonl", docs / "train-1.jsonl"], corpus.train_tokens),
                        ([docs / "test.jsonl"], corpus.val_tokens)):
        tokenize_corpus(TokenizeConfig(inputs=[str(p) for p in inputs], output=str(out),
                                       tokenizer=str(corpus.tokenizer), progress=False))
    return corpus


def subprocess_env() -> dict[str, str]:
    """Environment for child training processes: phiforge importable from the source tree."""
    src = str(Path(phiforge.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


PYTHON = sys.executable
