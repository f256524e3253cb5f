"""One H200 run that checks and times the CuTe DSL (QuACK) grouped-GEMM prefill kernel.

1. Numerics: runs the GPU tests of the new kernel (``tests/kernels/test_sm90_grouped_gpu.py``:
   bf16 and NVFP4 against the reference with the same quantization, rel. err <= 1e-2; T = 0/1,
   odd sizes, EP offsets, -1 ids; every tile; graph replay equals eager; BF16MoE warm-up).
2. Timing, DeepSeek-V3 layer (H 7168, I 2048, top-8, balanced routing), T in {1024, 8192},
   E in {32, 256}: the Triton NVFP4 kernel (default configuration) against the grouped path for
   NVFP4 and bf16, every tile configuration; CUDA-graph replays, ``do_bench`` median, L2 flushed,
   rotating input sets (``moe-backend bench``'s timer). For the best configuration, a breakdown
   by stage (routing, NVFP4 dequantization, GEMM1, GEMM2, combine), each captured on its own.

Prints a short table and writes ``$OUT/gpu_check_prefill.json`` (or ``--out``).

    python scripts/gpu_check_prefill.py [--quick] [--skip-tests] [--out DIR]

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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_check_tests import run_tests  # noqa: E402 (the scripts folder is on the path now)

#: The tests run before timing (pass --skip-tests to time only).
GPU_TESTS = [
    "tests/kernels/test_sm90_grouped_gpu.py",
    "tests/kernels/test_cute_env.py",
]
H, I, K = 7168, 2048, 8
SHAPES = [(32, 1024), (32, 8192), (256, 1024), (256, 8192)]


def _tflops(pairs: int, us: float) -> float:
    return 2.0 * pairs * 3 * H * I / (us * 1e-6) / 1e12


def _inputs(t: int, e: int, sets: int, device: torch.device):
    from moe_backend.cli.bench import balanced_ids

    gen = torch.Generator().manual_seed(t + e)
    return [
        (
            torch.randn(t, H, generator=gen).to(torch.bfloat16).to(device),
            balanced_ids(t, K, e, gen, device),
            (torch.rand(t, K, generator=gen) + 0.1).to(device),
        )
        for _ in range(sets)
    ]


def _breakdown(weights, hidden, ids, topk_w, cfg, timer) -> dict:
    """Microseconds of each stage of the grouped path, each captured and timed on its own."""
    from moe_backend.kernels.sm90 import bf16_grouped, bf16_moe
    from moe_backend.kernels.sm90.nvfp4_layout import NVFP4KernelWeights
    from moe_backend.kernels.sm90.pair_combine import weighted_sum_pairs
    from moe_backend.kernels.sm90.varlen_routing import varlen_routing
    from moe_backend.runtime import workspace

    t = hidden.shape[0]
    nvfp4 = isinstance(weights, NVFP4KernelWeights)
    e = weights.num_experts
    r = varlen_routing(ids, e, 0, compact=nvfp4)
    w13, w2 = bf16_moe.segment_weights(weights, r.expert_of_segment)
    mid = workspace(t * K, I, torch.bfloat16, hidden.device, "moe_grouped_mid")
    rows = workspace(t * K, H, torch.bfloat16, hidden.device, "moe_grouped_rows")
    out = torch.empty_like(hidden)
    stages = {
        "routing": lambda s: varlen_routing(ids, e, 0, compact=nvfp4),
        "gemm1": lambda s: bf16_grouped.gemm1_gated(hidden, w13, r.cu_seqlens, r.token_of_row, mid, cfg["tile1"]),
        "gemm2": lambda s: bf16_grouped.gemm2(mid, w2, r.cu_seqlens, rows, cfg["tile2"]),
        "combine": lambda s: weighted_sum_pairs(rows, r.row_of_pair, topk_w, out),
    }
    if nvfp4:
        stages["dequant"] = lambda s: bf16_moe.segment_weights(weights, r.expert_of_segment)
    return {name: round(timer(fn)[0], 1) for name, fn in stages.items()}


def time_shape(e: int, t: int, quick: bool) -> list:
    from moe_backend.cli.bench import INPUT_SETS, _time, random_bf16_weights, random_nvfp4_weights
    from moe_backend.kernels.registry import KERNELS
    from moe_backend.kernels.sm90.bf16_moe import CANDIDATE_CONFIGS, fused_experts_grouped, prepare_grouped

    dev = torch.device("cuda")
    sets = _inputs(t, e, INPUT_SETS, dev)
    out = torch.empty(t, H, dtype=torch.bfloat16, device=dev)
    kw = dict(local_expert_offset=0, apply_router_weight_on_input=False, out=out)
    timer = lambda fn: _time(fn, quick)  # noqa: E731
    records = []

    def record(precision, impl, us, mode, **extra):
        rec = dict(
            precision=precision,
            impl=impl,
            E=e,
            T=t,
            topk=K,
            hidden=H,
            inter=I,
            median_us=round(us, 1),
            tflops=round(_tflops(t * K, us), 1),
            mode=mode,
            **extra,
        )
        records.append(rec)
        print(
            f"  {precision:6s} {impl:40s} E={e:3d} T={t:5d} {us:9.1f} us {rec['tflops']:7.1f} TFLOP/s ({mode})",
            flush=True,
        )

    nvfp4 = random_nvfp4_weights(e, H, I, dev)
    triton_kernel = KERNELS["sm90_triton_nvfp4"]
    prepared = triton_kernel.prepare(nvfp4)
    us, mode = timer(lambda s: triton_kernel.run(prepared, *sets[s], **kw))
    record("nvfp4", "sm90_triton_nvfp4 (default config)", us, mode)
    bf16 = prepare_grouped(random_bf16_weights(e, H, I, dev))
    for precision, weights in (("nvfp4", prepared), ("bf16", bf16)):
        best = None
        for cfg in CANDIDATE_CONFIGS:

            def run(s, cfg=cfg, weights=weights):
                hidden, ids, topk_w = sets[s]
                return fused_experts_grouped(hidden, weights, ids, topk_w, config=cfg, **kw)

            us, mode = timer(run)
            record(precision, f"quack_grouped tile={cfg['tile1']}", us, mode)
            if best is None or us < best[1]["median_us"]:
                best = (cfg, records[-1])
        best[1]["stages_us"] = _breakdown(weights, *sets[0], best[0], timer)
        print(f"  {precision} best tile {best[0]['tile1']}: stages (us) {best[1]['stages_us']}", flush=True)
    del nvfp4, bf16
    torch.cuda.empty_cache()
    return records


def _summary(records: list) -> None:
    print(f"\n{'precision':9s} {'E':>4s} {'T':>5s} {'triton us':>10s} {'grouped best us':>16s} {'TFLOP/s':>8s}")
    for e, t in SHAPES:
        for precision in ("nvfp4", "bf16"):
            rows = [r for r in records if r["E"] == e and r["T"] == t and r["precision"] == precision]
            grouped = [r for r in rows if r["impl"].startswith("quack")]
            if not grouped:
                continue
            best = min(grouped, key=lambda r: r["median_us"])
            tri = [r["median_us"] for r in rows if r["impl"].startswith("sm90_triton")]
            print(
                f"{precision:9s} {e:4d} {t:5d} {tri[0] if tri else '-':>10} {best['median_us']:16.1f} "
                f"{best['tflops']:8.1f}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing")
    parser.add_argument("--skip-tests", action="store_true", help="timing only")
    parser.add_argument(
        "--budget-s", type=float, default=0.0, help="start no new timed shape after this many seconds (0: no limit)"
    )
    parser.add_argument(
        "--shape",
        action="append",
        default=None,
        metavar="E,T",
        help="time only these (repeatable; default: E 32/256 x T 1024/8192)",
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON (default $OUT)")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in sh.split(",")) for sh in args.shape] if args.shape else SHAPES
    if not torch.cuda.is_available():
        print("gpu_check_prefill: needs a CUDA GPU")
        return 2
    started = time.perf_counter()
    from moe_backend.cli.info import versions
    from moe_backend.kernels.sm90.cute_env import quack_unavailable_reason

    reason = quack_unavailable_reason()
    result = {"device": torch.cuda.get_device_name(), "versions": versions(), "cute_unavailable": reason}
    print(json.dumps(result, indent=1), flush=True)
    path = Path(args.out) / "gpu_check_prefill.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    if reason is not None:
        return 1
    if not args.skip_tests:
        result["tests"] = run_tests(path.parent / "tests.xml", GPU_TESTS)
        print(f"tests: {result['tests']}", flush=True)
    records, errors = [], {}
    for e, t in shapes:
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            errors[f"E={e} T={t}"] = "skipped: time budget spent"
            continue
        try:
            records += time_shape(e, t, args.quick)
        except Exception as exc:  # keep the other shapes' numbers
            errors[f"E={e} T={t}"] = f"{type(exc).__name__}: {exc}"
            print(f"E={e} T={t} failed: {errors[f'E={e} T={t}']}", flush=True)
            torch.cuda.empty_cache()
        result.update(timings=records, timing_errors=errors)
        path.write_text(json.dumps(result, indent=1))
    _summary(records)
    print(f"wrote {path}")
    return 0 if result.get("tests", {"passed": True})["passed"] and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
