"""Compile every Triton kernel specialization our launchers can launch, for sm_90a, with no GPU.

The torch wheels pin different Triton releases (torch 2.11: 3.6, 2.13: 3.7.1, 2.14 with
vLLM 0.33 / SGLang 0.5.23: 3.8), so CI builds every kernel under each of them; a kernel that
does not build, or needs more shared memory than an H100/H200 SM has, fails the check.

Approach (no signature is written by hand here):

1. *Capture.* The registry's kernels (``Kernel.prepare`` / ``Kernel.run``, the contract the
   layer calls) run on CPU tensors, without ``TRITON_INTERPRET``, for every configuration of
   their launchers (``DECODE_CONFIG``, ``PREFILL_CONFIG``, ``CANDIDATE_CONFIGS``,
   ``DETERMINISTIC_CONFIG``, ``NUMERICS_CONFIGS`` and the size heuristic; the CuTe DSL paths
   with their CuTe DSL GEMMs skipped, :func:`_grouped_path_offline`), every weight variant
   (FP8 block with and without ue8m0, FP8 per-tensor with dynamic and static activation
   scales, NVFP4; the router weight on the input where the registry allows it), DeepSeek-V3
   shapes and small odd ones, and token counts that reach every alignment path. Triton's
   own launch path (``JITFunction.run``: binder, argument specialization, options) runs as on a
   GPU, with a stand-in driver that reports an sm_90 device (:class:`OfflineDriver`); Triton's
   public ``knobs.runtime.jit_cache_hook``, called before each compilation, records the
   specialization (``specialization_data``, Triton's serialized form) and returns True, which
   tells Triton to skip compiling and launching. Sizes in the launchers never depend on
   data, so uninitialized tensors (``torch.empty``: never touched, so large shapes cost no
   memory) drive the same launches as real ones. The launchers choose their launch options as
   on a GPU (programmatic dependent launches where a configuration asks for them:
   ``interpret.pdl_available``), so the kernels built are those a GPU launches. Weight
   containers or launchers that refuse a combination (``ValueError``) are counted as refused:
   they can never launch it.
2. *Compile.* Triton also specializes on value facts of integer and pointer arguments
   (divisible by 16), which vary with the token count; of the specializations that differ
   only there, one is compiled per configuration (kernel, argument types, constexprs,
   options: :func:`distinct_configurations`): 1773 of 3834 under Triton 3.6 (2026-12-03).
   ``--one-per-code-path`` (CI) goes further: one build per code path (kernel, flag constexprs,
   tiles, pointer types, options: :func:`one_per_code_path`), at its widest scan and alignment
   widths (:data:`WIDTH_CONSTEXPRS`, which follow the token and expert counts), whatever
   integer values Triton specialized on: 553. Each is
   compiled with ``JITFunction.preload`` (Triton's API for compiling a serialized
   specialization) for ``GPUTarget("cuda", 90, 32)``
   (sm_90a, warp size 32) into a fresh cache, in worker processes; Triton's bundled ptxas
   assembles the cubin. Each kernel's shared memory is checked against the SM's limit
   (:data:`MAX_SHARED_BYTES`), which a GPU would otherwise only report at load time.

Usage: ``python scripts/compile_kernels.py [--jobs N] [--list] [--one-per-code-path]``; exit status 1 when a
kernel fails. Works with Triton 3.6, 3.7 and 3.8 (``PYTHONPATH=/path/to/triton-3.8 python ...``
runs it under another release installed with ``pip install --no-deps --target``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Tuple

logger = logging.getLogger("compile_kernels")

#: Opt-in shared memory per block of an H100/H200 SM (227 KiB).
MAX_SHARED_BYTES = 232448
#: sm_90: Hopper, compiled as sm_90a (Triton adds the ``a`` for capability 9.0).
CAPABILITY = 90
WARP_SIZE = 32


class OfflineDriver:
    """Stands in for Triton's CUDA driver: device 0 of capability sm_90 and its null stream.

    Only what Triton's launch path asks before compiling is answered; nothing launches.
    """

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", CAPABILITY, WARP_SIZE)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_active_torch_device(self) -> Any:
        import torch

        return torch.device("cpu")


def use_offline_driver() -> None:
    """Make Triton compile for sm_90a without a GPU (raises if the interpreter is on)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: unset it, the interpreter compiles nothing")
    from triton.runtime.driver import driver

    driver.set_active(OfflineDriver())


