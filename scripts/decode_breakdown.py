"""Where the decode time goes: each stage of our FP8 and NVFP4 layers timed alone on a GPU.

For DeepSeek-V3 widths (H 7168, I 2048, top-8, balanced routing) at small T, times with
CUDA-graph replays and ``do_bench`` medians (L2 flushed), rotating routing sets:

* the whole layer (``MoELayer.experts``) and each of its launches captured alone
  (align, GEMM1, GEMM2, cast; NVFP4 also the activation permutation);
* the same layer with configuration overrides (``FP8_SCAN``, ``NVFP4_SCAN``: other tilings and
  the paths not yet selected by default);
* the read-streaming ceiling: one launch that only reads the active experts' weight bytes
  (``bench_ceilings.expert_stream``).

Usage (GPU): ``python scripts/decode_breakdown.py --out $OUT/breakdown.json [--scan NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable, Dict, List

import torch
import triton.testing

from moe_backend.cli.bench import INPUT_SETS, Layer, balanced_ids
from moe_backend.cli.bench_ceilings import expert_stream
from moe_backend.kernels.registry import KERNELS
from moe_backend.kernels.sm90 import fp8_moe, nvfp4_moe
from moe_backend.kernels.sm90.align import align_block_size
from moe_backend.kernels.sm90.combine import cast_out
from moe_backend.kernels.sm90.fp8_gemm1 import gemm1_fp8
from moe_backend.kernels.sm90.fp8_gemm2 import gemm2_fp8
from moe_backend.kernels.sm90.nvfp4_act import permute_activations
from moe_backend.kernels.sm90.nvfp4_gemm1 import gemm1_nvfp4
from moe_backend.kernels.sm90.nvfp4_gemm2 import gemm2_nvfp4
from moe_backend.kernels.sm90.nvfp4_moe import prepare_nvfp4


def timed(calls: List[Callable[[], object]]) -> float:
    """Median µs of graph replays rotating over ``calls`` (each captured once), L2 flushed."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    graphs = []
    for c in calls:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            c()
        graphs.append(g)
    state = {"i": 0}

    def step():
        graphs[state["i"] % len(graphs)].replay()
        state["i"] += 1

    return triton.testing.do_bench(step, warmup=10, rep=60, return_mode="median") * 1e3


def fp8_stages(layer: Layer, sets, cfg: Dict) -> Dict[str, float]:
    """The FP8 block decode launches of ``cfg`` timed one by one (inputs prepared outside)."""
    w = layer.weights["fp8_block"]()
    e = layer.e
    out: Dict[str, float] = {}
    prepared = []
    for hidden, ids, tw in sets:
        t, k = ids.shape
        r = align_block_size(ids, e, 0, cfg["BLOCK_M"])
        acc = torch.zeros(t, layer.h, dtype=torch.float32, device=hidden.device)
        common = dict(num_pairs=t * k, top_k=k, block_scaled=True, ue8m0=False, weight_on_input=False, vllm_order=0)
        g1 = dict(
            quant_on_load=True,
            a13_static=None,
            quant_out=False,
            a2_static=None,
            BLOCK_N=cfg["BLOCK_N1"],
            BLOCK_K=128,
            GROUP_M=1,
            num_warps=cfg["num_warps1"],
            num_stages=cfg["num_stages1"],
            **common,
        )
        y, ys = gemm1_fp8(hidden, None, w.w13, w.w13_scale, r, tw, acc, **g1)
        y = y.clone()
        g2 = dict(
            quant_on_load=True,
            a2_static=None,
            atomic=True,
            BLOCK_N=cfg["BLOCK_N2"],
            BLOCK_K=128,
            SPLIT_K=cfg["SPLIT_K2"],
            GROUP_M=1,
            num_warps=cfg["num_warps2"],
            num_stages=cfg["num_stages2"],
            **common,
        )
        res = torch.empty(t, layer.h, dtype=torch.bfloat16, device=hidden.device)
        prepared.append((hidden, ids, tw, r, acc, y, g1, g2, res))
    out["align"] = timed([lambda p=p: align_block_size(p[1], e, 0, cfg["BLOCK_M"]) for p in prepared])
    out["gemm1"] = timed(
        [lambda p=p: gemm1_fp8(p[0], None, w.w13, w.w13_scale, p[3], p[2], p[4], **p[6]) for p in prepared]
    )
    out["gemm2"] = timed(
        [lambda p=p: gemm2_fp8(p[5], None, w.w2, w.w2_scale, p[3], p[2], p[4], **p[7]) for p in prepared]
    )
    out["cast"] = timed([lambda p=p: cast_out(p[4], p[8]) for p in prepared])
    return out


