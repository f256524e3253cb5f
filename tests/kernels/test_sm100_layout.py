"""Blackwell weight layouts against FlashInfer's own prepare functions, bit for bit (real FlashInfer on a CPU).

FlashInfer's ``prepare_trtllm_*_weights`` quantize bf16 masters; ours lay out stored codes. So each test
quantizes the same masters the way FlashInfer does and compares every byte of the kernel's weights.
The two CUDA-only FlashInfer helpers (``fp4_quantize``, ``block_scale_interleave``) get pure-torch
equivalents (tests/support/flashinfer_cpu.py) in both paths.
"""

import pytest
import torch

pytest.importorskip("flashinfer")

from flashinfer.fused_moe.api import QuantConfig, QuantFormat  # noqa: E402
from flashinfer.fused_moe.prepare import (  # noqa: E402
    _quantize_fp8_per_expert,
    prepare_trtllm_fp4_weights,
    prepare_trtllm_fp8_block_activations,
    prepare_trtllm_fp8_block_weights,
    prepare_trtllm_fp8_per_tensor_weights,
)
from flashinfer.quantization.fp4_quantization import _compute_swizzled_layout_sf_size  # noqa: E402
from flashinfer_cpu import fp4_quantize_torch, swizzle_128x4  # noqa: E402

from moe_backend.expert_weights import FP8BlockWeights, FP8TensorWeights, NVFP4Weights  # noqa: E402
from moe_backend.kernels.sm100 import layout  # noqa: E402
from moe_backend.quant.fp8 import quantize_fp8_per_token_group  # noqa: E402
from moe_backend.quant.nvfp4 import quantize_nvfp4  # noqa: E402
from moe_backend.weights.layout import swap_gate_up  # noqa: E402

E, H, I = 2, 256, 128


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _same_container(a, b) -> None:
    assert type(a) is type(b)
    for name, t in a.tensors().items():
        assert _bytes_equal(t, getattr(b, name)), name


@pytest.fixture
def masters():
    """bf16 ``w13 [E, 2I, H]`` rows [gate; up] and ``w2 [E, H, I]``."""
    g = torch.Generator().manual_seed(0)
    return (
        (torch.randn(E, 2 * I, H, generator=g) * 0.05).bfloat16(),
        (torch.randn(E, H, I, generator=g) * 0.05).bfloat16(),
    )


@pytest.fixture
def cpu_fp4(monkeypatch):
    """FlashInfer's two CUDA-only FP4 helpers, in pure torch, where FlashInfer and our layout look them up."""
    import flashinfer.fp4_quantization
    import flashinfer.quantization.fp4_quantization as fq

    monkeypatch.setattr(flashinfer.fp4_quantization, "fp4_quantize", fp4_quantize_torch)
    monkeypatch.setattr(fq, "block_scale_interleave", swizzle_128x4)


def test_up_gate_is_the_tested_swap(masters):
    w13, _ = masters
    assert torch.equal(layout.up_gate(w13), swap_gate_up(w13))
    assert torch.equal(layout.up_gate(layout.up_gate(w13)), w13)


def test_fp8_block_equals_flashinfer_prepare(masters):
    w13, w2 = masters
    ours = layout.prepare_fp8_block(FP8BlockWeights.quantize(w13, w2))
    theirs = prepare_trtllm_fp8_block_weights(
        swap_gate_up(w13),
        w2,
        quant=QuantConfig(QuantFormat.DeepSeekFp8, QuantFormat.DeepSeekFp8),
        num_local_experts=E,
        hidden_size=H,
        intermediate_size=I,
    )
    for field, key in (
        ("w13", "gemm1_weights"),
        ("w13_scale", "gemm1_weights_scale"),
        ("w2", "gemm2_weights"),
        ("w2_scale", "gemm2_weights_scale"),
    ):
        assert _bytes_equal(getattr(ours, field), theirs[key]), field


@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_block_restore_is_exact(masters, ue8m0):
    w = FP8BlockWeights.quantize(*masters, ue8m0=ue8m0)
    _same_container(layout.restore_fp8_block(layout.prepare_fp8_block(w)), w)


@pytest.mark.parametrize("tokens", [1, 7])
def test_fp8_block_activations_equal_flashinfer(tokens):
    x = (torch.randn(tokens, H, generator=torch.Generator().manual_seed(1)) * 3).bfloat16()
    q, s = quantize_fp8_per_token_group(x, 128)
    fq, fs = prepare_trtllm_fp8_block_activations(
        x, quant=QuantConfig(QuantFormat.DeepSeekFp8, QuantFormat.DeepSeekFp8)
    )
    assert _bytes_equal(q, fq)
    # FlashInfer reads [H/128, T]. Its scale is amax / 448; ours is amax * fp32(1/448), which every
    # device rounds alike (quant.fp8.RCP_FP8_MAX): the two differ by at most one ulp.
    torch.testing.assert_close(s.t(), fs, rtol=2.0**-23, atol=0.0)


