"""Is FlashInfer's TRT-LLM-gen MoE obtainable here? Checked once at warm-up, before any request.

At its first call FlashInfer fetches the TRT-LLM-gen batched-GEMM headers and cubins (about 60 s of
retries before failing when offline) and JIT-compiles its fused-MoE module with nvcc. Either can
come prebuilt: ``flashinfer-cubin`` (or ``FLASHINFER_CUBIN_DIR``) holds the cubins,
``flashinfer-jit-cache`` the compiled module. :func:`check_flashinfer_ready` names what is missing
and how to provide it, so a server stops at start-up instead of stalling inside a request.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from typing import List

from . import TESTED_FLASHINFER

logger = logging.getLogger(__name__)

#: The JIT module FlashInfer builds for the SM100 TRT-LLM-gen MoE (``gen_trtllm_gen_fused_moe_sm100_module``).
MODULE_NAME = "fused_moe_trtllm_sm100"
INSTALL_HINT = "pip install 'moe-backend[flashinfer]'"


class FlashInferNotReadyError(RuntimeError):
    """FlashInfer's TRT-LLM-gen MoE cannot run here without a download or build that is not possible."""


def readiness_problems() -> List[str]:
    """What keeps FlashInfer's SM100 MoE from starting here (empty: ready, or it may download)."""
    try:
        flashinfer = importlib.import_module("flashinfer")
    except Exception as exc:  # an ImportError, or a dependency failing at import
        return [
            f"flashinfer is not importable ({type(exc).__name__}: {exc}); install it with {INSTALL_HINT} "
            f"(flashinfer-python=={TESTED_FLASHINFER} and apache-tvm-ffi)"
        ]
    version = getattr(flashinfer, "__version__", "?")
    if version != TESTED_FLASHINFER:
        logger.warning(
            "flashinfer %s is installed; the Blackwell path was checked against %s", version, TESTED_FLASHINFER
        )
    from flashinfer.artifacts import ArtifactPath, CheckSumHash
    from flashinfer.jit import env as jit_env
    from flashinfer.jit.cubin_loader import load_cubin

    problems = []
    checksums = jit_env.FLASHINFER_CUBIN_DIR / ArtifactPath.TRTLLM_GEN_BMM / "checksums.txt"
    if not load_cubin(str(checksums), CheckSumHash.TRTLLM_GEN_BMM):
        if os.environ.get("FLASHINFER_NO_DOWNLOAD"):
            problems.append(
                f"the TRT-LLM-gen MoE cubins are not in {jit_env.FLASHINFER_CUBIN_DIR} (no valid {checksums.name}) "
                f"and FLASHINFER_NO_DOWNLOAD is set: install flashinfer-cubin=={version}, or run "
                "`flashinfer download-kernels` where the network is reachable and point FLASHINFER_CUBIN_DIR "
                "at the copy, or unset FLASHINFER_NO_DOWNLOAD"
            )
        else:
            logger.warning(
                "FlashInfer's TRT-LLM-gen cubins are not cached in %s: warm-up downloads them "
                "(install flashinfer-cubin==%s to start offline)",
                jit_env.FLASHINFER_CUBIN_DIR,
                version,
            )
    built = (jit_env.FLASHINFER_JIT_DIR / MODULE_NAME / f"{MODULE_NAME}.so").exists()
    if not (built or jit_env.has_flashinfer_jit_cache() or _nvcc_available()):
        problems.append(
            f"FlashInfer's {MODULE_NAME} module is neither built ({jit_env.FLASHINFER_JIT_DIR / MODULE_NAME}) "
            f"nor prebuilt (flashinfer-jit-cache is not installed), and no CUDA compiler (nvcc) is found to "
            f"JIT-compile it: install flashinfer-jit-cache=={version} for your CUDA, or a CUDA toolkit "
            "(CUDA_HOME or nvcc on PATH)"
        )
    return problems


def _nvcc_available() -> bool:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool(shutil.which("nvcc") or (cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))))


def check_flashinfer_ready() -> None:
    """Raise :class:`FlashInferNotReadyError` naming every missing piece and how to provide it."""
    problems = readiness_problems()
    if problems:
        raise FlashInferNotReadyError(
            "FlashInfer's TRT-LLM-gen MoE kernels (the sm100_flashinfer_* kernels) cannot start: "
            + "; ".join(problems)
            + ". Or choose another kernel (kernel='reference')."
        )