def nvfp4_stages(layer: Layer, sets, cfg: Dict) -> Dict[str, float]:
    """The NVFP4 decode launches timed one by one."""
    kw = prepare_nvfp4(layer.weights["nvfp4"]())
    out: Dict[str, float] = {}
    prepared = []
    for hidden, ids, tw in sets:
        t, k = ids.shape
        r = align_block_size(ids, layer.e, 0, cfg["BLOCK_M"])
        x = permute_activations(hidden, kw.w13.shape[2] * 8).clone()
        acc = torch.zeros(t, layer.h, dtype=torch.float32, device=hidden.device)
        common = dict(num_pairs=t * k, top_k=k, weight_on_input=False)
        y = gemm1_nvfp4(
            x,
            kw.w13,
            kw.w13_scale,
            kw.w13_scale_2,
            r,
            tw,
            acc,
            BLOCK_N=cfg["BLOCK_N1"],
            GROUP_M=1,
            num_warps=cfg["num_warps1"],
            num_stages=cfg["num_stages1"],
            **common,
        ).clone()
        prepared.append((hidden, r, tw, x, acc, y, common))
    out["permute"] = timed([lambda p=p: permute_activations(p[0], kw.w13.shape[2] * 8) for p in prepared])
    out["gemm1"] = timed(
        [
            lambda p=p: gemm1_nvfp4(
                p[3],
                kw.w13,
                kw.w13_scale,
                kw.w13_scale_2,
                p[1],
                p[2],
                p[4],
                BLOCK_N=cfg["BLOCK_N1"],
                GROUP_M=1,
                num_warps=cfg["num_warps1"],
                num_stages=cfg["num_stages1"],
                **p[6],
            )
            for p in prepared
        ]
    )
    out["gemm2"] = timed(
        [
            lambda p=p: gemm2_nvfp4(
                p[5],
                kw.w2,
                kw.w2_scale,
                kw.w2_scale_2,
                p[1],
                p[2],
                p[4],
                BLOCK_N=cfg["BLOCK_N2"],
                SPLIT_K=cfg["SPLIT_K2"],
                GROUP_M=1,
                num_warps=cfg["num_warps2"],
                num_stages=cfg["num_stages2"],
                **p[6],
            )
            for p in prepared
        ]
    )
    return out


#: Configurations timed as whole layers: name -> full configuration (the swap-AB decode path
#: in several tilings, the aligned decode path it replaces, and the swap-AB default with each of
#: ``fp8_moe.SWAPAB_VARIANTS``, ``swapab_*``).
_SW = fp8_moe.SWAPAB_CONFIG
_COMBO = dict(_SW, BLOCK_N1=64, num_stages1=3, BLOCK_N2=128, num_warps2=8, num_stages2=3)
_PREQ = dict(_COMBO, QUANT_ON_LOAD1=False, PDL=True)
_PREQ_XY = dict(_PREQ, BLOCK_N1=128, num_warps1=8, QUANT_OUT1=True)
FP8_SCAN = {
    "decode": dict(fp8_moe.DECODE_CONFIG),
    "combo_pdl": dict(_COMBO, PDL=True),
    "preq_x": _PREQ,
    "preq_x_st4": dict(_PREQ, num_stages1=4),
    "preq_xy": _PREQ_XY,
    "preq_xy_st4": dict(_PREQ_XY, num_stages1=4, num_stages2=4),
    "preq_xy_n2_64": dict(_PREQ_XY, BLOCK_N2=64, num_warps2=4, num_stages2=4),
    "preq_y": dict(_PREQ_XY, QUANT_ON_LOAD1=True),
    "preq_xy_nopdl": dict(_PREQ_XY, PDL=False),
    "swapab": dict(_SW),
    **{f"swapab_{name}": dict(cfg) for name, cfg in fp8_moe.SWAPAB_VARIANTS.items()},
}


#: NVFP4 configurations timed beside the layer's default (``nvfp4_scan_<name>_us``).
NVFP4_SCAN = {
    "swapab": nvfp4_moe.SWAPAB_CONFIG,
    "swapab_nopdl": dict(nvfp4_moe.SWAPAB_CONFIG, PDL=False),
}


