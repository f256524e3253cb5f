"""The memory-bound passes around the grouped prefill GEMMs on the H200, against earlier versions
of their modules in the same run: the FP8 quantize-and-scatter (``act_quant.act_quant_scatter_fp8``)
and the router-weighted pair combine (``pair_combine.weighted_sum_pairs``), at DeepSeek-V3 width
(H 7168, top-8), T tokens routed to random distinct rows (each pair its own row, as after the
expert sort). Each output is compared bitwise with the product's. CUDA-graph replays, do_bench
median, L2 flushed (``decode_breakdown.timed``), ``--rounds`` rounds alternated. Prints a table;
writes ``$OUT/gpu_probe_passes.json`` (or ``--out``).

    python -P scripts/gpu_probe_passes.py [--T 1024 8192] [--rounds 2] [--out DIR]
        [--baseline-dir DIR]

``--baseline-dir DIR``: earlier ``act_quant.py`` and ``pair_combine.py`` (e.g. from ``git show
REV:moe_backend/kernels/sm90/act_quant.py``) timed beside the product's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_gated import time_rounds  # noqa: E402
from gpu_probe_dequant import module_from_source  # noqa: E402

from moe_backend.kernels.sm90 import act_quant, pair_combine  # noqa: E402
from moe_backend.quant.fp8 import BLOCK, FP8_DTYPE  # noqa: E402

H, TOP_K = 7168, 8


def time_point(t: int, rounds: int, baseline: Dict[str, object], dev: torch.device) -> List[Dict]:
    """Each pass at T tokens, the product's and the baseline's: one row each per round."""
    gen = torch.Generator(device=dev).manual_seed(t)
    p = t * TOP_K
    hidden = torch.randn(t, H, device=dev, generator=gen).to(torch.bfloat16)
    row_of_pair = torch.randperm(p, device=dev, generator=gen).to(torch.int32)
    weights = torch.rand(t, TOP_K, device=dev, generator=gen)
    q = torch.empty(p, H, dtype=FP8_DTYPE, device=dev)
    s = torch.empty(p, H // BLOCK, device=dev)
    rows = torch.randn(p, H, device=dev, generator=gen).to(torch.bfloat16)
    out = torch.empty(t, H, dtype=torch.bfloat16, device=dev)
    impls = {"product": (act_quant, pair_combine), **{name: mods for name, mods in baseline.items()}}
    variants: Dict[str, Callable[[], object]] = {}
    exact: Dict[str, bool] = {}
    ref = None
    for name, (aq, pc) in impls.items():
        scatter = lambda aq=aq: aq.act_quant_scatter_fp8(hidden, row_of_pair, q, s)  # noqa: E731
        combine = lambda pc=pc: pc.weighted_sum_pairs(rows, row_of_pair, weights, out)  # noqa: E731
        scatter(), combine()
        got = (q.view(torch.uint8).clone(), s.clone(), out.clone())
        ref = ref or got
        exact[name] = all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
        variants[f"{name}: quantize-and-scatter"] = scatter
        variants[f"{name}: pair combine"] = combine
    rows_out = time_rounds(variants, rounds, T=t)
    for r in rows_out:
        r["bitwise_equal_to_product"] = exact[r["variant"].split(":")[0]]
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--baseline-dir", help="earlier act_quant.py and pair_combine.py")
    args = ap.parse_args()
    dev = torch.device("cuda")
    baseline = {}
    if args.baseline_dir:
        d = Path(args.baseline_dir)
        baseline["baseline"] = tuple(
            module_from_source(f"baseline {n}", (d / f"{n}.py").read_text()) for n in ("act_quant", "pair_combine")
        )
    results: List[Dict] = []
    for t in args.T:
        results += time_point(t, args.rounds, baseline, dev)
    out = Path(args.out) / "gpu_probe_passes.json"
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), H=H, top_k=TOP_K, results=results), indent=1))
    print(f"\n{'T':>5} {'variant':<36} us (rounds)")
    for t in args.T:
        for name in dict.fromkeys(r["variant"] for r in results if r["T"] == t):
            sel = [r for r in results if r["T"] == t and r["variant"] == name]
            eq = "" if sel[0]["bitwise_equal_to_product"] else "  DIFFERS"
            print(f"{t:>5} {name:<36} " + " / ".join(f"{r['us']:.1f}" for r in sel) + eq)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
