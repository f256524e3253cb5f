"""The NVFP4 prefill's dequantization (``nvfp4_dequant.dequantize_kernel_layout_segments``) on the
H200 against its floor and store-policy variants, in one run: E=32 DeepSeek-V3 experts (H 7168,
I 2048) into the bf16 pool, as the E=32 T=8192 prefill does. Variants are the product's kernel
with a line changed (a copy of the module written to a temporary file, so the product stays as
it is): the final ``tl.store``'s cache policy, or the permute to natural K order dropped (the
values stored in the W4A16 kernels' K order: the bound on what writing that order would save);
each output is compared bitwise with the product's. Floors: ``fill_``
of the same bf16 outputs, and a copy of as many bytes. CUDA-graph replays, do_bench median, L2
flushed (``decode_breakdown.timed``), ``--rounds`` rounds alternated. Prints a table; writes
``$OUT/gpu_probe_dequant.json`` (or ``--out``).

    python -P scripts/gpu_probe_dequant.py [--rounds 2] [--out DIR] [--baseline FILE]

``--baseline FILE``: another version of ``nvfp4_dequant.py`` (e.g. ``git show
REV:moe_backend/kernels/sm90/nvfp4_dequant.py > FILE``) timed beside the product.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_gated import time_rounds  # noqa: E402

from moe_backend.cli.bench import random_nvfp4_weights  # noqa: E402
from moe_backend.kernels.sm90 import nvfp4_dequant  # noqa: E402
from moe_backend.kernels.sm90.nvfp4_layout import nvfp4_to_kernel_layout  # noqa: E402

E, H, INTER = 32, 7168, 2048
STORE = "tl.store(out_rows + cols[None, :], to_bf16(v), mask=out_ok[:, None] & (cols < K)[None, :]"
STREAMING = ', cache_modifier=".cs")'
PERMUTE = "vals = tl.reshape(tl.permute(tl.reshape(vals, (BLOCK_R, 2, 4, 16, 2)), (0, 3, 1, 2, 4)), (BLOCK_R, 256))"
KERNEL_ORDER = "vals = tl.reshape(vals, (BLOCK_R, 256))"
#: variant name -> (product text, replacement) pairs
VARIANTS = {
    "stores without .cs": [(STORE + STREAMING, STORE + ")")],
    "stores evict_first, not .cs": [(STORE + STREAMING, STORE + ', eviction_policy="evict_first")')],
    "no permute (kernel K order)": [(PERMUTE, KERNEL_ORDER)],
    "16 rows a program": [("BLOCK_ROWS = 32", "BLOCK_ROWS = 16")],
    "64 rows a program": [("BLOCK_ROWS = 32", "BLOCK_ROWS = 64")],
    "8 warps": [("NUM_WARPS = 4", "NUM_WARPS = 8")],
    "64 rows, 8 warps": [("BLOCK_ROWS = 32", "BLOCK_ROWS = 64"), ("NUM_WARPS = 4", "NUM_WARPS = 8")],
}

RELATIVE_IMPORTS = (
    ("from ...", "from moe_backend."),
    ("from ..", "from moe_backend.kernels."),
    ("from .", "from moe_backend.kernels.sm90."),
)


def variant_module(name: str, changes):
    """A copy of ``nvfp4_dequant`` with ``changes`` (product line, replacement) made, imported
    from a temporary file."""
    src = inspect.getsource(nvfp4_dequant)
    for old, new in changes:
        assert old in src, f"gpu_probe_dequant: the product no longer has {old!r}"
        src = src.replace(old, new)
    return module_from_source(name, src)


def module_from_source(name: str, src: str):
    """``src``, a version of a module of ``moe_backend.kernels.sm90``, imported from a temporary
    file with its relative imports made absolute (the probes time earlier versions this way)."""
    # deepest first: "from ..." also starts with "from .." and "from ."
    for rel, absolute in RELATIVE_IMPORTS:
        src = src.replace(rel, absolute)
    path = Path(tempfile.mkdtemp()) / f"probe_{abs(hash(name))}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--baseline", help="another nvfp4_dequant.py to time beside the product")
    args = p.parse_args()
    dev = torch.device("cuda")
    w = nvfp4_to_kernel_layout(random_nvfp4_weights(E, H, INTER, dev))
    experts = torch.arange(E, dtype=torch.int32, device=dev)
    w13 = torch.empty(E, 2 * INTER, H, dtype=torch.bfloat16, device=dev)
    w2 = torch.empty(E, H, INTER, dtype=torch.bfloat16, device=dev)
    nvfp4_dequant.dequantize_kernel_layout_segments(w, experts, w13, w2)
    ref13, ref2 = w13.clone(), w2.clone()
    src = torch.empty(w13.numel() + w2.numel(), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    variants: Dict[str, Callable[[], object]] = {
        "product": lambda: nvfp4_dequant.dequantize_kernel_layout_segments(w, experts, w13, w2),
        "fill_ (write floor)": lambda: (w13.fill_(1.0), w2.fill_(1.0)),
        "copy of as many bytes": lambda: dst.copy_(src),
    }
    modules = {name: variant_module(name, changes) for name, changes in VARIANTS.items()}
    if args.baseline:
        baseline = Path(args.baseline)
        modules["baseline " + baseline.name] = module_from_source("baseline", baseline.read_text())
    exact = {}
    for name, mod in modules.items():
        w13.zero_(), w2.zero_()
        mod.dequantize_kernel_layout_segments(w, experts, w13, w2)
        exact[name] = bool(torch.equal(w13, ref13) and torch.equal(w2, ref2))
        variants[name] = lambda mod=mod: mod.dequantize_kernel_layout_segments(w, experts, w13, w2)
    rows = time_rounds(variants, args.rounds)
    out = Path(args.out) / "gpu_probe_dequant.json"
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), E=E, exact=exact, results=rows), indent=1))
    for name in variants:
        uss = " / ".join(f"{x['us']:.1f}" for x in rows if x["variant"] == name)
        print(f"{name:<32} {uss}  {'' if name not in exact else ('bitwise equal' if exact[name] else 'DIFFERS')}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
