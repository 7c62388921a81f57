"""Answering lm-evaluation-harness requests with a PhiForgeModel: log-likelihoods, rolling windows, generation.

Token handling copies lm-eval's HFLM (``_encode_pair``, the empty-context prefix token, left truncation to
``max_length + 1`` tokens, rolling windows), so every request sees exactly the tokens HFLM would feed.
The forward passes do not: HFLM runs one padded row per request; here all requests that share a context
form a tree (the context once, each continuation branching off it), trees are packed without padding into
rows with a block-diagonal tree mask, and a prefix shared by a whole batch (MMLU's subject header and
shots) runs once and is attended to by every row. Only positions that predict a scored token go
through the final norm, the LM head and the log-softmax.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from phiforge.errors import EvalError
from phiforge.inference.sampling import SamplingParams

Pair = tuple[list[int], list[int]]


class RequestError(EvalError):
    """A request that cannot be scored as given (the message names it)."""


# ---- token-level preparation (HFLM semantics) -----------------------------------------------------------
@dataclass
class _Tree:
    """One context and every continuation scored after it; nodes are in topological order."""

    tokens: list[int]
    parents: list[int]  # index of the parent node, -1 for the root (or for "the batch prefix")
    depth: list[int]  # absolute position of the node
    context_len: int  # the first context_len nodes are the context chain
    targets: list[tuple[int, int, int]] = field(default_factory=list)  # (request, node predicting it, token)

    @property
    def context(self) -> list[int]:
        return self.tokens[: self.context_len]


def _truncate(context: list[int], continuation: list[int], max_length: int) -> tuple[tuple[int, ...], int]:
    """HFLM's left truncation: the model sees (ctx+cont)[-(max_length+1):][:-1]. Returns (context, len(cont))."""
    if not continuation:
        raise RequestError("a continuation tokenized to nothing (it merged into the context at the boundary)")
    if len(continuation) > max_length:
        raise RequestError(f"a continuation of {len(continuation)} tokens exceeds the context of {max_length}")
    if not context:
        raise RequestError("empty context token list (an empty context string must map to the prefix token)")
    whole = (context + continuation)[-(max_length + 1):]
    return tuple(whole[: len(whole) - len(continuation)]), len(continuation)


