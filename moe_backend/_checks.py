"""Argument validation shared by every public entry point.

Each check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong
shape, device, layout or value) with a message that names the argument, what
was expected and what was given.
"""

from __future__ import annotations

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
        want = f"shape {expected}" if expected else f"a {ndim}-D tensor"
        raise ValueError(f"{name}: expected {want}, got shape {tuple(t.shape)}")
    if shape is not None:
        for axis, (want, got) in enumerate(zip(shape, t.shape)):
            if want is not None and want != got:
                raise ValueError(
                    f"{name}: expected shape {expected}, got {tuple(t.shape)} (axis {axis})"
                )
    if device is not None and not same_device(t.device, device):
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous tensor, got strides {tuple(t.stride())}"
        )
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


def check_out(name: str, out: Optional[torch.Tensor], *, rows: int, cols: int,
              dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """Validate an ``out=`` buffer: 2-D ``[R, cols]`` with ``R >= rows``, contiguous."""
    if out is None:
        return None
    check_tensor(name, out, dtype=dtype, shape=(None, cols), device=device)
    if out.shape[0] < rows:
        raise ValueError(
            f"{name}: expected at least {rows} rows (one per token), got shape {tuple(out.shape)}"
        )
    return out


def capturing() -> bool:
    """True while the current CUDA stream is capturing a graph (value checks must not sync)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
