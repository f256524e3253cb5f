"""``moe-backend info``: the device, its capability, the kernels that can run, and versions."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
from typing import Dict, Optional, Tuple

import torch

from .. import __version__
from ..kernels.registry import available_kernels

_PACKAGES = (
    "torch",
    "triton",
    "safetensors",
    "numpy",
    "flashinfer-python",
    "vllm",
    "sglang",
    "nvidia-cutlass-dsl",
    "quack-kernels",
)


def versions() -> Dict[str, str]:
    """Installed versions of the packages that matter here ('-' when absent)."""
    found = {"python": platform.python_version(), "moe_backend": __version__}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "-"
    found["cuda (torch)"] = torch.version.cuda or "-"
    return found


def cute_paths(device: torch.device) -> Dict[Tuple[str, str, str], Optional[str]]:
    """The CuTe DSL prefill paths of the SM90 launchers, ``(kernel, path, precision)`` -> None
    when the path can run on ``device`` (for a layer with the router weight on the output and,
    FP8, dynamic activation scales without ``ue8m0``), else why not."""
    paths = (("sm90_triton_fp8", "cute_grouped", "fp8_block"), ("sm90_triton_nvfp4", "bf16_grouped", "nvfp4"))
    try:
        from ..kernels.sm90 import fp8_grouped_moe, nvfp4_moe
    except ImportError as exc:  # no Triton on this platform
        return {p: f"importing the SM90 kernels failed: {exc}" for p in paths}
    fp8 = fp8_grouped_moe.grouped_path_defect(
        device, block_scaled=True, static_activation_scales=False, ue8m0=False, apply_router_weight_on_input=False
    )
    return dict(zip(paths, (fp8, nvfp4_moe.grouped_path_defect(device, False)), strict=True))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(
            f"device: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB)"
        )
    else:
        print(f"device: {device} (no CUDA GPU: the torch reference serves every precision)")
    print("\nversions:")
    for name, version in versions().items():
        print(f"  {name:<18} {version}")
    print("\nkernels:")
    for kernel, per_precision in available_kernels(device).items():
        for precision, reason in per_precision.items():
            print(f"  {kernel:<28} {precision:<11} {'available' if reason is None else 'no: ' + reason}")
    print("\nCuTe DSL prefill paths (configurations of the kernels above; the tuner picks them per token bucket):")
    for (kernel, path, precision), reason in cute_paths(device).items():
        where = f"{kernel}, path={path}"
        print(f"  {where:<40} {precision:<11} {'available' if reason is None else 'no: ' + reason}")
    print(
        "\nThe sm100_flashinfer_* kernels (FlashInfer's TRT-LLM-gen MoE for sm_100/sm_103) are checked on a CPU "
        "against FlashInfer 0.7.2.post1 but have never run on a Blackwell GPU (docs/blackwell.md)."
    )
    return 0
