"""``phiforge report RUN_DIR``: one self-contained HTML page about a run (plots embedded as PNG).

It reads whatever stage artifacts the run folder holds, so it works on a finished recipe and on a
half-done one. It leads with the result (what was trained on what, held-out loss beside the unigram
baseline, the evaluation beside the published phi numbers, three samples), then summaries that fit a
screen: stages, synthetic data (rejections by rule, the most and least used topics and a histogram),
curation by stage and rule, tokens, training curves, all samples, and the recipe (collapsed).
``run_summary`` is the same result as text, what ``phiforge run`` prints when it ends.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from phiforge.errors import NotFoundError
from phiforge.io.atomic import atomic_write_text

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #446}h2{margin-top:2em;color:#335}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}
th{background:#eef}pre{background:#f6f6f6;padding:.7em;overflow-x:auto;white-space:pre-wrap}
img{max-width:100%}.sample{border-left:4px solid #88a;padding-left:1em;margin:1em 0}
"""


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_jsonl(path: Path) -> list[dict]:
    from phiforge.data.jsonl import iter_jsonl

    return [line.record for line in iter_jsonl(path) if line.record is not None] if path.is_file() else []


def png(fig) -> str:  # noqa: ANN001
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def figure(width: float = 7.0, height: float = 3.2):  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _bar(counts: dict[str, float], title: str) -> str:
    fig, ax = figure(7, max(2.0, 0.25 * len(counts) + 1))
    names = list(counts)[:40]
    ax.barh(names[::-1], [counts[n] for n in names][::-1], color="#6a7fb5")
    ax.set_title(title)
    return png(fig)


# ---- sections ------------------------------------------------------------------------------------------
def _stats_section(title: str, stats: dict | None) -> str:
    """Scalars as a table; each {name: number} mapping (counts per topic, per rule ...) as a bar chart."""
    if not stats:
        return ""
    scalars = [[k, v] for k, v in stats.items() if isinstance(v, (int, float, str))]
    parts = [f"<h2>{html.escape(title)}</h2>", table(scalars, ["statistic", "value"]) if scalars else ""]
    for key, value in stats.items():
        if key == "rejected_by_reason" and isinstance(value, dict):
            value = _by_rule(value)
            key = "rejected by rule"
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            parts.append(_counts(value, key.replace("_", " ")))
        elif isinstance(value, dict) and value:
            parts.append(f"<details><summary>{html.escape(key)}</summary>"
                         f"<pre>{html.escape(json.dumps(value, indent=1)[:4000])}</pre></details>")
    return "\n".join(parts)


def _by_rule(reasons: dict[str, int]) -> dict[str, int]:
    """Rejection reasons grouped by their rule: "too short: 18 words < ..." counts under "too short"."""
    rules: dict[str, int] = {}
    for reason, n in reasons.items():
        rule = reason.split(":")[0].strip()
        rules[rule] = rules.get(rule, 0) + n
    return dict(sorted(rules.items(), key=lambda kv: -kv[1]))


def _counts(counts: dict[str, float], title: str, top: int = 20) -> str:
    """A {name: count} mapping that fits a screen: a bar per name when there are few, else the ``top`` most
    and least used beside a histogram of the counts (how many names were used how often)."""
    if len(counts) <= 2 * top:
        return _bar(counts, title)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    rows = [[most[0], most[1], least[0], least[1]] for most, least in zip(ranked[:top], ranked[::-1][:top])]
    fig, ax = figure(6, 2.6)
    ax.hist(list(counts.values()), bins=min(30, len(set(counts.values()))), color="#6a7fb5")
    ax.set_xlabel("documents")
    ax.set_ylabel(f"{title.split()[-1]}s")
    ax.set_title(f"{title}: {len(counts)} names, {int(sum(counts.values()))} documents")
    return (f"<h3>{html.escape(title)}</h3>" + table(rows, [f"{top} most used", "n", f"{top} least used", "n"])
            + png(fig))


def _curation_section(stats: dict | None) -> str:
    """Curation by stage: documents in and out, and what each rule removed."""
    if not stats:
        return ""
    rows = [[stage, info.get("docs_in", ""), info.get("docs_out", ""),
             ", ".join(f"{rule} {n}" for rule, n in sorted((info.get("removed") or {}).items(), key=lambda kv: -kv[1]))
             or "-", info.get("seconds", "")]
            for stage, info in stats.get("stages", {}).items()]
    out = stats.get("output", {})
    kept = f"<p>{out.get('documents', '?')} documents kept in {out.get('shards', '?')} shard(s).</p>" \
        if isinstance(out, dict) else ""
    return "<h2>Curation</h2>" + kept + table(rows, ["stage", "in", "out", "removed by rule", "seconds"])


