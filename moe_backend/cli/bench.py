"""``moe-backend bench``: latency of one DeepSeek-V3 MoE layer vs T, with ceilings and peers.

For each E, T and precision it times our layer's engine-level call
(:meth:`MoELayer.experts`, i.e. the kernel the selection table picks) and, in the same
run and the same way, ``torch._scaled_grouped_mm`` (rowwise FP8 both GEMMs, SiLU-and-mul
between, torch permutation around them) and, with ``--peers vllm``, vLLM's own kernels on the
same weights (:mod:`.bench_peers`: its Triton fused MoE for FP8 block, its Marlin MoE for
NVFP4). Every implementation is captured in CUDA graphs per input set and replayed with
``triton.testing.do_bench`` (median, L2 flushed before every call), rotating several input
sets; at each point every implementation (and the ceiling's stream) is timed twice, all in
order and then in reverse order, and its time is the mean of the two
(:func:`time_in_both_orders`). Routing is balanced by default: token t takes experts
``perm[(t * k + j) % E]`` (a random permutation per set); ``--routing random`` draws each
token's experts uniformly instead, so that the pairs per expert vary as in served traffic.

Ceilings come from this run (:mod:`.bench_ceilings`): at each point a read-only kernel
streams exactly the active experts' FP8 weight bytes in one launch (``stream_us``; NVFP4's
0.5625 bytes a weight and bf16's 2 scale it), and the compute floor uses the dense FP8 / bf16 GEMM
throughput measured at start. ``ceiling_us = max(stream, compute)``. Beside them, at each point
and in the same two passes, cuBLAS runs the layer's MMA work as two dense GEMMs in the
precision's MMA format (``dense_us``, :func:`.bench_ceilings.dense_gemms`): the compute at the
clocks the card holds while the layer runs (a bound where the layer is compute-bound; at decode
sizes the dense GEMMs read one matrix pair, not the active experts' weights). The table prints
each implementation's ratio to the ceiling and to the dense GEMMs, and our speed-up over the peers.

Writes ``<output-dir>/<device>-<date>.json`` (``{"device", "date", "peaks", "vllm", "command",
"versions", "records": [...]}``; a record holds ``device, precision, impl, E, T, topk, hidden, inter,
median_us, passes_us, timing, dense_us, stream_us, compute_floor_us, ceiling_us``) and, when matplotlib is
installed, a PNG of latency vs T.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import math
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..expert_weights import BF16Weights, ExpertWeights, FP8BlockWeights, FP8TensorWeights, NVFP4Weights
from ..kernels.registry import KERNELS
from ..kernels.sm90 import fp8_moe, nvfp4_moe
from ..layer import LAYER_TYPES, MoEConfig
from ..runtime import DEFAULT_POOL
from .bench_ceilings import DENSE_KINDS, dense_gemms, expert_stream, measure_peaks
from .bench_peers import vllm_peers, vllm_version

logger = logging.getLogger(__name__)

#: Weight bytes per element and the measured peak (``bench_ceilings.measure_peaks`` key) its
#: MMA runs at, per precision (NVFP4 is W4A16 on Hopper: bf16 MMA).
PRECISION_COST = {
    "fp8_block": (1.0, "fp8_tflops"),
    "fp8_tensor": (1.0, "fp8_tflops"),
    "nvfp4": (0.5625, "bf16_tflops"),
    "bf16": (2.0, "bf16_tflops"),
}
PEERS = ("vllm",)
DEFAULT_T = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
QUICK_T = (1, 16, 128, 1024, 8192)
PRECISIONS = tuple(PRECISION_COST)
#: What a plain ``moe-backend bench`` times: bf16 layers (twice FP8's weights) only when asked for.
DEFAULT_PRECISIONS = ("fp8_block", "fp8_tensor", "nvfp4")
INPUT_SETS = 4
#: Variants of our kernels (``--variants``): name -> (precision, configuration override; None:
#: the kernel's deterministic configuration). The runtime variants of the FP8 block kernel
#: (deterministic mode, zeroing of the atomic combine) and the decode candidates not yet
#: selected by default (swap-AB variants, the NVFP4 swap-AB path). A variant that refuses
#: a batch (swap-AB above ``tiles.MAX_GATHER_PAIRS`` pairs) is recorded without a time.
VARIANTS: Dict[str, Tuple[str, Optional[Dict[str, Any]]]] = {
    "deterministic": ("fp8_block", None),
    "zero_fused": ("fp8_block", {"COMBINE": "atomic", "ZERO": "fused"}),
    # the swap-AB default's per-expert wait counts GEMM1's zeroing: the other modes wait for the grid
    "zero_sync": ("fp8_block", {"COMBINE": "atomic", "ZERO": "sync", "WAIT2": "grid"}),
    "zero_stream": ("fp8_block", {"COMBINE": "atomic", "ZERO": "stream", "WAIT2": "grid"}),
    # swap-AB wherever it serves (up to tiles.MAX_GATHER_PAIRS pairs), past where the default takes it,
    # in two GEMM launches (the default's below SWAPAB_FUSED_DOWN_MAX_PAIRS pairs runs one)
    "swapab": ("fp8_block", fp8_moe.SWAPAB_CONFIG),
    **{f"swapab_{name}": ("fp8_block", cfg) for name, cfg in fp8_moe.SWAPAB_VARIANTS.items()},
    "swapab_one_block": ("fp8_block", fp8_moe.SWAPAB_ONE_BLOCK_CONFIG),
    # the fused down loop with and without its w2 prefetch wherever it serves (the default takes the
    # prefetch up to SWAPAB_DOWN_PREFETCH_MAX_PAIRS pairs)
    "swapab_fused_down": ("fp8_block", fp8_moe.SWAPAB_FUSED_DOWN_CONFIG),
    "swapab_fused_down_w2_prefetch4": ("fp8_block", fp8_moe.SWAPAB_FUSED_DOWN_PREFETCH_CONFIG),
    "swapab_stages4": ("fp8_block", fp8_moe.SWAPAB_STAGES4_CONFIG),
    # the aligned tiers the heuristic took before the swap-AB path (up to one row an expert, then up
    # to 16): the kernels the decode work must not lose to from T=32 up, timed in the same run
    "aligned_decode": ("fp8_block", fp8_moe.DECODE_CONFIG),
    "aligned_skinny": ("fp8_block", fp8_moe.SKINNY_CONFIG),
    "nvfp4_swapab": ("nvfp4", nvfp4_moe.SWAPAB_CONFIG),
    **{f"nvfp4_decode_{name}": ("nvfp4", cfg) for name, cfg in nvfp4_moe.DECODE_VARIANTS.items()},
    # the decode tiling with and without PDL wherever it serves (the default takes PDL up to
    # nvfp4_moe.DECODE_PDL_MAX_PAIRS pairs)
    "nvfp4_decode_pdl": ("nvfp4", nvfp4_moe.DECODE_PDL_CONFIG),
    "nvfp4_decode_no_pdl": ("nvfp4", nvfp4_moe.DECODE_CONFIG),
    # prefill: the Triton kernels' largest tiles and the CuTe DSL grouped GEMMs, whichever the default takes
    "prefill": ("fp8_block", fp8_moe.PREFILL_CONFIG),
    "cute_grouped": ("fp8_block", fp8_moe.CUTE_GROUPED_CONFIG),
    "nvfp4_prefill": ("nvfp4", nvfp4_moe.PREFILL_CONFIG),
    "nvfp4_bf16_grouped": ("nvfp4", nvfp4_moe.GROUPED_CONFIG),
    # the one-CTA tiles the default takes below GROUPED_CLUSTER_MIN_ROWS rows an expert
    "cute_grouped_overlap2": ("fp8_block", fp8_moe.cute_grouped_config(tile2=fp8_moe.GROUPED_OVERLAP_TILE)),
    # both GEMMs on the cluster tile (GEMM1 plain, then silu_mul_quant): the default from 256 rows an
    # expert before the gated GEMM1 took over there
    "cute_cluster": (
        "fp8_block",
        fp8_moe.cute_grouped_config(fp8_moe.GROUPED_CLUSTER_TILE, fp8_moe.GROUPED_CLUSTER_TILE),
    ),
    # GEMM1 with SiLU-and-mul and the requantization in its epilogue, GEMM2 on the 128-wide cluster
    # tile: the default from GATED_MIN_ROWS rows an expert where H is not a multiple of 256
    "cute_gated": ("fp8_block", fp8_moe.cute_grouped_config(fp8_moe.GATED_CLUSTER_TILE, fp8_moe.GROUPED_CLUSTER_TILE)),
    # the same with GEMM2 on the wide (128 x 256) cluster tile: the default there where H is a
    # multiple of 256
    "cute_gated_wide2": (
        "fp8_block",
        fp8_moe.cute_grouped_config(fp8_moe.GATED_CLUSTER_TILE, fp8_moe.WIDE_CLUSTER_TILE),
    ),
    "cute_gated_1cta": ("fp8_block", fp8_moe.cute_grouped_config(fp8_moe.GATED_TILE, fp8_moe.GROUPED_CLUSTER_TILE)),
}
#: The registry kernel each precision's variants run on.
VARIANT_KERNELS = {"fp8_block": "sm90_triton_fp8", "nvfp4": "sm90_triton_nvfp4"}
FP8 = torch.float8_e4m3fn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``moe-backend bench``."""
    parser.add_argument("--E", type=int, nargs="+", default=[256, 32], help="local experts (default 256 32)")
    parser.add_argument("--T", type=int, nargs="+", default=None, help="token counts (default 1..8192)")
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=PRECISIONS,
        default=list(DEFAULT_PRECISIONS),
        help=f"default {' '.join(DEFAULT_PRECISIONS)}",
    )
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument(
        "--routing",
        choices=sorted(ROUTINGS),
        default="balanced",
        help="balanced: every local expert gets T*k/E pairs (default); random: each token's experts "
        "drawn uniformly, so the pairs an expert gets vary as in served traffic",
    )
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--output-dir", default=os.path.join("docs", "results"))
    parser.add_argument("--quick", action="store_true", help=f"T in {QUICK_T}, fewer repetitions")
    parser.add_argument("--no-baseline", action="store_true", help="skip torch._scaled_grouped_mm")
    parser.add_argument(
        "--peers",
        nargs="+",
        choices=PEERS,
        default=[],
        help="also time these engines' own MoE kernels on the same weights (vllm: its "
        "Triton fused MoE for fp8_block and bf16, its Marlin MoE for nvfp4)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        default=[],
        help="also time our kernels in these variants: fp8_block runtime variants (deterministic "
        "mode, zeroing of the atomic combine: fused in GEMM1, sync memset, auxiliary stream) and "
        "decode candidates not selected by default (swapab_*, nvfp4_swapab)",
    )


