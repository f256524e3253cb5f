"""Run the real FlashInfer 0.7.2 down to its native MoE module on a CPU.

:func:`intercept_native_moe` replaces what FlashInfer's kernel loader builds (the JIT spec of
``gen_trtllm_gen_fused_moe_sm100_module``: cubin download, nvcc build, ``.so`` load) by a module
that records each native call and raises :class:`ReachedNative`. Everything above it is FlashInfer's
own Python: the public functions, their validation, the op wrappers, the ``TrtllmMoERunner`` and
the autotuner's tactic choice. :func:`spy_public` records the keyword arguments our kernels pass
to FlashInfer's public functions. The two CUDA-only helpers our NVFP4 path uses get pure-torch
equivalents: :func:`swizzle_128x4` (``block_scale_interleave``, from the layout formula FlashInfer
states) and :func:`fp4_quantize_torch` (``fp4_quantize`` through our own NVFP4 quantizer).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from moe_backend.quant.nvfp4 import quantize_nvfp4

MOE_FUNCTIONS = (
    "trtllm_fp8_block_scale_moe",
    "trtllm_fp8_block_scale_routed_moe",
    "trtllm_fp8_per_tensor_scale_moe",
    "trtllm_fp8_per_tensor_scale_routed_moe",
    "trtllm_fp4_block_scale_moe",
    "trtllm_fp4_block_scale_routed_moe",
)


class ReachedNative(Exception):
    """A call arrived at FlashInfer's native MoE module (nothing ran)."""


class _NativeModule:
    def __init__(self, calls: List[Tuple[str, tuple]]) -> None:
        self._calls = calls

    def __getattr__(self, name: str):
        def call(*args):
            self._calls.append((name, args))
            if name.startswith("trtllm_get_valid"):  # tactic enumeration: one (tile, config) pair
                return [[8, 0]]
            raise ReachedNative(name)

        return call


class _Spec:
    """Stands where ``gen_trtllm_gen_fused_moe_sm100_module()`` returns FlashInfer's JIT spec."""

    def __init__(self, calls: List[Tuple[str, tuple]]) -> None:
        self._calls = calls

    def build_and_load(self) -> _NativeModule:
        return _NativeModule(self._calls)

    def get_library_paths(self) -> tuple:
        return ()


def intercept_native_moe(monkeypatch) -> List[Tuple[str, tuple]]:
    """Route FlashInfer's SM100 MoE loader to a recording native module; returns the call list.

    FlashInfer caches the loaded module (``functools.cache``): the test gets a fresh cache of its
    own, which ``monkeypatch`` drops afterwards, so no later test sees the recording module.
    """
    import functools

    import flashinfer.fused_moe.core as core

    calls: List[Tuple[str, tuple]] = []
    monkeypatch.setattr(core, "gen_trtllm_gen_fused_moe_sm100_module", lambda enable_rubin=False: _Spec(calls))
    monkeypatch.setattr(
        core, "_get_trtllm_moe_sm100_module_impl", functools.cache(core._get_trtllm_moe_sm100_module_impl.__wrapped__)
    )
    # Its device query (torch.cuda.current_device) needs a GPU; the rest of the loader is FlashInfer's.
    monkeypatch.setattr(core, "get_trtllm_moe_sm100_module", lambda: core._get_trtllm_moe_sm100_module_impl(False))
    return calls


def spy_public(monkeypatch) -> Dict[str, List[dict]]:
    """Record the keyword arguments of every call to the six public MoE functions (which still run)."""
    import flashinfer.fused_moe as fused_moe

    seen: Dict[str, List[dict]] = {name: [] for name in MOE_FUNCTIONS}
    for name in MOE_FUNCTIONS:
        original = getattr(fused_moe, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            assert not args, f"{_name} called with positional arguments"
            seen[_name].append(kwargs)
            return _original(**kwargs)

        monkeypatch.setattr(fused_moe, name, spy)
    return seen


def swizzle_128x4(sf: torch.Tensor) -> torch.Tensor:
    """``block_scale_interleave`` of one ``[R, C]`` matrix, element by element: linear ``(r, c)`` goes to
    ``(r//128)*128*C' + (c//4)*512 + (r%32)*16 + ((r%128)//32)*4 + c%4`` with ``C'`` = C rounded up to 4
    and R up to 128 (FlashInfer's ``compute_sf_index_swizzled_128x4_gpu``). Returns the flat buffer."""
    rows, cols = sf.shape
    padded_rows, padded_cols = -(-rows // 128) * 128, -(-cols // 4) * 4
    out = torch.zeros(padded_rows * padded_cols, dtype=sf.dtype)
    flat = sf.reshape(-1)
    for r in range(rows):
        for c in range(cols):
            idx = (r // 128) * 128 * padded_cols + (c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
            out[idx] = flat[r * cols + c]
    return out


def fp4_quantize_torch(
    x: torch.Tensor, global_scale=None, sf_vec_size=16, sf_use_ue8m0=False, is_sf_swizzled_layout=True, **_
):
    """``flashinfer.fp4_quantize`` for NVFP4 with linear scales, on any device: ``(codes uint8 [M, K/2],
    scales uint8 [M*K/16])``; FlashInfer's ``global_scale`` multiplies, ours divides."""
    assert sf_vec_size == 16 and not sf_use_ue8m0 and not is_sf_swizzled_layout
    codes, scales, _ = quantize_nvfp4(x, (1.0 / global_scale.float()).reshape(()).expand(x.shape[:-2]).contiguous())
    return codes, scales.view(torch.uint8).reshape(-1)
