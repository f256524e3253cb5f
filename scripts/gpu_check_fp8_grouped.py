"""One H200 run that checks and times the FP8 block-scale grouped GEMM (CuTe DSL, not in the layer yet).

1. Numerics: runs ``tests/kernels/test_sm90_fp8_grouped_gpu.py`` (float64 reference from the
   dequantized operands, rel. err <= 1e-2; segments of 0, 1, odd and large sizes; DeepSeek-V3
   widths; every configuration; graph replay bitwise equal to eager) and the CPU-side tests.
2. Timing at M_total = 65536 rows in 32 segments of 2048 (T = 8192, top-8, E = 32: one EP8 shard of
   DeepSeek-V3), GEMM1 (N 4096, K 7168) and GEMM2 (N 7168, K 2048), every configuration: CUDA-graph
   replay, ``triton.testing.do_bench`` median (L2 flushed before every call); against dense FP8
   ``torch._scaled_mm`` (per-tensor scales, cuBLAS) at the same M, N, K in the same run, and, where
   this torch supports it, ``torch._scaled_mm`` with the same 1x128 / 128x128 block scales. Each
   timed configuration's output is checked on sampled rows of every segment against the reference.

Prints a table and writes ``$OUT/gpu_check_fp8_grouped.json`` (or ``--out``).

    python scripts/gpu_check_fp8_grouped.py [--skip-tests] [--out DIR]

It needs the ``cute`` extra (nvidia-cutlass-dsl 4.8.1 with its CUDA 13 libraries, quack-kernels
0.6.5); docs/cute_dsl.md says how to bring the wheels to a machine without internet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_check_tests import run_tests  # noqa: E402 (the scripts folder is on the path now)

#: The tests run before timing (pass --skip-tests to time only).
GPU_TESTS = [
    "tests/kernels/test_sm90_fp8_grouped_gpu.py",
    "tests/kernels/test_sm90_fp8_grouped_parts.py",
]
ROWS, SEGMENTS = 65536, 32
GEMMS = {"gemm1": (4096, 7168), "gemm2": (7168, 2048)}
#: Rows checked against the float64 reference at the start and end of every segment.
SAMPLE = 16


def _median_us(fn: Callable[[], object]) -> float:
    """Median microseconds of ``fn`` captured in a CUDA graph and replayed, L2 flushed before each call."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median") * 1e3


def _tflops(n: int, k: int, us: float) -> float:
    return 2.0 * ROWS * n * k / (us * 1e-6) / 1e12


