"""``moe-backend info``: the device, its capability, the kernels that can run, and versions."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
from typing import Dict

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
            print(f"  {kernel:<24} {precision:<11} {'available' if reason is None else 'no: ' + reason}")
    print(
        "\nThe sm100_flashinfer_* kernels (FlashInfer's TRT-LLM-gen MoE for sm_100/sm_103) are checked on a CPU "
        "against FlashInfer 0.7.2.post1 but have never run on a Blackwell GPU (docs/blackwell.md)."
    )
    return 0
