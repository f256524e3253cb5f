"""Weight containers: shapes produced by quantize, dequantization, validation errors."""

import dataclasses

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


@pytest.mark.parametrize(
    "build, match",
    [
        (
            lambda: BF16Weights(torch.zeros(2, 8, 16), torch.zeros(2, 16, 4, dtype=torch.bfloat16)),
            "w13: expected dtype",
        ),
        (
            lambda: BF16Weights(
                torch.zeros(2, 7, 16, dtype=torch.bfloat16), torch.zeros(2, 16, 4, dtype=torch.bfloat16)
            ),
            "w13: expected an even row count",
        ),
        (
            lambda: BF16Weights(
                torch.zeros(2, 32, 32, dtype=torch.bfloat16), torch.zeros(3, 32, 16, dtype=torch.bfloat16)
            ),
            r"w2: expected shape \(2, 32, 16\)",
        ),
        (
            lambda: BF16Weights(
                torch.zeros(2, 16, 24, dtype=torch.bfloat16), torch.zeros(2, 24, 8, dtype=torch.bfloat16)
            ),
            "multiples of 16",
        ),
        (
            lambda: FP8BlockWeights(_fp8(2, 256, 256), torch.ones(2, 2, 2), _fp8(2, 256, 128), torch.ones(2, 2, 2)),
            r"w2_scale: expected shape \(2, 2, 1\)",
        ),
        (
            lambda: FP8BlockWeights(_fp8(2, 64, 256), torch.ones(2, 1, 2), _fp8(2, 256, 32), torch.ones(2, 2, 1)),
            "multiples of 128",
        ),
        (
            lambda: FP8TensorWeights(
                _fp8(2, 32, 16), torch.ones(2), _fp8(2, 16, 16), torch.ones(2), a13_scale=torch.ones(2)
            ),
            r"a13_scale: expected shape \(1,\)",
        ),
        (
            lambda: FP8TensorWeights(_fp8(2, 32, 16), torch.ones(2, 1), _fp8(2, 16, 16), torch.ones(2)),
            r"w13_scale: expected shape \(2,\)",
        ),
        (
            lambda: NVFP4Weights(
                torch.zeros(1, 32, 8, dtype=torch.uint8),
                _fp8(1, 32, 1),
                torch.ones(1, 2),
                torch.zeros(1, 16, 8, dtype=torch.uint8),
                _fp8(1, 16, 1),
                torch.ones(1, 1),
            ),
            r"w2_scale_2: expected shape \(1,\)",
        ),
        (
            lambda: NVFP4Weights(
                torch.zeros(1, 32, 8, dtype=torch.uint8),
                _fp8(1, 32, 1),
                torch.ones(1),
                torch.zeros(1, 16, 8, dtype=torch.uint8),
                _fp8(1, 16, 1),
                torch.ones(1),
            ),
            r"w13_scale_2: expected shape \(1, 2\)",
        ),
    ],
)
def test_bad_weights(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


# -- the scale rule: whole-matrix scales finite and > 0, block scales finite and >= 0 --------------
def _replaced(weights, field, index, value):
    """``weights`` rebuilt (validation runs again) with ``field[index] = value``."""
    scale = getattr(weights, field).clone()
    scale[index] = torch.tensor(value).to(scale.dtype)
    return dataclasses.replace(weights, **{field: scale})


_QUANTIZED = {
    "fp8_block": lambda w13, w2: FP8BlockWeights.quantize(w13, w2),
    "fp8_tensor": lambda w13, w2: dataclasses.replace(
        FP8TensorWeights.quantize(w13, w2), a13_scale=torch.ones(1), a2_scale=torch.ones(1)
    ),
    "nvfp4": lambda w13, w2: NVFP4Weights.quantize(w13, w2),
}
BAD_SCALES = [
    ("fp8_block", "w13_scale", (1, 0, 1), float("nan"), r"finite and >= 0, got nan at index \[1, 0, 1\]"),
    ("fp8_block", "w13_scale", (2, 1, 0), float("inf"), r"finite and >= 0, got inf at index \[2, 1, 0\]"),
    ("fp8_block", "w2_scale", (0, 1, 0), -1.0, r"finite and >= 0, got -1.0 at index \[0, 1, 0\]"),
    ("fp8_tensor", "w13_scale", (1,), 0.0, r"finite and > 0, got 0.0 at index \[1\]"),
    ("fp8_tensor", "w13_scale", (2,), float("nan"), r"finite and > 0, got nan at index \[2\]"),
    ("fp8_tensor", "w2_scale", (0,), -0.25, r"finite and > 0, got -0.25 at index \[0\]"),
    ("fp8_tensor", "w2_scale", (0,), float("-inf"), r"finite and > 0, got -inf at index \[0\]"),
    ("fp8_tensor", "a13_scale", (0,), 0.0, r"finite and > 0, got 0.0 at index \[0\]"),
    ("fp8_tensor", "a2_scale", (0,), float("nan"), r"finite and > 0, got nan at index \[0\]"),
    ("nvfp4", "w13_scale_2", (2, 1), 0.0, r"finite and > 0, got 0.0 at index \[2, 1\]"),
    ("nvfp4", "w13_scale_2", (0, 0), float("nan"), r"finite and > 0, got nan at index \[0, 0\]"),
    ("nvfp4", "w13_scale_2", (1, 1), float("inf"), r"finite and > 0, got inf at index \[1, 1\]"),
    ("nvfp4", "w2_scale_2", (1,), -1e-3, r"finite and > 0, got -0.001 at index \[1\]"),
    ("nvfp4", "w13_scale", (1, 7, 3), float("nan"), r"finite and >= 0, got nan at index \[1, 7, 3\]"),
    ("nvfp4", "w2_scale", (2, 200, 5), -0.5, r"finite and >= 0, got -0.5 at index \[2, 200, 5\]"),
]


@pytest.mark.parametrize("precision, field, index, value, match", BAD_SCALES)
def test_bad_scales_are_refused_at_construction(master, precision, field, index, value, match):
    weights = _QUANTIZED[precision](*master)
    with pytest.raises(ValueError, match=rf"^{field}: expected scales {match}"):
        _replaced(weights, field, index, value)


@pytest.mark.parametrize("precision, field", [("fp8_block", "w2_scale"), ("nvfp4", "w13_scale")])
def test_zero_block_scales_are_accepted(master, precision, field):
    weights = _replaced(_QUANTIZED[precision](*master), field, (0, 0, 0), 0.0)
    w13, w2 = weights.dequantize_expert(0)
    assert bool(torch.isfinite(w13).all() and torch.isfinite(w2).all())


def test_scale_check_can_be_skipped_for_dummy_weights(master, monkeypatch):
    weights = NVFP4Weights.quantize(*master)
    monkeypatch.setenv("MOE_BACKEND_CHECK_SCALES", "0")
    assert _replaced(weights, "w13_scale_2", (0, 0), -1.0).w13_scale_2[0, 0] == -1.0
    monkeypatch.setenv("MOE_BACKEND_CHECK_SCALES", "no")
    with pytest.raises(ValueError, match="MOE_BACKEND_CHECK_SCALES: expected '0' or '1', got 'no'"):
        NVFP4Weights.quantize(*master)


def test_nan_master_weights_are_refused_as_their_scales(master):
    w13, w2 = master
    w13 = w13.clone()
    w13[1, 3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"w13_scale: expected scales finite and >= 0, got nan at index \[1, 0, 0\]"):
        FP8BlockWeights.quantize(w13, w2)
    with pytest.raises(ValueError, match=r"w13_scale_2: expected scales finite and > 0, got nan at index \[1, 0\]"):
        NVFP4Weights.quantize(w13, w2)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda w13, w2: FP8BlockWeights(*dataclasses.astuple(FP8BlockWeights.quantize(w13, w2))[:4], ue8m0="no"),
            TypeError,
            "ue8m0: expected a bool",
        ),
        (
            lambda w13, w2: BF16Weights.quantize(w13, w2).dequantize_expert(E),
            ValueError,
            r"e: expected a local expert in \[0, 3\), got 3",
        ),
        (
            lambda w13, w2: FP8TensorWeights.quantize(w13, w2).dequantize_expert(-1),
            ValueError,
            "e: expected an int >= 0",
        ),
        (lambda w13, w2: NVFP4Weights.quantize(w13, w2).dequantize_expert(1.0), TypeError, "e: expected an int"),
        (lambda w13, w2: NVFP4Weights.quantize(w13[0], w2), ValueError, "w13: expected a 3-D tensor"),
        (lambda w13, w2: FP8BlockWeights.quantize(w13, w2.int()), TypeError, "w2: expected dtype"),
        (lambda w13, w2: FP8TensorWeights.quantize(w13.numpy(), w2), TypeError, "w13: expected a torch.Tensor"),
    ],
)
def test_bad_arguments_are_named(master, call, error, match):
    with pytest.raises(error, match=match):
        call(*master)


@pytest.mark.parametrize("cls", [FP8BlockWeights, FP8TensorWeights, NVFP4Weights])
def test_quantizing_in_expert_chunks_is_exact(master, cls, monkeypatch):
    """Large masters are quantized a few experts at a time; the result equals one pass bit for bit."""
    import moe_backend.expert_weights as expert_weights

    w13, w2 = master
    whole = cls.quantize(w13, w2)
    monkeypatch.setattr(expert_weights, "QUANTIZE_CHUNK_ELEMENTS", w2[0].numel() * 3 // 2)  # 1 expert a chunk
    chunked = cls.quantize(w13, w2)
    for field in dataclasses.fields(whole):
        a, b = getattr(whole, field.name), getattr(chunked, field.name)
        if isinstance(a, torch.Tensor):
            bits = (lambda t: t.view(torch.uint8)) if a.dtype == FP8_DTYPE else (lambda t: t)
            assert a.shape == b.shape and torch.equal(bits(a), bits(b)), field.name
