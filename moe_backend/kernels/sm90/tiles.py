"""Tile bookkeeping shared by the FP8 and NVFP4 GEMM kernels (Triton device functions).

Two ways to find a program's rows: the aligned tiles of ``align.align_block_size``
(:func:`tile_coords`, :func:`aligned_rows`), or, at decode, no alignment launch at all: every
program ``(p, ...)`` scans the ``T * k`` ids and only the *leader* of a local expert (its first
pair) computes, gathering the expert's pairs in order (:func:`expert_members`,
:func:`chunk_pairs`). With fewer local experts than pairs, programs can stand for the local
experts instead (:func:`local_expert_members`): fewer programs, none launched only to exit.
"""

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
    fp32 zeros convert on store). Shares are over the whole grid (up to three axes), so every
    program of the launch must call it."""
    n0, n1 = tl.num_programs(0), tl.num_programs(1)
    pid = tl.program_id(0) + n0 * (tl.program_id(1) + n1 * tl.program_id(2))
    for z in range(pid * BLOCK, numel, n0 * n1 * tl.num_programs(2) * BLOCK):
        offs = z + tl.arange(0, BLOCK)
        tl.store(ptr + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=offs < numel)


#: Largest pair count (T * k) the leader scan handles (its ids are held in registers).
MAX_GATHER_PAIRS = 1024


#: Register cap of the gathered (swap-AB) GEMM launches that stream weights from many programs
#: an SM (sm_90a builds, offline, 2026-12-02): NVFP4 GEMM1/GEMM2, which the leader scan and chunk
#: bookkeeping took from 123-127 registers a thread (the aligned path's) to 184-255, halving the
#: 128-thread programs an SM holds (4 -> 2; at 128, 20-112 bytes spill outside the inner loop);
#: FP8 GEMM2, which ptxas built at 132 (T=1) and 138 (T=8) registers instead of 128, one
#: 256-thread program an SM instead of two (no spill at 128).
GATHER_MAXNREG = 128


def register_cap(maxnreg: int, gather: bool) -> dict:
    """The ``maxnreg`` launch option of an NVFP4 GEMM: ``maxnreg`` when given (> 0), else
    :data:`GATHER_MAXNREG` on the gathered path and none on the aligned one."""
    if maxnreg:
        return {"maxnreg": maxnreg}
    return {"maxnreg": GATHER_MAXNREG} if gather else {}


def gather_scan_width(num_pairs: int) -> int:
    """``PAIRS``, the leader scan's register width for ``num_pairs`` ids: a power of two >= 16."""
    return max(16, triton.next_power_of_2(num_pairs))


@triton.jit
def expert_members(ids_ptr, p, num_pairs, expert_offset, num_experts, PAIRS: tl.constexpr):
    """Whether pair ``p`` leads its local expert, and that expert's pairs.

    Returns ``(leader, local expert (int64), members [PAIRS] bool, rank [PAIRS] int32, count)``:
    ``members`` marks the pairs with ``p``'s id, ``rank`` their order among them. A pair of a -1
    id or of an id outside ``[expert_offset, expert_offset + num_experts)`` leads nothing.
    """
    offs = tl.arange(0, PAIRS)
    ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
    mine = tl.load(ids_ptr + p)
    local = mine - expert_offset
    members = (ids == mine) & (offs < num_pairs)
    first = tl.min(tl.where(members, offs, PAIRS), 0)
    leader = (mine >= 0) & (local >= 0) & (local < num_experts) & (first == p)
    rank = tl.cumsum(members.to(tl.int32), 0) - 1
    return leader, local.to(tl.int64), members, rank, tl.sum(members.to(tl.int32), 0)


@triton.jit
def local_expert_members(ids_ptr, j, num_pairs, expert_offset, PAIRS: tl.constexpr):
    """:func:`expert_members` for a program that stands for local expert ``j`` rather than a pair:
    ``(active, j (int64), members [PAIRS] bool, rank [PAIRS] int32, count)``, ``active`` when some
    pair names the expert (its pairs in the same order, so the same chunks)."""
    offs = tl.arange(0, PAIRS)
    ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
    members = (ids == expert_offset + j) & (offs < num_pairs)
    rank = tl.cumsum(members.to(tl.int32), 0) - 1
    count = tl.sum(members.to(tl.int32), 0)
    return count > 0, j.to(tl.int64), members, rank, count


@triton.jit
def chunk_pairs(members, rank, count, chunk, PAIRS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Pairs ``chunk * BLOCK_T ..`` of an expert (in pair order): ``(pair [BLOCK_T], ok [BLOCK_T])``."""
    slot = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
    pick = members[None, :] & (rank[None, :] == slot[:, None])
    pair = tl.sum(tl.where(pick, tl.arange(0, PAIRS)[None, :], 0), 1)
    return pair, slot < count
