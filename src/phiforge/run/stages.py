"""The stages ``phiforge run`` chains. Each takes its recipe section and the RunContext, writes its artifact
folder (ctx.folder(name)) and returns statistics (saved as stats.json beside the artifacts).

The stages only call the public functions of synth, curate, tokenizer, packing, pretrain, sft, pts, dpo, eval
and report; what a section may contain is documented in recipes/run/tiny-textbooks.toml.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from phiforge.errors import RecipeError
from phiforge.run.sections import (
    SECTIONS,
    DPOSection,
    EvalSection,
    PretrainSection,
    PTSSection,
    ReportSection,
    SFTSection,
    TokenizerSection,
    TokenizeSection,
)
from phiforge.train import launch

if TYPE_CHECKING:  # the runner imports the stages, never the other way: no cycle
    from phiforge.run.pipeline import RunContext
    from phiforge.train.sft import SFTConfig


def _documents(ctx: RunContext) -> list[Path]:
    """The corpus to train on: [run] documents (a .jsonl file or folder of them) when given, else the
    curate stage's kept shards."""
    from phiforge.data.jsonl import document_files

    given = ctx.recipe.get("run", {}).get("documents")
    files = document_files(given or str(ctx.folder("curate") / "curated"))
    if not files:
        raise RecipeError(f"{given or ctx.folder('curate') / 'curated'}: no .jsonl documents"
                          + ("" if given else " (did curate run?)"))
    return files


# ---- synth, curate ---------------------------------------------------------------------------------------
def synth_config(s: dict[str, Any], out_dir: Path | None = None, progress: bool = True):  # noqa: ANN201
    from phiforge.data.synth.pipeline import SynthConfig

    raw = json.loads(json.dumps(s))  # a deep copy the config builder may consume
    raw.setdefault("run", {}).update({"out_dir": str(out_dir or "runs/synth"), "progress": progress})
    return SynthConfig.from_dict(raw)