def scan_times(run: Callable, prepared, sets, res: torch.Tensor, scan: Dict[str, Dict]) -> Dict[str, object]:
    """``run`` (a registry kernel's) under each configuration of ``scan``: µs, or why it failed."""
    times: Dict[str, object] = {}
    for name, c in scan.items():
        try:
            times[name] = timed(
                [
                    lambda s=s, c=c: run(
                        prepared,
                        s[0],
                        s[1],
                        s[2],
                        local_expert_offset=0,
                        apply_router_weight_on_input=False,
                        out=res,
                        config=c,
                    )
                    for s in sets
                ]
            )
        except Exception as exc:  # a configuration that does not compile: record, go on
            times[name] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--T", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--stages", action="store_true", help="also time each launch alone")
    parser.add_argument("--no-nvfp4", action="store_true")
    parser.add_argument("--E", type=int, nargs="+", default=[256, 32])
    parser.add_argument("--scan", nargs="+", choices=list(FP8_SCAN), help="only these FP8_SCAN entries")
    args = parser.parse_args()
    scan = {name: FP8_SCAN[name] for name in args.scan} if args.scan else FP8_SCAN
    dev = torch.device("cuda")
    h, i, k = 7168, 2048, 8
    results = []
    for e in args.E:
        layer = Layer(e, h, i, k, dev)
        fp8 = layer.ours("fp8_block")
        nv = layer.ours("nvfp4")
        for t in args.T:
            gen = torch.Generator().manual_seed(t)
            sets = [
                (
                    torch.randn(t, h, device=dev).to(torch.bfloat16),
                    balanced_ids(t, k, e, gen, dev),
                    torch.rand(t, k, generator=gen).to(dev),
                )
                for _ in range(INPUT_SETS)
            ]
            res = torch.empty(t, h, dtype=torch.bfloat16, device=dev)
            row = dict(E=e, T=t)
            active = [torch.unique(s[1]).to(torch.int32) for s in sets]
            n_active = active[0].numel()
            fp8_bytes = n_active * 3 * h * i
            row["active_experts"] = n_active
            row["stream_us"] = timed([expert_stream(layer.w13, layer.w2, a) for a in active])
            row["stream_tbs"] = fp8_bytes / (row["stream_us"] * 1e-6) / 1e12
            row["fp8_layer_us"] = timed([lambda s=s, fp8=fp8, res=res: fp8(*s, res) for s in sets])
            row["fp8_tbs"] = fp8_bytes / (row["fp8_layer_us"] * 1e-6) / 1e12
            cfg = fp8_moe.resolve_config(None, t, k, e)
            if args.stages and cfg["path"] == "decode":
                row.update({f"fp8_{kk}_us": v for kk, v in fp8_stages(layer, sets, cfg).items()})
            fp8_kernel = KERNELS["sm90_triton_fp8"]
            fp8_prepared = fp8_kernel.prepare(layer.weights["fp8_block"]())
            times = scan_times(fp8_kernel.run, fp8_prepared, sets, res, scan)
            row.update({f"fp8_scan_{name}_us": v for name, v in times.items()})
            if not args.no_nvfp4:
                row["nvfp4_layer_us"] = timed([lambda s=s, nv=nv, res=res: nv(*s, res) for s in sets])
                row["nvfp4_tbs"] = fp8_bytes * 0.5625 / (row["nvfp4_layer_us"] * 1e-6) / 1e12
                nv_kernel = KERNELS["sm90_triton_nvfp4"]
                nv_prepared = nv_kernel.prepare(layer.weights["nvfp4"]())
                times = scan_times(nv_kernel.run, nv_prepared, sets, res, NVFP4_SCAN)
                row.update({f"nvfp4_scan_{name}_us": v for name, v in times.items()})
            if args.stages and not args.no_nvfp4:
                ncfg = nvfp4_moe.resolve_config(None, t, k, e)
                row.update({f"nvfp4_{kk}_us": v for kk, v in nvfp4_stages(layer, sets, ncfg).items()})
            results.append(row)
            print(json.dumps({kk: (round(v, 2) if isinstance(v, float) else v) for kk, v in row.items()}), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(dev), rows=results), f, indent=1)


if __name__ == "__main__":
    main()
