"""Tile bookkeeping shared by the FP8 and NVFP4 GEMM kernels (Triton device functions)."""

import triton
import triton.language as tl


@triton.jit
def tile_coords(pid, max_tiles, num_n, GROUP_M: tl.constexpr):
    """Program id -> (tile, column block), GROUP_M tiles at a time so tiles of one
    expert walk the same weight columns together (weights stay in L2)."""
    per_group = GROUP_M * num_n
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(max_tiles - first, GROUP_M)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def aligned_rows(pid_m, pid_n, sorted_ptr, tile_expert_ptr, num_pairs, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows of aligned tile ``pid_m`` and columns of block ``pid_n`` (of ``N``).

    Returns ``(rows [BLOCK_M], pair [BLOCK_M], row_ok, expert, offs_n [BLOCK_N], n_ok)``:
    ``pair`` is each row's ``t * k + j`` (padding rows hold ``num_pairs`` and are not ok),
    ``expert`` the tile's local expert (int64).
    """
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    expert = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, pair, pair < num_pairs, expert, offs_n, offs_n < N


@triton.jit
def zero_fill(ptr, numel, BLOCK: tl.constexpr):
    """This program's grid-stride share of zeroing ``numel`` elements at ``ptr`` (any dtype: the
    fp32 zeros convert on store)."""
    for z in range(tl.program_id(0) * BLOCK, numel, tl.num_programs(0) * BLOCK):
        offs = z + tl.arange(0, BLOCK)
        tl.store(ptr + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=offs < numel)
