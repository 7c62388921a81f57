from __future__ import annotations

import pytest

from phiforge.data.synth import SynthConfig
from phiforge.data.synth.pipeline import Planner
from phiforge.data.synth.prompts import TEMPLATES, PromptError, check_template


def test_builtin_templates_use_only_known_fields() -> None:
    for fmt, template in TEMPLATES.items():
        check_template(f"prompts.{fmt}", template)


def test_unknown_field_is_an_error_naming_template_and_fields() -> None:
    with pytest.raises(PromptError, match=r"prompts.textbook: unknown field \{topc\}; templates may use .*\{topic\}"):
        SynthConfig.from_dict({"prompts": {"textbook": "Write about {topc} for {audience}."}})
    with pytest.raises(PromptError, match="positional"):
        check_template("prompts.story", "A story about {}")
    with pytest.raises(PromptError, match="not a valid template"):
        check_template("prompts.story", "A story about {topic")
    with pytest.raises(ValueError, match=r"prompts.poem: no such format"):
        SynthConfig.from_dict({"prompts": {"poem": "{topic}"}})


def test_user_template_and_web_passage_reach_the_prompt(tmp_path) -> None:  # noqa: ANN001
    web = tmp_path / "web.txt"
    web.write_text("Volcanoes form where magma rises through the crust.\n")
    config = SynthConfig.from_dict({"seeds": {"formats": ["textbook"], "web_samples": str(web), "web_fraction": 1.0},
                                    "prompts": {"textbook": "{context}Teach {audience} about {topic} ({style})."}})
    draft = Planner(config).draft(3)
    assert draft.prompt.startswith('Here is an extract from a web page:\n"Volcanoes form')
    assert draft.prompt.endswith(f"Teach {draft.seed.audience} about {draft.seed.topic} ({draft.seed.style}).")
