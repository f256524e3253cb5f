"""NVFP4 (ModelOpt) format against plain python rounding and packing."""

import pytest
import torch

from moe_backend.quant import fp8, nvfp4

GRID = nvfp4.E2M1_VALUES


def _rne_code(v: float) -> int:
    """Nearest e2m1 magnitude index, ties to the even index (plain python)."""
    mag = min(abs(v), 6.0)
    best = min(range(8), key=lambda c: (abs(GRID[c] - mag), c % 2))
    return best | (8 if v < 0 else 0)


def test_encode_matches_python_rne_on_grid_midpoints_and_beyond():
    values = [
        0.0,
        0.1,
        0.25,
        0.26,
        0.5,
        0.75,
        1.0,
        1.25,
        1.5,
        1.75,
        2.0,
        2.5,
        2.9,
        3.0,
        3.5,
        4.0,
        4.9,
        5.0,
        5.1,
        6.0,
        7.5,
        100.0,
    ]
    values += [-v for v in values if v]
    got = nvfp4.encode_e2m1(torch.tensor(values)).tolist()
    assert got == [_rne_code(v) for v in values]


def test_decode_inverts_encode_on_grid():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = nvfp4.decode_e2m1(codes)
    assert vals[:8].tolist() == list(GRID)
    back = nvfp4.encode_e2m1(vals)
    keep = codes != 8  # code 8 is -0, which decodes to 0.0 and re-encodes as code 0
    assert torch.equal(back[keep], codes[keep])
    assert vals[8].item() == 0.0 and back[8].item() == 0


def test_pack_low_nibble_first_and_roundtrip():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = nvfp4.pack_e2m1(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    rnd = torch.randint(0, 16, (3, 5, 32), dtype=torch.uint8)
    assert torch.equal(nvfp4.unpack_e2m1(nvfp4.pack_e2m1(rnd)), rnd)


def _loop_quant(w: torch.Tensor):
    """ModelOpt NVFP4 of one matrix with python loops over 16-blocks."""
    gs = float(w.abs().max()) / (6 * 448)
    n, k = w.shape
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, k // 16, dtype=fp8.FP8_DTYPE)
    for r in range(n):
        for b in range(k // 16):
            blk = w[r, b * 16 : (b + 1) * 16]
            s = torch.tensor(float(blk.abs().max()) / (6 * gs)).to(fp8.FP8_DTYPE)
            scales[r, b] = s
            d = float(s.float()) * gs
            for c in range(16):
                codes[r, b * 16 + c] = _rne_code(float(blk[c]) / d) if d > 0 else 0
    return codes, scales, gs


def test_quantize_matches_loop():
    w = torch.randn(6, 64) * torch.logspace(-2, 1, 6)[:, None]
    packed, scales, gs = nvfp4.quantize_nvfp4(w)
    lc, ls, lg = _loop_quant(w)
    assert gs.item() == pytest.approx(lg, rel=1e-6)
    assert torch.equal(scales.view(torch.uint8), ls.view(torch.uint8))
    assert torch.equal(nvfp4.unpack_e2m1(packed), lc)


def test_dequantize_formula_and_error():
    w = torch.randn(2, 32, 64)
    packed, scales, gs = nvfp4.quantize_nvfp4(w)
    d = nvfp4.dequantize_nvfp4(packed, scales, gs)
    codes = nvfp4.unpack_e2m1(packed)
    e, r, c = 1, 3, 37
    want = nvfp4.decode_e2m1(codes[e, r, c]) * scales[e, r, c // 16].float() * gs[e]
    assert d[e, r, c].item() == pytest.approx(want.item(), rel=1e-6)
    assert float((d - w).norm() / w.norm()) < 0.12  # about 9.5 % RMS for Gaussian data


def test_zero_matrix_quantizes_to_zero():
    packed, scales, gs = nvfp4.quantize_nvfp4(torch.zeros(4, 32))
    assert torch.equal(nvfp4.dequantize_nvfp4(packed, scales, gs), torch.zeros(4, 32))


def test_given_global_scale_is_used():
    w = torch.randn(8, 32)
    g = torch.tensor(0.01)
    _, _, gs = nvfp4.quantize_nvfp4(w, g)
    assert gs.item() == pytest.approx(0.01)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: nvfp4.quantize_nvfp4(torch.randn(4, 24)), "K a multiple of 16"),
        (lambda: nvfp4.quantize_nvfp4(torch.randn(4, 32).int()), "w: expected dtype"),
        (lambda: nvfp4.quantize_nvfp4(torch.randn(2, 4, 32), torch.ones(3)), r"global_scale: expected shape \(2,\)"),
        (lambda: nvfp4.pack_e2m1(torch.zeros(3, dtype=torch.uint8)), "codes: expected an even last dimension"),
        (lambda: nvfp4.pack_e2m1(torch.zeros(4, dtype=torch.int32)), "codes: expected dtype torch.uint8"),
        (lambda: nvfp4.unpack_e2m1(torch.zeros(4)), "packed: expected dtype torch.uint8"),
        (
            lambda: nvfp4.dequantize_nvfp4(
                torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 2, dtype=fp8.FP8_DTYPE), torch.ones(())
            ),
            r"block_scale: expected shape \(4, 1\)",
        ),
        (
            lambda: nvfp4.dequantize_nvfp4(torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(4, 1), torch.ones(())),
            "packed: expected K = 2 \\* last dim to be a multiple of 16",
        ),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# -- empty in, empty out; explicit global scales refused outside the rule --------------------------
@pytest.mark.parametrize("shape", [(0, 32), (3, 0, 32), (2, 4, 0)])
def test_empty_inputs_give_empty_outputs(shape):
    w = torch.zeros(shape)
    packed, block, g = nvfp4.quantize_nvfp4(w)
    assert packed.shape == (*shape[:-1], shape[-1] // 2) and g.shape == shape[:-2]
    assert torch.equal(nvfp4.dequantize_nvfp4(packed, block, g), w)


@pytest.mark.parametrize("value, index", [(0.0, 0), (float("nan"), 1), (float("inf"), 1), (-0.5, 0)])
def test_explicit_global_scale_outside_the_rule_is_refused(value, index):
    g = torch.ones(2)
    g[index] = value
    with pytest.raises(
        ValueError,
        match=rf"^global_scale: expected scales finite and > 0, got .* at index "
        rf"\[{index}\]",
    ):
        nvfp4.quantize_nvfp4(torch.randn(2, 4, 32), g)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: nvfp4.quantize_nvfp4(torch.randn(4, 32), torch.ones(1)),
            ValueError,
            r"global_scale: expected shape \(\)",
        ),
        (lambda: nvfp4.quantize_nvfp4(torch.randn(4, 24)), ValueError, "w: expected .* K a multiple of 16"),
        (
            lambda: nvfp4.dequantize_nvfp4(
                torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(4, 2).to(fp8.FP8_DTYPE), torch.ones(2)
            ),
            ValueError,
            r"global_scale: expected shape \(\)",
        ),
        (
            lambda: nvfp4.pack_e2m1(torch.zeros(3, dtype=torch.uint8)),
            ValueError,
            "codes: expected an even last dimension",
        ),
    ],
)
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
