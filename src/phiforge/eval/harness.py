"""``phiforge eval``: run benchmarks on a phiforge model, write lm-eval-shaped results, print a table.

Flow: resolve task names and load their data (bad input fails here, before any model work) → load the
model → build every document's prompt and requests → answer all requests of a kind together (so the
scorer can batch across tasks) → per-document metrics → aggregates, MMLU groups, results JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phiforge.errors import ConfigError, FormatError
from phiforge.eval.published import PUBLISHED, published_score
from phiforge.io.atomic import atomic_open

DEFAULT_PUBLISHED = ("phi-1.5", "phi-2")


@dataclass
class EvalConfig:
    model: str = "smollm2-135m-instruct"  # folder, .gguf file or embedded alias
    tasks: list[str] = field(default_factory=lambda: ["piqa"])
    limit: int | None = None  # first N documents of each task
    num_fewshot: int | None = None  # None: each task's lm-eval default
    output: str | None = None  # results JSON path
    log_samples: bool = False
    data: dict[str, str] = field(default_factory=dict)  # task -> file or folder
    data_dir: str | None = None  # folder of the original-format benchmarks (default: $PHIFORGE_BENCHMARKS)
    dtype: str = "float32"
    device: str | None = None
    max_length: int | None = None  # default: the model's max_position_embeddings (as HFLM)
    batch_tokens: int = 4096  # tokens per scoring forward pass
    gen_batch_size: int = 16  # generation rows (KV-cache rows) at once
    max_gen_toks: int = 256  # lm-eval's default when a task sets none
    code_workers: int = 2
    code_timeout: float = 3.0
    code_samples: int = 1  # generations per problem (pass@k needs k <= samples and a temperature)
    code_temperature: float = 0.0
    unsafe_no_sandbox: bool = False  # run generated code without bubblewrap (recorded in the results)
    fewshot_seed: int = 1234
    published: tuple[str, ...] = DEFAULT_PUBLISHED
    progress: bool = True
    judge_url: str = ""  # redteam: an OpenAI-compatible judge; "" = the embedded teacher
    judge_model: str = ""  # redteam: the judge's model name ("" = the embedded teacher / "judge")
    judge_key_env: str = "OPENAI_API_KEY"  # redteam: the environment variable holding the judge's API key
    redteam_modes: tuple[str, ...] = ("completion", "chat")


def load_tasks(config: EvalConfig) -> list[Any]:
    from phiforge.eval.tasks import get_task
    from phiforge.eval.tasks.code import CodeTask

    names = list(dict.fromkeys(config.tasks))
    unknown_data = set(config.data) - set(names)
    if unknown_data:
        raise ConfigError(f"--data names tasks that are not being run: {', '.join(sorted(unknown_data))}")
    tasks = [get_task(name, config.data.get(name), config.data_dir) for name in names]
    for task in tasks:
        if isinstance(task, CodeTask):
            from phiforge.eval.sandbox import SandboxLimits, sandbox_kind

            ks = tuple(k for k in (1, 10, 100) if k <= config.code_samples)
            task.configure(config.code_samples, config.code_temperature, ks,
                           SandboxLimits(timeout=config.code_timeout,
                                         unsafe_no_sandbox=config.unsafe_no_sandbox), config.code_workers)
            sandbox_kind(task.limits)  # refuse before any model is loaded
        if task.name == "redteam":
            from phiforge.eval.redteam import Judge

            task.configure(Judge(config.judge_url, config.judge_model, config.judge_key_env), config.redteam_modes)
        task.load()
    return tasks


def load_model(config: EvalConfig) -> tuple[Any, Any]:
    from phiforge.io.load import load_pretrained

    model, tokenizer = load_pretrained(config.model, dtype=config.dtype, device=config.device)
    if tokenizer is None:
        raise FormatError(f"{config.model}: no tokenizer.json next to the weights")
    return model, tokenizer


def evaluate(config: EvalConfig, *, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Run ``config.tasks`` and return lm-eval-shaped results; pass a loaded model/tokenizer to skip loading."""
    from phiforge.eval.scoring import LanguageModel

    start = time.time()
    tasks = load_tasks(config)
    if model is None:
        model, tokenizer = load_model(config)
    lm = LanguageModel(model, tokenizer, max_length=config.max_length, batch_tokens=config.batch_tokens,
                       gen_batch_size=config.gen_batch_size, max_gen_toks=config.max_gen_toks,
                       show_progress=config.progress)
    for task in tasks:
        if hasattr(task, "bind_tokenizer"):  # prompts in the model's own chat template
            task.bind_tokenizer(tokenizer)
    plans = [_plan(task, config) for task in tasks]
    answer_requests(lm, [inst for plan in plans for inst in plan["instances"]])
    results = _collect(plans, config)
    results["config"] = {"model": "phiforge", "model_args": f"pretrained={config.model},dtype={config.dtype}",
                         "device": str(model.embed.weight.device), "max_length": lm.max_length,
                         "batch_tokens": config.batch_tokens, "limit": config.limit,
                         "fewshot_seed": config.fewshot_seed}
    code_tasks = [task for task in tasks if hasattr(task, "limits")]
    if code_tasks:
        from phiforge.eval.sandbox import sandbox_kind

        results["config"]["code_sandbox"] = sandbox_kind(code_tasks[0].limits)
    results["published"] = {name: asdict(PUBLISHED[name]) | {"unverified": sorted(PUBLISHED[name].unverified),
                                                             "lm_eval_comparable":
                                                                 sorted(PUBLISHED[name].lm_eval_comparable)}
                            for name in config.published if name in PUBLISHED}
    results["date"] = start
    results["total_evaluation_time_seconds"] = str(time.time() - start)
    if config.output:
        write_results(results, config.output)
        if "redteam" in results:
            from phiforge.eval.redteam import page_path, regrade_page

            regrade_page(results["redteam"], page_path(config.output))
    return results


