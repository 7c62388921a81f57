"""Educational-value labels from a teacher LLM, with the FineWeb-Edu additive 0-5 rubric (data.md §2.2).

The teacher writes a short justification and a line ``Educational score: N``. Parsing accepts the usual
variations ("Score: 3", "3/5", "**Educational score:** 4 points"); when none is found, the score is read
from the teacher's own next-token distribution after appending ``Educational score:`` to its answer
(argmax over the digits 0-5, with the expected value kept), so every document gets a label and the record
says which way it was obtained. Each record stores the teacher, the prompt version and the prompt's hash.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from phiforge.data.jsonl import iter_jsonl, write_jsonl
from phiforge.errors import ConfigError
from phiforge.io.atomic import atomic_write_json

PROMPT_VERSION = "edu-additive-v1"
RUBRIC = """Below is an extract from a web page. Judge how useful it would be for teaching, from primary school \
to grade school, with an additive 5-point system. Add up points as follows:

- Add 1 point if the extract gives some basic information related to an educational topic, even if it also \
contains ads or unrelated material.
- Add another point if it addresses elements relevant to education but does not follow educational standards \
closely: it may mix educational and other content, or give only a superficial overview.
- Award a third point if it suits educational use and introduces key concepts of a school curriculum; it is \
coherent, though it may not be complete.
- Grant a fourth point if it is highly relevant and useful for teaching at grade school level or below, like \
a chapter of a textbook or a tutorial, with clear explanations and little unrelated content.
- Give a fifth point if it is outstanding for teaching at primary or grade school level: detailed reasoning, \
easy to follow, with deep and thorough insight into the subject.

The extract:
{text}

After the extract, justify your total score in at most 100 words, then finish with the line \
"Educational score: <total points>"."""
PROMPT_SHA = hashlib.sha256(RUBRIC.encode()).hexdigest()[:16]

SCORE_PATTERNS = [
    re.compile(r"educational\s+score\s*[:=]?\s*\**\s*([0-5])(?!\d|\.\d)", re.IGNORECASE),
    re.compile(r"\bscore\s*(?:is|of|[:=])?\s*\**\s*([0-5])(?!\d|\.\d)", re.IGNORECASE),
    re.compile(r"\b([0-5])\s*(?:/|out of)\s*5\b", re.IGNORECASE),
    re.compile(r"\b([0-5])\s+points?\b(?!\s+if)", re.IGNORECASE),
]


def parse_score(text: str) -> int | None:
    """The total score in a teacher answer (the last match of the most specific pattern), or None."""
    for pattern in SCORE_PATTERNS:
        found = pattern.findall(text)
        if found:
            return int(found[-1])
    return None


@dataclass
class AnnotateConfig:
    teacher: str = "smollm2-135m-instruct"  # alias, .gguf file or model folder
    max_chars: int = 1200  # of the document shown to the teacher
    max_new_tokens: int = 96
    batch_size: int = 16
    samples: int = 200  # documents drawn from the corpus to label (pipeline)
    seed: int = 0


class Annotator:
    def __init__(self, model: Any, tokenizer: Any, config: AnnotateConfig | None = None) -> None:
        from phiforge.inference.engine import Engine  # torch: imported only when labelling

        self.model, self.tokenizer = model, tokenizer
        self.config = config or AnnotateConfig()
        self.engine = Engine(model, tokenizer, max_batch_size=self.config.batch_size)
        digits = [tokenizer.encode(d, add_special_tokens=False) for d in "012345"]
        spaced = [tokenizer.encode(" " + d, add_special_tokens=False) for d in "012345"]
        # score digits as single tokens (with or without a leading space); both spellings add up
        self.digit_ids = [sorted({t[-1] for t in pair if len(t) == 1}) for pair in zip(digits, spaced)]

    @classmethod
    def from_config(cls, config: AnnotateConfig) -> Annotator:
        from phiforge.io.load import load_pretrained

        model, tokenizer = load_pretrained(config.teacher)
        if tokenizer is None:
            raise ConfigError(f"{config.teacher}: the teacher needs a tokenizer")
        return cls(model, tokenizer, config)

    def prompt_ids(self, text: str) -> list[int]:
        extract = text[: self.config.max_chars]
        messages = [{"role": "user", "content": RUBRIC.format(text=extract)}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return self.tokenizer.encode(messages[0]["content"] + "\n")

    def annotate(self, texts: list[str]) -> list[dict[str, Any]]:
        """One label record per text: score, how it was read, the teacher's answer and provenance."""
        from phiforge.inference.sampling import SamplingParams

        prompts = [self.prompt_ids(t) for t in texts]
        params = SamplingParams(max_new_tokens=self.config.max_new_tokens, temperature=0.0,
                                stop_token_ids=tuple(self.tokenizer.stop_token_ids))
        outputs = self.engine.generate(prompts, params)
        records = []
        for prompt, out in zip(prompts, outputs):
            score, method, expected = parse_score(out.text), "parsed", None
            if score is None:
                score, expected = self._score_from_logits(prompt + out.token_ids)
                method = "logits"
            records.append({"score": score, "method": method, "expected": expected, "raw": out.text,
                            "teacher": self.config.teacher, "prompt_version": PROMPT_VERSION,
                            "prompt_sha": PROMPT_SHA})
        return records

    def _score_from_logits(self, ids: list[int]) -> tuple[int, float]:
        """Argmax and expected value of the digit after 'Educational score:' appended to the answer."""
        import torch

        suffix = self.tokenizer.encode("\nEducational score:", add_special_tokens=False)
        tokens = torch.tensor([ids + suffix], device=self.model.embed.weight.device)
        with torch.no_grad():
            logits = self.model(tokens, last_only=True)[0, -1].float()
        mass = torch.stack([torch.logsumexp(logits[d], 0) for d in self.digit_ids])
        probs = torch.softmax(mass, 0)
        return int(probs.argmax()), round(float((probs * torch.arange(6.0, device=probs.device)).sum()), 4)


def annotate_documents(docs: list[dict[str, Any]], folder: Path, config: AnnotateConfig,
                       annotator: Annotator | None = None, text_field: str = "text") -> list[dict[str, Any]]:
    """Label ``docs`` into ``folder/part-NNNNN.jsonl`` (one atomic file per batch) and return all records.

    Parts already written are reused, so a killed run resumes at the first missing batch. The batches are
    fixed by the document order, so a resumed run labels exactly the same documents.
    """
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "prompt.json", {"version": PROMPT_VERSION, "sha": PROMPT_SHA, "template": RUBRIC,
                                               "teacher": config.teacher})
    records: list[dict[str, Any]] = []
    batches = range(0, len(docs), config.batch_size)
    for number, start in enumerate(tqdm(batches, desc="annotate", unit="batch")):
        part = folder / f"part-{number:05d}.jsonl"
        if not part.is_file():
            batch = docs[start:start + config.batch_size]
            annotator = annotator or Annotator.from_config(config)
            labels = annotator.annotate([d[text_field] for d in batch])
            write_jsonl(part, [{"id": d.get("id"), "text": d[text_field], **lab} for d, lab in zip(batch, labels)])
        records += [line.record for line in iter_jsonl(part) if line.record is not None]
    return records
