"""Prompt formats for base (non-chat) models: the phi-1.5 usage modes.

The phi-1.5 report shows a base model used five ways — plain completion,
chain of thought, "Answer:" question answering, an "Alice:/Bob:" chat, and
Python coding from a signature and docstring. Each mode is a fixed string
wrapper plus the stop strings that end the model's turn in that format.
"""

from __future__ import annotations

from phiforge.errors import ConfigError

PROMPT_MODES: tuple[str, ...] = ("completion", "cot", "qa", "chat", "code")

# Where a base model's answer ends in each format; generation stops at the first hit.
STOP_STRINGS: dict[str, tuple[str, ...]] = {
    "completion": (),
    "cot": (),
    "qa": ("\n\n",),
    "chat": ("\nAlice:",),
    # A new top-level statement means the function body is finished.
    "code": ("\ndef ", "\nclass ", "\nif __name__", "\nprint("),
}

# Openings that mean the user already wrote Python (a signature, import, decorator, docstring).
_CODE_STARTS = ("def ", "async def ", "class ", "import ", "from ", "@", '"""', "'''", "#")


def _check_mode(mode: str) -> None:
    if mode not in PROMPT_MODES:
        raise ConfigError(f"unknown prompt mode {mode!r}; valid modes: {', '.join(PROMPT_MODES)}")


def looks_like_python(text: str) -> bool:
    """True when ``text`` already starts like Python source (so it is used as the prompt)."""
    return text.lstrip().startswith(_CODE_STARTS)


def _code_prompt(text: str) -> str:
    if looks_like_python(text):
        return text
    # Wrap a natural-language request as the docstring of a stub, the shape phi-1/1.5
    # were trained to complete. Triple double quotes would end the docstring early,
    # and continuation lines are indented to sit inside the function.
    body = text.strip().replace('"""', "'''").replace("\n", "\n    ")
    return f'def solution():\n    """{body}"""\n'


def format_prompt(mode: str, text: str) -> str:
    """Wrap ``text`` in the prompt format of ``mode`` (one of PROMPT_MODES).

    completion: text unchanged; cot: text + "\\nLet's think step by step.\\n";
    qa: "{text}\\nAnswer:"; chat: "Alice: {text}\\nBob:"; code: text unchanged if it
    already looks like Python (see looks_like_python), otherwise the request becomes
    the docstring of ``def solution():`` (triple double quotes, body indented 4).
    """
    _check_mode(mode)
    if mode == "cot":
        return text + "\nLet's think step by step.\n"
    if mode == "qa":
        return f"{text}\nAnswer:"
    if mode == "chat":
        return f"Alice: {text}\nBob:"
    if mode == "code":
        return _code_prompt(text)
    return text


def stop_strings(mode: str) -> tuple[str, ...]:
    """The strings at which generation in ``mode`` should stop (may be empty)."""
    _check_mode(mode)
    return STOP_STRINGS[mode]
