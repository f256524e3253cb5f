"""Checks shared by the fused-experts kernel tests: where they run, poisoned outputs and the
reference comparison."""

import os
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

from moe_backend.expert_weights import ExpertWeights
from moe_backend.kernels.reference import reference_fused_experts

CUDA = torch.cuda.is_available()
#: Set by tests/conftest.py without CUDA: the Triton kernels run under the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
#: GPU-only tests carry ``@pytest.mark.gpu`` (tests/conftest.py skips them without CUDA); this
#: marks the kernel tests that also run on a CPU, under the interpreter.
runs_here = pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs a CUDA GPU or TRITON_INTERPRET=1")
#: Relative error the kernels may show against ``reference_fused_experts``.
REL_TOL = 1e-2


@dataclass
class Problem:
    """One MoE call: ``hidden [T, H]`` bf16, local experts, global ``ids [T, k]`` int32,
    router weights ``topk_w [T, k]`` fp32, and the global id of local expert 0."""

    hidden: torch.Tensor
    weights: ExpertWeights
    ids: torch.Tensor
    topk_w: torch.Tensor
    offset: int


def random_ids(
    t: int, k: int, e: int, offset: int, g: torch.Generator, *, invalid: bool = True, one_expert: bool = False
) -> torch.Tensor:
    """``[T, k]`` int32 (CPU) of distinct global ids per token.

    ``invalid``: drawn from ``[-1, offset + e + 3)``: -1, other ranks' experts and local ones;
    otherwise local experts only. ``one_expert``: every token on local expert 0, the rest -1.
    """
    lo, span = (-1, offset + e + 4) if invalid else (offset, e)
    ids = torch.empty(t, k, dtype=torch.long)
    for row in range(t):
        ids[row] = torch.randperm(span, generator=g)[:k] + lo
    if one_expert:
        ids[:, 0] = offset
        ids[:, 1:] = -1
    return ids.to(torch.int32)


def run_poisoned(
    launch: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, extra_rows: int = 3
) -> torch.Tensor:
    """Call ``launch(out)`` with a NaN-filled ``out [T + extra_rows, H]``; check that every row
    ``[:T]`` and no other was written and that the result is ``out[:T]``."""
    t, h = hidden.shape
    out = torch.full((t + extra_rows, h), float("nan"), dtype=torch.bfloat16, device=hidden.device)
    res = launch(out)
    assert res.shape == (t, h) and (t == 0 or res.data_ptr() == out.data_ptr())
    assert torch.isnan(out[t:].float()).all(), "rows >= T were written"
    assert torch.isfinite(res.float()).all(), "some rows [:T] were not written"
    return res


def assert_matches_reference(got: torch.Tensor, p: Problem, weight_on_input: bool, tol: float) -> float:
    """Relative error of ``got`` against the reference (same numerics); tokens without a local
    expert must come out exactly 0. Returns the error."""
    ref = reference_fused_experts(
        p.hidden, p.weights, p.ids, p.topk_w, local_expert_offset=p.offset, apply_router_weight_on_input=weight_on_input
    ).float()
    got = got.float()
    none = ref.abs().sum(1) == 0
    assert torch.equal(got[none], ref[none])
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err <= tol, f"relative error {err:.3e}"
    return err


def call_fp8_kernel(
    p: Problem, out: torch.Tensor, *, weight_on_input: bool = False, config: Optional[dict] = None
) -> torch.Tensor:
    """One call of the SM90 FP8 launcher (``fused_experts_fp8``) on ``p`` (block-scale or
    per-tensor weights) writing ``out``."""
    from moe_backend.expert_weights import FP8BlockWeights
    from moe_backend.kernels.sm90 import fused_experts_fp8

    w = p.weights
    block = isinstance(w, FP8BlockWeights)
    return fused_experts_fp8(
        p.hidden,
        w.w13,
        w.w13_scale,
        w.w2,
        w.w2_scale,
        p.ids,
        p.topk_w,
        block_scaled=block,
        local_expert_offset=p.offset,
        a13_scale=None if block else w.a13_scale,
        a2_scale=None if block else w.a2_scale,
        ue8m0=block and w.ue8m0,
        apply_router_weight_on_input=weight_on_input,
        out=out,
        config=config,
    )


def run_fp8_kernel(p: Problem, *, weight_on_input: bool = False, config: Optional[dict] = None) -> torch.Tensor:
    """:func:`call_fp8_kernel` through :func:`run_poisoned`."""
    return run_poisoned(lambda out: call_fp8_kernel(p, out, weight_on_input=weight_on_input, config=config), p.hidden)
