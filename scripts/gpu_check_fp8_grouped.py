"""One H200 run that checks and times the FP8 block-scale grouped GEMM (CuTe DSL) and the first
layer built on it (``fp8_grouped_moe``, not in the registry yet).

1. Numerics: runs ``tests/kernels/test_sm90_fp8_grouped_gpu.py`` (float64 reference from the
   dequantized operands, rel. err <= 1e-2; segments of 0, 1, odd and large sizes; DeepSeek-V3
   widths; every configuration; graph replay bitwise equal to eager) and the CPU-side tests.
2. Timing at M_total = 65536 rows in 32 segments of 2048 (T = 8192, top-8, E = 32: one EP8 shard of
   DeepSeek-V3), GEMM1 (N 4096, K 7168) and GEMM2 (N 7168, K 2048), every configuration: CUDA-graph
   replay, ``triton.testing.do_bench`` median (L2 flushed before every call); against dense FP8
   ``torch._scaled_mm`` (per-tensor scales, cuBLAS) at the same M, N, K in the same run, and, where
   this torch supports it, ``torch._scaled_mm`` with the same 1x128 / 128x128 block scales. Each
   timed configuration's output is checked on sampled rows of every segment against the reference.
3. The whole prefill layer at T = 1024 and 8192 (E = 32, top-8, H 7168, I 2048, balanced routing,
   the bench's random ``Layer`` weights): the Triton FP8 layer (``sm90_triton_fp8``, its default
   configuration) against ``fused_experts_fp8_grouped`` with the heuristic's tiles
   (``fp8_moe.default_grouped_tiles``: the gated GEMM1 and the 128 x 256 GEMM2 from 256 rows an
   expert) and with both GEMMs on the 128-wide cluster tile, same inputs, CUDA-graph replay,
   do_bench median, L2 flushed; a breakdown of the grouped path (routing, quantize-and-scatter,
   GEMM1 then silu_mul_quant or the gated GEMM1, GEMM2, combine, each timed alone) and its relative
   error against the Triton layer's output.

Prints a table and writes ``$OUT/gpu_check_fp8_grouped.json`` (or ``--out``).

    python scripts/gpu_check_fp8_grouped.py [--skip-tests] [--skip-gemms] [--out DIR]

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
    "tests/kernels/test_sm90_fp8_grouped_moe.py",
    "tests/kernels/test_sm90_silu_mul_quant.py",
]
ROWS, SEGMENTS = 65536, 32
GEMMS = {"gemm1": (4096, 7168), "gemm2": (7168, 2048)}
#: Rows checked against the float64 reference at the start and end of every segment.
SAMPLE = 16
#: The layer timings: tokens, local experts, top-k, hidden and intermediate widths.
LAYER_TOKENS = (1024, 8192)
LAYER_E, LAYER_K, LAYER_H, LAYER_I = 32, 8, 7168, 2048


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
    from moe_backend.kernels.sm90.fp8_grouped import (
        TILES,
        WIDE_TILES,
        compile_plans,
        fits_width,
        grouped_gemm_fp8_block,
    )

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
    for tile in (t for t in TILES + WIDE_TILES if fits_width(t, n)):
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


def _layer_stages(hidden, weights, ids, topk_w, out, tiles) -> Dict[str, Callable[[], object]]:
    """Each step of ``fused_experts_fp8_grouped`` as its own call on the buffers one full call
    leaves (so that each can be captured and timed alone)."""
    from moe_backend.kernels.sm90.act_quant import act_quant_scatter_fp8
    from moe_backend.kernels.sm90.fp8_grouped import GATED_TILES, gated_gemm1_fp8_block, grouped_gemm_fp8_block
    from moe_backend.kernels.sm90.fp8_grouped_moe import route_quantize_scatter
    from moe_backend.kernels.sm90.pair_combine import weighted_sum_pairs
    from moe_backend.kernels.sm90.silu_mul_quant import silu_mul_quant
    from moe_backend.kernels.sm90.varlen_routing import varlen_routing
    from moe_backend.runtime import workspace

    p, i, h = ids.numel(), weights.intermediate_size, weights.hidden_size
    dev = hidden.device
    routing, a, a_scale = route_quantize_scatter(hidden, ids, weights.num_experts, 0)
    cu = routing.cu_seqlens
    # the same workspace roles the layer uses: the buffers it filled
    gate_up = workspace(p, 2 * i, torch.float32, dev, "moe_fp8g_gate_up")
    y = workspace(p, i, torch.float8_e4m3fn, dev, "moe_fp8g_mid")
    y_scale = workspace(p, i // 128, torch.float32, dev, "moe_fp8g_mid_scale")
    rows = workspace(p, h, torch.bfloat16, dev, "moe_fp8g_rows")
    t = hidden.shape[0]
    stages: Dict[str, Callable[[], object]] = {
        "route": lambda: varlen_routing(ids, weights.num_experts, 0, compact=False),
        "quant+scatter": lambda: act_quant_scatter_fp8(hidden, routing.row_of_pair, a, a_scale),
    }
    if tiles[0] in GATED_TILES:
        stages["gemm1 gated"] = lambda: gated_gemm1_fp8_block(
            a, a_scale, weights.w13, weights.w13_scale, cu, y, y_scale, tile=tiles[0]
        )
    else:
        stages["gemm1"] = lambda: grouped_gemm_fp8_block(
            a, a_scale, weights.w13, weights.w13_scale, cu, gate_up, tile=tiles[0]
        )
        stages["silu_mul_quant"] = lambda: silu_mul_quant(gate_up, y, y_scale, cu[-1:])
    stages["gemm2"] = lambda: grouped_gemm_fp8_block(y, y_scale, weights.w2, weights.w2_scale, cu, rows, tile=tiles[1])
    stages["combine"] = lambda: weighted_sum_pairs(rows, routing.row_of_pair, topk_w, out[:t])
    return stages


def _time_layer_at(t: int, weights, triton_kernel, prepared) -> List[Dict]:
    """Records at T = ``t``: the Triton layer, then the grouped layer on the heuristic's tiles and
    on the cluster tile for both GEMMs."""
    from moe_backend.cli.bench import balanced_ids
    from moe_backend.kernels.sm90 import fp8_moe
    from moe_backend.kernels.sm90.fp8_grouped_moe import fused_experts_fp8_grouped, precompile

    picked = fp8_moe.default_grouped_tiles(LAYER_H, LAYER_I, t * LAYER_K / LAYER_E)
    tile_sets = {
        "heuristic": (tuple(picked["TILE1"]), tuple(picked["TILE2"])),
        "cluster": (fp8_moe.GROUPED_CLUSTER_TILE, fp8_moe.GROUPED_CLUSTER_TILE),
    }
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(t)
    ids = balanced_ids(t, LAYER_K, LAYER_E, gen, device)
    hidden = (torch.randn(t, LAYER_H, generator=gen) * 0.5).to(torch.bfloat16).to(device)
    topk_w = torch.rand(t, LAYER_K, generator=gen)
    topk_w = (topk_w / topk_w.sum(1, keepdim=True)).to(device)
    base = {"layer_tokens": t, "experts": LAYER_E, "top_k": LAYER_K}
    ref_out = torch.empty(t, LAYER_H, dtype=torch.bfloat16, device=device)

    def triton_layer():
        return triton_kernel.run(
            prepared,
            hidden,
            ids,
            topk_w,
            local_expert_offset=0,
            apply_router_weight_on_input=False,
            out=ref_out,
            config=triton_config,
        )

    # the Triton kernels' heuristic tier (the launcher's default now takes the grouped path here)
    triton_config = fp8_moe.default_config(t, LAYER_K, LAYER_E, grouped=False)
    records: List[Dict] = []
    rec: Dict = dict(base, impl="triton sm90_triton_fp8 (default config)")
    triton_ok = False
    try:
        triton_layer()
        torch.cuda.synchronize()
        triton_ok = True  # ref_out holds its output (the replays below rewrite the same values)
        rec["us"] = _median_us(triton_layer)
    except Exception as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
    records.append(rec)
    print(json.dumps(rec), flush=True)
    for name, tiles in tile_sets.items():
        rec = dict(base, impl=f"cute fp8_grouped_moe ({name} tiles)", tiles=[list(x) for x in tiles])
        out = torch.empty(t, LAYER_H, dtype=torch.bfloat16, device=device)

        def grouped(tiles=tiles, out=out):
            return fused_experts_fp8_grouped(
                hidden, weights, ids, topk_w, local_expert_offset=0, out=out, tile1=tiles[0], tile2=tiles[1]
            )

        try:
            t0 = time.perf_counter()
            precompile(weights, *tiles)
            rec["compile_s"] = round(time.perf_counter() - t0, 2)
            grouped()
            torch.cuda.synchronize()
            if triton_ok:
                want = ref_out.double()
                rec["rel_err_vs_triton"] = float((out.double() - want).norm() / want.norm().clamp_min(1e-30))
            rec["us"] = _median_us(grouped)
            stages = {}
            for stage, fn in _layer_stages(hidden, weights, ids, topk_w, out, tiles).items():
                stages[stage] = round(_median_us(fn), 2)
            rec["stages_us"] = stages
            rec["stages_sum_us"] = round(sum(stages.values()), 2)
        except Exception as exc:  # keep the other numbers
            rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
        records.append(rec)
        print(json.dumps(rec), flush=True)
    triton_us = records[0].get("us")
    for r in records:
        if "us" in r and triton_us:
            r["vs_triton"] = round(triton_us / r["us"], 3)
    return records


def time_layers() -> List[Dict]:
    """The Triton FP8 layer against the CuTe DSL grouped layer (the heuristic's tiles, the cluster
    tiles), whole and (the grouped one) step by step, at each of :data:`LAYER_TOKENS`."""
    from moe_backend.cli.bench import Layer
    from moe_backend.kernels.registry import KERNELS

    layer = Layer(LAYER_E, LAYER_H, LAYER_I, LAYER_K, torch.device("cuda"))
    weights = layer.weights["fp8_block"]()
    triton_kernel = KERNELS["sm90_triton_fp8"]
    prepared = triton_kernel.prepare(weights)
    records: List[Dict] = []
    for t in LAYER_TOKENS:
        records += _time_layer_at(t, weights, triton_kernel, prepared)
        torch.cuda.empty_cache()
    return records


def print_layers(records: List[Dict]) -> None:
    print(f"\n{'T':>6} {'impl':44} {'us':>9} {'x triton':>9} {'rel err':>9}  stages (us)")
    for r in records:
        if "us" not in r:
            print(f"{r['layer_tokens']:6} {r['impl']:44} error: {r.get('error', '')[:120]}")
            continue
        err = f"{r['rel_err_vs_triton']:.1e}" if "rel_err_vs_triton" in r else ""
        stages = " ".join(f"{k}={v:.1f}" for k, v in r.get("stages_us", {}).items())
        print(f"{r['layer_tokens']:6} {r['impl']:44} {r['us']:9.1f} {r.get('vs_triton', 1.0):9.3f} {err:>9}  {stages}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-tests", action="store_true", help="timing only")
    parser.add_argument("--skip-gemms", action="store_true", help="time the layers only, not each GEMM tile")
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
    for name, (n, k) in {} if args.skip_gemms else GEMMS.items():
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
    layers = time_layers()
    result["layer_timings"] = layers
    path.write_text(json.dumps(result, indent=1))
    print_layers(layers)
    print(f"wrote {path}")
    failed = any("error" in r and r["impl"] == "cute fp8_grouped" for r in records)
    failed = failed or any("error" in r for r in layers)
    bad = any(r.get("sampled_rel_err", 0.0) > 1e-2 for r in records)
    bad = bad or any(r.get("rel_err_vs_triton", 0.0) > 1e-2 for r in layers)
    return 0 if result.get("tests", {"passed": True})["passed"] and not failed and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
