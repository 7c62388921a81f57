"""The ``phiforge`` command: one thin subcommand per stage (parse, call the stage, print)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def cmd_info(args: argparse.Namespace) -> int:
    from phiforge.info import describe, format_info, resolve_config

    config, source = resolve_config(args.model)
    info = describe(config)
    print(json.dumps(info, indent=2) if args.json else format_info(info, source))
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from phiforge.tokenizer import train_tokenizer

    stats = train_tokenizer(args.inputs, args.output, args.vocab_size, args.chat_format)
    print(json.dumps(stats, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from phiforge.demo import run_demo

    return run_demo()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phiforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_text: str,
            parent: argparse._SubParsersAction = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        return p

    p = add("info", cmd_info, "architecture, parameter count, memory per dtype and KV-cache bytes per token")
    p.add_argument("model", help="preset name, model folder, .gguf file or embedded alias")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command", required=True)
    p = add("train", cmd_tokenizer_train, "train a byte-level BPE tokenizer on JSONL (field text) or .txt files",
            parent=tok)
    p.add_argument("inputs", nargs="+", type=Path, help="JSONL or text files")
    p.add_argument("--output", "-o", type=Path, required=True, help="folder for tokenizer.json + tokenizer_config.json")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--chat-format", choices=["phi3", "phi4"], default=None,
                   help="add that family's chat tokens and template")

    add("demo", cmd_demo, "run the most complete job phiforge can do on this machine, with the embedded teacher")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as err:  # our errors name the file/field; no traceback needed
        print(f"phiforge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
