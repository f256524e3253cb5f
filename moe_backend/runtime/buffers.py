"""Workspace and output buffers shared by every layer of a model (docs/design.md §9).

Layers of one model run one after another on a stream, so one buffer per
(device, dtype, width, role) serves all of them: a 61-layer DeepSeek-V3 pays for
one layer's workspaces instead of 61. Buffers are sized for the engine's max
tokens and handed out as ``[:rows]`` views, so the addresses a CUDA graph
captured stay valid at every replay. ``role`` separates buffers that are alive
at the same time within one call (an accumulator and an intermediate of the
same width must not alias).

Growing a buffer re-allocates it, which would leave a captured graph pointing at
freed memory: inside a capture that is an error; outside, the buffer grows once
to the new maximum.
"""

from __future__ import annotations

import logging
import threading
from typing import Dict, Tuple

import torch

from .._checks import capturing, check_device, check_int, check_str

logger = logging.getLogger(__name__)

Key = Tuple[str, torch.dtype, int, str]


class BufferGrowthInCaptureError(RuntimeError):
    """A buffer would have to grow while a CUDA graph is being captured."""


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and capturing()


class BufferPool:
    """Buffers keyed by (device, dtype, width, role); 2-D ``[rows_capacity, width]``.

    ``reserve(max_rows)`` sets the row count every new buffer gets (the engine's
    max tokens times whatever multiple a role needs is the caller's to pass as
    ``rows``); ``get`` returns a ``[:rows]`` view, growing the buffer once when
    ``rows`` exceeds its capacity outside a capture.
    """

    def __init__(self, max_rows: int = 0) -> None:
        self._buffers: Dict[Key, torch.Tensor] = {}
        self._max_rows = check_int("max_rows", max_rows, minimum=0)
        self._lock = threading.Lock()

    @property
    def max_rows(self) -> int:
        return self._max_rows

    def reserve(self, max_rows: int) -> None:
        """Raise the row capacity new and grown buffers get (never lowers it)."""
        check_int("max_rows", max_rows, minimum=0)
        self._max_rows = max(self._max_rows, max_rows)

    def get(self, rows: int, width: int, dtype: torch.dtype, device: torch.device, role: str) -> torch.Tensor:
        """A ``[rows, width]`` view of the (device, dtype, width, role) buffer; contents undefined."""
        check_int("rows", rows, minimum=0)
        check_int("width", width, minimum=1)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__} {dtype!r}")
        device = check_device("device", device)
        check_str("role", role)
        key = (_device_key(device), dtype, width, role)
        with self._lock:
            buf = self._buffers.get(key)
            if buf is None or buf.shape[0] < rows:
                if _capturing(device):
                    have = 0 if buf is None else buf.shape[0]
                    raise BufferGrowthInCaptureError(
                        f"buffer {role!r} ({dtype}, width {width}) on {key[0]} holds {have} rows but "
                        f"{rows} are needed while a CUDA graph is being captured; reserve the engine's "
                        f"max tokens (warm up) before capture"
                    )
                capacity = max(rows, self._max_rows)
                logger.debug("buffer %s %s width %d: %d rows", role, dtype, width, capacity)
                buf = torch.empty(capacity, width, dtype=dtype, device=device)
                self._buffers[key] = buf
        return buf[:rows]

    def counters(self, width: int, device: torch.device, role: str) -> torch.Tensor:
        """The ``[width]`` int32 ``role`` counters, all 0 when first allocated; every user must
        leave them at 0 (kernels that count up return them to 0 before the call ends)."""
        check_int("width", width, minimum=1)
        device = check_device("device", device)
        check_str("role", role)
        key = (_device_key(device), torch.int32, width, "counters:" + role)
        with self._lock:
            buf = self._buffers.get(key)
            if buf is None:
                if _capturing(device):
                    raise BufferGrowthInCaptureError(
                        f"counters {role!r} (width {width}) on {key[0]} are first needed while a CUDA graph is "
                        f"being captured; run the layer once (warm up) before capture"
                    )
                buf = torch.zeros(1, width, dtype=torch.int32, device=device)
                self._buffers[key] = buf
        return buf[0]

    def nbytes(self) -> int:
        """Bytes held by every buffer of the pool."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Drop every buffer (their memory returns to the allocator once no view is alive)."""
        with self._lock:
            self._buffers.clear()


#: The process-wide pool every layer uses unless given its own.
DEFAULT_POOL = BufferPool()


def workspace(rows: int, width: int, dtype: torch.dtype, device: torch.device, role: str) -> torch.Tensor:
    """A ``[rows, width]`` view of the shared ``role`` buffer of :data:`DEFAULT_POOL` (contents undefined)."""
    return DEFAULT_POOL.get(rows, width, dtype, device, role)


def counters(width: int, device: torch.device, role: str) -> torch.Tensor:
    """:meth:`BufferPool.counters` of :data:`DEFAULT_POOL`: ``[width]`` int32, 0 between calls."""
    return DEFAULT_POOL.counters(width, device, role)
