"""The NVFP4 decode GEMM1 loop's stage variants (``gpu_probe_nvfp4_stages.py``) as an Nsight
Compute workload: each named variant launched once inside a profiler range, so that ncu profiles
exactly these launches (weights, compilation and a warm-up launch stay outside).

    ncu --profile-from-start off --set full --import-source no -o $OUT/stages \\
        python -P scripts/gpu_ncu_nvfp4_stages.py [--only loads_tma_l2 loads_ws_l2]
    ncu -i $OUT/stages.ncu-rep --page details --csv > $OUT/stages_details.csv

The launch order is printed (ncu numbers the profiled launches in that order).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gluon_nvfp4_ws import ws_stage_call  # noqa: E402
from gpu_probe_nvfp4_stages import ACTIVE, INTER, H, stage_call  # noqa: E402

from moe_backend.cli.bench import random_nvfp4_weights  # noqa: E402
from moe_backend.kernels.sm90.nvfp4_layout import nvfp4_to_kernel_layout  # noqa: E402
from moe_backend.kernels.sm90.nvfp4_moe import DECODE_CONFIG  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", metavar="ROW", help="profile only these variants (default: all)")
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    w = nvfp4_to_kernel_layout(random_nvfp4_weights(ACTIVE, H, INTER, dev))
    x = torch.randn(16, w.padded_hidden, device=dev).to(torch.bfloat16)
    ns = DECODE_CONFIG["num_stages1"]
    launches: Dict[str, Callable[[], None]] = {}
    for stage in ("loads", "full"):
        launches[stage + "_l2"] = stage_call(w, x, stage, ns, resident=4)
        launches[stage + "_tma_l2"] = stage_call(w, x, stage, ns, resident=4, tma=True)
        launches[stage + "_ws_l2"] = ws_stage_call(w, x, ACTIVE, stage, resident=4)
        launches[stage + "_ws_x1_l2"] = ws_stage_call(w, x, ACTIVE, stage, resident=4, x_once=True)
        launches[stage + "_ws"] = ws_stage_call(w, x, ACTIVE, stage)
    if args.only:
        unknown = sorted(set(args.only) - set(launches))
        if unknown:
            sys.exit(f"gpu_ncu_nvfp4_stages: --only: unknown variants {unknown}; variants: {sorted(launches)}")
        launches = {name: launches[name] for name in args.only}
    for fn in launches.values():
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for i, (name, fn) in enumerate(launches.items()):
        print(f"launch {i}: {name}", flush=True)
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