@dataclasses.dataclass(frozen=True)
class Shape:
    """A MoE layer as one rank sees it: ``E`` local experts of ``[2I, H]`` / ``[H, I]``, top-``k``."""

    name: str
    experts: int
    hidden: int
    inter: int
    top_k: int
    expert_offset: int


#: DeepSeek-V3 (H=7168, I=2048, 256 experts, top-8) tensor-parallel over 8 GPUs (all experts
#: local, I split 8 ways) and expert-parallel over 8 (32 local experts, ids of other ranks),
#: plus odd sizes: H not a multiple of 128 (partial K blocks), padding to the NVFP4 256 groups.
SHAPES = (
    Shape("deepseek_v3_tp8", 256, 7168, 256, 8, 0),
    Shape("deepseek_v3_ep8", 32, 7168, 2048, 8, 64),
    Shape("odd_128", 7, 640, 384, 3, 5),
    Shape("odd_16", 5, 656, 272, 3, 2),
)
#: Token counts: every power-of-two pair count of the single-program alignment (T * k from 3
#: to 1024), both vLLM scaling orders (T <= 64 and above), the multi-program alignment.
TOKEN_COUNTS = (1, 2, 3, 4, 8, 16, 32, 64, 65, 128, 129, 512)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kind of weights a registry kernel serves: its precision and how to build them."""

    name: str
    kernel: str
    make_weights: Callable[[Shape], Any]
    weight_on_input: bool


def _fp8_weights(shape: Shape, block: bool, **kw: Any) -> Any:
    import torch

    from moe_backend.expert_weights import FP8BlockWeights, FP8TensorWeights

    e, h, i = shape.experts, shape.hidden, shape.inter
    f8 = torch.float8_e4m3fn
    w13, w2 = torch.empty(e, 2 * i, h, dtype=f8), torch.empty(e, h, i, dtype=f8)
    # Valid scales (the containers refuse non-finite or non-positive ones); the codes stay uninitialized.
    if block:
        cdiv = lambda a, b: -(-a // b)  # noqa: E731
        return FP8BlockWeights(
            w13, torch.ones(e, cdiv(2 * i, 128), cdiv(h, 128)), w2, torch.ones(e, cdiv(h, 128), cdiv(i, 128)), **kw
        )
    return FP8TensorWeights(w13, torch.ones(e), w2, torch.ones(e), **kw)


def _nvfp4_weights(shape: Shape) -> Any:
    import torch

    from moe_backend.expert_weights import NVFP4Weights

    e, h, i = shape.experts, shape.hidden, shape.inter
    f8 = torch.float8_e4m3fn
    # Zero codes and scales: the layout conversion reads them (uninitialized e4m3 may be NaN).
    return NVFP4Weights(
        torch.zeros(e, 2 * i, h // 2, dtype=torch.uint8),
        torch.zeros(e, 2 * i, h // 16, dtype=f8),
        torch.ones(e, 2),
        torch.zeros(e, h, i // 2, dtype=torch.uint8),
        torch.zeros(e, h, i // 16, dtype=f8),
        torch.ones(e),
    )


def _static_scales() -> Dict[str, Any]:
    import torch

    return dict(a13_scale=torch.ones(1), a2_scale=torch.ones(1))


def variants() -> List[Variant]:
    """Every weight variant of every fused registry kernel; the router weight on the input only
    where the registry lets the kernel serve it."""
    from moe_backend.kernels.registry import SM90_FP8, SM90_NVFP4

    base = [
        Variant("fp8_block", SM90_FP8.name, lambda s: _fp8_weights(s, True), False),
        Variant("fp8_block_ue8m0", SM90_FP8.name, lambda s: _fp8_weights(s, True, ue8m0=True), False),
        Variant("fp8_tensor_dynamic", SM90_FP8.name, lambda s: _fp8_weights(s, False), False),
        Variant("fp8_tensor_static", SM90_FP8.name, lambda s: _fp8_weights(s, False, **_static_scales()), False),
        Variant("nvfp4", SM90_NVFP4.name, _nvfp4_weights, False),
    ]
    from moe_backend.kernels.registry import KERNELS

    with_input = [
        Variant(v.name + "_weight_on_input", v.kernel, v.make_weights, True)
        for v in base
        if KERNELS[v.kernel].weight_on_input_defect is None
    ]
    return base + with_input


def experimental_configs(kernel_name: str) -> List[dict]:
    """Configurations a kernel's launcher serves through ``config=`` that are not (yet) tuner
    candidates, awaiting their GPU check and timing: the FP8 swap-AB variants, the NVFP4 swap-AB
    path and the NVFP4 decode variants. They must compile all the same."""
    from moe_backend.kernels.registry import SM90_FP8, SM90_NVFP4
    from moe_backend.kernels.sm90.fp8_moe import SWAPAB_VARIANTS
    from moe_backend.kernels.sm90.nvfp4_moe import DECODE_VARIANTS, SWAPAB_CONFIG as NVFP4_SWAPAB

    if kernel_name == SM90_FP8.name:
        return list(SWAPAB_VARIANTS.values())
    return [NVFP4_SWAPAB, *DECODE_VARIANTS.values()] if kernel_name == SM90_NVFP4.name else []


def launcher_configs(kernel_name: str, experimental: bool = True) -> List[Optional[dict]]:
    """The configurations a kernel's launcher can be given: the size heuristic (None), every
    named one of its tuning space (the tuner's candidates, which include each path's base
    configuration, the deterministic one and those of the numerics modes) and its
    :func:`experimental_configs`."""
    from moe_backend.kernels.registry import KERNELS

    space = KERNELS[kernel_name].tuning_space()
    assert space is not None, f"{kernel_name} has no tuning space"
    configs: List[Optional[dict]] = [None, *space.candidates]
    if space.deterministic is not None:
        configs.append(space.deterministic)
    configs.extend(space.numerics.values())
    if experimental:
        configs.extend(experimental_configs(kernel_name))
    unique: List[Optional[dict]] = []
    for cfg in configs:
        if cfg not in unique:
            unique.append(cfg)
    return unique


@dataclasses.dataclass
class Capture:
    """What the launches asked Triton to compile, and what could not launch."""

    specializations: Dict[str, str]  # specialization_data -> kernel's full name
    launches: int = 0
    refused: int = 0


def _prepare(kernel: Any, variant: Variant, shape: Shape) -> Any:
    """``kernel.prepare`` of the variant's weights of ``shape``.

    A kernel with its own layout (``prepare`` returns another container) converts one expert
    (converting hundreds takes minutes of CPU); that container is then widened to the shape's
    experts with uninitialized tensors of the same per-expert shapes (contiguous, as prepared).
    """
    import torch

    one = variant.make_weights(dataclasses.replace(shape, experts=1))
    prepared = kernel.prepare(one)
    if type(prepared) is type(one):
        return kernel.prepare(variant.make_weights(shape))
    widened = {
        f.name: torch.empty((shape.experts, *v.shape[1:]), dtype=v.dtype)
        for f in dataclasses.fields(prepared)
        if isinstance(v := getattr(prepared, f.name), torch.Tensor)
    }
    return dataclasses.replace(prepared, **widened)


def _launch_all(capture: Capture, shapes: Tuple[Shape, ...], token_counts: Tuple[int, ...], experimental: bool) -> None:
    import torch

    from moe_backend.kernels.registry import KERNELS

    for shape in shapes:
        for variant in variants():
            kernel = KERNELS[variant.kernel]
            try:
                prepared = _prepare(kernel, variant, shape)
            except ValueError:  # the container refuses these sizes: no layer can have them
                capture.refused += 1
                continue
            for cfg in launcher_configs(variant.kernel, experimental):
                for t in token_counts:
                    hidden = torch.empty(t, shape.hidden, dtype=torch.bfloat16)
                    ids = torch.empty(t, shape.top_k, dtype=torch.int32)
                    weights = torch.empty(t, shape.top_k, dtype=torch.float32)
                    out = torch.empty(t, shape.hidden, dtype=torch.bfloat16)
                    try:
                        kernel.run(
                            prepared,
                            hidden,
                            ids,
                            weights,
                            local_expert_offset=shape.expert_offset,
                            apply_router_weight_on_input=variant.weight_on_input,
                            out=out,
                            config=cfg,
                        )
                        capture.launches += 1
                    except ValueError:  # e.g. vLLM numerics on weights they do not hold for
                        capture.refused += 1


def capture_specializations(
    shapes: Tuple[Shape, ...] = SHAPES, token_counts: Tuple[int, ...] = TOKEN_COUNTS, experimental: bool = True
) -> Capture:
    """Run every launch on CPU tensors; return each distinct specialization Triton would compile
    (``experimental``: also those of :func:`experimental_configs`)."""
    from triton import knobs

    use_offline_driver()
    capture = Capture({})

    def record(*, fn: Any, compile: Dict[str, Any], **_: Any) -> bool:
        data = compile["specialization_data"]
        capture.specializations.setdefault(data, json.loads(data)["name"])
        return True  # skip compiling and launching

    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = record
    try:
        with _grouped_path_offline(), _gpu_launch_options():
            _launch_all(capture, shapes, token_counts, experimental)
    finally:
        knobs.runtime.jit_cache_hook = previous
    return capture


@contextlib.contextmanager
def _patched(patches: List[Tuple[Any, str, Any]]) -> Iterator[None]:
    """``setattr(module, name, value)`` for each patch while the block runs, then restored."""
    saved = [getattr(module, name) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name, _), value in zip(patches, saved, strict=True):
            setattr(module, name, value)


def _gpu_launch_options() -> ContextManager[None]:
    """Let the launchers choose their launch options as on a GPU (programmatic dependent launches
    where a configuration asks for them), so that the kernels built are those a GPU launches."""
    from moe_backend.kernels.sm90 import fp8_moe, nvfp4_moe

    on_gpu = lambda tensor: True  # noqa: E731
    return _patched([(fp8_moe, "pdl_available", on_gpu), (nvfp4_moe, "pdl_available", on_gpu)])


def _grouped_path_offline() -> ContextManager[None]:
    """Let the launchers' CuTe DSL paths (FP8 ``cute_grouped``, NVFP4 ``bf16_grouped``) run on CPU
    tensors, their CuTe DSL GEMMs skipped (``moe-backend compile-cute`` builds those), so that
    the Triton kernels around them (quantize-and-scatter, SiLU-and-mul requantization, the
    kernel-layout NVFP4 dequantization, the pair combine) are captured too."""
    from moe_backend.kernels.sm90 import bf16_grouped, fp8_grouped_moe, fp8_moe, nvfp4_moe

    skipped = lambda *a, **kw: None  # noqa: E731
    return _patched(
        [
            (fp8_moe, "grouped_path_defect", skipped),
            (nvfp4_moe, "grouped_path_defect", skipped),
            (fp8_grouped_moe, "grouped_gemm_fp8_block", skipped),
            (bf16_grouped, "gemm1_gated", skipped),
            (bf16_grouped, "gemm2", skipped),
        ]
    )


def configuration_key(data: str) -> str:
    """A specialization without the divisibility hints Triton derives from integer and pointer
    values (kernel, argument types, constexprs, compile options): what a configuration is."""
    spec = json.loads(data)
    return json.dumps(
        [spec["name"], spec["signature"], spec["constant_keys"], spec["constant_vals"], spec["options"]], sort_keys=True
    )


def distinct_configurations(specializations: List[str]) -> List[str]:
    """One specialization per :func:`configuration_key`: the one with the most divisibility hints
    (the aligned sizes of real models; the hints only add alignment facts to the same code)."""
    best: Dict[str, str] = {}
    for data in sorted(specializations):
        key = configuration_key(data)
        if key not in best or len(json.loads(data)["attrs_keys"]) > len(json.loads(best[key])["attrs_keys"]):
            best[key] = data
    return sorted(best.values())


def _jit_function(full_name: str) -> Any:
    module, _, name = full_name.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _constants(spec: Dict[str, Any]) -> Dict[str, Any]:
    """A specialization's constants by parameter name: its constexprs and the integer arguments
    Triton specialized on their value (tuple members left out)."""
    names = list(spec["signature"])
    return {names[k[0]]: v for k, v in zip(spec["constant_keys"], spec["constant_vals"], strict=True) if len(k) == 1}


#: Constexprs that only size a kernel's register arrays: the swap-AB leader scan's ids (``PAIRS``),
#: the alignment's pads (``N_PAD``, ``E_PAD``). They follow the token count and expert count.
WIDTH_CONSTEXPRS = frozenset({"PAIRS", "N_PAD", "E_PAD"})
#: Triton's types of integer arguments: 32- or 64-bit by value, ``constexpr`` when the value is 1.
_INTEGER_TYPES = frozenset({"i1", "i8", "i16", "i32", "i64", "u1", "u8", "u16", "u32", "u64", "constexpr"})


def declared_constexprs(full_name: str) -> set:
    """The parameters a kernel declares ``tl.constexpr`` (Triton's own test: the annotation names
    ``constexpr``); an integer argument Triton specializes on its value 1 is not one of them."""
    fn = _jit_function(full_name).fn  # the Python function, compiled or interpreted
    return {name for name, p in inspect.signature(fn).parameters.items() if "constexpr" in str(p.annotation)}


def code_path_key(data: str) -> str:
    """What code a specialization is: the kernel, the types of its pointer and float arguments,
    the values of its declared constexprs but the :data:`WIDTH_CONSTEXPRS`, its compile options.
    Not the widths, nor Triton's specializations of integer argument values (1, 64-bit)."""
    spec = json.loads(data)
    declared = declared_constexprs(spec["name"])
    flags = {n: v for n, v in _constants(spec).items() if n in declared and n not in WIDTH_CONSTEXPRS}
    types = {n: t for n, t in spec["signature"].items() if n not in declared and t not in _INTEGER_TYPES}
    return json.dumps([spec["name"], types, flags, spec["options"]], sort_keys=True)


