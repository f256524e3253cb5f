"""``silu_mul_quant`` (SiLU-and-mul with per-row-per-128 FP8 requantization) against the torch
quantizer ``quantize_fp8_per_token_group`` bit for bit, on odd shapes.

Under the interpreter the product ``gate * sigmoid(gate) * up`` is reproduced exactly in numpy
(Triton's ``sigmoid`` is ``1 / (1 + exp(-x))`` in fp32 there), so e4m3 codes and scales must be
identical (but for the sign of a zero code, see ``_same_codes``). On a GPU ``tl.sigmoid`` uses the
fast ``exp``: the product may differ by an ulp, which can move a code by one step; there the check
is the dequantized value, with exact codes almost everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from moe_checks import CUDA, DEVICE, runs_here

from moe_backend.kernels.sm90.silu_mul_quant import silu_mul_quant
from moe_backend.quant.fp8 import FP8_DTYPE, dequantize_fp8_per_token_group, quantize_fp8_per_token_group


def _gate_up(p: int, inter: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p, 2 * inter, generator=g) * torch.exp(torch.randn(p, 1, generator=g) * 2)
    if p > 3:
        x[1] = 0.0  # an all-zero row: the eps scale
        x[2, :inter] = -30.0  # saturated gates: silu ~ -0
        x[3, :128] *= 1e-8  # one tiny group, others normal
    return x


def _product(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate * sigmoid(gate) * up`` in fp32 exactly as the interpreted kernel computes it."""
    inter = gate_up.shape[1] // 2
    g = gate_up[:, :inter].numpy().astype(np.float32)
    u = gate_up[:, inter:].numpy().astype(np.float32)
    with np.errstate(over="ignore"):
        sig = np.float32(1.0) / (np.float32(1.0) + np.exp(-g))
    return torch.from_numpy((g * sig) * u)


def _run(gate_up: torch.Tensor, num_rows=None):
    p, two_i = gate_up.shape
    inter = two_i // 2
    y = torch.full((p, inter), float("nan"), device=DEVICE).to(FP8_DTYPE)
    s = torch.full((p, inter // 128), float("nan"), device=DEVICE)
    silu_mul_quant(gate_up.to(DEVICE), y, s, num_rows)
    return y.cpu(), s.cpu()


@runs_here
@pytest.mark.parametrize("inter", [128, 384])
@pytest.mark.parametrize("p", [0, 1, 7, 130])
def test_matches_torch_quantizer(p, inter):
    gate_up = _gate_up(p, inter, seed=p + inter)
    y, s = _run(gate_up)
    if CUDA:
        v = gate_up[:, :inter] * torch.sigmoid(gate_up[:, :inter]) * gate_up[:, inter:]
        q_ref, s_ref = quantize_fp8_per_token_group(v)
        # exp(-g) runs as ex2(-g * log2 e): the rounded product carries |g| * log2(e) * 2^-24 of
        # absolute error into the exponent, 1.8e-6 relative at the saturated gates (g = -30, row 2)
        # where the amax is sigmoid-sized (H200: 1.17e-6 seen)
        torch.testing.assert_close(s, s_ref, rtol=4e-6, atol=0)
        got = dequantize_fp8_per_token_group(y, s)
        want = dequantize_fp8_per_token_group(q_ref, s_ref)
        step = s_ref.repeat_interleave(128, dim=1) * 32  # one e4m3 step at the top of the range
        assert torch.all((got - want).abs() <= step)
        assert (y.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean() > 0.999 if p else True
        return
    q_ref, s_ref = quantize_fp8_per_token_group(_product(gate_up))
    assert torch.equal(s, s_ref)
    assert _same_codes(y, q_ref)


def _same_codes(y: torch.Tensor, q: torch.Tensor) -> bool:
    """Identical e4m3 codes, except that a -0 may read +0: the interpreter's e4m3 cast drops the
    sign of a value that rounds to zero (seen with Triton 3.6); the GPU's cvt keeps it."""
    return torch.equal(y.float(), q.float()) and torch.equal(
        y.view(torch.uint8)[y.float() != 0], q.view(torch.uint8)[q.float() != 0]
    )


@runs_here
def test_num_rows_bounds_the_rows_written():
    gate_up = _gate_up(9, 256, seed=3)
    bound = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    y, s = _run(gate_up, bound)
    q_ref, s_ref = quantize_fp8_per_token_group(_product(gate_up[:5]))
    assert torch.all(torch.isnan(s[5:])) and torch.all(torch.isnan(y[5:].float()))
    if not CUDA:
        assert torch.equal(s[:5], s_ref) and _same_codes(y[:5], q_ref)


def test_bad_arguments_are_named():
    gu = torch.zeros(3, 512)
    y = torch.empty(3, 256, dtype=FP8_DTYPE)
    s = torch.empty(3, 2)
    cases = [
        ("gate_up", dict(gate_up=gu.double())),
        ("gate_up", dict(gate_up=torch.zeros(3, 384))),
        ("y", dict(y=torch.empty(3, 256, dtype=torch.bfloat16))),
        ("y", dict(y=torch.empty(4, 256, dtype=FP8_DTYPE))),
        ("y_scale", dict(y_scale=torch.empty(3, 3))),
        ("y_scale", dict(y_scale=torch.empty(2, 3).t())),
        ("num_rows", dict(num_rows=torch.tensor([3]))),
    ]
    for name, change in cases:
        args = dict(gate_up=gu, y=y, y_scale=s)
        args.update(change)
        with pytest.raises((TypeError, ValueError), match=f"^{name}:"):
            silu_mul_quant(**args)
