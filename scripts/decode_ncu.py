"""A decode workload for Nsight Compute: our layer, eagerly, three calls at T=1 and three at T=8.

DeepSeek-V3 widths (H 7168, I 2048, top-8), balanced routing, E local experts (default 256),
``fp8_block`` or ``nvfp4``. Eager launches, so that ncu sees each kernel (it serializes them,
which also removes the programmatic dependent launch overlap). The H200 run of 2026-12-02:

    ncu --target-processes all -k regex:"gemm|swapab" --launch-count 40 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        --section LaunchStats --section Occupancy --section SchedulerStats --csv --page details \\
        python scripts/decode_ncu.py --E 256 --precision nvfp4 > ncu_nvfp4.csv

``--variant swapab_pairs_grid_wait`` (any ``moe-backend bench --variants`` name) profiles that configuration
instead, e.g. to compare a decode variant against the default.
"""

from __future__ import annotations

import argparse
import sys

import torch

from moe_backend.cli.bench import VARIANTS, Layer, balanced_ids

H, I, TOP_K = 7168, 2048, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--E", type=int, default=256)
    parser.add_argument("--precision", choices=("fp8_block", "nvfp4"), default="nvfp4")
    parser.add_argument("--T", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--variant",
        choices=sorted(VARIANTS),
        help="a bench variant of our kernel instead of the default (its own precision), e.g. swapab_pairs_grid_wait",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_ncu: needs a CUDA GPU")
    dev = torch.device("cuda")
    layer = Layer(args.E, H, I, TOP_K, dev)
    run = layer.variant(args.variant) if args.variant else layer.ours(args.precision)
    for t in args.T:
        gen = torch.Generator().manual_seed(t)
        hidden = torch.randn(t, H, device=dev).to(torch.bfloat16)
        ids = balanced_ids(t, TOP_K, args.E, gen, dev)
        weights = torch.rand(t, TOP_K, generator=gen).to(dev)
        out = torch.empty(t, H, dtype=torch.bfloat16, device=dev)
        for _ in range(3):
            run(hidden, ids, weights, out)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