def one_per_code_path(specializations: List[str]) -> List[str]:
    """One specialization per :func:`code_path_key`: the widest (largest :data:`WIDTH_CONSTEXPRS`,
    the most registers). The others differ from it only in those widths and in integer values."""

    def widths(data: str) -> List[Tuple[str, int]]:
        return sorted((n, v) for n, v in _constants(json.loads(data)).items() if n in WIDTH_CONSTEXPRS)

    widest: Dict[str, str] = {}
    for data in sorted(specializations):
        key = code_path_key(data)
        if key not in widest or widths(data) > widths(widest[key]):
            widest[key] = data
    return sorted(widest.values())


def compile_specialization(data: str) -> Dict[str, Any]:
    """Compile one serialized specialization for sm_90a; ``{"name", "seconds", "shared", "error"}``."""
    use_offline_driver()
    name = json.loads(data)["name"]
    start = time.perf_counter()
    try:
        compiled = _jit_function(name).preload(data)
        shared = compiled.metadata.shared
        error = (
            None
            if shared <= MAX_SHARED_BYTES
            else (f"needs {shared} bytes of shared memory, an sm_90 block has {MAX_SHARED_BYTES}")
        )
    except Exception:  # any compiler failure is this kernel's result, reported with the others
        shared, error = None, traceback.format_exc(limit=4)
    return dict(name=name, seconds=time.perf_counter() - start, shared=shared, error=error, data=data)