def build_trees(pairs: Sequence[Pair], max_length: int) -> list[_Tree]:
    """Group requests by (truncated) context; continuations share nodes where their tokens agree."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        key, _ = _truncate(list(ctx), list(cont), max_length)
        groups.setdefault(key, []).append(i)
    trees = []
    for ctx, members in groups.items():
        tree = _Tree(list(ctx), list(range(-1, len(ctx) - 1)), list(range(len(ctx))), len(ctx))
        nodes: dict[tuple[int, ...], int] = {}
        for r in members:
            cont = list(pairs[r][1])
            prev = len(ctx) - 1
            for j, token in enumerate(cont):
                tree.targets.append((r, prev, token))
                if j == len(cont) - 1:
                    break
                key = tuple(cont[: j + 1])
                if key not in nodes:
                    nodes[key] = len(tree.tokens)
                    tree.tokens.append(token)
                    tree.parents.append(prev)
                    tree.depth.append(tree.depth[prev] + 1)
                prev = nodes[key]
        trees.append(tree)
    return trees


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest shared start of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Batch:
    prefix: list[int]  # tokens every tree of the batch starts with, run once
    trees: list[_Tree]


def plan_batches(trees: list[_Tree], batch_tokens: int, min_prefix: int = 16) -> list[_Batch]:
    """Sort trees by context so shared prefixes sit together; cut batches by token budget and prefix drops.

    The budget counts tokens after the batch's shared prefix is cut off, so a batch of MMLU questions
    behind the same header and shots holds many more questions than its raw length suggests.
    """
    batches: list[_Batch] = []
    current: list[_Tree] = []
    total, shared = 0, 0
    for tree in sorted(trees, key=lambda t: t.context):
        if current:
            common = min(shared, common_prefix(current[0].context, tree.context))
            common = common if common >= min_prefix else 0
            over = total + len(tree.tokens) - (len(current) + 1) * common > batch_tokens
            # a batch whose trees share a real prefix (MMLU header + shots) ends where that prefix changes
            prefix_drop = len(current) >= 2 and shared >= min_prefix and common < shared // 2
            if over or prefix_drop:
                batches.append(_finish_batch(current, min_prefix))
                current, total = [], 0
            else:
                shared = common
        if not current:
            shared = tree.context_len - 1
        current.append(tree)
        total += len(tree.tokens)
    if current:
        batches.append(_finish_batch(current, min_prefix))
    return batches


def _finish_batch(trees: list[_Tree], min_prefix: int) -> _Batch:
    """Cut the batch's common context prefix off every tree (keeping each context's last token in the row)."""
    first = trees[0].context
    n = min(t.context_len for t in trees) - 1
    for t in trees[1:]:
        n = min(n, common_prefix(first, t.context))
    if n < min_prefix or len(trees) < 2:
        return _Batch([], trees)
    cut = [_drop_prefix(t, n) for t in trees]
    return _Batch(first[:n], cut)


def _drop_prefix(tree: _Tree, n: int) -> _Tree:
    return _Tree(tree.tokens[n:], [p - n if p >= n else -1 for p in tree.parents[n:]], tree.depth[n:],
                 tree.context_len - n, [(r, node - n, tok) for r, node, tok in tree.targets])


# ---- packed tree forward --------------------------------------------------------------------------------
class _LayerKV:
    """Stands in for phiforge's CacheView: Attention.forward hands it k, v and attends to what it returns."""

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.prefix = prefix
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.kv = (k, v)
        if self.prefix is None:
            return k, v
        pk, pv = self.prefix
        rows = k.shape[0]
        return torch.cat((pk.expand(rows, -1, -1, -1), k), 2), torch.cat((pv.expand(rows, -1, -1, -1), v), 2)


def _run_blocks(model: Any, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                kvs: list[_LayerKV]) -> torch.Tensor:
    x = model.embed_drop(model.embed(ids))
    cos, sin = model.rope(positions, x.dtype)
    for block, kv in zip(model.blocks, kvs):
        x = block(x, cos, sin, mask, kv)
    return x


