"""Weighted mixtures of token sources, sampled as fixed-length sequences, deterministically and resumably.

Each source is its shards read as one token stream, cut into windows of ``seq_len + 1`` tokens (input plus
the next-token target) that start every ``seq_len`` tokens. Sampling has two parts:

* which source feeds global sample ``i``: the source furthest behind its share, i.e. the largest
  ``weight * (i + 1) - taken``. Every prefix of the stream then matches the weights to within one
  sequence, and the state is just the per-source counts.
* which window: source ``s`` walks a permutation of its windows seeded by (seed, source name, epoch),
  starting a fresh permutation when it runs out; the epoch count is how many times it was repeated.
  Sources of more than ``BLOCK_WINDOWS`` windows shuffle blocks, then windows inside each block.

A global batch is the next ``B`` samples; rank ``r`` of ``W`` reads the contiguous slice ``r*B/W ...``.
The state (samples taken, per source) goes into checkpoints, so a resumed run reads the same batches.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phiforge.data.packing import PackingError, TokenShard, load_shards
from phiforge.errors import DataError

BLOCK_WINDOWS = 1 << 20  # shuffle unit of very large sources (4B tokens at seq_len 4096)


class MixtureError(DataError):
    """A mixture that cannot be sampled; the message names the source and what is wrong."""


@dataclass
class SourceConfig:
    name: str
    path: str  # token folder (with index.json) or a single shard
    weight: float = 1.0


class TokenSource:
    """One source's shards as a single token stream, split into train windows and held-out windows."""

    def __init__(self, name: str, shards: list[TokenShard], seq_len: int, holdout: float = 0.0) -> None:
        self.name, self.shards, self.seq_len = name, shards, seq_len
        sizes = [s.num_tokens for s in shards]
        self.starts = np.cumsum([0, *sizes])  # token offset of each shard in the stream
        self.total_tokens = int(self.starts[-1])
        windows = (self.total_tokens - 1) // seq_len
        self.num_val = math.ceil(windows * holdout) if holdout > 0 else 0
        self.num_train = windows - self.num_val
        if self.num_train < 1:
            raise MixtureError(f"source {name!r}: {self.total_tokens} tokens make {windows} sequences of "
                               f"{seq_len}+1 tokens, {self.num_val} held out for validation; nothing left to train")
        self._arrays: list[np.memmap] | None = None

    def window(self, k: int) -> np.ndarray:
        """Tokens [k*seq_len, k*seq_len + seq_len + 1) of the stream, across shard boundaries."""
        if self._arrays is None:
            self._arrays = [s.tokens() for s in self.shards]
        start, end = k * self.seq_len, k * self.seq_len + self.seq_len + 1
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts, shard = [], first
        while start < end:
            lo = start - int(self.starts[shard])
            take = min(end - start, self.shards[shard].num_tokens - lo)
            parts.append(self._arrays[shard][lo : lo + take])
            start += take
            shard += 1
        return np.concatenate(parts).astype(np.int64)

    def val_windows(self) -> range:
        return range(self.num_train, self.num_train + self.num_val)


def open_source(config: SourceConfig, seq_len: int, holdout: float = 0.0) -> TokenSource:
    try:
        shards = load_shards(config.path)
    except PackingError as err:
        raise MixtureError(f"source {config.name!r}: {err}") from None
    return TokenSource(config.name, shards, seq_len, holdout)


