"""Documents (JSONL / Parquet) -> token shards: flat uint16/uint32 arrays with a JSON index.

One input file becomes one shard, so input files are the unit of parallelism and of resumption:

  <name>.bin    the tokens of every document of one input file, each document followed by EOS
  <name>.json   that shard's index (dtype, counts, per-document start offsets, bad records); written
                last and atomically, it is the completion marker that a rerun trusts
  index.json    the folder's shards, tokenizer fingerprint and totals; what training reads

This module does not import torch, so spawned workers start fast.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import multiprocessing as mp
import queue as queue_lib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from phiforge.errors import DataError
from phiforge.io.atomic import atomic_open, atomic_write_bytes, atomic_write_json

FORMAT = "phiforge-tokens-v1"
INDEX_NAME = "index.json"
INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
MAX_BAD_EXAMPLES = 100  # per shard; the count is always exact


class PackingError(DataError):
    """Unusable input or token folder; the message names the file (and record) at fault."""


@dataclass
class TokenizeConfig:
    inputs: list[str]  # files, folders (searched recursively) or globs of .jsonl, .jsonl.gz, .parquet
    output: str  # folder for the shards and index.json
    tokenizer: str  # tokenizer folder (tokenizer.json)
    text_field: str = "text"
    workers: int = 1  # processes; each takes whole input files
    batch_size: int = 256  # documents per encode_batch call
    dtype: str = "auto"  # auto (uint16 when the vocabulary fits) | uint16 | uint32
    progress: bool = True


# ---- small file helpers ---------------------------------------------------------------------------
def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PackingError(f"{path}: no such file ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PackingError(f"{path}: not valid JSON ({err}); expected {what}") from None


def tokenizer_fingerprint(folder: str | Path) -> str:
    """A short hash of tokenizer.json: shards from different tokenizers must never be mixed."""
    path = Path(folder) / "tokenizer.json"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        raise PackingError(f"{path}: no such file (a tokenizer folder needs tokenizer.json)") from None


def choose_dtype(vocab_size: int, dtype: str = "auto") -> np.dtype:
    if dtype == "auto":
        return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    if dtype not in ("uint16", "uint32"):
        raise PackingError(f"dtype {dtype!r} must be auto, uint16 or uint32")
    if vocab_size > np.iinfo(dtype).max + 1:
        raise PackingError(f"dtype {dtype} cannot hold token ids of a {vocab_size}-token vocabulary; use uint32")
    return np.dtype(dtype)


def find_inputs(inputs: list[str]) -> list[Path]:
    """Input files, sorted and de-duplicated; folders are searched, globs expanded."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += [p for p in path.rglob("*") if p.is_file() and p.name.endswith(INPUT_SUFFIXES)]
        elif path.is_file():
            if not path.name.endswith(INPUT_SUFFIXES):
                raise PackingError(f"{path}: unsupported input; expected one of {', '.join(INPUT_SUFFIXES)}")
            found.append(path)
        else:
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))]
            matches = [m for m in matches if m.is_file() and m.name.endswith(INPUT_SUFFIXES)]
            if not matches:
                raise PackingError(f"{item}: no such file, folder, or glob match with suffix {INPUT_SUFFIXES}")
            found += matches
    if not found:
        raise PackingError(f"no input documents ({', '.join(INPUT_SUFFIXES)}) under {inputs}")
    return sorted({p.resolve() for p in found})


def shard_name(path: Path) -> str:
    """Readable and unique: the file stem plus a hash of its absolute path (same stems in two folders)."""
    stem = path.name
    for suffix in INPUT_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return f"{stem}-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"


# ---- reading documents ------------------------------------------------------------------------------
@dataclass
class Record:
    line: int  # 1-based line (JSONL) or row (Parquet)
    text: str | None  # None for a bad record
    error: str = ""
    position: int = 0  # bytes of the input file consumed so far (for progress)


def iter_jsonl(path: Path, text_field: str) -> Iterator[Record]:
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        for line_no, line in enumerate(stream, 1):
            if not line.strip():
                continue
            yield _parse_json_line(line, line_no, text_field, raw.tell())


