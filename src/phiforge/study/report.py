"""A study's results (results.json) and its one-page comparison (report.html): the result first, in words
and with intervals, then the probes side by side, training curves, the tokens each arm saw, the corpora with
their sources and licenses, samples, and the phi-1.5 report's table for orientation."""

from __future__ import annotations

import html
import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from phiforge.run.report import STYLE, figure, png, read_json, read_jsonl, table
from phiforge.study.bootstrap import paired_bootstrap
from phiforge.study.probes import NEUTRAL

if TYPE_CHECKING:
    from phiforge.study import StudyRunner


def probe_matrix(root: Path, arm: str, seeds: list[int], probe: str) -> np.ndarray:
    """[seeds, items] of one probe ("loss:CORPUS", "loss:neutral" or "task:NAME") for one arm."""
    rows = []
    for seed in seeds:
        record = json.loads((root / "arms" / arm / f"seed-{seed}" / "probes.json").read_text())
        kind, name = probe.split(":", 1)
        rows.append(record["losses"][name] if kind == "loss" else record["tasks"][name]["items"])
    return np.asarray(rows, dtype=np.float64)


def _probe_names(runner: StudyRunner) -> list[str]:
    tasks = [f"task:{t}" for t in runner.study.probes["tasks"]]
    return [*(f"loss:{c}" for c in runner.study.corpora), f"loss:{NEUTRAL}", *tasks]


def _lower_is_better(probe: str) -> bool:
    return probe.startswith("loss:")


def summarize(runner: StudyRunner) -> dict[str, Any]:
    study, root = runner.study, runner.root
    arms: dict[str, Any] = {}
    for arm, mixture in study.arms.items():
        runs = []
        for seed in study.seeds:
            summary = read_json(runner.arm_folder(arm, seed) / "pretrain" / "summary.json") or {}
            runs.append({"seed": seed, "steps": summary.get("steps"), "tokens": summary.get("tokens"),
                         "sources": summary.get("sources", {})})
        arms[arm] = {"mixture": mixture, "runs": runs}
    budgets = {run["tokens"] for a in arms.values() for run in a["runs"]}
    probes: dict[str, Any] = {}
    for probe in _probe_names(runner):
        matrices = {arm: probe_matrix(root, arm, study.seeds, probe) for arm in study.arms}
        if any(m.shape[1] == 0 for m in matrices.values()):
            continue
        per_arm = {arm: {"mean": float(m.mean()), "per_seed": [float(x) for x in m.mean(axis=1)],
                         "items": int(m.shape[1])} for arm, m in matrices.items()}
        pairs = {}
        for a, b in itertools.combinations(study.arms, 2):
            diff = paired_bootstrap(matrices[a], matrices[b], replicates=study.probes["bootstrap"])
            better = None
            if diff.significant:
                better = (a if diff.difference < 0 else b) if _lower_is_better(probe) else \
                    (a if diff.difference > 0 else b)
            pairs[f"{a} - {b}"] = {**diff.to_dict(), "a": a, "b": b, "better": better}
        probes[probe] = {"lower_is_better": _lower_is_better(probe), "arms": per_arm, "pairs": pairs}
    corpora = {}
    for name, corpus in study.corpora.items():
        folder = runner.corpus_folder(name)
        tokens = read_json(folder / "tokenize" / "stats.json") or {}
        curate = read_json(folder / "curate" / "stats.json") or {}
        organic = (read_json(folder / "organic.json") or {}).get("sources", {})
        kept = curate.get("output", {}).get("documents") if isinstance(curate.get("output"), dict) else None
        corpora[name] = {"kind": corpus.kind, "organic": organic, "documents_kept": kept,
                         "train_tokens": tokens.get("train_tokens"), "heldout_tokens": tokens.get("heldout_tokens")}
    neutral = None
    first = root / "arms" / next(iter(study.arms)) / f"seed-{study.seeds[0]}" / "probes.json"
    if first.is_file():
        neutral = json.loads(first.read_text()).get("neutral_source")
    return {"study": study.name, "seeds": study.seeds, "arms": arms, "equal_token_budget": len(budgets) == 1,
            "token_budget": sorted(b for b in budgets if b is not None), "probes": probes, "corpora": corpora,
            "neutral": neutral, "train": study.train, "headline": headline(probes), "findings": findings(probes)}


def _label(probe: str) -> str:
    kind, name = probe.split(":", 1)
    return f"held-out loss on {name} text" if kind == "loss" else f"{name} accuracy"


