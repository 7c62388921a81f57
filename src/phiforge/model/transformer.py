"""One decoder-only transformer for the whole Phi family, switched by ModelConfig flags.

  phi-1/1.5/2      parallel attention + MLP from one LayerNorm, biases, partial rotary, tanh-GELU
  Phi-3/3.5/4      pre-norm RMSNorm, fused qkv, SwiGLU, GQA, LongRoPE, sliding window
  Phi-4-mini       + partial rotary and tied embeddings
  Phi-3-small      LayerNorm + biases, grouped qkv rows, muP scalings, GeGELU, block-sparse attention on
                   alternate layers (arch.md §4)
  Llama (teachers) the Phi-3 block with separate projections on disk (fused here at load time)

Projections are fused in memory (qkv, gate+up) whatever the on-disk layout: fewer, larger matmuls.
checkpoint.py maps each family's Hugging Face keys onto these parameters.

Plain PyTorch only: training, export and FSDP see these modules as they are. The inference engine installs
its CPU fast paths (packed weights, native GEMV/attention/RMSNorm, the whole-step decode plan) onto a model it
owns (inference/fast_paths.py), overriding the hooks Attention.attend and PhiForgeModel.run_blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phiforge.config.model import ModelConfig

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class RMSNorm(nn.Module):
    """Phi-3/Llama RMSNorm: normalise in fp32, cast back, then scale (same op order as transformers)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def gegelu(h: torch.Tensor, limit: float | None) -> torch.Tensor:
    """Phi-3-small's GeGELU: interleaved (gelu, linear) columns, clamped (infinities kept), quick-gelu gate, +1."""
    a_gelu, a_lin = h[..., ::2], h[..., 1::2]
    if limit is not None:
        a_gelu = torch.where(torch.isinf(a_gelu), a_gelu, a_gelu.clamp(max=limit))
        a_lin = torch.where(torch.isinf(a_lin), a_lin, a_lin.clamp(-limit, limit))
    return a_gelu * torch.sigmoid(1.702 * a_gelu) * (a_lin + 1)


def blocksparse_mask(config: ModelConfig, positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Boolean [B, H, T, keys] mask of Phi-3-small's sparse layers for queries at ``positions`` [B, T].

    Blocks are absolute positions // block_size. Query block qb sees key block kb <= qb when it is one of
    the last ``local_blocks`` blocks, or when it is a vertical stripe of head h: (kb + h*step + 1) % stride
    == 0 (the phase moves by ``step`` per head); token-level causality applies on top.
    """
    c = config
    size, stride = c.blocksparse_block_size, c.blocksparse_vert_stride
    step = 0 if c.blocksparse_homo_head else max(1, stride // c.num_heads)
    keys = torch.arange(num_keys, device=positions.device)
    kb, qb = keys // size, positions[..., None] // size  # [keys], [B, T, 1]
    heads = torch.arange(c.num_heads, device=positions.device)[:, None]
    vertical = (kb + heads * step + 1) % stride == 0  # [H, keys]
    causal = keys <= positions[..., None]  # [B, T, keys]
    local = qb - kb < c.blocksparse_local_blocks
    return causal[:, None] & (local[:, None] | vertical[None, :, None])


_FLEX: list = []


def _compiled_flex() -> Any:
    """torch.compile(flex_attention), made once: eager flex_attention is a slow reference; compiled, it is a
    fused kernel that skips fully masked blocks (packed documents, sliding windows) on CUDA and CPU."""
    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX.append(torch.compile(flex_attention))
    return _FLEX[0]


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, config.norm_eps)


class RotaryEmbedding:
    """NeoX-style (rotate_half) RoPE over the first ``rotary_dim`` channels of each head.

    LongRoPE keeps two frequency sets and picks by the highest position in the call, as transformers
    does; the attention factor scales cos/sin (so both q and k) for short and long alike.
    Not an nn.Module: it holds no weights, and plain tensors survive meta-device construction.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.dim = config.rotary_dim
        self.original_max = config.original_max_position_embeddings or config.max_position_embeddings
        exponent = torch.arange(0, self.dim, 2, dtype=torch.int64, device="cpu").float() / self.dim
        base = config.rope_theta**exponent
        if config.longrope:
            short = torch.tensor(config.rope_scaling["short_factor"], dtype=torch.float32, device="cpu")
            long = torch.tensor(config.rope_scaling["long_factor"], dtype=torch.float32, device="cpu")
            self.inv_freq = {False: 1.0 / (short * base), True: 1.0 / (long * base)}
        else:
            self.inv_freq = {False: 1.0 / base, True: 1.0 / base}
        self.scale = config.rope_attention_factor
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def uses_long_factors(self, max_position: int) -> bool:
        return max_position + 1 > self.original_max

    def _inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        """Frequencies per row: a row whose highest position passes the original context goes long."""
        device = positions.device
        if device not in self._on_device:
            self._on_device[device] = torch.stack([self.inv_freq[False], self.inv_freq[True]]).to(device)
        both = self._on_device[device]
        long_rows = positions.amax(dim=-1) + 1 > self.original_max  # [B]
        if bool(long_rows.all()) or not bool(long_rows.any()):
            return both[int(long_rows[0])]
        return both[long_rows.long()][:, None, :]

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, rotary_dim] for integer positions [B, T]."""
        freqs = positions[..., None].float() * self._inv_freq(positions)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x [B, H, T, hd]; cos/sin are [B, T, r]."""
    r = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = x[..., :r]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
    rotated = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rotated if r == x.shape[-1] else torch.cat((rotated, x[..., r:]), dim=-1)


