"""The pytest step the GPU check scripts (``gpu_check_*.py``) run before timing anything."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]


def run_tests(junit_xml: Path, test_files: Sequence[str]) -> dict:
    """Run ``test_files`` (paths relative to the repository root) in this process, the JUnit
    report to ``junit_xml``; return the exit code, whether they passed and the seconds taken."""
    import pytest

    started = time.perf_counter()
    code = pytest.main(
        ["-q", "-p", "no:cacheprovider", "--tb=short", "-rfE", f"--junitxml={junit_xml}"]
        + [str(ROOT / f) for f in test_files]
    )
    return {"exit_code": int(code), "passed": int(code) == 0, "seconds": round(time.perf_counter() - started, 1)}
