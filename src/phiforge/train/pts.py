"""Pivotal Token Search (phi-4 report §4.3): single tokens that sharply change p(success), as DPO pairs.

    phiforge pts RECIPE [section.key=value ...]         e.g. phiforge pts pts model.path=runs/sft/final

For a query Q with an oracle (GSM8K answer check, unit tests in the sandbox, exact match, or any
``module:function``), p(success | prefix) is the share of completions sampled from Q + prefix that the
oracle accepts. Estimates are adaptive: samples are drawn in rounds until the Wilson interval is narrow
enough (or a cap is reached). A sampled solution is split recursively at the midpoint of its
cumulative log-probability wherever p changes by at least ``p_gap`` across a segment; a one-token
segment that still does is a pivotal token. Every p-estimate of one recursion level, over all the
solutions of a group of queries, goes to the inference engine as one batch, and a request copies the
key/value cache of the longest prefix that another row already holds (``PrefixCachingEngine``), so a
prefix shared by its samples (and by the nested prefixes of one solution) is computed once.

Each pivot becomes a DPO pair in token-id space: prompt_ids = Q + prefix, chosen_ids / rejected_ids one
token each (the pivot, and the contrasting alternative with the largest measured p difference), which
``phiforge dpo`` scores exactly, with no EOS and no re-tokenization. Results are appended per query to
out_dir/results.jsonl (a rerun skips finished queries); out_dir/pairs.jsonl is rewritten from them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch

from phiforge.config.loader import config_dict, load_config
from phiforge.eval.scoring import common_prefix
from phiforge.inference.engine import Engine
from phiforge.inference.sampling import SamplingParams, sampling_section
from phiforge.model.transformer import KVCache
from phiforge.train.arithmetic import ARITHMETIC, arithmetic_questions, parse_arithmetic
from phiforge.train.config import RECIPES_DIR, TrainConfigError


# ---- config ---------------------------------------------------------------------------------------------
@dataclass
class ModelPart:
    path: str = ""  # model folder, .gguf file or embedded alias
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = ""  # "" = cuda when available
    max_batch_size: int = 64  # rows of the engine's KV cache


@dataclass
class DataPart:
    path: str = ""  # queries: .jsonl(.gz), .json or .parquet, or arithmetic:N (generated word problems)
    oracle: str = "gsm8k"  # gsm8k | code | exact | module:function
    prompt_format: str = "{question}"  # str.format over the record's fields
    chat: str = "auto"  # auto (the chat template when the tokenizer has one) | true | false
    id_field: str = "id"
    limit: int = 0  # first N queries only; 0 = all


# the [sampling] keys a PTS recipe may set, and PTS's defaults for them
PTS_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "stop_strings")
PTS_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 256}


@dataclass
class SearchPart:
    p_gap: float = 0.2  # |delta p| that makes a token pivotal
    min_prob: float = 0.2  # queries with p(success) outside [min_prob, max_prob] are skipped
    max_prob: float = 0.8
    solutions_per_query: int = 2
    min_samples: int = 8  # per p-estimate
    max_samples: int = 32
    round_samples: int = 8  # more samples per round while the interval is too wide
    ci_half_width: float = 0.15  # stop sampling a prefix once its Wilson interval is this narrow
    confidence: float = 0.95
    max_alternatives: int = 4  # tokens tried as the other side of a pair
    queries_per_batch: int = 4  # queries searched together (their estimates share engine batches)


@dataclass
class RunPart:
    out_dir: str = "runs/pts"
    seed: int = 0
    progress: bool = True


@dataclass
class PTSConfig:
    model: ModelPart = field(default_factory=ModelPart)
    data: DataPart = field(default_factory=DataPart)
    sampling: SamplingParams = sampling_section(PTS_SAMPLING_KEYS, **PTS_SAMPLING)
    search: SearchPart = field(default_factory=SearchPart)
    run: RunPart = field(default_factory=RunPart)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] | None = None) -> PTSConfig:
        return load_config(cls, path, overrides, recipes=RECIPES_DIR, error=TrainConfigError)

    def validate(self) -> None:
        s = self.search
        checks = [(bool(self.model.path), "model.path: give the model to search with"),
                  (bool(self.data.path), "data.path: give the queries"),
                  (0 < s.p_gap < 1, f"search.p_gap must be in (0, 1), got {s.p_gap}"),
                  (0 <= s.min_prob <= s.max_prob <= 1, "search: need 0 <= min_prob <= max_prob <= 1"),
                  (1 <= s.min_samples <= s.max_samples, "search: need 1 <= min_samples <= max_samples"),
                  (s.round_samples >= 1, "search.round_samples must be >= 1"),
                  (s.solutions_per_query >= 1, "search.solutions_per_query must be >= 1"),
                  (0 < s.confidence < 1, "search.confidence must be in (0, 1)"),
                  (self.data.chat in ("auto", "true", "false"), "data.chat: expected auto, true or false")]
        for ok, message in checks:
            if not ok:
                raise TrainConfigError(message)


# ---- oracles ----------------------------------------------------------------------------------------------
Oracle = Callable[[dict[str, Any], list[str], list[list[int]]], list[bool]]


def gsm8k_oracle(record: dict[str, Any], texts: list[str], ids: list[list[int]]) -> list[bool]:
    """The final answer (``#### n`` if present, else the last number) equals the record's answer."""
    from phiforge.eval.tasks.gsm8k import FLEXIBLE, IGNORE, STRICT, normalize, regex_extract

    reference = normalize(str(record["answer"]), IGNORE, ignore_case=True).strip()
    if not re.fullmatch(r"-?[0-9.]+", reference):
        raise ValueError(f"answer {record['answer']!r} has no numeric final answer")
    out = []
    for text in texts:
        answer = regex_extract(text, STRICT)
        if answer == "[invalid]":
            answer = regex_extract(text, FLEXIBLE, -1)
        out.append(_same_number(normalize(answer, IGNORE, ignore_case=True), reference))
    return out


def _same_number(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return a == b


def exact_oracle(record: dict[str, Any], texts: list[str], ids: list[list[int]]) -> list[bool]:
    """The first line of the answer equals one of the record's answers (case and punctuation ignored)."""
    from phiforge.eval.tasks.gsm8k import exact_match

    golds = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
    firsts = [(t.strip().splitlines() or [""])[0].strip() for t in texts]
    return [any(exact_match(f, str(g), ignore_case=True, ignore_punctuation=True) for g in golds) for f in firsts]


def code_oracle(record: dict[str, Any], texts: list[str], ids: list[list[int]]) -> list[bool]:
    """The solution's code, then the record's tests (a list of asserts or one string), passes in the sandbox."""
    from phiforge.eval.sandbox import Program, run_programs

    tests = record["tests"]
    tests = "\n".join(tests) if isinstance(tests, list) else str(tests)
    programs = [Program(_code_of(t) + "\n", tests) for t in texts]
    return [r.passed for r in run_programs(programs)]


def _code_of(text: str) -> str:
    fenced = re.findall(r"```(?:python|py)?\n(.*?)(?:```|$)", text, flags=re.S)
    return fenced[0] if fenced else text


ORACLES: dict[str, Oracle] = {"gsm8k": gsm8k_oracle, "exact": exact_oracle, "code": code_oracle}


def load_oracle(name: str) -> Oracle:
    if name in ORACLES:
        return ORACLES[name]
    module, sep, attr = name.partition(":")
    if not sep:
        raise TrainConfigError(f"data.oracle {name!r}: expected {', '.join(ORACLES)} or module:function")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise TrainConfigError(f"data.oracle {name!r}: cannot import it ({err})") from None


# ---- estimates ------------------------------------------------------------------------------------------------
def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


@dataclass
class Estimate:
    successes: int = 0
    n: int = 0
    first_tokens: Counter = field(default_factory=Counter)  # first sampled token -> samples
    first_successes: Counter = field(default_factory=Counter)
    solutions: list[tuple[list[int], bool]] = field(default_factory=list)  # kept for the query itself

    @property
    def p(self) -> float:
        return self.successes / self.n if self.n else float("nan")

    def interval(self, confidence: float) -> tuple[float, float]:
        return wilson(self.successes, self.n, confidence)


class PrefixCachingEngine(Engine):
    """An Engine whose prefill copies the longest prefix another live row already holds in the KV cache.

    Rows keep the keys/values of their prompt until they are refilled (decoding writes only beyond
    it); idle rows inside a decode span get a dummy token at position 0, so they are forgotten first.
    Only the unshared tail of a prompt is computed, at its true positions.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cache: KVCache | None = None
        self._held: dict[int, tuple[list[int], torch.Tensor]] = {}  # row -> (prompt, its last logits)
        self.prefill_tokens = self.reused_tokens = 0

    def _prefill(self, rows: list[int], prompts: list[list[int]], cache: KVCache) -> torch.Tensor:
        # row by row: a row admitted together with its twins copies what the first of them computed
        return torch.stack([self._prefill_row(tokens, cache, row) for row, tokens in zip(rows, prompts)])

    def _prefill_row(self, tokens: list[int], cache: KVCache, row: int) -> torch.Tensor:
        if cache is not self._cache:
            self._cache, self._held = cache, {}
        self._held.pop(row, None)
        best_row, best = None, 0
        for r, (held, _) in self._held.items():
            n = common_prefix(held, tokens)
            if n > best:
                best_row, best = r, n
        if best_row is None or self.longrope_switch:
            logits = super()._prefill([row], [tokens], cache)[0]
            self.prefill_tokens += len(tokens)
        else:
            for layer in range(len(cache.k)):
                cache.k[layer][row, :, :best] = cache.k[layer][best_row, :, :best]
                cache.v[layer][row, :, :best] = cache.v[layer][best_row, :, :best]
            self.reused_tokens += best
            if best == len(tokens) == len(self._held[best_row][0]):  # the same prompt: nothing to compute
                logits = self._held[best_row][1]
            else:
                reuse = min(best, len(tokens) - 1)  # the last token is computed: its logits are needed
                ids = torch.tensor([tokens[reuse:]], device=self.device)
                pos = torch.arange(reuse, len(tokens), device=self.device)
                hidden = self.model(ids, pos, cache=cache, cache_rows=slice(row, row + 1), return_hidden=True)
                logits = self.model.logits(hidden[0, -1])
                self.prefill_tokens += len(tokens) - reuse
                self.reused_tokens -= best - reuse
        self._held[row] = (list(tokens), logits)
        return logits

    def _decode_step(self, live: list[Any], cache: KVCache) -> dict[int, int]:
        for r, state in enumerate(live):
            if state is None:
                self._held.pop(r, None)
        return super()._decode_step(live, cache)


@dataclass
class Query:
    id: str
    record: dict[str, Any]
    prompt: list[int]


class Estimator:
    """p(success | query + prefix) for many (query, prefix) keys at once, sampled through the engine."""

    def __init__(self, engine: Engine, oracle: Oracle, sampling: SamplingParams, search: SearchPart,
                 stop_ids: Sequence[int], seed: int) -> None:
        self.engine, self.oracle, self.search, self.seed = engine, oracle, search, seed
        self.sampling = sampling
        self.stop_ids = tuple(stop_ids)
        self.cache: dict[tuple[str, tuple[int, ...]], Estimate] = {}
        self.failed: dict[str, str] = {}  # query id -> oracle error
        self.samples = 0

    def get(self, query: Query, prefix: Sequence[int]) -> Estimate:
        return self.cache[(query.id, tuple(prefix))]

    def _settled(self, est: Estimate) -> bool:
        s = self.search
        if est.n < s.min_samples:
            return False
        lo, hi = est.interval(s.confidence)
        return est.n >= s.max_samples or (hi - lo) / 2 <= s.ci_half_width

    def estimate(self, wanted: Sequence[tuple[Query, Sequence[int]]], keep_solutions: bool = False) -> None:
        """Sample in rounds until every wanted estimate is settled; all open prefixes share each round."""
        keys = {}
        for query, prefix in wanted:
            if query.id not in self.failed:
                keys[(query.id, tuple(prefix))] = query
                self.cache.setdefault((query.id, tuple(prefix)), Estimate())
        while True:
            open_keys = [k for k in keys if k[0] not in self.failed and not self._settled(self.cache[k])]
            if not open_keys:
                return
            requests = []
            for key in open_keys:
                est, step = self.cache[key], self.search.round_samples
                step = max(min(step, self.search.max_samples - est.n), self.search.min_samples - est.n)
                requests += [(key, est.n + i) for i in range(step)]
            self._sample(requests, keys, keep_solutions)

    def _sample(self, requests: list[tuple[tuple[str, tuple[int, ...]], int]], queries: dict[Any, Query],
                keep_solutions: bool) -> None:
        prompts, params = [], []
        sp = self.sampling
        for (qid, prefix), index in requests:
            query = queries[(qid, prefix)]
            prompts.append(query.prompt + list(prefix))
            room = self.engine.max_seq_len - len(prompts[-1])
            params.append(sp.replace(max_new_tokens=max(1, min(sp.max_new_tokens - len(prefix), room)),
                                     seed=_seed(self.seed, qid, prefix, index), stop_token_ids=self.stop_ids))
        completions = self.engine.generate(prompts, params)
        self.samples += len(completions)
        by_query: dict[str, list[int]] = {}
        for i, ((qid, _), _) in enumerate(requests):
            by_query.setdefault(qid, []).append(i)
        tok = self.engine.tokenizer
        for qid, members in by_query.items():
            query = queries[requests[members[0]][0]]
            solutions = []
            for i in members:
                ids = completions[i].token_ids
                if ids and ids[-1] in self.stop_ids:
                    ids = ids[:-1]
                solutions.append(list(requests[i][0][1]) + ids)
            texts = [_cut(tok.decode(s, skip_special_tokens=True), sp.stop_strings) for s in solutions]
            try:
                verdicts = [bool(v) for v in self.oracle(query.record, texts, solutions)]
                if len(verdicts) != len(texts):
                    raise ValueError(f"returned {len(verdicts)} verdicts for {len(texts)} solutions")
            except Exception as err:  # a broken oracle or record: skip this query, keep its reason
                self.failed[qid] = f"oracle raised {type(err).__name__}: {err}"
                continue
            for i, ok in zip(members, verdicts):
                key = requests[i][0]
                est = self.cache[key]
                est.n += 1
                est.successes += ok
                first = completions[i].token_ids[:1]
                if first:
                    est.first_tokens[first[0]] += 1
                    est.first_successes[first[0]] += ok
                if keep_solutions:
                    est.solutions.append((solutions[members.index(i)][len(key[1]):], ok))


def _seed(seed: int, qid: str, prefix: tuple[int, ...], index: int) -> int:
    """A sample's seed depends only on what it samples: results do not depend on batching."""
    digest = hashlib.blake2b(f"{seed}|{qid}|{len(prefix)}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**62 - 1)


def _cut(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


# ---- the search ------------------------------------------------------------------------------------------------
@dataclass
class Solution:
    query: Query
    number: int
    ids: list[int]
    success: bool
    logps: list[float] = field(default_factory=list)  # of each token given everything before it
    top: list[list[int]] = field(default_factory=list)  # most likely tokens at each position

    def p_at(self, est: Estimator, k: int) -> float:
        """p(success | first k tokens); the whole solution is judged once, no sampling needed."""
        return float(self.success) if k == len(self.ids) else est.get(self.query, self.ids[:k]).p


@torch.no_grad()
def score_solutions(model: Any, solutions: list[Solution], top_k: int = 5) -> None:
    """Per-token log-probs and top alternatives of each solution (one forward each)."""
    for s in solutions:
        ids = torch.tensor([s.query.prompt + s.ids], device=model.embed.weight.device)
        logits = model(ids).float()[0, len(s.query.prompt) - 1 : -1]
        logp = torch.log_softmax(logits, dim=-1)
        s.logps = logp.gather(1, ids[0, len(s.query.prompt):, None])[:, 0].tolist()
        s.top = logp.topk(top_k, dim=-1).indices.tolist()


def split_point(s: Solution, start: int, end: int) -> int:
    """The index in (start, end) where the cumulative negative log-prob of the segment passes half."""
    costs = [-lp for lp in s.logps[start:end]]
    half, run = sum(costs) / 2, 0.0
    for k, c in enumerate(costs):
        run += c
        if run >= half:
            return min(max(start + k + 1, start + 1), end - 1)
    return (start + end) // 2


@dataclass
class Pivot:
    solution: Solution
    position: int
    p_before: float
    p_after: float

    @property
    def delta(self) -> float:
        return self.p_after - self.p_before


def find_pivots(est: Estimator, solutions: list[Solution], gap: float) -> list[Pivot]:
    """Recursive subdivision, one level at a time: each level's new estimates go to the engine together."""
    frontier = [(s, 0, len(s.ids)) for s in solutions if s.ids]
    pivots = []
    while frontier:
        est.estimate([(s.query, s.ids[:k]) for s, a, b in frontier for k in (a, b) if k < len(s.ids)])
        nxt = []
        for s, a, b in frontier:
            if s.query.id in est.failed:
                continue
            pa, pb = s.p_at(est, a), s.p_at(est, b)
            if abs(pb - pa) < gap:
                continue
            if b - a == 1:
                pivots.append(Pivot(s, a, pa, pb))
            else:
                mid = split_point(s, a, b)
                nxt += [(s, a, mid), (s, mid, b)]
        frontier = nxt
    return pivots


def make_pairs(est: Estimator, pivots: list[Pivot], gap: float, max_alternatives: int) -> list[dict[str, Any]]:
    """For each pivot, the alternative token at its position whose p contrasts most (>= gap) with it."""
    candidates = {}
    for pv in pivots:
        s, j = pv.solution, pv.position
        token = s.ids[j]
        prefix_est = est.get(s.query, s.ids[:j])
        seen = [t for t, _ in prefix_est.first_tokens.most_common() if t != token]
        seen += [t for t in s.top[j] if t != token and t not in seen]
        candidates[id(pv)] = seen[:max_alternatives]
    est.estimate([(pv.solution.query, pv.solution.ids[: pv.position] + [t])
                  for pv in pivots for t in candidates[id(pv)]])
    pairs = []
    for pv in pivots:
        s, j = pv.solution, pv.position
        if s.query.id in est.failed:
            continue
        scored = [(est.get(s.query, s.ids[:j] + [t]).p, t) for t in candidates[id(pv)]]
        if pv.delta > 0:  # the pivot helps: chosen = pivot, rejected = the alternative that hurts most
            p_other, other = min(scored, default=(1.0, None))
            ok = other is not None and pv.p_after - p_other >= gap
            chosen, rejected, p_chosen, p_rejected = s.ids[j], other, pv.p_after, p_other
        else:
            p_other, other = max(scored, default=(0.0, None))
            ok = other is not None and p_other - pv.p_after >= gap
            chosen, rejected, p_chosen, p_rejected = other, s.ids[j], p_other, pv.p_after
        if ok:
            pairs.append(_pair_record(est, pv, chosen, rejected, p_chosen, p_rejected))
    return pairs


def _pair_record(est: Estimator, pv: Pivot, chosen: int, rejected: int, p_chosen: float,
                 p_rejected: float) -> dict[str, Any]:
    s, j, tok = pv.solution, pv.position, est.engine.tokenizer
    prefix = est.get(s.query, s.ids[:j])
    return {"id": f"{s.query.id}/s{s.number}/t{j}", "query_id": s.query.id,
            "prompt_ids": s.query.prompt + s.ids[:j], "chosen_ids": [chosen], "rejected_ids": [rejected],
            "chosen_token": tok.decode([chosen]), "rejected_token": tok.decode([rejected]),
            "prefix_text": tok.decode(s.ids[:j]), "position": j, "pivot_token": s.ids[j],
            "p_prefix": prefix.p, "p_prefix_interval": prefix.interval(est.search.confidence),
            "p_prefix_samples": prefix.n, "p_chosen": p_chosen, "p_rejected": p_rejected, "delta": pv.delta}


def search_queries(est: Estimator, model: Any, queries: list[Query]) -> list[dict[str, Any]]:
    """PTS over a group of queries; one result per query: status, p, pivots and pairs."""
    s = est.search
    est.estimate([(q, []) for q in queries], keep_solutions=True)
    results, solutions = {}, []
    for q in queries:
        if q.id in est.failed:
            results[q.id] = {"id": q.id, "status": "oracle_error", "reason": est.failed[q.id]}
            continue
        root = est.get(q, [])
        info = {"id": q.id, "p": root.p, "p_interval": root.interval(s.confidence), "samples": root.n}
        if not s.min_prob <= root.p <= s.max_prob:
            results[q.id] = {**info, "status": "too_easy" if root.p > s.max_prob else "too_hard", "pairs": []}
            continue
        results[q.id] = {**info, "status": "searched", "pairs": [], "pivots": 0}
        for n, (ids, ok) in enumerate(root.solutions[: s.solutions_per_query]):
            solutions.append(Solution(q, n, ids, ok))
    score_solutions(model, solutions)
    pivots = find_pivots(est, solutions, s.p_gap)
    for pair in make_pairs(est, pivots, s.p_gap, s.max_alternatives):
        results[pair["query_id"]]["pairs"].append(pair)
    for pv in pivots:
        results[pv.solution.query.id]["pivots"] += 1
    for q in queries:  # an oracle may fail during the subdivision too
        if q.id in est.failed and results[q.id]["status"] == "searched":
            results[q.id] = {"id": q.id, "status": "oracle_error", "reason": est.failed[q.id]}
    return [results[q.id] for q in queries]


def _read_queries(path: str) -> tuple[Path, list[dict[str, Any]]]:
    from phiforge.eval.tasks.data import TaskDataError, read_records

    if path.startswith(ARITHMETIC):
        return Path(path), arithmetic_questions(*parse_arithmetic(path))
    try:
        return Path(path), read_records("pts", Path(path))
    except TaskDataError as err:
        raise TrainConfigError(str(err).replace("task pts: ", "")) from None


# ---- the run --------------------------------------------------------------------------------------------------
def build_queries(config: PTSConfig, tokenizer: Any) -> tuple[list[Query], list[dict[str, str]]]:
    from phiforge.train.sft import record_id

    d = config.data
    file, records = _read_queries(d.path)
    if d.limit:
        records = records[: d.limit]
    chat = d.chat == "true" or (d.chat == "auto" and bool(tokenizer.chat_template))
    queries, skipped, seen = [], [], set()
    for record in records:
        rid = record_id(record, file, d.id_field)
        try:
            text = d.prompt_format.format(**record)
        except (KeyError, IndexError, ValueError) as err:
            skipped.append({"id": rid, "reason": f"data.prompt_format {d.prompt_format!r}: {err!r}"})
            continue
        if rid in seen:
            raise TrainConfigError(f"{file}: query id {rid!r} appears twice; ids must be unique")
        seen.add(rid)
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=not chat)
        queries.append(Query(rid, {k: v for k, v in record.items() if k != "__line__"}, ids))
    return queries, skipped


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _finished(path: Path) -> dict[str, dict[str, Any]]:
    """Completed query results; a torn last line (killed mid-write) is dropped from the file."""
    if not path.is_file():
        return {}
    done, good = {}, 0
    raw = path.read_bytes()
    for line in raw.splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if not line.endswith(b"\n"):
            break
        done[record["id"]] = record
        good += len(line)
    if good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def pts(config: PTSConfig, model: Any = None, tokenizer: Any = None, oracle: Oracle | None = None) -> dict[str, Any]:
    """Search every query (resuming a killed run); returns the summary (also out_dir/summary.json)."""
    from tqdm.auto import tqdm

    from phiforge.io.atomic import atomic_write_bytes
    from phiforge.io.checkpoint import write_json
    from phiforge.io.load import load_pretrained

    config.validate()
    oracle = oracle or load_oracle(config.data.oracle)
    if model is None:
        m = config.model
        model, tokenizer = load_pretrained(m.path, dtype=None if m.dtype == "auto" else m.dtype,
                                           device=m.device or None)
        if tokenizer is None:
            raise TrainConfigError(f"model.path {m.path}: no tokenizer beside the weights")
    queries, skipped = build_queries(config, tokenizer)
    out = Path(config.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    done = _finished(results_file)
    engine = PrefixCachingEngine(model, tokenizer, max_batch_size=config.model.max_batch_size)
    est = Estimator(engine, oracle, config.sampling, config.search, tokenizer.stop_token_ids, config.run.seed)
    todo = [q for q in queries if q.id not in done]
    group = config.search.queries_per_batch
    start = time.perf_counter()
    bar = tqdm(total=len(queries), initial=len(queries) - len(todo), desc="pts", unit="query",
               disable=not config.run.progress)
    for g in range(0, len(todo), group):
        for result in search_queries(est, model, todo[g : g + group]):
            _append_line(results_file, result)
            done[result["id"]] = result
        seconds = time.perf_counter() - start
        bar.update(len(todo[g : g + group]))
        bar.set_postfix(pairs=sum(len(r.get("pairs", [])) for r in done.values()),
                        est_s=f"{len(est.cache) / seconds:.2f}")
    bar.close()
    seconds = time.perf_counter() - start
    ordered = [done[q.id] for q in queries if q.id in done]
    pairs = [p for r in ordered for p in r.get("pairs", [])]
    atomic_write_bytes(out / "pairs.jsonl", "".join(json.dumps(p) + "\n" for p in pairs).encode())
    status = Counter(r["status"] for r in ordered)
    summary = {"out_dir": str(out), "queries": len(queries), "status": dict(status), "pairs": len(pairs),
               "pivots": sum(r.get("pivots", 0) for r in ordered), "skipped_records": skipped,
               "oracle_errors": [{"id": r["id"], "reason": r["reason"]} for r in ordered
                                 if r["status"] == "oracle_error"],
               "estimates": len(est.cache), "samples": est.samples, "seconds": seconds,
               "estimates_per_s": len(est.cache) / seconds if seconds else 0.0,
               "prefill_tokens": engine.prefill_tokens, "reused_prefix_tokens": engine.reused_tokens,
               "pairs_file": str(out / "pairs.jsonl"), "config": config_dict(config)}
    write_json(out / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    from phiforge.train.sft import run_cli

    return run_cli("pts", PTSConfig, pts, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