def _plan(task: Any, config: EvalConfig) -> dict[str, Any]:
    """Every document's prompt and requests (shots drawn in document order, as lm-eval does)."""
    k = task.default_shots if config.num_fewshot is None else config.num_fewshot
    docs = task.docs[: config.limit] if config.limit else task.docs
    sampler = task.fewshot_sampler(config.fewshot_seed)
    instances, per_doc = [], []
    for doc_id, doc in enumerate(docs):
        ctx = task.context(doc, task.shots_for(sampler, doc, k) if k else [])
        mine = task.instances(doc_id, doc, ctx)
        per_doc.append(mine)
        instances += mine
    return {"task": task, "k": k, "docs": docs, "instances": instances, "per_doc": per_doc}


def answer_requests(lm: Any, instances: Sequence[Any]) -> None:
    """Fill ``instance.response`` for every instance, one batched call per request kind."""
    methods = {"loglikelihood": lm.loglikelihood, "loglikelihood_rolling": lambda a, desc: lm.loglikelihood_rolling(
        [x[0] for x in a], desc=desc), "generate_until": lm.generate_until,
        "sentence_logprob": lambda a, desc: lm.sentence_logprob([x[0] for x in a], desc=desc)}
    for kind, method in methods.items():
        todo = [inst for inst in instances if inst.kind == kind]
        if todo:
            for inst, response in zip(todo, method([inst.args for inst in todo], desc=kind)):
                inst.response = response


def _collect(plans: list[dict[str, Any]], config: EvalConfig) -> dict[str, Any]:
    results: dict[str, Any] = {key: {} for key in ("results", "groups", "group_subtasks", "configs", "versions",
                                                   "n-shot", "higher_is_better", "n-samples")}
    samples: dict[str, list[dict[str, Any]]] = {}
    for plan in plans:
        task = plan["task"]
        responses = [[inst.response for inst in mine] for mine in plan["per_doc"]]
        scores = task.score_docs(plan["docs"], responses)
        _store(results, task.name, task, plan, task.aggregate(scores), len(plan["docs"]))
        if hasattr(task, "extra_results"):  # sections beside the metrics (redteam: every generation and grade)
            results.update(task.extra_results())
        subgroups = _subtasks(task, plan, scores)
        if subgroups:
            _mmlu_groups(results, task, plan, subgroups)
        if config.log_samples:
            samples[task.name] = _samples(task, plan, responses, scores)
    if config.log_samples:
        results["samples"] = samples
    return results


def _store(results: dict[str, Any], name: str, task: Any, plan: dict[str, Any], metrics: dict[str, Any],
           n: int) -> None:
    results["results"][name] = {"alias": name, **metrics}
    results["configs"][name] = task.config(plan["k"])
    results["versions"][name] = task.version
    results["n-shot"][name] = plan["k"]
    results["higher_is_better"][name] = {m: "perplexity" not in m for m in task.metrics}
    results["n-samples"][name] = {"original": len(task.docs), "effective": n}


