"""``phiforge run RECIPE``: the phi recipe's stages in order, each writing its own artifact folder.

    synth -> curate -> tokenizer -> tokenize -> pretrain -> (pretrain2) -> (sft) -> (pts) -> (dpo) -> eval -> report

pretrain2 (a second pretraining phase with its own mixture, phi-3's phase 2), sft (chat fine-tuning), pts
(Pivotal Token Search: preference pairs from the newest model) and dpo (DPO on pts's pairs, or a given pairs
file) run when the recipe lists them (or, without [run] stages, has their section). Each model stage starts
from the newest model before it, and eval evaluates the newest model: dpo's when it runs, else sft's, else
pretrain2's, else pretrain's (RunContext.model_stage).

A stage's fingerprint hashes its recipe section and its inputs' fingerprints. A rerun skips a stage whose
fingerprint matches a finished run of it, resumes one that was interrupted with the same fingerprint
(each stage resumes itself: synth by record ids, pretrain from its newest checkpoint), and redoes one
whose section or inputs changed. Everything a stage needs is checked before any stage starts.

``[run] shared = {stage = "RUN_DIR"}`` reads a stage another run finished (its folder, its fingerprint) instead
of running it: `phiforge study` trains every arm from one shared tokenizer and token folders this way.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phiforge.config.loader import apply_override, config_dict, read_recipe
from phiforge.data.jsonl import document_files
from phiforge.errors import RecipeError
from phiforge.io.checkpoint import write_json

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes" / "run"
ORDER = ("synth", "curate", "tokenizer", "tokenize", "pretrain", "pretrain2", "sft", "pts", "dpo", "eval", "report")
OPT_IN = ("pretrain2", "sft", "pts", "dpo")  # without [run] stages, these run only when the recipe has their section
MODEL_STAGES = ("pretrain", "pretrain2", "sft", "dpo")  # the stages that export a model to FOLDER/final
MODEL = "model"  # in INPUTS: the newest model stage before the reader (RunContext.model_stage)
# the stages each stage reads from (their folders must exist, from this run or an earlier one)
INPUTS = {"synth": (), "curate": ("synth",), "tokenizer": ("curate",), "tokenize": ("curate", "tokenizer"),
          "pretrain": ("tokenizer", "tokenize"), "pretrain2": ("tokenizer", "tokenize", MODEL), "sft": (MODEL,),
          "pts": (MODEL,), "dpo": (MODEL, "pts"), "eval": ("tokenize", MODEL), "report": ()}


@dataclass
class RunContext:
    """What a stage sees: the run folder, its recipe, and the folders of the stages before it."""

    root: Path
    recipe: dict[str, Any]
    progress: bool = True
    log: Callable[[str], None] = print
    stages: tuple[str, ...] = ORDER  # the recipe's stages (all of them, not only those selected to run)

    shared: dict[str, Path] = field(default_factory=dict)  # stage -> another run folder that holds it

    def folder(self, stage: str) -> Path:
        return self.shared[stage] / stage if stage in self.shared else self.root / stage

    def model_stage(self, reader: str) -> str:
        """The stage whose model ``reader`` starts from or evaluates: the last model stage before it among
        the recipe's stages (decided by the recipe, never by which folders happen to exist), else pretrain."""
        before = [s for s in MODEL_STAGES if s in self.stages and ORDER.index(s) < ORDER.index(reader)]
        return before[-1] if before else "pretrain"

    def model_folder(self, reader: str) -> Path:
        export = self.folder(self.model_stage(reader)) / "final"
        if not (export / "config.json").is_file():
            raise RecipeError(f"stage {reader}: no exported model in {export}")
        return export


@dataclass
class Plan:
    root: Path
    recipe: dict[str, Any]
    text: str
    stages: list[str] = field(default_factory=list)