def _fp8_tensor_pair(masters, a13=0.02, a2=0.05):
    """Our container from FlashInfer's own per-expert quantization (its scales multiply, ours divide)."""
    w13, w2 = masters
    q13, m13 = _quantize_fp8_per_expert(swap_gate_up(w13))
    q2, m2 = _quantize_fp8_per_expert(w2)
    ours = FP8TensorWeights(swap_gate_up(q13), 1.0 / m13, q2, 1.0 / m2, torch.tensor([a13]), torch.tensor([a2]))
    theirs = prepare_trtllm_fp8_per_tensor_weights(
        swap_gate_up(w13),
        w2,
        hidden_states_scale_global=1.0 / a13,
        intermediate_scale_global=1.0 / a2,
        num_local_experts=E,
        hidden_size=H,
        intermediate_size=I,
    )
    return ours, theirs


def test_fp8_tensor_equals_flashinfer_prepare(masters):
    weights, theirs = _fp8_tensor_pair(masters)
    ours = layout.prepare_fp8_tensor(weights)
    assert _bytes_equal(ours.w13, theirs["gemm1_weights"])
    assert _bytes_equal(ours.w2, theirs["gemm2_weights"])
    assert not _bytes_equal(ours.w13, layout.up_gate(weights.w13))  # the shuffle did move rows
    for name in ("output1_scales_scalar", "output1_scales_gate_scalar", "output2_scales_scalar"):
        torch.testing.assert_close(getattr(ours, name), theirs[name], rtol=1e-6, atol=0, msg=name)
    _same_container(layout.restore_fp8_tensor(ours), weights)


def test_fp8_tensor_needs_static_activation_scales(masters):
    w = FP8TensorWeights.quantize(*(m.float() for m in masters))
    with pytest.raises(ValueError, match="a13_scale and a2_scale"):
        layout.prepare_fp8_tensor(w)


def test_nvfp4_equals_flashinfer_prepare(masters, cpu_fp4):
    w13, w2 = masters
    ones = torch.ones(E)
    gate, up = (quantize_nvfp4(h, ones) for h in w13.split(I, dim=1))
    down = quantize_nvfp4(w2, ones)
    weights = NVFP4Weights(
        torch.cat([gate[0], up[0]], 1), torch.cat([gate[1], up[1]], 1), torch.ones(E, 2), down[0], down[1], ones
    )
    ours = layout.prepare_nvfp4(weights)
    theirs = prepare_trtllm_fp4_weights(
        swap_gate_up(w13),
        w2,
        quant=QuantConfig(QuantFormat.NVFP4, QuantFormat.NVFP4),
        num_local_experts=E,
        hidden_size=H,
        intermediate_size=I,
    )
    for field, key in (
        ("w13", "gemm1_weights"),
        ("w13_scale", "gemm1_weights_scale"),
        ("w2", "gemm2_weights"),
        ("w2_scale", "gemm2_weights_scale"),
    ):
        assert _bytes_equal(getattr(ours, field), theirs[key]), field
    _same_container(layout.restore_nvfp4(ours), weights)


def test_nvfp4_restore_is_exact_with_distinct_global_scales(masters, cpu_fp4):
    w = NVFP4Weights.quantize(*(m.float() for m in masters))
    assert not torch.equal(w.w13_scale_2[:, 0], w.w13_scale_2[:, 1])
    _same_container(layout.restore_nvfp4(layout.prepare_nvfp4(w)), w)


def test_swizzle_reference_and_its_inverse():
    assert swizzle_128x4(torch.zeros(130, 5, dtype=torch.uint8)).numel() == _compute_swizzled_layout_sf_size(130, 5)
    unit = torch.zeros(256, 8, dtype=torch.int64)
    where = {(0, 1): 1, (1, 0): 16, (32, 0): 4, (0, 4): 512, (128, 0): 128 * 8, (33, 5): 1 + 512 + 16 + 4}
    for (r, c), at in where.items():
        one = unit.clone()
        one[r, c] = 1
        assert swizzle_128x4(one).nonzero().flatten().tolist() == [at]
    sf = torch.randint(0, 256, (256, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(layout.unswizzle_128x4(swizzle_128x4(sf).reshape(256, 8)), sf)


@pytest.mark.parametrize("prepare", [layout.prepare_fp8_tensor, layout.prepare_nvfp4])
def test_shuffled_layouts_need_whole_tiles(prepare):
    w13, w2 = torch.randn(1, 2 * 32, 64), torch.randn(1, 64, 32)
    weights = (FP8TensorWeights if prepare is layout.prepare_fp8_tensor else NVFP4Weights).quantize(w13, w2)
    if isinstance(weights, FP8TensorWeights):
        weights.a13_scale, weights.a2_scale = torch.ones(1), torch.ones(1)
    with pytest.raises(ValueError, match="multiple of 128"):
        prepare(weights)
