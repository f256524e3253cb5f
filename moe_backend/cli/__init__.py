"""The ``moe-backend`` command: demo, info, bench (each subcommand lives in its own module)."""

from __future__ import annotations

import argparse
import importlib
import logging
from typing import List, Optional

#: subcommand -> (module under moe_backend.cli, help). Modules are imported only when used.
SUBCOMMANDS = {
    "demo": ("demo", "run a DeepSeek-V3-shaped layer in every precision and report errors and times"),
    "info": ("info", "print the GPU, its capability, the kernels that can run and the versions"),
    "bench": ("bench", "benchmark one DeepSeek-V3 MoE layer over a T sweep against torch._scaled_grouped_mm"),
    "tune": ("tune", "tune the kernels of one layer shape for every token bucket up to --max-tokens"),
    "make-checkpoint": ("make_checkpoint", "write tiny DeepSeek-V3 checkpoints: bf16, FP8 block, ModelOpt FP8, NVFP4"),
    "accuracy": ("accuracy", "a DeepSeek-V3 model end to end: our MoE layers against transformers"),
    "compile-cute": ("compile_cute", "build every CuTe DSL kernel configuration (offline for sm_90a without a GPU)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-backend", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(f"moe_backend.cli.{module}").add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    module = importlib.import_module(f"moe_backend.cli.{SUBCOMMANDS[args.command][0]}")
    return module.main(args)