def _training_section(folder: Path, title: str = "Pretraining") -> str:
    records = read_jsonl(folder / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train and not val:
        return ""
    parts = [f"<h2>{html.escape(title)}</h2>"]
    fig, ax = figure()
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    for name in (val[0]["val_loss"] if val else {}):
        ax.plot([r["step"] for r in val], [r["val_loss"][name] for r in val], "o-", label=f"validation: {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    parts.append(png(fig))
    rates = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    if rates:
        fig, ax = figure(7, 2.4)
        ax.plot([r["step"] for r in train if "tokens_per_s" in r], rates, color="#b5776a")
        ax.set_xlabel("step")
        ax.set_ylabel("tokens/s")
        parts.append(png(fig))
    summary = read_json(folder / "summary.json") or {}
    keep = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    if keep:
        parts.append(table([[k, v] for k, v in keep.items()], ["summary", "value"]))
    return "\n".join(parts)


def _eval_section(folder: Path) -> str:
    results = read_json(folder / "results.json")
    parts = []
    if results:
        from phiforge.eval.harness import format_table

        lines = [line for line in format_table(results, ["phi-1.5"]).splitlines() if line.startswith("|")]
        rows = [line.strip("|").split("|") for line in lines]
        parts += ["<h2>Evaluation</h2>", table(rows[2:], rows[0])]
        extra = {k: v for k, v in (results.get("extra") or {}).items()}
        if extra:
            parts.append(table([[k, v] for k, v in extra.items()], ["measure", "value"]))
        parts.append(_redteam_section(results.get("redteam"), folder))
    samples = read_json(folder / "samples.json") or {}
    if samples:
        parts.append("<h2>Samples in the phi-1.5 usage modes</h2>")
        for mode, sample in samples.items():
            parts.append(f'<div class="sample"><b>{html.escape(mode)}</b><pre>{html.escape(sample["prompt"])}'
                         f'<b>{html.escape(sample["completion"])}</b></pre></div>')
    return "\n".join(parts)


def _redteam_section(section: dict | None, folder: Path) -> str:
    """Red-team counts (hand grades, where applied, override the judge) per usage mode, and the judge's
    agreement with the hand-graded sample and with the hand grades applied to this run."""
    if not section:
        return ""
    grades = ["pass", "fail", "did_not_understand", "unparseable"]
    rows = [["all", *(section["counts"][g] for g in grades)]]
    rows += [[mode, *(c[g] for g in grades)] for mode, c in section["by_mode"].items()]
    agree = [[name, a["n"], *("-" if a[k] is None else a[k] for k in ("agreement", "kappa"))]
             for name, a in (("committed hand-graded sample", section["sample_agreement"]),
                             ("hand grades applied to this run", section["agreement"]))]
    page = folder / "results.redteam.html"
    link = f' Re-grade by hand: <a href="{page.name}">{page.name}</a>.' if page.is_file() else ""
    return (f"<h3>Red team</h3><p>{len(section['records'])} completions graded by "
            f"{html.escape(json.dumps(section['judge']))} against the rubric in eval/redteam_data/rubric.md.{link}"
            f"</p>{table(rows, ['mode', *grades])}{table(agree, ['judge vs', 'items', 'agreement', 'kappa'])}")


def _stages_section(run: dict | None) -> str:
    if not run:
        return ""
    rows = [[name, _status(name, s), f"{s.get('seconds', 0):.1f}" if "seconds" in s else "-",
             s.get("fingerprint", "")[:12]] for name, s in run.get("stages", {}).items()]
    return "<h2>Stages</h2>" + table(rows, ["stage", "status", "seconds", "fingerprint"])


def _status(stage: str, info: dict) -> str:
    """A stage's status as the report shows it: the report stage is this page; any other stage still marked
    running when the report is written was interrupted (a rerun resumes it)."""
    if stage == "report":
        return "done (this page)"
    return "interrupted (a rerun resumes it)" if info.get("status") == "running" else info.get("status", "")


def run_result(run: Path) -> dict[str, Any]:
    """What the run trained on what, and how it scored: the lead of the report and of ``run_summary``."""
    summary = read_json(run / "pretrain" / "summary.json") or {}
    config = read_json(run / "pretrain" / "final" / "config.json") or {}
    synth = read_json(run / "synth" / "stats.json") or {}
    curate = read_json(run / "curate" / "stats.json") or {}
    tokens = read_json(run / "tokenize" / "stats.json") or {}
    results = read_json(run / "eval" / "results.json") or {}
    kept = curate.get("output", {}).get("documents") if isinstance(curate.get("output"), dict) else None
    tasks = {}
    for task, metrics in results.get("results", {}).items():
        key = next((k for k in metrics if k != "alias" and "_stderr," not in k), None)
        if key is not None:
            from phiforge.eval.published import published_score

            tasks[task] = {"metric": key, "value": metrics[key], "phi-1.5": published_score("phi-1.5", task),
                           "items": results.get("n-samples", {}).get(task, {}).get("effective")}
    return {"name": run.name, "layers": config.get("num_hidden_layers"), "width": config.get("hidden_size"),
            "vocab": config.get("vocab_size"), "steps": summary.get("steps"), "tokens": summary.get("tokens"),
            "synth_documents": synth.get("documents"), "curated_documents": kept,
            "train_tokens": tokens.get("train_tokens"), "extra": results.get("extra") or {}, "tasks": tasks,
            "samples": read_json(run / "eval" / "samples.json") or {}}


def _trained_on(r: dict[str, Any]) -> str:
    model = f"a {r['layers']}-layer, {r['width']}-wide model (vocabulary {r['vocab']})" if r["layers"] else "a model"
    data = []
    if r["synth_documents"] is not None:
        data.append(f"{r['synth_documents']:,} synthetic documents")
    if r["curated_documents"] is not None:
        data.append(f"{r['curated_documents']:,} kept by curation")
    if r["train_tokens"] is not None:
        data.append(f"{r['train_tokens']:,} training tokens")
    seen = f"{r['steps']} steps, {r['tokens']:,} tokens seen" if r["tokens"] else "not trained yet"
    return f"{model}: {seen}" + (f", on {', '.join(data)}" if data else "")


def _loss_line(extra: dict[str, Any]) -> str:
    if "heldout_loss" not in extra:
        return ""
    return (f"held-out loss {extra['heldout_loss']:.3f} nats/token vs {extra['unigram_loss']:.3f} for the unigram "
            f"baseline (perplexity {extra['heldout_perplexity']:.1f}, {extra['heldout_tokens']:,} held-out tokens)")


def run_summary(run_dir: str | Path) -> str:
    """The result in a few lines of text (what `phiforge run` and `make demo` print at the end)."""
    run = Path(run_dir)
    r = run_result(run)
    lines = [f"{r['name']}: {_trained_on(r)}"]
    if _loss_line(r["extra"]):
        lines.append(_loss_line(r["extra"]))
    for task, t in r["tasks"].items():
        ref = f" (published phi-1.5: {t['phi-1.5']:.3f})" if t["phi-1.5"] is not None else ""
        lines.append(f"{task} {t['metric'].split(',')[0]} {t['value']:.3f} on {t['items']} items{ref}")
    run_state = read_json(run / "run.json") or {}
    times = ", ".join(f"{s} {i.get('seconds', 0):.0f}s" for s, i in run_state.get("stages", {}).items())
    if times:
        lines.append(f"stages: {times}")
    lines.append(f"report: {run / 'report.html'}")
    return "\n".join(lines)


def _result_section(run: Path) -> str:
    r = run_result(run)
    parts = ["<h2>Result</h2>", f"<p>Trained {html.escape(_trained_on(r))}.</p>"]
    if _loss_line(r["extra"]):
        parts.append(f"<p><b>{html.escape(_loss_line(r['extra']))}</b>: lower is better; a model that beats "
                     "the unigram baseline has learned more than token frequencies.</p>")
    if r["tasks"]:
        rows = [[task, t["metric"], t["value"], t["items"], "-" if t["phi-1.5"] is None else t["phi-1.5"]]
                for task, t in r["tasks"].items()]
        parts.append(table(rows, ["task", "metric", "this run", "items", "phi-1.5 (1.3B, published)"]))
    for mode, sample in list(r["samples"].items())[:3]:
        parts.append(f'<div class="sample"><b>{html.escape(mode)}</b><pre>{html.escape(sample["prompt"])}'
                     f'<b>{html.escape(sample["completion"])}</b></pre></div>')
    return "\n".join(parts)


def build_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write RUN_DIR/report.html (or ``output``) and return its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise NotFoundError(f"{run}: no such run folder")
    recipe = run / "recipe.toml"
    sections = [
        f"<h1>phiforge run: {html.escape(run.name)}</h1>",
        _result_section(run),
        _stages_section(read_json(run / "run.json")),
        _stats_section("Topics (phiforge topics)", read_json(run / "synth" / "topics_stats.json")),
        _stats_section("Synthetic data", read_json(run / "synth" / "stats.json")),
        _curation_section(read_json(run / "curate" / "stats.json")),
        _stats_section("Tokenizer", read_json(run / "tokenizer" / "stats.json")),
        _stats_section("Token shards", read_json(run / "tokenize" / "stats.json")),
        _training_section(run / "pretrain"),
        _training_section(run / "pretrain2", "Pretraining, phase 2"),
        _training_section(run / "sft", "Supervised fine-tuning"),
        _stats_section("Pivotal Token Search (preference pairs)", read_json(run / "pts" / "stats.json")),
        _training_section(run / "dpo", "Direct Preference Optimization"),
        _eval_section(run / "eval"),
        f"<h2>Recipe</h2><details><summary>{html.escape(recipe.name)} (click to open)</summary>"
        f"<pre>{html.escape(recipe.read_text(encoding='utf-8'))}</pre></details>" if recipe.is_file() else "",
    ]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>phiforge report: {html.escape(run.name)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(s for s in sections if s)}</body></html>")
    path = Path(output) if output else run / "report.html"
    atomic_write_text(path, page)
    return path
