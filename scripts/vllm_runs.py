"""What the GPU-side vLLM scripts share: the reference backends, the child-process
environment, and running one vLLM engine in a child process with the facts its log shows.

vLLM loads plugins once per process and frees its GPU memory only at exit, so every
engine runs in its own process (its own process group: a timeout kills vLLM's engine
core too). Imported by ``vllm_e2e.py`` and ``vllm_throughput.py`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

#: vLLM's own MoE backend each checkpoint flavour is compared with (``fp8``: block-scale,
#: ``fp8_tensor``: ModelOpt FP8 per-tensor; Marlin: vLLM's only NVFP4 MoE on Hopper).
REFERENCE_BACKEND = {"fp8": "triton", "nvfp4": "marlin", "fp8_tensor": "triton"}
#: For every vLLM run: offline, no usage report, no DeepGEMM (its JIT needs headers and time),
#: no FlashInfer sampler (FlashInfer is optional and absent on our GPU machine).
CHILD_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_USE_DEEP_GEMM": "0",
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "PYTHONUNBUFFERED": "1",
    # vLLM 0.26 ships Marlin MoE as compute_80 PTX only: keep what the driver JIT-compiles.
    "CUDA_CACHE_MAXSIZE": str(4 << 30),
}
#: The record of a run the time budget left no room for.
SKIPPED = "skipped: the time budget (--budget-s) is spent"
#: Log lines worth keeping in a report: which kernels vLLM and the plugin chose, memory.
LOG_FACTS = {
    "served_by_moe_backend": r"serving MoE layers with MoEBackendExperts",
    "tuning_warmup": r"tuning warm-up of \d+ MoE layers[^\n]*",
    "capture_moved": r"routed-experts capture fed by routing replay in \d+ MoE layers",
    "moe_kernel": r"Using \S+ (?:Fp8|NvFp4) MoE backend",
    "attention": r"Using \S+ attention backend|Using \S+ backend\.",
    "mla_prefill": r"Using \S+ MLA prefill backend",
    "kv_cache": r"GPU KV cache size: [^\n]*",
    "model_memory": r"Model loading took [^\n]*",
    "moe_config_missing": r"Using default MoE config[^\n]*",
}


def log_facts(log: str) -> dict:
    """``LOG_FACTS`` key -> the distinct matching lines of ``log`` (at most 4)."""
    return {
        key: sorted(set(m.group(0).strip() for m in re.finditer(pattern, log)))[:4]
        for key, pattern in LOG_FACTS.items()
    }


def run_process_group(cmd: list, env: dict, log, timeout: float):
    """Run ``cmd`` in its own process group; on timeout kill the group (vLLM's engine core too)."""
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"timeout after {timeout:.0f} s"


def add_run_options(parser: argparse.ArgumentParser, *, child_timeout: int, budget_s: int) -> None:
    """``--child-timeout`` and ``--budget-s`` (read by :class:`RunBudget`), and the hidden ``--child SPEC``
    (parsed to a dict) through which :func:`run_child` starts the script itself."""
    parser.add_argument(
        "--child-timeout",
        type=int,
        default=child_timeout,
        help=f"seconds for each vLLM run at most (default {child_timeout})",
    )
    parser.add_argument(
        "--budget-s",
        type=int,
        default=budget_s,
        help=f"no vLLM run starts or goes on after this many seconds (default {budget_s})",
    )
    parser.add_argument("--child", type=json.loads, help=argparse.SUPPRESS)


class RunBudget:
    """The time a script's vLLM runs may take: each run at most ``child_timeout`` seconds, every run
    ending ``reserve_s`` before ``budget_s`` from now; a run left less than ``min_run_s`` is skipped."""

    def __init__(self, budget_s: float, child_timeout: float, *, reserve_s: float, min_run_s: float) -> None:
        self.deadline = time.monotonic() + budget_s
        self.child_timeout = child_timeout
        self.reserve_s = reserve_s
        self.min_run_s = min_run_s

    def timeout(self) -> Optional[float]:
        """Seconds the next run may take, or None where that is under ``min_run_s``."""
        left = min(self.child_timeout, self.deadline - time.monotonic() - self.reserve_s)
        return left if left >= self.min_run_s else None


def run_child(script: str, spec: dict, log_path: Path, budget: RunBudget, extra_env: Optional[dict] = None) -> dict:
    """Run ``script --child SPEC`` (writing its JSON record to ``spec["out"]``) with :data:`CHILD_ENV`,
    for as long as ``budget`` allows.

    Returns the record plus ``wall_s`` and the :func:`log_facts` of its log (and ``exit_after_record``
    when the child failed only after writing its record), or, when it wrote none, those with
    ``error`` and the log's tail; ``{"error": SKIPPED}`` where the budget left no time for it.
    """
    timeout = budget.timeout()
    if timeout is None:
        return {"error": SKIPPED}
    env = dict(os.environ, **CHILD_ENV, **(extra_env or {}))
    out = Path(spec["out"])
    out.unlink(missing_ok=True)  # written last by the child: its presence means the run completed
    started = time.perf_counter()
    with open(log_path, "w") as log:
        rc = run_process_group([sys.executable, script, "--child", json.dumps(spec)], env, log, timeout)
    text = log_path.read_text(errors="replace")
    info = {"wall_s": round(time.perf_counter() - started, 1), **log_facts(text)}
    if not out.exists():
        return {**info, "error": f"exit {rc}", "log_tail": text[-4000:]}
    if rc != 0:
        # vLLM 0.26's engine sometimes aborts in its teardown ("terminate called without an
        # active exception") after the record is written: kept, and reported.
        info["exit_after_record"] = rc
    return {**info, **json.loads(out.read_text())}