def _subtasks(task: Any, plan: dict[str, Any], scores: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for doc, score in zip(plan["docs"], scores):
        key = task.group_of(doc)
        if key is not None:
            groups.setdefault(key, []).append(score)
    return groups if len(groups) > 1 else {}


def _mmlu_groups(results: dict[str, Any], task: Any, plan: dict[str, Any],
                 subgroups: dict[str, list[dict[str, Any]]]) -> None:
    """Per-subject results, the four categories and the group, each weighted by subject size (lm-eval)."""
    from phiforge.eval.tasks.mmlu import CATEGORY_OF

    for sub, scores in subgroups.items():
        _store(results, sub, task, plan, task.aggregate(scores), len(scores))
        results["results"][sub]["alias"] = f" - {sub[5:]}"
    categories: dict[str, list[str]] = {}
    for sub in subgroups:
        categories.setdefault(f"mmlu_{CATEGORY_OF[sub[5:]]}", []).append(sub)
    for cat, subs in sorted(categories.items()):
        results["groups"][cat] = _pooled(results, subs, cat)
        results["results"][cat] = results["groups"][cat]
        results["group_subtasks"][cat] = subs
    results["results"][task.name] = _pooled(results, sorted(subgroups), task.name)
    results["groups"][task.name] = results["results"][task.name]
    results["group_subtasks"][task.name] = sorted(categories)


def _pooled(results: dict[str, Any], subtasks: list[str], name: str) -> dict[str, Any]:
    """Size-weighted mean and lm-eval's pooled standard error over subtasks."""
    sizes = [results["n-samples"][s]["effective"] for s in subtasks]
    accs = [results["results"][s]["acc,none"] for s in subtasks]
    errs = [results["results"][s]["acc_stderr,none"] for s in subtasks]
    total = sum(sizes)
    out: dict[str, Any] = {"alias": name, "acc,none": sum(a * n for a, n in zip(accs, sizes)) / total}
    if all(isinstance(e, float) for e in errs) and total > len(sizes):
        var = sum((n - 1) * e**2 * n for n, e in zip(sizes, errs)) / (total - len(sizes))
        out["acc_stderr,none"] = (var / total) ** 0.5
    else:
        out["acc_stderr,none"] = "N/A"
    return out


def _samples(task: Any, plan: dict[str, Any], responses: list[list[Any]],
             scores: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for doc_id, (doc, mine, resp, score) in enumerate(zip(plan["docs"], plan["per_doc"], responses, scores)):
        out.append({"doc_id": doc_id, "doc": {k: v for k, v in doc.items() if k != "__line__"},
                    "target": task.doc_to_target(doc) if task.output_type != "loglikelihood_rolling" else "",
                    "arguments": [list(inst.args) for inst in mine], "resps": resp,
                    **task.log_fields(doc, resp), **{k: v for k, v in score.items() if not k.startswith("_")}})
    return out


def write_results(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Atomic write (temp name, fsync, rename) of the results JSON."""
    target = Path(path)
    with atomic_open(target, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False, default=_json_default)
    return target


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# ---- the table ------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_table(results: dict[str, Any], published: Sequence[str] | None = None, subtasks: bool = False) -> str:
    """lm-eval's markdown table, with the published phi numbers for each task's first metric beside ours."""
    refs = list(published if published is not None else results.get("published", {}) or DEFAULT_PUBLISHED)
    header = ["Tasks", "Version", "Filter", "n-shot", "Metric", "Value", "", "Stderr", *refs]
    lines = ["|" + "|".join(header) + "|", "|" + "|".join("-" * max(3, len(h)) for h in header) + "|"]
    hidden = {s for subs in results.get("group_subtasks", {}).values() for s in subs if s.startswith("mmlu_")
              and s[5:] not in ("stem", "other", "social_sciences", "humanities")}
    for name, metrics in results["results"].items():
        if name in hidden and not subtasks:
            continue
        first = True
        for key, value in metrics.items():
            if key == "alias" or "_stderr," in key:
                continue
            metric, _, filt = key.partition(",")
            err = metrics.get(f"{metric}_stderr,{filt}", "")
            base = name.split("_")[0] if name.startswith("mmlu_") else name
            pubs = [_fmt(published_score(r, base)) if first and published_score(r, base) is not None
                    and name == base else "" for r in refs]
            row = [metrics.get("alias", name) if first else "", str(results["versions"].get(name, "")) if first
                   else "", filt, str(results["n-shot"].get(name, "")) if first else "", metric, _fmt(value),
                   "±" if err not in ("", "N/A") else "", _fmt(err), *pubs]
            lines.append("|" + "|".join(row) + "|")
            first = False
    notes = [f"{r}: {PUBLISHED[r].setting} ({PUBLISHED[r].source})" for r in refs if r in PUBLISHED]
    return "\n".join(lines + ([""] + notes if notes else []))


# ---- command line (for cli.py's `phiforge eval`) -----------------------------------------------------------
def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="smollm2-135m-instruct", help="model folder, .gguf file or alias")
    p.add_argument("--tasks", "-t", required=True, help="comma-separated task names; 'list' prints them")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    p.add_argument("--num-fewshot", type=int, default=None, help="shots (default: each task's lm-eval default)")
    p.add_argument("--output", "-o", default=None, help="results JSON path")
    p.add_argument("--log-samples", action="store_true", help="include per-document records in the JSON")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                   help="data file/folder for a task (repeatable); HF layouts or the original formats")
    p.add_argument("--data-dir", default=None, help="folder with the original-format benchmarks "
                   "(default: $PHIFORGE_BENCHMARKS, else ./benchmarks; tasks without local data are read from the "
                   "Hugging Face hub through `datasets`, as lm-eval does)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--gen-batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--code-workers", type=int, default=2)
    p.add_argument("--code-samples", type=int, default=1)
    p.add_argument("--code-temperature", type=float, default=0.0)
    p.add_argument("--unsafe-no-sandbox", action="store_true",
                   help="run generated code without bubblewrap (only in-process guards; recorded in the results)")
    p.add_argument("--published", default=",".join(DEFAULT_PUBLISHED),
                   help=f"reference columns, from: {', '.join(PUBLISHED)}")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--judge-url", default="", help="redteam: OpenAI-compatible judge endpoint, e.g. "
                   "http://127.0.0.1:8000/v1 (default: the embedded teacher)")
    p.add_argument("--judge-model", default="", help="redteam: the judge's model name")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="redteam: environment variable with the "
                   "judge's API key")
    p.add_argument("--redteam-modes", default="completion,chat", help="redteam: usage modes (completion, chat, "
                   "qa, cot); chat uses the model's chat template when it has one")
    p.add_argument("--apply-grades", default=None, metavar="GRADES", help="redteam: fold hand grades (the "
                   "re-grade page's export, or JSONL) into the results at --output, recount, rewrite both")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    data = {}
    for item in args.data:
        task, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--data {item!r}: expected TASK=PATH")
        data[task] = path
    return EvalConfig(model=args.model, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
                      limit=args.limit, num_fewshot=args.num_fewshot, output=args.output,
                      log_samples=args.log_samples, data=data, data_dir=args.data_dir, dtype=args.dtype,
                      device=args.device, max_length=args.max_length, batch_tokens=args.batch_tokens,
                      gen_batch_size=args.gen_batch_size, code_workers=args.code_workers,
                      code_samples=args.code_samples, code_temperature=args.code_temperature,
                      unsafe_no_sandbox=args.unsafe_no_sandbox,
                      published=tuple(p for p in args.published.split(",") if p), progress=not args.no_progress,
                      judge_url=args.judge_url, judge_model=args.judge_model, judge_key_env=args.judge_key_env,
                      redteam_modes=tuple(m.strip() for m in args.redteam_modes.split(",") if m.strip()))


def run_cli(args: argparse.Namespace) -> int:
    if args.tasks.strip() == "list":
        from phiforge.eval.tasks import task_names

        print("\n".join(task_names()))
        return 0
    if args.apply_grades:
        return _apply_grades_cli(args)
    results = evaluate(config_from_args(args))
    print(format_table(results))
    if args.output:
        print(f"\nresults written to {args.output}")
    return 0


def _apply_grades_cli(args: argparse.Namespace) -> int:
    from phiforge.eval.redteam import apply_grades, page_path, read_grades, regrade_page

    if not args.output:
        raise ValueError("--apply-grades needs --output: the red-team results JSON to update")
    path = Path(args.output)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file")
    results = json.loads(path.read_text(encoding="utf-8"))
    done = apply_grades(results, read_grades(args.apply_grades))
    write_results(results, path)
    page = regrade_page(results["redteam"], page_path(path))
    section = results["redteam"]
    print(f"applied {done['applied']} hand grades ({done['unmatched']} matched no record) to {path}; page {page}")
    print(json.dumps({"counts": section["counts"], "judge_counts": section["judge_counts"],
                      "agreement": section["agreement"]}, indent=1))
    return 0
