"""Weight containers: shapes produced by quantize, dequantization, validation errors."""

import pytest
import torch

from moe_backend import BF16Weights, FP8BlockWeights, FP8TensorWeights, NVFP4Weights
from moe_backend.quant import FP8_DTYPE

E, H, I = 3, 256, 128


@pytest.fixture
def master():
    return torch.randn(E, 2 * I, H) / 16, torch.randn(E, H, I) / 11


def test_quantized_shapes(master):
    w13, w2 = master
    blk = FP8BlockWeights.quantize(w13, w2)
    assert blk.w13_scale.shape == (E, 2, 2) and blk.w2_scale.shape == (E, 2, 1)
    ten = FP8TensorWeights.quantize(w13, w2)
    assert ten.w13_scale.shape == (E,) and ten.w2_scale.shape == (E,)
    fp4 = NVFP4Weights.quantize(w13, w2)
    assert fp4.w13.shape == (E, 2 * I, H // 2) and fp4.w13_scale.shape == (E, 2 * I, H // 16)
    assert fp4.w13_scale_2.shape == (E, 2) and fp4.w2_scale_2.shape == (E,)
    for w in (blk, ten, fp4, BF16Weights.quantize(w13, w2)):
        assert (w.num_experts, w.hidden_size, w.intermediate_size) == (E, H, I)


def test_nvfp4_gate_and_up_keep_their_own_global_scale(master):
    w13, w2 = master
    w13 = w13.clone()
    w13[:, I:] *= 50  # up much larger than gate
    fp4 = NVFP4Weights.quantize(w13, w2)
    assert bool((fp4.w13_scale_2[:, 1] > 10 * fp4.w13_scale_2[:, 0]).all())
    deq13, _ = fp4.dequantize_expert(1)
    gate_err = (deq13[:I] - w13[1, :I]).norm() / w13[1, :I].norm()
    assert gate_err < 0.12  # with one shared scale the gate would be crushed


def test_dequantize_expert_close_to_master(master):
    w13, w2 = master
    for cls, tol in [(BF16Weights, 0.005), (FP8BlockWeights, 0.04), (FP8TensorWeights, 0.04), (NVFP4Weights, 0.12)]:
        a, b = cls.quantize(w13, w2).dequantize_expert(2)
        assert float((a - w13[2]).norm() / w13[2].norm()) < tol, cls
        assert float((b - w2[2]).norm() / w2[2].norm()) < tol, cls


def test_nbytes_nvfp4_about_half_a_byte_per_weight(master):
    w13, w2 = master
    fp4 = NVFP4Weights.quantize(w13, w2)
    per_weight = fp4.nbytes() / (w13.numel() + w2.numel())
    assert 0.5625 <= per_weight < 0.57


def _fp8(*shape):
    return torch.zeros(*shape, dtype=FP8_DTYPE)


@pytest.mark.parametrize("build, match", [
    (lambda: BF16Weights(torch.zeros(2, 8, 16), torch.zeros(2, 16, 4, dtype=torch.bfloat16)), "w13: expected dtype"),
    (lambda: BF16Weights(torch.zeros(2, 7, 16, dtype=torch.bfloat16), torch.zeros(2, 16, 4, dtype=torch.bfloat16)),
     "w13: expected an even row count"),
    (lambda: BF16Weights(torch.zeros(2, 32, 32, dtype=torch.bfloat16), torch.zeros(3, 32, 16, dtype=torch.bfloat16)),
     r"w2: expected shape \(2, 32, 16\)"),
    (lambda: BF16Weights(torch.zeros(2, 16, 24, dtype=torch.bfloat16), torch.zeros(2, 24, 8, dtype=torch.bfloat16)),
     "multiples of 16"),
    (lambda: FP8BlockWeights(_fp8(2, 256, 256), torch.ones(2, 2, 2), _fp8(2, 256, 128), torch.ones(2, 2, 2)),
     r"w2_scale: expected shape \(2, 2, 1\)"),
    (lambda: FP8BlockWeights(_fp8(2, 64, 256), torch.ones(2, 1, 2), _fp8(2, 256, 32), torch.ones(2, 2, 1)),
     "multiples of 128"),
    (lambda: FP8TensorWeights(_fp8(2, 32, 16), torch.ones(2), _fp8(2, 16, 16), torch.ones(2),
                              a13_scale=torch.ones(2)), r"a13_scale: expected shape \(1,\)"),
    (lambda: FP8TensorWeights(_fp8(2, 32, 16), torch.ones(2, 1), _fp8(2, 16, 16), torch.ones(2)),
     r"w13_scale: expected shape \(2,\)"),
    (lambda: NVFP4Weights(torch.zeros(1, 32, 8, dtype=torch.uint8), _fp8(1, 32, 1), torch.ones(1, 2),
                          torch.zeros(1, 16, 8, dtype=torch.uint8), _fp8(1, 16, 1), torch.ones(1, 1)),
     r"w2_scale_2: expected shape \(1,\)"),
    (lambda: NVFP4Weights(torch.zeros(1, 32, 8, dtype=torch.uint8), _fp8(1, 32, 1), torch.ones(1),
                          torch.zeros(1, 16, 8, dtype=torch.uint8), _fp8(1, 16, 1), torch.ones(1)),
     r"w13_scale_2: expected shape \(1, 2\)"),
])
def test_bad_weights(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()