def compile_all(specializations: List[str], jobs: int) -> Iterator[Dict[str, Any]]:
    """Compile each specialization in ``jobs`` worker processes; yield results as they finish.

    The GEMMs, the longest builds, are submitted first.
    """
    ordered = sorted(specializations, key=lambda data: "_gemm" not in json.loads(data)["name"])
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(compile_specialization, data) for data in ordered]
        for future in as_completed(futures):
            yield future.result()


def _describe(data: str) -> str:
    spec = json.loads(data)
    constants = _constants(spec)
    opts = spec["options"]
    cap = f" maxnreg={opts['maxnreg']}" if opts.get("maxnreg") else ""
    return (
        f"{spec['name'].rpartition('.')[2]} num_warps={opts.get('num_warps')} "
        f"num_stages={opts.get('num_stages')}{cap} {constants}"
    )


def _names_kernel(full_name: str, wanted: str) -> bool:
    """Whether ``wanted`` (a kernel's name, or the end of its dotted module path) names ``full_name``."""
    return full_name == wanted or full_name.endswith("." + wanted)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--list", action="store_true", help="list the configurations, compile nothing")
    parser.add_argument("--shapes", nargs="+", choices=[s.name for s in SHAPES], help="only these shapes")
    parser.add_argument("--tokens", nargs="+", type=int, help=f"token counts (default {TOKEN_COUNTS})")
    parser.add_argument(
        "--no-experimental",
        action="store_true",
        help="skip the configurations that are not tuner candidates yet (they are checked under the "
        "Triton of the GPU machine, where they are timed)",
    )
    parser.add_argument(
        "--kernels", nargs="+", help="only these kernels (e.g. _gemm1_kernel, or nvfp4_gemm1._gemm1_kernel)"
    )
    parser.add_argument(
        "--one-per-code-path",
        action="store_true",
        help="build each code path once, at its widest (what CI builds under each Triton): not every "
        "width of the scan and alignment registers, nor every integer value Triton specializes on",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import triton
    from tqdm import tqdm

    start = time.perf_counter()
    shapes = tuple(s for s in SHAPES if not args.shapes or s.name in args.shapes)
    capture = capture_specializations(shapes, tuple(args.tokens or TOKEN_COUNTS), not args.no_experimental)
    configurations = [
        data
        for data in distinct_configurations(list(capture.specializations))
        if not args.kernels or any(_names_kernel(json.loads(data)["name"], k) for k in args.kernels)
    ]
    specs = one_per_code_path(configurations) if args.one_per_code_path else configurations
    logger.info(
        "Triton %s: %d launches (%d refused combinations) ask for %d kernel specializations, "
        "%d distinct configurations%s (captured in %.1f s)",
        triton.__version__,
        capture.launches,
        capture.refused,
        len(capture.specializations),
        len(configurations),
        f", {len(specs)} code paths" if args.one_per_code_path else "",
        time.perf_counter() - start,
    )
    if args.list:
        for data in specs:
            print(_describe(data))
        return 0
    # A fresh cache: every kernel is compiled by this Triton now, none is read from an earlier run.
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        results = []
        for result in tqdm(compile_all(specs, args.jobs), total=len(specs), desc="compiling", unit="kernel"):
            results.append(result)
            if result["error"]:
                tqdm.write(f"FAILED {_describe(result['data'])}\n{result['error']}", file=sys.stderr)
    failures = [r for r in results if r["error"]]
    if failures:
        logger.error("FAILED: %s", ", ".join(_describe(r["data"]) for r in failures))
    slowest = max(results, key=lambda r: r["seconds"], default=None)
    logger.info(
        "Triton %s: %d of %d kernel specializations compiled for sm_90a in %.0f s%s",
        triton.__version__,
        len(results) - len(failures),
        len(results),
        time.perf_counter() - start,
        f" (slowest {slowest['seconds']:.1f} s: {_describe(slowest['data'])})" if slowest else "",
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
