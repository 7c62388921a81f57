"""``phiforge study STUDY.toml``: equal-budget models trained on different data, compared with intervals.

A study has corpora (data stages, each run once and shared by every arm that uses it), one tokenizer
trained on all of them (so that every loss is in the same units), arms (each a mixture over the corpora,
or a ``phiforge run`` recipe whose synth and curate stages make its corpus) and one training section
that every arm and seed trains with: same architecture, same steps, same tokens per step, so the same
token budget. The work is done by ``phiforge run``'s Runner, one run folder per piece:

    OUT/corpora/NAME     synth -> curate (a recipe's), or curate (organic text, a user's JSONL), then tokenize
    OUT/tokenizer        tokenizer, on every corpus's curated documents
    OUT/arms/ARM/seed-S  pretrain, reading the shared tokenizer and token folders; probes.json beside it

so every piece skips when unchanged and resumes when interrupted (a killed pretraining from its newest
checkpoint), per arm and seed. The probes (phiforge.study.probes) score every arm-seed's model on each
corpus's held-out text, on neutral text no arm trained on, on the benchmarks (per item) and in the usage
modes; phiforge.study.report compares the arms by paired bootstrap and writes OUT/report.html.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phiforge.config.loader import apply_override, read_recipe
from phiforge.errors import RecipeError
from phiforge.io.checkpoint import write_json
from phiforge.run.pipeline import Plan, Runner, load_recipe
from phiforge.study.probes import digest

STUDIES_DIR = Path(__file__).parents[1] / "recipes" / "studies"
PROBE_DEFAULTS: dict[str, Any] = {"tasks": {"piqa": 0}, "neutral": "devils-dictionary", "neutral_documents": "",
                                  "heldout_tokens": 16384, "window": 128, "sample_tokens": 48, "bootstrap": 2000,
                                  "prompts": {}}


class StudyError(RecipeError):
    """A study file that cannot run: the file, the section and what was expected."""


@dataclass
class Corpus:
    name: str
    kind: str  # recipe | organic | documents
    recipe: dict[str, Any]  # the data run's recipe (synth/curate sections, or curate with its input paths)
    organic: list[str] = field(default_factory=list)
    documents: str | list[str] = ""


@dataclass
class Study:
    path: Path
    text: str
    name: str
    root: Path
    seeds: list[int]
    corpora: dict[str, Corpus]
    arms: dict[str, dict[str, float]]  # arm -> {corpus: weight}
    train: dict[str, Any]  # the [pretrain] section every arm trains with
    tokenizer: dict[str, Any]
    tokenize: dict[str, Any]
    probes: dict[str, Any]
    raw: dict[str, Any]


def load_study(name: str | Path, overrides: list[str] | None = None, size: str | None = None) -> Study:
    """Parse and check a study: [study], [train], [tokenizer], [tokenize], [corpora.*], [arms.*], [probes],
    and optional [sizes.NAME] override lists (``size`` applies one before ``overrides``)."""
    path, text, raw = read_recipe(name, STUDIES_DIR, StudyError)
    sizes = raw.get("sizes", {})
    if size is not None and size not in sizes:
        raise StudyError(f"{path}: --size {size}: sizes are {sorted(sizes) or 'none'}")
    for item in [*(sizes[size] if size else []), *(overrides or [])]:
        apply_override(raw, item)
    stray = sorted(set(raw) - {"study", "train", "tokenizer", "tokenize", "corpora", "arms", "probes", "sizes"})
    if stray:
        raise StudyError(f"{path}: unknown section(s) {stray}")
    head = raw.get("study", {})
    seeds = list(head.get("seeds", [0, 1, 2]))
    if len(seeds) < 1 or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
        raise StudyError(f"{path}: [study] seeds must be distinct integers; got {seeds}")
    corpora = {n: _corpus(path, n, c) for n, c in raw.get("corpora", {}).items()}
    arms: dict[str, dict[str, float]] = {}
    for arm, spec in raw.get("arms", {}).items():
        if "recipe" in spec:  # a run recipe's data stages as the arm's corpus (shared with any arm naming it)
            corpora.setdefault(spec["recipe"], _corpus(path, spec["recipe"], {"recipe": spec["recipe"]}))
            spec = {"mixture": {spec["recipe"]: 1.0}}
        mixture = spec.get("mixture")
        if not isinstance(mixture, dict) or not mixture:
            raise StudyError(f"{path}: [arms.{arm}] needs mixture = {{corpus = weight, ...}} or recipe = NAME")
        unknown = [c for c in mixture if c not in corpora]
        if unknown:
            raise StudyError(f"{path}: [arms.{arm}] mixture names {unknown}; corpora are {sorted(corpora)}")
        if any(not isinstance(w, (int, float)) or w <= 0 for w in mixture.values()):
            raise StudyError(f"{path}: [arms.{arm}] mixture weights must be positive numbers; got {mixture}")
        arms[arm] = {c: float(w) for c, w in mixture.items()}
    if len(arms) < 2:
        raise StudyError(f"{path}: a study compares at least 2 arms; got {sorted(arms)}")
    probes = {**PROBE_DEFAULTS, **raw.get("probes", {})}
    unknown = sorted(set(probes) - set(PROBE_DEFAULTS))
    if unknown:
        raise StudyError(f"{path}: [probes] unknown key(s) {unknown}; valid keys are {sorted(PROBE_DEFAULTS)}")
    train = {"recipe": "tiny", "overrides": [], **raw.get("train", {})}
    root = Path(head.get("out_dir") or f"runs/studies/{head.get('name', path.stem)}")
    return Study(path, text, head.get("name", path.stem), root, seeds, corpora, arms, train,
                 raw.get("tokenizer", {}), raw.get("tokenize", {}), probes, raw)


def _corpus(path: Path, name: str, spec: dict[str, Any]) -> Corpus:
    kinds = [k for k in ("recipe", "organic", "documents") if k in spec]
    if len(kinds) != 1:
        raise StudyError(f"{path}: [corpora.{name}] needs exactly one of recipe (a phiforge run recipe), "
                         f"organic (Debian sources) or documents (a JSONL file or folder); got {kinds}")
    kind = kinds[0]
    curate = copy.deepcopy(spec.get("curate", {}))
    if kind == "recipe":
        plan = load_recipe(spec["recipe"], list(spec.get("overrides", [])))
        missing = [s for s in ("synth", "curate") if s not in plan.stages]
        if missing:
            raise StudyError(f"{path}: [corpora.{name}] recipe {spec['recipe']} has no {missing} stage(s)")
        recipe = {s: plan.recipe.get(s, {}) for s in ("synth", "curate")}
        recipe["run"] = {"stages": ["synth", "curate"]}
        return Corpus(name, kind, recipe)
    organic = [spec["organic"]] if isinstance(spec.get("organic"), str) else list(spec.get("organic", []))
    if kind == "organic":
        from phiforge.data.organic import SOURCES

        unknown = [s for s in organic if s not in SOURCES]
        if unknown:
            raise StudyError(f"{path}: [corpora.{name}] organic sources {unknown} unknown; sources are "
                             f"{sorted(SOURCES)}")
    return Corpus(name, kind, {"run": {"stages": ["curate"]}, "curate": curate}, organic, spec.get("documents", ""))


class StudyRunner:
    """Runs a Study: corpora, tokenizer, tokens, then every arm x seed (pretrain, probes), then the report."""

    def __init__(self, study: Study, *, progress: bool = True, log: Callable[[str], None] = print) -> None:
        self.study, self.progress, self.log = study, progress, log
        self.root = study.root
        self.ran: dict[str, list[str]] = {}  # run folder -> stages that ran (not skipped) in this invocation

    # ---- one Runner per piece, each in its own run folder ------------------------------------------------
    def _run(self, root: Path, recipe: dict[str, Any]) -> dict[str, Any]:
        stages = list(recipe["run"]["stages"])
        recipe = {**copy.deepcopy(recipe), "run": {**recipe["run"], "out_dir": str(root)}}
        text = "# written by phiforge study (the run's recipe, as JSON)\n" + json.dumps(recipe, indent=1)
        ran: list[str] = []

        def log(line: str) -> None:
            if line.startswith("== ") and (line.endswith(": running") or line.endswith(": resuming")):
                ran.append(line[3:].split(":")[0])
            self.log(f"[{root.relative_to(self.root)}] {line}")

        runner = Runner(Plan(root, recipe, text, stages), progress=self.progress, log=log)
        state = runner.run()
        self.ran[str(root.relative_to(self.root))] = ran
        return state

    def corpus_folder(self, name: str) -> Path:
        return self.root / "corpora" / name

    def _corpus_recipe(self, corpus: Corpus, with_tokens: bool) -> dict[str, Any]:
        recipe = copy.deepcopy(corpus.recipe)
        folder = self.corpus_folder(corpus.name)
        if corpus.kind != "recipe":
            given = [str(folder / "organic.jsonl")] if corpus.kind == "organic" else \
                [str(f) for f in _document_paths(corpus)]
            recipe["curate"].setdefault("input", {})["paths"] = given
        if with_tokens:
            recipe["run"]["stages"] = [*recipe["run"]["stages"], "tokenize"]
            recipe["run"]["shared"] = {"tokenizer": str(self.root / "tokenizer")}
            recipe["tokenize"] = self.study.tokenize
        return recipe

    def prepare_data(self) -> dict[str, Any]:
        """Corpora (each once), the shared tokenizer, each corpus's tokens; returns the data fingerprints."""
        from phiforge.data import organic

        for corpus in self.study.corpora.values():
            folder = self.corpus_folder(corpus.name)
            if corpus.kind == "organic":
                export = folder / "organic.jsonl"
                meta = {"sources": corpus.organic, "version": 1}
                if (folder / "organic.json").is_file() and export.is_file() and \
                        json.loads((folder / "organic.json").read_text()).get("meta") == meta:
                    self.log(f"[corpora/{corpus.name}] organic text: unchanged, skipped")
                else:
                    stats = organic.export(corpus.organic, export, log=self.log)
                    write_json(folder / "organic.json", {"meta": meta, "sources": stats})
            self._run(folder, self._corpus_recipe(corpus, with_tokens=False))
        curated = [str(self.corpus_folder(c) / "curate" / "curated") for c in self.study.corpora]
        self._run(self.root / "tokenizer", {"run": {"stages": ["tokenizer"], "documents": curated},
                                            "tokenizer": self.study.tokenizer})
        keys = {}
        for corpus in self.study.corpora.values():
            state = self._run(self.corpus_folder(corpus.name), self._corpus_recipe(corpus, with_tokens=True))
            keys[corpus.name] = state["stages"]["tokenize"]["fingerprint"]
        return keys

    def arm_folder(self, arm: str, seed: int) -> Path:
        return self.root / "arms" / arm / f"seed-{seed}"

    def arm_recipe(self, arm: str, seed: int) -> dict[str, Any]:
        """One arm-seed's run: the study's [train] section over the arm's mixture, seeded."""
        mixture = self.study.arms[arm]
        first = next(iter(mixture))
        tokens = {c: self.corpus_folder(c) / "tokenize" for c in self.study.corpora}
        sources = ", ".join(f'{{name = "{c}", path = "{tokens[c] / "train"}", weight = {w}}}'
                            for c, w in mixture.items())
        val = ", ".join(f'{{name = "{c}", path = "{tokens[c] / "heldout"}"}}' for c in self.study.corpora)
        train = copy.deepcopy(self.study.train)
        train["overrides"] = [f"data.sources=[{sources}]", f"data.val_sources=[{val}]", f"run.seed={seed}",
                              *train.get("overrides", [])]
        train["source"] = first
        return {"run": {"stages": ["pretrain"], "shared": {"tokenizer": str(self.root / "tokenizer"),
                                                            "tokenize": str(self.corpus_folder(first))}},
                "pretrain": train}

    def train_arm(self, arm: str, seed: int, data_keys: dict[str, str]) -> None:
        """Pretrain one arm-seed; a folder trained on other data (a corpus changed) is started over."""
        folder = self.arm_folder(arm, seed)
        key = digest({c: data_keys[c] for c in self.study.corpora})
        key_file = folder / "data.key"
        if folder.exists() and (not key_file.is_file() or key_file.read_text() != key):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key)
        self._run(folder, self.arm_recipe(arm, seed))

    def run(self) -> dict[str, Any]:
        from phiforge.study.probes import probe_arm
        from phiforge.study.report import build_study_report, summarize

        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "study.toml").write_text(self.study.text, encoding="utf-8")
        write_json(self.root / "study.json", {"name": self.study.name, "overrides_applied": self.study.raw})
        data_keys = self.prepare_data()
        for arm in self.study.arms:
            for seed in self.study.seeds:
                self.train_arm(arm, seed, data_keys)
                probe_arm(self, arm, seed)
        results = summarize(self)
        write_json(self.root / "results.json", results)
        report = build_study_report(self.root, results)
        return {"results": results, "report": str(report)}


def _document_paths(corpus: Corpus) -> list[Path]:
    from phiforge.data.jsonl import document_files

    files = document_files(corpus.documents)
    if not files:
        raise StudyError(f"[corpora.{corpus.name}] documents = {corpus.documents!r}: no .jsonl files")
    return files
