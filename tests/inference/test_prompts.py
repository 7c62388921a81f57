"""phi-1.5 usage modes as prompt formats."""

from __future__ import annotations

import ast

import pytest

from phiforge.inference.prompts import PROMPT_MODES, format_prompt, looks_like_python, stop_strings

QUESTION = "Alice has 3 apples and buys 2 more. How many apples does she have?"


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("completion", QUESTION),
        ("cot", QUESTION + "\nLet's think step by step.\n"),
        ("qa", QUESTION + "\nAnswer:"),
        ("chat", "Alice: " + QUESTION + "\nBob:"),
        ("code", 'def solution():\n    """' + QUESTION + '"""\n'),
    ],
)
def test_each_mode_exact_string(mode: str, expected: str) -> None:
    assert format_prompt(mode, QUESTION) == expected


def test_modes_listed_in_order() -> None:
    assert PROMPT_MODES == ("completion", "cot", "qa", "chat", "code")


def test_code_keeps_python_prompts() -> None:
    signature = 'def print_prime(n):\n   """\n   Print all primes between 1 and n\n   """\n'
    assert format_prompt("code", signature) == signature
    for source in ("import math\n", "  class Stack:\n", "@cache\ndef f(n):", '"""Sort a list."""\n', "# sum\n"):
        assert looks_like_python(source)
        assert format_prompt("code", source) == source
    assert not looks_like_python("Write a function that sorts a list.")


def test_code_wrapping_is_valid_python() -> None:
    request = 'Return the "largest" item.\nUse """ carefully.'
    prompt = format_prompt("code", request)
    assert prompt == 'def solution():\n    """Return the "largest" item.\n    Use \'\'\' carefully."""\n'
    tree = ast.parse(prompt + "    pass\n")
    function = tree.body[0]
    assert isinstance(function, ast.FunctionDef)
    assert ast.get_docstring(function) == "Return the \"largest\" item.\nUse ''' carefully."


def test_stop_strings_per_mode() -> None:
    assert stop_strings("completion") == ()
    assert stop_strings("cot") == ()
    assert stop_strings("qa") == ("\n\n",)
    assert stop_strings("chat") == ("\nAlice:",)
    assert stop_strings("code") == ("\ndef ", "\nclass ", "\nif __name__", "\nprint(")


def test_chat_stop_ends_bobs_turn() -> None:
    generated = " Five apples.\nAlice: Thanks!\nBob: You're welcome."
    cut = min(generated.find(s) for s in stop_strings("chat") if s in generated)
    assert generated[:cut] == " Five apples."


@pytest.mark.parametrize("call", [format_prompt, lambda mode, _text: stop_strings(mode)])
def test_unknown_mode(call: object) -> None:
    with pytest.raises(ValueError, match=r"unknown prompt mode 'instruct'") as info:
        call("instruct", QUESTION)  # type: ignore[operator]
    assert "completion, cot, qa, chat, code" in str(info.value)
