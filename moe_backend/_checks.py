"""Argument validation shared by every public entry point.

Each check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong
shape, device, layout or value) with a message that names the argument, what
was expected and what was given.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

DTypes = Union[torch.dtype, Sequence[torch.dtype]]


def _fmt_dtypes(dtype: DTypes) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype)
    return " or ".join(str(d) for d in dtype)


def check_tensor(
    name: str,
    t: object,
    *,
    dtype: Optional[DTypes] = None,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    device: Optional[torch.device] = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """Validate one tensor argument and return it.

    ``shape`` entries that are ``None`` are not checked; ``ndim`` defaults to
    ``len(shape)`` when a shape is given.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            raise TypeError(f"{name}: expected dtype {_fmt_dtypes(dtype)}, got {t.dtype}")
    expected = None
    if shape is not None:
        dims = ", ".join("*" if d is None else str(d) for d in shape)
        expected = f"({dims},)" if len(shape) == 1 else f"({dims})"
        ndim = len(shape) if ndim is None else ndim
    if ndim is not None and t.dim() != ndim:
        wanted = f"shape {expected}" if expected else f"a {ndim}-D tensor"
        raise ValueError(f"{name}: expected {wanted}, got shape {tuple(t.shape)}")
    if shape is not None:
        for axis, (want, got) in enumerate(zip(shape, t.shape, strict=True)):
            if want is not None and want != got:
                raise ValueError(f"{name}: expected shape {expected}, got {tuple(t.shape)} (axis {axis})")
    if device is not None and not same_device(t.device, device):
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {tuple(t.stride())}")
    return t


def same_device(a: torch.device, b: torch.device) -> bool:
    """True when ``a`` and ``b`` name the same device (``cuda`` == ``cuda:0`` on device 0)."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    ia = a.index if a.index is not None else torch.cuda.current_device()
    ib = b.index if b.index is not None else torch.cuda.current_device()
    return ia == ib


def check_int(name: str, value: object, *, minimum: Optional[int] = None) -> int:
    """Validate an integer argument (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_out(
    name: str, out: Optional[torch.Tensor], *, rows: int, cols: int, dtype: torch.dtype, device: torch.device
) -> Optional[torch.Tensor]:
    """Validate an ``out=`` buffer: 2-D ``[R, cols]`` with ``R >= rows``, contiguous."""
    if out is None:
        return None
    check_tensor(name, out, dtype=dtype, shape=(None, cols), device=device)
    if out.shape[0] < rows:
        raise ValueError(f"{name}: expected at least {rows} rows (one per token), got shape {tuple(out.shape)}")
    return out


def check_routed_call(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    local_expert_offset: object,
    out: Optional[torch.Tensor],
    *,
    hidden_size: int,
    device: torch.device,
) -> None:
    """The arguments every routed kernel launcher takes: ``hidden [T, hidden_size]`` bf16,
    ``topk_ids [T, k]`` int32, ``topk_weights [T, k]`` fp32, ``local_expert_offset >= 0`` and a
    required ``out [R >= T, hidden_size]`` bf16 buffer, all on ``device``."""
    check_tensor("hidden", hidden, dtype=torch.bfloat16, shape=(None, hidden_size), device=device)
    t = hidden.shape[0]
    check_tensor("topk_ids", topk_ids, dtype=torch.int32, shape=(t, None), device=device)
    check_tensor("topk_weights", topk_weights, dtype=torch.float32, shape=(t, topk_ids.shape[1]), device=device)
    check_int("local_expert_offset", local_expert_offset, minimum=0)
    if out is None:
        raise ValueError("out: expected a [R >= T, H] bf16 buffer, got None")
    check_out("out", out, rows=t, cols=hidden_size, dtype=torch.bfloat16, device=device)


def capturing() -> bool:
    """True while the current CUDA stream is capturing a graph (value checks must not sync)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_bool(name: str, value: object) -> bool:
    """Validate a flag: only ``True`` or ``False`` (a string such as ``"no"`` is truthy, so it is refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


def check_str(name: str, value: object) -> str:
    """Validate a string argument."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, got {type(value).__name__} {value!r}")
    return value


def check_real(name: str, value: object, *, positive: bool = False) -> float:
    """Validate a finite real number (int or float, not bool); with ``positive``, ``> 0``. Returns a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name}: expected a finite {'positive ' if positive else ''}float, got {value}")
    return value


def check_device(name: str, value: object) -> torch.device:
    """Validate a device argument (a ``torch.device`` or a string torch parses as one)."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError as exc:
            raise ValueError(f"{name}: expected a device such as 'cpu' or 'cuda:0', got {value!r}") from exc
    raise TypeError(f"{name}: expected a torch.device or str, got {type(value).__name__} {value!r}")


#: Elements per pass of :func:`check_scale_values`, so checking a large scale tensor needs
#: bounded temporary memory (an NVFP4 layer of DeepSeek-V3 has ~7e8 block scales).
_SCALE_CHUNK = 1 << 24


def check_scale_values(name: str, scale: torch.Tensor, *, allow_zero: bool) -> torch.Tensor:
    """Refuse scales that are not finite, negative, or (unless ``allow_zero``) zero.

    Raises ``ValueError`` naming ``name``, the index of the first bad element and its value.
    One pass over the tensor in chunks and a host synchronisation: call it once where the
    scales are built (containers, checkpoint reads), never on the forward path. Skipped while a
    CUDA graph is being captured (values cannot be read then).
    """
    if capturing() or scale.numel() == 0:
        return scale
    flat = scale.reshape(-1)
    for start in range(0, flat.numel(), _SCALE_CHUNK):
        chunk = flat[start : start + _SCALE_CHUNK].float()
        bad = ~torch.isfinite(chunk) | (chunk < 0 if allow_zero else chunk <= 0)
        if bool(bad.any()):
            flat_index = start + int(bad.nonzero()[0, 0])
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), scale.shape))
            want = "finite and >= 0" if allow_zero else "finite and > 0"
            raise ValueError(
                f"{name}: expected scales {want}, got {_value_text(flat[flat_index])} at index "
                f"{list(index)} (shape {tuple(scale.shape)})"
            )
    return scale


def _value_text(element: torch.Tensor) -> str:
    """A 0-d tensor's value as its own precision prints it (fp32 -0.001 as ``-0.001``, not 17 digits)."""
    return str(element.float().cpu().numpy())


def check_finite(name: str, t: torch.Tensor) -> None:
    """Refuse a tensor holding NaN or +-inf, naming it and the first bad index (one host sync)."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        index = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(f"{name}: expected finite values, got {_value_text(t[tuple(index)])} at index {index}")


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the memory spans of ``a`` and ``b`` intersect (host-only pointer arithmetic)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    a0 = a.data_ptr()
    b0 = b.data_ptr()
    a1 = a0 + _span_bytes(a)
    b1 = b0 + _span_bytes(b)
    return a0 < b1 and b0 < a1


def _span_bytes(t: torch.Tensor) -> int:
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True) if size > 0)
    return (last + 1) * t.element_size()