def _slots(tree: _Tree, prefix_len: int, align: int) -> tuple[list[int], int]:
    """Row slot of each node (relative to the tree's start) and the tree's aligned span.

    A node at absolute position d goes to a slot s with (prefix_len + s - d) % align == 0: its keys then
    fall in the same SIMD lanes and blocks of the attention kernel as in a standalone row, so the sums
    round as they do there (gaps are masked filler). Trees start at multiples of ``align``.
    """
    slots, nxt = [], 0
    for d in tree.depth:
        nxt += (d - prefix_len - nxt) % align
        slots.append(nxt)
        nxt += 1
    return slots, -(-nxt // align) * align


def _pack_rows(spans: list[int], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing of tree spans into rows of at most max(row_tokens, largest span) slots."""
    capacity = max(row_tokens, max(spans))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(spans)), key=lambda i: -spans[i]):
        for r, free in enumerate(room):
            if free >= spans[i]:
                rows[r].append(i)
                room[r] -= spans[i]
                break
        else:
            rows.append([i])
            room.append(capacity - spans[i])
    return rows


def _tree_mask(parents: list[int]) -> np.ndarray:
    """mask[i, j]: node j is node i or one of its ancestors (parents precede children)."""
    n = len(parents)
    mask = np.zeros((n, n), dtype=bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i, : p + 1] = mask[p, : p + 1]
        mask[i, i] = True
    return mask


@dataclass
class _Layout:
    ids: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, 1, T, P + T]
    picks: list[tuple[int, int, int]]  # (request, flat index b*T+t of the predicting node, target token)


def _layout(trees: list[_Tree], prefix_len: int, row_tokens: int, align: int, window: int | None,
            device: torch.device) -> _Layout:
    placed = [_slots(t, prefix_len, align) for t in trees]
    rows = _pack_rows([span for _, span in placed], row_tokens)
    T = max(sum(placed[i][1] for i in row) for row in rows)
    B, P = len(rows), prefix_len
    ids = np.zeros((B, T), dtype=np.int64)
    pos = np.zeros((B, T), dtype=np.int64)
    mask = np.zeros((B, T, P + T), dtype=bool)
    mask[:, np.arange(T), P + np.arange(T)] = True  # filler attends to itself only, so it stays finite
    picks = []
    for b, row in enumerate(rows):
        offset = 0
        for i in row:
            tree, (slots, span) = trees[i], placed[i]
            at = offset + np.asarray(slots)
            ids[b, at] = tree.tokens
            pos[b, at] = tree.depth
            mask[b, at[:, None], P + at[None, :]] = _tree_mask(tree.parents)
            mask[b, at, :P] = True
            picks += [(r, b * T + int(at[node]), tok) for r, node, tok in tree.targets]
            offset += span
    if window is not None:
        key_pos = np.concatenate([np.broadcast_to(np.arange(P), (B, P)), pos], axis=1)
        mask &= (pos[:, :, None] - key_pos[:, None, :]) < window
    as_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return _Layout(as_tensor(ids), as_tensor(pos), as_tensor(mask)[:, None], picks)


def token_logprobs(model: Any, hidden: torch.Tensor, row: torch.Tensor, target: torch.Tensor, chunk: int = 256,
                   rows: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target[i]) in fp32 and whether target[i] is the (first) argmax, predicted by pre-norm hidden[row[i]].

    Each hidden row goes through the head once, however many targets it predicts (a branch point of a
    context tree, or continuations that start alike). The head runs ``chunk`` rows at a time and the
    fp32 log-softmax and argmax ``rows`` at a time, so no [N, V] fp32 tensor is materialised: a slice
    stays in cache.
    """
    order = torch.argsort(row, stable=True)
    sorted_rows = row[order].tolist()
    logp = torch.empty(len(row), dtype=torch.float32, device=hidden.device)
    greedy = torch.empty(len(row), dtype=torch.bool, device=hidden.device)
    for start in range(0, len(hidden), chunk):
        logits = model.logits(model.norm_f(hidden[start: start + chunk]))
        for at in range(start, start + logits.shape[0], rows):
            x = logits[at - start: at - start + rows].float()
            arg = x.max(dim=-1).indices
            # log_softmax itself, not max + log Σ exp: HFLM's kernel, whose fp32 sum rounds differently (1e-5/token)
            x = torch.log_softmax(x, dim=-1)
            picks = order[bisect.bisect_left(sorted_rows, at): bisect.bisect_left(sorted_rows, at + len(x))]
            r, t = row[picks] - at, target[picks]
            logp[picks] = x[r, t]
            greedy[picks] = arg[r] == t
    return logp, greedy


class Scorer:
    """Sums of log-probabilities of continuation tokens, batched as packed context trees."""

    def __init__(self, model: Any, *, max_length: int, batch_tokens: int = 4096, row_tokens: int = 128,
                 min_prefix: int = 16, logits_chunk: int = 256, align: int = 8) -> None:
        self.model = model.eval()
        self.max_length = max_length
        self.batch_tokens = batch_tokens
        self.row_tokens = row_tokens
        self.min_prefix = min_prefix
        self.logits_chunk = logits_chunk
        self.align = align
        self.device = model.embed.weight.device
        self.window = model.config.sliding_window

    @torch.inference_mode()
    def score(self, pairs: Sequence[Pair], progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) per (context tokens, continuation tokens), as HFLM computes them."""
        tokens: list[list[float]] = [[] for _ in pairs]
        greedy = [True] * len(pairs)
        trees = build_trees(pairs, self.max_length)
        for batch in plan_batches(trees, self.batch_tokens, self.min_prefix):
            for r, lp, is_max in self._score_batch(batch):
                tokens[r].append(lp)
                greedy[r] = greedy[r] and is_max
            if progress is not None:
                progress(len({t[0] for tree in batch.trees for t in tree.targets}))
        # HFLM sums each request's token log-probs as one fp32 tensor; so do we (the order of rounding matters
        # at 1e-4 for continuations of hundreds of tokens)
        sums = [float(torch.tensor(t, dtype=torch.float32)[None].sum()) for t in tokens]
        return list(zip(sums, greedy))

    def _score_batch(self, batch: _Batch) -> Iterator[tuple[int, float, bool]]:
        prefix_kv = self._run_prefix(batch.prefix) if batch.prefix else [None] * len(self.model.blocks)
        layout = _layout(batch.trees, len(batch.prefix), self.row_tokens, self.align, self.window, self.device)
        kvs = [_LayerKV(p) for p in prefix_kv]
        hidden = _run_blocks(self.model, layout.ids, layout.positions, layout.mask, kvs)
        index = torch.tensor([p[1] for p in layout.picks], device=self.device)
        target = torch.tensor([p[2] for p in layout.picks], device=self.device)
        nodes, row = torch.unique(index, return_inverse=True)
        logp, is_max = token_logprobs(self.model, hidden.reshape(-1, hidden.shape[-1])[nodes], row, target,
                                      self.logits_chunk)
        for (r, _, _), lp, m in zip(layout.picks, logp.tolist(), is_max.tolist()):
            yield r, lp, m

    def _run_prefix(self, prefix: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ids = torch.tensor([prefix], device=self.device)
        positions = torch.arange(len(prefix), device=self.device)[None]
        kvs = [_LayerKV() for _ in self.model.blocks]
        _run_blocks(self.model, ids, positions, self.model.attention_mask(positions, len(prefix)), kvs)
        return [kv.kv for kv in kvs]


# ---- string-level requests (the lm-eval LM interface) ----------------------------------------------------
def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[Pair]:
    """lm-eval's disjoint rolling windows (context_len=1): every token is predicted exactly once."""
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_token] + tokens[: first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        size = min(len(tokens) - done, max_length)
        end = done + size
        windows.append((tokens[end - max_length - 1: end - 1], tokens[end - size: end]))
        done += size
    return [(ctx[: len(ctx) - (len(cont) - 1)], cont) for ctx, cont in windows]


def normalize_gen_kwargs(gen_kwargs: dict[str, Any], default_max: int = 256) -> SamplingParams:
    """lm-eval's reading of generation kwargs: until (stop strings), max_gen_toks (or aliases), greedy unless
    do_sample, seed; other kwargs are ignored, as HFLM does."""
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_gen = default_max
    for alias in ("max_completion_tokens", "max_tokens", "max_new_tokens", "max_gen_toks"):
        if kwargs.get(alias) is not None:
            max_gen = int(kwargs[alias])
        kwargs.pop(alias, None)
    do_sample = kwargs.pop("do_sample", None)
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    if do_sample is False:
        temperature = 0.0
    return SamplingParams(max_new_tokens=max_gen, temperature=temperature, stop_strings=tuple(until),
                          seed=kwargs.get("seed"))


class LanguageModel:
    """A phiforge model answering lm-eval's three request types on strings, with HFLM's token handling."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int | None = None, batch_tokens: int = 4096,
                 row_tokens: int = 128, gen_batch_size: int = 16, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, show_progress: bool = False) -> None:
        self.model = model.eval()
        from phiforge.inference import fast_paths
        from phiforge.model.transformer import PhiForgeModel

        if isinstance(model, PhiForgeModel):
            fast_paths.install(model)  # bf16 scoring ~1.15x faster on the CPU (small models; bitwise F.linear)
        self.tokenizer = tokenizer
        self.max_length = max_length or model.config.max_position_embeddings
        self.scorer = Scorer(model, max_length=self.max_length, batch_tokens=batch_tokens, row_tokens=row_tokens)
        self.gen_batch_size = gen_batch_size
        self.max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token
        self.show_progress = show_progress

    # -- tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """HFLM.tok_encode: the tokenizer's own default unless told, and never a second BOS."""
        if add_special_tokens is None:
            add_special_tokens = True if self.add_bos_token is None else self.add_bos_token
            if text.startswith(self.tokenizer.decode([self.prefix_token_id])):
                add_special_tokens = False
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_pair(self, context: str, continuation: str) -> Pair:
        """lm-eval's _encode_pair, plus its empty-context rule (the prefix token stands in for the context)."""
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    # -- requests
    def loglikelihood(self, requests: Sequence[tuple[str, str]],
                      desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        pairs = []
        for i, (ctx, cont) in enumerate(requests):
            pair = self.encode_pair(ctx, cont)
            if not pair[1]:
                raise RequestError(f"request {i}: continuation {cont!r} tokenizes to nothing after context "
                                   f"{ctx[-40:]!r} (it merges into the context's last token)")
            pairs.append(pair)
        return self.loglikelihood_tokens(pairs, desc=desc)

    def loglikelihood_tokens(self, pairs: Sequence[Pair], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        with self._progress(len(pairs), desc, "req") as update:
            return self.scorer.score(pairs, update)

    def loglikelihood_rolling(self, texts: Sequence[str], desc: str = "rolling") -> list[float]:
        windows, owner = [], []
        for i, text in enumerate(texts):
            for pair in rolling_windows(self.tok_encode(text), self.prefix_token_id, self.max_length):
                windows.append(pair)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (lp, _) in zip(owner, self.loglikelihood_tokens(windows, desc=desc)):
            totals[i] += lp
        return totals

    def sentence_logprob(self, texts: Sequence[str], desc: str = "sentences") -> list[tuple[float, int]]:
        """(Σ log p, tokens predicted) of each text given its own first token, as a causal LM's loss sees it."""
        windows, owner = [], []
        for i, text in enumerate(texts):
            tokens = self.tok_encode(text)
            for pair in rolling_windows(tokens[1:], tokens[0], self.max_length) if len(tokens) > 1 else []:
                windows.append(pair)
                owner.append(i)
        totals = [(0.0, 0)] * len(texts)
        for i, (lp, _), (_, cont) in zip(owner, self.loglikelihood_tokens(windows, desc=desc), windows):
            totals[i] = (totals[i][0] + lp, totals[i][1] + len(cont))
        return totals

    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]], desc: str = "generate") -> list[str]:
        """Greedy (or sampled) continuations through phiforge's Engine, cut at lm-eval's stop strings."""
        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, (_, kwargs) in enumerate(requests):
            groups.setdefault(repr(sorted(kwargs.items())), []).append(i)
        for members in groups.values():
            settings = normalize_gen_kwargs(requests[members[0]][1], self.max_gen_toks)
            texts = self._generate([requests[i][0] for i in members], settings, desc)
            for i, text in zip(members, texts):
                out[i] = text
        return out

    def _generate(self, contexts: list[str], settings: SamplingParams, desc: str) -> list[str]:
        from phiforge.inference.engine import Engine

        eos = self.tokenizer.decode([self.eot_token_id])
        until = [*settings.stop_strings, *([eos] if eos not in settings.stop_strings else [])]
        room = self.max_length - settings.max_new_tokens
        if room <= 0:
            raise RequestError(f"max_gen_toks {settings.max_new_tokens} leaves no room in a context of "
                               f"{self.max_length}")
        prompts = [self.tok_encode(c)[-room:] for c in contexts]
        params = settings.replace(stop_strings=tuple(u for u in until if u),
                                  stop_token_ids=tuple(self.tokenizer.stop_token_ids))
        engine = Engine(self.model, self.tokenizer, max_batch_size=self.gen_batch_size,
                        max_seq_len=self.max_length)
        with self._progress(None, desc, "tok") as update:
            completions = engine.generate(prompts, params, on_token=lambda i, t: update(1))
        return [cut_at_stops(self.tokenizer.decode(c.token_ids, skip_special_tokens=True), until) for c in completions]

    @contextlib.contextmanager
    def _progress(self, total: int | None, desc: str, unit: str) -> Iterator[Callable[[int], None]]:
        if not self.show_progress:
            yield lambda n: None
            return
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True) as bar:
            yield bar.update


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """lm-eval's post-processing: keep the text before every stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