def _parse_json_line(line: bytes, line_no: int, text_field: str, position: int) -> Record:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return Record(line_no, None, f"malformed JSON ({err})", position)
    if not isinstance(record, dict):
        return Record(line_no, None, f"expected a JSON object, got {type(record).__name__}", position)
    text = record.get(text_field)
    if not isinstance(text, str):
        what = "missing" if text_field not in record else f"a {type(text).__name__}, not a string"
        return Record(line_no, None, f"field {text_field!r} is {what}", position)
    if not text:
        return Record(line_no, None, f"field {text_field!r} is empty", position)
    return Record(line_no, text, "", position)


def iter_parquet(path: Path, text_field: str) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PackingError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise PackingError(f"{path}: no column {text_field!r}; columns are {names}")
    rows, size = max(parquet.metadata.num_rows, 1), path.stat().st_size
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            position = size * row // rows
            if not isinstance(text, str) or not text:
                yield Record(row, None, f"column {text_field!r} is {'empty' if text == '' else 'null'}", position)
            else:
                yield Record(row, text, "", position)


def iter_records(path: Path, text_field: str) -> Iterator[Record]:
    return iter_parquet(path, text_field) if path.name.endswith(".parquet") else iter_jsonl(path, text_field)


# ---- one input file -> one shard ------------------------------------------------------------------
@dataclass
class PackSettings:
    output: str
    tokenizer: str
    fingerprint: str
    dtype: str
    eos_token_id: int
    text_field: str
    batch_size: int


@dataclass
class ShardStats:
    name: str
    source: str
    num_docs: int = 0
    num_tokens: int = 0
    num_bad: int = 0
    bad_records: list[dict[str, Any]] = field(default_factory=list)
    skipped: bool = False  # already complete from an earlier run


_WORKER: dict[str, Any] = {}  # per-process tokenizer, settings and progress sink


def _init_worker(settings: PackSettings, progress: Any) -> None:
    from phiforge.tokenizers.tokenizer import Tokenizer

    _WORKER.update(tokenizer=Tokenizer.from_folder(settings.tokenizer), settings=settings, progress=progress)


def _report(byte_delta: int, docs: int, tokens: int) -> None:
    sink = _WORKER["progress"]
    if callable(sink):
        sink(byte_delta, docs, tokens)
    else:
        sink.put((byte_delta, docs, tokens))


def shard_is_complete(path: Path, settings: PackSettings) -> dict[str, Any] | None:
    """The shard's index when an earlier run finished this input with the same tokenizer and dtype."""
    out = Path(settings.output)
    marker = out / f"{shard_name(path)}.json"
    if not marker.exists():
        return None
    try:
        index = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    expected = {"format": FORMAT, "tokenizer": settings.fingerprint, "dtype": settings.dtype,
                "source": str(path), "source_bytes": path.stat().st_size}
    if any(index.get(k) != v for k, v in expected.items()):
        return None
    bin_path = out / index["bin"]
    if not bin_path.exists() or bin_path.stat().st_size != index["num_tokens"] * np.dtype(settings.dtype).itemsize:
        return None
    return index