def check_sources(configs: list[SourceConfig], role: str = "data.sources") -> None:
    """Names unique, weights positive: checked before any shard is opened."""
    if not configs:
        raise MixtureError(f"{role}: no sources; give at least one [[{role}]] with name, path and weight")
    names = [c.name for c in configs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MixtureError(f"{role}: source names must be unique; repeated: {dupes}")
    for c in configs:
        if not (isinstance(c.weight, (int, float)) and c.weight > 0 and math.isfinite(c.weight)):
            raise MixtureError(f"{role}: source {c.name!r} has weight {c.weight!r}; weights must be > 0 "
                               "(drop the source to leave it out)")


def check_compatible(sources: list[TokenSource], vocab_size: int | None = None) -> None:
    """One tokenizer across all sources, and token ids the model can embed."""
    fingerprints = {(src.name, shard.tokenizer) for src in sources for shard in src.shards}
    if len({f for _, f in fingerprints}) > 1:
        raise MixtureError(f"sources were tokenized with different tokenizers: {sorted(fingerprints)}")
    if vocab_size is not None:
        for src in sources:
            for shard in src.shards:
                if shard.vocab_size > vocab_size:
                    raise MixtureError(f"source {src.name!r}: shard {shard.path} comes from a {shard.vocab_size}-"
                                       f"token vocabulary, larger than the model's vocab_size {vocab_size}")


class MixtureSampler:
    """Deterministic weighted sampling of windows from several sources; see the module docstring."""

    def __init__(self, sources: list[TokenSource], weights: list[float], seed: int) -> None:
        total = float(sum(weights))
        self.sources, self.seed = sources, seed
        self.weights = [w / total for w in weights]
        self.samples = 0  # global samples drawn so far
        self.taken = [0] * len(sources)  # per source
        self._perm_cache: dict[tuple[int, ...], Any] = {}
        self.block_windows = BLOCK_WINDOWS

    @property
    def seq_len(self) -> int:
        return self.sources[0].seq_len

    def _pick_source(self) -> int:
        i = self.samples + 1
        lag = [w * i - t for w, t in zip(self.weights, self.taken)]
        return max(range(len(lag)), key=lambda s: (lag[s], -s))

    def _rng(self, s: int, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(self.sources[s].name.encode()), *keys])

    def _cached(self, key: tuple[int, ...], make: Any) -> Any:
        """Keep only the newest entry per (source, kind): memory stays one epoch's order and one block."""
        if key not in self._perm_cache:
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if (k[0], len(k)) != (key[0], len(key))}
            self._perm_cache[key] = make()
        return self._perm_cache[key]

    def _window_at(self, s: int, position: int) -> int:
        """The window that source ``s`` serves at ``position`` of its stream.

        Epoch ``position // n`` is a permutation of the n train windows. Up to ``block_windows`` it is one
        permutation; beyond, a permutation of blocks of that many windows and a permutation inside each
        block, so a source of billions of windows never needs an array of that size.
        """
        n, block = self.sources[s].num_train, self.block_windows
        epoch, i = divmod(position, n)
        if n <= block:
            return int(self._cached((s, epoch), lambda: self._rng(s, epoch).permutation(n))[i])
        blocks = -(-n // block)
        sizes = np.full(blocks, block, dtype=np.int64)
        sizes[-1] = n - (blocks - 1) * block
        order, ends = self._cached((s, epoch), lambda: _order_and_ends(self._rng(s, epoch), sizes))
        b = int(np.searchsorted(ends, i, side="right"))
        block_id = int(order[b])
        offset = i - int(ends[b] - sizes[block_id])
        inside = self._cached((s, epoch, block_id),
                              lambda: self._rng(s, epoch, block_id).permutation(int(sizes[block_id])))
        return block_id * block + int(inside[offset])

    def _draw(self) -> tuple[int, int]:
        s = self._pick_source()
        k = self._window_at(s, self.taken[s])
        self.taken[s] += 1
        self.samples += 1
        return s, k

    def next_batch(self, global_batch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """This rank's slice [global_batch / world_size, seq_len + 1] of the next global batch."""
        if global_batch % world_size:
            raise MixtureError(f"global batch {global_batch} does not split over {world_size} ranks")
        draws = [self._draw() for _ in range(global_batch)]  # every rank advances the same global state
        per_rank = global_batch // world_size
        mine = draws[rank * per_rank : (rank + 1) * per_rank]
        return np.stack([self.sources[s].window(k) for s, k in mine])

    def accounting(self) -> dict[str, dict[str, float]]:
        """Per source: sequences and tokens consumed, and epochs (passes over its train windows)."""
        return {src.name: {"sequences": t, "tokens": t * src.seq_len, "epochs": round(t / src.num_train, 4)}
                for src, t in zip(self.sources, self.taken)}

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "seq_len": self.seq_len, "samples": self.samples,
                "taken": {src.name: t for src, t in zip(self.sources, self.taken)},
                "weights": {src.name: w for src, w in zip(self.sources, self.weights)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [src.name for src in self.sources]
        if sorted(state["taken"]) != sorted(names):
            raise MixtureError(f"checkpoint data position has sources {sorted(state['taken'])}, "
                               f"this run has {sorted(names)}")
        if state["seed"] != self.seed or state["seq_len"] != self.seq_len:
            raise MixtureError(f"checkpoint data position was taken with seed {state['seed']}, seq_len "
                               f"{state['seq_len']}; this run has seed {self.seed}, seq_len {self.seq_len}")
        self.samples = int(state["samples"])
        self.taken = [int(state["taken"][n]) for n in names]


def build_mixture(sources: list[SourceConfig], seq_len: int, seed: int, *, val_fraction: float = 0.0,
                  vocab_size: int | None = None) -> MixtureSampler:
    """Open and check every source (shards exist, are non-empty, share a tokenizer) and build the sampler."""
    check_sources(sources)
    if not 0 <= val_fraction < 1:
        raise MixtureError(f"data.val_fraction {val_fraction} must be in [0, 1)")
    opened = [open_source(c, seq_len, val_fraction) for c in sources]
    check_compatible(opened, vocab_size)
    return MixtureSampler(opened, [c.weight for c in sources], seed)


def _order_and_ends(rng: np.random.Generator, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(len(sizes))
    return order, np.cumsum(sizes[order])


@dataclass
class ValidationSet:
    """Fixed held-out sequences per name; every evaluation reads the same ones."""

    windows: dict[str, list[tuple[TokenSource, int]]]

    def sequences(self, name: str, rank: int = 0, world_size: int = 1) -> np.ndarray | None:
        mine = self.windows[name][rank::world_size]
        return np.stack([src.window(k) for src, k in mine]) if mine else None

    def __bool__(self) -> bool:
        return any(self.windows.values())


def build_validation(mixture: MixtureSampler, extra: list[SourceConfig], max_sequences: int,
                     vocab_size: int | None = None) -> ValidationSet:
    """Held-out windows of each training source plus whole extra sources, at most ``max_sequences`` each."""
    windows: dict[str, list[tuple[TokenSource, int]]] = {}
    for src in mixture.sources:
        if src.num_val:
            windows[src.name] = [(src, k) for k in src.val_windows()[:max_sequences]]
    if extra:
        check_sources(extra, "data.val_sources")
        clash = sorted({c.name for c in extra} & set(windows))
        if clash:
            raise MixtureError(f"data.val_sources: names {clash} are already used by held-out training sources")
        opened = [open_source(c, mixture.seq_len) for c in extra]
        check_compatible(mixture.sources + opened, vocab_size)
        for src in opened:
            windows[src.name] = [(src, k) for k in range(min(src.num_train, max_sequences))]
    return ValidationSet(windows)


def describe_sources(mixture: MixtureSampler) -> list[dict[str, Any]]:
    return [{"name": s.name, "weight": round(w, 6), "tokens": s.total_tokens, "train_sequences": s.num_train,
             "val_sequences": s.num_val, "shards": [str(Path(sh.path)) for sh in s.shards]}
            for s, w in zip(mixture.sources, mixture.weights)]
