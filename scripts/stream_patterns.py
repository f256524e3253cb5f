"""What do the decode GEMMs' access pattern and their split into two launches cost? (one GPU call)

Read-only Triton streams over 8 experts x [4096, 7168] bytes (235 MB, T=1 GEMM1's weight bytes of
a DeepSeek-V3 layer): each program reads ROWS rows in K steps of BK bytes, 4 pipeline stages,
either from the row-major matrix (each row's BK bytes 7168 bytes from the next row's, as the
decode GEMMs read their tiles) or from a blocked layout where each step's tile is contiguous.
The bench's read ceiling kernel (``bench_ceilings.expert_stream``) over the same bytes is the
reference. ``do_bench`` medians, L2 flushed. Prints TB/s.

Then the split: T=1's whole weight stream (8 experts' w13 [4096, 7168] and w2 [7168, 2048] bytes,
352 MB) read by one ``expert_stream`` launch, against w13 and w2 read by two launches one after
the other (as GEMM1 and GEMM2 run), each captured in a CUDA graph: µs. The difference is what
two dependent launches cost a pure stream, the most a single-launch decode layer could recover.
Writes ``stream_patterns.json``.

    python scripts/stream_patterns.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from moe_backend.cli.bench_ceilings import expert_stream

E, N, K = 8, 4096, 7168


@triton.jit
def _tiles(w_ptr, out_ptr, K, ROWS: tl.constexpr, BK: tl.constexpr, BLOCKED: tl.constexpr):
    words = w_ptr.to(tl.pointer_type(tl.int32)) + tl.program_id(0).to(tl.int64) * ROWS * (K // 4)
    acc = tl.zeros([ROWS, BK // 4], dtype=tl.int32)
    if BLOCKED:  # [K / BK, ROWS, BK] per program: each step's tile is contiguous
        offs = tl.arange(0, ROWS)[:, None] * (BK // 4) + tl.arange(0, BK // 4)[None, :]
        for k in tl.range(0, K // BK, num_stages=4):
            acc ^= tl.load(words + k * ROWS * (BK // 4) + offs)
    else:  # row-major [ROWS, K]
        offs = tl.arange(0, ROWS)[:, None] * (K // 4) + tl.arange(0, BK // 4)[None, :]
        for k in tl.range(0, K // BK, num_stages=4):
            acc ^= tl.load(words + k * (BK // 4) + offs)
    tl.store(out_ptr + tl.program_id(0), tl.sum(tl.sum(acc, 1), 0))


def split_us(w13: torch.Tensor) -> dict:
    """µs of one launch over w13 and w2 against two launches (w13, then w2), CUDA graphs."""
    w2 = torch.randint(-128, 127, (E, K, 2048), dtype=torch.int8, device=w13.device)
    experts = torch.arange(E, dtype=torch.int32, device=w13.device)
    runs = {
        "split_one_launch_us": [expert_stream(w13, w2, experts)],
        "split_two_launches_us": [expert_stream(w13, w13[:, :1], experts), expert_stream(w2, w2[:, :1], experts)],
        "split_w13_alone_us": [expert_stream(w13, w13[:, :1], experts)],
        "split_w2_alone_us": [expert_stream(w2, w2[:, :1], experts)],
    }
    out = {}
    for name, launches in runs.items():
        for launch in launches:
            launch()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for launch in launches:
                launch()
        out[name] = round(do_bench(graph.replay, warmup=20, rep=100, return_mode="median") * 1e3, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("stream_patterns: needs a CUDA GPU")
    dev = torch.device("cuda")
    w = torch.randint(-128, 127, (E * N, K), dtype=torch.int8, device=dev)
    res = {}
    for rows in (64, 128, 256):
        for bk in (128, 256, 512):
            if rows * bk > 65536:  # the int32 accumulator tile would spill
                continue
            out = torch.empty(E * N // rows, dtype=torch.int32, device=dev)
            for blocked in (False, True):
                for warps in (4, 8):
                    name = f"r{rows}_bk{bk}_{'blocked' if blocked else 'rowmajor'}_w{warps}"
                    ms = do_bench(
                        lambda: _tiles[(E * N // rows,)](w, out, K, ROWS=rows, BK=bk, BLOCKED=blocked, num_warps=warps),  # noqa: B023
                        warmup=20,
                        rep=100,
                        return_mode="median",
                    )
                    res[name] = round(w.numel() / ms / 1e9, 3)
    wv = w.view(E, N, K)
    ceiling = expert_stream(wv, wv[:, :1], torch.arange(E, dtype=torch.int32, device=dev))
    res["ceiling_stream_kernel"] = round(
        w.numel() / do_bench(ceiling, warmup=20, rep=100, return_mode="median") / 1e9, 3
    )
    res.update(split_us(w.view(E, N, K)))
    print(json.dumps(res, indent=0))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "stream_patterns.json", "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), unit="TB/s", results=res), f, indent=1)


if __name__ == "__main__":
    main()
