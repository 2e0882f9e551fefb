"""Weights kept in GGUF's block formats (Q4_0, Q4_1, Q8_0) and the layers that compute with them.

At small batch a decode step streams every weight once, so its speed is the weights' bytes: Q4_1 is 5 bits a weight
where fp32 is 32. A `QuantizedTensor` holds a matrix's blocks exactly as the file stores them (32 weights, an fp16
scale and, for Q4_1, an fp16 minimum), so nothing is lost in a repacking; `QuantizedLinear` multiplies by them with
pacer's C++ kernel (quant_cpu.cpp) and falls back to dequantize-then-`F.linear` (`dequantize`, in numpy), the reference
the kernel is tested against.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize
from torch import nn

from pacer.model import cpu_kernels
from pacer.model.dequant import dequantize_blocks

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("auto", "none", "int8", "int4")
# Block formats the kernel computes with; a GGUF's other formats (K-quants, ...) are dequantized at load.
KERNEL_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)
# --quantization int8/int4 on a float checkpoint: the block formats it is quantized to at load. Q4_1's scale and
# minimum per group of 32 are the asymmetric int4 of GPTQ/AWQ-style weight-only schemes.
AT_LOAD = {"int8": GGMLQuantizationType.Q8_0, "int4": GGMLQuantizationType.Q4_1}
# The token embedding (and a tied LM head) at 8 bits in both modes, as llama.cpp's Q4 files keep it.
EMBEDDING_TYPE = GGMLQuantizationType.Q8_0


@dataclass(frozen=True)
class QuantizedTensor:
    """An `[out, in]` matrix as GGUF blocks: `blocks` is uint8 `[out, in / 32 * block bytes]`, row-major like the
    matrix, so rows can be permuted and concatenated as whole byte rows."""

    qtype: GGMLQuantizationType
    blocks: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return self.blocks.shape[0], self.blocks.shape[1] // type_size * block_size

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.blocks, self.qtype)

    @classmethod
    def quantize(cls, weight: torch.Tensor, qtype: GGMLQuantizationType) -> QuantizedTensor:
        """Round a float matrix to `qtype` blocks (gguf's quantizer, as llama.cpp's convert script does)."""
        blocks = gguf_quantize(weight.detach().float().cpu().numpy(), qtype)
        return cls(qtype, torch.from_numpy(np.ascontiguousarray(blocks)))


def resolve_quantization(name: str, device: str, dtype: torch.dtype) -> str:
    """--quantization as it applies here: the kernels compute on a CPU with fp32 activations, so `auto` keeps a
    GGUF's blocks only there (elsewhere it dequantizes, and says so); int8/int4 elsewhere are an error."""
    if name not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {name!r}")
    if name == "none" or (device == "cpu" and dtype == torch.float32):
        return name
    if name == "auto":
        logger.info("GGUF blocks are computed with on a CPU in float32 only: dequantizing for %s %s", device,
                    str(dtype).removeprefix("torch."))
        return "none"
    raise ValueError(f"--quantization {name} runs on a CPU in float32 only (here: {device}, "
                     f"{str(dtype).removeprefix('torch.')}); use --quantization none or auto")


def quantize_weights(weights: dict[str, torch.Tensor | QuantizedTensor], mode: str) -> dict:
    """--quantization int8/int4: every float matrix to blocks (`AT_LOAD[mode]`; the embedding and LM head to
    `EMBEDDING_TYPE`), norms as they are. Blocks already in the checkpoint are re-quantized from their values."""
    out = {}
    for name, tensor in weights.items():
        if isinstance(tensor, QuantizedTensor):
            tensor = tensor.dequantize()
        if tensor.dim() != 2:
            out[name] = tensor
            continue
        embedding = name in ("model.embed_tokens.weight", "lm_head.weight")
        out[name] = QuantizedTensor.quantize(tensor, EMBEDDING_TYPE if embedding else AT_LOAD[mode])
    return out


def cat_rows(parts: list[torch.Tensor | QuantizedTensor]) -> torch.Tensor | QuantizedTensor:
    """Stack matrices by rows (q/k/v into one projection): blocks if all share one format, else fp32."""
    if all(isinstance(p, QuantizedTensor) for p in parts) and len({p.qtype for p in parts}) == 1:
        return QuantizedTensor(parts[0].qtype, torch.cat([p.blocks for p in parts]))
    if any(isinstance(p, QuantizedTensor) for p in parts):
        logger.info("projections fused from different block formats are dequantized to fp32")
    return torch.cat([p.dequantize() if isinstance(p, QuantizedTensor) else p for p in parts])


def dequantize(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """uint8 blocks `[..., n * block bytes]` on a CPU -> fp32 `[..., n * 32]` (`dequantize_blocks`' values)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    values = dequantize_blocks(blocks.reshape(-1, type_size).numpy(), qtype)
    return torch.from_numpy(values).reshape(*blocks.shape[:-1], blocks.shape[-1] // type_size * block_size)


def _kernel(x: torch.Tensor) -> object | None:
    """torch.ops.pacer_quant where it applies to x (fp32 on a CPU, kernels built), else None."""
    return cpu_kernels.quant_ops() if x.is_cpu and x.dtype == torch.float32 else None


class QuantizedLinear(nn.Module):
    """A projection over GGUF blocks (the `weight` buffer, uint8), activations in fp32; the bias, if any, is a float
    parameter added after the kernel (which takes none)."""

    # From this many rows on (prefill chunks), a slice of the weight is dequantized and multiplied as fp32: there the
    # work is arithmetic, not bytes (benchmarks/quant_micro.py measured the crossover at 16-32 rows).
    GEMM_FROM = 32

    def __init__(self, in_features: int, out_features: int, qtype: GGMLQuantizationType, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        # Below GEMM_FROM rows, round activations to int8 blocks and use integer dot products (llama.cpp's scheme):
        # faster, not exact. Set through `LlamaModel.use_int8_activations`.
        self.int8_activations = False
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        self.register_buffer("weight", torch.empty(out_features, in_features // block_size * type_size,
                                                   dtype=torch.uint8))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = _kernel(x)
        if ops is None:
            return F.linear(x, dequantize(self.weight, self.qtype).to(x.dtype), self.bias)
        if x.dim() == 2 and x.is_contiguous():  # the model's own calls (~120 a step): no reshape and view around
            out = ops.linear(x, self.weight, int(self.qtype), self.GEMM_FROM, self.int8_activations)
        else:
            rows = x.reshape(-1, self.in_features).contiguous()
            out = ops.linear(rows, self.weight, int(self.qtype), self.GEMM_FROM, self.int8_activations)
            out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out.add_(self.bias)

    def extra_repr(self) -> str:
        extras = (", bias" if self.bias is not None else "") + (", int8 activations" if self.int8_activations else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype.name} blocks{extras}"


class QuantizedEmbedding(nn.Module):
    """The token embedding over GGUF blocks: only the rows looked up are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: GGMLQuantizationType,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.qtype, self.dtype = num_embeddings, embedding_dim, qtype, dtype
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim // block_size * type_size,
                                                   dtype=torch.uint8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize(self.weight[ids], self.qtype).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtype.name} blocks"
