"""Prompt templates: one per format, plus the prompts the phi-4 techniques use.

Templates are ``str.format`` strings over the fields in ``FIELDS``. A user's template (from the config's
``[prompts]`` table) is checked when the config is loaded, so a typo like ``{topc}`` is an error naming
the template and the valid fields, before any teacher is called.
"""

from __future__ import annotations

import string
from typing import Any

from phiforge.data.synth.seeds import ALL_FORMATS, AUDIENCES, STYLES, Seed
from phiforge.errors import ConfigError

FIELDS = {
    "topic": "the seed topic",
    "area": "the topic's area (science, mathematics, ...)",
    "audience": "the audience's name",
    "audience_description": "what the audience needs",
    "format_description": "what to write",
    "style": "the style's name",
    "style_description": "the tone to write in",
    "context": "the web passage block (empty when the document has no passage)",
    "passage": "the web passage itself (empty when none)",
    "subject": "the topic's subject in its taxonomy (empty when none)",
    "code": "the code snippet of a code seed (empty otherwise)",
    "question": "the question of a Q&A seed (empty otherwise)",
}

CONTEXT = 'Here is an extract from a web page:\n"{passage}"\n\nUse it as inspiration. '
AVOID = "Do not start with a title or an introduction such as \"Sure\" or \"Here is\"; begin with the content."

TEMPLATES = {
    "textbook": "{context}Write a textbook section about \"{topic}\" for {audience_description}. Explain the key "
                "ideas step by step with one worked example. Use {style_description}. " + AVOID,
    "exercises": "{context}Write two exercises about \"{topic}\" for {audience}, each followed by a worked "
                 "solution that explains every step and ends with the final answer. " + AVOID,
    "story": "{context}Write a short story for young children that teaches something about \"{topic}\". Use "
             "very simple words, a friendly character, some dialogue, and a small surprise at the end. Do not "
             "start with \"Once upon a time\".",
    "dialogue": "{context}Write a conversation between Alice, a curious student, and Bob, a patient teacher, "
                "about \"{topic}\", suited to {audience}. Put each line on its own line as \"Alice:\" or "
                "\"Bob:\". " + AVOID,
    "python": "{context}Write a Python exercise about \"{topic}\" for {audience}: a short task description, "
              "a solution as one Python function, and tests as assert statements in a code block. " + AVOID,
    "wikihow": "{context}Write a wikiHow-style article on how to do something related to \"{topic}\", for "
               "{audience}. Use numbered steps, each with a short explanation and a tip. " + AVOID,
    # seeded sources (seeds.web_rewrites, seeds.code_seeds, seeds.qa_seeds)
    "rewrite_textbook": "Here is an extract from a web page:\n\"{passage}\"\n\nRewrite it as a section of a textbook "
                        "for {audience_description}. Keep its facts and add nothing untrue; explain the ideas step "
                        "by step with one worked example. Use {style_description}. " + AVOID,
    "rewrite_exercises": "Here is an extract from a web page:\n\"{passage}\"\n\nTurn it into two exercises for "
                         "{audience} about its facts and ideas, each followed by a worked solution that explains "
                         "every step and ends with the final answer. " + AVOID,
    "rewrite_qa": "Here is an extract from a web page:\n\"{passage}\"\n\nWrite three questions a student could ask "
                  "about it, each followed by a clear answer based only on the extract. Start each question with "
                  "\"Q:\" and each answer with \"A:\". " + AVOID,
    "code_exercise": "Here is a Python function:\n```python\n{code}\n```\n\nWrite an exercise for {audience} whose "
                     "solution is this function: a short task description, a step-by-step explanation of how the "
                     "solution works, the solution in a Python code block, and tests as assert statements in a "
                     "second Python code block. " + AVOID,
    "qa_solution": "Solve the problem. Explain every step so that a student can follow, then end with a line "
                   "\"Answer: <final answer>\".\n\nProblem: {question}",
}

# ---- techniques (phi-4): fields are named in each template ------------------------------------------------
QUESTION = ("Write one challenging question a student might ask about \"{topic}\" that has a single short "
            "answer (a number or a few words). Write only the question.")
ANSWER = ("Answer the question. Think step by step, then end with a line \"Answer: <final answer>\".\n\n"
          "Question: {question}")
REVIEW = ("You are a strict reviewer. Check the answer to the question for mistakes.\n\nQuestion: {question}\n\n"
          "Answer: {answer}\n\nReply with \"VERDICT: correct\" or \"VERDICT: incorrect\", then one sentence why.")
CRITIQUE = ("Critique the following text against this rubric: {rubric}\nList its concrete problems as short "
            "bullet points.\n\nText:\n{draft}")
REVISE = ("Rewrite the text so that it fixes every problem in the critique. Keep what is good. Write only the "
          "improved text.\n\nText:\n{draft}\n\nCritique:\n{critique}")
REVERSE = ("Here is a piece of {kind}. Write the instruction that a user could have given to get exactly this "
           "as the answer. Write only the instruction.\n\n{output}")
# ---- topics (``phiforge topics``): numbered lists, which small teachers write most reliably -----------------
SUBJECTS = ("Write a numbered list of {n} subjects that are taught within {area}. Each item is a short name of 1 to 4 "
            "words, with no explanation.")
TOPICS = ("Write a numbered list of {n} topics from a textbook chapter on \"{subject}\" ({area}). Each item is a "
          "short title of 2 to 6 words, with no explanation.")
RUBRIC = "factual accuracy, clear step-by-step reasoning, fit for the audience, no repetition"


class PromptError(ConfigError):
    """A template that cannot be rendered; the message names the template and the valid fields."""


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def check_template(where: str, template: str, fields: dict[str, str] = FIELDS) -> None:
    try:
        names = template_fields(template)
    except ValueError as err:
        raise PromptError(f"{where}: not a valid template ({err})") from None
    for name in names:
        if name not in fields:
            shown = "{" + name + "}" if name else "{} (a positional field)"
            raise PromptError(f"{where}: unknown field {shown}; templates may use "
                              + ", ".join("{" + f + "}" for f in fields))


def seed_fields(seed: Seed) -> dict[str, str]:
    return {"topic": seed.topic, "area": seed.area, "audience": seed.audience,
            "audience_description": AUDIENCES[seed.audience], "format_description": ALL_FORMATS[seed.format][0],
            "style": seed.style, "style_description": STYLES[seed.style], "passage": seed.passage,
            "context": CONTEXT.format(passage=seed.passage) if seed.passage and seed.source == "topics" else "",
            "subject": seed.subject, "code": seed.code, "question": seed.question}


def render(template: str, **fields: Any) -> str:
    return template.format(**fields)


def document_prompt(seed: Seed, templates: dict[str, str]) -> str:
    """The user message that asks the teacher for this seed's document."""
    return render(templates.get(seed.format, TEMPLATES[seed.format]), **seed_fields(seed))
