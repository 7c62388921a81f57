"""The ``phiforge`` command: one thin subcommand per stage (parse, call the stage, print)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from phiforge.errors import DataError, FormatError, PhiforgeError


def cmd_info(args: argparse.Namespace) -> int:
    from phiforge.info import describe, engine_paths, format_info, resolve_config

    if args.paths:
        from phiforge.inference.fast_paths import format_paths

        report = engine_paths(args.model, None if args.dtype == "auto" else args.dtype,
                              int(args.quantize[3:]) if args.quantize else None, args.group_size)
        print(json.dumps(report, indent=2) if args.json else format_paths(report))
        return 0
    config, source = resolve_config(args.model)
    info = describe(config)
    print(json.dumps(info, indent=2) if args.json else format_info(info, source))
    return 0


def _load(args: argparse.Namespace):  # noqa: ANN202
    """Model and tokenizer from --model, optionally quantized on the fly with --quantize."""
    from phiforge.io.load import load_pretrained
    from phiforge.quant.quantize import quantize_model

    dtype = None if args.dtype == "auto" else args.dtype
    model, tokenizer = load_pretrained(args.model, dtype=dtype, device=args.device,
                                       check_finite_values=getattr(args, "check_finite", False))
    if tokenizer is None:
        raise FormatError(f"{args.model}: no tokenizer.json next to the weights")
    if getattr(args, "quantize", None):
        quantize_model(model, bits=int(args.quantize[3:]), group_size=args.group_size, keep_stored=False)
    return model, tokenizer


def _sampling(args: argparse.Namespace, **extra):  # noqa: ANN202
    from phiforge.inference.sampling import sampling_from_args

    return sampling_from_args(args, **extra)


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    from phiforge.inference.engine import Engine
    from phiforge.inference.prompts import format_prompt, stop_strings

    model, tokenizer = _load(args)
    text = format_prompt(args.mode, args.prompt)
    params = _sampling(args, stop_token_ids=tuple(tokenizer.stop_token_ids), stop_strings=stop_strings(args.mode))
    engine = Engine(model, tokenizer)
    ids = tokenizer.encode(text)
    start = time.perf_counter()
    if not args.quiet_prompt:
        print(text, end="", flush=True)
    for piece in engine.stream(ids, params):
        print(piece, end="", flush=True)
    seconds = time.perf_counter() - start
    n = len(engine.last.token_ids)
    print(f"\n[{len(ids)} prompt tokens, {n} new tokens in {seconds:.2f}s: {n / seconds:.1f} tokens/s, "
          f"finish: {engine.last.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from phiforge.inference.chat import ChatSession, run_chat
    from phiforge.inference.engine import Engine

    model, tokenizer = _load(args)
    run_chat(ChatSession(Engine(model, tokenizer), _sampling(args), system=args.system))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from phiforge.io.load import default_device, load_pretrained
    from phiforge.quant.quantize import quantize_model, save_quantized

    # rounding to int8/int4 is elementwise: the same on any device, and a GPU does it faster
    model, tokenizer = load_pretrained(args.model, dtype=None if args.dtype == "auto" else args.dtype,
                                       device=default_device())
    quantize_model(model, bits=args.bits, group_size=args.group_size, include_head=not args.keep_head)
    save_quantized(model, args.output)
    if tokenizer is not None:
        tokenizer.save(args.output)
    size = sum(p.stat().st_size for p in args.output.iterdir())
    print(json.dumps({"output": str(args.output), "bits": args.bits, "group_size": args.group_size,
                      "bytes": size, "modules": len(model.quantization["modules"])}, indent=2))
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from phiforge.tokenizers.tokenizer import train_tokenizer

    stats = train_tokenizer(args.inputs, args.output, args.vocab_size, args.chat_format)
    print(json.dumps(stats, indent=2))
    return 0


def cmd_tokenizer_encode(args: argparse.Namespace) -> int:
    """JSONL {"text": ...} on stdin -> {"ids": [...]} per line on stdout."""
    from phiforge.tokenizers.sources import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    for number, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"stdin:{number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"stdin:{number}: expected an object with a string field 'text'")
        ids = tok.encode(record["text"], add_special_tokens=not args.no_special)
        print(json.dumps({"ids": ids}), flush=False)
    sys.stdout.flush()
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from phiforge.data.packing import TokenizeConfig, tokenize_corpus

    stats = tokenize_corpus(TokenizeConfig(inputs=args.inputs, output=args.output, tokenizer=args.tokenizer,
                                           text_field=args.text_field, workers=args.workers, dtype=args.dtype))
    print(json.dumps(stats, indent=2, default=str))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from phiforge.train.pretrain import config_from_args, train

    summary = train(config_from_args(args))
    print(json.dumps(summary))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from phiforge.eval.harness import run_cli

    return run_cli(args)


def cmd_run(args: argparse.Namespace) -> int:
    from phiforge.run.pipeline import Runner, load_recipe

    plan = load_recipe(args.recipe, args.overrides)
    runner = Runner(plan, from_stage=args.from_stage, only=args.only, progress=not args.no_progress)
    if args.dry_run:
        print(json.dumps(runner.dry_run(), indent=2))
        return 0
    runner.run()
    from phiforge.run.report import run_summary

    print("\n" + run_summary(plan.root))  # the stage timings and fingerprints are in RUN/run.json
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from phiforge.study import StudyRunner, load_study
    from phiforge.study.report import format_summary

    study = load_study(args.study, args.overrides, args.size)
    out = StudyRunner(study, progress=not args.no_progress).run()
    print(format_summary(out["results"], out["report"]))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from phiforge.run.report import build_report

    print(build_report(args.run_dir, args.output))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from phiforge.inference.engine import Engine
    from phiforge.serve.server import ServeConfig, serve_forever

    model, tokenizer = _load(args)
    config = ServeConfig(model_name=args.served_model_name or Path(args.model).name.removesuffix(".gguf"),
                         host=args.host, port=args.port, api_key=args.api_key or None,
                         max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                         max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                         max_tokens_limit=args.max_tokens_limit, max_prompts_per_request=args.max_prompts_per_request,
                         max_request_tokens=args.max_request_tokens, max_queued_tokens=args.max_queued_tokens,
                         allowed_hosts=tuple(args.allowed_host) if args.allowed_host else None)
    engine = Engine(model, tokenizer, max_batch_size=config.max_batch_size, max_seq_len=config.max_seq_len)
    config.max_seq_len = engine.max_seq_len
    serve_forever(engine, config)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from phiforge.io.gguf_write import export_gguf

    model, tokenizer = _load(args)
    print(json.dumps(export_gguf(model, tokenizer, args.output, quant=args.quant), indent=2))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from phiforge.data.synth.pipeline import SynthConfig, merge_stats, parse_shard, run_synth
    from phiforge.data.synth.teachers import TeacherError

    config = SynthConfig.from_toml(args.config, args.overrides)
    try:
        stats = merge_stats(config) if args.merge_stats else run_synth(config, shard=parse_shard(args.shard))
    except TeacherError as err:  # what finished is on disk: a rerun resumes from there
        print(f"phiforge synth: error: {err}", file=sys.stderr)
        return 2
    if not args.full_stats:
        stats.pop("per_topic")
    print(json.dumps(stats, indent=2))
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from phiforge.data.synth.teachers import TeacherError
    from phiforge.data.synth.topics import TopicsConfig, run_topics

    flags = [f"{key}={value}" for key, value in (("run.num_topics", args.num), ("run.out_dir", args.out),
                                                 ("taxonomy.file", args.taxonomy)) if value is not None]
    config = (TopicsConfig.from_toml(args.config, flags + args.overrides) if args.config
              else TopicsConfig.from_dict({}, flags + args.overrides))
    try:
        stats = run_topics(config)
    except TeacherError as err:  # the journaled rounds are on disk: a rerun resumes from there
        print(f"phiforge topics: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=2))
    if not stats["complete"]:
        print(f"phiforge topics: {stats['topics']} of {stats['num_topics']} topics "
              + ("(run.max_rounds reached; rerun to go on)" if not stats["closed_areas"] else
                 f"(areas {stats['closed_areas']} stopped yielding new topics)"), file=sys.stderr)
    return 0


def cmd_loadgen(args: argparse.Namespace) -> int:
    from phiforge.data.synth.loadgen import from_args

    from_args(args).serve_forever()
    return 0


def cmd_curate(args: argparse.Namespace) -> int:
    from phiforge.data.curate.pipeline import CurateConfig, run_curate

    stats = run_curate(CurateConfig.from_toml(args.config, args.overrides))
    print(json.dumps(stats, indent=2, default=str))
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from phiforge.train.sft import main as sft_main

    return sft_main([args.recipe, *args.overrides])


def cmd_dpo(args: argparse.Namespace) -> int:
    from phiforge.train.dpo import main as dpo_main

    return dpo_main([args.recipe, *args.overrides])


def cmd_pts(args: argparse.Namespace) -> int:
    from phiforge.train.pts import main as pts_main

    return pts_main([args.recipe, *args.overrides])


def cmd_demo(args: argparse.Namespace) -> int:
    from phiforge.run.demo import run_demo

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
    p.add_argument("--paths", action="store_true",
                   help="which inference route each layer takes on this CPU (the engine's fast paths installed; "
                        "a preset gets random weights)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="with --paths (auto: the checkpoint's dtype, bfloat16 for a preset)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="with --paths: quantized at load time")
    p.add_argument("--group-size", type=int, default=32, help="with --paths --quantize int4: weights per scale")

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command", required=True)
    p = add("train", cmd_tokenizer_train, "train a byte-level BPE tokenizer on JSONL (field text) or .txt files",
            parent=tok)
    p.add_argument("inputs", nargs="+", type=Path, help="JSONL or text files")
    p.add_argument("--output", "-o", type=Path, required=True, help="folder for tokenizer.json + tokenizer_config.json")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--chat-format", choices=["phi3", "phi4"], default=None,
                   help="add that family's chat tokens and template")

    p = add("encode", cmd_tokenizer_encode, 'token ids of JSONL {"text": ...} on stdin, one {"ids": [...]} a line',
            parent=tok)
    p.add_argument("--tokenizer", "-t", required=True,
                   help="tokenizer folder, .gguf file of any architecture, or builtin (codegen-mono, phi-3, phi-4)")
    p.add_argument("--no-special", action="store_true", help="add no bos/eos (special tokens in the text still count)")

    def model_options(p: argparse.ArgumentParser, quantize: bool = True) -> None:
        p.add_argument("--model", "-m", required=True, help="model folder, .gguf file or embedded alias")
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
        p.add_argument("--check-finite", action="store_true",
                       help="refuse weights holding NaN/Inf (every tensor is checked; small ones always are)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        if quantize:
            p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                           help="weight-only quantize at load time (faster decode)")
            p.add_argument("--group-size", type=int, default=32, help="int4 group size")

    def sampling_options(p: argparse.ArgumentParser, max_new: int) -> None:
        from phiforge.inference.sampling import add_sampling_arguments

        add_sampling_arguments(p, max_new_tokens=max_new)

    from phiforge.inference.prompts import PROMPT_MODES

    p = add("generate", cmd_generate, "complete a prompt in one of the phi-1.5 usage modes, streaming tokens")
    model_options(p)
    sampling_options(p, 128)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--mode", default="completion", choices=PROMPT_MODES,
                   help="completion, cot (step by step), qa (Answer:), chat (Alice/Bob), code (signature)")
    p.add_argument("--quiet-prompt", action="store_true", help="print only the completion")

    p = add("chat", cmd_chat, "interactive chat with the model's chat template; /reset, /exit; tokens/s shown")
    model_options(p)
    sampling_options(p, 512)
    p.add_argument("--system", default=None, help="system message")

    p = add("quantize", cmd_quantize, "weight-only int8/int4 quantization, saved as safetensors (packed + scales)")
    model_options(p, quantize=False)
    p.add_argument("--bits", type=int, choices=[8, 4], default=4)
    p.add_argument("--group-size", type=int, default=32, help="int4 weights per scale/zero")
    p.add_argument("--keep-head", action="store_true", help="leave lm_head unquantized")
    p.add_argument("--output", "-o", type=Path, required=True)

    p = add("tokenize", cmd_tokenize, "tokenize JSONL/Parquet documents into packed, memmap-able token shards")
    p.add_argument("inputs", nargs="+", help="files, folders or globs of .jsonl, .jsonl.gz, .parquet")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--tokenizer", "-t", required=True, help="folder with tokenizer.json")
    p.add_argument("--text-field", default="text")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])

    from phiforge.train.pretrain import add_cli_arguments as train_arguments

    p = add("train", cmd_train, "pretrain from a TOML recipe (built-in: tiny, phi-1.5, phi-4, phi-4-midtrain); "
            "multi-process: torchrun --nproc_per_node N -m phiforge.train.pretrain RECIPE ...")
    train_arguments(p)

    from phiforge.eval.harness import add_cli_arguments as eval_arguments

    p = add("eval", cmd_eval, "evaluate on the phi reports' benchmarks with lm-evaluation-harness prompts "
            "and metrics ('--tasks list' names them)")
    eval_arguments(p)

    p = add("run", cmd_run, "run a recipe's stages (synth, curate, tokenizer, tokenize, pretrain, pretrain2, sft, "
            "eval, report); reruns skip unchanged stages and resume interrupted ones")
    p.add_argument("recipe", help="built-in run recipe (tiny-textbooks) or TOML file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. synth.run.num_documents=64")
    p.add_argument("--from", dest="from_stage", default=None, help="redo this stage and every later one")
    p.add_argument("--only", default=None, help="run just this stage (its inputs must exist)")
    p.add_argument("--dry-run", action="store_true", help="check every section and print the plan; run nothing")
    p.add_argument("--no-progress", action="store_true")

    p = add("study", cmd_study, "train equal-budget models on different data (arms x seeds) and compare them "
            "with paired-bootstrap intervals; built-in: textbooks-vs-web")
    p.add_argument("study", help="built-in study (textbooks-vs-web) or TOML file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. study.seeds=[0,1,2]")
    p.add_argument("--size", default=None, help="apply the study's [sizes.NAME] overrides first (e.g. small)")
    p.add_argument("--no-progress", action="store_true")

    p = add("report", cmd_report, "write RUN_DIR/report.html: data, training curves, evaluation, samples")
    p.add_argument("run_dir")
    p.add_argument("--output", "-o", default=None)

    p = add("serve", cmd_serve, "OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models, "
            "/health) with continuous batching")
    model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed when ready)")
    p.add_argument("--api-key", default=os.environ.get("PHIFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $PHIFORGE_API_KEY, else no key)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-seq-len", type=int, default=2048, help="prompt + completion tokens per request")
    p.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024)
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: max-seq-len - 1")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens; default: max-seq-len - 1")
    p.add_argument("--max-prompts-per-request", type=int, default=256)
    p.add_argument("--max-request-tokens", type=int, default=1 << 20,
                   help="prompts x n x (prompt + max_tokens) of one request (else 413)")
    p.add_argument("--max-queued-tokens", type=int, default=1 << 22,
                   help="the same over all queued and running requests (else 429 with Retry-After)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host header to serve (repeatable; '*' for any); default: localhost names and --host")

    p = add("export", cmd_export, "write a GGUF file for llama.cpp / Ollama (phi2, phi3, llama architectures)")
    model_options(p, quantize=False)
    p.add_argument("--format", choices=["gguf"], default="gguf")
    p.add_argument("--quant", choices=["f32", "f16", "q8_0", "q4_0"], default="f16")
    p.add_argument("--output", "-o", type=Path, required=True, help="the .gguf file to write")

    p = add("synth", cmd_synth, "synthetic textbooks, exercises, stories and dialogues from a teacher (local model "
            "or OpenAI-compatible endpoint); resumable, sharded JSONL")
    p.add_argument("config", help="synth TOML config (sections run, seeds, teacher, sampling, prompts, ...)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. run.num_documents=200 teacher.kind=openai")
    p.add_argument("--full-stats", action="store_true", help="also print the per-topic counts")
    p.add_argument("--shard", default="0/1", metavar="K/N",
                   help="run the K-th of N contiguous ranges of output shards (N processes on any hosts, one "
                        "shared run.out_dir; each resumable); the last to finish folds the stats")
    p.add_argument("--merge-stats", action="store_true",
                   help="fold every shard's and process's stats into run.out_dir/stats.json (generates nothing)")

    p = add("topics", cmd_topics, "grow a topics file for synth from a seed taxonomy (areas -> subjects -> topics) "
            "with a teacher, deduplicated by MiniLM similarity and normalized text, balanced across areas; resumable")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. dedup.similarity=0.8 teacher.kind=openai")
    p.add_argument("--config", default=None, help="TOML config (sections run, taxonomy, grow, dedup, teacher, "
                                                  "sampling); default: all defaults")
    p.add_argument("--num", type=int, default=None, help="topics to reach (run.num_topics, default 2000)")
    p.add_argument("--out", default=None, help="output folder (run.out_dir, default runs/topics)")
    p.add_argument("--taxonomy", default=None, help="seed topics file (taxonomy.file; default: the built-in 300)")

    from phiforge.data.synth.loadgen import add_arguments as loadgen_arguments

    p = add("loadgen", cmd_loadgen, "an OpenAI-compatible load generator on 127.0.0.1: instant deterministic "
            "answers, optional injected faults; it stands in for a teacher fleet only to measure phiforge's overhead")
    loadgen_arguments(p)

    p = add("curate", cmd_curate, "filter sharded documents: heuristics, dedup, benchmark decontamination, "
            "edu-value classifier (local processes or Ray); writes <output>/curated and stats.json")
    p.add_argument("config", help="TOML config ([input], [executor], [heuristics], [dedup], [decontam], [edu])")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. executor.workers=4 dedup.bands=20")

    for name, fn, what in (("sft", cmd_sft, "supervised fine-tuning on chat records, loss on assistant tokens only "
                                            "(built-in recipe: sft)"),
                           ("dpo", cmd_dpo, "Direct Preference Optimization on prompt/chosen/rejected pairs "
                                            "(built-in recipe: dpo)"),
                           ("pts", cmd_pts, "Pivotal Token Search: single-token DPO pairs from p(success) jumps "
                                            "(built-in recipe: pts)")):
        p = add(name, fn, what)
        p.add_argument("recipe", help="recipe name or TOML file")
        p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.path=chat.jsonl")

    add("demo", cmd_demo, "run the most complete job phiforge can do on this machine, with the embedded teacher")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except PhiforgeError as err:  # ours name the file/record/field: one line; anything else is a bug: traceback
        print(f"phiforge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
