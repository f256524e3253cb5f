"""CuTe DSL (``nvidia-cutlass-dsl``) and QuACK (``quack-kernels``): availability, pins, offline compile.

Both are optional (``pip install moe-backend[cute]``, Linux x86_64 only): without them the
kernels that need them report why they cannot run and the Triton kernels serve. Nothing here
imports them at module import time; :func:`quack_unavailable_reason` imports them once, on
first use, and remembers the outcome, so a broken install is a reason, never a crash.

Compiling needs no GPU (see docs/cute_dsl.md): after :func:`pin_offline_arch`, QuACK traces
against fake tensors and CuTe DSL lowers for ``sm_90a`` on a CPU.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Dict, Hashable, Iterator, Optional, Set

from ..._checks import capturing

logger = logging.getLogger(__name__)

#: Versions this package is built and tested against (pyproject extra ``cute``).
PINNED = {"nvidia-cutlass-dsl": "4.8.1", "quack-kernels": "0.6.5"}
#: The modules the CuTe DSL kernels import.
MODULES = ("cutlass", "quack")


@functools.lru_cache(maxsize=None)
def quack_unavailable_reason() -> Optional[str]:
    """Why the QuACK/CuTe DSL kernels cannot be built in this process, or None when they can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"CuTe DSL wheels exist for Linux x86_64 only, this is {platform.system()} {platform.machine()}"
    for name in MODULES:
        if importlib.util.find_spec(name) is None:
            return (
                f"the package {name!r} is not installed (pip install 'moe-backend[cute]': "
                f"{', '.join(f'{k}=={v}' for k, v in PINNED.items())})"
            )
    try:
        import cutlass  # noqa: F401
        import cutlass.cute  # noqa: F401
        import quack.epilogue.library  # noqa: F401
    except Exception as exc:  # a broken install (missing libs wheel, ABI mismatch) is a reason
        return f"importing CuTe DSL / QuACK failed: {type(exc).__name__}: {exc}"
    versions = installed_versions()
    off = {k: v for k, v in versions.items() if v != PINNED[k]}
    if off:
        logger.warning("CuTe DSL kernels: tested with %s, found %s", PINNED, off)
    return None


def sm90_cute_defect(device) -> Optional[str]:
    """Why the CuTe DSL kernels cannot run on ``device`` (a ``torch.device``), or None."""
    import torch

    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return f"it needs an sm_90 GPU, got {device}"
    return quack_unavailable_reason()


_LAUNCHED: Set[Hashable] = set()


def collect_after_first_launch(plan_key: Hashable) -> None:
    """One garbage collection right after the first launch of the plan ``plan_key`` (called by
    the launchers once their launch returned).

    A first CuTe DSL / QuACK launch leaves a reference cycle that holds its callers' frames: on
    the H200 (2026-12-02), a layer warmed up through the CuTe DSL paths stayed allocated after it
    was dropped, together with everything those frames held (its weights, the tuner's L2-flush
    buffer), until the next collection. Collected here, while the callers' frames are still
    running, the cycle goes and the frames are freed as they return, so dropping a layer returns
    its memory at once even with ``gc`` disabled. Later launches of a plan leave no cycle. Not
    inside a CUDA-graph capture: the next eager launch collects instead.
    """
    if plan_key in _LAUNCHED or capturing():
        return
    _LAUNCHED.add(plan_key)
    gc.collect()


def fingerprint_kernel_sources() -> None:
    """Add this folder's sources to the fingerprint of QuACK's disk cache (``quack.cache``): its
    key names a kernel class by qualified name only and fingerprints QuACK's own sources, so a
    changed kernel of ours (``fp8_grouped_kernel``) would otherwise load the object compiled from
    the old source. Call before the first compilation of the process (QuACK computes the
    fingerprint once)."""
    import quack.cache

    ours = Path(__file__).resolve().parent
    if ours not in quack.cache.EXTRA_SOURCE_DIRS:
        quack.cache.EXTRA_SOURCE_DIRS.append(ours)


def installed_versions() -> dict:
    """Distribution name -> installed version (or None) for the pinned packages."""
    from importlib import metadata

    out: Dict[str, Optional[str]] = {}
    for dist in PINNED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


#: SMs of the H200 / H100 SXM: what an offline plan assumes for its persistent grid.
HOPPER_SMS = 132


def pin_offline_arch(arch: str = "sm_90a") -> None:
    """Target ``arch`` without a GPU: sets CuTe DSL's target (``CUTE_DSL_ARCH``) and QuACK's
    kernel-class dispatch (``QUACK_ARCH``) for this process. CuTe DSL reads its target once, at
    import: call this first, or after an import with the same target already set."""
    if "cutlass" in sys.modules and os.environ.get("CUTE_DSL_ARCH") != arch:
        raise RuntimeError(
            f"pin_offline_arch({arch!r}): CuTe DSL is already imported with target "
            f"{os.environ.get('CUTE_DSL_ARCH')!r}; pin the target before importing it"
        )
    os.environ["CUTE_DSL_ARCH"] = arch
    os.environ["QUACK_ARCH"] = "".join(c for c in arch if c.isdigit())


@contextlib.contextmanager
def offline_compile(sm_count: int = HOPPER_SMS) -> Iterator[None]:
    """Build QuACK plans without a GPU (after :func:`pin_offline_arch`): answers QuACK's
    launch-time query for the persistent grid size (it asks the CUDA driver) with ``sm_count``
    divided by the cluster size. That number is a launch argument, not part of the compiled
    kernel, so plans built here are for checking that kernels build, not for launching."""
    if "QUACK_ARCH" not in os.environ:
        raise RuntimeError("offline_compile: call pin_offline_arch() first (before importing CuTe DSL)")
    import quack.gemm_runtime.host as host

    query = host.get_max_active_clusters
    host.get_max_active_clusters = lambda cluster_size, **_: sm_count // cluster_size
    try:
        yield
    finally:
        host.get_max_active_clusters = query
