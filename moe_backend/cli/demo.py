"""``moe-backend demo``: a DeepSeek-V3-shaped MoE layer in every precision, both entry points.

Builds seeded float master weights in memory, quantizes them into each
precision, runs computed routing (``forward``) and packed routed top-k
(``forward_routed``), and reports for each row:

* ``err vs fp64``: the output against the float64 MoE on the unquantized master
  weights: what the format costs, information only;
* ``format alone``: the bound that cost is read against: the same quantization of
  weights and activations computed without the kernel (the torch reference with
  fp32 products and no bf16 rounding of the output) against that float64 MoE. The
  output's error exceeds it by at most the kernel's own error and the bf16 output
  rounding (~2e-3); on Gaussian weights it is ~4e-3 (bf16), ~6.4e-2 (FP8) and
  ~1.7e-1 (NVFP4), since ``silu(gate) * up`` adds the errors of two quantized GEMMs;
* ``err vs ref``: the kernel against the torch reference with the same quantized
  weights and activation numerics: the pass/fail check (``<= KERNEL_TOLERANCE``).
  Where the reference itself serves the row (a CPU, or bf16, which has no fused
  kernel) there is no kernel to check and the row says so.

On a CPU the Triton kernels could run under the interpreter, but at the demo's size one
call took 30 s (FP8) to 3 min (NVFP4) on a busy 2-core machine, so the demo runs the
reference only and says so (``tests/kernels/`` run the kernels under the interpreter).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ..kernels.reference import exact_fused_experts, reference_fused_experts
from ..layer import LAYER_TYPES, MoEConfig, MoELayer
from ..routing import RoutingConfig, pack_topk, unpack_topk

logger = logging.getLogger(__name__)

#: Largest relative error of a kernel against the reference with the same numerics.
KERNEL_TOLERANCE = 1e-2
#: The kernel name of rows served by the torch reference (nothing to check there).
REFERENCE = "reference"


@dataclass(frozen=True)
class DemoShape:
    """Layer and batch sizes; ``small`` runs in seconds on a CPU, ``full`` is DeepSeek-V3."""

    num_experts: int
    top_k: int
    hidden: int
    inter: int
    tokens: int
    n_group: int = 8
    topk_group: int = 4


SMALL = DemoShape(num_experts=32, top_k=8, hidden=512, inter=256, tokens=32)
FULL = DemoShape(num_experts=256, top_k=8, hidden=7168, inter=2048, tokens=256)


@dataclass
class DemoRow:
    """One (precision, entry point): relative errors (see the module doc) and the time per call.

    ``kernel_err`` is None when the reference served the row (no kernel to check).
    """

    precision: str
    entry: str
    kernel: str
    format_err: float
    format_cost: float
    kernel_err: Optional[float]
    ms_per_call: float

    @property
    def kernel_ok(self) -> bool:
        return self.kernel_err is None or self.kernel_err <= KERNEL_TOLERANCE

    @property
    def status(self) -> str:
        if self.kernel_err is None:
            return "reference only"
        return "ok" if self.kernel_ok else "KERNEL WRONG"


def _time_ms(fn: Callable[[], torch.Tensor], device: torch.device, iters: int) -> float:
    fn()  # warm-up: kernel compilation and weight preparation stay out of the number
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3 / iters


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def run_demo(shape: DemoShape, device: torch.device, seed: int = 0, iters: int = 3) -> List[DemoRow]:
    """Run every precision through both entry points; return one row per (precision, entry)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    e, h, i, t = shape.num_experts, shape.hidden, shape.inter, shape.tokens
    w13 = (torch.randn(e, 2 * i, h, generator=gen) / h**0.5).to(device)
    w2 = (torch.randn(e, h, i, generator=gen) / i**0.5).to(device)
    hidden = torch.randn(t, h, generator=gen).to(device, torch.bfloat16)
    logits = torch.randn(t, e, generator=gen).to(device)
    bias = (0.1 * torch.randn(e, generator=gen)).to(device)
    routing = RoutingConfig.deepseek_v3(shape.n_group, shape.topk_group, routed_scaling_factor=2.5)
    config = MoEConfig(num_experts=e, top_k=shape.top_k, routing=routing)

    ids, weights = routing.select(logits, shape.top_k, bias)
    packed = pack_topk(ids, weights)
    truth = {
        "forward": exact_fused_experts(hidden, w13, w2, ids, weights),
        # the packed format carries bf16 router weights: compare with the same weights
        "forward_routed": exact_fused_experts(hidden, w13, w2, *unpack_topk(packed)),
    }
    rows = []
    for precision, layer_type in LAYER_TYPES.items():
        layer: MoELayer = layer_type.from_float(w13, w2, config, correction_bias=bias)
        calls = {
            "forward": lambda layer=layer: layer.forward(hidden, logits),
            "forward_routed": lambda layer=layer: layer.forward_routed(hidden, packed),
        }
        topk = {"forward": (ids, weights), "forward_routed": unpack_topk(packed)}
        for entry, call in calls.items():
            out = call()
            kernel = layer.kernel_name(entry == "forward_routed")
            # float64 hidden: the reference's output stays unrounded (the format's cost alone)
            unrounded = reference_fused_experts(hidden.double(), layer.weights, *topk[entry])
            same_numerics = reference_fused_experts(hidden, layer.weights, *topk[entry]).double()
            rows.append(
                DemoRow(
                    precision,
                    entry,
                    kernel,
                    _rel_err(out, truth[entry]),
                    _rel_err(unrounded, truth[entry]),
                    None if kernel == REFERENCE else _rel_err(out, same_numerics),
                    _time_ms(call, device, iters),
                )
            )
            logger.info("%s %s: %s", precision, entry, rows[-1])
        # One quantized copy of the experts at a time: at --full sizes each is 6-23 GB.
        del layer, calls, call
    return rows


