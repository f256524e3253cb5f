"""Where does the NVFP4 decode GEMM1's time go? Its main loop with stages dropped, one GPU call.

At T=1 (E=256, top-8: 8 active experts, one token each) GEMM1 streams 8 experts' ``w13`` words
and scale codes (132 MB in the kernel layout) at about 64% of the read-stream ceiling (H100), and
no change to its loads (shared-memory stages or registers, bytes in flight, L2 prefetches) or to
its instruction count has moved it (docs/performance.md, sessions 7-25). This probe times, on the
same weights in one run:

* ``stream``: the bench's read-only ceiling kernel over the same words and codes;
* ``loads``: GEMM1's grid (8 experts x 2Ip/64 programs of 64 rows: 32 gate rows and 32 up rows,
  4 warps, 3 stages) loading every group's words, scale codes and activation tile as GEMM1 does,
  consuming them with XORs only;
* ``loads_mma``: the same plus the 16 warpgroup MMAs a group on a constant weight tile (what the
  tensor cores and the activations' shared-memory path cost, no dequantization);
* ``full``: the loads, the dequantization (``nvfp4_tile.load_group``) and the MMAs, as GEMM1's main
  loop (``WGMMA1="sync"``), without its alignment rows and epilogue;
* ``loads_w``: the weights' loads alone (no activation tile: what its cp.async traffic costs);
  ``loads_split2`` / ``full_split2``: each tile's groups over two programs (1024 programs, twice
  the streams of half the length: whether the grid's shape sets the loads' pace);
  ``loads_l2`` / ``full_l2``: the weights' loads cycling over each tile's first 4 groups, which
  stay in L2: the loop's on-chip time (issue, shared memory, MMAs), the same on an H100 and an
  H200 (same SMs and clocks), so the floor a faster DRAM cannot lower; ``stream_l2``: the read
  stream kernel over as many bytes from an L2-resident set of the same size (each of ``ACTIVE``
  regions of 1/7 of an expert's words read 7 times): whether that floor is L2's rate or the loop's;
  ``loads_tma`` / ``full_tma`` (and ``_l2``): the same loops with each group's words and codes
  brought by the TMA (two bulk copies a group, completion on an mbarrier) instead of per-thread
  ``cp.async``; ``loads_ws`` / ``full_ws`` (and ``_l2``): the same with a producer warp issuing the
  TMA copies into a ring of buffers the compute warpgroup releases by mbarrier (Gluon's warp
  specialization, ``gluon_nvfp4_ws.py``), checked against ``full`` first (``ws_check``);
  ``loads_ws_x1`` / ``full_ws_x1`` (and ``_l2``): the activation tile copied only with each
  buffer's first group (what its copies cost); ``loads_mma_l2``: the MMAs' share from L2;
  ``full_ws_n8`` (``_x1``, ``_l2``): the warp-specialized loop at 8 activation rows (wgmma N=8);
  ``halves_ws_n8`` (``_x1``, ``_l2``): the same a 128-K half at a time, five programs an SM
  (``_r64``: four); ``full_shl`` (and ``_l2``): ``full`` with the dequantization's rotations as
  left shifts on the FMA pipe (``SHL_ASM``: wrong codes, the ALU pipe's share), and
  ``full_ws_n8_x1_shl`` (and ``_l2``) the same in the warp-specialized loop, whose compute is its
  floor;
  ``full_ws_b4`` (and ``_l2``): four buffers at three programs an SM; ``full_w2`` / ``full_ws_w2``
  (and ``_l2``, two groups a tile resident): the ``cp.async`` and warp-specialized loops over
  GEMM2's tiles (64 consecutive rows of ``w2``, against ``stream_w2`` / ``gemm2``);
* ``gemm1``: the product's GEMM1 (``nvfp4_gemm1.gemm1_nvfp4``, decode default) at T=1 for
  calibration (``gpu_probe_nvfp4_blocks.decode_calls``, alignment done outside);
* ``stream_w2`` / ``gemm2``: the same for GEMM2's ``w2`` words and codes (66 MB) and the product's
  GEMM2; ``stream_layer`` / ``layer``: one read launch over both experts' words and codes against
  the product's decode layer (alignment, both GEMMs, the cast).

Diagnosis only: the stage variants' outputs mean nothing. CUDA-graph replays, ``do_bench``
median, L2 flushed (``decode_breakdown.timed``), ``--rounds`` rounds. Prints a table; writes
``$OUT/gpu_probe_nvfp4_stages.json``.

    python -P scripts/gpu_probe_nvfp4_stages.py [--rounds 2] [--only stream stream_l2 loads_l2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_breakdown import timed  # noqa: E402
from gluon_nvfp4_ws import tile_boxes, ws_stage_call  # noqa: E402
from gpu_probe_nvfp4_blocks import decode_calls  # noqa: E402

from moe_backend.cli.bench import balanced_ids, random_nvfp4_weights  # noqa: E402
from moe_backend.cli.bench_ceilings import expert_stream  # noqa: E402
from moe_backend.kernels.interpret import INTERPRETING  # noqa: E402
from moe_backend.kernels.sm90.nvfp4_layout import NVFP4KernelWeights, nvfp4_to_kernel_layout, weight_geometry  # noqa: E402
from moe_backend.kernels.sm90.nvfp4_moe import DECODE_CONFIG  # noqa: E402
from moe_backend.kernels.sm90.nvfp4_tile import DEQUANT_ASM, dequant_group, mma, row_offsets  # noqa: E402

H, INTER, TOP_K, ACTIVE = 7168, 2048, 8, 8
STAGES = ("loads", "loads_mma", "full")  # timed at every --num-stages
#: The decode's PTX with each slot's left rotation (``shf.l.wrap``, the ALU pipe) a plain left shift
#: (``shl``, which ptxas issues as ``IMAD.SHL`` on the FMA pipe, as it does slot 3's shift): the
#: same instruction count, wrong codes. Times whether the ALU pipe (50% busy, ncu) binds the loop.
#: ``maxnreg`` of the warp-specialized loop at each ``STAGE``: four programs an SM with 104 registers
#: for the compute (whole groups), five with 72 (halves).
WS_MAXNREG = {"loads": 64, "full": 64, "halves": 48}
#: Row suffixes: the weights from DRAM or cycling over 4 groups a tile (L2-resident); the
#: warp-specialized loop's activation tile copied every group or once a buffer.
RESIDENCY = ((0, ""), (4, "_l2"))
X_COPIES = ((False, ""), (True, "_x1"))
SHL_ASM = re.sub(r"shf\.l\.wrap\.b32 t, \$8, \$8, (\d+);", r"shl.b32 t, $8, \1;", DEQUANT_ASM.value)


@triton.jit
def _stage_kernel(
    w_ptr,
    s_ptr,
    wd,
    sd,
    x_ptr,
    out_ptr,
    IP,
    num_groups,
    stride_we,
    stride_wb,
    stride_wr,
    stride_wg,
    stride_se,
    stride_sb,
    stride_sr,
    stride_sg,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    STAGE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    SPLIT: tl.constexpr,
    RESIDENT: tl.constexpr,
    GATE_UP: tl.constexpr,
    TMA: tl.constexpr,
    DEQUANT_ASM: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """GEMM1's decode main loop over expert ``tile // (IP / BLOCK_N)``'s gate and up rows of
    column block ``tile % (IP / BLOCK_N)`` (``GATE_UP``; else, GEMM2's, rows ``2 BLOCK_N`` from
    ``2 BLOCK_N (tile % (IP / BLOCK_N))`` of a matrix of ``2 IP`` rows),
    ``tile = program_id // SPLIT``, over part
    ``program_id % SPLIT`` of the groups, with the stages ``STAGE`` names (module doc); with
    ``RESIDENT`` > 0 the weights' loads cycle over the tile's first ``RESIDENT`` groups (L2 hits:
    the loop without DRAM). With ``TMA`` (GEMM1's tiles, one program a tile) the weights come by
    TMA copies: ``wd`` / ``sd`` describe ``gluon_nvfp4_ws.tile_boxes``' views of the words and
    codes, whose ``[2, 1, 1, 32, *]`` box at ``[2e, n, g]`` is the tile's gate and up rows. One
    float a program to ``out`` keeps every stage's results alive."""
    tile = tl.program_id(0) // SPLIT
    part = tl.program_id(0) % SPLIT
    expert = tile // (IP // BLOCK_N)
    pid_n = tile % (IP // BLOCK_N)
    offs_r = tl.arange(0, 2 * BLOCK_N)
    if GATE_UP:
        w_rows = pid_n * BLOCK_N + tl.where(offs_r < BLOCK_N, offs_r, IP + offs_r - BLOCK_N)
    else:
        w_rows = pid_n * 2 * BLOCK_N + offs_r
    offs_w = tl.arange(0, 16)
    w_ptrs = w_ptr + expert * stride_we + row_offsets(w_rows, stride_wb, stride_wr)[:, None] + offs_w[None, :]
    s_ptrs = s_ptr + expert * stride_se + row_offsets(w_rows, stride_sb, stride_sr)[:, None] + offs_w[None, :]
    offs_m = tl.arange(0, BLOCK_M)
    # one token (T=1): the tile's other rows are masked, as GEMM1's padding rows of an expert
    x_ptrs = x_ptr + offs_m[:, None] * (num_groups * 256) + tl.arange(0, 256)[None, :]
    x_ok = (offs_m < 1)[:, None]
    acc = tl.zeros([2 * BLOCK_N, BLOCK_M], dtype=tl.float32)
    keep = tl.zeros([2 * BLOCK_N, 16], dtype=tl.int32)
    keep_x = tl.zeros([BLOCK_M, 256], dtype=tl.int16)
    ones = tl.full([2 * BLOCK_N, 256], 1.0, tl.float32).to(tl.bfloat16)
    g_start = part * num_groups // SPLIT
    g_end = (part + 1) * num_groups // SPLIT
    tl.assume(g_end > g_start)
    for g in tl.range(g_start, g_end, num_stages=NUM_STAGES):
        if STAGE != "loads_w":
            x = tl.load(x_ptrs + g * 256, mask=x_ok, other=0.0)
        gw = g % RESIDENT if RESIDENT > 0 else g
        if TMA:
            words = wd.load([2 * expert, pid_n, gw, 0, 0]).reshape(2 * BLOCK_N, 2, 16)
            words0, words1 = tl.split(tl.permute(words, (0, 2, 1)))
            codes = sd.load([2 * expert, pid_n, gw, 0, 0]).reshape(2 * BLOCK_N, 16)
        else:
            words0 = tl.load(w_ptrs + gw * stride_wg)
            words1 = tl.load(w_ptrs + gw * stride_wg + 16)
            codes = tl.load(s_ptrs + gw * stride_sg)
        if STAGE == "full":
            acc = mma(dequant_group(words0, words1, codes, INTERPRET, DEQUANT_ASM), x, acc, "sync", INTERPRET)
        else:
            keep ^= words0 ^ words1 ^ codes.to(tl.int32)
            if STAGE == "loads_mma":
                acc = mma(ones, x, acc, "sync", INTERPRET)
            elif STAGE == "loads":
                keep_x ^= x.to(tl.int16, bitcast=True)
    total = tl.sum(tl.sum(acc, 1), 0) + tl.xor_sum(tl.xor_sum(keep, 1), 0).to(tl.float32)
    total += tl.xor_sum(tl.xor_sum(keep_x, 1), 0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), total)


def stage_call(
    w: NVFP4KernelWeights,
    x: torch.Tensor,
    stage: str,
    num_stages: int,
    split: int = 1,
    resident: int = 0,
    out: Optional[torch.Tensor] = None,
    matrix: str = "w13",
    tma: bool = False,
    asm: str = DEQUANT_ASM.value,
) -> Callable[[], None]:
    """A launch of :func:`_stage_kernel` over the first ``ACTIVE`` experts of ``w``'s ``matrix``
    (``"w13"``: GEMM1's tiles; ``"w2"``: GEMM2's, ``x`` then ``[16, Ip]``), its loop
    software-pipelined over ``num_stages`` stages, each tile's groups over ``split`` programs, the
    weights' loads cycling over ``resident`` groups a tile (0: all of them, in order), by TMA
    copies with ``tma`` (``"w13"``, ``split=1`` only), dequantizing with the PTX ``asm``; a float a
    program into ``out`` (fp32, allocated when None)."""
    words, scales = (w.w13, w.w13_scale) if matrix == "w13" else (w.w2, w.w2_scale)
    geo = weight_geometry(words, scales)
    ip = geo.rows // 2
    block_n = DECODE_CONFIG["BLOCK_N1"]
    wd = sd = None
    if tma:
        if matrix != "w13" or split != 1 or block_n != 32:
            raise ValueError(
                f"tma: serves matrix='w13', split=1 and BLOCK_N1=32 (a tile of two row blocks), "
                f"got {matrix!r}, {split}, {block_n}"
            )
        boxes = tile_boxes(w, ACTIVE, "w13")
        wd, sd = (TensorDescriptor(t, list(t.shape), list(t.stride()), [2, 1, 1, 32, t.shape[-1]]) for t in boxes)
    grid = (ACTIVE * (ip // block_n) * split,)
    if out is None:
        out = torch.empty(grid[0], dtype=torch.float32, device=x.device)
    return lambda: _stage_kernel[grid](
        words, scales, wd, sd, x, out, ip, geo.groups, *geo.words, *geo.scales,
        BLOCK_N=block_n, BLOCK_M=DECODE_CONFIG["BLOCK_M"], STAGE=stage, NUM_STAGES=num_stages, SPLIT=split,
        RESIDENT=resident, GATE_UP=matrix == "w13", TMA=tma, DEQUANT_ASM=asm, INTERPRET=INTERPRETING,
        num_warps=DECODE_CONFIG["num_warps1"], num_stages=num_stages,
    )  # fmt: skip


def l2_stream(w: NVFP4KernelWeights, repeats: int) -> Callable[[], None]:
    """The read stream kernel over ``ACTIVE`` regions of ``w13``'s words, each ``1 / repeats`` of an
    expert's words and read ``repeats`` times: GEMM1's words in bytes, ``1 / repeats`` of them in
    footprint (stays in L2 after the first pass)."""
    words = w.w13.view(torch.int32).view(-1)
    region = words.numel() // w.w13.shape[0] // repeats
    regions = words[: ACTIVE * region].view(ACTIVE, region)
    experts = torch.arange(ACTIVE, dtype=torch.int32, device=words.device).repeat(repeats)
    # expert_stream's second operand: 4 words a region, so its programs past the first exit
    return expert_stream(regions, words[: ACTIVE * 4].view(ACTIVE, 4), experts)


def ws_check(
    w: NVFP4KernelWeights, x: torch.Tensor, matrix: str, x_rows: int = 16, stage: str = "full", maxnreg: int = 64
) -> float:
    """The warp-specialized ``stage`` loop's (``"full"`` or ``"halves"``) per-program sums against
    :func:`_stage_kernel`'s ``full`` over the same tiles of ``matrix`` and token (``x[0]``), its
    MMAs ``x_rows`` wide: the largest difference relative to the largest sum (the two run the same
    MMAs in the same order, the columns past the token zero, so 0 unless the Gluon kernel reads
    other data)."""
    blocks = (w.w13 if matrix == "w13" else w.w2).shape[1]
    ref = torch.zeros(ACTIVE * (blocks // 2), dtype=torch.float32, device=x.device)
    got = torch.full_like(ref, float("nan"))
    stage_call(w, x, "full", DECODE_CONFIG["num_stages1"], out=ref, matrix=matrix)()
    ws_stage_call(w, x, ACTIVE, stage, maxnreg=maxnreg, out=got, matrix=matrix, x_rows=x_rows)()
    torch.cuda.synchronize()
    return float((got - ref).abs().max() / ref.abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sets", type=int, default=4)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument(
        "--num-stages", type=int, nargs="+", default=[DECODE_CONFIG["num_stages1"]],
        help="pipeline depths of the stage kernels and GEMM1 (names get _st<n> past the default's)",
    )  # fmt: skip
    p.add_argument("--only", nargs="+", metavar="ROW", help="time only these rows (default: all)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_probe_nvfp4_stages: needs a CUDA GPU")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    w = nvfp4_to_kernel_layout(random_nvfp4_weights(ACTIVE, H, INTER, dev))
    gen = torch.Generator().manual_seed(1)
    sets = [
        (torch.randn(1, H, device=dev).to(torch.bfloat16), balanced_ids(1, TOP_K, ACTIVE, gen, dev),
         torch.rand(1, TOP_K, device=dev) + 0.1)
        for _ in range(args.sets)
    ]  # fmt: skip
    xs = [torch.randn(16, w.padded_hidden, device=dev).to(torch.bfloat16) for _ in range(args.sets)]
    xs2 = [torch.randn(16, w.w2.shape[2] * 256, device=dev).to(torch.bfloat16) for _ in range(args.sets)]
    experts = torch.arange(ACTIVE, dtype=torch.int32, device=dev)
    mb13 = (w.w13.numel() * 4 + w.w13_scale.numel()) / 1e6
    mb2 = (w.w2.numel() * 4 + w.w2_scale.numel()) / 1e6
    # name -> (one launch a rotating input set, megabytes of weights it reads)
    calls: Dict[str, Tuple[List[Callable[[], None]], float]] = {
        "stream": ([expert_stream(w.w13, w.w13_scale, experts)], mb13),
    }
    weights = (w.w13, w.w13_scale, w.w2, w.w2_scale)
    ns = DECODE_CONFIG["num_stages1"]
    # (layer, GEMM1, GEMM2) launches a rotating input set at each GEMM1 depth, the default's included
    layers = {
        n: [decode_calls(w, weights, s, dict(DECODE_CONFIG, num_stages1=n)) for s in sets]
        for n in {ns, *args.num_stages}
    }
    for n in args.num_stages:
        tag = "" if n == ns else f"_st{n}"
        calls.update({stage + tag: ([stage_call(w, x, stage, n) for x in xs], mb13) for stage in STAGES})
        calls["gemm1" + tag] = ([c[1] for c in layers[n]], mb13)
    calls["loads_w"] = ([stage_call(w, x, "loads_w", ns) for x in xs], mb13)
    for stage in ("loads", "full"):
        calls[stage + "_split2"] = ([stage_call(w, x, stage, ns, split=2) for x in xs], mb13)
        # 4 groups a tile: 512 x 36 KB of words and codes stay in L2, so this is the loop's on-chip
        # time (issue, shared memory, MMAs), which the card's DRAM rate does not change
        calls[stage + "_l2"] = ([stage_call(w, x, stage, ns, resident=4) for x in xs], mb13)
    for stage in ("loads", "full"):
        calls[stage + "_tma"] = ([stage_call(w, x, stage, ns, tma=True) for x in xs], mb13)
        calls[stage + "_tma_l2"] = ([stage_call(w, x, stage, ns, resident=4, tma=True) for x in xs], mb13)
        for resident, tag in RESIDENCY:
            for x_once, tag_x in X_COPIES:
                calls[f"{stage}_ws{tag_x}{tag}"] = (
                    [ws_stage_call(w, x, ACTIVE, stage, resident=resident, x_once=x_once) for x in xs],
                    mb13,
                )
    # the MMAs' share: on constant weights from L2; the warp-specialized loop at 8 activation rows
    # (wgmma N=8: half the tensor-core work and activation tile of N=16), whole groups at four
    # programs an SM, or a group as two 128-K halves (half the weights' registers live: 72 for the
    # compute at maxnreg=48, five programs an SM with 40 KB of shared memory each)
    calls["loads_mma_l2"] = ([stage_call(w, x, "loads_mma", ns, resident=4) for x in xs], mb13)
    for resident, tag in RESIDENCY:
        calls["full_shl" + tag] = ([stage_call(w, x, "full", ns, resident=resident, asm=SHL_ASM) for x in xs], mb13)
        calls["full_ws_n8_x1_shl" + tag] = (
            [ws_stage_call(w, x, ACTIVE, "full", resident=resident, x_once=True, x_rows=8, asm=SHL_ASM) for x in xs],
            mb13,
        )
    for stage in ("full", "halves"):
        for resident, tag in RESIDENCY:
            for x_once, tag_x in X_COPIES:
                calls[f"{stage}_ws_n8{tag_x}{tag}"] = (
                    [
                        ws_stage_call(
                            w, x, ACTIVE, stage, resident=resident, maxnreg=WS_MAXNREG[stage], x_once=x_once, x_rows=8
                        )
                        for x in xs
                    ],
                    mb13,
                )
    calls["halves_ws_n8_x1_l2_r64"] = (
        [ws_stage_call(w, x, ACTIVE, "halves", resident=4, x_once=True, x_rows=8) for x in xs],
        mb13,
    )
    # GEMM2's tiles (64 consecutive rows of w2, 8 groups at Ip = 2048): the same loops
    for resident, tag in ((0, ""), (2, "_l2")):
        calls["full_w2" + tag] = ([stage_call(w, x, "full", ns, resident=resident, matrix="w2") for x in xs2], mb2)
        calls["full_ws_w2" + tag] = (
            [ws_stage_call(w, x, ACTIVE, "full", resident=resident, matrix="w2") for x in xs2],
            mb2,
        )
    # four buffers at three programs an SM (70 KB each, 136 registers for the compute)
    for resident, tag in RESIDENCY:
        calls["full_ws_b4" + tag] = (
            [ws_stage_call(w, x, ACTIVE, "full", num_buf=4, resident=resident, maxnreg=80) for x in xs],
            mb13,
        )
    calls["stream_l2"] = ([l2_stream(w, repeats=7)], w.w13.numel() * 4 / 1e6)
    default = layers[ns]
    calls["stream_w2"] = ([expert_stream(w.w2, w.w2_scale, experts)], mb2)
    calls["gemm2"] = ([c[2] for c in default], mb2)
    # the words of both matrices in one launch (the scale codes, 1/16 of the bytes, left out)
    calls["stream_layer"] = ([expert_stream(w.w13, w.w2, experts)], (w.w13.numel() + w.w2.numel()) * 4 / 1e6)
    calls["layer"] = ([c[0] for c in default], mb13 + mb2)
    if args.only:
        unknown = sorted(set(args.only) - set(calls))
        if unknown:
            sys.exit(f"gpu_probe_nvfp4_stages: --only: unknown rows {unknown}; rows: {sorted(calls)}")
        calls = {name: calls[name] for name in args.only}
    if any("_ws" in name for name in calls):
        checks = (
            ("w13", xs[0], 16, "full"), ("w2", xs2[0], 16, "full"), ("w13", xs[0], 8, "full"),
            ("w13", xs[0], 8, "halves"),
        )  # fmt: skip
        for matrix, x, x_rows, stage in checks:
            diff = ws_check(w, x, matrix, x_rows, stage, maxnreg=WS_MAXNREG[stage])
            row = dict(what="ws_check", matrix=matrix, x_rows=x_rows, stage=stage, max_rel_diff=diff)
            print(json.dumps(row), flush=True)
    results = []
    for r in range(args.rounds):
        for name, (c, megabytes) in calls.items():
            row = dict(what=name, round=r, us=timed(c), megabytes=megabytes)
            results.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out) / "gpu_probe_nvfp4_stages.json"
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), results=results), indent=1))
    print(f"\n{'what':<14} {'us':>8} {'MB':>7} {'TB/s':>6}")
    for name, (_, megabytes) in calls.items():
        us = sum(r["us"] for r in results if r["what"] == name) / args.rounds
        print(f"{name:<14} {us:>8.1f} {megabytes:>7.1f} {megabytes / us:>6.2f}")


if __name__ == "__main__":
    main()
