"""Built-in Phi chat templates: exact renderings, and parity with transformers."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
import tokenizers
from transformers import AutoTokenizer

from phiforge.tokenizers.chat_templates import BUILTIN_TEMPLATES, render_chat_template, template_for
from phiforge.tokenizers.tokenizer import Tokenizer, train_bpe

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]

# (bos, eos) as in each model's tokenizer_config.json.
SPECIAL_TOKENS = {
    "phi-3": ("<s>", "<|endoftext|>"),
    "phi-3.5": ("<s>", "<|endoftext|>"),
    "phi-3-medium": ("<s>", "<|endoftext|>"),
    "phi-3-small": ("<|endoftext|>", "<|endoftext|>"),
    "phi-4": ("<|endoftext|>", "<|im_end|>"),
    "phi-4-mini": ("<|endoftext|>", "<|endoftext|>"),
}

_PHI3_TURNS = (
    "<|system|>\nYou are a helpful assistant.<|end|>\n"
    "<|user|>\nWhat is 2+2?<|end|>\n"
    "<|assistant|>\n4.<|end|>\n"
    "<|user|>\nAnd 3+3?<|end|>\n"
)
_PHI3_MEDIUM = "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4.<|end|>\n<|user|>\nAnd 3+3?<|end|>\n<|assistant|>\n"
_PHI4_TURNS = (
    "<|im_start|>system<|im_sep|>You are a helpful assistant.<|im_end|>"
    "<|im_start|>user<|im_sep|>What is 2+2?<|im_end|>"
    "<|im_start|>assistant<|im_sep|>4.<|im_end|>"
    "<|im_start|>user<|im_sep|>And 3+3?<|im_end|>"
)
_PHI4_MINI_TURNS = (
    "<|system|>You are a helpful assistant.<|end|>"
    "<|user|>What is 2+2?<|end|>"
    "<|assistant|>4.<|end|>"
    "<|user|>And 3+3?<|end|>"
)

# name -> (rendering with add_generation_prompt=True, with False)
EXPECTED = {
    "phi-3": (_PHI3_TURNS + "<|assistant|>\n", _PHI3_TURNS + "<|endoftext|>"),
    "phi-3.5": (_PHI3_TURNS + "<|assistant|>\n", _PHI3_TURNS + "<|endoftext|>"),
    "phi-3-medium": (_PHI3_MEDIUM, _PHI3_MEDIUM),
    "phi-3-small": (
        "<|endoftext|>" + _PHI3_TURNS + "<|assistant|>\n",
        "<|endoftext|>" + _PHI3_TURNS + "<|endoftext|>",
    ),
    "phi-4": (_PHI4_TURNS + "<|im_start|>assistant<|im_sep|>", _PHI4_TURNS),
    "phi-4-mini": (_PHI4_MINI_TURNS + "<|assistant|>", _PHI4_MINI_TURNS + "<|endoftext|>"),
}

ALL_CHAT_TOKENS = [
    "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|tool|>", "<|/tool|>",
]  # fmt: skip

TRAIN_TEXT = [
    "What is 2+2? And 3+3? You are a helpful assistant. The answer is 4.",
    "Tools: a calculator that adds numbers. System prompts set the tone.",
] * 20


@pytest.fixture(scope="module")
def base_backend_json() -> str:
    tok = train_bpe(TRAIN_TEXT, 400, special_tokens=ALL_CHAT_TOKENS)
    return tok.backend.to_str()


def _pair(name: str, backend_json: str, folder: Path) -> tuple[Tokenizer, object]:
    """Our tokenizer with the model's template and special tokens, and transformers' load of its save."""
    bos, eos = SPECIAL_TOKENS[name]
    backend = tokenizers.Tokenizer.from_str(backend_json)
    ours = Tokenizer(backend, bos_token=bos, eos_token=eos, chat_template=BUILTIN_TEMPLATES[name])
    ours.save(folder)
    return ours, AutoTokenizer.from_pretrained(folder)


def test_builtin_keys() -> None:
    assert set(BUILTIN_TEMPLATES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("generation", [True, False])
def test_template_renders_exact_and_matches_transformers(
    name: str, generation: bool, base_backend_json: str, tmp_path: Path
) -> None:
    ours, hf = _pair(name, base_backend_json, tmp_path)
    expected = EXPECTED[name][0 if generation else 1]
    text = ours.apply_chat_template(CONVERSATION, add_generation_prompt=generation)
    assert text == expected
    ref = hf.apply_chat_template(CONVERSATION, add_generation_prompt=generation, tokenize=False)
    assert text == ref
    ids = ours.apply_chat_template(CONVERSATION, add_generation_prompt=generation, tokenize=True)
    ref_ids = hf.apply_chat_template(CONVERSATION, add_generation_prompt=generation, tokenize=True, return_dict=False)
    assert ids == ref_ids


def test_phi35_skips_empty_system_but_phi3_keeps_it() -> None:
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]
    kw = {"add_generation_prompt": True, "eos_token": "<|endoftext|>"}
    phi3 = render_chat_template(BUILTIN_TEMPLATES["phi-3"], msgs, **kw)
    phi35 = render_chat_template(BUILTIN_TEMPLATES["phi-3.5"], msgs, **kw)
    assert phi3 == "<|system|>\n<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert phi35 == "<|user|>\nHi<|end|>\n<|assistant|>\n"


def test_phi4_mini_tools_match_transformers(base_backend_json: str, tmp_path: Path) -> None:
    ours, hf = _pair("phi-4-mini", base_backend_json, tmp_path)
    tools = '[{"name": "add", "parameters": {"a": "int"}}]'
    msgs = [{"role": "system", "content": "Use tools.", "tools": tools}, *CONVERSATION[1:2]]
    text = ours.apply_chat_template(msgs, add_generation_prompt=True)
    assert text == (f"<|system|>Use tools.<|tool|>{tools}<|/tool|><|end|><|user|>What is 2+2?<|end|><|assistant|>")
    assert text == hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


# Exercises the parts of transformers' Jinja environment the Phi templates don't use:
# trim_blocks/lstrip_blocks, tojson without HTML escaping, {% generation %}, {% break %}.
ENV_TEMPLATE = (
    "{% for m in messages %}\n"
    "  {% if loop.index > 2 %}{% break %}{% endif %}\n"
    "{{ m | tojson }}|{{ m.content is defined }}\n"
    "{% generation %}{{ m.role }}{% endgeneration %}\n"
    "{% endfor %}{{ bos_token }}{{ extra_var }}"
)


def test_environment_matches_transformers(base_backend_json: str, tmp_path: Path) -> None:
    ours, hf = _pair("phi-3", base_backend_json, tmp_path)
    ours.chat_template = hf.chat_template = ENV_TEMPLATE
    msgs = [{"role": "user", "content": "<a & b>"}, {"role": "tool", "content": None}, *CONVERSATION]
    text = ours.apply_chat_template(msgs, extra_var="X")
    assert text == '{"role": "user", "content": "<a & b>"}|True\nuser{"role": "tool"}|False\ntool<s>X'
    assert text == hf.apply_chat_template(msgs, tokenize=False, extra_var="X")


def test_raise_exception_is_a_template_error() -> None:
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    with pytest.raises(jinja2.exceptions.TemplateError, match="user first"):
        render_chat_template(template, CONVERSATION)


def test_empty_conversation_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        render_chat_template(BUILTIN_TEMPLATES["phi-4"], [])


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("microsoft/Phi-3-mini-4k-instruct", "phi-3"),
        ("Phi-3-mini-128k-instruct", "phi-3"),
        ("phi3", "phi-3"),
        ("microsoft/Phi-3.5-mini-instruct", "phi-3.5"),
        ("Phi-3-medium-4k-instruct", "phi-3-medium"),
        ("microsoft/Phi-3-small-8k-instruct", "phi-3-small"),
        ("microsoft/phi-4", "phi-4"),
        ("phi-4", "phi-4"),
        ("microsoft/Phi-4-mini-instruct", "phi-4-mini"),
        ("phi4-mini", "phi-4-mini"),
    ],
)
def test_template_for_names(name: str, family: str) -> None:
    assert template_for(name) == BUILTIN_TEMPLATES[family]


@pytest.mark.parametrize("name", ["phi-1", "microsoft/phi-1_5", "phi-2", "llama-3", "phi-35"])
def test_template_for_base_or_unknown_is_none(name: str) -> None:
    assert template_for(name) is None
