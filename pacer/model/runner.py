"""ModelRunner, the real Executor: plan -> input tensors -> forward -> sample."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from pacer.config import CacheConfig, ModelConfig, parse_bytes
from pacer.memory import bound_shape_caches
from pacer.model import cpu_kernels
from pacer.model.attention import AttentionMetadata, KVCache, allocate_kv_cache
from pacer.model.config import LlamaConfig
from pacer.model.cuda_graphs import DecodeGraphs
from pacer.model.llama import LlamaModel, PackedLinear, block_formats, fuse_projections
from pacer.model.quant import QuantizedLinear
from pacer.model.sampler import apply_penalties, sample
from pacer.model.verify import accept_greedy, verify_sampled
from pacer.model.weights import Checkpoint
from pacer.request import Request
from pacer.scheduling import ModelOutput, SchedulerOutput

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class KVPayload:
    """The KV of one request's first `num_tokens` tokens, block by block from `first_block` on (the receiver holds
    the blocks before it), as `KVCache` lays them out per layer:
    k [layers, blocks, kv heads, head dim, block size], v [layers, blocks, kv heads, block size, head dim]."""

    num_tokens: int
    k: torch.Tensor
    v: torch.Tensor
    first_block: int = 0

    def skip(self, num_blocks: int) -> KVPayload:
        """Without its next `num_blocks` blocks, which the receiver holds: only the rest moves (copied, so that
        what is sent does not carry the whole tensor)."""
        num_blocks = min(num_blocks, self.k.shape[1])
        if num_blocks == 0:
            return self
        return KVPayload(self.num_tokens, self.k[:, num_blocks:].clone(), self.v[:, num_blocks:].clone(),
                         self.first_block + num_blocks)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto` picks bfloat16 only where the hardware computes it: on a CPU without AVX-512 BF16 or AMX,
    bf16 matmuls are emulated and run slower than fp32."""
    if name != "auto":
        return DTYPES[name]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else torch.float32


