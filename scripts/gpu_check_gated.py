"""GEMM1 of the FP8 grouped prefill path on the H200, two ways, alternated in one run: the fp32
grouped GEMM then ``silu_mul_quant`` (the path before the gated kernel), against
``gated_gemm1_fp8_block`` (SiLU-and-mul and the requantization in GEMM1's epilogue), each on the
tiles the layer would use. DeepSeek-V3 widths (2I = 4096, H = 7168), top-8, balanced segments:
E = 32 at T = 1024 and 8192 (256 and 2048 rows an expert), E = 256 at T = 8192 (256 rows).
CUDA-graph replays, do_bench median, L2 flushed (``decode_breakdown.timed``); each pair of
variants timed ``--rounds`` times in alternation, since long compute-bound runs drift with the
card's power state. Prints a table; writes ``$OUT/gpu_check_gated.json`` (or ``--out``).

    python scripts/gpu_check_gated.py [--rounds 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from decode_breakdown import timed  # noqa: E402

from moe_backend.kernels.sm90.fp8_grouped import (  # noqa: E402
    GATED_TILES,
    compile_plans,
    gated_gemm1_fp8_block,
    grouped_gemm_fp8_block,
)
from moe_backend.kernels.sm90.silu_mul_quant import silu_mul_quant  # noqa: E402
from moe_backend.quant.fp8 import BLOCK, FP8_DTYPE, quantize_fp8_block, quantize_fp8_per_token_group  # noqa: E402

H, INTER = 7168, 2048
#: (E, T): rows an expert = T * 8 / E.
POINTS = ((32, 1024), (32, 8192), (256, 8192))
#: The plain GEMM1's tiles: the cluster tile (the heuristic's from 256 rows an expert until the
#: gated GEMM1 took over there, now a tuner candidate) and the one-CTA tile (the heuristic's below
#: 256 rows, fp8_moe.default_grouped_tiles).
PLAIN_TILES = ((128, 128, 2, False, True), (128, 128, 1, False, False))


def operands(e: int, t: int, dev: torch.device):
    rows = t * 8 // e
    torch.manual_seed(0)
    a, a_scale = quantize_fp8_per_token_group(torch.randn(e * rows, H, device=dev), BLOCK)
    # 32 distinct experts, repeated (separate copies) up to E: the fp32 weights of 256 would be 30 GB
    w13, w13_scale = quantize_fp8_block(torch.randn(min(e, 32), 2 * INTER, H, device=dev) * 0.05, BLOCK)
    reps = e // w13.shape[0]
    w13, w13_scale = w13.repeat(reps, 1, 1), w13_scale.repeat(reps, 1, 1)
    cu = torch.arange(0, e + 1, dtype=torch.int32, device=dev) * rows
    return a, a_scale, w13, w13_scale, cu


def time_point(e: int, t: int, rounds: int, dev: torch.device) -> List[Dict]:
    """Every variant at (E, T), ``rounds`` times in alternation: one row each."""
    a, a_scale, w13, w13_scale, cu = operands(e, t, dev)
    m = a.shape[0]
    gate_up = torch.empty(m, 2 * INTER, device=dev)
    y = torch.empty(m, INTER, dtype=FP8_DTYPE, device=dev)
    ys = torch.empty(m, INTER // BLOCK, device=dev)

    def two_step(tile):
        return lambda: (
            grouped_gemm_fp8_block(a, a_scale, w13, w13_scale, cu, gate_up, tile=tile),
            silu_mul_quant(gate_up, y, ys, cu[-1:]),
        )

    def gated(tile):
        return lambda: gated_gemm1_fp8_block(a, a_scale, w13, w13_scale, cu, y, ys, tile=tile)

    variants: Dict[str, Callable[[], object]] = {
        f"plain {tile} + silu_mul_quant": two_step(tile) for tile in PLAIN_TILES
    }
    variants["silu_mul_quant alone"] = lambda: silu_mul_quant(gate_up, y, ys, cu[-1:])
    variants.update({f"gated {tile}": gated(tile) for tile in GATED_TILES})
    return time_rounds(variants, rounds, E=e, T=t, rows_per_expert=t * 8 // e)


def time_rounds(variants: Dict[str, Callable[[], object]], rounds: int, **tags) -> List[Dict]:
    """Each of ``variants`` timed ``rounds`` times in alternation (the card's power state drifts
    over long compute-bound runs): one row each, ``tags`` included, printed as it comes."""
    rows = []
    for r in range(rounds):
        for name, fn in variants.items():
            rows.append(dict(tags, variant=name, round=r, us=timed([fn])))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def parse_args(doc: str) -> argparse.Namespace:
    """``--rounds`` and ``--out`` (default ``$OUT``) of the gated GEMM1 scripts."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    return p.parse_args()


def main() -> None:
    args = parse_args(__doc__)
    dev = torch.device("cuda")
    compile_plans(2 * INTER, H, PLAIN_TILES, dev, torch.float32)
    compile_plans(2 * INTER, H, GATED_TILES, dev, FP8_DTYPE)
    results: List[Dict] = []
    for e, t in POINTS:
        results += time_point(e, t, args.rounds, dev)
        torch.cuda.empty_cache()
    out = Path(args.out) / "gpu_check_gated.json"
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), results=results), indent=1))
    print(f"\n{'E':>4} {'T':>5} {'variant':<58} {'us (rounds)'}")
    for e, t in POINTS:
        for name in dict.fromkeys(r["variant"] for r in results if (r["E"], r["T"]) == (e, t)):
            uss = [r["us"] for r in results if (r["E"], r["T"], r["variant"]) == (e, t, name)]
            print(f"{e:>4} {t:>5} {name:<58} {' / '.join(f'{u:.1f}' for u in uss)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
