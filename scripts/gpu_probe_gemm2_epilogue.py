"""What GEMM2's epilogue costs it on the H200: the FP8 grouped GEMM2 on the 128 x 128 cluster tile
``(128, 128, 2, False, True)`` (the layer's until the wide tile took over, seventeenth session)
(bf16 rows out through shared memory and TMA stores) against the same kernel with its epilogue
switched off (the sums summed and kept alive, nothing stored; timing only). DeepSeek-V3 widths (N =
H 7168, K = I 2048), balanced segments: E=32 at T=1024 and 8192 (256 and 2048 rows an expert), E=256
at T=8192 (256). CUDA-graph replays, do_bench median, L2 flushed, ``--rounds`` rounds in
alternation. Writes ``$OUT/gpu_probe_gemm2_epilogue.json``.

    python -P scripts/gpu_probe_gemm2_epilogue.py [--rounds 3]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float32

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_gated import parse_args, time_rounds  # noqa: E402

import moe_backend.kernels.sm90.fp8_grouped as fg  # noqa: E402
import moe_backend.kernels.sm90.fp8_grouped_kernel as grouped_kernel  # noqa: E402
from moe_backend.quant.fp8 import BLOCK, quantize_fp8_block, quantize_fp8_per_token_group  # noqa: E402

H, INTER = 7168, 2048
TILE = (128, 128, 2, False, True)
PRODUCT = grouped_kernel.Fp8BlockGemmSm90Overlapped


class NoEpilogue(PRODUCT):
    """GEMM2 without its epilogue: the sums summed and kept alive, nothing stored."""

    @cute.jit
    def epi_visit_acc(self, params, acc, tiled_mma, tile_coord_mnkl, tidx):
        m_sa = self._scales[0]
        s = Float32(0.0)
        for i in cutlass.range_constexpr(cute.size(acc)):
            s = s + acc[i]
        if s == Float32(1.2345e-30):  # never: keeps the sums alive
            m_sa[0, 0] = s

    def epilogue_split_k(self, params, epi_fn, load_acc_subtile, tRS_rD, epi_tile, epi_read_state,
                         epi_producer_state, epi_store_pipeline, tile_coord_mnkl, epilogue_barrier, tidx,
                         is_tma_warp):  # fmt: skip
        return epi_read_state, epi_producer_state


def plan_of(cls, dev):
    """The tile's bf16 plan compiled with ``cls`` in place of the product's class."""
    grouped_kernel.Fp8BlockGemmSm90Overlapped = cls
    fg._compile.cache_clear()
    for key in [k for k in fg._PLANS if k.tile == TILE]:
        del fg._PLANS[key]
    fg.compile_plans(H, INTER, [TILE], dev)
    grouped_kernel.Fp8BlockGemmSm90Overlapped = PRODUCT
    return {k: v for k, v in fg._PLANS.items() if k.tile == TILE}


def _runner(plan, ops, out):
    """GEMM2 on ``ops`` with ``plan`` (a variant's compiled plans) installed first."""

    def run():
        fg._PLANS.update(plan)
        return fg.grouped_gemm_fp8_block(*ops, out, tile=TILE)

    return run


def main() -> None:
    args = parse_args(__doc__)
    dev = torch.device("cuda")
    plans = {"gemm2": plan_of(PRODUCT, dev), "gemm2, no epilogue": plan_of(NoEpilogue, dev)}
    torch.manual_seed(0)
    w2, w2s = quantize_fp8_block(torch.randn(32, H, INTER, device=dev) * 0.05, BLOCK)
    rows = []
    for e, t in ((32, 1024), (32, 8192), (256, 8192)):
        per = t * 8 // e
        y, ys = quantize_fp8_per_token_group(torch.randn(e * per, INTER, device=dev), BLOCK)
        cu = torch.arange(0, e + 1, dtype=torch.int32, device=dev) * per
        ops = (y, ys, w2.repeat(e // 32, 1, 1), w2s.repeat(e // 32, 1, 1), cu)
        out = torch.empty(e * per, H, dtype=torch.bfloat16, device=dev)
        variants = {name: _runner(plans[name], ops, out) for name in plans}
        rows += time_rounds(variants, args.rounds, E=e, T=t)
        del variants, ops, y, ys, out
        torch.cuda.empty_cache()
    print(f"\n{'E':>4} {'T':>5} {'variant':<24} us (rounds)")
    for e, t, v in dict.fromkeys((r["E"], r["T"], r["variant"]) for r in rows):
        us = [r["us"] for r in rows if (r["E"], r["T"], r["variant"]) == (e, t, v)]
        print(f"{e:>4} {t:>5} {v:<24} " + " / ".join(f"{u:.1f}" for u in us))
    out_file = Path(args.out) / "gpu_probe_gemm2_epilogue.json"
    out_file.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