def pack_file(path: Path) -> ShardStats:
    """Tokenize one input file into <name>.bin + <name>.json (runs inside a worker)."""
    settings: PackSettings = _WORKER["settings"]
    name, out = shard_name(path), Path(settings.output)
    done = shard_is_complete(path, settings)
    if done is not None:
        _report(path.stat().st_size, 0, 0)
        return ShardStats(name, str(path), done["num_docs"], done["num_tokens"], done["num_bad"], skipped=True)
    stats = ShardStats(name, str(path))
    offsets: list[int] = []
    with atomic_open(out / f"{name}.bin", "wb") as sink:
        texts: list[str] = []
        reported_bytes = reported_tokens = 0
        for record in iter_records(path, settings.text_field):
            if record.text is None:
                stats.num_bad += 1
                if len(stats.bad_records) < MAX_BAD_EXAMPLES:
                    stats.bad_records.append({"file": str(path), "line": record.line, "error": record.error})
                continue
            texts.append(record.text)
            if len(texts) >= settings.batch_size:
                _write_batch(texts, sink, offsets, stats, settings)
                _report(record.position - reported_bytes, len(texts), stats.num_tokens - reported_tokens)
                reported_bytes, reported_tokens, texts = record.position, stats.num_tokens, []
        _write_batch(texts, sink, offsets, stats, settings)
        _report(path.stat().st_size - reported_bytes, len(texts), stats.num_tokens - reported_tokens)
    atomic_write_json(out / f"{name}.json", {
        "format": FORMAT, "source": str(path), "source_bytes": path.stat().st_size, "bin": f"{name}.bin",
        "dtype": settings.dtype, "tokenizer": settings.fingerprint, "eos_token_id": settings.eos_token_id,
        "num_docs": stats.num_docs, "num_tokens": stats.num_tokens, "num_bad": stats.num_bad,
        "bad_records": stats.bad_records, "doc_offsets": offsets,
    })
    return stats


def _write_batch(texts: list[str], sink: Any, offsets: list[int], stats: ShardStats, settings: PackSettings) -> None:
    if not texts:
        return
    encoded = _WORKER["tokenizer"].encode_batch(texts, add_special_tokens=False)
    flat = np.empty(sum(len(ids) + 1 for ids in encoded), dtype=settings.dtype)
    pos = 0
    for ids in encoded:
        offsets.append(stats.num_tokens + pos)
        flat[pos : pos + len(ids)] = ids
        flat[pos + len(ids)] = settings.eos_token_id  # the document separator
        pos += len(ids) + 1
    sink.write(flat.tobytes())
    stats.num_docs += len(encoded)
    stats.num_tokens += len(flat)


# ---- the stage -------------------------------------------------------------------------------------
def tokenize_corpus(config: TokenizeConfig) -> dict[str, Any]:
    """Tokenize every input file into a shard of ``config.output``; rerunning skips finished files.

    Returns the totals, the shards, and the bad records (count, and examples with file and line).
    """
    from phiforge.tokenizers.tokenizer import Tokenizer

    started = time.perf_counter()
    files = find_inputs(config.inputs)
    tokenizer = Tokenizer.from_folder(config.tokenizer)
    if tokenizer.eos_token_id is None:
        raise PackingError(f"{config.tokenizer}: the tokenizer has no eos_token; documents need a separator")
    vocab = max(tokenizer.vocab_size, len(tokenizer))
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    settings = PackSettings(str(out), str(config.tokenizer), tokenizer_fingerprint(config.tokenizer),
                            choose_dtype(vocab, config.dtype).name, tokenizer.eos_token_id, config.text_field,
                            config.batch_size)
    shards = _run_pool(files, settings, config)
    summary = _write_index(out, shards, settings, vocab)
    seconds = time.perf_counter() - started
    new_tokens = sum(s.num_tokens for s in shards if not s.skipped)
    return {**summary, "seconds": round(seconds, 3), "tokens_per_s": round(new_tokens / max(seconds, 1e-9)),
            "skipped_complete": sum(s.skipped for s in shards)}


def _run_pool(files: list[Path], settings: PackSettings, config: TokenizeConfig) -> list[ShardStats]:
    from tqdm.auto import tqdm

    total = sum(p.stat().st_size for p in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not config.progress)
    counts = {"docs": 0, "tokens": 0, "start": time.perf_counter()}

    def advance(byte_delta: int, docs: int, tokens: int) -> None:
        counts["docs"] += docs
        counts["tokens"] += tokens
        bar.update(byte_delta)
        rate = counts["tokens"] / max(time.perf_counter() - counts["start"], 1e-9)
        bar.set_postfix(docs=counts["docs"], tok_s=f"{rate:,.0f}", refresh=False)

    try:
        if config.workers <= 1 or len(files) == 1:
            _init_worker(settings, advance)
            return [pack_file(path) for path in files]
        return _run_processes(files, settings, min(config.workers, len(files)), advance)
    finally:
        bar.close()


