"""Runtime support: shared buffers, zeroing streams, graph safety."""

from .buffers import DEFAULT_POOL, BufferGrowthInCaptureError, BufferPool

__all__ = ["DEFAULT_POOL", "BufferGrowthInCaptureError", "BufferPool"]
