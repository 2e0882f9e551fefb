"""GGUF blocks kept in memory: the numpy and C++ dequantizers against gguf.quants bit for bit, the linear
kernel against dequantize-then-F.linear, a tiny model on blocks against the same model on their values, and the
fallback without a compiler."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from pacer.engine.profile import default_profile_path
from pacer.model import cpu_kernels
from pacer.model.attention import allocate_kv_cache
from pacer.model.llama import LlamaModel, block_formats
from pacer.model.quant import QuantizedLinear, QuantizedTensor, dequantize, quantize_weights, resolve_quantization
from pacer.model.runner import ModelRunner
from tests.strict import kernel_ops
from tests.tiny import TINY, tiny_model

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0]
# fp16 scales a real file can hold, at the edges: zero, both signs, subnormal, the largest finite, tiny and huge.
EDGE_SCALES = np.array([0.0, -0.0, 1.0, -1.0, 6e-8, -6e-8, 65504.0, -65504.0, 1e-4, 3.14], dtype=np.float16)


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """uint8 [rows, cols / 32 * block bytes]: random quants, scales (and Q4_1 minimums) drawn from EDGE_SCALES and
    a normal spread."""
    rng = np.random.default_rng(seed)
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(rows * cols // 32, type_size), dtype=np.uint8)
    num_scalars = 2 if qtype == Q.Q4_1 else 1
    for i in range(num_scalars):
        scales = np.where(rng.random(len(blocks)) < 0.5, rng.choice(EDGE_SCALES, len(blocks)),
                          rng.normal(0, 0.02, len(blocks))).astype(np.float16)
        blocks[:, 2 * i:2 * i + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_is_bit_exact_with_gguf(qtype):
    blocks = random_blocks(qtype, 24, 96)
    expected = torch.from_numpy(gguf_dequantize(blocks, qtype).reshape(24, 96))
    torch_values = dequantize(torch.from_numpy(blocks), qtype)
    assert torch.equal(torch_values.view(torch.int32), expected.view(torch.int32))
    ops = cpu_kernels.quant_ops()
    if ops is not None:
        kernel_values = ops.dequantize(torch.from_numpy(blocks), int(qtype))
        assert torch.equal(kernel_values.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("qtype", TYPES)
def test_quantized_tensor_round_trips_through_gguf_quantize(qtype):
    weight = torch.randn(8, 64)
    tensor = QuantizedTensor.quantize(weight, qtype)
    assert tensor.shape == (8, 64)
    assert tensor.blocks.shape == (8, 64 // 32 * GGML_QUANT_SIZES[qtype][1])
    step = weight.abs().amax() / (127 if qtype == Q.Q8_0 else 7)
    assert (tensor.dequantize() - weight).abs().max() <= step


@pytest.fixture(scope="module")
def quant_kernel():
    return kernel_ops(cpu_kernels.quant_ops(), "C++ quantized linear")


@pytest.fixture(scope="module")
def int8_kernel(quant_kernel):
    if not quant_kernel.int8_activations():
        pytest.skip("int8 activations need an AVX2 CPU")
    return quant_kernel


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 31, 32, 70])
def test_kernel_matches_dequantize_then_linear(quant_kernel, qtype, rows):
    torch.manual_seed(rows)
    blocks = QuantizedTensor.quantize(torch.randn(36, 96), qtype).blocks
    x = torch.randn(rows, 96)
    expected = F.linear(x, dequantize(blocks, qtype))
    layer = QuantizedLinear(96, 36, qtype)
    layer.weight.copy_(blocks)
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x[None])[0], out)  # leading dimensions, as F.linear takes them
    # the GEMM path (prefill sizes) multiplies the exactly dequantized weight
    gemm = quant_kernel.linear(x, blocks, int(qtype), 1, False)
    torch.testing.assert_close(gemm, expected, rtol=1e-5, atol=1e-5)


def test_bias_is_added_after_the_kernel_and_in_the_fallback(monkeypatch):
    """Qwen2's q/k/v biases on GGUF blocks: the kernel takes none, so the layer adds it, as F.linear would."""
    blocks = QuantizedTensor.quantize(torch.randn(36, 96), Q.Q8_0).blocks
    layer = QuantizedLinear(96, 36, Q.Q8_0, bias=True)
    layer.weight.copy_(blocks)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(36))
    x = torch.randn(3, 96)
    expected = F.linear(x, dequantize(blocks, Q.Q8_0), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x[None])[0], expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(cpu_kernels.NO_KERNEL_ENV, "1")
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 31])
def test_int8_activations_stay_within_their_rounding(int8_kernel, qtype, rows):
    torch.manual_seed(rows)
    blocks = QuantizedTensor.quantize(torch.randn(36, 96), qtype).blocks
    x = torch.randn(rows, 96)
    weight = dequantize(blocks, qtype)
    out = int8_kernel.linear(x, blocks, int(qtype), 32, True)
    # each activation block rounded to 8 bits moves it by at most half a step of max|x| / 127
    step = x.reshape(rows, -1, 32).abs().amax(dim=2, keepdim=True) / 127
    bound = F.linear(torch.broadcast_to(step / 2, (rows, 3, 32)).reshape(rows, 96), weight.abs())
    assert ((out - F.linear(x, weight)).abs() <= bound + 1e-4).all()


