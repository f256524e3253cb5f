"""Top-k combine finalizers of GEMM2's output into ``out[:T]`` bf16 (see ``fp8_gemm2``).

* :func:`cast_out`: GEMM2 summed the k experts into an fp32 ``acc [T, H]`` with
  atomics; round it to bf16 once, as the reference does.
* :func:`sum_pairs`: GEMM2 stored each (token, expert) output as a bf16 row;
  add a token's k rows in slot order in fp32 (deterministic), round once.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from .fp8_tile import to_bf16
from .tiles import zero_fill

BLOCK = 2048


@triton.jit
def _cast_kernel(acc_ptr, out_ptr, numel, reset_ptr, reset_numel, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
    # counters the kernels before this one counted up (fp8_swapab's GEMM2 waits): back to 0
    zero_fill(reset_ptr, reset_numel, BLOCK)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    tl.store(out_ptr + offs, to_bf16(tl.load(acc_ptr + offs, mask=mask)), mask=mask)


def cast_out(acc: torch.Tensor, out: torch.Tensor, pdl: bool = False, reset: Optional[torch.Tensor] = None) -> None:
    """Write ``acc [T, H]`` fp32 into ``out [T, H]`` bf16; both contiguous, T > 0.

    ``pdl``: a programmatic dependent launch (the previous kernel signalled its dependents;
    this one waits for it to complete before reading ``acc``); on a GPU only. ``reset``: int32
    contiguous counters set to 0 once the previous kernel is complete (or None).
    """
    assert acc.is_contiguous() and out.is_contiguous() and acc.shape == out.shape
    assert reset is None or (reset.is_contiguous() and reset.dtype == torch.int32)
    numel = acc.numel()
    _cast_kernel[(triton.cdiv(numel, BLOCK),)](
        acc,
        out,
        numel,
        acc if reset is None else reset,
        0 if reset is None else reset.numel(),
        BLOCK=BLOCK,
        PDL=pdl,
        num_warps=4,
        **({"launch_pdl": True} if pdl else {}),
    )


@triton.jit
def _sum_pairs_kernel(rows_ptr, row_of_pair_ptr, out_ptr, H, top_k, stride_rm, stride_om, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(top_k):
        row = tl.load(row_of_pair_ptr + t * top_k + j).to(tl.int64)
        acc += tl.load(rows_ptr + row * stride_rm + cols, mask=mask & (row >= 0), other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_om + cols, to_bf16(acc), mask=mask)


def sum_pairs(rows: torch.Tensor, row_of_pair: torch.Tensor, top_k: int, out: torch.Tensor) -> None:
    """``out[t] = sum_j rows[row_of_pair[t*k + j]]`` (rows with index -1 skipped), in slot order.

    ``rows [P, H]`` bf16, ``row_of_pair [T * k]`` int32, ``out [T, H]`` bf16; T > 0.
    """
    t, h = out.shape
    grid = (t, triton.cdiv(h, BLOCK))
    _sum_pairs_kernel[grid](rows, row_of_pair, out, h, top_k, rows.stride(0), out.stride(0), BLOCK=BLOCK, num_warps=4)
