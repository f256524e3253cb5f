"""Runtime support: shared buffers, zeroing streams, graph safety."""

from .buffers import DEFAULT_POOL, BufferGrowthInCaptureError, BufferPool, counters, workspace

__all__ = ["DEFAULT_POOL", "BufferGrowthInCaptureError", "BufferPool", "counters", "workspace"]