def load_recipe(name: str | Path, overrides: list[str] | None = None) -> Plan:
    """Parse and check a run recipe: [run] name/out_dir/stages plus one section per stage."""
    path, text, recipe = read_recipe(name, RECIPES_DIR, RecipeError)
    for item in overrides or []:
        apply_override(recipe, item)
    run = recipe.get("run", {})
    stages = list(run.get("stages", [s for s in ORDER if s not in OPT_IN or s in recipe]))
    unknown = [s for s in stages if s not in ORDER]
    if unknown:
        raise RecipeError(f"{path}: [run] stages has unknown stage(s) {unknown}; stages are {list(ORDER)}")
    shared = run.get("shared", {})
    if not isinstance(shared, dict) or any(k not in ORDER or k in stages for k in shared):
        raise RecipeError(f"{path}: [run] shared maps stages this recipe does not run to the run folders "
                          f"holding them (e.g. {{tokenizer = \"runs/x\"}}); got {shared!r}")
    stray = [k for k in recipe if k not in ("run", *ORDER)]
    if stray:
        raise RecipeError(f"{path}: unknown section(s) {stray}; sections are run and {list(ORDER)}")
    stages = [s for s in ORDER if s in stages]  # always in pipeline order
    root = Path(run.get("out_dir") or f"runs/{run.get('name', path.stem)}")
    return Plan(root, recipe, text, stages)


