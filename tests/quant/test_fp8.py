"""FP8 formats against plain per-block / per-group loops."""

import math

import numpy as np
import pytest
import torch

from moe_backend.quant import fp8


def _loop_block_quant(w: torch.Tensor, block: int):
    """Independent per-block quantization: one python iteration per block."""
    n, k = w.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    q = torch.empty(n, k, dtype=fp8.FP8_DTYPE)
    s = torch.empty(nb, kb)
    for i in range(nb):
        for j in range(kb):
            blk = w[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            scale = max(float(blk.abs().max()), fp8.FP8_EPS) / 448.0
            s[i, j] = scale
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (
                (blk / scale).clamp(-448, 448).to(fp8.FP8_DTYPE)
            )
    return q, s


@pytest.mark.parametrize("shape", [(256, 384), (130, 260), (1, 5), (3, 128, 256)])
def test_block_quant_matches_loop(shape):
    w = torch.randn(*shape) * 3
    q, s = fp8.quantize_fp8_block(w)
    flat_w = w.reshape(-1, *shape[-2:])
    flat_q, flat_s = q.reshape(-1, *shape[-2:]), s.reshape(-1, *s.shape[-2:])
    for m in range(flat_w.shape[0]):
        lq, ls = _loop_block_quant(flat_w[m], 128)
        torch.testing.assert_close(flat_s[m], ls, rtol=1e-6, atol=0)
        assert torch.equal(flat_q[m].view(torch.uint8), lq.view(torch.uint8))


def test_block_dequant_is_q_times_block_scale():
    w = torch.randn(200, 300)
    q, s = fp8.quantize_fp8_block(w)
    d = fp8.dequantize_fp8_block(q, s)
    for i in range(0, 200, 37):
        for j in range(0, 300, 41):
            assert d[i, j] == q[i, j].float() * s[i // 128, j // 128]
    assert float((d - w).norm() / w.norm()) < 0.04  # e4m3: about 2.6 % RMS for Gaussian data


def test_per_token_group_matches_loop_and_partial_group():
    x = torch.randn(5, 300) * torch.logspace(-3, 3, 5)[:, None]
    q, s = fp8.quantize_fp8_per_token_group(x, 128)
    assert s.shape == (5, 3)
    for t in range(5):
        for g in range(3):
            seg = x[t, g * 128 : (g + 1) * 128]
            scale = max(float(seg.abs().max()), fp8.FP8_EPS) / 448.0
            assert s[t, g].item() == pytest.approx(scale, rel=1e-6)
            want = (seg / scale).clamp(-448, 448).to(fp8.FP8_DTYPE)
            assert torch.equal(q[t, g * 128 : (g + 1) * 128].view(torch.uint8), want.view(torch.uint8))


def test_activation_codes_are_products_of_correctly_rounded_reciprocals():
    """The definition every device and kernel computes alike (fp32 numpy arithmetic here): on
    ``x * 0.7`` of bf16 values, where many quotients sit within an ulp of an e4m3 tie."""
    assert np.float32(1) / np.float32(448) == np.float32(fp8.RCP_FP8_MAX)
    x = torch.randn(64, 1024).to(torch.bfloat16).float() * 0.7
    q, s = fp8.quantize_fp8_per_token_group(x, 128)
    xn = x.numpy().reshape(64, 8, 128)
    amax = np.abs(xn).max(-1)
    want_s = np.maximum(amax, np.float32(fp8.FP8_EPS)) * np.float32(fp8.RCP_FP8_MAX)
    assert np.array_equal(s.numpy(), want_s)
    assert not np.array_equal(want_s, amax / np.float32(448))  # the two scales differ by an ulp here
    codes = xn * (np.float32(1) / want_s)[..., None]
    assert codes.dtype == np.float32
    want_q = torch.from_numpy(np.clip(codes, -448, 448).reshape(64, 1024)).to(fp8.FP8_DTYPE)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    static = torch.tensor([0.013])
    got = fp8.fake_quant_activation(x, static)
    want = torch.from_numpy(np.clip(x.numpy() * (np.float32(1) / np.float32(0.013)), -448, 448)).to(fp8.FP8_DTYPE)
    assert torch.equal(got, want.float() * static)


def test_ue8m0_scales_are_powers_of_two_and_cover_amax():
    x = torch.randn(7, 256) * 10
    q, s = fp8.quantize_fp8_per_token_group(x, 128, ue8m0=True)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    amax = x.view(7, 2, 128).abs().amax(-1)
    assert bool((s * 448 >= amax).all())  # rounded up: nothing saturates
    assert not torch.isnan(q.float()).any()


def test_zero_input_gives_zero_not_nan():
    q, s = fp8.quantize_fp8_per_token_group(torch.zeros(2, 128))
    assert torch.equal(fp8.dequantize_fp8_per_token_group(q, s), torch.zeros(2, 128))
    qb, sb = fp8.quantize_fp8_block(torch.zeros(128, 128))
    assert torch.equal(fp8.dequantize_fp8_block(qb, sb), torch.zeros(128, 128))


def test_per_tensor_dynamic_and_static():
    w = torch.randn(4, 64, 32)
    q, s = fp8.quantize_fp8_per_tensor(w)
    assert s.shape == (4,)
    torch.testing.assert_close(s, w.abs().amax(dim=(1, 2)) / 448)
    d = fp8.dequantize_fp8_per_tensor(q, s)
    assert float((d - w).norm() / w.norm()) < 0.04
    static = torch.full((4,), 0.01)
    q2, s2 = fp8.quantize_fp8_per_tensor(w, static)
    assert s2 is not None and torch.equal(s2, static)
    assert float(fp8.dequantize_fp8_per_tensor(q2, s2).abs().max()) <= 448 * 0.01 + 1e-6


def test_fake_quant_static_scale():
    x = torch.randn(3, 64)
    scale = torch.tensor([0.02])
    y = fp8.fake_quant_activation(x, scale)
    want = (x / 0.02).clamp(-448, 448).to(fp8.FP8_DTYPE).float() * 0.02
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fp8.quantize_fp8_block(torch.randn(8, 8).int()), "w: expected dtype"),
        (lambda: fp8.quantize_fp8_block(torch.randn(8)), "w: expected a tensor of at least 2 dims"),
        (lambda: fp8.quantize_fp8_block(torch.randn(8, 8), block=0), "block: expected an int >= 1"),
        (
            lambda: fp8.dequantize_fp8_block(torch.zeros(256, 256, dtype=fp8.FP8_DTYPE), torch.ones(2, 1)),
            r"scale: expected shape \(2, 2\)",
        ),
        (lambda: fp8.dequantize_fp8_block(torch.zeros(4, 4), torch.ones(1, 1)), "q: expected dtype"),
        (lambda: fp8.quantize_fp8_per_token_group(torch.randn(2, 3, 4)), "x: expected a 2-D tensor"),
        (
            lambda: fp8.dequantize_fp8_per_token_group(torch.zeros(2, 256, dtype=fp8.FP8_DTYPE), torch.ones(2, 3)),
            r"s: expected shape \(2, 2\)",
        ),
        (lambda: fp8.quantize_fp8_per_tensor(torch.randn(2, 4, 4), torch.ones(3)), r"scale: expected shape \(2,\)"),
        (
            lambda: fp8.dequantize_fp8_per_tensor(torch.zeros(2, 4, 4, dtype=fp8.FP8_DTYPE), torch.ones(2).double()),
            "scale: expected dtype torch.float32",
        ),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# -- empty in, empty out; explicit scales refused outside the rule ---------------------------------
@pytest.mark.parametrize("shape", [(0, 16), (3, 0, 16), (4, 0)])
def test_empty_inputs_give_empty_outputs(shape):
    w = torch.zeros(shape)
    q, s = fp8.quantize_fp8_per_tensor(w)
    assert q.shape == shape and s.shape == shape[:-2] and torch.equal(fp8.dequantize_fp8_per_tensor(q, s), w)
    q, s = fp8.quantize_fp8_block(w)
    assert q.shape == shape and torch.equal(fp8.dequantize_fp8_block(q, s), w)


@pytest.mark.parametrize("shape", [(0, 256), (3, 0)])
def test_empty_activations_give_empty_outputs(shape):
    x = torch.zeros(shape)
    q, s = fp8.quantize_fp8_per_token_group(x)
    assert torch.equal(fp8.dequantize_fp8_per_token_group(q, s), x)
    assert fp8.fake_quant_activation(x).shape == shape
    assert fp8.fake_quant_activation(x, torch.ones(1)).shape == shape


@pytest.mark.parametrize(
    "value, index", [(0.0, 1), (float("nan"), 0), (float("inf"), 2), (-1.0, 1), (float("-inf"), 0)]
)
def test_explicit_per_tensor_scale_outside_the_rule_is_refused(value, index):
    scale = torch.ones(3)
    scale[index] = value
    with pytest.raises(ValueError, match=rf"^scale: expected scales finite and > 0, got .* at index \[{index}\]"):
        fp8.quantize_fp8_per_tensor(torch.randn(3, 4, 16), scale)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: fp8.dequantize_fp8_block(torch.zeros(4, 4).to(fp8.FP8_DTYPE), torch.ones(1, 1), block=0),
            ValueError,
            "block: expected an int >= 1",
        ),
        (
            lambda: fp8.dequantize_fp8_block(torch.zeros(4).to(fp8.FP8_DTYPE), torch.ones(1)),
            ValueError,
            "q: expected a tensor of at least 2 dims",
        ),
        (
            lambda: fp8.dequantize_fp8_per_token_group(torch.zeros(2, 4).to(fp8.FP8_DTYPE), torch.ones(2, 1), group=0),
            ValueError,
            "group: expected an int >= 1",
        ),
        (lambda: fp8.quantize_fp8_per_token_group(torch.zeros(2, 4), ue8m0="no"), TypeError, "ue8m0: expected a bool"),
        (
            lambda: fp8.fake_quant_activation(torch.zeros(2, 4), torch.ones(2)),
            ValueError,
            r"static_scale: expected shape \(1,\)",
        ),
        (lambda: fp8.fake_quant_activation(torch.zeros(2, 4), 0.5), TypeError, "static_scale: expected a torch.Tensor"),
        (lambda: fp8.fake_quant_activation(torch.zeros(4)), ValueError, "x: expected a 2-D tensor"),
        (
            lambda: fp8.quantize_fp8_per_tensor(torch.zeros(2, 4), torch.ones(1)),
            ValueError,
            r"scale: expected shape \(\)",
        ),
    ],
)
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
