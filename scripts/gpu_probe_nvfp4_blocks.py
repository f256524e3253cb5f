"""Does the NVFP4 decode stream its weights faster when each program's 256-K group is one
contiguous piece? In rows (the kernel layout up to KERNEL_VERSION 10, ``nvfp4_layout.rows_of_blocks``)
the decode GEMMs read, a group at a time, 128 bytes of words from each of a tile's 64 weight rows
(rows 3.5 KiB apart in ``w13``, 1 KiB in ``w2``); the row-blocked kernel layout
(``nvfp4_layout.row_blocked``) holds each 32-row block's group as 4 KiB of consecutive words (and
512 bytes of scale codes). Same kernels, same arithmetic: only the addresses differ.

On the H200, DeepSeek-V3 experts (H 7168, I 2048), balanced routing over E = 256 and 32, the
aligned decode path (``nvfp4_moe.DECODE_CONFIG``, and ``--configs`` more of its variants) timed
with the weights in rows and row-blocked: the layer (alignment + permutation, GEMM1, GEMM2, cast),
and at T=1 each GEMM alone. CUDA-graph replays rotating over ``--sets`` input sets, ``do_bench``
median, L2 flushed (``decode_breakdown.timed``), ``--rounds`` rounds alternated; the two forms'
outputs are compared (``rel_diff``: GEMM2's atomic adds may come in another order). Prints a
table; writes ``$OUT/gpu_probe_nvfp4_blocks.json``.

    python -P scripts/gpu_probe_nvfp4_blocks.py [--E 256 32] [--T 1 2 4 8 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_breakdown import timed  # noqa: E402

from moe_backend.cli.bench import balanced_ids, random_nvfp4_weights  # noqa: E402
from moe_backend.kernels.sm90.combine import cast_out  # noqa: E402
from moe_backend.kernels.sm90.nvfp4_act import align_and_permute  # noqa: E402
from moe_backend.kernels.sm90.nvfp4_gemm1 import gemm1_nvfp4  # noqa: E402
from moe_backend.kernels.sm90.nvfp4_gemm2 import gemm2_nvfp4  # noqa: E402
from moe_backend.kernels.sm90.nvfp4_layout import (  # noqa: E402
    ROW_BLOCK,
    NVFP4KernelWeights,
    nvfp4_to_kernel_layout,
    rows_of_blocks,
)
from moe_backend.kernels.sm90.nvfp4_moe import DECODE_CONFIG, DECODE_VARIANTS, gemm_launch_args  # noqa: E402

H, INTER, TOP_K = 7168, 2048, 8
#: (GEMM1 words, codes, GEMM2 words, codes) of one form
Form = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def forms(w: NVFP4KernelWeights) -> Dict[str, Form]:
    """The weights in rows and row-blocked (as prepared)."""
    w13_rows = rows_of_blocks(w.w13, w.w13_scale, w.w13.shape[1] * ROW_BLOCK)
    return {
        "rows": (*w13_rows, *rows_of_blocks(w.w2, w.w2_scale, w.hidden_size)),
        "blocked": (w.w13, w.w13_scale, w.w2, w.w2_scale),
    }


def decode_calls(
    w: NVFP4KernelWeights, form: Form, inputs, cfg: Dict
) -> Tuple[Callable[[], torch.Tensor], Callable[[], None], Callable[[], None]]:
    """The aligned decode path of ``fused_experts_nvfp4`` on ``form``'s tensors (layer, GEMM1
    alone, GEMM2 alone), for one input set ``(hidden, ids, topk_weights)``."""
    w13, s13, w2, s2 = form
    hidden, ids, tw = inputs
    t, k = ids.shape
    e = w.num_experts
    routing, x = align_and_permute(ids, e, 0, cfg["BLOCK_M"], hidden, w.padded_hidden)
    x = x.clone()
    acc = torch.zeros(t, H, dtype=torch.float32, device=hidden.device)
    out = torch.empty(t, H, dtype=torch.bfloat16, device=hidden.device)
    pdl = bool(cfg["PDL"])
    common = dict(num_pairs=t * k, top_k=k, weight_on_input=False, pdl=pdl)
    g1, g2 = gemm_launch_args(cfg)
    g1.update(common)
    g2.update(common)
    y = gemm1_nvfp4(x, w13, s13, w.w13_scale_2, routing, tw, acc, **g1).clone()

    def layer() -> torch.Tensor:
        r, xp = align_and_permute(ids, e, 0, cfg["BLOCK_M"], hidden, w.padded_hidden)
        yy = gemm1_nvfp4(xp, w13, s13, w.w13_scale_2, r, tw, acc, **g1)
        gemm2_nvfp4(yy, w2, s2, w.w2_scale_2, r, tw, acc, **g2)
        cast_out(acc, out, pdl=pdl)
        return out

    def gemm1() -> None:
        gemm1_nvfp4(x, w13, s13, w.w13_scale_2, routing, tw, acc, **g1)

    def gemm2() -> None:
        gemm2_nvfp4(y, w2, s2, w.w2_scale_2, routing, tw, acc, **g2)

    return layer, gemm1, gemm2


def probe_point(w: NVFP4KernelWeights, fs: Dict[str, Form], t: int, args, cfg_name: str, cfg: Dict) -> List[Dict]:
    dev = w.w13.device
    gen = torch.Generator().manual_seed(t)
    sets = [
        (torch.randn(t, H, device=dev).to(torch.bfloat16), balanced_ids(t, TOP_K, w.num_experts, gen, dev),
         torch.rand(t, TOP_K, device=dev) + 0.1)
        for _ in range(args.sets)
    ]  # fmt: skip
    calls = {name: [decode_calls(w, f, s, cfg) for s in sets] for name, f in fs.items()}
    outs = {name: c[0][0]().float() for name, c in calls.items()}
    rel_diff = ((outs["blocked"] - outs["rows"]).norm() / outs["rows"].norm()).item()
    rows = []
    for r in range(args.rounds):
        for name, c in calls.items():
            row = dict(E=w.num_experts, T=t, config=cfg_name, form=name, round=r, rel_diff=rel_diff)
            row["layer_us"] = timed([x[0] for x in c])
            if t == 1:
                row["gemm1_us"] = timed([x[1] for x in c])
                row["gemm2_us"] = timed([x[2] for x in c])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--E", type=int, nargs="+", default=[256, 32])
    p.add_argument("--T", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--configs", nargs="*", default=[], choices=sorted(DECODE_VARIANTS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sets", type=int, default=4)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    dev = torch.device("cuda")
    configs = {"default": DECODE_CONFIG, **{n: DECODE_VARIANTS[n] for n in args.configs}}
    results: List[Dict] = []
    for e in args.E:
        torch.manual_seed(e)
        w = nvfp4_to_kernel_layout(random_nvfp4_weights(e, H, INTER, dev))
        fs = forms(w)
        for cfg_name, cfg in configs.items():
            for t in args.T:
                results += probe_point(w, fs, t, args, cfg_name, cfg)
        del w, fs
        torch.cuda.empty_cache()
    out = Path(args.out) / "gpu_probe_nvfp4_blocks.json"
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), results=results), indent=1))
    print(
        f"\n{'E':>4} {'T':>3} {'config':<14} {'rows us':>9} {'blocked us':>11} {'ratio':>6}  gemm1 / gemm2 (T=1)  equal"
    )
    keys = sorted({(r["E"], r["T"], r["config"]) for r in results}, key=lambda k: (-k[0], k[2], k[1]))
    for key in keys:
        pick = {
            f: [r for r in results if (r["E"], r["T"], r["config"], r["form"]) == (*key, f)]
            for f in ("rows", "blocked")
        }
        mean = {f: sum(r["layer_us"] for r in v) / len(v) for f, v in pick.items()}
        extra = ""
        if key[1] == 1:
            g = {f: [sum(r[n] for r in v) / len(v) for n in ("gemm1_us", "gemm2_us")] for f, v in pick.items()}
            extra = f"{g['rows'][0]:.1f}->{g['blocked'][0]:.1f} / {g['rows'][1]:.1f}->{g['blocked'][1]:.1f}"
        print(
            f"{key[0]:>4} {key[1]:>3} {key[2]:<14} {mean['rows']:>9.1f} {mean['blocked']:>11.1f} "
            f"{mean['blocked'] / mean['rows']:>6.3f}  {extra:<22} {pick['rows'][0]['rel_diff']:.1e}"
        )


if __name__ == "__main__":
    main()
