"""``moe-backend tune``: tune one layer shape for every bucket up to the engine's max tokens.

Builds a layer of the requested precision and shape with seeded weights (only the
shape matters to the tuner), runs :meth:`MoELayer.warmup` with a progress bar,
and prints the summary (bucket, best configuration, its time, the default's time,
the speedup). Results land in the persistent cache that engines' warm-ups read.
"""

from __future__ import annotations

import argparse
import time

import torch

from ..layer import LAYER_TYPES, MoEConfig
from ..routing import RoutingConfig
from ..tuning import TuningCache


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-tokens", type=int, required=True, help="the engine's max batched tokens (vLLM max_num_batched_tokens)"
    )
    parser.add_argument("--precision", choices=sorted(LAYER_TYPES), default="fp8_block")
    parser.add_argument("--experts", type=int, default=256, help="global experts")
    parser.add_argument("--local-experts", type=int, default=None, help="experts on this EP rank (default: all)")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--inter", type=int, default=2048, help="intermediate size per TP shard")
    parser.add_argument("--cache-dir", default=None, help="tuning cache directory (default: the user's cache)")
    parser.add_argument("--force", action="store_true", help="re-time buckets already in the cache")


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("moe-backend tune: needs a CUDA GPU (the tuner times kernels on the device)")
        return 2
    local = args.local_experts or args.experts
    if not 1 <= local <= args.experts:
        raise SystemExit(f"--local-experts: expected 1..{args.experts}, got {local}")
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    w13 = torch.randn(local, 2 * args.inter, args.hidden, generator=gen, device=device) / args.hidden**0.5
    w2 = torch.randn(local, args.hidden, args.inter, generator=gen, device=device) / args.inter**0.5
    config = MoEConfig(num_experts=args.experts, top_k=args.top_k, routing=RoutingConfig("softmax"))
    layer = LAYER_TYPES[args.precision].from_float(w13, w2, config)
    del w13, w2
    started = time.perf_counter()
    results = layer.warmup(args.max_tokens, cache=TuningCache(args.cache_dir), force=args.force)
    if not results:
        print(f"moe-backend tune: the {args.precision} kernel here ({layer.kernel_name(True)}) is not tunable")
        return 2
    for name, result in results.items():
        print(f"{name}: {args.precision} E={local}/{args.experts} k={args.top_k} H={args.hidden} I={args.inter}")
        print(result.summary())
    print(f"warm-up took {time.perf_counter() - started:.1f} s (max tokens {args.max_tokens})")
    return 0
