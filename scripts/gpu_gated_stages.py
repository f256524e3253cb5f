"""Where the gated GEMM1's time goes (H200, E=32 T=8192, DeepSeek-V3 widths): the plain fp32
GEMM1 alone (one CTA, cluster), the gated kernel, the gated kernel with its epilogue dropped (the
promoted sums kept alive by one store, so the mainloop stays whole), and with the up half's WGMMAs
dropped. Each of ``fp8_grouped.GATED_TILES``; ``--rounds`` rounds alternated (the card's power
state drifts). CUDA-graph replays, do_bench median, L2 flushed. Diagnosis only: the variants'
outputs are not checked. Prints a table; writes ``$OUT/gpu_gated_stages.json`` (or ``--out``).

    python scripts/gpu_gated_stages.py [--rounds 2] [--out DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Dict

import cutlass
import cutlass.cute as cute
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check_gated as cases  # noqa: E402

from moe_backend.kernels.sm90 import fp8_gated_kernel, fp8_grouped  # noqa: E402
from moe_backend.quant.fp8 import BLOCK, FP8_DTYPE  # noqa: E402

Gated = fp8_gated_kernel.Fp8GatedGemm1Sm90


class NoEpilogue(Gated):
    """The gated kernel without its epilogue: all promoted sums summed into one store."""

    @cute.jit
    def epi_visit_acc(self, params, acc, tiled_mma, tile_coord_mnkl, tidx):
        total = cutlass.Float32(0.0)
        for i in cutlass.range_constexpr(cute.size(acc)):
            total = total + acc[i]
        self._outputs[1][0, 0] = total


class GateHalfOnly(Gated):
    """The gated kernel issuing each K tile's gate-half WGMMAs only (B still loaded whole)."""

    @cute.jit
    def _half_wgmma(self, tiled_mma, wave, t_ra, t_rb, stage, half: cutlass.Constexpr[int]):
        if cutlass.const_expr(half == 0):
            Gated._half_wgmma(self, tiled_mma, wave, t_ra, t_rb, stage, half)


def gated_runner(cls, tile, dev, call: Callable[[], object]) -> Callable[[], object]:
    """Compile ``cls`` for ``tile`` and return ``call`` run with that plan in place."""
    key = fp8_grouped.PlanKey(tile, 2 * cases.INTER, cases.H, fp8_grouped._device_name(dev), FP8_DTYPE)
    fp8_gated_kernel.Fp8GatedGemm1Sm90 = cls
    fp8_grouped._compile.cache_clear()
    fp8_grouped._PLANS.pop(key, None)
    plan = fp8_grouped._plan(key, dev)
    fp8_gated_kernel.Fp8GatedGemm1Sm90 = Gated

    def run():
        fp8_grouped._PLANS[key] = plan
        return call()

    return run


def main() -> None:
    args = cases.parse_args(__doc__)
    dev = torch.device("cuda")
    a, a_scale, w13, w13_scale, cu = cases.operands(32, 8192, dev)
    m = a.shape[0]
    gate_up = torch.empty(m, 2 * cases.INTER, device=dev)
    y = torch.empty(m, cases.INTER, dtype=FP8_DTYPE, device=dev)
    ys = torch.empty(m, cases.INTER // BLOCK, device=dev)
    fp8_grouped.compile_plans(2 * cases.INTER, cases.H, cases.PLAIN_TILES, dev, torch.float32)
    variants: Dict[str, Callable[[], object]] = {
        f"plain {t} fp32 GEMM1 alone": (
            lambda t=t: fp8_grouped.grouped_gemm_fp8_block(a, a_scale, w13, w13_scale, cu, gate_up, tile=t)
        )
        for t in cases.PLAIN_TILES
    }
    for name, cls in (("gated", Gated), ("gated, no epilogue", NoEpilogue), ("gated, gate half only", GateHalfOnly)):
        for t in fp8_grouped.GATED_TILES:
            call = lambda t=t: fp8_grouped.gated_gemm1_fp8_block(a, a_scale, w13, w13_scale, cu, y, ys, tile=t)  # noqa: E731
            variants[f"{name} {t}"] = gated_runner(cls, t, dev, call)
    rows = cases.time_rounds(variants, args.rounds)
    out = Path(args.out) / "gpu_gated_stages.json"
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), E=32, T=8192, results=rows), indent=1))
    for name in variants:
        print(f"{name:<64} " + " / ".join(f"{x['us']:.1f}" for x in rows if x["variant"] == name))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
