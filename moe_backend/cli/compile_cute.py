"""``moe-backend compile-cute``: build every CuTe DSL kernel configuration, on a GPU or offline.

Kernels: the bf16 grouped GEMMs of every tuning candidate, and the FP8 block-scale grouped GEMM
(``kernels/sm90/fp8_grouped.py``) of every configuration, with bf16 and (GEMM1) fp32 output. Offline (no CUDA device, or
``--offline``) it compiles for ``sm_90a`` on the CPU against fake tensors (see docs/cute_dsl.md):
CI runs it so a configuration that does not build fails there. On a GPU it fills the in-process
and on-disk caches ahead of a run.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

#: DeepSeek-V3's expert shapes (H, I): full I, and the TP8 shard.
DEFAULT_SHAPES = ((7168, 2048), (7168, 256))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape",
        action="append",
        default=None,
        metavar="H,I",
        help="expert hidden and intermediate size (repeatable; default: 7168,2048 and 7168,256)",
    )
    parser.add_argument("--offline", action="store_true", help="compile for sm_90a on the CPU even if a GPU is present")


def _shapes(values) -> list:
    if not values:
        return list(DEFAULT_SHAPES)
    shapes = []
    for v in values:
        parts = v.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shape: expected two positive integers H,I, got {v!r}")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def main(args: argparse.Namespace) -> int:
    from ..kernels.sm90.cute_env import installed_versions, pin_offline_arch, quack_unavailable_reason

    shapes = _shapes(args.shape)
    offline = args.offline or not torch.cuda.is_available()
    if offline:
        pin_offline_arch("sm_90a")
    reason = quack_unavailable_reason()
    if reason is not None:
        print(f"compile-cute: cannot build the CuTe DSL kernels: {reason}")
        return 1
    from ..kernels.sm90 import bf16_grouped, fp8_grouped
    from ..kernels.sm90.bf16_moe import CANDIDATE_CONFIGS, config_tiles
    from ..kernels.sm90.cute_env import offline_compile

    tiles = config_tiles(CANDIDATE_CONFIGS)
    device = torch.device("meta" if offline else "cuda")
    print(f"compile-cute: {installed_versions()}, {'offline sm_90a' if offline else 'on ' + str(device)}")
    started = time.perf_counter()
    built = 0
    for h, i in shapes:
        for tile in tiles:
            t0 = time.perf_counter()
            with offline_compile() if offline else contextlib.nullcontext():
                n = bf16_grouped.compile_plans(h, i, [tile], device)
            built += n
            print(f"  H={h} I={i} tile {tile}: {n} kernel(s) in {time.perf_counter() - t0:.1f} s")
        # FP8 block-scale grouped GEMM (the FP8 launcher's cute_grouped path): GEMM1 [2I, H] with
        # bf16 and with fp32 output (the path's), GEMM2 [H, I] bf16
        for fp8_tile in fp8_grouped.TILES:
            gemms = [
                (nn, kk, dt)
                for nn, kk, dt in ((2 * i, h, torch.bfloat16), (2 * i, h, torch.float32), (h, i, torch.bfloat16))
                if fp8_grouped.serves(fp8_tile, kk)
            ]
            t0 = time.perf_counter()
            with offline_compile() if offline else contextlib.nullcontext():
                n = sum(fp8_grouped.compile_plans(nn, kk, [fp8_tile], device, dt) for nn, kk, dt in gemms)
            built += n
            print(f"  H={h} I={i} FP8 block tile {fp8_tile}: {n} plan(s) in {time.perf_counter() - t0:.1f} s")
        # GEMM2 on the wide (128 x 256) tiles, bf16 out, where H has whole 256-wide N tiles
        for wide_tile in (t for t in fp8_grouped.WIDE_TILES if fp8_grouped.fits_width(t, h)):
            t0 = time.perf_counter()
            with offline_compile() if offline else contextlib.nullcontext():
                n = fp8_grouped.compile_plans(h, i, [wide_tile], device, torch.bfloat16)
            built += n
            print(f"  H={h} I={i} FP8 wide GEMM2 tile {wide_tile}: {n} plan(s) in {time.perf_counter() - t0:.1f} s")
        # GEMM1 with SiLU-and-mul and the requantization in its epilogue (e4m3 out)
        for gated_tile in fp8_grouped.GATED_TILES:
            t0 = time.perf_counter()
            with offline_compile() if offline else contextlib.nullcontext():
                n = fp8_grouped.compile_plans(2 * i, h, [gated_tile], device, fp8_grouped.FP8_DTYPE)
            built += n
            print(f"  H={h} I={i} FP8 gated GEMM1 tile {gated_tile}: {n} plan(s) in {time.perf_counter() - t0:.1f} s")
    print(f"compile-cute: {built} kernel(s) built in {time.perf_counter() - started:.1f} s")
    return 0