class SparseLayerCache:
    """Keys/values of one block-sparse layer, keeping only what its heads can still attend to.

    The query heads of kv head g put their vertical stripes on a fixed set of block residues R_g
    (mod vert_stride); an old block of another residue is never read again. So this keeps
      - a ring of the last ``local_blocks`` blocks, every residue (the local band), and
      - per kv head, only the blocks of its residues, packed: slot (kb // stride) * |R| + rank(kb % stride).
    Reads rebuild the layer's keys 0..span-1 in a scratch tensor; keys not kept read as stale values that
    the block-sparse mask hides. Both stores end in one spare slot that absorbs the writes they skip.
    """

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        c = config
        self.block, self.local = c.blocksparse_block_size, c.blocksparse_local_blocks
        self.stride = c.blocksparse_vert_stride
        residues, self.vertical_slots, self.ring_slots = self.layout(c, capacity)
        self.per_round = max(len(r) for r in residues)  # kept blocks per `stride` blocks, per kv head
        rank = torch.full((c.num_kv_heads, self.stride), -1, dtype=torch.long)
        for g, kept in enumerate(residues):
            rank[g, kept] = torch.arange(len(kept))
        self.rank = rank.to(device)
        shape = (batch_size, c.num_kv_heads)
        self.kv = [torch.zeros(*shape, self.vertical_slots + 1, c.head_dim, dtype=dtype, device=device)
                   for _ in "kv"]
        self.ring = [torch.zeros(*shape, self.ring_slots + 1, c.head_dim, dtype=dtype, device=device)
                     for _ in "kv"]

    @staticmethod
    def layout(c: ModelConfig, capacity: int) -> tuple[list[list[int]], int, int]:
        """(stripe residues of each kv head, vertical slots, ring slots) for ``capacity`` positions."""
        stride = c.blocksparse_vert_stride
        step = 0 if c.blocksparse_homo_head else max(1, stride // c.num_heads)
        group = c.num_heads // c.num_kv_heads
        residues = [sorted({-(h * step + 1) % stride for h in range(g * group, (g + 1) * group)})
                    for g in range(c.num_kv_heads)]
        rounds = -(-capacity // (c.blocksparse_block_size * stride))
        per_round = max(len(r) for r in residues)
        size = c.blocksparse_block_size
        return residues, rounds * per_round * size, c.blocksparse_local_blocks * size

    def _slots(self, positions: torch.Tensor, newest_block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vertical and ring slots [B, KV, N] of absolute positions [B, N]; the spare slot where not kept."""
        kb, offset = positions // self.block, positions % self.block
        rank = self.rank[:, kb % self.stride].permute(1, 0, 2)  # [B, KV, N]
        vertical = ((kb // self.stride)[:, None] * self.per_round + rank) * self.block + offset[:, None]
        vertical = torch.where(rank >= 0, vertical, self.vertical_slots)
        in_band = (newest_block[:, None] - kb < self.local)[:, None]  # the newest `local` blocks of the row
        ring = torch.where(in_band, ((kb % self.local) * self.block + offset)[:, None], self.ring_slots)
        return vertical, ring.expand_as(vertical)

    def write(self, k: torch.Tensor, v: torch.Tensor, rows: slice, positions: torch.Tensor,
              span: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, hd = k.shape[0], k.shape[-1]
        first_block = positions[:, 0] // self.block
        # read before writing: a long prefill may evict ring blocks its own first queries still see
        keys = torch.arange(span, device=k.device).expand(B, span)
        vertical, ring = self._slots(keys, first_block)
        in_band = (first_block[:, None] - keys // self.block < self.local)[:, None, :, None]
        out = []
        for store, ring_store, new in zip(self.kv, self.ring, (k, v), strict=True):
            store, ring_store = store[rows], ring_store[rows]
            old = torch.where(in_band, ring_store.gather(2, ring[..., None].expand(-1, -1, -1, hd)),
                              store.gather(2, vertical[..., None].expand(-1, -1, -1, hd)))
            old.scatter_(2, positions[:, None, :, None].expand(-1, new.shape[1], -1, hd), new)
            out.append(old)
        vertical, ring = self._slots(positions, positions[:, -1] // self.block)
        for store, ring_store, new in zip(self.kv, self.ring, (k, v), strict=True):
            store[rows].scatter_(2, vertical[..., None].expand(-1, -1, -1, hd), new)
            ring_store[rows].scatter_(2, ring[..., None].expand(-1, -1, -1, hd), new)
        return out[0], out[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.kv, *self.ring))


class KVCache:
    """Preallocated keys/values of every layer; row b holds one sequence, written at its own positions.

    Rows are independent, so a finished sequence's row can be refilled by the next prompt (continuous
    batching) without touching the others; stale keys beyond a row's position are masked, never read.
    Block-sparse layers (Phi-3-small) keep a SparseLayerCache instead: only the keys they can attend to.
    """

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shape = (batch_size, config.num_kv_heads, capacity, config.head_dim)
        # a short cache (about twice the local band or less) saves nothing: sparse layers then store densely
        sparse_saves = config.blocksparse_block_size is not None and sum(
            SparseLayerCache.layout(config, capacity)[1:]) + 2 < capacity
        dense = [not (config.is_sparse_layer(i) and sparse_saves) for i in range(config.num_layers)]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) if d else None for d in dense]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) if d else None for d in dense]
        self.sparse = [None if d else SparseLayerCache(config, batch_size, capacity, dtype=dtype, device=device)
                       for d in dense]
        self.batch_size, self.capacity = batch_size, capacity
        self._slots: tuple[torch.Tensor, torch.Tensor] | None = None  # (positions, slots) of the current step
        self._bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (positions, lo, hi)

    def nbytes(self) -> int:
        """Bytes held by the cache (all layers, all rows)."""
        dense = sum(t.numel() * t.element_size() for t in (*self.k, *self.v) if t is not None)
        return dense + sum(s.nbytes() for s in self.sparse if s is not None)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: slice, positions: torch.Tensor,
              span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, KV, T, hd] at ``positions`` [B, T] of ``rows``; return keys/values 0..span-1."""
        self._check_span(span)
        if self.sparse[layer] is not None:
            return self.sparse[layer].write(k, v, rows, positions, span)
        k_cache, v_cache = self.layer(layer, rows)
        if k.shape[2] == 1 and positions.shape[0] > 1:  # decode: one new token per row, each at its own place
            slots = self.decode_slots(positions, k.shape[1])
            head_dim = k.shape[-1]
            k_cache.view(-1, head_dim).index_copy_(0, slots, k.reshape(-1, head_dim))
            v_cache.view(-1, head_dim).index_copy_(0, slots, v.reshape(-1, head_dim))
        else:  # prefill: rows share one run of positions
            start = int(positions[0, 0])
            k_cache[:, :, start : start + k.shape[2]] = k
            v_cache[:, :, start : start + k.shape[2]] = v
        return k_cache[:, :, :span], v_cache[:, :, :span]

    def _check_span(self, span: int) -> None:
        if span > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; position {span - 1} requested")

    def layer(self, layer: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense keys and values [B, KV, capacity, hd] of ``layer`` for ``rows``."""
        return self.k[layer][rows], self.v[layer][rows]

    def key_bounds(self, positions: torch.Tensor, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [lo, hi) each row's single query sees: causal, within the sliding window (attention_mask's rule).
        Computed once per decode step."""
        if self._bounds is None or self._bounds[0] is not positions:
            hi = positions[:, -1] + 1
            self._check_span(int(hi.max()))
            lo = (hi - window).clamp(min=0) if window is not None else torch.zeros_like(hi)
            self._bounds = (positions, lo, hi)
        return self._bounds[1], self._bounds[2]

    def decode_slots(self, positions: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """Flat row indices of (row b, head h, position p_b) in a [B*KV*capacity, head_dim] view of the cache.

        Every layer of one decode step uses the same slots, so they are computed once per step."""
        if self._slots is None or self._slots[0] is not positions:
            B = positions.shape[0]
            heads = torch.arange(B * kv_heads, device=positions.device).view(B, kv_heads)
            self._slots = (positions, (heads * self.capacity + positions[:, :1]).view(-1))
        return self._slots[1]


@dataclass
class CacheView:
    """What one layer needs to write into and read from the shared KVCache during a forward call."""

    cache: KVCache
    layer: int
    rows: slice
    positions: torch.Tensor
    span: int

    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.write(self.layer, k, v, self.rows, self.positions, self.span)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size,
                             bias=config.attn_bias or config.qkv_bias)
        self.proj = nn.Linear(config.q_size, config.hidden_size, bias=config.attn_bias)
        if config.qk_layernorm:
            self.q_norm = nn.LayerNorm(config.head_dim, eps=config.norm_eps)
            self.k_norm = nn.LayerNorm(config.head_dim, eps=config.norm_eps)
        # phi-2 overflows QK^T in fp16 (transformers#28163): score it in fp32 there
        self.upcast_fp16 = config.model_type == "phi"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: CacheView | None = None) -> torch.Tensor:
        qk, v = self.heads(x)
        return self.proj(self.attend(qk, v, cos, sin, mask, cache))

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys [B, H + KV, T, hd] (normed where qk_layernorm, not yet rotated), values [B, KV, T, hd]."""
        c = self.config
        B, T, _ = x.shape
        heads = self.qkv(x).view(B, T, c.num_heads + 2 * c.num_kv_heads, c.head_dim)
        if c.qkv_grouped:  # rows per kv group [q_0..q_{n-1}, k, v] -> [all q, all k, all v]
            grouped = heads.view(B, T, c.num_kv_heads, c.num_heads // c.num_kv_heads + 2, c.head_dim)
            heads = torch.cat((grouped[..., :-2, :].flatten(2, 3), grouped[..., -2, :], grouped[..., -1, :]), dim=2)
        heads = heads.transpose(1, 2)
        qk, v = heads.split((c.num_heads + c.num_kv_heads, c.num_kv_heads), dim=1)
        if c.qk_layernorm:
            q, k = qk.split((c.num_heads, c.num_kv_heads), dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        return qk, v

    def attend(self, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor | None, cache: CacheView | None) -> torch.Tensor:
        """RoPE, the cache write and attention: [B, T, q_size], what the output projection takes."""
        c = self.config
        B, _, T, _ = v.shape
        q, k = apply_rotary(qk, cos, sin).split((c.num_heads, c.num_kv_heads), dim=1)  # q and k in one pass
        if cache is not None:
            k, v = cache.write(k, v)
        y = self._sdpa(q, k, v, mask)
        return y.transpose(1, 2).reshape(B, T, c.q_size)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        dtype = q.dtype
        if self.upcast_fp16 and dtype == torch.float16:
            q, k, v = q.float(), k.float(), v.float()
        gqa = self.config.num_kv_heads != self.config.num_heads
        dropout = self.config.attn_pdrop if self.training else 0.0
        if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask
            if dropout:
                raise ValueError("flex attention has no attention dropout: set attn_pdrop=0 or run.attention=sdpa")
            y = _compiled_flex()(q, k, v, block_mask=mask, scale=self.config.attn_scale, enable_gqa=gqa)
            return y.to(dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                           enable_gqa=gqa, scale=self.config.attn_scale)
        return y.to(dtype)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width = config.intermediate_size
        self.gated = config.gated_mlp
        self.fc = nn.Linear(config.hidden_size, 2 * width if self.gated else width, bias=config.mlp_bias)
        self.proj = nn.Linear(width, config.hidden_size, bias=config.mlp_bias)
        limit = config.gegelu_limit
        self.act = ACTIVATIONS.get(config.hidden_act)
        self.gegelu = (lambda h: gegelu(h, limit)) if config.hidden_act == "gegelu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.gegelu is not None:
            return self.proj(self.gegelu(h))
        if self.gated:  # first half is the gate, as in Phi-3's gate_up_proj
            gate, up = h.chunk(2, dim=-1)
            return self.proj(up * self.act(gate))
        return self.proj(self.act(h))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.parallel = config.parallel_residual
        self.norm_1 = make_norm(config, config.hidden_size)
        self.attn = Attention(config)
        self.norm_2 = None if self.parallel else make_norm(config, config.hidden_size)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: CacheView | None = None) -> torch.Tensor:
        h = self.norm_1(x)
        a = self.drop(self.attn(h, cos, sin, mask, cache))
        if self.parallel:
            return a + self.drop(self.mlp(h)) + x
        x = x + a
        return x + self.drop(self.mlp(self.norm_2(x)))


class PhiForgeModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_drop = nn.Dropout(config.embd_pdrop)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm_f = make_norm(config, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor | None = None, *,
                cache: KVCache | None = None, cache_rows: slice = slice(None), last_only: bool = False,
                return_hidden: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (or final hidden states) for token ids [B, T].

        ``input_pos`` [T] or [B, T]: absolute positions (default 0..T-1); with a ``cache`` they say where
        each row's new keys go, and ``cache_rows`` picks the rows of the cache these inputs belong to.
        ``last_only`` computes logits for the last position only (prefill for generation).
        ``attn_mask`` [B, 1, T, keys] (True = may attend) replaces the causal mask: packed documents.
        """
        B, T = input_ids.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=input_ids.device)
        positions = input_pos if input_pos.dim() == 2 else input_pos[None].expand(B, T)
        c = self.config
        x = self.embed_drop(self.embed(input_ids))
        if c.embedding_multiplier != 1.0:
            x = x * c.embedding_multiplier
        cos, sin = self.rope(positions, x.dtype)
        x = self.run_blocks(x, cos, sin, positions, attn_mask, cache, cache_rows)
        x = self.norm_f(x[:, -1:] if last_only else x)
        return x if return_hidden else self.logits(x)

    def run_blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   attn_mask: torch.Tensor | None, cache: KVCache | None, cache_rows: slice) -> torch.Tensor:
        """Hidden states [B, T, hidden] through every block, each with its mask and its view of the cache."""
        c = self.config
        span = int(positions.max()) + 1
        num_keys = span if cache is not None else x.shape[1]
        mask = attn_mask if attn_mask is not None else self.attention_mask(positions, num_keys)
        sparse = blocksparse_mask(c, positions, num_keys) if c.blocksparse_block_size else None
        for i, block in enumerate(self.blocks):
            view = CacheView(cache, i, cache_rows, positions, span) if cache is not None else None
            x = block(x, cos, sin, sparse if c.is_sparse_layer(i) else mask, view)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head: muP's width divisor and reserved ids masked (Phi-3-small); plain lm_head otherwise."""
        c = self.config
        out = self.lm_head(hidden)
        if c.logits_divisor != 1.0:
            out = out / c.logits_divisor
        if c.masked_token_ids:
            out[..., c.masked_token_ids] = torch.finfo(out.dtype).min
        return out

    def attention_mask(self, positions: torch.Tensor, num_keys: int) -> torch.Tensor | None:
        """None for plain causal attention over fresh keys; else a boolean [B or 1, 1, T, keys] mask.

        Key j is visible to the query at position p when j <= p and p - j < sliding_window,
        the eager/SDPA semantics of transformers (2047 keys for Phi-3-mini-4k's window of 2047).
        """
        window = self.config.sliding_window
        T = positions.shape[-1]
        windowed = window is not None and int(positions.max()) + 1 > window
        if num_keys == T and not windowed and bool((positions == torch.arange(T, device=positions.device)).all()):
            return None
        keys = torch.arange(num_keys, device=positions.device)
        p = positions[..., :, None]
        allowed = keys <= p
        if windowed:
            allowed &= p - keys < window
        return allowed[:, None]

    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache(self.config, batch_size, capacity, dtype=dtype or self.embed.weight.dtype,
                       device=self.embed.weight.device)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """GPT-style init: N(0, initializer_range) for matrices and embeddings, zero biases, unit norms.

        Each matrix draws its rows in fixed chunks of INIT_ROWS from a generator seeded by (seed, name,
        chunk), so a model whose parameters are row shards (FSDP DTensors after a meta-device build)
        fills its local rows with exactly the numbers a single process draws for them.
        """
        std = self.config.initializer_range
        done: set[int] = set()
        for prefix, module in self.named_modules():
            random_weight = isinstance(module, (nn.Linear, nn.Embedding))
            if not (random_weight or isinstance(module, (nn.LayerNorm, RMSNorm))):
                continue
            for leaf, param in module.named_parameters(recurse=False):
                if id(param) in done:  # a tied head: initialised once, as the embedding
                    continue
                done.add(id(param))
                local, offset = local_rows(param)
                if leaf == "bias":
                    local.zero_()
                elif not random_weight:
                    local.fill_(1.0)
                else:
                    _seeded_normal_rows(local, offset, param.shape[0], std, f"{seed}/{prefix}.{leaf}")

    def num_parameters(self) -> int:
        """Unique parameters (a tied head counts once), like transformers' num_parameters()."""
        return sum(p.numel() for p in self.parameters())


