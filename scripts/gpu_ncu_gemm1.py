"""GEMM1 of the FP8 grouped prefill path as an Nsight Compute workload: each gated configuration
(``fp8_grouped.GATED_TILES``) and the plain fp32 GEMM1 tiles (``gpu_check_gated.PLAIN_TILES``),
launched once each inside a profiler range, so that ncu profiles
exactly these launches (set-up, compilation and quantization stay outside). DeepSeek-V3 widths
(2I = 4096, H = 7168), E experts of T * 8 / E rows each (default E=32, T=2048: 512 rows).

    ncu --profile-from-start off --set full --import-source no -o $OUT/gemm1 \\
        python -P scripts/gpu_ncu_gemm1.py [--E 32] [--T 2048]
    ncu -i $OUT/gemm1.ncu-rep --page details --csv > $OUT/gemm1_details.csv
    ncu -i $OUT/gemm1.ncu-rep --page source --print-source sass --csv > $OUT/gemm1_sass.csv

The launch order is printed (ncu numbers the profiled launches in that order).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check_gated as cases  # noqa: E402

from moe_backend.kernels.sm90.fp8_grouped import (  # noqa: E402
    GATED_TILES,
    compile_plans,
    gated_gemm1_fp8_block,
    grouped_gemm_fp8_block,
)
from moe_backend.quant.fp8 import BLOCK, FP8_DTYPE  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--E", type=int, default=32)
    p.add_argument("--T", type=int, default=2048)
    args = p.parse_args()
    dev = torch.device("cuda")
    a, a_scale, w13, w13_scale, cu = cases.operands(args.E, args.T, dev)
    m = a.shape[0]
    gate_up = torch.empty(m, 2 * cases.INTER, device=dev)
    y = torch.empty(m, cases.INTER, dtype=FP8_DTYPE, device=dev)
    ys = torch.empty(m, cases.INTER // BLOCK, device=dev)
    compile_plans(2 * cases.INTER, cases.H, cases.PLAIN_TILES, dev, torch.float32)
    compile_plans(2 * cases.INTER, cases.H, GATED_TILES, dev, FP8_DTYPE)
    # one launch each before the range: first launches load modules and collect garbage
    launches = [
        (f"plain {t}", lambda t=t: grouped_gemm_fp8_block(a, a_scale, w13, w13_scale, cu, gate_up, tile=t))
        for t in cases.PLAIN_TILES
    ]
    launches += [
        (f"gated {t}", lambda t=t: gated_gemm1_fp8_block(a, a_scale, w13, w13_scale, cu, y, ys, tile=t))
        for t in GATED_TILES
    ]
    for _, fn in launches:
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for i, (name, fn) in enumerate(launches):
        fn()
        print(f"launch {i}: {name}", flush=True)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
