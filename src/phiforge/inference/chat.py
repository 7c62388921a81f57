"""Conversations: the model's chat template when it has one, phi-1.5's Alice/Bob format otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from phiforge.inference.engine import Engine
from phiforge.inference.prompts import format_prompt, stop_strings
from phiforge.inference.sampling import SamplingParams

HELP = "commands: /reset clears the history, /exit (or Ctrl-D) quits"


@dataclass
class ChatSession:
    engine: Engine
    params: SamplingParams
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    @property
    def templated(self) -> bool:
        return bool(self.engine.tokenizer.chat_template)

    def reset(self) -> None:
        self.messages = []

    def prompt_text(self) -> str:
        if self.templated:
            system = [{"role": "system", "content": self.system}] if self.system else []
            return self.engine.tokenizer.apply_chat_template(system + self.messages, add_generation_prompt=True)
        # base models (phi-1.5): the report's chat mode, one Alice/Bob exchange after another
        turns = []
        for message in self.messages:
            speaker = "Alice" if message["role"] == "user" else "Bob"
            turns.append(f"{speaker}: {message['content']}")
        return "\n".join(turns[:-1] + [format_prompt("chat", self.messages[-1]["content"])])

    def reply(self, user_text: str, on_text: Callable[[str], None]) -> tuple[str, int, float]:
        """Stream the answer to ``user_text``; returns (answer, tokens, seconds)."""
        self.messages.append({"role": "user", "content": user_text})
        tokenizer = self.engine.tokenizer
        ids = tokenizer.encode(self.prompt_text(), add_special_tokens=not self.templated)
        params = self.params
        stops = tuple(tokenizer.stop_token_ids)
        params = SamplingParams(**{**params.__dict__, "stop_token_ids": params.stop_token_ids + stops,
                                   "stop_strings": params.stop_strings
                                   + (() if self.templated else stop_strings("chat"))})
        start = time.perf_counter()
        answer = "".join(_tee(self.engine.stream(ids, params), on_text))
        seconds = time.perf_counter() - start
        self.messages.append({"role": "assistant", "content": answer.strip()})
        return answer, len(self.engine.last.token_ids), seconds


def _tee(pieces, on_text: Callable[[str], None]):  # noqa: ANN001, ANN202
    for piece in pieces:
        on_text(piece)
        yield piece


def run_chat(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """The interactive loop of ``phiforge chat``."""
    interactive = stdin.isatty()
    print(HELP, file=stdout)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            print("(history cleared)", file=stdout)
            continue
        print("model> ", end="", file=stdout, flush=True)
        _, tokens, seconds = session.reply(text, lambda piece: print(piece, end="", file=stdout, flush=True))
        print(f"\n[{tokens} tokens, {tokens / max(seconds, 1e-9):.1f} tokens/s]", file=stdout, flush=True)