def stage_synth(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    from phiforge.data.synth.pipeline import run_synth

    return run_synth(synth_config(s, ctx.folder("synth"), ctx.progress))


def curate_config(s: dict[str, Any], ctx: RunContext | None = None):  # noqa: ANN201
    from phiforge.data.curate.pipeline import CurateConfig

    raw = json.loads(json.dumps(s))
    if ctx is not None:
        raw["output"] = str(ctx.folder("curate"))
        if "synth" in ctx.stages or not raw.get("input", {}).get("paths"):  # else: curate's own input files
            raw.setdefault("input", {})["paths"] = [str(ctx.folder("synth") / "shard-*.jsonl")]
    else:  # checking the section before the run: stand-ins for the folders the run will fill
        raw.setdefault("output", "runs/curate")
        raw.setdefault("input", {}).setdefault("paths", ["synth/shard-*.jsonl"])
    return CurateConfig.from_dict(raw)


def stage_curate(s: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    from phiforge.data.curate.pipeline import run_curate

    return run_curate(curate_config(s, ctx))


# ---- tokenizer, tokenize -------------------------------------------------------------------------------
def stage_tokenizer(s: TokenizerSection, ctx: RunContext) -> dict[str, Any]:
    from phiforge.tokenizers.tokenizer import save_with_stats, train_tokenizer

    if s.from_:  # a ready tokenizer (folder, GGUF, builtin) instead of training one
        return {"from": s.from_, **save_with_stats(run_tokenizer(s.from_), _documents(ctx),
                                                      ctx.folder("tokenizer"))}
    return train_tokenizer(_documents(ctx), ctx.folder("tokenizer"), s.vocab_size, s.chat_format or None,
                           min_frequency=s.min_frequency)


def run_tokenizer(spec: str) -> Any:
    """[tokenizer] from: loaded (a builtin built) now, so a missing file stops the run before any stage."""
    from phiforge.tokenizers.sources import load_tokenizer
    from phiforge.tokenizers.tokenizer import Tokenizer

    tok = load_tokenizer(spec)
    if not isinstance(tok, Tokenizer):
        raise RecipeError(f"from = {spec!r}: a tiktoken tokenizer cannot tokenize a run's corpus; "
                          "give a tokenizer.json folder, a .gguf, or a builtin")
    return tok


def check_tokenizer(section: TokenizerSection) -> None:
    if section.from_:
        if section.chat_format:
            raise RecipeError("chat_format applies to a trained tokenizer; with from = ... the tokenizer's own "
                              "chat template is used")
        run_tokenizer(section.from_)


def held_out(doc_id: str, fraction: float) -> bool:
    """A stable train/held-out split by record id (the same document lands on the same side in every rerun)."""
    digest = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return digest / 2**64 < fraction


def stage_tokenize(s: TokenizeSection, ctx: RunContext) -> dict[str, Any]:
    """Stream the documents to ``workers`` tokenizer processes, each block of documents its own token shard
    of train/ or heldout/ (the side chosen by the record id's hash); no intermediate JSONL."""
    from phiforge.data.packing import tokenize_stream

    folder = ctx.folder("tokenize")
    counts = {"train": 0, "heldout": 0}

    def documents() -> Iterator[tuple[int, str]]:
        for path in _documents(ctx):
            with open(path, encoding="utf-8") as fh:
                for line_no, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if not isinstance(record.get("text"), str):
                        raise RecipeError(f"{path}:{line_no}: the record has no string field 'text'")
                    side = held_out(str(record.get("id", f"{path.name}:{line_no}")), s.heldout_fraction)
                    counts["heldout" if side else "train"] += 1
                    yield int(side), record["text"]

    train, heldout = tokenize_stream(documents(), [folder / "train", folder / "heldout"], ctx.folder("tokenizer"),
                                     workers=s.workers, block_docs=s.block_docs, progress=ctx.progress)
    if not counts["train"] or not counts["heldout"]:
        raise RecipeError(f"[tokenize] heldout_fraction {s.heldout_fraction} left {counts} documents; "
                          "both sides need at least one")
    return {"documents": counts, "train_tokens": train["num_tokens"], "heldout_tokens": heldout["num_tokens"],
            "shards": {"train": train["num_shards"], "heldout": heldout["num_shards"]}}


# ---- pretrain, pretrain2 ---------------------------------------------------------------------------------
def _pretrain(s: PretrainSection, ctx: RunContext, stage: str, init: list[str]) -> dict[str, Any]:
    from phiforge.train import TrainConfig, train

    tokens = ctx.folder("tokenize")
    # the corpus this run made fills the recipe's source named `source` (after the section's overrides, which
    # may replace the whole source list); other sources keep their paths
    overrides = [f"data.tokenizer={ctx.folder('tokenizer')}",
                 f'data.val_sources=[{{name = "heldout", path = "{tokens / "heldout"}"}}]', "data.val_fraction=0.0",
                 f"run.out_dir={ctx.folder(stage)}", "checkpoint.resume=auto",
                 f"log.progress={'true' if ctx.progress else 'false'}", *init, *s.overrides,
                 f"data.sources.{s.source}.path={tokens / 'train'}"]
    if launch.distributed(s):
        summary = launch.run_torchrun("phiforge.train.pretrain", s.recipe, overrides, s, ctx.folder(stage), ctx.log)
    else:
        summary = train(TrainConfig.from_toml(s.recipe, overrides))
    return {k: v for k, v in summary.items() if k != "losses"}


def stage_pretrain(s: PretrainSection, ctx: RunContext) -> dict[str, Any]:
    return _pretrain(s, ctx, "pretrain", [])


def stage_pretrain2(s: PretrainSection, ctx: RunContext) -> dict[str, Any]:
    """Phase 2: phase 1's exported weights (a fresh optimizer and schedule) on the phase-2 mixture."""
    return _pretrain(s, ctx, "pretrain2", [f"model.init_from={ctx.model_folder('pretrain2')}"])


# ---- sft -------------------------------------------------------------------------------------------------
def sft_config(s: SFTSection, ctx: RunContext | None = None) -> SFTConfig:
    """The SFT config of an [sft] section; without ctx, stand-ins for the folders the run will fill."""
    from phiforge.train.sft import SFTConfig

    return SFTConfig.from_toml(s.recipe, _sft_overrides(s, ctx))


def _sft_overrides(s: SFTSection, ctx: RunContext | None) -> list[str]:
    model, out = (ctx.model_folder("sft"), ctx.folder("sft")) if ctx else ("pretrain/final", "runs/sft")
    progress = "true" if ctx is None or ctx.progress else "false"
    return [f"model.init_from={model}", f"data.path={s.data}", f"run.out_dir={out}",
            "checkpoint.resume=auto", f"log.progress={progress}", *s.overrides]


def stage_sft(s: SFTSection, ctx: RunContext) -> dict[str, Any]:
    from phiforge.train.sft import sft

    if launch.distributed(s):
        summary = launch.run_torchrun("phiforge.train.sft", s.recipe, _sft_overrides(s, ctx), s,
                                      ctx.folder("sft"), ctx.log)
        summary.setdefault("skipped_records", [])
    else:
        summary = sft(sft_config(s, ctx))
    skipped = summary.pop("skipped_records")  # their ids and reasons are in the log
    return {**{k: v for k, v in summary.items() if k != "losses"}, "skipped_records": len(skipped)}


# ---- pts, dpo ---------------------------------------------------------------------------------------------
def pts_config(s: PTSSection, ctx: RunContext | None = None):  # noqa: ANN201
    """The PTS config of a [pts] section: the newest model before it searched on ``data`` (a queries file or
    arithmetic:N[:SEED]; "" = the questions of [synth.seeds] qa_seeds, gathered into pts/queries.jsonl)."""
    from phiforge.train.pts import PTSConfig

    model, out = (ctx.model_folder("pts"), ctx.folder("pts")) if ctx else ("sft/final", "runs/pts")
    queries = s.data or str(Path(out) / "queries.jsonl")
    progress = "true" if ctx is None or ctx.progress else "false"
    return PTSConfig.from_toml(s.recipe, [f"model.path={model}", f"data.path={queries}", f"run.out_dir={out}",
                                             f"run.progress={progress}", *s.overrides])


def _qa_seed_queries(recipe: dict[str, Any]) -> list[dict[str, Any]]:
    from phiforge.data.synth import seeds as S

    paths = recipe.get("synth", {}).get("seeds", {}).get("qa_seeds", [])
    if not paths:
        raise RecipeError("[pts] data: give the queries (a JSONL of question/answer records, or arithmetic:N), "
                          "or [synth.seeds] qa_seeds for pts to search the synth stage's questions")
    return [{"id": item.id, "question": item.question, "answer": item.answer} for item in S.load_qa_seeds(paths)]


def stage_pts(s: PTSSection, ctx: RunContext) -> dict[str, Any]:
    """Resumable by query: pts appends each finished query to pts/results.jsonl and a rerun skips those."""
    from phiforge.data.packing import atomic_write_bytes
    from phiforge.train.pts import pts

    if not s.data:  # the same file on every (re)run: the seeds are read in their order
        records = _qa_seed_queries(ctx.recipe)
        atomic_write_bytes(ctx.folder("pts") / "queries.jsonl",
                           "".join(json.dumps(r) + "\n" for r in records).encode())
    summary = pts(pts_config(s, ctx))
    skipped = summary.pop("skipped_records")
    return {**{k: v for k, v in summary.items() if k != "config"}, "model": ctx.model_stage("pts"),
            "skipped_records": len(skipped)}


def _dpo_overrides(s: DPOSection, ctx: RunContext | None) -> list[str]:
    model, out = (ctx.model_folder("dpo"), ctx.folder("dpo")) if ctx else ("sft/final", "runs/dpo")
    pairs = s.pairs or (ctx.folder("pts") / "pairs.jsonl" if ctx else "pts/pairs.jsonl")
    progress = "true" if ctx is None or ctx.progress else "false"
    return [f"model.init_from={model}", f"data.path={pairs}", f"run.out_dir={out}", "checkpoint.resume=auto",
            f"log.progress={progress}", *s.overrides]


def stage_dpo(s: DPOSection, ctx: RunContext) -> dict[str, Any]:
    from phiforge.train.dpo import DPOConfig, dpo

    pairs = Path(s.pairs) if s.pairs else ctx.folder("pts") / "pairs.jsonl"
    if not pairs.is_file() or not pairs.read_text().strip():
        found = json.loads((ctx.folder("pts") / "stats.json").read_text()) if not s.pairs else {}
        raise RecipeError(f"[dpo] {pairs}: no preference pairs" + (
            f" (pts searched {found.get('queries')} queries: {found.get('status')}; widen [pts] "
            "search.min_prob/max_prob, or give queries the model solves part of the time)" if found else ""))
    if launch.distributed(s):
        summary = launch.run_torchrun("phiforge.train.dpo", s.recipe, _dpo_overrides(s, ctx), s,
                                      ctx.folder("dpo"), ctx.log)
    else:
        summary = dpo(DPOConfig.from_toml(s.recipe, _dpo_overrides(s, ctx)))
    return {k: v for k, v in summary.items() if k not in ("losses", "skipped_records")}


# ---- eval ------------------------------------------------------------------------------------------------
def token_array(folder: Path) -> np.ndarray:
    from phiforge.data.packing import load_shards

    return np.concatenate([np.asarray(s.tokens(), dtype=np.int64) for s in load_shards(folder)])


def unigram_loss(train: np.ndarray, heldout: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of held-out tokens under add-one-smoothed train unigram frequencies:
    the baseline a language model must beat to have learned anything beyond token frequencies."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[heldout].mean())


def heldout_loss(model_folder: Path, heldout: np.ndarray, window: int) -> float:
    from phiforge.eval.perplexity import perplexity
    from phiforge.io.load import default_device, load_pretrained

    # fp32 on any device: the figure is compared with a unigram baseline, rounding must not move it
    model, _ = load_pretrained(str(model_folder), dtype="float32", device=default_device())
    result = perplexity(model, heldout.tolist(), window=window)
    return result.nll / result.tokens


def usage_mode_samples(model_folder: Path, prompts: dict[str, str], max_new_tokens: int) -> dict[str, Any]:
    """Greedy completions in each phi-1.5 usage mode (the report shows them beside the prompts)."""
    from phiforge.inference.engine import Engine
    from phiforge.inference.prompts import format_prompt, stop_strings
    from phiforge.inference.sampling import SamplingParams
    from phiforge.io.load import default_device, load_pretrained

    model, tokenizer = load_pretrained(str(model_folder), dtype="float32", device=default_device())
    engine = Engine(model, tokenizer)
    out = {}
    for mode, prompt in prompts.items():
        text = format_prompt(mode, prompt)
        params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=tuple(tokenizer.stop_token_ids),
                                stop_strings=stop_strings(mode), repetition_penalty=1.2)
        result = engine.generate([tokenizer.encode(text)], params)[0]
        out[mode] = {"prompt": text, "completion": result.text}
    return out


def stage_eval(s: EvalSection, ctx: RunContext) -> dict[str, Any]:
    from phiforge.eval.harness import EvalConfig, evaluate
    from phiforge.io.checkpoint import write_json

    folder, model_folder = ctx.folder("eval"), ctx.model_folder("eval")
    extra: dict[str, Any] = {}
    tokens = ctx.folder("tokenize")
    if (tokens / "heldout").is_dir():
        train, heldout = token_array(tokens / "train"), token_array(tokens / "heldout")
        vocab = json.loads((model_folder / "config.json").read_text())["vocab_size"]
        extra["heldout_loss"] = heldout_loss(model_folder, heldout, s.window)
        extra["unigram_loss"] = unigram_loss(train, heldout, vocab)
        extra["heldout_perplexity"] = math.exp(extra["heldout_loss"])
        extra["heldout_tokens"] = int(len(heldout))
    results: dict[str, Any] = {"results": {}, "versions": {}, "n-shot": {}}
    if s.tasks:
        results = evaluate(EvalConfig(model=str(model_folder), tasks=list(s.tasks), limit=s.limit or None,
                                      output=str(folder / "results.json"),  # and redteam's re-grade page
                                      num_fewshot=None if s.num_fewshot < 0 else s.num_fewshot,
                                      progress=ctx.progress, published=("phi-1.5",)))
    results["extra"] = extra
    results["model"] = str(model_folder)
    write_json(folder / "results.json", results)
    write_json(folder / "samples.json", usage_mode_samples(model_folder, s.prompts, s.sample_tokens))
    tasks = {task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in results["results"].items()}
    return {"model": ctx.model_stage("eval"), "extra": extra, **tasks}


# ---- report ----------------------------------------------------------------------------------------------
def stage_report(s: ReportSection, ctx: RunContext) -> dict[str, Any]:
    from phiforge.run.report import build_report

    path = build_report(ctx.root)
    return {"report": str(path), "bytes": path.stat().st_size}


def check_pretrain(section: PretrainSection) -> None:
    from phiforge.train import TrainConfig

    launch.check_launch(section)
    config = TrainConfig.from_toml(section.recipe, list(section.overrides))  # unknown keys, bad values: now
    names = [src.name for src in config.data.sources]
    if section.source not in names:
        raise RecipeError(f"source = {section.source!r}: recipe {section.recipe} has sources {names}")


def check_sft(section: SFTSection) -> None:
    if not section.data:
        raise RecipeError("data: give the chat records to fine-tune on (a JSONL file of "
                          '{"messages": [...]} records, as `phiforge sft` reads)')
    _check_data(section.data)
    launch.check_launch(section)
    sft_config(section)  # unknown keys and bad values in the sft recipe or its overrides: now


def _check_data(data: str) -> None:
    """A data file that exists, or a generated ``arithmetic:N[:SEED]`` set."""
    from phiforge.train.arithmetic import ARITHMETIC, parse_arithmetic

    if data.startswith(ARITHMETIC):
        parse_arithmetic(data, "data")
    elif not Path(data).is_file():
        raise RecipeError(f"data = {data!r}: no such file")


def check_pts(section: PTSSection) -> None:
    if section.data:  # "" = questions from [synth.seeds] qa_seeds (checked across sections)
        _check_data(section.data)
    pts_config(section).validate()  # unknown keys and bad values in the pts recipe or its overrides: now


def check_dpo(section: DPOSection) -> None:
    from phiforge.train.dpo import DPOConfig

    if section.pairs and not Path(section.pairs).is_file():
        raise RecipeError(f"pairs = {section.pairs!r}: no such file")
    launch.check_launch(section)
    DPOConfig.from_toml(section.recipe, _dpo_overrides(section, None)).validate()


def check_across(recipe: dict[str, Any], sections: dict[str, Any]) -> None:
    """Checks that need two sections or the whole recipe: the benchmarks curate's decontamination names have
    data; pts's default queries need [synth.seeds] qa_seeds; sft renders chats with the run tokenizer's template,
    which exists only when [tokenizer] chat_format adds it (or from = ... brings one), unless the sft overrides
    name one (data.chat_template)."""
    decontam = sections.get("curate", {}).get("decontam", {})
    if "curate" in sections and decontam.get("enabled", True):  # named benchmarks ("all" is the stage's to check)
        named = [b for b in decontam.get("benchmarks", ["all"]) if b != "all"]
        try:
            check_benchmark_data(named, decontam.get("data_dir") or None, decontam.get("paths"))
        except RecipeError as err:
            raise RecipeError(f"[curate.decontam] {err}") from None
    if "pts" in sections and not sections["pts"].data:
        _qa_seed_queries(recipe)  # the default queries need [synth.seeds] qa_seeds
    if "sft" in sections and not sft_config(sections["sft"]).data.chat_template \
            and not (recipe.get("tokenizer", {}).get("chat_format") or recipe.get("tokenizer", {}).get("from")):
        raise RecipeError('[sft] the run\'s tokenizer has no chat template: set [tokenizer] chat_format = "phi3" '
                          '(or "phi4"), or give sft.overrides = ["data.chat_template=phi-3"]')


def check_eval(section: EvalSection) -> None:
    from phiforge.eval.tasks import task_names

    known = set(task_names())
    unknown = [t for t in section.tasks if t not in known and not t.startswith("mmlu_")]
    if unknown:
        raise RecipeError(f"tasks {unknown} are not evaluation tasks; see `phiforge eval --tasks list`")
    check_benchmark_data(section.tasks)


def check_benchmark_data(tasks: list[str], data_dir: str | None = None, paths: dict[str, str] | None = None) -> None:
    """Load each task's data now (local files, else the hub through `datasets`), so that a run without any
    source stops before its first stage, with the loader's message saying what to set."""
    from phiforge.eval.tasks import TaskDataError, get_task

    failed: dict[str, str] = {}
    for name in tasks:
        task = get_task(name, (paths or {}).get(name), data_dir)
        try:
            task.load()
        except (TaskDataError, FileNotFoundError) as err:
            failed[name] = str(task.hub) if task.hub else str(err)
    if failed:
        where = ", ".join(f"{name}: {source}" for name, source in failed.items())
        raise RecipeError(f"no data for {sorted(failed)}: set $PHIFORGE_BENCHMARKS to a folder of benchmark "
                          f"files, or have `datasets` cache the hub datasets lm-eval reads (run once online, with "
                          f"pip install 'phiforge[eval]'; HF_DATASETS_OFFLINE=1 reads only the cache) ({where})")


# name -> (run, an optional deeper check run before any stage starts); the sections' types are run.sections'
STAGES: dict[str, tuple[Callable[..., dict[str, Any]], Callable[..., object] | None]] = {
    # synth and curate check their sections with their own config loaders (which name unknown keys)
    "synth": (stage_synth, synth_config),
    "curate": (stage_curate, curate_config),
    "tokenizer": (stage_tokenizer, check_tokenizer),
    "tokenize": (stage_tokenize, None),
    "pretrain": (stage_pretrain, check_pretrain),
    "pretrain2": (stage_pretrain2, check_pretrain),
    "sft": (stage_sft, check_sft),
    "pts": (stage_pts, check_pts),
    "dpo": (stage_dpo, check_dpo),
    "eval": (stage_eval, check_eval),
    "report": (stage_report, None),
}


def prepare_section(stage: str, section: dict[str, Any]) -> Any:
    """The stage's typed section (run.sections; synth and curate keep their TOML tables, typed by their own
    configs): unknown keys, wrong types and invalid values fail here, before any work."""
    from phiforge.config.loader import build_config

    _, check = STAGES[stage]
    typed = build_config(SECTIONS[stage], section, error=RecipeError, section=stage) if stage in SECTIONS \
        else section
    if check is not None:
        try:
            check(typed)
        except ValueError as err:
            raise RecipeError(f"[{stage}] {err}") from None
    return typed
