"""Chat templates of the Phi models and a renderer that matches transformers.

The templates are the Jinja strings from each model's ``tokenizer_config.json``
(see shared/research/arch.md §5). ``render_chat_template`` renders them in
the same sandboxed Jinja environment, with the same variables, as
``transformers`` ``apply_chat_template(..., tokenize=False)``, so a prompt built
here is byte-identical to the one the reference stack builds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from phiforge.errors import DataError

# Phi-3-mini-4k/128k, 2024-05 revision: system role supported, eos after the last turn.
_PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Phi-3.5-mini: as Phi-3 but an empty system message is skipped.
_PHI35 = _PHI3.replace(
    "{% if message['role'] == 'system' %}",
    "{% if message['role'] == 'system' and message['content'] %}",
)

# Phi-3-medium: no system role; every user turn opens the assistant turn itself.
_PHI3_MEDIUM = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\\n' + message['content'] + '<|end|>' + '\\n' + '<|assistant|>' + '\\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\\n'}}"
    "{% endif %}{% endfor %}"
)

# Phi-3-small: any role becomes <|role|>; bos (= <|endoftext|>) first.
_PHI3_SMALL = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# phi-4 (current revision): ChatML-like, no newline after <|im_sep|>.
_PHI4 = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# Phi-4-mini: no newlines; a system message may carry a JSON tool list.
_PHI4_MINI = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools']"
    " + '<|/tool|>' + '<|end|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "phi-3": _PHI3,
    "phi-3.5": _PHI35,
    "phi-3-medium": _PHI3_MEDIUM,
    "phi-3-small": _PHI3_SMALL,
    "phi-4": _PHI4,
    "phi-4-mini": _PHI4_MINI,
}

# Most specific prefix first: "phi-4-mini…" must not fall through to "phi-4".
_FAMILY_PREFIXES = ("phi-4-mini", "phi-4", "phi-3.5", "phi-3-medium", "phi-3-small", "phi-3")


def template_for(model_name_or_family: str) -> str | None:
    """The built-in chat template for a model name, hub id or family; None for base models.

    Accepts e.g. "phi-3", "microsoft/Phi-3-mini-4k-instruct", "Phi-3.5-mini-instruct",
    "phi4-mini". phi-1, phi-1.5 and phi-2 have no chat template (None).
    """
    name = model_name_or_family.strip().lower().rsplit("/", 1)[-1]
    name = re.sub(r"^phi[-_]?(?=\d)", "phi-", name)
    for prefix in _FAMILY_PREFIXES:
        if name == prefix or name.startswith((prefix + "-", prefix + "_")):
            return BUILTIN_TEMPLATES[prefix]
    return None


# --- rendering -----------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}…{% endgeneration %}`` (transformers' assistant-mask tag).

    Templates that mark assistant spans with it must still parse; the tag itself
    renders its body unchanged.
    """

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes <, >, &; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _clean_message(message: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
    # transformers drops None-valued keys (e.g. OpenAI's content=None) before rendering.
    out = {k: v for k, v in message.items() if v is not None}
    reasoning = next((out[k] for k in _REASONING_KEYS if k in out), None)
    if reasoning is not None:
        # Same aliasing as transformers: templates read either name.
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    **variables: Any,
) -> str:
    """Render ``template`` exactly as transformers' ``apply_chat_template(tokenize=False)``.

    ``variables`` are the template's other inputs: the special tokens
    (``bos_token``, ``eos_token``, …) and any extras such as ``tools``.
    """
    if len(messages) == 0:
        raise DataError("cannot apply a chat template to an empty conversation")
    context: dict[str, Any] = {"tools": None, "documents": None, **variables}
    context["messages"] = [_clean_message(m) for m in messages]
    context["add_generation_prompt"] = add_generation_prompt
    return _compile(template).render(**context)