def headline(probes: dict[str, Any]) -> list[str]:
    """One sentence per probe: the best arm, and which other arms it beats with an interval excluding 0."""
    lines = []
    for probe, info in probes.items():
        means = {arm: v["mean"] for arm, v in info["arms"].items()}
        scores = ", ".join(f"{a} {m:.4f}" for a, m in means.items())
        if len(set(means.values())) == 1:
            lines.append(f"{_label(probe)}: every arm scores the same ({scores})")
            continue
        best = (min if info["lower_is_better"] else max)(means, key=means.get)
        beaten, tied = [], []
        for pair in info["pairs"].values():
            if best in (pair["a"], pair["b"]):
                other = pair["b"] if pair["a"] == best else pair["a"]
                (beaten if pair["better"] == best else tied).append(other)
        verdict = (f"significantly better than {', '.join(beaten)}" if beaten else "") + \
            ("; " if beaten and tied else "") + (f"not separable from {', '.join(tied)}" if tied else "")
        lines.append(f"{_label(probe)}: best {best}, {verdict} ({scores})")
    return lines


def findings(probes: dict[str, Any]) -> list[str]:
    """The result in sentences: per probe and pair of arms, who wins, by how much, with the 95% interval."""
    lines = []
    for probe, info in probes.items():
        for pair in info["pairs"].values():
            interval = f"{pair['difference']:+.4f}, 95% CI [{pair['low']:+.4f}, {pair['high']:+.4f}]"
            if pair["better"]:
                other = pair["b"] if pair["better"] == pair["a"] else pair["a"]
                lines.append(f"{_label(probe)}: {pair['better']} beats {other} ({pair['a']} - {pair['b']} = "
                             f"{interval})")
            else:
                lines.append(f"{_label(probe)}: {pair['a']} vs {pair['b']}: no significant difference ({interval})")
    return lines


def _curves(root: Path, results: dict[str, Any]) -> str:
    fig, ax = figure(7.5, 3.4)
    for i, arm in enumerate(results["arms"]):
        for j, seed in enumerate(results["seeds"]):
            rows = [r for r in read_jsonl(root / "arms" / arm / f"seed-{seed}" / "pretrain" / "metrics.jsonl")
                    if "loss" in r]
            ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], color=f"C{i}", alpha=0.7, lw=1,
                    label=arm if j == 0 else None)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("train loss (nats/token)")
    ax.legend()
    return png(fig)


def _intervals(probe: str, info: dict[str, Any]) -> str:
    fig, ax = figure(6.5, 0.45 * len(info["pairs"]) + 1.0)
    names = list(info["pairs"])
    for y, name in enumerate(names):
        pair = info["pairs"][name]
        ax.errorbar([pair["difference"]], [y], xerr=[[pair["difference"] - pair["low"]],
                                                     [pair["high"] - pair["difference"]]],
                    fmt="o", color="#b33" if pair["significant"] else "#668", capsize=4)
    ax.axvline(0, color="#999", lw=1)
    ax.set_yticks(range(len(names)), names)
    ax.set_title(f"{_label(probe)}: A - B with 95% interval" + (" (lower loss is better)"
                                                               if info["lower_is_better"] else ""))
    return png(fig)


PHI15_ROWS = ("phi-1.5", "phi-1.5-web", "phi-1.5-web-only")


def _published() -> str:
    from phiforge.eval.published import PUBLISHED, TASK_ORDER

    tasks = [t for t in TASK_ORDER if any(t in PUBLISHED[r].scores for r in PHI15_ROWS if r in PUBLISHED)]
    rows = [[name, *(f"{PUBLISHED[name].scores[t]:.3f}" if t in PUBLISHED[name].scores else "-" for t in tasks)]
            for name in PHI15_ROWS if name in PUBLISHED]
    return ("<h2>For orientation: the phi-1.5 report (1.3B models, 150B tokens)</h2>"
            "<p>arXiv 2309.05463 Tables 2-4, zero-shot (MMLU 2-shot). The arms here are the same three data "
            "recipes in miniature; their absolute scores are not comparable, the direction of the differences "
            "is what the study asks about.</p>" + table(rows, ["model", *tasks]))


