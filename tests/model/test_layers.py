"""pacer's fused C++ layers (RMSNorm with the residual add, SiLU-and-mul) against torch's unfused ops, and oneDNN's
prepacked projections against F.linear, with the fallback where torch's private oneDNN ops are missing."""

from __future__ import annotations

import functools
import logging
import types

import pytest
import torch
import torch.nn.functional as F

from pacer.config import CacheConfig, ModelConfig
from pacer.model import cpu_kernels as K
from pacer.model import llama
from pacer.model.attention import AttentionMetadata
from pacer.model.llama import RMSNorm, silu_and_mul
from pacer.model.runner import ModelRunner
from pacer.model.weights import Checkpoint, expected_shapes
from tests.strict import kernel_ops
from tests.tiny import TINY

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ops():
    return kernel_ops(K.layer_ops(), "C++ fused layers")


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    # bf16: the order of the sum of squares may flip the last bit of a rounded element
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}
    torch.testing.assert_close(actual, expected, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 576), (7, 64), (300, 576), (3, 37)])  # 37: not a whole vector of 16
def test_rms_norm_matches_torch(ops, dtype, rows, d):
    x, w = torch.randn(rows, d).to(dtype), torch.randn(d).to(dtype)
    close(ops.rms_norm(x, w, 1e-5), F.rms_norm(x, (d,), w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_updates_the_residual_in_place(ops, dtype):
    x, residual, w = torch.randn(5, 576).to(dtype), torch.randn(5, 576).to(dtype), torch.randn(576).to(dtype)
    expected_sum = x + residual
    out = ops.add_rms_norm(x, residual, w, 1e-6)
    assert torch.equal(residual, expected_sum)  # the add rounds exactly as torch's does
    close(out, F.rms_norm(expected_sum, (576,), w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 1536), (64, 1536), (2, 21)])
def test_silu_and_mul_matches_torch(ops, dtype, rows, n):
    gate_up = (4 * torch.randn(rows, 2 * n)).to(dtype)
    gate_up[0, :6] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-3, -90.0])  # saturated and tiny arguments
    gate, up = gate_up.chunk(2, dim=-1)
    close(ops.silu_and_mul(gate_up), F.silu(gate) * up, dtype)


def test_bad_shapes_raise(ops):
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(torch.randn(2, 8), torch.randn(9), 1e-5)
    with pytest.raises(RuntimeError, match="2n"):
        ops.silu_and_mul(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="residual"):
        ops.add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.randn(8), 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_modules_agree_with_and_without_the_kernels(ops, dtype, monkeypatch):
    """What the model calls: the same results through the fused path and through plain torch (PACER_NO_CPP_KERNEL)."""
    norm = RMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x, residual, gate_up = torch.randn(9, 64).to(dtype), torch.randn(9, 64).to(dtype), torch.randn(9, 96).to(dtype)
    with torch.inference_mode():
        fused = norm(x), norm(x, residual.clone()), silu_and_mul(gate_up)
        monkeypatch.setenv(K.NO_KERNEL_ENV, "1")
        plain = norm(x), norm(x, residual.clone()), silu_and_mul(gate_up)
    close(fused[0], plain[0], dtype)
    close(fused[1][0], plain[1][0], dtype)
    assert torch.equal(fused[1][1], plain[1][1])
    close(fused[2], plain[2], dtype)


@pytest.fixture
def fresh_packs():
    """`_packs` keeps its answer for the process: ask afresh in the test, and leave no answer behind."""
    llama._packs.cache_clear()
    yield
    llama._packs.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepacked_projection_matches_f_linear(dtype):
    if not llama.PackedLinear.available(torch.device("cpu"), dtype):
        pytest.skip(f"oneDNN does not pack {dtype} weights on this CPU")  # bf16: AVX-512 BW/VL/DQ or AVX-NE-CONVERT
    weight, x, bias = (torch.randn(40, 64) * 0.1).to(dtype), torch.randn(2, 5, 64).to(dtype), torch.randn(40).to(dtype)
    torch.testing.assert_close(llama.PackedLinear(weight)(x), F.linear(x, weight))
    torch.testing.assert_close(llama.PackedLinear(weight, bias)(x), F.linear(x, weight, bias))  # Qwen2's q/k/v


def test_weights_are_prepacked_only_where_onednn_packs_the_dtype(monkeypatch, caplog, fresh_packs):
    """An AVX2-only CPU cannot reorder bf16 weights: such a model keeps F.linear, with a warning, instead of failing."""

    def refuses(weight, batch):
        raise RuntimeError("bf16 path needs the cpu support avx512bw")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuses)
    assert not llama.PackedLinear.available(torch.device("cpu"), torch.bfloat16)
    assert "avx512bw" in caplog.text and "projections use F.linear" in caplog.text
    monkeypatch.undo()
    assert llama.PackedLinear.available(torch.device("cpu"), torch.float32)


def test_wrong_results_from_the_packed_op_leave_f_linear(monkeypatch, caplog, fresh_packs):
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, packed, *args: torch.zeros(3, 16))
    assert not llama.PackedLinear.available(torch.device("cpu"), torch.float32)
    assert "differs from F.linear" in caplog.text


def tiny_checkpoint() -> Checkpoint:
    generator = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(shape, generator=generator) * 0.2 if len(shape) > 1 else torch.ones(shape)
               for name, shape in expected_shapes(TINY).items()}
    return Checkpoint(TINY, weights, types.SimpleNamespace(eos_token_id=TINY.eos_token_id))


def prefill_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    meta = AttentionMetadata.build(runner.block_size, prefill=[(list(range(-(-len(ids) // runner.block_size))), 0,
                                                                 len(ids))])
    positions = torch.arange(len(ids))
    with torch.inference_mode():
        return runner.model(torch.tensor(ids), positions, runner.cache, meta, positions)


def test_a_torch_without_the_onednn_ops_runs_the_model_on_f_linear(monkeypatch, caplog, fresh_packs):
    """The private ops missing altogether (a torch release that drops them): the runner keeps F.linear, warns once,
    and computes what the prepacked model computes."""
    load = functools.partial(ModelRunner.load, tiny_checkpoint(), ModelConfig(dtype="float32"),
                             CacheConfig(num_blocks=8, block_size=4))
    ids = [5, 17, 42, 7, 99, 3]
    packed = load()
    assert packed.kernels.startswith("onednn-prepacked")
    expected = prefill_logits(packed, ids)
    llama._packs.cache_clear()
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())  # every op an AttributeError
    with caplog.at_level(logging.WARNING, logger=llama.__name__):
        plain = load()
        load()  # asked once a process
    assert len([r for r in caplog.records if "prepacked linear does not work" in r.getMessage()]) == 1
    assert plain.kernels.startswith("torch-linear")
    assert not any(isinstance(m, llama.PackedLinear) for m in plain.model.modules())
    torch.testing.assert_close(prefill_logits(plain, ids), expected, rtol=1e-4, atol=1e-4)
