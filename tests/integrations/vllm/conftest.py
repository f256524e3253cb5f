"""The vLLM integration tests need the real vllm package (scripts/ci_install_vllm.sh); skip without it.

Each check runs in its own Python process: vLLM loads plugins once per process,
and the plugin changes vLLM's classes for the life of the process.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

collect_ignore = ["layer_check.py"]


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="vllm is not installed (scripts/ci_install_vllm.sh installs it)")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


def run_python(code_or_args, timeout=300, env=None):
    """Run ``python -c code`` (str) or ``python *args`` (list) with VLLM_TARGET_DEVICE=cpu and ``env``."""
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", **(env or {}))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)


@pytest.fixture
def python():
    return run_python
