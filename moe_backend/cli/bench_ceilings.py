"""Ceilings measured on the GPU the benchmark runs on (never constants of another GPU).

* :func:`measure_peaks`: read-streaming bandwidth (a read-only Triton kernel over 4 GiB),
  device-to-device copy bandwidth (bytes read + written), dense FP8 (``torch._scaled_mm``)
  and dense bf16 (``torch.matmul``) GEMM throughput at 8192^3.
* :func:`expert_stream`: a launch that only reads the active experts' weight bytes
  (``w13[e]`` and ``w2[e]`` for each active ``e``, one launch): the time a weight-streaming
  layer cannot beat at that point, kernel launch and ramp included.
* :func:`dense_gemms`: cuBLAS (through torch) doing one layer's MMA work as two dense GEMMs,
  timed at each point beside the layer: the compute a grouped layer would match if grouping,
  routing and its epilogues cost nothing, at the clocks the card holds while the layer runs
  (under a long prefill the H200 sits at its power cap, well below the clock of the short
  peak measurement).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import triton
import triton.language as tl
import triton.testing

from ..quant.fp8 import BLOCK, FP8_DTYPE

STREAM_BLOCK = 4096
STREAM_CHUNKS = 8


@triton.jit
def _stream_kernel(
    a_ptr, b_ptr, expert_ptr, a_words, b_words, num_active, out_ptr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr
):
    """Program ``(c, j)``: chunk ``c`` of ``a[e]`` (``j < num_active``) or of ``b[e]`` (else),
    ``e = expert_ptr[j % num_active]``; XORs the int32 words so the loads cannot be dropped."""
    j = tl.program_id(1)
    e = tl.load(expert_ptr + j % num_active).to(tl.int64)
    first = j < num_active
    words = tl.where(first, a_words, b_words)
    start = tl.program_id(0).to(tl.int64) * BLOCK * CHUNKS
    if start < words:
        base = tl.where(first, a_ptr + e * a_words, b_ptr + e * b_words)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for c in range(CHUNKS):
            offs = start + c * BLOCK + tl.arange(0, BLOCK)
            acc ^= tl.load(base + offs, mask=offs < words, other=0)
        tl.store(out_ptr + j * tl.num_programs(0) + tl.program_id(0), tl.sum(acc, 0))


def expert_stream(w13: torch.Tensor, w2: torch.Tensor, experts: torch.Tensor) -> Callable[[], None]:
    """A launch reading ``w13[e]`` and ``w2[e]`` (all bytes) for each ``e`` in ``experts``.

    ``w13 [E, ...]`` and ``w2 [E, ...]`` contiguous, any dtype whose per-expert size is a
    multiple of 4 bytes; ``experts`` int32 on the same device.
    """
    a_words = w13[0].numel() * w13.element_size() // 4
    b_words = w2[0].numel() * w2.element_size() // 4
    grid0 = triton.cdiv(max(a_words, b_words), STREAM_BLOCK * STREAM_CHUNKS)
    n = experts.numel()
    out = torch.empty(2 * n * grid0, dtype=torch.int32, device=w13.device)
    a, b = w13.view(torch.int32), w2.view(torch.int32)
    return lambda: _stream_kernel[(grid0, 2 * n)](
        a, b, experts, a_words, b_words, n, out, BLOCK=STREAM_BLOCK, CHUNKS=STREAM_CHUNKS, num_warps=8
    )


def measure_peaks(device: torch.device) -> Dict[str, float]:
    """``read_gbs`` (read-only streaming), ``copy_gbs`` (D2D copy, read + written), ``fp8_tflops``
    and ``bf16_tflops`` (dense 8192^3 GEMMs), each a ``do_bench`` median on ``device``."""
    src = torch.empty(1 << 30, dtype=torch.int32, device=device)  # 4 GiB
    one = torch.zeros(1, dtype=torch.int32, device=device)
    whole = src.view(1, -1)
    read = expert_stream(whole, whole[:, :4096], one)
    ms = triton.testing.do_bench(read, return_mode="median")
    peaks = {"read_gbs": src.numel() * 4 / (ms * 1e-3) / 1e9}
    half = src.view(torch.uint8)[: 1 << 31]
    dst = torch.empty_like(half)
    ms = triton.testing.do_bench(lambda: dst.copy_(half), return_mode="median")
    peaks["copy_gbs"] = 2 * half.numel() / (ms * 1e-3) / 1e9
    n = 8192
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
    scale = torch.ones((), device=device)
    ms = triton.testing.do_bench(
        lambda: torch._scaled_mm(a, b, scale, scale, out_dtype=torch.bfloat16), return_mode="median"
    )
    peaks["fp8_tflops"] = 2 * n**3 / (ms * 1e-3) / 1e12
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: x @ x, return_mode="median")
    peaks["bf16_tflops"] = 2 * n**3 / (ms * 1e-3) / 1e12
    return peaks


#: The dense GEMM kind that does each precision's MMA work (NVFP4 is W4A16 on Hopper: bf16 MMA).
DENSE_KINDS = {"fp8_block": "fp8_block", "fp8_tensor": "fp8_tensor", "nvfp4": "bf16", "bf16": "bf16"}


def dense_gemms(kind: str, m: int, h: int, i: int, device: torch.device) -> Callable[[], None]:
    """Two dense GEMMs doing the MMA work of a layer at ``m = T * top_k`` (token, expert) rows:
    ``[m, h] x [h, 2i]`` then ``[m, i] x [i, h]``, bf16 out, on random operands.

    ``kind``: ``'fp8_block'`` (``torch._scaled_mm`` with 1x128 activation and 128x128 weight
    scales, the layer's FP8 block format), ``'fp8_tensor'`` (tensor-wise scales) or ``'bf16'``
    (``torch.matmul``). ``h`` and ``i`` multiples of 128 for ``'fp8_block'``. The operands are
    allocated here (not inside a graph capture). Raises ValueError for an unknown ``kind``; a
    torch without block-scaled ``_scaled_mm`` raises RuntimeError when the call runs.
    """
    if kind not in DENSE_KINDS.values():
        raise ValueError(f"kind: expected one of {sorted(set(DENSE_KINDS.values()))}, got {kind!r}")
    shapes = ((h, 2 * i), (i, h))  # (K, N) of GEMM1 and GEMM2
    if kind == "bf16":
        ops = [
            (torch.randn(m, k, device=device).to(torch.bfloat16), torch.randn(k, n, device=device).to(torch.bfloat16))
            for k, n in shapes
        ]

        def run_bf16() -> None:
            for a, b in ops:
                torch.matmul(a, b)

        return run_bf16
    one = torch.ones((), device=device)
    gemms = []
    for k, n in shapes:
        a = torch.randn(m, k, device=device).to(FP8_DTYPE)
        b = torch.randn(n, k, device=device).to(FP8_DTYPE).t()  # column-major [K, N], as cuBLAS takes it
        if kind == "fp8_block":
            # [M, K/128] with M contiguous and [K/128, N/128] with K/128 contiguous: cuBLAS's
            # block-scale layouts
            sa = torch.ones(k // BLOCK, m, device=device).t()
            sb = torch.ones(n // BLOCK, k // BLOCK, device=device).t()
        else:
            sa = sb = one
        gemms.append((a, b, sa, sb))

    def run_fp8() -> None:
        for a, b, sa, sb in gemms:
            torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16)

    return run_fp8