# ----------------------------------------------------------------------------- inputs
def random_nvfp4_weights(e: int, h: int, i: int, device: torch.device) -> NVFP4Weights:
    """Random NVFP4 experts of roughly unit output scale, in the checkpoint layout."""

    def codes(n: int, k: int) -> torch.Tensor:
        return torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, device=device)

    def scales(n: int, k: int) -> torch.Tensor:
        return (torch.rand(e, n, k // 16, device=device) * 447 + 1).to(FP8)

    return NVFP4Weights(
        codes(2 * i, h),
        scales(2 * i, h),
        torch.full((e, 2), 1.0 / (448 * 6 * math.sqrt(h)), device=device),
        codes(h, i),
        scales(h, i),
        torch.full((e,), 1.0 / (448 * 6 * math.sqrt(i)), device=device),
    )


def random_bf16_weights(e: int, h: int, i: int, device: torch.device) -> BF16Weights:
    """Random bf16 experts of roughly unit output scale (std ``H**-0.5`` and ``I**-0.5``), built
    one expert at a time (no fp32 copy of the whole layer)."""
    w13 = torch.empty(e, 2 * i, h, dtype=torch.bfloat16, device=device)
    w2 = torch.empty(e, h, i, dtype=torch.bfloat16, device=device)
    for x in range(e):
        w13[x].normal_(0, h**-0.5)
        w2[x].normal_(0, i**-0.5)
    return BF16Weights(w13, w2)


def _random_fp8(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Random e4m3 values of unit scale, built one expert at a time (no fp32 copy of it all)."""
    out = torch.empty(*shape, dtype=FP8, device=device)
    for e in range(shape[0]):
        out[e] = (torch.randn(*shape[1:], device=device, dtype=torch.bfloat16) * 16).to(FP8)
    return out


def balanced_ids(t: int, k: int, e: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``[T, k]`` int32: token t takes experts ``perm[(t*k + j) % E]``; every expert gets T*k/E."""
    perm = torch.randperm(e, generator=gen)
    flat = (torch.arange(t)[:, None] * k + torch.arange(k)[None, :]) % e
    return perm[flat].to(torch.int32).to(device)


def random_ids(t: int, k: int, e: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``[T, k]`` int32: each token's k distinct experts drawn uniformly (``k <= E``). The pairs an
    expert gets vary around T*k/E as in served traffic: at E=32 T=48 (12 on average) 7% of the
    experts get more than 16, a second swap-AB chunk; at T=64 (16) 43%."""
    return torch.rand(t, e, generator=gen).argsort(dim=1)[:, :k].to(torch.int32).to(device)


#: ``--routing``: how the bench's tokens pick their experts.
ROUTINGS = {"balanced": balanced_ids, "random": random_ids}


class Layer:
    """Random weights of one layer: FP8 (unit-scale e4m3, shared by both FP8 precisions and the
    baseline), NVFP4 (uniform codes, block scales in [1, 448)) and bf16 (normal, built on first
    use: the largest), on the device."""

    def __init__(self, e: int, h: int, i: int, top_k: int, device: torch.device):
        self.e, self.h, self.i = e, h, i
        self.config = MoEConfig(num_experts=e, top_k=top_k)
        self.w13 = _random_fp8((e, 2 * i, h), device)
        self.w2 = _random_fp8((e, h, i), device)
        s13, s2 = 1.0 / (16 * math.sqrt(h)), 1.0 / (16 * math.sqrt(i))
        self.weights: Dict[str, Callable[[], ExpertWeights]] = {
            "fp8_block": lambda: FP8BlockWeights(
                self.w13,
                torch.full((e, 2 * i // 128, h // 128), s13, device=device),
                self.w2,
                torch.full((e, h // 128, i // 128), s2, device=device),
            ),
            "fp8_tensor": lambda: FP8TensorWeights(
                self.w13,
                torch.full((e,), s13, device=device),
                self.w2,
                torch.full((e,), s2, device=device),
                a13_scale=torch.full((1,), 4.0 / 448, device=device),
                a2_scale=torch.full((1,), 2.0 / 448, device=device),
            ),
            "nvfp4": lambda: random_nvfp4_weights(e, h, i, device),
            "bf16": functools.cache(lambda: random_bf16_weights(e, h, i, device)),
        }
        # Rowwise scales of the baseline ([E, N]).
        self.w13_row_scale = torch.full((e, 2 * i), s13, device=device)
        self.w2_row_scale = torch.full((e, h), s2, device=device)

    def ours(self, precision: str) -> Callable[..., torch.Tensor]:
        """The engine-level call of a layer of ``precision`` on these weights."""
        layer = LAYER_TYPES[precision](self.weights[precision](), self.config)
        logger.info("%s E=%d: kernel %s", precision, self.e, layer.kernel_name(True))
        return lambda hidden, ids, weights, out: layer.experts(hidden, ids, weights, out=out)

    def variant(self, name: str) -> Callable[..., torch.Tensor]:
        """Our kernel for the variant's precision under the variant's configuration (see
        :data:`VARIANTS`)."""
        precision, override = VARIANTS[name]
        kernel = KERNELS[VARIANT_KERNELS[precision]]
        config = override if override is not None else kernel.deterministic_config()
        prepared = kernel.prepare(self.weights[precision]())

        def run(hidden, ids, topk_weights, out):
            return kernel.run(
                prepared,
                hidden,
                ids,
                topk_weights,
                local_expert_offset=0,
                apply_router_weight_on_input=False,
                out=out,
                config=config,
            )

        return run

    def baseline(
        self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """``torch._scaled_grouped_mm`` layer: permute, rowwise FP8 GEMM1, SiLU-and-mul, GEMM2, combine.

        Groups are padded to 16 rows (the grouped GEMM's alignment); no host sync.
        """
        t, k = ids.shape
        flat = ids.flatten().long()
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(self.e, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        padded = (counts + 15) // 16 * 16
        ends = torch.cumsum(padded, 0)
        e_sorted = flat[order]
        dest = (
            (ends - padded)[e_sorted]
            + torch.arange(flat.numel(), device=flat.device)
            - (torch.cumsum(counts, 0) - counts)[e_sorted]
        )
        rows = flat.numel() + min(flat.numel(), self.e) * 15
        xq, xs = _rowwise_quant(hidden)
        a = torch.zeros(rows, self.h, dtype=FP8, device=hidden.device)
        a_s = torch.ones(rows, dtype=torch.float32, device=hidden.device)
        a[dest] = xq[order // k]
        a_s[dest] = xs[order // k]
        offs = ends.to(torch.int32)
        gu = torch._scaled_grouped_mm(
            a, self.w13.transpose(1, 2), a_s, self.w13_row_scale, offs=offs, out_dtype=torch.bfloat16
        )
        act = torch.nn.functional.silu(gu[:, : self.i]) * gu[:, self.i :]
        aq, as_ = _rowwise_quant(act)
        y = torch._scaled_grouped_mm(
            aq, self.w2.transpose(1, 2), as_, self.w2_row_scale, offs=offs, out_dtype=torch.bfloat16
        )
        row_of_pair = torch.empty_like(dest)
        row_of_pair[order] = dest
        out[:t] = torch.bmm(weights.to(torch.bfloat16)[:, None, :], y[row_of_pair].view(t, k, self.h))[:, 0]
        return out[:t]


def _rowwise_quant(x: torch.Tensor):
    s = x.float().abs().amax(dim=1).clamp_min(1e-10) / 448.0
    return (x.float() / s[:, None]).clamp(-448, 448).to(FP8), s


# ----------------------------------------------------------------------------- timing
def _time(fn: Callable[[int], object], quick: bool) -> Tuple[float, str]:
    """Median microseconds of ``fn(i)`` over rotating input sets i, L2 flushed before each call.

    Each set's call is captured in a CUDA graph and replayed, as engines run the layer (eager
    timing at small T measures Python and launch overhead, not the kernels); when capture
    fails the calls run eagerly. Returns the time and ``"cuda_graph"`` or ``"eager"``.
    """
    import triton.testing

    for s in range(INPUT_SETS):
        fn(s)  # compile and warm up outside any capture
    torch.cuda.synchronize()
    calls: List[Callable[[], object]]
    try:
        graphs = []
        for s in range(INPUT_SETS):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn(s)
            graphs.append(graph)
        calls, mode = [g.replay for g in graphs], "cuda_graph"
    except RuntimeError as exc:
        logger.warning("CUDA-graph capture failed (%s): timing eager launches", exc)
        calls, mode = [functools.partial(fn, s) for s in range(INPUT_SETS)], "eager"
    state = {"i": 0}

    def call():
        calls[state["i"] % INPUT_SETS]()
        state["i"] += 1

    rep = 40 if quick else 100
    return triton.testing.do_bench(call, warmup=10, rep=rep, return_mode="median") * 1e3, mode


Timed = Tuple[Optional[float], Optional[str], List[float]]


def _point_timer(
    run: Callable[..., object], sets: Sequence[tuple], out: Optional[torch.Tensor], quick: bool
) -> Callable[[], Tuple[float, str]]:
    """A call that times ``run(*sets[s], out)`` (``run(*sets[s])`` without ``out``) over the input
    sets ``s`` with :func:`_time`."""
    extra = () if out is None else (out,)
    return functools.partial(_time, lambda s: run(*sets[s], *extra), quick)


def time_in_both_orders(runs: Dict[Any, Callable[[], Tuple[float, str]]], where: str = "") -> Dict[Any, Timed]:
    """Time every run twice, all in order and then all in reverse order; each run's time is the
    mean of its two medians. A drift of the GPU's speed over the point (clocks, temperature) then
    weighs on every implementation alike, wherever it stands in the order: on the H200,
    identical configurations timed one after the other differed by 5-10% within a run.

    ``runs`` maps a key to a call returning ``(median µs, timing mode)``; a call that raises
    RuntimeError or ValueError (an unsupported build, a variant refusing the batch) is logged and
    recorded as ``(None, None, [])`` and not timed again (the log names ``where``). Returns
    ``key -> (µs, mode, [first pass µs, second pass µs])``.
    """
    passes: Dict[Any, List[float]] = {key: [] for key in runs}
    modes: Dict[Any, Optional[str]] = {}
    failed = set()
    for order in (list(runs), list(reversed(list(runs)))):
        for key in order:
            if key in failed:
                continue
            try:
                us, modes[key] = runs[key]()
            except (RuntimeError, ValueError) as exc:
                logger.warning("%s failed%s: %s", key, where, exc)
                failed.add(key)
                continue
            passes[key].append(us)
    return {
        key: (None, None, []) if key in failed else (sum(times) / len(times), modes[key], times)
        for key, times in passes.items()
    }


def compute_floor_us(t: int, k: int, h: int, i: int, precision: str, peaks: Dict[str, float]) -> float:
    """The layer's MMA work at the measured dense peak of ``precision``'s MMA (µs)."""
    return 2 * t * k * 3 * h * i / (peaks[PRECISION_COST[precision][1]] * 1e12) * 1e6


def ceiling_fields(
    stream_us: float, t: int, k: int, h: int, i: int, precision: str, peaks: Dict[str, float]
) -> Dict[str, float]:
    """``stream_us`` (reading the active experts' FP8 bytes, scaled to ``precision``'s bytes),
    the compute floor and their maximum, the ceiling no implementation can beat."""
    stream = stream_us * PRECISION_COST[precision][0]
    compute = compute_floor_us(t, k, h, i, precision, peaks)
    return {"stream_us": stream, "compute_floor_us": compute, "ceiling_us": max(stream, compute)}


def _device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_bench(
    args: argparse.Namespace,
    device: torch.device,
    peaks: Dict[str, float],
    on_point: Optional[Callable[[List[dict]], None]] = None,
) -> List[dict]:
    """Time every (E, T, implementation); return the records.

    ``on_point(records)`` runs after each (E, T) with the records so far (the partial results
    file: a run stopped by a time limit keeps what it measured).
    """
    ts = args.T or (QUICK_T if args.quick else DEFAULT_T)
    name = torch.cuda.get_device_name(device)
    records: List[dict] = []
    for e in args.E:
        layer = Layer(e, args.hidden, args.inter, args.topk, device)
        runs = {(precision, "moe_backend"): layer.ours(precision) for precision in args.precision}
        runs.update({(VARIANTS[v][0], f"moe_backend[{v}]"): layer.variant(v) for v in args.variants})
        if "vllm" in args.peers:
            for precision, (impl, run) in vllm_peers(layer.weights, args.precision).items():
                runs[(precision, impl)] = run
        if not args.no_baseline:
            runs[("fp8_rowwise", "torch_scaled_grouped_mm")] = layer.baseline
        for t in ts:
            gen = torch.Generator().manual_seed(t)
            sets = [
                (
                    torch.randn(t, args.hidden, device=device).to(torch.bfloat16),
                    ROUTINGS[args.routing](t, args.topk, e, gen, device),
                    torch.rand(t, args.topk, generator=gen).to(device),
                )
                for _ in range(INPUT_SETS)
            ]
            out = torch.empty(t, args.hidden, dtype=torch.bfloat16, device=device)
            streams = [expert_stream(layer.w13, layer.w2, torch.unique(ids).to(torch.int32)) for _, ids, _ in sets]
            calls: Dict[Any, Callable[[], Tuple[float, str]]] = {
                ("stream", "ceiling"): _point_timer(lambda stream: stream(), [(s,) for s in streams], None, args.quick)
            }
            for kind in sorted({DENSE_KINDS[p] for p in args.precision}):
                dense = dense_gemms(kind, t * args.topk, args.hidden, args.inter, device)
                # its operands are its own: the same call for every input set
                calls[("dense", kind)] = _point_timer(lambda run: run(), [(dense,)] * INPUT_SETS, None, args.quick)
            calls.update({key: _point_timer(run, sets, out, args.quick) for key, run in runs.items()})
            timed = time_in_both_orders(calls, f" at E={e} T={t}")
            stream_us = timed.pop(("stream", "ceiling"))[0]
            if stream_us is None:
                raise RuntimeError(f"the read-stream ceiling kernel failed at E={e} T={t}")
            dense_us = {key[1]: timed.pop(key)[0] for key in list(timed) if key[0] == "dense"}
            base = dict(device=name, E=e, T=t, topk=args.topk, hidden=args.hidden, inter=args.inter)
            for (precision, impl), (us, mode, passes) in timed.items():
                fmt = "fp8_block" if precision == "fp8_rowwise" else precision
                records.append(
                    dict(
                        base,
                        precision=precision,
                        impl=impl,
                        median_us=us,
                        passes_us=passes,
                        timing=mode,
                        dense_us=dense_us.get(DENSE_KINDS[fmt]),
                        **ceiling_fields(stream_us, t, args.topk, args.hidden, args.inter, fmt, peaks),
                    )
                )
            logger.info("E=%d T=%d done", e, t)
            if on_point is not None:
                on_point(records)
    return records


def format_table(records: List[dict]) -> str:
    """One row per (E, T, precision) of ours: time, the ceiling and our fraction of it, the dense
    GEMMs' time as a fraction of ours, and the speed-up over each peer timed at that point
    (``peer us / ours us``: > 1 is faster)."""
    ours = [r for r in records if r["impl"].startswith("moe_backend")]
    others = sorted({r["impl"] for r in records if not r["impl"].startswith("moe_backend")})
    by_key = {(r["E"], r["T"], r["precision"], r["impl"]): r["median_us"] for r in records}
    head = f"{'E':>4} {'T':>5} {'precision':<22} {'ours us':>9} {'ceiling':>8} {'ceil/ours':>9} {'dense/ours':>10}"
    head += "".join(f" {impl + ' x':>{max(10, len(impl) + 2)}}" for impl in others)
    lines = [head]
    for r in ours:
        name = r["precision"] + r["impl"][len("moe_backend") :]
        us = r["median_us"]
        fraction = f"{r['ceiling_us'] / us:.2f}" if us else "-"
        dense = f"{r['dense_us'] / us:.2f}" if us and r.get("dense_us") else "-"
        row = f"{r['E']:>4} {r['T']:>5} {name:<22} {_fmt(us):>9} {r['ceiling_us']:>8.1f} {fraction:>9} {dense:>10}"
        for impl in others:
            peer = by_key.get((r["E"], r["T"], r["precision"], impl))
            if peer is None and impl == "torch_scaled_grouped_mm" and r["precision"].startswith("fp8"):
                peer = by_key.get((r["E"], r["T"], "fp8_rowwise", impl))
            row += f" {(f'{peer / us:.2f}' if peer and us else '-'):>{max(10, len(impl) + 2)}}"
        lines.append(row)
    return "\n".join(lines)


def _fmt(us: Optional[float]) -> str:
    return f"{us:.1f}" if us is not None else "failed"


def plot(records: List[dict], path: str) -> Optional[str]:
    """Latency vs T per E with each weight format's ceiling; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot")
        return None
    experts = sorted({r["E"] for r in records})
    fig, axes = plt.subplots(1, len(experts), figsize=(6 * len(experts), 4.5), squeeze=False)
    for ax, e in zip(axes[0], experts, strict=True):
        rs = [r for r in records if r["E"] == e]
        for key in sorted({(r["impl"], r["precision"]) for r in rs}):
            pts = [
                (r["T"], r["median_us"])
                for r in rs
                if (r["impl"], r["precision"]) == key and r["median_us"] is not None
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{key[0]} ({key[1]})")
        for fmt, style in (("fp8_block", "k--"), ("nvfp4", "k:"), ("bf16", "y--")):
            ceilings = sorted(
                {(r["T"], r["ceiling_us"]) for r in rs if r["impl"] == "moe_backend" and r["precision"] == fmt}
            )
            if ceilings:
                ax.plot(*zip(*ceilings, strict=True), style, label=f"{fmt} ceiling (this run)")
        dense = sorted(
            {
                (r["T"], r["dense_us"])
                for r in rs
                if r["impl"] == "moe_backend" and r["precision"] == "fp8_block" and r.get("dense_us")
            }
        )
        if dense:
            ax.plot(*zip(*dense, strict=True), "k-.", label="fp8_block MMA work as dense cuBLAS GEMMs (this run)")
        ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="µs", title=f"E={e}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def write_results(path: str, header: Dict[str, Any], records: List[dict]) -> None:
    """``header`` plus ``records`` as JSON at ``path``, replaced whole (never a half-written file)."""
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(dict(header, records=records), f, indent=1)
    os.replace(partial, path)


def run_header(
    args: argparse.Namespace, device_name: str, peaks: Dict[str, float], vllm: Optional[str]
) -> Dict[str, Any]:
    """What the results file records besides its points: device, date, the peaks measured in the
    run, the vLLM version timed (or None), the options the run had (``command``: every option,
    defaults included) and the versions of the packages that built the kernels timed."""
    import triton

    from .. import __version__
    from ..kernels.sm90.cute_env import installed_versions

    return {
        "device": device_name,
        "date": datetime.date.today().isoformat(),
        "peaks": peaks,
        "vllm": vllm,
        "command": {
            k: v for k, v in sorted(vars(args).items()) if isinstance(v, (bool, int, float, str, list, type(None)))
        },
        "versions": {
            "moe_backend": __version__,
            "torch": torch.__version__,
            "triton": triton.__version__,
            **installed_versions(),
        },
    }


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; 2 without a CUDA GPU."""
    if not torch.cuda.is_available():
        print("moe-backend bench: needs a CUDA GPU (torch.cuda.is_available() is False)")
        return 2
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    version = vllm_version() if "vllm" in args.peers else None
    if "vllm" in args.peers and version is None:
        print("moe-backend bench: --peers vllm needs vllm importable in this environment")
        return 2
    peaks = measure_peaks(device)
    print(
        f"device {name}: read {peaks['read_gbs']:.0f} GB/s, copy {peaks['copy_gbs']:.0f} GB/s (read + written), "
        f"FP8 GEMM {peaks['fp8_tflops']:.0f} TFLOP/s, bf16 GEMM {peaks['bf16_tflops']:.0f} TFLOP/s"
        + (f"; vLLM {version}" if "vllm" in args.peers else "")
    )
    os.makedirs(args.output_dir, exist_ok=True)
    stem = os.path.join(args.output_dir, f"{_device_slug(name)}-{datetime.date.today().isoformat()}")
    header = run_header(args, name, peaks, version)
    records = run_bench(args, device, peaks, lambda done: write_results(stem + ".json", header, done))
    print(format_table(records))
    print(
        f"shared workspace pool after the sweep: {DEFAULT_POOL.nbytes() / 2**20:.0f} MiB "
        f"(one set of buffers for every layer of a model)"
    )
    write_results(stem + ".json", header, records)
    png = plot(records, stem + ".png")
    print(f"wrote {stem}.json" + (f" and {png}" if png else ""))
    return 0
