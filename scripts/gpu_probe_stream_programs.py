"""Does the read stream of the FP8 T=1 decode layer's bytes depend on how many programs read them?

The FP8 swap-AB ``FUSED_DOWN`` launch at T=1, E=256 runs 128 programs (8 experts x 16 column
slices) on the card's 132 SMs. This probe reads the same 8 experts' bytes (w13 and w2 of
DeepSeek-V3 width, FP8: 44 MB an expert) in one launch of ``P`` persistent programs, program ``p``
a contiguous ``1/P`` of them, for several ``P``, beside the bench's ceiling kernel
(``bench_ceilings.expert_stream``, many short programs). Timing as ``decode_breakdown.timed``
(CUDA-graph replays of four rotating buffers, ``do_bench`` median, L2 flushed).

    python -P scripts/gpu_probe_stream_programs.py [--out DIR]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_breakdown import timed  # noqa: E402

from moe_backend.cli.bench_ceilings import expert_stream  # noqa: E402

H, I, EXPERTS = 7168, 2048, 8
#: int32 words a load of a program (8 KB)
BLOCK = 2048


@triton.jit
def _persistent_read(src_ptr, words, share, out_ptr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    """Program ``p`` XORs words ``[p * share, (p + 1) * share)`` of ``src`` (CHUNKS loads in flight)."""
    p = tl.program_id(0)
    start = p.to(tl.int64) * share
    end = tl.minimum(start + share, words)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for base in range(start, end, BLOCK * CHUNKS):
        for c in tl.static_range(CHUNKS):
            offs = base + c * BLOCK + tl.arange(0, BLOCK)
            acc ^= tl.load(src_ptr + offs, mask=offs < end, other=0)
    tl.store(out_ptr + p, tl.xor_sum(acc, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    expert_words = (2 * I * H + H * I) // 4
    bufs = [
        torch.randint(-(2**31), 2**31 - 1, (EXPERTS, expert_words), dtype=torch.int32, device=dev) for _ in range(4)
    ]
    words = EXPERTS * expert_words
    rows = {}
    experts = torch.arange(EXPERTS, dtype=torch.int32, device=dev)
    rows["ceiling (expert_stream)"] = timed(
        [expert_stream(b[:, : 2 * I * H // 4], b[:, 2 * I * H // 4 :], experts) for b in bufs]
    )
    out = torch.empty(8 * sms, dtype=torch.int32, device=dev)
    for programs in (128, sms, 2 * 128, 2 * sms):
        for chunks in (8, 16):
            # a multiple of the loop's step: every program's loads stay 16-byte aligned
            share = triton.cdiv(triton.cdiv(words, programs), BLOCK * chunks) * BLOCK * chunks

            def call(b, programs=programs, share=share, chunks=chunks):
                return lambda: _persistent_read[(programs,)](
                    b, words, share, out, BLOCK=BLOCK, CHUNKS=chunks, num_warps=8
                )

            rows[f"persistent P={programs} chunks={chunks}"] = timed([call(b) for b in bufs])
    result = {"device": torch.cuda.get_device_name(dev), "sms": sms, "bytes": words * 4, "us": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_probe_stream_programs.json").write_text(json.dumps(result, indent=1))
    print(result["device"], sms, "SMs,", words * 4 / 1e6, "MB")
    for name, us in rows.items():
        print(f"{name:32s} {us:8.1f} us {words * 4 / us / 1e3:7.0f} GB/s")


if __name__ == "__main__":
    main()
