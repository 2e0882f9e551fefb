"""The Llama architecture over a flattened batch of tokens and a paged KV cache: SmolLM2 and Llama 3.x, and the
families that differ from it by a switch in `LlamaConfig` (Mistral, Qwen2's q/k/v biases, Qwen3's q/k norms).

One forward pass takes T tokens from many requests (decode tokens and prefill chunks mixed, no
padding), writes their K/V into the paged cache and returns logits only for the rows that sample.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from pacer.model import cpu_kernels
from pacer.model.attention import AttentionMetadata, KVCache, paged_attention
from pacer.model.config import LlamaConfig
from pacer.model.quant import QuantizedEmbedding, QuantizedLinear, QuantizedTensor, cat_rows

logger = logging.getLogger(__name__)

Weight = torch.Tensor | QuantizedTensor
Formats = dict[str, GGMLQuantizationType]  # weight name -> the block format it is kept in


class RotaryEmbedding(nn.Module):
    """RoPE in the rotate-half convention (HF Llama), cos/sin tabulated once in fp32. `freq_factors` (one per rotated
    pair) divide the inverse frequencies: Llama 3.1's `llama3` and `linear` scaling (see LlamaConfig)."""

    def __init__(self, head_dim: int, theta: float, max_positions: int,
                 freq_factors: tuple[float, ...] | None = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_positions, self.freq_factors = head_dim, theta, max_positions, freq_factors
        self.reset(None)

    def reset(self, device: torch.device | None) -> None:
        """(Re)compute the tables, e.g. after the model was built on the meta device."""
        hd = self.head_dim
        inv_freq = 1.0 / self.theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)
        if self.freq_factors is not None:  # divided in fp64, so that the fp32 result rounds like transformers' own
            factors = torch.tensor(self.freq_factors, dtype=torch.float64, device=device)
            inv_freq = (inv_freq.double() / factors).float()
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, inv_freq)  # [P, hd/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for each token's position: [T, 1, hd/2] each, computed once per forward pass."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim] rotated by each token's position (rotate-half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _fused_ops(x: torch.Tensor) -> object | None:
    """pacer's fused C++ layers where they apply to x (CPU, fp32/bf16, kernels built), else None."""
    return cpu_kernels.layer_ops() if x.is_cpu and x.dtype in (torch.float32, torch.bfloat16) else None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm that can take the residual stream too: `norm(x, residual)` adds x into the residual (in place where
    fused) and returns (normed sum, residual), as vLLM's fused_add_rms_norm does. On CPU both run as one C++ pass
    instead of torch's chain of eight ops."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        ops = _fused_ops(x)
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps) if ops is not None else super().forward(x)
        if ops is not None:
            return ops.add_rms_norm(x, residual, self.weight, self.eps), residual
        residual = x + residual
        return super().forward(residual), residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over the fused projection's [gate | up] halves; one C++ pass on CPU."""
    ops = _fused_ops(gate_up)
    if ops is not None:
        return ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class PackedLinear(nn.Module):
    """A projection whose weight oneDNN has reordered once into its blocked layout (the bias, if any, as it is).

    Plain `F.linear` repacks the weight inside every call, which costs most at small decode batches. This is what
    vLLM's CPU backend does with its own oneDNN handle; torch exposes the same primitive as mkldnn ops.
    They are private (`torch.ops.mkldnn._*`, no stability promise), so build one only where `available` says they
    work.
    """

    # The batch size oneDNN tunes the packed layout for; it serves every other size too (vLLM uses 32 as well).
    PACK_FOR_BATCH = 32

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = _pack(weight.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x, self.packed, self.bias)

    @staticmethod
    def available(device: torch.device, dtype: torch.dtype) -> bool:
        """oneDNN on a CPU whose torch has the private ops and packs this dtype with them: its bf16 path needs
        AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT, so on an AVX2-only CPU bf16 projections stay `F.linear` (torch computes
        them another way), as they do everywhere if a torch release drops or changes the ops."""
        return device.type == "cpu" and torch.backends.mkldnn.is_available() and _packs(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN prepacked"


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, PackedLinear.PACK_FOR_BATCH)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