def build_study_report(root: Path, results: dict[str, Any]) -> Path:
    from phiforge.io.atomic import atomic_write_text

    arms = list(results["arms"])
    budget = results["token_budget"]
    budget_text = f"an equal token budget of {budget[0]:,} tokens" if results["equal_token_budget"] else \
        f"UNEQUAL token budgets {budget}"
    parts = [f"<h1>phiforge study: {html.escape(results['study'])}</h1>",
             f"<p>{len(arms)} arms x {len(results['seeds'])} seeds (seeds {results['seeds']}), one architecture "
             f"(<code>{html.escape(results['train']['recipe'])}</code>), {budget_text}"
             " per model. Differences are arm A minus arm B, paired bootstrap over items and seeds, 95% interval; "
             "red = the interval excludes 0.</p>",
             "<h2>Result</h2><ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in results["headline"])
             + "</ul><details><summary>every pair of arms, in words</summary><ul>"
             + "".join(f"<li>{html.escape(line)}</li>" for line in results["findings"]) + "</ul></details>"]
    header = ["probe", *(f"{a} (mean, per seed)" for a in arms)]
    rows = []
    for probe, info in results["probes"].items():
        rows.append([_label(probe) + (" (lower is better)" if info["lower_is_better"] else ""),
                     *(f"{info['arms'][a]['mean']:.4f} ({', '.join(f'{x:.3f}' for x in info['arms'][a]['per_seed'])})"
                       for a in arms)])
    parts += ["<h2>Probes side by side</h2>", table(rows, header)]
    rows = [[probe, name, f"{p['difference']:+.4f}", f"[{p['low']:+.4f}, {p['high']:+.4f}]",
             "yes" if p["significant"] else "no", p["better"] or "-", p["items"]]
            for probe, info in results["probes"].items() for name, p in info["pairs"].items()]
    parts += [table(rows, ["probe", "A - B", "difference", "95% interval", "significant", "better", "items"])]
    parts += [_intervals(probe, info) for probe, info in results["probes"].items()]
    parts += ["<h2>Training curves</h2>", _curves(root, results)]
    rows = []
    for arm, info in results["arms"].items():
        for run in info["runs"]:
            seen = ", ".join(f"{c}: {s['tokens']:,} ({s['epochs']:.2f} epochs)" for c, s in run["sources"].items())
            rows.append([arm, run["seed"], run["steps"], f"{run['tokens']:,}" if run["tokens"] else "-", seen])
    parts += ["<h2>Tokens seen by each model</h2>", table(rows, ["arm", "seed", "steps", "tokens", "per corpus"])]
    rows = []
    for name, corpus in results["corpora"].items():
        sources = "; ".join(f"{n}: Debian {s['package']}, {s['description']}, license {s['license']}"
                            for n, s in corpus["organic"].items()) or corpus["kind"]
        rows.append([name, sources, corpus["documents_kept"], corpus["train_tokens"], corpus["heldout_tokens"]])
    neutral = results.get("neutral") or {}
    parts += ["<h2>Corpora</h2>", table(rows, ["corpus", "source", "documents kept by curate", "train tokens",
                                                "held-out tokens"]),
              f"<p>Neutral text (no arm trained on it): {html.escape(json.dumps(neutral))}</p>"]
    parts.append("<h2>Samples (seed " + str(results["seeds"][0]) + ")</h2>")
    for arm in arms:
        record = read_json(root / "arms" / arm / f"seed-{results['seeds'][0]}" / "probes.json") or {}
        for mode, sample in record.get("samples", {}).items():
            parts.append(f'<div class="sample"><b>{html.escape(arm)} / {html.escape(mode)}</b><pre>'
                         f'{html.escape(sample["prompt"])}<b>{html.escape(sample["completion"])}</b></pre></div>')
    parts.append(_published())
    parts.append(f"<h2>Study file</h2><pre>{html.escape((root / 'study.toml').read_text(encoding='utf-8'))}</pre>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>phiforge study: "
            f"{html.escape(results['study'])}</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path = root / "report.html"
    atomic_write_text(path, page)
    return path


def format_summary(results: dict[str, Any], report: str | Path) -> str:
    """What `phiforge study` prints at the end: the findings and the report's path."""
    lines = [f"study {results['study']}: {len(results['arms'])} arms x {len(results['seeds'])} seeds, "
             f"token budget {results['token_budget']} per model "
             f"({'equal' if results['equal_token_budget'] else 'NOT equal'})"]
    lines += [f"  {line}" for line in results["headline"]]
    lines.append(f"report: {report}  (every pair of arms with its interval: results.json)")
    return "\n".join(lines)