def _run_processes(files: list[Path], settings: PackSettings, workers: int,
                   advance: Callable[[int, int, int], None]) -> list[ShardStats]:
    # spawn, not fork: the parent may already run tokenizer/torch threads, which fork would corrupt
    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    with ctx.Pool(workers, initializer=_init_worker, initargs=(settings, progress)) as pool:
        pending = [pool.apply_async(pack_file, (path,)) for path in files]
        results: list[ShardStats | None] = [None] * len(files)
        while any(r is None for r in results):
            try:
                advance(*progress.get(timeout=0.1))
            except queue_lib.Empty:
                pass
            for i, job in enumerate(pending):
                if results[i] is None and job.ready():
                    results[i] = job.get()  # re-raises a worker's error here, naming the file
        while not progress.empty():
            advance(*progress.get())
    return [r for r in results if r is not None]


# ---- a stream of documents -> blocks, each its own shard, on N workers ---------------------------------
def pack_block(job: tuple[str, str, list[str]]) -> ShardStats:
    """Tokenize one block of texts into ``<output>/<name>.bin + .json`` (runs inside a worker); a rerun
    skips a block whose shard holds the same texts (by hash) with the same tokenizer and dtype."""
    output, name, texts = job
    settings: PackSettings = _WORKER["settings"]
    out = Path(output)
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    marker = out / f"{name}.json"
    if marker.exists():
        try:
            index = json.loads(marker.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            index = {}
        bin_path = out / index.get("bin", "-")
        if (index.get("source_hash") == digest and index.get("tokenizer") == settings.fingerprint
                and index.get("dtype") == settings.dtype and bin_path.exists()
                and bin_path.stat().st_size == index["num_tokens"] * np.dtype(settings.dtype).itemsize):
            _report(0, len(texts), 0)
            return ShardStats(name, index["source"], index["num_docs"], index["num_tokens"], skipped=True)
    stats, offsets = ShardStats(name, f"{out.name} block {name}"), []
    with atomic_open(out / f"{name}.bin", "wb") as sink:
        for start in range(0, len(texts), settings.batch_size):
            tokens = stats.num_tokens
            _write_batch(texts[start:start + settings.batch_size], sink, offsets, stats, settings)
            _report(0, min(settings.batch_size, len(texts) - start), stats.num_tokens - tokens)
    atomic_write_json(marker, {
        "format": FORMAT, "source": stats.source, "source_bytes": 0, "source_hash": digest, "bin": f"{name}.bin",
        "dtype": settings.dtype, "tokenizer": settings.fingerprint, "eos_token_id": settings.eos_token_id,
        "num_docs": stats.num_docs, "num_tokens": stats.num_tokens, "num_bad": 0, "bad_records": [],
        "doc_offsets": offsets})
    return stats


def tokenize_stream(documents: Iterator[tuple[int, str]], outputs: list[str | Path], tokenizer: str | Path,
                    workers: int = 1, block_docs: int = 4096, progress: bool = True,
                    dtype: str = "auto") -> list[dict[str, Any]]:
    """Tokenize ``(output number, text)`` pairs into the token folders ``outputs``, streaming.

    Each output's documents are cut into blocks of ``block_docs`` in arrival order; each block is
    tokenized by one of ``workers`` processes into its own shard ``part-NNNNNN`` of its folder, and the
    folder's index lists the blocks in order, so the token stream is the same for any number of workers
    (and the same as one shard of all the documents). At most ``2 * workers`` blocks are in flight, so
    memory does not grow with the corpus. Returns each folder's summary."""
    from tqdm.auto import tqdm

    from phiforge.tokenizers.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(str(tokenizer))
    if tok.eos_token_id is None:
        raise PackingError(f"{tokenizer}: the tokenizer has no eos_token; documents need a separator")
    vocab = max(tok.vocab_size, len(tok))
    settings = PackSettings("", str(tokenizer), tokenizer_fingerprint(tokenizer), choose_dtype(vocab, dtype).name,
                            tok.eos_token_id, "text", 256)
    folders = [Path(o) for o in outputs]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    bar = tqdm(unit="doc", desc="tokenize", disable=not progress)
    counts = {"tokens": 0, "start": time.perf_counter()}

    def advance(_bytes: int, docs: int, tokens: int) -> None:
        counts["tokens"] += tokens
        bar.update(docs)
        bar.set_postfix(tok_s=f"{counts['tokens'] / max(time.perf_counter() - counts['start'], 1e-9):,.0f}",
                        refresh=False)

    shards: list[list[ShardStats | None]] = [[] for _ in folders]  # per folder, in block order
    buffers: list[list[str]] = [[] for _ in folders]

    def take(side: int) -> tuple[int, int, tuple[str, str, list[str]]]:
        job = (str(folders[side]), f"part-{len(shards[side]):06d}", buffers[side])
        shards[side].append(None)  # its place, filled when the block is done
        buffers[side] = []
        return side, len(shards[side]) - 1, job

    def blocks() -> Iterator[tuple[int, int, tuple[str, str, list[str]]]]:
        for side, text in documents:
            buffers[side].append(text)
            if len(buffers[side]) >= block_docs:
                yield take(side)
        yield from (take(side) for side in range(len(folders)) if buffers[side])

    try:
        if workers <= 1:
            _init_worker(settings, advance)
            for side, slot, job in blocks():
                shards[side][slot] = pack_block(job)
        else:
            ctx = mp.get_context("spawn")  # spawn, not fork: the parent may run tokenizer/torch threads
            sink = ctx.Queue()
            with ctx.Pool(workers, initializer=_init_worker, initargs=(settings, sink)) as pool:
                pending: list[tuple[int, int, Any]] = []

                def drain(limit: int) -> None:
                    while len(pending) > limit:
                        while not pending[0][2].ready():
                            _pump(sink, advance)
                        side_, slot_, result = pending.pop(0)
                        shards[side_][slot_] = result.get()  # re-raises a worker's error here
                    _pump(sink, advance, wait=False)

                for side, slot, job in blocks():
                    pending.append((side, slot, pool.apply_async(pack_block, (job,))))
                    drain(2 * workers)
                drain(0)
                while not sink.empty():
                    advance(*sink.get())
    finally:
        bar.close()
    summaries = []
    for folder, listed in zip(folders, shards):
        names = {f"part-{i:06d}" for i in range(len(listed))}
        for stale in folder.glob("part-*"):  # blocks of an earlier, longer run
            if stale.name.split(".")[0] not in names:
                stale.unlink()
        summaries.append(_write_index(folder, [s for s in listed if s is not None], replace(settings,
                                      output=str(folder)), vocab))
    return summaries


def _pump(sink: Any, advance: Callable[[int, int, int], None], wait: bool = True) -> None:
    try:
        advance(*sink.get(timeout=0.05 if wait else 0))
    except queue_lib.Empty:
        pass


def _write_index(out: Path, shards: list[ShardStats], settings: PackSettings, vocab: int) -> dict[str, Any]:
    bad_examples: list[dict[str, Any]] = []
    for stats in shards:
        if stats.skipped:  # the examples live in the shard's own index
            stats.bad_records = read_json(out / f"{stats.name}.json", "a shard index")["bad_records"]
        bad_examples += stats.bad_records
    listed = [s for s in shards if s.num_tokens > 0]
    index = {
        "format": FORMAT, "tokenizer": settings.fingerprint, "tokenizer_path": settings.tokenizer,
        "vocab_size": vocab, "dtype": settings.dtype, "eos_token_id": settings.eos_token_id,
        "num_docs": sum(s.num_docs for s in shards), "num_tokens": sum(s.num_tokens for s in shards),
        "num_bad": sum(s.num_bad for s in shards),
        "shards": [{"name": s.name, "bin": f"{s.name}.bin", "source": s.source, "num_docs": s.num_docs,
                    "num_tokens": s.num_tokens} for s in listed],
        "empty_inputs": [s.source for s in shards if s.num_tokens == 0],
    }
    atomic_write_json(out / INDEX_NAME, index)
    return {**{k: v for k, v in index.items() if k != "shards"}, "output": str(out), "num_shards": len(listed),
            "bad_records": bad_examples[:MAX_BAD_EXAMPLES]}


def write_token_folder(folder: str | Path, shards: dict[str, np.ndarray], *, eos_token_id: int, vocab_size: int,
                       tokenizer: str = "none") -> Path:
    """Write ready-made token arrays as a token folder (benchmarks, tests, converted corpora).

    Documents are not known here, so each shard's doc_offsets is empty.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    dtype = choose_dtype(vocab_size).name
    listed = []
    for name, tokens in shards.items():
        data = np.asarray(tokens).astype(dtype)
        atomic_write_bytes(out / f"{name}.bin", data.tobytes())
        atomic_write_json(out / f"{name}.json", {
            "format": FORMAT, "source": name, "source_bytes": 0, "bin": f"{name}.bin", "dtype": dtype,
            "tokenizer": tokenizer, "eos_token_id": eos_token_id, "num_docs": 0, "num_tokens": len(data),
            "num_bad": 0, "bad_records": [], "doc_offsets": []})
        listed.append({"name": name, "bin": f"{name}.bin", "source": name, "num_docs": 0, "num_tokens": len(data)})
    atomic_write_json(out / INDEX_NAME, {
        "format": FORMAT, "tokenizer": tokenizer, "tokenizer_path": "", "vocab_size": vocab_size, "dtype": dtype,
        "eos_token_id": eos_token_id, "num_docs": 0, "num_tokens": sum(s["num_tokens"] for s in listed),
        "num_bad": 0, "shards": listed, "empty_inputs": []})
    return out


# ---- reading shards back ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenShard:
    path: Path  # the .bin file
    num_tokens: int
    dtype: str
    eos_token_id: int
    tokenizer: str  # fingerprint
    vocab_size: int

    def tokens(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def load_shards(path: str | Path) -> list[TokenShard]:
    """The shards of a token folder (through its index.json) or a single shard (<name>.bin or .json).

    Every shard is checked (exists, non-empty, file size matches the index) before anything reads it.
    """
    path = Path(path)
    if path.is_dir():
        index_path = path / INDEX_NAME
        if not index_path.exists():
            raise PackingError(f"{path}: no {INDEX_NAME}; is this a token folder (phiforge tokenize)?")
        index = read_json(index_path, "a token folder index")
        if not index.get("shards"):
            raise PackingError(f"{index_path}: lists no shards (all inputs were empty: {index.get('empty_inputs')})")
        entries = [(path / s["bin"], s["num_tokens"]) for s in index["shards"]]
    elif path.suffix in (".bin", ".json") and path.with_suffix(".json").exists():
        index = read_json(path.with_suffix(".json"), "a shard index")
        entries = [(path.with_suffix(".bin"), index.get("num_tokens", 0))]
        index.setdefault("vocab_size", 0)
    else:
        raise PackingError(f"{path}: not a token folder or a shard (.bin with its .json index)")
    if index.get("format") != FORMAT:
        raise PackingError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
    return [_checked_shard(bin_path, n, index) for bin_path, n in entries]


def _checked_shard(bin_path: Path, num_tokens: int, index: dict[str, Any]) -> TokenShard:
    itemsize = np.dtype(index["dtype"]).itemsize
    if not bin_path.exists():
        raise PackingError(f"{bin_path}: shard file missing (listed in its index)")
    size = bin_path.stat().st_size
    if num_tokens <= 0 or size == 0:
        raise PackingError(f"{bin_path}: empty shard (0 tokens); remove it or re-run tokenize on its source")
    if size != num_tokens * itemsize:
        raise PackingError(f"{bin_path}: {size} bytes, but the index says {num_tokens} tokens of {index['dtype']} "
                           f"({num_tokens * itemsize} bytes); the shard is truncated or stale")
    return TokenShard(bin_path, num_tokens, index["dtype"], index["eos_token_id"], index["tokenizer"],
                      index.get("vocab_size", 0))
