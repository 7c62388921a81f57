"""Mixture sampling: weights, determinism, rank slices, resumable state, epochs, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from phiforge.data.mixture import MixtureError, SourceConfig, build_mixture, build_validation
from phiforge.data.packing import write_token_folder

SEQ = 8


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """Three sources whose tokens say where they came from: source k, position p -> k * 10000 + p."""
    out = {}
    for k, (name, size) in enumerate((("synthetic", 4001), ("code", 801), ("web", 2401))):
        tokens = k * 10000 + np.arange(size)
        half = size // 2
        # two shards per source, so windows cross a shard boundary
        out[name] = write_token_folder(tmp_path / name, {f"{name}-0": tokens[:half], f"{name}-1": tokens[half:]},
                                       eos_token_id=0, vocab_size=32768, tokenizer="t1")
    return out


def sources(folders: dict[str, Path], **weights: float) -> list[SourceConfig]:
    return [SourceConfig(name, str(folders[name]), w) for name, w in weights.items()]


def source_of(batch: np.ndarray) -> list[int]:
    return (batch[:, 0] // 10000).tolist()


def test_windows_are_contiguous_across_shards(folders: dict[str, Path]) -> None:
    mix = build_mixture(sources(folders, synthetic=1.0), SEQ, seed=0)
    src = mix.sources[0]
    assert src.num_train == (4001 - 1) // SEQ
    boundary = 2000 // SEQ  # window 250 starts at 2000: the second shard's first token
    for k in (0, boundary - 1, boundary, src.num_train - 1):
        np.testing.assert_array_equal(src.window(k), np.arange(k * SEQ, k * SEQ + SEQ + 1))


def test_every_prefix_follows_the_weights(folders: dict[str, Path]) -> None:
    mix = build_mixture(sources(folders, synthetic=0.5, code=0.2, web=0.3), SEQ, seed=0)
    seen = source_of(mix.next_batch(1000))
    for n in range(1, 1001):
        for k, w in enumerate((0.5, 0.2, 0.3)):
            assert abs(seen[:n].count(k) - w * n) <= 1


def test_same_seed_same_batches_and_epochs_reshuffle(folders: dict[str, Path]) -> None:
    def draw(seed: int) -> np.ndarray:
        mix = build_mixture(sources(folders, code=1.0), SEQ, seed=seed)
        return np.concatenate([mix.next_batch(20) for _ in range(10)])

    a, b, c = draw(0), draw(0), draw(1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # code has 100 windows: the first 100 draws visit each once, the next 100 again in a new order
    first, second = a[:100, 0].tolist(), a[100:, 0].tolist()
    assert sorted(first) == sorted(second) == [10000 + SEQ * k for k in range(100)]
    assert first != second


def test_large_sources_shuffle_in_blocks_and_still_visit_every_window_once(folders: dict[str, Path]) -> None:
    mix = build_mixture(sources(folders, synthetic=1.0), SEQ, seed=0)
    mix.block_windows = 7  # 500 windows: 71 blocks of 7 and one of 3
    starts = np.concatenate([mix.next_batch(50) for _ in range(20)])[:, 0].tolist()
    first, second = starts[:500], starts[500:]
    assert sorted(first) == sorted(second) == [SEQ * k for k in range(500)]
    assert first != second and first != sorted(first)


def test_accounting_counts_tokens_and_epochs(folders: dict[str, Path]) -> None:
    mix = build_mixture(sources(folders, synthetic=0.8, code=0.2), SEQ, seed=0)
    for _ in range(25):
        mix.next_batch(20)
    acc = mix.accounting()
    assert acc["synthetic"]["sequences"] == 400 and acc["code"]["sequences"] == 100
    assert acc["synthetic"]["tokens"] == 400 * SEQ
    assert acc["synthetic"]["epochs"] == 0.8 and acc["code"]["epochs"] == 1.0  # 500 and 100 windows


def test_ranks_read_disjoint_slices_of_the_global_batch(folders: dict[str, Path]) -> None:
    whole = build_mixture(sources(folders, synthetic=0.6, web=0.4), SEQ, seed=3)
    ranks = [build_mixture(sources(folders, synthetic=0.6, web=0.4), SEQ, seed=3) for _ in range(4)]
    for _ in range(5):
        want = whole.next_batch(12)
        got = np.concatenate([mix.next_batch(12, rank=r, world_size=4) for r, mix in enumerate(ranks)])
        np.testing.assert_array_equal(got, want)
    assert all(mix.state_dict() == whole.state_dict() for mix in ranks)
    with pytest.raises(MixtureError, match="global batch 10 does not split over 4 ranks"):
        whole.next_batch(10, rank=0, world_size=4)


def test_state_dict_resumes_exactly(folders: dict[str, Path]) -> None:
    make = lambda: build_mixture(sources(folders, synthetic=0.5, code=0.5), SEQ, seed=0)  # noqa: E731
    straight = make()
    [straight.next_batch(16) for _ in range(20)]
    want = [straight.next_batch(16) for _ in range(5)]
    first = make()
    [first.next_batch(16) for _ in range(20)]
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for w in want:
        np.testing.assert_array_equal(resumed.next_batch(16), w)
    with pytest.raises(MixtureError, match=r"sources \['code', 'synthetic'\], this run has \['synthetic'\]"):
        build_mixture(sources(folders, synthetic=1.0), SEQ, seed=0).load_state_dict(first.state_dict())


def test_holdout_and_validation_sources_never_overlap_training(folders: dict[str, Path]) -> None:
    mix = build_mixture(sources(folders, synthetic=1.0), SEQ, seed=0, val_fraction=0.1)
    src = mix.sources[0]
    assert (src.num_train, src.num_val) == (450, 50)
    train_windows = {tuple(w) for w in np.concatenate([mix.next_batch(50) for _ in range(9)]).tolist()}
    val = build_validation(mix, sources(folders, web=1.0), max_sequences=20)
    assert set(val.windows) == {"synthetic", "web"} and len(val.windows["synthetic"]) == 20
    held = {tuple(w) for w in val.sequences("synthetic").tolist()}
    assert not held & train_windows
    split = [val.sequences("web", rank=r, world_size=3) for r in range(3)]
    assert sum(len(s) for s in split) == 20


def test_bad_mixtures_fail_before_sampling(folders: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "no-shards").mkdir()
    bad = [SourceConfig("synthetic", str(folders["synthetic"]), 0.9), SourceConfig("math", str(tmp_path / "no-shards"),
                                                                                  0.1)]
    with pytest.raises(MixtureError, match=r"source 'math': .*no-shards: no index.json"):
        build_mixture(bad, SEQ, seed=0)
    with pytest.raises(MixtureError, match=r"source 'math': .*nowhere: not a token folder"):
        build_mixture([SourceConfig("math", str(tmp_path / "nowhere"), 1.0)], SEQ, seed=0)
    empty = write_token_folder(tmp_path / "empty", {"e": np.zeros(0, dtype=np.uint16)}, eos_token_id=0,
                               vocab_size=100)
    with pytest.raises(MixtureError, match=r"source 'e': .*e.bin: empty shard"):
        build_mixture([SourceConfig("e", str(empty), 1.0)], SEQ, seed=0)
    with pytest.raises(MixtureError, match=r"source 'code' has weight 0"):
        build_mixture(sources(folders, synthetic=1.0, code=0.0), SEQ, seed=0)
    with pytest.raises(MixtureError, match=r"repeated: \['code'\]"):
        build_mixture(sources(folders, code=1.0) * 2, SEQ, seed=0)
    with pytest.raises(MixtureError, match=r"no sources"):
        build_mixture([], SEQ, seed=0)
    with pytest.raises(MixtureError, match=r"source 'code': 801 tokens make 0 sequences of 1000\+1"):
        build_mixture(sources(folders, code=1.0), 1000, seed=0)
    other = write_token_folder(tmp_path / "other", {"o": np.arange(100)}, eos_token_id=0, vocab_size=100,
                               tokenizer="t2")
    with pytest.raises(MixtureError, match="different tokenizers"):
        build_mixture([*sources(folders, code=1.0), SourceConfig("o", str(other), 1.0)], SEQ, seed=0)
    with pytest.raises(MixtureError, match=r"32768-token vocabulary, larger than the model's vocab_size 1024"):
        build_mixture(sources(folders, code=1.0), SEQ, seed=0, vocab_size=1024)
