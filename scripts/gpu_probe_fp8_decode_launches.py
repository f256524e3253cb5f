"""Where the FP8 swap-AB decode layer's time goes against the read-streaming ceiling: the layer
and its launches timed alone, on a GPU.

At DeepSeek-V3 widths (H 7168, I 2048, top-8, balanced routing), for the swap-AB default and
``FUSED_DOWN`` (GEMM2 inside GEMM1's programs), each point's rows (µs; CUDA-graph replays of four
rotating input sets, ``do_bench`` median, L2 flushed: ``decode_breakdown.timed``):

* ``layer``: the whole call (``act_quant``, the GEMM launches, the cast);
* ``gemms``: the same call with ``act_quant`` and the cast taken out (their outputs computed
  before; the accumulator is then not zeroed, which changes no timing): the GEMM launches alone;
* ``act_quant``, ``cast``: each of those launches alone;
* ``stream``, ``stream_w13``, ``stream_w2``: one launch reading the active experts' weight bytes
  (``bench_ceilings.expert_stream``): all of them, GEMM1's only, GEMM2's only.

Prints a table; writes ``$OUT/gpu_probe_fp8_decode_launches.json`` (or ``--out``).

    python -P scripts/gpu_probe_fp8_decode_launches.py [--T 1 2] [--E 256 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_breakdown import timed  # noqa: E402

from moe_backend.cli.bench import INPUT_SETS, Layer, balanced_ids  # noqa: E402
from moe_backend.cli.bench_ceilings import expert_stream  # noqa: E402
from moe_backend.kernels.sm90 import fp8_moe, fp8_swapab  # noqa: E402
from moe_backend.kernels.sm90.act_quant import act_quant_fp8  # noqa: E402
from moe_backend.kernels.sm90.combine import cast_out  # noqa: E402
from moe_backend.runtime import workspace  # noqa: E402

H, I, TOP_K = 7168, 2048, 8
CONFIGS = {"default": fp8_moe.SWAPAB_CONFIG, "fused_down": fp8_moe.SWAPAB_FUSED_DOWN_CONFIG}


@contextlib.contextmanager
def gemms_only(quantized: Dict[int, tuple]) -> Iterator[None]:
    """``fused_experts_fp8`` without its ``act_quant`` launch (``quantized[data_ptr]`` stands in:
    the codes and scales of that hidden tensor) and without its cast launch."""
    saved = fp8_swapab.act_quant_fp8, fp8_moe.cast_out
    fp8_swapab.act_quant_fp8 = lambda hidden, *a, **kw: quantized[hidden.data_ptr()]
    fp8_moe.cast_out = lambda *a, **kw: None
    try:
        yield
    finally:
        fp8_swapab.act_quant_fp8, fp8_moe.cast_out = saved


def point(layer: Layer, t: int, dev: torch.device) -> Dict[str, float]:
    """Every row at ``t`` tokens on ``layer``'s FP8 block weights."""
    w = layer.weights["fp8_block"]()
    gen = torch.Generator().manual_seed(t)
    sets = [
        (
            torch.randn(t, H, device=dev).to(torch.bfloat16),
            balanced_ids(t, TOP_K, layer.e, gen, dev),
            torch.rand(t, TOP_K, generator=gen).to(dev),
        )
        for _ in range(INPUT_SETS)
    ]
    out = torch.empty(t, H, dtype=torch.bfloat16, device=dev)
    quantized = {s[0].data_ptr(): tuple(x.clone() for x in act_quant_fp8(s[0], None, False)) for s in sets}

    def call(cfg: Dict, s) -> Callable[[], object]:
        return lambda: fp8_moe.fused_experts_fp8(
            s[0],
            w.w13,
            w.w13_scale,
            w.w2,
            w.w2_scale,
            s[1],
            s[2],
            block_scaled=True,
            local_expert_offset=0,
            a13_scale=None,
            a2_scale=None,
            ue8m0=False,
            apply_router_weight_on_input=False,
            out=out,
            config=cfg,
        )

    row: Dict[str, float] = {}
    for name, cfg in CONFIGS.items():
        row[f"{name}_layer"] = timed([call(cfg, s) for s in sets])
        with gemms_only(quantized):
            row[f"{name}_gemms"] = timed([call(cfg, s) for s in sets])
    row["act_quant"] = timed([lambda s=s: act_quant_fp8(s[0], None, False) for s in sets])
    acc = workspace(t, H, torch.float32, dev, "probe_acc")
    row["cast"] = timed([lambda: cast_out(acc, out)])
    tiny = torch.zeros(layer.e, 1, 128, dtype=w.w2.dtype, device=dev)
    active = [torch.unique(s[1].flatten()).to(torch.int32) for s in sets]
    row["stream"] = timed([expert_stream(w.w13, w.w2, a) for a in active])
    row["stream_w13"] = timed([expert_stream(w.w13, tiny, a) for a in active])
    row["stream_w2"] = timed([expert_stream(w.w2, tiny, a) for a in active])
    return row


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--E", type=int, nargs="+", default=[256, 32])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    dev = torch.device("cuda")
    rows = []
    for e in args.E:
        layer = Layer(e, H, I, TOP_K, dev)
        for t in args.T:
            rows.append(dict(E=e, T=t, **point(layer, t, dev)))
    result = dict(device=torch.cuda.get_device_name(), rows=rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "gpu_probe_fp8_decode_launches.json", "w") as f:
        json.dump(result, f, indent=1)
    keys = [k for k in rows[0] if k not in ("E", "T")]
    print(result["device"])
    print("E T " + " ".join(keys))
    for r in rows:
        print(r["E"], r["T"], " ".join(f"{r[k]:.1f}" for k in keys))


if __name__ == "__main__":
    main()