def quantized_copy(model: LlamaModel, qtype: Q) -> tuple[LlamaModel, LlamaModel]:
    """The model with its matrices as `qtype` blocks, and a float model holding exactly those blocks' values."""
    weights = {name: t.detach() for name, t in model.state_dict().items()}
    quantized = {name: QuantizedTensor.quantize(t, qtype) if t.dim() == 2 else t for name, t in weights.items()}
    on_blocks = LlamaModel(TINY, block_formats(quantized))
    on_blocks.load_weights(quantized)
    on_values = LlamaModel(TINY)
    on_values.load_weights({name: t.dequantize() if isinstance(t, QuantizedTensor) else t
                            for name, t in quantized.items()})
    for m in (on_blocks, on_values):
        m.rope.reset(None)
    return on_blocks.eval(), on_values.eval()


def forward_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    from tests.integration.test_smollm2 import full_logits

    cache = allocate_kv_cache(TINY.num_layers, 16, 4, TINY.num_kv_heads, TINY.head_dim, torch.float32,
                              torch.device("cpu"))
    return full_logits(model, ids, 4, cache)


@pytest.mark.parametrize("qtype", TYPES)
def test_tiny_model_on_blocks_matches_the_same_values_in_fp32(qtype):
    on_blocks, on_values = quantized_copy(tiny_model(), qtype)
    assert isinstance(on_blocks.layers[0].self_attn.qkv_proj, QuantizedLinear)
    assert on_blocks.lm_head is not None and on_blocks.lm_head.weight is on_blocks.embed_tokens.weight  # tied
    for length in (1, 7, 40):  # decode-sized and prefill-sized rows
        ids = list(range(3, 3 + length))
        torch.testing.assert_close(forward_logits(on_blocks, ids), forward_logits(on_values, ids), rtol=1e-4,
                                   atol=1e-4)


def test_int8_activations_switch_on_for_every_block_projection(int8_kernel):
    on_blocks, _ = quantized_copy(tiny_model(), Q.Q4_1)
    exact = forward_logits(on_blocks, list(range(3, 10)))
    assert on_blocks.use_int8_activations()
    layers = [m for m in on_blocks.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.int8_activations for m in layers)
    approximate = forward_logits(on_blocks, list(range(3, 10)))
    assert not torch.equal(approximate, exact)
    torch.testing.assert_close(approximate, exact, rtol=0.1, atol=0.1)


def test_without_kernels_blocks_fall_back_to_plain_torch_with_a_warning(monkeypatch, caplog):
    on_blocks, on_values = quantized_copy(tiny_model(), Q.Q4_1)
    monkeypatch.setenv(cpu_kernels.NO_KERNEL_ENV, "1")
    assert cpu_kernels.quant_ops() is None
    ids = list(range(3, 20))
    torch.testing.assert_close(forward_logits(on_blocks, ids), forward_logits(on_values, ids), rtol=1e-4, atol=1e-4)
    cache = allocate_kv_cache(TINY.num_layers, 16, 4, TINY.num_kv_heads, TINY.head_dim, torch.float32,
                              torch.device("cpu"))
    runner = ModelRunner(on_blocks, cache, 4, torch.device("cpu"))
    assert runner.quantization == "Q4_1"
    with caplog.at_level(logging.WARNING):
        ModelRunner.warn_without_kernels(runner.model)
        assert not on_blocks.use_int8_activations()
    assert "dequantizes its GGUF blocks" in caplog.text
    assert "activations stay float32" in caplog.text


def test_load_time_quantization_keeps_norms_and_quantizes_embeddings_to_8_bits():
    weights = {"model.embed_tokens.weight": torch.randn(256, 64), "model.norm.weight": torch.ones(64),
               "model.layers.0.mlp.down_proj.weight": torch.randn(64, 128)}
    out = quantize_weights(weights, "int4")
    assert out["model.norm.weight"] is weights["model.norm.weight"]
    assert out["model.embed_tokens.weight"].qtype == Q.Q8_0
    assert out["model.layers.0.mlp.down_proj.weight"].qtype == Q.Q4_1
    assert quantize_weights(weights, "int8")["model.layers.0.mlp.down_proj.weight"].qtype == Q.Q8_0


def test_quantization_resolves_per_device_and_dtype():
    assert resolve_quantization("auto", "cpu", torch.float32) == "auto"
    assert resolve_quantization("auto", "cpu", torch.bfloat16) == "none"  # kernels take fp32 activations
    assert resolve_quantization("auto", "cuda", torch.bfloat16) == "none"
    assert resolve_quantization("int4", "cpu", torch.float32) == "int4"
    with pytest.raises(ValueError, match="float32"):
        resolve_quantization("int8", "cuda", torch.float32)
    with pytest.raises(ValueError, match="one of"):
        resolve_quantization("q4", "cpu", torch.float32)


def test_profiles_are_kept_apart_by_quantization():
    key = {"model": "m.gguf-1", "dtype": "float32", "device": "cpu", "threads": 2}
    plain = default_profile_path(key | {"quantization": "none"})
    assert plain == default_profile_path(key)
    assert default_profile_path(key | {"quantization": "Q4_1+Q8_0"}) != plain
