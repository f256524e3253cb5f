"""``moe-backend make-checkpoint``: write small DeepSeek-V3 checkpoints (bf16, FP8 block, ModelOpt FP8, NVFP4).

Every flavour goes to ``OUT/<flavour>`` (``bf16``, ``fp8``, ``fp8_tensor``, ``nvfp4``) from the same seeded
weights; see :mod:`moe_backend.weights.checkpoint_maker` for what each holds. Sizes start
from ``--size`` (tiny: runs through transformers on a CPU in a second; medium: ~0.8 GB in
bf16, for memory measurements) and any ``config.json`` size field can be overridden.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..weights.checkpoint_maker import CHECKPOINT_FORMATS, MEDIUM, TINY, ModelShape, make_checkpoints

SIZES = {"tiny": TINY, "medium": MEDIUM}
#: ModelShape fields settable from the command line (``--hidden-size`` for ``hidden_size``, ...).
_OVERRIDES = {f.name: f.type for f in dataclasses.fields(ModelShape) if f.type in ("int", "float")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, help="directory to write <flavour>/ checkpoints into")
    parser.add_argument(
        "--formats",
        nargs="+",
        choices=tuple(CHECKPOINT_FORMATS),
        default=list(CHECKPOINT_FORMATS),
        help="flavours to write (default: all)",
    )
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny", help="preset sizes (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights")
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="module pattern the quantized flavours leave in bf16 (repeatable), e.g. 'model.layers.2.mlp.experts'",
    )
    sizes = parser.add_argument_group("size overrides (config.json fields)")
    for name, kind in _OVERRIDES.items():
        sizes.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=int if kind == "int" else float, default=None, metavar="N"
        )


def main(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in _OVERRIDES if getattr(args, name) is not None}
    shape = dataclasses.replace(SIZES[args.size], **overrides)
    dirs = make_checkpoints(args.out_dir, shape, args.formats, seed=args.seed, extra_exclusions=args.exclude)
    for flavour, path in dirs.items():
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"{flavour:<10} {path}  ({size / 1e6:.1f} MB)")
    return 0
