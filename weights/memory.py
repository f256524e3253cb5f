"""Peak resident memory (RSS) of this process over a block of code: how streaming is checked.

Linux only: the kernel's high-water mark (``VmHWM`` in ``/proc/self/status``) is reset to
the current RSS on entry by writing ``5`` to ``/proc/self/clear_refs``, so the peak is
exact, with no sampling. File pages mapped by safetensors count, as they do for the OOM killer.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def supported() -> bool:
    """True where the peak can be measured (Linux with ``/proc/self/clear_refs``)."""
    return sys.platform.startswith("linux") and _STATUS.is_file() and _CLEAR_REFS.exists()


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:  # e.g. a sandbox that forbids it
        return False
    return True


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"{_STATUS}: no {field} line")


@dataclass
class PeakRSS:
    """``start``: RSS on entry; ``peak``: highest RSS inside the block (bytes; set on exit)."""

    start: int
    peak: int = 0

    @property
    def growth(self) -> int:
        """Peak above the RSS on entry, in bytes."""
        return self.peak - self.start


@contextmanager
def track_peak_rss() -> Iterator[PeakRSS]:
    """Measure the peak RSS of the block: ``with track_peak_rss() as m: ...; m.growth``."""
    if not (supported() and _reset_peak()):
        raise RuntimeError("peak RSS measurement needs Linux with a writable /proc/self/clear_refs")
    result = PeakRSS(_status_bytes("VmRSS"))
    try:
        yield result
    finally:
        result.peak = _status_bytes("VmHWM")