INIT_ROWS = 512  # rows per seeded draw in init_weights (fixed: any row sharding sees the same numbers)


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this process's part of ``param``, the global index of its first row); (param, 0) when unsharded.

    FSDP2 shards dim 0 only (Shard(0), optionally replicated on a second mesh dim for HSDP).
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if any(offset[1:]):
        raise ValueError(f"a parameter of shape {list(param.shape)} is sharded beyond dim 0 ({param.placements})")
    return param.to_local(), int(offset[0]) if offset else 0


def _seeded_normal_rows(local: torch.Tensor, offset: int, total_rows: int, std: float, key: str) -> None:
    """Fill rows offset..offset+len(local) of a [total_rows, ...] matrix with N(0, std), drawn per chunk of
    INIT_ROWS rows (each chunk drawn whole, whichever rows this process keeps)."""
    import hashlib

    rows = local.shape[0]
    first, last = offset // INIT_ROWS, (offset + rows - 1) // INIT_ROWS if rows else -1
    generator = torch.Generator(device=local.device)
    for chunk in range(first, last + 1):
        digest = hashlib.blake2b(f"{key}/{chunk}".encode(), digest_size=7).digest()
        generator.manual_seed(int.from_bytes(digest, "little"))
        lo = chunk * INIT_ROWS
        block = torch.empty((min(INIT_ROWS, total_rows - lo), *local.shape[1:]), device=local.device)
        block.normal_(0.0, std, generator=generator)
        a, b = max(lo, offset), min(lo + INIT_ROWS, offset + rows)
        local[a - offset : b - offset].copy_(block[a - lo : b - lo])


def build_model(config: ModelConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = 0) -> PhiForgeModel:
    """A model with freshly initialised weights (``device="meta"`` allocates nothing)."""
    with torch.device(device):
        model = PhiForgeModel(config).to(dtype)
    if str(device) != "meta":
        model.init_weights(seed or 0)
    return model