def _operands(n: int, k: int, device: torch.device):
    g = torch.Generator(device=device).manual_seed(n + k)
    fp8 = torch.float8_e4m3fn
    a = torch.randn(ROWS, k, device=device, generator=g).to(fp8)
    b = torch.randn(SEGMENTS, n, k, device=device, generator=g).to(fp8)
    a_scale = torch.rand(ROWS, k // 128, device=device, generator=g) * 0.01 + 0.005
    b_scale = torch.rand(SEGMENTS, n // 128, k // 128, device=device, generator=g) * 0.01 + 0.005
    cu = torch.arange(0, ROWS + 1, ROWS // SEGMENTS, dtype=torch.int32, device=device)
    return a, a_scale, b, b_scale, cu


def _sampled_error(out, a, a_scale, b, b_scale, cu) -> float:
    """Largest relative error (Frobenius, per sampled block) over the first and last rows of every segment."""
    from moe_backend.kernels.sm90.fp8_grouped import reference_grouped_gemm_fp8_block

    worst = 0.0
    bounds = cu.tolist()
    for s in range(SEGMENTS):
        for lo in (bounds[s], bounds[s + 1] - SAMPLE):
            rows = slice(lo, lo + SAMPLE)
            one = torch.tensor([0, SAMPLE], dtype=torch.int32, device=a.device)
            want = reference_grouped_gemm_fp8_block(a[rows], a_scale[rows], b[s : s + 1], b_scale[s : s + 1], one)
            err = float((out[rows].double() - want).norm() / want.norm())
            worst = max(worst, err)
    return worst


def _blockwise_scaled_mm(a, a_scale, b, b_scale) -> Callable[[], object]:
    """``torch._scaled_mm`` of segment 0's weights over all rows with DeepSeek-V3 block scales
    (1x128 activations, 128x128 weights): cuBLAS's block-scaled FP8 GEMM, where torch has it.
    The weight scales are tried in ``mat2``'s [K, N] orientation, then in [N, K]."""
    sa = a_scale.t().contiguous().t()  # M-major, as cuBLAS wants the 1x128 scales
    errors = []
    for sb in (b_scale[0].t(), b_scale[0]):

        def call(sb=sb):
            return torch._scaled_mm(a, b[0].t(), sa, sb, out_dtype=torch.bfloat16)

        try:
            call()
            return call
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
    raise RuntimeError(" | ".join(errors))


def time_gemm(name: str, n: int, k: int) -> List[Dict]:
    from moe_backend.kernels.sm90.fp8_grouped import TILES, compile_plans, grouped_gemm_fp8_block

    device = torch.device("cuda")
    a, a_scale, b, b_scale, cu = _operands(n, k, device)
    out = torch.empty(ROWS, n, dtype=torch.bfloat16, device=device)
    records: List[Dict] = []
    one = torch.ones((), device=device)
    dense_us = _median_us(lambda: torch._scaled_mm(a, b[0].t(), one, one, out_dtype=torch.bfloat16))
    records.append({"gemm": name, "impl": "torch._scaled_mm per-tensor (dense)", "us": dense_us})
    try:
        block_us = _median_us(_blockwise_scaled_mm(a, a_scale, b, b_scale))
        records.append({"gemm": name, "impl": "torch._scaled_mm 1x128/128x128 (dense)", "us": block_us})
    except Exception as exc:  # older torch / cuBLAS without block scaling: say so, keep going
        records.append({"gemm": name, "impl": "torch._scaled_mm 1x128/128x128 (dense)", "error": repr(exc)[:300]})
    for tile in TILES:
        rec: Dict = {"gemm": name, "impl": "cute fp8_grouped", "tile": list(tile)}
        try:
            t0 = time.perf_counter()
            compile_plans(n, k, [tile], device)
            rec["compile_s"] = round(time.perf_counter() - t0, 2)
            out.fill_(float("nan"))
            grouped_gemm_fp8_block(a, a_scale, b, b_scale, cu, out, tile=tile)
            torch.cuda.synchronize()
            rec["sampled_rel_err"] = _sampled_error(out, a, a_scale, b, b_scale, cu)
            rec["us"] = _median_us(lambda tile=tile: grouped_gemm_fp8_block(a, a_scale, b, b_scale, cu, out, tile=tile))
        except Exception as exc:  # keep the other configurations' numbers
            rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
        records.append(rec)
    for rec in records:
        if "us" in rec:
            rec["tflops"] = round(_tflops(n, k, rec["us"]), 1)
            rec["vs_dense_fp8"] = round(dense_us / rec["us"], 3)
        print(json.dumps(rec), flush=True)
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-tests", action="store_true", help="timing only")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON (default $OUT)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check_fp8_grouped: needs a CUDA GPU")
        return 2
    from moe_backend.cli.info import versions
    from moe_backend.kernels.sm90.cute_env import quack_unavailable_reason

    reason = quack_unavailable_reason()
    result: Dict = {"device": torch.cuda.get_device_name(), "versions": versions(), "cute_unavailable": reason}
    print(json.dumps(result, indent=1), flush=True)
    path = Path(args.out) / "gpu_check_fp8_grouped.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    if reason is not None:
        return 1
    if not args.skip_tests:
        result["tests"] = run_tests(path.parent / "tests_fp8_grouped.xml", GPU_TESTS)
        print(f"tests: {result['tests']}", flush=True)
        path.write_text(json.dumps(result, indent=1))
    records: List[Dict] = []
    for name, (n, k) in GEMMS.items():
        records += time_gemm(name, n, k)
        result["timings"] = records
        path.write_text(json.dumps(result, indent=1))
        torch.cuda.empty_cache()
    print(f"\n{'gemm':6} {'impl':42} {'tile':20} {'us':>9} {'TFLOP/s':>8} {'x dense':>8} {'rel err':>9}")
    for r in records:
        tile = str(tuple(r["tile"])) if "tile" in r else ""
        if "us" in r:
            err = f"{r['sampled_rel_err']:.1e}" if "sampled_rel_err" in r else ""
            speed = f"{r['us']:9.1f} {r['tflops']:8.1f} {r['vs_dense_fp8']:8.3f}"
            print(f"{r['gemm']:6} {r['impl']:42} {tile:20} {speed} {err:>9}")
        else:
            print(f"{r['gemm']:6} {r['impl']:42} {tile:20} error: {r['error'][:120]}")
    print(f"wrote {path}")
    failed = any("error" in r and r["impl"] == "cute fp8_grouped" for r in records)
    bad = any(r.get("sampled_rel_err", 0.0) > 1e-2 for r in records)
    return 0 if result.get("tests", {"passed": True})["passed"] and not failed and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