class ModelRunner:
    """Owns the weights, the physical KV cache and per-request sampling generators.

    Tokens with query length 1 (decodes, and 1-token chunks) go first in the flattened batch so
    the attention kernel sees them as one group; prefill chunks follow, verify rows among them (a row's last
    token and its drafts, after its context, as a chunk is), whose every position gets logits.
    """

    def __init__(self, model: LlamaModel, cache: KVCache, block_size: int, device: torch.device,
                 seed: int = 0, eos_token_id: int | None = None, null_block: int | None = None) -> None:
        """`null_block`: a block of `cache` beyond the KV manager's, reserved for the padding rows of CUDA graphs."""
        self.model = model
        self.eos_token_id = eos_token_id
        self.cache = cache
        self.block_size = block_size
        self.device = device
        self.generator = torch.Generator(device).manual_seed(seed)  # for requests without a seed
        self._generators: dict[str, torch.Generator] = {}
        self.null_block = null_block
        self.graphs: DecodeGraphs | None = None

    @classmethod
    def load(cls, checkpoint: Checkpoint, model_config: ModelConfig, cache_config: CacheConfig) -> ModelRunner:
        device = torch.device(model_config.device)
        dtype = resolve_dtype(model_config.dtype, model_config.device)
        bound_shape_caches()
        if model_config.threads is not None and device.type == "cpu":
            torch.set_num_threads(model_config.threads)
        config = checkpoint.config
        weights = fuse_projections(checkpoint.weights, config)
        with torch.device("meta"):
            model = LlamaModel(config, block_formats(weights), dtype)
        model = model.to_empty(device=device).to(dtype)
        model.rope.reset(device)
        model.load_weights(weights)
        del weights
        model.eval()
        if PackedLinear.available(device, dtype):  # after bound_shape_caches: the first oneDNN primitive is built here
            model.prepack_for_cpu()
        if device.type == "cpu":
            cls.warn_without_kernels(model)
        if model_config.int8_activations:
            model.use_int8_activations()
        num_blocks = cache_config.num_blocks or cls.num_blocks_for(cache_config, config, dtype)
        graphs = device.type == "cuda" and model_config.cuda_graphs
        cache = allocate_kv_cache(config.num_layers, num_blocks + graphs, cache_config.block_size,
                                  config.num_kv_heads, config.head_dim, dtype, device)
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB, %s)", num_blocks,
                    cache_config.block_size, num_blocks * cache_config.block_size,
                    num_blocks * cls.block_bytes(cache_config, config, dtype) / 2**30, dtype)
        return cls(model, cache, cache_config.block_size, device, seed=model_config.seed,
                   eos_token_id=checkpoint.tokenizer.eos_token_id, null_block=num_blocks if graphs else None)

    @staticmethod
    def warn_without_kernels(model: LlamaModel) -> None:
        """Build the C++ kernels now, not in the first step, and say what runs slowly without them."""
        if cpu_kernels.load():
            return
        if not cpu_kernels.enabled():  # a failed build has said what it costs already, once
            logger.warning("pacer's C++ kernels are turned off (%s=1): %s", cpu_kernels.NO_KERNEL_ENV,
                           cpu_kernels.FALLBACK_COST)
        if any(isinstance(m, QuantizedLinear) for m in model.modules()):
            logger.warning("without pacer's C++ kernels every projection dequantizes its GGUF blocks in numpy at each "
                           "call (--quantization none dequantizes them once, at load)")

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Capture the CUDA graphs of decode steps, if this runner reserved a block for them (CUDA, --cuda-graphs)."""
        if self.null_block is not None:
            self.graphs = DecodeGraphs(self.model, self.cache, self.block_size, max_batch,
                                       -(-max_model_len // self.block_size), self.null_block)

    @staticmethod
    def block_bytes(cache_config: CacheConfig, config: LlamaConfig, dtype: torch.dtype) -> int:
        return KVCache.bytes_per_block(config.num_layers, cache_config.block_size, config.num_kv_heads,
                                       config.head_dim, dtype)

    @classmethod
    def num_blocks_for(cls, cache_config: CacheConfig, config: LlamaConfig, dtype: torch.dtype) -> int:
        num_blocks = parse_bytes(cache_config.kv_cache_memory) // cls.block_bytes(cache_config, config, dtype)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory {cache_config.kv_cache_memory} holds no KV block "
                             f"({cls.block_bytes(cache_config, config, dtype)} bytes each)")
        return num_blocks

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def quantization(self) -> str:
        """The block formats the projections compute with (`Q4_1+Q8_0`), or `none`: part of what a latency profile
        is valid for."""
        layers = [m for m in self.model.modules() if isinstance(m, QuantizedLinear)]
        formats = "+".join(sorted({m.qtype.name for m in layers})) or "none"
        return formats + "-a8" if any(m.int8_activations for m in layers) else formats

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights take in memory: parameters, blocks (a tied head's once) and oneDNN's packed copies."""
        tensors = {t.data_ptr(): t for t in self.model.state_dict(keep_vars=True).values()}
        tensors |= {id(m): m.packed for m in self.model.modules() if isinstance(m, PackedLinear)}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    @property
    def kernels(self) -> str:
        """The GEMM path and the C++ kernels' revision: part of what a latency profile is valid for."""
        head = self.model.lm_head
        gemm = ("onednn-prepacked" if isinstance(head, PackedLinear) else
                "gguf-blocks" if isinstance(head, QuantizedLinear) else "torch-linear")
        if self.graphs is not None:
            return f"{gemm}+cuda-graphs"
        return f"{gemm}+cpp-{cpu_kernels.revision()}" if self.device.type == "cpu" and cpu_kernels.load() else gemm

    @property
    def num_blocks(self) -> int:
        """Blocks for the KV manager to hand out (the CUDA graphs' padding block is not one of them)."""
        return self.cache.num_blocks - (self.null_block is not None)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> ModelOutput:
        start = time.perf_counter()
        for rid in plan.finished_ids:
            self._generators.pop(rid, None)
        counts, drafted = plan.num_scheduled_tokens, plan.draft_token_ids
        batch = sorted(plan.requests, key=lambda r: counts[r.request_id] != 1)  # stable: decodes first
        input_ids: list[int] = []
        positions: list[int] = []
        decode, prefill, sampling, verifying = [], [], [], []
        for r in batch:
            n, start_pos = counts[r.request_id], r.num_computed_tokens
            drafts = drafted.get(r.request_id) if drafted else None
            if drafts:  # a verify row: its last token, then the drafts, each position sampled
                verifying.append((len(input_ids), r, drafts))
                input_ids.append(r.token_ids[start_pos])
                input_ids += drafts
            else:
                input_ids += r.token_ids[start_pos:start_pos + n]
            positions += range(start_pos, start_pos + n)
            if n == 1:
                decode.append((r.block_ids, start_pos + 1))
            else:
                prefill.append((r.block_ids, start_pos, n))
            if plan.samples(r) and not drafts:
                sampling.append((len(input_ids) - 1, r))
        to = {"device": self.device, "dtype": torch.long}
        sampled: dict[str, int] = {}
        logprobs = {}
        logits = None
        if self.graphs is not None and decode and not prefill and len(sampling) == len(batch):
            logits = self.graphs.run(input_ids, positions, decode)
        if logits is None:
            meta = AttentionMetadata.build(self.block_size, decode, prefill, self.device)
            rows = [i for i, _ in sampling] + [i + j for i, _, drafts in verifying for j in range(len(drafts) + 1)]
            logits = self.model(torch.tensor(input_ids, **to), torch.tensor(positions, **to), self.cache, meta,
                                torch.tensor(rows, **to))
        accepted = self._verify(logits[len(sampling):], verifying, sampled) if verifying else {}
        if sampling:
            logits = logits[:len(sampling)]
            requests = [r for _, r in sampling]
            if any(r.sampling.penalized for r in requests):
                apply_penalties(logits, requests)  # in place; rows without penalties are left alone
            self._mask_stops_before_min_tokens(logits, requests)
            tokens, token_logprobs = sample(logits, [r.sampling for r in requests],
                                            [self._generator(r) for r in requests])
            for r, token, lp in zip(requests, tokens, token_logprobs):
                sampled[r.request_id] = token
                if lp is not None:
                    logprobs[r.request_id] = lp
        return ModelOutput(sampled, logprobs, time.perf_counter() - start, accepted)

    def _verify(self, logits: torch.Tensor, verifying: list[tuple[int, Request, list[int]]],
                sampled: dict[str, int]) -> dict[str, list[int]]:
        """Verify each row's drafts against its logits ([k + 1, V] each, in `verifying` order): the accepted drafts
        per request, and the token after them into `sampled`."""
        greedy = [r.sampling.greedy for _, r, _ in verifying]
        targets = logits.argmax(dim=-1).tolist() if any(greedy) else []  # one pass over the rows, one sync
        accepted = {}
        row = 0
        for (_, r, drafts), is_greedy in zip(verifying, greedy):
            rows = slice(row, row + len(drafts) + 1)
            accepted[r.request_id], sampled[r.request_id] = (
                accept_greedy(targets[rows], drafts) if is_greedy
                else verify_sampled(logits[rows], drafts, r.sampling, self._generator(r)))
            row = rows.stop
        return accepted

    @torch.inference_mode()
    def export_kv(self, block_ids: list[int], num_tokens: int) -> KVPayload:
        """A copy of the KV of a request's first `num_tokens` tokens (its blocks), on the CPU: what moves to
        another engine in disaggregated serving."""
        index = torch.tensor(block_ids[:-(-num_tokens // self.block_size)], device=self.device)
        return KVPayload(num_tokens, torch.stack([k[index] for k in self.cache.k]).cpu(),
                         torch.stack([v[index] for v in self.cache.v]).cpu())

    @torch.inference_mode()
    def import_kv(self, block_ids: list[int], payload: KVPayload) -> None:
        """Write another engine's `export_kv` into these blocks (same model, dtype and block size), from the
        payload's first block on."""
        index = torch.tensor(block_ids[payload.first_block:payload.first_block + payload.k.shape[1]],
                             device=self.device)
        for layer, (k, v) in enumerate(zip(payload.k, payload.v)):
            self.cache.k[layer][index] = k.to(self.device, self.dtype)
            self.cache.v[layer][index] = v.to(self.device, self.dtype)

    def _mask_stops_before_min_tokens(self, logits: torch.Tensor, requests: list[Request]) -> None:
        for row, r in enumerate(requests):
            if r.num_output_tokens < r.sampling.min_tokens:
                banned = list(r.sampling.stop_token_ids)
                if self.eos_token_id is not None:
                    banned.append(self.eos_token_id)
                logits[row, banned] = -torch.inf

    def _generator(self, request: Request) -> torch.Generator | None:
        if request.sampling.greedy:
            return None
        if request.sampling.seed is None:
            return self.generator
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = self._generators[request.request_id] = torch.Generator(self.device).manual_seed(
                request.sampling.seed)
        return generator
