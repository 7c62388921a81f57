"""Small real inputs for the post-training tests: a chat tokenizer, a tiny model folder, chat records.

The colour task is a post-training problem with a known answer: the user asks for a colour for some
object and the assistant answers "red" or "blue" at random (half and half). After SFT the model says
either; with an oracle that wants "red", p(success) is about 0.5 before the colour word and 0 or 1
after it, so the colour word is a pivotal token that PTS must find.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from phiforge.config.model import preset
from phiforge.io.checkpoint import save_hf_folder
from phiforge.model.transformer import build_model
from phiforge.tokenizers.tokenizer import PHI3_CHAT_TOKENS, PHI4_CHAT_TOKENS, Tokenizer, train_bpe

GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks" / "gsm8k"
OBJECTS = ["car", "house", "ball", "hat", "door", "kite", "boat", "cup", "lamp", "chair", "bike", "shoe"]


def gsm8k_rows(split: str = "train", limit: int = 200) -> list[dict]:
    rows = [json.loads(line) for line in (GSM8K / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    return rows[:limit]


def colour_conversation(obj: str, colour: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Pick a colour for the {obj}."},
            {"role": "assistant", "content": f"{colour}"}]


def chat_tokenizer(vocab: int = 600) -> Tokenizer:
    """BPE with every Phi chat token, the phi-3 template, trained on GSM8K and the colour task."""
    texts = [r["question"] + "\n" + r["answer"] for r in gsm8k_rows()]
    texts += [f"Pick a colour for the {o}. red blue" for o in OBJECTS] * 20
    return train_bpe(texts, vocab, chat_format="phi3", special_tokens=list(PHI4_CHAT_TOKENS))


def tiny_model_folder(folder: Path, tokenizer: Tokenizer, name: str = "tiny-phi3", seed: int = 0) -> Path:
    config = preset(name).replace(vocab_size=tokenizer.vocab_size + (-tokenizer.vocab_size) % 64,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    save_hf_folder(build_model(config, seed=seed), folder)
    tokenizer.save(folder)
    return folder


def colour_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"colour-{i}", "messages": colour_conversation(rng.choice(OBJECTS), rng.choice(["red", "blue"]))}
            for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def wants_red(record: dict, texts: list[str], ids: list[list[int]]) -> list[bool]:
    """Oracle for the colour task (importable as chat_data:wants_red)."""
    return [t.strip().lower().startswith("red") for t in texts]


ALL_CHAT_TOKENS = PHI3_CHAT_TOKENS + PHI4_CHAT_TOKENS
