"""``phiforge report RUN_DIR``: one self-contained HTML page about a run (plots embedded as PNG).

It reads whatever stage artifacts the run folder holds, so it works on a finished recipe and on a
half-done one: the recipe, data statistics (synth, curate), the tokenizer, training curves and
throughput, the evaluation table beside the published phi numbers, and samples in each usage mode.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from phiforge.checkpoint import _atomic_write

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #446}h2{margin-top:2em;color:#335}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}
th{background:#eef}pre{background:#f6f6f6;padding:.7em;overflow-x:auto;white-space:pre-wrap}
img{max-width:100%}.sample{border-left:4px solid #88a;padding-left:1em;margin:1em 0}
"""


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _read_jsonl(path: Path) -> list[dict]:
    from phiforge.data.jsonl import iter_jsonl

    return [line.record for line in iter_jsonl(path) if line.record is not None] if path.is_file() else []


def _png(fig) -> str:  # noqa: ANN001
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _figure(width: float = 7.0, height: float = 3.2):  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _bar(counts: dict[str, float], title: str) -> str:
    fig, ax = _figure(7, max(2.0, 0.25 * len(counts) + 1))
    names = list(counts)[:40]
    ax.barh(names[::-1], [counts[n] for n in names][::-1], color="#6a7fb5")
    ax.set_title(title)
    return _png(fig)


# ---- sections ------------------------------------------------------------------------------------------
def _stats_section(title: str, stats: dict | None) -> str:
    """Scalars as a table; each {name: number} mapping (counts per topic, per rule ...) as a bar chart."""
    if not stats:
        return ""
    scalars = [[k, v] for k, v in stats.items() if isinstance(v, (int, float, str))]
    parts = [f"<h2>{html.escape(title)}</h2>", _table(scalars, ["statistic", "value"]) if scalars else ""]
    for key, value in stats.items():
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            parts.append(_bar(value, key.replace("_", " ")))
        elif isinstance(value, dict) and value:
            parts.append(f"<h3>{html.escape(key)}</h3><pre>{html.escape(json.dumps(value, indent=1)[:4000])}</pre>")
    return "\n".join(parts)


def _training_section(folder: Path, title: str = "Pretraining") -> str:
    records = _read_jsonl(folder / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train and not val:
        return ""
    parts = [f"<h2>{html.escape(title)}</h2>"]
    fig, ax = _figure()
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    for name in (val[0]["val_loss"] if val else {}):
        ax.plot([r["step"] for r in val], [r["val_loss"][name] for r in val], "o-", label=f"validation: {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    parts.append(_png(fig))
    rates = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    if rates:
        fig, ax = _figure(7, 2.4)
        ax.plot([r["step"] for r in train if "tokens_per_s" in r], rates, color="#b5776a")
        ax.set_xlabel("step")
        ax.set_ylabel("tokens/s")
        parts.append(_png(fig))
    summary = _read_json(folder / "summary.json") or {}
    keep = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    if keep:
        parts.append(_table([[k, v] for k, v in keep.items()], ["summary", "value"]))
    return "\n".join(parts)


def _eval_section(folder: Path) -> str:
    results = _read_json(folder / "results.json")
    parts = []
    if results:
        from phiforge.eval.harness import format_table

        lines = [line for line in format_table(results, ["phi-1.5"]).splitlines() if line.startswith("|")]
        rows = [line.strip("|").split("|") for line in lines]
        parts += ["<h2>Evaluation</h2>", _table(rows[2:], rows[0])]
        extra = {k: v for k, v in (results.get("extra") or {}).items()}
        if extra:
            parts.append(_table([[k, v] for k, v in extra.items()], ["measure", "value"]))
    samples = _read_json(folder / "samples.json") or {}
    if samples:
        parts.append("<h2>Samples in the phi-1.5 usage modes</h2>")
        for mode, sample in samples.items():
            parts.append(f'<div class="sample"><b>{html.escape(mode)}</b><pre>{html.escape(sample["prompt"])}'
                         f'<b>{html.escape(sample["completion"])}</b></pre></div>')
    return "\n".join(parts)


def _stages_section(run: dict | None) -> str:
    if not run:
        return ""
    rows = [[name, s.get("status", ""), f"{s.get('seconds', 0):.1f}", s.get("fingerprint", "")[:12]]
            for name, s in run.get("stages", {}).items()]
    return "<h2>Stages</h2>" + _table(rows, ["stage", "status", "seconds", "fingerprint"])


def build_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write RUN_DIR/report.html (or ``output``) and return its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    recipe = run / "recipe.toml"
    sections = [
        f"<h1>phiforge run: {html.escape(run.name)}</h1>",
        _stages_section(_read_json(run / "run.json")),
        f"<h2>Recipe</h2><pre>{html.escape(recipe.read_text(encoding='utf-8'))}</pre>" if recipe.is_file() else "",
        _stats_section("Topics (phiforge topics)", _read_json(run / "synth" / "topics_stats.json")),
        _stats_section("Synthetic data", _read_json(run / "synth" / "stats.json")),
        _stats_section("Curation", _read_json(run / "curate" / "stats.json")),
        _stats_section("Tokenizer and token shards", _read_json(run / "tokens" / "stats.json")),
        _training_section(run / "pretrain"),
        _training_section(run / "pretrain2", "Pretraining, phase 2"),
        _training_section(run / "sft", "Supervised fine-tuning"),
        _eval_section(run / "eval"),
    ]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>phiforge report: {html.escape(run.name)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(s for s in sections if s)}</body></html>")
    path = Path(output) if output else run / "report.html"
    _atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path