def fingerprint(section: dict[str, Any], inputs: list[str]) -> str:
    blob = json.dumps({"section": section, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class Runner:
    """Runs a Plan's stages with skip/resume bookkeeping in ROOT/run.json."""

    def __init__(self, plan: Plan, *, from_stage: str | None = None, only: str | None = None,
                 progress: bool = True, log: Callable[[str], None] = print) -> None:
        self.plan, self.log = plan, log
        for flag, stage in (("--from", from_stage), ("--only", only)):
            if stage is not None and stage not in plan.stages:
                raise RecipeError(f"{flag} {stage}: not a stage of this recipe ({plan.stages})")
        self.forced = set(plan.stages[plan.stages.index(from_stage):]) if from_stage else set()
        self.selected = [only] if only else plan.stages
        shared = {k: Path(v) for k, v in plan.recipe.get("run", {}).get("shared", {}).items()}
        self.ctx = RunContext(plan.root, plan.recipe, progress, log, tuple(plan.stages), shared)
        self.state_path = plan.root / "run.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {"stages": {}}
        self.shared_state = {k: self._shared_stage(k, v) for k, v in shared.items()}
        from phiforge.run.stages import STAGES, check_across, prepare_section

        unavailable = [s for s in self.selected if s not in STAGES]
        if unavailable:
            raise RecipeError(f"stage(s) {unavailable} cannot run in this version; available: {sorted(STAGES)}")
        self.sections = {s: prepare_section(s, plan.recipe.get(s, {})) for s in self.selected}
        check_across(plan.recipe, self.sections)
        self._check_inputs()

    @staticmethod
    def _shared_stage(stage: str, root: Path) -> dict[str, Any]:
        """A stage another run finished, which this run reads (its fingerprint feeds this run's)."""
        state = json.loads((root / "run.json").read_text()) if (root / "run.json").is_file() else {"stages": {}}
        info = state["stages"].get(stage, {})
        if info.get("status") != "done":
            raise RecipeError(f"[run] shared: stage {stage} has not finished in {root}")
        return info

    def _stage_info(self, stage: str) -> dict[str, Any]:
        return self.shared_state[stage] if stage in self.shared_state else self.state["stages"].get(stage, {})

    def _inputs(self, stage: str) -> list[str]:
        return [self.ctx.model_stage(stage) if i == MODEL else i for i in INPUTS[stage]]

    def _check_inputs(self) -> None:
        """Every input a selected stage reads must come from this run or be finished already."""
        available = set(self.plan.stages) if len(self.selected) > 1 else set()
        available |= {s for s, info in self.state["stages"].items() if info.get("status") == "done"}
        available |= set(self.shared_state)
        for stage in self.selected:
            missing = [i for i in self._inputs(stage) if i not in available and not self._optional(stage, i)]
            if missing:
                raise RecipeError(f"stage {stage} reads {missing}, which neither run in this recipe "
                                  f"nor finished before in {self.plan.root}")

    def _optional(self, stage: str, needed: str) -> bool:
        # eval reads tokenize only for held-out perplexity; [run] documents replaces the curated corpus
        if needed == "curate" and self.plan.recipe.get("run", {}).get("documents"):
            return True
        if needed == "synth" and self.plan.recipe.get("curate", {}).get("input", {}).get("paths"):
            return "synth" not in self.plan.stages  # curate reads its own input files
        if (stage, needed) == ("dpo", "pts"):  # [dpo] pairs = a given file instead of pts's
            return bool(self.plan.recipe.get("dpo", {}).get("pairs")) and "pts" not in self.plan.stages
        return (stage, needed) in {("eval", "tokenize")}

    def _fingerprint(self, stage: str) -> str:
        inputs = [self._stage_info(i).get("fingerprint", "") for i in self._inputs(stage)]
        inputs += [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in self._outside_files(stage)]
        from phiforge.train.launch import LAUNCH_KEYS

        section = {k: v for k, v in self.plan.recipe.get(stage, {}).items() if k not in LAUNCH_KEYS}
        return fingerprint(section, inputs)

    def _outside_files(self, stage: str) -> list[Path]:
        """Files from outside the run that a stage reads: an edited one makes the stage's fingerprint change."""
        documents = self.plan.recipe.get("run", {}).get("documents")
        if documents and "curate" in INPUTS[stage]:  # a user's corpus stands in for curate
            return document_files(documents)
        if stage == "curate" and "synth" not in self.plan.stages:  # curate reads its own input.paths
            paths = self.plan.recipe.get("curate", {}).get("input", {}).get("paths", [])
            return sorted(f for p in paths for f in (Path(p).parent.glob(Path(p).name)) if f.is_file())
        key = {"sft": "data", "pts": "data", "dpo": "pairs"}.get(stage)  # chat records, queries, pairs
        given = self.plan.recipe.get(stage, {}).get(key) if key else None
        return [Path(given)] if given and Path(given).is_file() else []

    def run(self) -> dict[str, Any]:
        from phiforge.run.stages import STAGES

        self.plan.root.mkdir(parents=True, exist_ok=True)
        (self.plan.root / "recipe.toml").write_text(self.plan.text, encoding="utf-8")
        for stage in self.selected:
            print_ = self.log
            key = self._fingerprint(stage)
            info = self.state["stages"].get(stage, {})
            if stage not in self.forced and info.get("fingerprint") == key and info.get("status") == "done" \
                    and stage != "report":
                print_(f"== {stage}: unchanged, skipped ({key[:12]})")
                continue
            folder = self.ctx.folder(stage)
            resume = info.get("fingerprint") == key and info.get("status") == "running" and stage not in self.forced
            if folder.exists() and not resume:
                shutil.rmtree(folder)  # changed section or inputs: stale artifacts must not leak in
            folder.mkdir(parents=True, exist_ok=True)
            print_(f"== {stage}: {'resuming' if resume else 'running'}")
            self._record(stage, {"status": "running", "fingerprint": key})
            start = time.perf_counter()
            stats = STAGES[stage][0](copy.deepcopy(self.sections[stage]), self.ctx)
            write_json(folder / "stats.json", stats) if stats is not None else None
            self._record(stage, {"status": "done", "fingerprint": key,
                                 "seconds": round(time.perf_counter() - start, 1)})
        return self.state

    def dry_run(self) -> dict[str, Any]:
        """What would run, with every section checked and merged over its defaults; nothing is written."""
        stages = {}
        for stage in self.selected:
            info = self.state["stages"].get(stage, {})
            done = info.get("status") == "done" and info.get("fingerprint") == self._fingerprint(stage)
            section = self.sections[stage]
            stages[stage] = {"action": "skip" if done and stage not in self.forced else "run",
                             "section": config_dict(section) if dataclasses.is_dataclass(section) else section}
        return {"run": str(self.plan.root), "stages": stages}

    def _record(self, stage: str, info: dict[str, Any]) -> None:
        self.state["stages"][stage] = {**self.state["stages"].get(stage, {}), **info}
        write_json(self.state_path, self.state)
