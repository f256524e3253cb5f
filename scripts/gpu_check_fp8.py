"""One-call GPU check of the SM90 FP8 kernels: GPU tests, a config sweep, a per-kernel profile.

Usage (on a CUDA machine, from the repository root)::

    python scripts/gpu_check_fp8.py [--out DIR] [--skip-tests] [--sweep] [--bench ARGS...]

Writes the pytest log, the sweep and the profile under ``--out`` (default ``$OUT``
or ``./gpu_check``) and prints a short summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_backend.cli import bench  # noqa: E402
from moe_backend.kernels.sm90.fp8_moe import resolve_config  # noqa: E402

H, I, K = 7168, 2048, 8
DECODE_SWEEP = [
    {},
    dict(QUANT_ON_LOAD1=False),
    dict(QUANT_ON_LOAD1=False, num_stages1=6, num_stages2=6, SPLIT_K2=4),
    dict(QUANT_ON_LOAD1=False, BLOCK_N1=128, num_warps1=8, num_stages1=5),
    dict(QUANT_ON_LOAD1=False, num_warps1=8, num_warps2=8),
    dict(path="prefill", COMBINE="atomic", QUANT_ON_LOAD1=False, BLOCK_M=16, BLOCK_N1=128,
         num_warps1=4, num_stages1=4, BLOCK_N2=64, SPLIT_K2=2, num_warps2=4, num_stages2=4),
    dict(path="prefill", COMBINE="atomic", QUANT_ON_LOAD1=False, BLOCK_M=16, BLOCK_N1=128,
         num_warps1=4, num_stages1=5, BLOCK_N2=64, SPLIT_K2=1, num_warps2=4, num_stages2=5),
]
PREFILL_SWEEP = [
    {},
    dict(COMBINE="atomic"),
    dict(num_stages1=4, num_stages2=4),
    dict(BLOCK_M=64, num_warps1=4, num_warps2=4, num_stages1=4, num_stages2=4),
    dict(BLOCK_N2=256, BLOCK_K2=128),
    dict(GROUP_M1=16, GROUP_M2=16, num_stages1=4),
]
POINTS = [(256, 1, DECODE_SWEEP), (32, 16, DECODE_SWEEP), (256, 128, DECODE_SWEEP),
          (256, 1024, PREFILL_SWEEP), (32, 1024, PREFILL_SWEEP), (32, 8192, PREFILL_SWEEP)]


def run_tests(out_dir: str) -> str:
    """GPU tests in a child process (a crash must not take the sweep with it); log to a file."""
    log = os.path.join(out_dir, "pytest.txt")
    cmd = [sys.executable, "-u", "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider",
           "tests/kernels/test_sm90_fp8.py", "--durations=5"]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    with open(log) as f:
        lines = f.read().strip().splitlines()
    failed = [ln for ln in lines if "FAILED" in ln or "Error" in ln][:10]
    return f"rc {rc}: " + (lines[-1] if lines else "(no output)") + "".join("\n  " + ln for ln in failed)


def sweep(out_dir: str, quick: bool) -> list:
    dev = torch.device("cuda")
    rows = []
    layers = {}
    for e, t, cands in POINTS:
        if e not in layers:
            layers.clear()
            torch.cuda.empty_cache()
            layers[e] = bench.Layer(e, H, I, dev)
        layer = layers[e]
        gen = torch.Generator().manual_seed(t)
        sets = [(torch.randn(t, H, device=dev).to(torch.bfloat16), bench.balanced_ids(t, K, e, gen, dev),
                 torch.rand(t, K, generator=gen).to(dev)) for _ in range(bench.INPUT_SETS)]
        out = torch.empty(t, H, dtype=torch.bfloat16, device=dev)
        from moe_backend.kernels.sm90 import fused_experts_fp8
        for cand in cands:
            cfg = resolve_config(cand, t, K, e)

            def run(s, cfg=cfg):
                hidden, ids, w = sets[s]
                return fused_experts_fp8(hidden, layer.w13, layer.w13_block_scale, layer.w2,
                                         layer.w2_block_scale, ids, w, block_scaled=True,
                                         local_expert_offset=0, a13_scale=None, a2_scale=None,
                                         ue8m0=False, apply_router_weight_on_input=False, out=out,
                                         config=cfg)
            try:
                us = bench._time(run, quick)
            except Exception as exc:  # a config that does not compile: note it, go on
                us = None
                print(f"E={e} T={t} {cand}: {type(exc).__name__}: {str(exc)[:200]}")
            rows.append(dict(E=e, T=t, config=cand, us=us))
        base = bench._time(lambda s: layer.baseline(*sets[s], out), quick)
        rows.append(dict(E=e, T=t, config="torch_scaled_grouped_mm", us=base))
        fl = bench.floor_us(t, K, e, H, I)["floor_us"]
        best = min((r for r in rows if r["E"] == e and r["T"] == t and r["us"] and r["config"] != "torch_scaled_grouped_mm"),
                   key=lambda r: r["us"])
        print(f"E={e:>3} T={t:>5} floor {fl:8.1f} base {base:8.1f} best {best['us']:8.1f} {best['config']}  "
              + " ".join(f"{r['us']:.0f}" if r["us"] else "x" for r in rows
                         if r["E"] == e and r["T"] == t and r["config"] != "torch_scaled_grouped_mm"),
              flush=True)
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def profile(out_dir: str) -> None:
    """Per-kernel GPU time of the default config at a few sizes."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    from moe_backend.kernels.sm90 import fused_experts_fp8
    dev = torch.device("cuda")
    lines = []
    for e, t in [(256, 1), (32, 8192)]:
        layer = bench.Layer(e, H, I, dev)
        hidden = torch.randn(t, H, device=dev).to(torch.bfloat16)
        ids = bench.balanced_ids(t, K, e, torch.Generator().manual_seed(0), dev)
        w = torch.rand(t, K, device=dev)
        out = torch.empty(t, H, dtype=torch.bfloat16, device=dev)

        def run():
            fused_experts_fp8(hidden, layer.w13, layer.w13_block_scale, layer.w2, layer.w2_block_scale,
                              ids, w, block_scaled=True, local_expert_offset=0, a13_scale=None,
                              a2_scale=None, ue8m0=False, apply_router_weight_on_input=False, out=out)
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                run()
            torch.cuda.synchronize()
        lines.append(f"--- E={e} T={t} (5 calls)")
        lines.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10))
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "profile.txt"), "w") as f:
        f.write(text)
    print(text)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check"))
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--bench", nargs=argparse.REMAINDER, default=None, help="run moe-backend bench with these args")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    if not args.skip_tests:
        print("pytest:", run_tests(args.out), f"({time.time() - t0:.0f}s)", flush=True)
    if args.sweep:
        sweep(args.out, quick=True)
        print(f"sweep done ({time.time() - t0:.0f}s)", flush=True)
    if args.profile:
        profile(args.out)
    if args.bench is not None:
        bp = argparse.ArgumentParser()
        bench.add_arguments(bp)
        bargs = bp.parse_args(args.bench)
        rc = bench.main(bargs)
        print(f"bench rc {rc} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