@functools.cache
def _packs(dtype: torch.dtype) -> bool:
    """Do oneDNN's private ops exist here, pack a weight of this dtype and multiply like F.linear, with and without
    a bias? Asked once per dtype, of a tiny weight; where they do not, one warning says so and the projections stay
    F.linear."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=generator).to(dtype)  # [out, in]
    x = torch.randn(3, 32, generator=generator).to(dtype)
    try:
        for bias in (None, torch.randn(16, generator=generator).to(dtype)):
            out = _packed_linear(x, _pack(weight), bias)
            # bf16: both round their fp32 sums, which may differ in order, to 8 bits of mantissa
            if not torch.allclose(out.float(), F.linear(x, weight, bias).float(), rtol=2e-2, atol=2e-2):
                raise RuntimeError("its output differs from F.linear's")
    except Exception as error:  # noqa: BLE001 - private ops: missing (AttributeError), refused (RuntimeError), wrong
        logger.warning("oneDNN's prepacked linear does not work here for %s weights (%s): projections use F.linear, "
                       "which repacks the weight in every call (1.1-2.3x slower)", dtype, error)
        return False
    return True


def linear(in_features: int, out_features: int, qtype: GGMLQuantizationType | None, bias: bool = False) -> nn.Module:
    """A projection: fp weights, or GGUF blocks of `qtype`; the bias, if any, in the model's dtype."""
    if qtype is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return QuantizedLinear(in_features, out_features, qtype, bias)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, formats: Formats, prefix: str) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        # q, k and v in one matmul: [(H + 2 KV) * hd, D], and [(H + 2 KV) * hd] biases (Qwen2)
        self.qkv_proj = linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                               formats.get(prefix + "qkv_proj.weight"), bias=config.attention_bias)
        self.o_proj = linear(self.num_heads * self.head_dim, config.hidden_size, formats.get(prefix + "o_proj.weight"))
        # Qwen3: one RMSNorm over each head of q, one over each head of k, before RoPE
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, layer: int,
                meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x).view(T, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qk = qkv[:, : self.num_heads + self.num_kv_heads]
        if self.q_norm is not None:  # the norms see [T * heads, hd] rows (contiguous copies, as the fused op wants)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q.reshape(-1, self.head_dim)).view(T, self.num_heads, self.head_dim),
                            self.k_norm(k.reshape(-1, self.head_dim)).view(T, self.num_kv_heads, self.head_dim)), 1)
        qk = apply_rope(qk, *rope)  # q and k rotated together
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.num_heads + self.num_kv_heads:]
        out = paged_attention(q, k, v, cache, layer, meta, self.scale)  # [T, H, hd]
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig, formats: Formats, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = linear(config.hidden_size, 2 * config.intermediate_size,
                                   formats.get(prefix + "gate_up_proj.weight"))
        self.down_proj = linear(config.intermediate_size, config.hidden_size, formats.get(prefix + "down_proj.weight"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, formats: Formats, prefix: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, formats, prefix + "self_attn.")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MLP(config, formats, prefix + "mlp.")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache, layer: int, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output, not yet added into the residual stream (the embeddings, with no stream
        yet, for the first layer) -> this layer's (output, residual stream)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, rope, cache, layer, meta), residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, formats: Formats | None = None, dtype: torch.dtype = torch.float32) -> None:
        """`formats`: the weights (by `fuse_projections` name) kept as GGUF blocks, and their block format; the
        others are `dtype` parameters. A quantized embedding also serves as the tied LM head, in place."""
        super().__init__()
        formats = formats or {}
        self.config = config
        embed_type = formats.get("embed_tokens.weight")
        self.embed_tokens = (nn.Embedding(config.vocab_size, config.hidden_size) if embed_type is None
                             else QuantizedEmbedding(config.vocab_size, config.hidden_size, embed_type, dtype))
        self.layers = nn.ModuleList(DecoderLayer(config, formats, f"layers.{i}.") for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings,
                                    config.rope_freq_factors)
        head_type = embed_type if config.tie_word_embeddings else formats.get("lm_head.weight")
        self.lm_head = None if config.tie_word_embeddings and head_type is None else linear(
            config.hidden_size, config.vocab_size, head_type)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, meta: AttentionMetadata,
                logits_indices: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; logits_indices: [S] rows of the batch that sample -> [S, V] fp32."""
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rope(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, rope, cache, i, meta)
        x, _ = self.norm(x[logits_indices], residual[logits_indices])  # only the rows that sample pay for these
        logits = F.linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)
        return logits.float()

    def use_int8_activations(self) -> bool:
        """Let the block projections round their activations to int8 (see QuantizedLinear); False, with a warning, if
        the kernel cannot here (it needs AVX2)."""
        ops = cpu_kernels.quant_ops()
        if ops is None or not ops.int8_activations():
            logger.warning("int8 activations need pacer's C++ kernels on an AVX2 CPU: activations stay float32")
            return False
        for module in self.modules():
            if isinstance(module, QuantizedLinear):
                module.int8_activations = True
        return True

    def prepack_for_cpu(self) -> None:
        """Hand every projection and the LM head to oneDNN as prepacked weights (see PackedLinear).

        A tied head gets its own packed copy, since the embedding lookup still wants rows.
        """
        for module in list(self.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    setattr(module, name, PackedLinear(child.weight, child.bias))
        if self.lm_head is None:
            self.lm_head = PackedLinear(self.embed_tokens.weight)

    def load_weights(self, weights: dict[str, Weight]) -> None:
        """Load `fuse_projections`' tensors: fp ones into the parameters, GGUF blocks into the quantized layers'
        buffers (this model must have been built with their `formats`)."""
        targets = self.state_dict(keep_vars=True)  # parameters and the block buffers
        tied_head = self.config.tie_word_embeddings and isinstance(self.lm_head, QuantizedLinear)
        if tied_head:
            targets.pop("lm_head.weight")
        for name, tensor in weights.items():
            if name not in targets:
                raise ValueError(f"unexpected weight {name!r} for {type(self).__name__}")
            quantized = isinstance(tensor, QuantizedTensor)
            if quantized != (targets[name].dtype == torch.uint8):
                raise ValueError(f"weight {name!r} is {'GGUF blocks' if quantized else 'a float tensor'}, "
                                 "not what the model was built for")
            source = tensor.blocks if quantized else tensor
            if targets[name].shape != source.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(source.shape)}, "
                                 f"expected {tuple(targets[name].shape)}")
            with torch.no_grad():
                targets.pop(name).copy_(source)
        if targets:
            raise ValueError(f"checkpoint is missing weights: {', '.join(sorted(targets)[:5])}")
        if tied_head:
            self.lm_head.weight = self.embed_tokens.weight



# A fused projection -> the HF projections stacked into it, in order (their weights, and biases where they have them).
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fuse_projections(weights: dict[str, Weight], config: LlamaConfig) -> dict[str, Weight]:
    """HF Llama names -> this model's names, with q/k/v and gate/up stacked into one projection each."""
    fused = {}
    for name, tensor in weights.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        short = name.removeprefix("model.")
        projection, kind = short.split(".")[-2:]  # e.g. q_proj, bias
        target = next((t for t, parts in _FUSED.items() if projection in parts), None)
        if target is None:
            fused[short] = tensor
        elif projection == _FUSED[target][0]:  # the others are stacked with their first
            prefix = name.removesuffix(f"{projection}.{kind}")
            fused[short.replace(projection, target)] = cat_rows([weights[f"{prefix}{p}.{kind}"]
                                                                 for p in _FUSED[target]])
    return fused


def block_formats(weights: dict[str, Weight]) -> Formats:
    """The block format of each weight kept as GGUF blocks: what to build the model with."""
    return {name: tensor.qtype for name, tensor in weights.items() if isinstance(tensor, QuantizedTensor)}
