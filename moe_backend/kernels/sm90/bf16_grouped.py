"""bf16 grouped GEMMs over variable-length expert segments (QuACK's SM90 varlen-M GEMM, CuTe DSL).

Rows of one expert are contiguous; ``cu_seqlens [S + 1]`` int32 (on the device) bounds segment
``s`` to rows ``[cu[s], cu[s + 1])`` and segment ``s`` multiplies by weight matrix ``s``. Empty
segments cost nothing, so the segment count may be a static upper bound (CUDA graphs).

* :func:`gemm1_gated`: ``h[r, c] = silu(g_c) * u_c`` over ``x[a_idx[r]] @ w13[s].T``: rows
  gathered from the tokens by index (no permuted copy of the activations) and the SiLU-and-mul in
  the epilogue, which pairs adjacent output columns: ``w13 [S, 2I, H]`` holds gate and up rows
  INTERLEAVED (row ``2c`` gate ``c``, row ``2c + 1`` up ``c``; :func:`interleave_gate_up`).
  QuACK's ``concat_layout`` would read ``[gate; up]`` halves, but only through per-call views
  that its launch-only plans (what a CUDA graph needs) do not take.
* :func:`gemm2`: ``y[r] = h[r] @ w2[s].T``, ``w2 [S, H, I]``.

Compiled kernels are cached per (GEMM, configuration, N, K, device): QuACK traces against
symbolic shapes, so one compilation serves every token count (the "shape class" is N and K).
:func:`compile_plans` builds them; it runs at layer warm-up, never inside a CUDA-graph capture
(a missing plan during a capture is an error, not a silent compile). On disk, QuACK keeps the
exported object files (``quack.cache``), so a second process loads them in milliseconds.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch

from ..._checks import capturing
from .cute_env import collect_after_first_launch, fingerprint_kernel_sources

#: Tile shapes the tuner may choose among, as (tile_m, tile_n, cluster_m, pingpong). QuACK's
#: SM90 gated epilogue needs tile_n % 32 == 0; a gathered A needs cluster_n == 1.
TILES: Tuple[Tuple[int, int, int, bool], ...] = (
    (128, 192, 2, True),
    (128, 256, 2, False),
    (256, 128, 2, False),
    (128, 128, 1, True),
    (64, 256, 1, True),
)
#: The prefill tile (many rows per expert).
DEFAULT_TILE = TILES[0]
#: The tile for few rows per expert: 64-row M tiles, no cluster. With 128-row tiles in clusters of
#: two, an expert with one row keeps a second CTA idle and computes 255 padding rows, so a decode
#: layer streamed its weights at half the read ceiling (H200, 2026-12-04: bf16 E=256 T=1 437 us
#: against 216 on this tile; docs/performance.md, thirteenth session).
DECODE_TILE = TILES[4]

GEMM1, GEMM2 = "gemm1_gated", "gemm2"


class PlanKey(NamedTuple):
    """What a compiled grouped GEMM depends on: GEMM, tile, output width N, reduction K, device."""

    gemm: str
    tile: Tuple[int, int, int, bool]
    n: int
    k: int
    device: str


class GemmPlanMissingError(RuntimeError):
    """A grouped-GEMM configuration was needed inside a CUDA-graph capture before warm-up compiled it."""


_PLANS: Dict[PlanKey, object] = {}
_LOCK = threading.Lock()


def _config(tile: Tuple[int, int, int, bool]):
    from quack.gemm_config import GemmConfig

    tile_m, tile_n, cluster_m, pingpong = tile
    return GemmConfig(
        tile_m=tile_m,
        tile_n=tile_n,
        cluster_m=cluster_m,
        cluster_n=1,
        pingpong=pingpong,
        is_dynamic_persistent=False,
        device_capacity=9,
    )


def _mod(gemm: str):
    from quack.epilogue.library import linear_act_mod

    if gemm == GEMM1:
        return linear_act_mod("swiglu", gated=True, has_c=False, has_rowvec=False, has_colvec=False)
    return linear_act_mod(None, gated=False, has_c=False, has_rowvec=False, has_colvec=False)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _build(
    key: PlanKey,
    a: torch.Tensor,
    b_kn: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens: torch.Tensor,
    a_idx: Optional[torch.Tensor],
):
    """Compile (or load from QuACK's disk cache) the plan of ``key`` for these tensors' metadata."""
    fingerprint_kernel_sources()
    return _mod(key.gemm).plan(
        a, b_kn, out={"mAuxOut": out}, config=_config(key.tile), cu_seqlens_m=cu_seqlens, A_idx=a_idx
    )


def _plan(key: PlanKey, *args) -> Any:
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    if capturing():
        raise GemmPlanMissingError(
            f"grouped GEMM {key.gemm} tile {key.tile} (N={key.n}, K={key.k}) was not compiled before this "
            f"CUDA-graph capture: warm the layer up (layer.warmup) before capturing"
        )
    with _LOCK:
        if key not in _PLANS:
            _PLANS[key] = _build(key, *args)
        return _PLANS[key]


def gemm1_gated(
    x: torch.Tensor,
    w13: torch.Tensor,
    cu_seqlens: torch.Tensor,
    a_idx: torch.Tensor,
    out: torch.Tensor,
    tile: Tuple[int, int, int, bool] = DEFAULT_TILE,
) -> torch.Tensor:
    """``out[r, c] = silu(y[2c]) * y[2c + 1]``, ``y = x[a_idx[r]] @ w13[s].T``, rows r of segment s.

    ``x [T, H]`` bf16 contiguous; ``w13 [S, 2I, H]`` bf16 contiguous, gate/up rows interleaved;
    ``cu_seqlens [S + 1]`` int32; ``a_idx [P]`` int32 token of each row; ``out [P, I]`` bf16
    contiguous. Rows at or past ``cu_seqlens[S]`` are neither read nor written. Returns ``out``.
    """
    key = PlanKey(GEMM1, tile, w13.shape[1], w13.shape[2], _device_name(x.device))
    b_kn = w13.transpose(1, 2)
    _plan(key, x, b_kn, out, cu_seqlens, a_idx).run(x, b_kn, out={"mAuxOut": out}, cu_seqlens_m=cu_seqlens, A_idx=a_idx)
    collect_after_first_launch(key)
    return out


def gemm2(
    h: torch.Tensor,
    w2: torch.Tensor,
    cu_seqlens: torch.Tensor,
    out: torch.Tensor,
    tile: Tuple[int, int, int, bool] = DEFAULT_TILE,
) -> torch.Tensor:
    """``out[r] = h[r] @ w2[s].T`` for the rows r of segment s.

    ``h [P, I]`` bf16 contiguous; ``w2 [S, H, I]`` bf16 contiguous; ``cu_seqlens [S + 1]`` int32;
    ``out [P, H]`` bf16 contiguous (rows past ``cu_seqlens[S]`` untouched). Returns ``out``.
    """
    key = PlanKey(GEMM2, tile, w2.shape[1], w2.shape[2], _device_name(h.device))
    b_kn = w2.transpose(1, 2)
    _plan(key, h, b_kn, out, cu_seqlens, None).run(h, b_kn, out={"mAuxOut": out}, cu_seqlens_m=cu_seqlens)
    collect_after_first_launch(key)
    return out


def interleave_gate_up(w13: torch.Tensor) -> torch.Tensor:
    """``[..., 2I, K]`` with ``[gate; up]`` row halves -> rows ``gate 0, up 0, gate 1, ...`` (a copy)."""
    i = w13.shape[-2] // 2
    return w13.unflatten(-2, (2, i)).transpose(-3, -2).flatten(-3, -2).contiguous()


def deinterleave_gate_up(w13: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`interleave_gate_up` (a copy)."""
    i = w13.shape[-2] // 2
    return w13.unflatten(-2, (i, 2)).transpose(-3, -2).flatten(-3, -2).contiguous()


def compile_plans(hidden_size: int, intermediate_size: int, tiles, device: torch.device) -> int:
    """Compile GEMM1 and GEMM2 of every tile in ``tiles`` for experts of ``hidden_size`` H and
    ``intermediate_size`` I on ``device`` (``meta`` compiles offline, after
    :func:`cute_env.pin_offline_arch`, inside :func:`cute_env.offline_compile`).

    Uses one-row stand-in tensors: the plans depend on dtypes, layouts and N, K only. Returns the
    number of plans compiled or loaded now (those already in this process are skipped).
    """
    if capturing():
        raise GemmPlanMissingError("compile_plans: cannot compile inside a CUDA-graph capture")
    h, i = hidden_size, intermediate_size
    bf16, i32 = torch.bfloat16, torch.int32
    x = torch.empty(1, h, dtype=bf16, device=device)
    w13 = torch.empty(1, 2 * i, h, dtype=bf16, device=device)
    w2 = torch.empty(1, h, i, dtype=bf16, device=device)
    cu = torch.zeros(2, dtype=i32, device=device)
    idx = torch.zeros(1, dtype=i32, device=device)
    mid = torch.empty(1, i, dtype=bf16, device=device)
    y = torch.empty(1, h, dtype=bf16, device=device)
    built = 0
    for tile in dict.fromkeys(tuple(t) for t in tiles):
        for gemm, args in (
            (GEMM1, (x, w13.transpose(1, 2), mid, cu, idx)),
            (GEMM2, (mid, w2.transpose(1, 2), y, cu, None)),
        ):
            n, k = (2 * i, h) if gemm == GEMM1 else (h, i)
            key = PlanKey(gemm, tile, n, k, _device_name(torch.device(device)))
            if key not in _PLANS:
                _plan(key, *args)
                built += 1
    return built
