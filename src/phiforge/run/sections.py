"""The typed sections of a run recipe: one dataclass per stage, read by the one config loader (every unknown key
listed with the valid ones, every type checked) before any stage starts. ``recipes/run/tiny-textbooks.toml``
documents each key in context. [synth] and [curate] are typed by their own configs (SynthConfig, CurateConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field

from phiforge.train.launch import Launch

DEFAULT_SAMPLE_PROMPTS = {
    "completion": "The water cycle begins when",
    "qa": "What do plants need to make their own food?",
    "cot": "Alice has 3 apples and buys 4 more. How many apples does she have?",
    "chat": "Why do we see lightning before we hear thunder?",
    "code": 'def add(a, b):\n    """Return the sum of a and b."""\n',
}


@dataclass
class TokenizerSection:
    from_: str = field(default="", metadata={"key": "from"})  # a ready tokenizer (folder, GGUF, builtin) or ""
    vocab_size: int = 4096  # of the byte-level BPE trained on the corpus when ``from`` is ""
    chat_format: str = ""  # "phi3" / "phi4": chat special tokens and template for the trained tokenizer
    min_frequency: int = 2


@dataclass
class TokenizeSection:
    heldout_fraction: float = 0.05  # of the documents, picked by a hash of their ids (stable across reruns)
    workers: int = 1
    block_docs: int = 4096


@dataclass
class PretrainSection(Launch):
    recipe: str = "tiny"  # a training recipe (recipes/train) or TOML file
    source: str = "text"  # the recipe's data source the run's tokens replace
    overrides: list[str] = field(default_factory=list)  # section.key=value for the training recipe


@dataclass
class SFTSection(Launch):
    recipe: str = "sft"
    data: str = ""  # chat records (JSONL)
    overrides: list[str] = field(default_factory=list)


@dataclass
class PTSSection:
    recipe: str = "pts"
    data: str = ""  # queries (JSONL); "" = the questions of [synth.seeds] qa_seeds
    overrides: list[str] = field(default_factory=list)


@dataclass
class DPOSection(Launch):
    recipe: str = "dpo"
    pairs: str = ""  # preference pairs (JSONL); "" = the pts stage's
    overrides: list[str] = field(default_factory=list)


@dataclass
class EvalSection:
    tasks: list[str] = field(default_factory=lambda: ["piqa"])
    limit: int = 200  # documents per task; 0 = all
    num_fewshot: int = -1  # -1 = each task's lm-eval default
    window: int = 128  # tokens per window of the held-out perplexity
    sample_tokens: int = 48  # new tokens of each usage-mode sample
    prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SAMPLE_PROMPTS))


@dataclass
class ReportSection:
    pass


SECTIONS: dict[str, type] = {"tokenizer": TokenizerSection, "tokenize": TokenizeSection, "pretrain": PretrainSection,
                             "pretrain2": PretrainSection, "sft": SFTSection, "pts": PTSSection, "dpo": DPOSection,
                             "eval": EvalSection, "report": ReportSection}
