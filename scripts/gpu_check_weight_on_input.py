"""How far the FP8 block-scale launcher is from the reference with the router weight on the input,
and what moves it (one GPU call).

Relative errors ``||out - ref|| / ||ref||`` against ``reference_fused_experts`` (the same
quantization), E=32, I=512, top-1, block scales, for:

1. H in {1024, 7168}, T in {16, 512}: each launcher path (default, swapab, decode, prefill,
   prefill quantizing on load), with the router weight on the input and on the output; and the
   router weight folded into a bf16 input (how much a 2^-9 change of the input moves the result);
2. H=7168, T=16: every router weight set to 1, 0.5, 0.7 (also bf16-rounded) and random weights,
   default and decode paths, each run twice (a moving error would be a race).

Prints one JSON line per row and writes ``weight_on_input.json`` under ``--out``.

    python scripts/gpu_check_weight_on_input.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "support"), str(ROOT / "tests" / "kernels"), str(ROOT / "tests")]

from moe_checks import Problem, run_fp8_kernel  # noqa: E402
from test_sm90_fp8 import make_problem  # noqa: E402

from moe_backend.kernels.reference import reference_fused_experts  # noqa: E402

PATHS = {
    "default": None,
    "swapab": dict(path="swapab"),
    "decode": dict(path="decode"),
    "prefill": dict(path="prefill"),
    "prefill_quant_on_load": dict(path="prefill", QUANT_ON_LOAD1=True),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def reference(p: Problem, weight_on_input: bool) -> torch.Tensor:
    return reference_fused_experts(
        p.hidden, p.weights, p.ids, p.topk_w, local_expert_offset=p.offset, apply_router_weight_on_input=weight_on_input
    )


def by_path(h: int, t: int) -> dict:
    p = make_problem(t, h, 512, 32, 1, block=True, invalid=False)
    row: dict = dict(H=h, T=t)
    for woi in (True, False):
        ref = reference(p, woi)
        for name, cfg in PATHS.items():
            row[f"{'woi' if woi else 'out'}_{name}"] = rel(run_fp8_kernel(p, weight_on_input=woi, config=cfg), ref)
    folded = Problem((p.hidden.float() * p.topk_w).to(torch.bfloat16), p.weights, p.ids, torch.ones_like(p.topk_w), 0)
    row["bf16_folded_reference_vs_reference"] = rel(reference(folded, True), reference(p, True))
    return row


def by_weight() -> list:
    p = make_problem(16, 7168, 512, 32, 1, block=True, invalid=False)
    weights = {
        "1": torch.ones_like(p.topk_w),
        "0.5": torch.full_like(p.topk_w, 0.5),
        "0.7": torch.full_like(p.topk_w, 0.7),
        "0.7_bf16": torch.full_like(p.topk_w, 0.7).bfloat16().float(),
        "random": p.topk_w,
    }
    rows = []
    for name, w in weights.items():
        q = Problem(p.hidden, p.weights, p.ids, w.contiguous(), 0)
        ref = reference(q, True)
        row: dict = dict(w=name)
        for path in ("default", "decode"):
            got = run_fp8_kernel(q, weight_on_input=True, config=PATHS[path])
            row[path] = rel(got, ref)
            row[f"{path}_rerun_equal"] = bool(
                torch.equal(got, run_fp8_kernel(q, weight_on_input=True, config=PATHS[path]))
            )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check_weight_on_input: needs a CUDA GPU")
    result: dict = dict(device=torch.cuda.get_device_name(), by_path=[], by_weight=[])
    for h in (1024, 7168):
        for t in (16, 512):
            result["by_path"].append(by_path(h, t))
            print(json.dumps(result["by_path"][-1]), flush=True)
    result["by_weight"] = by_weight()
    for row in result["by_weight"]:
        print(json.dumps(row), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "weight_on_input.json", "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