def format_table(rows: List[DemoRow]) -> str:
    """The rows as a table, with a footer that says what each column means and what ran."""
    header = (
        f"{'precision':<11} {'entry point':<15} {'kernel':<18} {'err vs fp64':>11} {'format alone':>12} "
        f"{'err vs ref':>10} {'ms/call':>9}  status"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        kernel_err = "-" if r.kernel_err is None else f"{r.kernel_err:.1e}"
        lines.append(
            f"{r.precision:<11} {r.entry:<15} {r.kernel:<18} {r.format_err:>11.3e} "
            f"{r.format_cost:>12.3e} {kernel_err:>10} {r.ms_per_call:>9.2f}  {r.status}"
        )
    lines.append(
        "err vs fp64: the output against float64 on the unquantized master weights (what the format "
        "costs: information); format alone: the same quantization computed exactly, the bound that "
        "cost is read against (the output adds bf16 rounding, ~2e-3, and the kernel's error)"
    )
    lines.append(
        f"err vs ref: the kernel against the torch reference with the same quantization "
        f"(pass: <= {KERNEL_TOLERANCE:.0e})"
    )
    by_reference = list(dict.fromkeys(r.precision for r in rows if r.kernel_err is None))
    if all(r.kernel_err is None for r in rows):
        lines.append(
            "only the torch reference runs on this machine (the Triton kernels need an sm_90 GPU): "
            "no kernel was checked"
        )
    elif by_reference:
        lines.append(f"the torch reference serves {', '.join(by_reference)} (no fused kernel): nothing to check")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--full", action="store_true", help="DeepSeek-V3 sizes (H 7168, I 2048, 256 experts, top-8); meant for a GPU"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--tokens", type=int, default=None, help="batch size T (default 32, or 256 with --full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iters", type=int, default=3, help="timed calls per row")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = FULL if args.full else SMALL
    if args.tokens is not None:
        if args.tokens < 1:
            raise SystemExit(f"--tokens: expected a positive int, got {args.tokens}")
        shape = DemoShape(shape.num_experts, shape.top_k, shape.hidden, shape.inter, args.tokens)
    print(
        f"DeepSeek-V3-shaped MoE layer on {device}: E={shape.num_experts} top-{shape.top_k} "
        f"H={shape.hidden} I={shape.inter} T={shape.tokens}"
    )
    rows = run_demo(shape, device, args.seed, args.iters)
    print(format_table(rows))
    return 0 if all(r.kernel_ok for r in rows) else 1
