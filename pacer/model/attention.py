"""Paged attention over a block-pooled KV cache: a plain-torch reference path that runs on any
device, and C++ kernels for CPU that read K/V where they lie in the pool (decode; bf16 prefill
chunks where the CPU has AVX-512 BF16)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pacer.model import cpu_kernels


@dataclass
class KVCache:
    """Per-layer K and V block pools (contiguous, one dtype):

        k[layer]: [num_blocks, num_kv_heads, head_dim, block_size]  (each block's tile transposed)
        v[layer]: [num_blocks, num_kv_heads, block_size, head_dim]

    Token p of a request lives at offset p % block_size of block block_table[p // block_size].
    One (block, kv head) is a contiguous tile: the decode kernel streams it, computing a block's
    scores as vectors over its tokens from the transposed K tile and the weighted sum along
    head_dim from V rows; the prefill gather copies tiles whole.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.v[0].shape[2]

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes one block takes across all layers, K and V: the unit the engine sizes the pool in."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> KVCache:
    # Zeros, not empty: every page is committed now, as serving leaves them once it has written each block. Left to
    # first touch, `pacer profile` timed decodes over never-written contexts slower than served ones, and the pool
    # would fault in, or fail to, mid-run.
    pool = torch.zeros((num_layers, 2, num_blocks * num_kv_heads * block_size * head_dim), dtype=dtype, device=device)
    return KVCache(
        k=[pool[i, 0].view(num_blocks, num_kv_heads, head_dim, block_size) for i in range(num_layers)],
        v=[pool[i, 1].view(num_blocks, num_kv_heads, block_size, head_dim) for i in range(num_layers)],
    )


@dataclass
class PrefillChunk:
    """The tokens of one request that are not a single-token decode."""

    start: int  # index of the chunk's first token in the flat batch
    num_tokens: int
    num_cached: int  # tokens of this request already in the cache before this chunk
    block_ids: torch.Tensor  # [ceil((num_cached + num_tokens) / block_size)] int64: the blocks it reads

    @functools.cached_property
    def mask(self) -> torch.Tensor | None:
        """[num_tokens, num_cached + num_tokens] bool, True where a query may attend (causal, aligned
        bottom-right); None without earlier context (SDPA's is_causal). Built on first use, by the SDPA
        path only (the C++ prefill kernel needs none), then shared by every layer of the step."""
        if not self.num_cached:
            return None
        total = self.num_cached + self.num_tokens
        keys = torch.arange(total, device=self.block_ids.device)
        return keys[None, :] <= torch.arange(self.num_cached, total, device=self.block_ids.device)[:, None]


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner, shared by all layers.

    The flat batch is the num_decode_tokens decode tokens (one per request, query length 1), then
    each prefill chunk's tokens contiguously, in the order of `prefills`.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32, padded with block 0
    decode_context_lens: torch.Tensor  # [num_decodes] int32: context length including the new token
    prefills: list[PrefillChunk]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @classmethod
    def build(
        cls,
        block_size: int,
        decode: Sequence[tuple[Sequence[int], int]] = (),
        prefill: Sequence[tuple[Sequence[int], int, int]] = (),
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """decode: (block_ids, context_len including the new token) per decode request;
        prefill: (block_ids, num_cached, num_new) per prefill chunk. Tokens are laid out in that order."""
        slots: list[int] = []
        for block_ids, context_len in decode:
            _check_fits(block_ids, context_len, block_size)
            pos = context_len - 1
            slots.append(block_ids[pos // block_size] * block_size + pos % block_size)
        max_blocks = max((len(b) for b, _ in decode), default=0)
        tables = [list(b) + [0] * (max_blocks - len(b)) for b, _ in decode]

        chunks = []
        for block_ids, num_cached, num_new in prefill:
            if num_new < 1 or num_cached < 0:
                raise ValueError(f"prefill chunk needs num_new >= 1 and num_cached >= 0, got {num_new}, {num_cached}")
            end = num_cached + num_new
            _check_fits(block_ids, end, block_size)
            used = block_ids[: -(-end // block_size)]
            ids = torch.tensor(used, dtype=torch.int64, device=device)
            chunks.append(PrefillChunk(len(slots), num_new, num_cached, ids))
            slots.extend(used[p // block_size] * block_size + p % block_size for p in range(num_cached, end))

        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            num_decode_tokens=len(decode),
            decode_block_tables=torch.tensor(tables, dtype=torch.int32, device=device).view(len(decode), max_blocks),
            decode_context_lens=torch.tensor([c for _, c in decode], dtype=torch.int32, device=device),
            prefills=chunks,
        )


def _check_fits(block_ids: Sequence[int], num_tokens: int, block_size: int) -> None:
    if num_tokens < 1 or len(block_ids) * block_size < num_tokens:
        raise ValueError(f"{num_tokens} tokens do not fit {len(block_ids)} blocks of {block_size}")


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write the new tokens' k, v into layer `layer` of the cache (in place), then causal attention
    of each new token over its request's cached context and itself.

    q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] (after RoPE; any strides with
    head_dim contiguous). Returns [T, num_heads, head_dim] in q's dtype.
    GQA: query head h reads kv head h // (num_heads // num_kv_heads).
    Decodes go to the C++ kernel on CPU when it is available, otherwise to the reference path.
    """
    k_cache, v_cache = cache.k[layer], cache.v[layer]
    ops = cpu_kernels.attention_ops() if _kernel_applies(q, k_cache) else None
    if ops is None:
        return paged_attention_reference(q, k, v, cache, layer, meta, scale)
    ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    n = meta.num_decode_tokens
    if n == q.shape[0]:  # decode-only step: no slicing (each view costs microseconds, 30 layers a step)
        ops.decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale, out)
        return out
    if n:
        ops.decode(q[:n], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale, out[:n])
    _prefill_attention(q, k, v, k_cache, v_cache, meta, scale, out, ops)
    return out


def paged_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """paged_attention in plain torch (any device): gathers each request's blocks into dense K/V."""
    k_cache, v_cache = cache.k[layer], cache.v[layer]
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    n = meta.num_decode_tokens
    if n:
        out[:n] = _decode_reference(q[:n], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale)
    _prefill_attention(q, k, v, k_cache, v_cache, meta, scale, out)
    return out


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Each new token's [num_kv_heads, head_dim] k and v into its slot, in torch (any device)."""
    block_size = v_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, :, :, offsets] = k
    v_cache[blocks, :, offsets] = v


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first num_tokens tokens of one request as dense [num_kv_heads, num_tokens, head_dim] k, v."""
    num_kv_heads, head_dim = v_cache.shape[1], v_cache.shape[3]
    k = k_cache[block_ids].permute(1, 0, 3, 2).reshape(num_kv_heads, -1, head_dim)
    v = v_cache[block_ids].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)
    return k[:, :num_tokens], v[:, :num_tokens]


def _decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    # All decodes at once: gather padded [B, KV, S, hd], mask the padding, fp32 softmax.
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = v_cache.shape[1]
    tables = block_tables.long()
    kd = k_cache[tables].permute(0, 2, 1, 4, 3).reshape(num_seqs, num_kv_heads, -1, head_dim).float()
    vd = v_cache[tables].transpose(1, 2).reshape(num_seqs, num_kv_heads, -1, head_dim).float()
    qg = q.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim).float()
    scores = (qg @ kd.transpose(-1, -2)) * scale  # [B, KV, group, S]
    pad = torch.arange(kd.shape[2], device=q.device) >= context_lens.to(q.device).long()[:, None]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vd
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def _prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    ops: object | None = None,
) -> None:
    """Per chunk: the C++ kernel where `ops` has one for it (bf16 on a CPU with AVX-512 BF16: it reads the pool in
    place), else SDPA over the fresh k/v (no earlier context, is_causal) or over the request's blocks gathered once
    (earlier context, causal mask aligned bottom-right). Prefill is compute bound."""
    for c in meta.prefills:
        rows = slice(c.start, c.start + c.num_tokens)
        if ops is not None and ops.prefill(q[rows], k_cache, v_cache, c.block_ids, c.num_cached, scale, out[rows]):
            continue
        qc = q[rows].transpose(0, 1)  # [H, n, hd]
        if c.num_cached == 0:
            kc, vc = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        else:
            kc, vc = gather_kv(k_cache, v_cache, c.block_ids, c.num_cached + c.num_tokens)
        out[rows] = _sdpa(qc, kc, vc, c.mask, scale).transpose(0, 1)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    # q: [H, n, hd]; k, v: [KV, S, hd] -> [H, n, hd]. Query head h reads kv head h // group.
    # 4-d inputs: 3-d ones take SDPA's slow math path on CPU (2-3x slower here). enable_gqa
    # matches repeat_interleave's speed (bf16 and fp32) without materialising the copies.
    out = F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
    )
    return out[0]


def _kernel_applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (
        q.is_cpu
        and q.dtype in _KERNEL_DTYPES
        and k_cache.dtype == q.dtype
        and cpu_kernels.enabled()
    )


_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
