"""Paged attention: the C++ decode kernel and the torch reference path against a naive dense causal
attention computed per request, on random block tables, mixed batches and odd block sizes."""

from __future__ import annotations

import logging
import random
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pacer.model import attention as A
from pacer.model import cpu_kernels as K
from pacer.model.attention import AttentionMetadata, KVCache, allocate_kv_cache, paged_attention
from tests.strict import kernel_ops

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add wake-up latency (large on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def kernel():
    return kernel_ops(K.attention_ops(), "C++ paged attention kernel")


class Case:
    """A random batch: per request its full K/V history, its blocks shuffled over the pool, the
    earlier tokens already in the cache, the new tokens as the flat q/k/v."""

    def __init__(self, decode_lens: list[int], prefills: list[tuple[int, int]], block_size: int,
                 dtype: torch.dtype, num_heads: int = 9, num_kv_heads: int = 3, head_dim: int = 64,
                 seed: int = 0, device: str = "cpu") -> None:
        gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        # (num_cached, num_new) per request; a decode is one new token after context_len - 1 cached
        self.requests = [(n - 1, 1) for n in decode_lens] + list(prefills)
        blocks_per = [-(-(c + n) // block_size) + rng.randint(0, 1) for c, n in self.requests]  # some spare
        num_blocks = sum(blocks_per) + 5
        physical = list(range(num_blocks))
        rng.shuffle(physical)
        self.tables, at = [], 0
        for count in blocks_per:
            self.tables.append(physical[at:at + count])
            at += count
        self.cache = allocate_kv_cache(2, num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
        for t in self.cache.k + self.cache.v:  # garbage everywhere the requests do not own
            t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
        self.layer = 1
        self.block_size, self.scale = block_size, head_dim**-0.5
        self.full_k, self.full_v = [], []  # per request [num_cached + num_new, KV, hd]
        qs, ks, vs = [], [], []
        for (c, n), table in zip(self.requests, self.tables):
            fk = torch.randn(c + n, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
            fv = torch.randn(c + n, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
            for p in range(c):  # the earlier context, written slot by slot
                b, o = table[p // block_size], p % block_size
                self.cache.k[self.layer][b, :, :, o] = fk[p]
                self.cache.v[self.layer][b, :, o] = fv[p]
            self.full_k.append(fk)
            self.full_v.append(fv)
            qs.append(torch.randn(n, num_heads, head_dim, generator=gen).to(dtype).to(device))
            ks.append(fk[c:])
            vs.append(fv[c:])
        qs.append(torch.empty(0, num_heads, head_dim, dtype=dtype, device=device))  # cat needs one tensor
        ks.append(torch.empty(0, num_kv_heads, head_dim, dtype=dtype, device=device))
        vs.append(torch.empty(0, num_kv_heads, head_dim, dtype=dtype, device=device))
        self.q, self.k, self.v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
        self.meta = AttentionMetadata.build(
            block_size,
            decode=[(t, n) for t, n in zip(self.tables, decode_lens)],
            prefill=[(t, c, n) for t, (c, n) in zip(self.tables[len(decode_lens):], prefills)],
            device=device,
        )

    def fresh_cache(self) -> KVCache:
        return KVCache(k=[t.clone() for t in self.cache.k], v=[t.clone() for t in self.cache.v])

    def naive(self) -> torch.Tensor:
        """Dense causal attention per request from its full K/V, fp32, one query row at a time."""
        outs = []
        for (c, n), fk, fv, start in zip(self.requests, self.full_k, self.full_v, self._starts()):
            group = self.q.shape[1] // fk.shape[1]
            k = fk.float().repeat_interleave(group, dim=1)  # [S, H, hd]
            v = fv.float().repeat_interleave(group, dim=1)
            for i in range(n):
                q = self.q[start + i].float()  # [H, hd]
                s = torch.einsum("hd,shd->hs", q, k[: c + i + 1]) * self.scale
                outs.append(torch.einsum("hs,shd->hd", s.softmax(-1), v[: c + i + 1]))
        return torch.stack(outs).to(self.q.dtype) if outs else torch.empty_like(self.q)

    def _starts(self) -> list[int]:
        starts, at = [], 0
        for _, n in self.requests:
            starts.append(at)
            at += n
        return starts

    def run(self, fn) -> tuple[torch.Tensor, KVCache]:
        cache = self.fresh_cache()
        out = fn(self.q, self.k, self.v, cache, self.layer, self.meta, self.scale)
        return out, cache


def assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


def assert_written(case: Case, cache: KVCache) -> None:
    """The new tokens landed at their slots, nothing else changed."""
    ek, ev = case.cache.k[case.layer].clone(), case.cache.v[case.layer].clone()
    bs = case.block_size
    for slot, k, v in zip(case.meta.slot_mapping.tolist(), case.k, case.v):
        ek[slot // bs, :, :, slot % bs] = k
        ev[slot // bs, :, slot % bs] = v
    assert torch.equal(cache.k[case.layer], ek) and torch.equal(cache.v[case.layer], ev)
    assert torch.equal(cache.k[0], case.cache.k[0]) and torch.equal(cache.v[0], case.cache.v[0])


MIXED = [
    ([5, 17, 1, 33, 64], [(0, 7), (9, 6), (31, 40)]),  # decodes + fresh and continued prefills
    ([2, 48, 16], []),  # decode only
    ([], [(0, 19), (20, 1), (3, 30)]),  # prefill only, one 1-token chunk
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 1, 3, 7])
@pytest.mark.parametrize("decode_lens,prefills", MIXED)
def test_fast_path_matches_reference_and_naive(kernel, dtype, block_size, decode_lens, prefills):
    case = Case(decode_lens, prefills, block_size, dtype, seed=block_size)
    fast, fast_cache = case.run(paged_attention)
    ref, ref_cache = case.run(A.paged_attention_reference)
    assert_close(fast, ref, dtype)
    assert_close(fast, case.naive(), dtype)
    assert_close(ref, case.naive(), dtype)
    assert_written(case, fast_cache)
    assert_written(case, ref_cache)


# The families' shapes run the generic kernel loops: Qwen3-0.6B (16, 8, 128), Llama 3 8B and Mistral 7B (32, 8, 128),
# Qwen2.5-7B's group of 7 (28, 4, 128), Qwen2.5-0.5B (14, 2, 64), a head_dim of 32 and 16 (the tiny test models).
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 16), (4, 2, 32), (4, 4, 64), (8, 1, 128),
                                                            (16, 8, 128), (32, 8, 128), (28, 4, 128), (14, 2, 64)])
@pytest.mark.parametrize("block_size", [4, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_head_shapes(kernel, num_heads, num_kv_heads, head_dim, block_size, dtype):
    case = Case([3, 20, 77], [(5, 4)], block_size, dtype, num_heads, num_kv_heads, head_dim, seed=1)
    fast, _ = case.run(paged_attention)
    assert_close(fast, case.naive(), dtype)


def test_long_decode_context_on_two_threads(kernel):
    torch.set_num_threads(2)  # enough work (2200 tokens x 3 kv heads) for the kernel's parallel path
    case = Case([1500, 700, 40], [], 16, torch.bfloat16, seed=2)
    assert_close(case.run(paged_attention)[0], case.naive(), torch.bfloat16)


def test_kernel_reads_strided_q_and_kv(kernel):
    """The model passes q, k, v as views into one qkv tensor."""
    case = Case([9, 30], [(4, 5)], 16, torch.float32, seed=3)
    qkv = torch.cat([case.q, case.k, case.v], dim=1)  # [T, H + 2 KV, hd]
    q, k, v = qkv.split([9, 3, 3], dim=1)
    cache = case.fresh_cache()
    out = paged_attention(q, k, v, cache, case.layer, case.meta, case.scale)
    assert_close(out, case.naive(), torch.float32)
    assert_written(case, cache)


def test_empty_batch(kernel):
    case = Case([], [], 16, torch.float32)
    out, cache = case.run(paged_attention)
    assert out.shape == (0, 9, 64)
    assert_written(case, cache)


def test_no_kernel_env_uses_reference(monkeypatch):
    monkeypatch.setenv(K.NO_KERNEL_ENV, "1")
    monkeypatch.setattr(K, "attention_ops", lambda: pytest.fail("kernel used despite the env var"))
    case = Case([5, 17], [(0, 7), (9, 6)], 3, torch.float32)
    out, cache = case.run(paged_attention)
    assert_close(out, case.naive(), torch.float32)
    assert_written(case, cache)


def test_load_cpu_kernel(kernel, monkeypatch):
    assert K.load()
    monkeypatch.setenv(K.NO_KERNEL_ENV, "1")
    assert not K.load()


def test_failed_build_warns_once_and_falls_back(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(K, "_loader", K._KernelLoader())
    monkeypatch.setattr("torch.utils.cpp_extension.load", broken)
    case = Case([5], [(2, 3)], 4, torch.float32)
    with caplog.at_level(logging.WARNING, logger=K.__name__):
        for _ in range(3):
            out, _ = case.run(paged_attention)
            assert_close(out, case.naive(), torch.float32)
    assert len([r for r in caplog.records if "no compiler" in r.getMessage()]) == 1


def test_kernel_builds_once_under_threads(monkeypatch):
    calls = []
    loader = K._KernelLoader()
    monkeypatch.setattr(loader, "_build", lambda: calls.append(1) or "ops")
    threads = [threading.Thread(target=loader.get) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loader.get() == "ops" and len(calls) == 1


def test_kernel_rejects_out_of_range_block(kernel):
    case = Case([20], [], 4, torch.float32)
    case.meta.decode_block_tables[0, 1] = case.cache.num_blocks
    with pytest.raises(RuntimeError, match="out of range"):
        case.run(paged_attention)


def test_build_metadata_slots_and_layout():
    meta = AttentionMetadata.build(4, decode=[([7, 2], 6), ([5], 1)], prefill=[([3, 9, 1], 3, 4)])
    # decode positions 5 and 0; prefill positions 3..6 of blocks [3, 9]
    assert meta.slot_mapping.tolist() == [2 * 4 + 1, 5 * 4, 3 * 4 + 3, 9 * 4, 9 * 4 + 1, 9 * 4 + 2]
    assert meta.num_decode_tokens == 2
    assert meta.decode_block_tables.tolist() == [[7, 2], [5, 0]]
    assert meta.decode_context_lens.tolist() == [6, 1]
    (chunk,) = meta.prefills
    assert (chunk.start, chunk.num_tokens, chunk.num_cached, chunk.block_ids.tolist()) == (2, 4, 3, [3, 9])
    assert torch.equal(chunk.mask, torch.ones(4, 7, dtype=torch.bool).tril(3))  # causal, bottom-right
    assert AttentionMetadata.build(4, prefill=[([3], 0, 2)]).prefills[0].mask is None  # is_causal instead
    with pytest.raises(ValueError):
        AttentionMetadata.build(4, decode=[([7], 5)])
    with pytest.raises(ValueError):
        AttentionMetadata.build(4, prefill=[([7], 2, 3)])


def test_bytes_per_block():
    assert KVCache.bytes_per_block(30, 16, 3, 64, torch.bfloat16) == 2 * 30 * 16 * 3 * 64 * 2
    cache = allocate_kv_cache(2, 5, 16, 3, 64, torch.float32, "cpu")
    assert cache.num_blocks == 5 and cache.block_size == 16
    assert cache.k[1].shape == (5, 3, 64, 16) and cache.v[1].shape == (5, 3, 16, 64)


def _has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512_bf16(), reason="the bf16 prefill kernel needs AVX-512 BF16")
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_kernel_over_long_context(kernel, block_size):
    # Chunks over contexts that span many blocks and tiles, a one-token chunk, a fresh prompt, and decodes beside
    # them: the bf16 kernel within bf16 tolerance of the naive fp32 attention, and no worse than the SDPA path.
    case = Case([30, 5], [(300, 64), (0, 40), (200, 1), (17, 33), (700, 100)], block_size, torch.bfloat16, seed=3)
    fast, fast_cache = case.run(paged_attention)
    ref, _ = case.run(A.paged_attention_reference)
    naive = case.naive()
    assert_close(fast, naive, torch.bfloat16)
    assert (fast.float() - naive.float()).abs().max() <= (ref.float() - naive.float()).abs().max() * 1.5
    assert_written(case, fast_cache)


def test_prefill_kernel_declines_what_it_does_not_cover(kernel):
    # float32, and a block size that is not a multiple of 16: it returns False and writes nothing (SDPA runs).
    for dtype, block_size in ((torch.float32, 16), (torch.bfloat16, 8)):
        cache = allocate_kv_cache(1, 4, block_size, 3, 64, dtype, "cpu")
        q = torch.randn(5, 9, 64).to(dtype)
        out = torch.zeros_like(q)
        ids = torch.arange(4, dtype=torch.int64)
        assert not kernel.prefill(q, cache.k[0], cache.v[0], ids, 3, 0.125, out)
        assert not out.any()


def test_kv_pool_is_written_at_allocation():
    # zeros, not left to first touch: see allocate_kv_cache
    cache = allocate_kv_cache(2, 5, 16, 3, 64, torch.float32, "cpu")
    assert all(not t.any() for t in cache.k + cache.v)


@settings(max_examples=25, deadline=None)
@given(
    decode_lens=st.lists(st.integers(1, 40), max_size=4),
    prefills=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 12)), max_size=3),
    block_size=st.sampled_from([1, 2, 5, 16, 32]),
    heads=st.sampled_from([(4, 2, 8), (9, 3, 64)]),  # generic kernel loops; the vectorized SmolLM2 shape
    seed=st.integers(0, 1000),
)
def test_random_batches(kernel, decode_lens, prefills, block_size, heads, seed):
    case = Case(decode_lens, prefills, block_size, torch.float32, *heads, seed=seed)
    fast, fast_cache = case.run(paged_attention)
    assert_close(fast, case.naive(), torch.float32)
    assert_written(case, fast_cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_path_on_cuda(dtype):
    case = Case([5, 17, 33], [(0, 7), (9, 6)], 16, dtype, device="cuda")
    out, cache = case.run(paged_attention)
    assert out.device.type == "cuda"
    assert_close(out, case.naive(), dtype)
    assert_written(case, cache)
