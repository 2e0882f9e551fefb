"""pacer's fused C++ layers (RMSNorm with the residual add, SiLU-and-mul) against torch's unfused ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pacer.model import cpu_kernels as K
from pacer.model.llama import RMSNorm, silu_and_mul
from tests.strict import kernel_ops

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


def test_weights_are_prepacked_only_where_onednn_packs_the_dtype(monkeypatch, caplog):
    """An AVX2-only CPU cannot reorder bf16 weights: such a model keeps F.linear, with a warning, instead of failing."""
    import torch

    from pacer.model import llama

    def refuses(weight, batch):
        raise RuntimeError("bf16 path needs the cpu support avx512bw")

    llama._packs.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuses)
    try:
        assert not llama.PackedLinear.available(torch.device("cpu"), torch.bfloat16)
        assert "cannot prepack" in caplog.text
    finally:
        llama._packs.cache_clear()
    monkeypatch.undo()
    assert llama.PackedLinear.available(torch.device("cpu"), torch.float32)
