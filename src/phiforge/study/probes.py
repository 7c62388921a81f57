"""What a study measures on every arm-seed's model, with per-item scores for the paired bootstrap.

- held-out loss on each corpus's held-out split (the arm's own data and the other arms'), per window;
- held-out loss on neutral text no arm trained on (an organic source left out of every corpus), per window;
- zero-shot benchmark accuracy (the eval harness, per item);
- greedy samples in the phi-1.5 usage modes.

Written to ARM/seed-S/probes.json; an unchanged model and [probes] section skip (resumable per arm-seed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from phiforge.errors import EvalError
from phiforge.io.checkpoint import write_json

if TYPE_CHECKING:
    from phiforge.study import StudyRunner

ITEM_METRICS = ("acc,none", "exact_match,flexible-extract", "exact_match,strict-match", "pass@1,none")
NEUTRAL = "neutral"


def digest(value: Any) -> str:
    """A short stable key of plain data (the study's data and probe caches)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def neutral_text(probes: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The neutral text and where it came from: a JSONL file given, else an organic source."""
    if probes["neutral_documents"]:
        from phiforge.data.jsonl import iter_jsonl

        records = [r.record for r in iter_jsonl(Path(probes["neutral_documents"])) if r.record]
        return "\n\n".join(r["text"] for r in records), {"documents": str(probes["neutral_documents"])}
    from phiforge.data.organic import describe, iter_documents

    text = "\n\n".join(d["text"] for d in iter_documents(probes["neutral"]))
    return text, describe([probes["neutral"]])[0]


def _window_items(model: Any, ids: list[int], window: int) -> list[float]:  # noqa: ANN401
    from phiforge.eval.perplexity import window_losses

    return [nll / n for nll, n in window_losses(model, ids, window=window)]


def _task_items(results: dict[str, Any], task: str) -> tuple[str, list[float]]:
    """Per-item scores of a task (MMLU: its subjects' items in name order) and the metric they are."""
    lists = [results["samples"][name] for name in sorted(results.get("samples", {}))
             if name == task or name.startswith(f"{task}_")]
    items = [record for records in lists for record in records]
    if not items:
        return "", []
    # a task scored otherwise (a red-team count, say): its first numeric "metric,filter" field
    numeric = [k for k, v in items[0].items() if "," in k and isinstance(v, (int, float))]
    metric = next((m for m in ITEM_METRICS if m in items[0]), numeric[0] if numeric else "")
    if not metric:
        raise EvalError(f"task {task}: no per-item score among {ITEM_METRICS} in {sorted(items[0])}")
    return metric, [float(r[metric]) for r in items]


def probe_arm(runner: StudyRunner, arm: str, seed: int) -> dict[str, Any]:
    from phiforge.eval.harness import EvalConfig, evaluate
    from phiforge.io.load import default_device, load_pretrained
    from phiforge.run.sections import DEFAULT_SAMPLE_PROMPTS
    from phiforge.run.stages import token_array, usage_mode_samples

    probes, folder = runner.study.probes, runner.arm_folder(arm, seed)
    model_folder = folder / "pretrain" / "final"
    weights = sorted(model_folder.glob("*.safetensors"))
    key = digest({"probes": probes, "corpora": sorted(runner.study.corpora),
                   "weights": [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]})
    out = folder / "probes.json"
    if out.is_file() and json.loads(out.read_text()).get("key") == key:
        runner.log(f"[arms/{arm}/seed-{seed}] == probes: unchanged, skipped")
        return json.loads(out.read_text())
    runner.log(f"[arms/{arm}/seed-{seed}] == probes: running")
    model, tokenizer = load_pretrained(str(model_folder), dtype="float32", device=default_device())
    cap, window = probes["heldout_tokens"], probes["window"]
    losses: dict[str, Any] = {}
    for corpus in runner.study.corpora:
        ids = token_array(runner.corpus_folder(corpus) / "tokenize" / "heldout")[:cap].tolist()
        losses[corpus] = _window_items(model, ids, window)
    text, neutral_source = neutral_text(probes)
    losses[NEUTRAL] = _window_items(model, tokenizer.encode(text)[:cap], window)
    tasks: dict[str, Any] = {}
    for task, limit in probes["tasks"].items():
        results = evaluate(EvalConfig(model=str(model_folder), tasks=[task], limit=limit or None, log_samples=True,
                                      progress=runner.progress, published=()), model=model, tokenizer=tokenizer)
        metric, items = _task_items(results, task)
        tasks[task] = {"metric": metric, "score": float(np.mean(items)) if items else None, "items": items}
    samples = usage_mode_samples(model_folder, probes["prompts"] or DEFAULT_SAMPLE_PROMPTS, probes["sample_tokens"])
    record = {"key": key, "arm": arm, "seed": seed, "losses": losses, "neutral_source": neutral_source,
              "tasks": tasks, "samples": samples}
    write_json(out, record)
    return record
