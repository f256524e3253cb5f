"""The SGLang integration tests need the real sglang package (scripts/ci_install_sglang.sh); skip without it.

Each check runs in its own Python process: SGLang loads plugins once per
process, and the plugin hooks SGLang's classes for the life of the process. On a
CPU-only torch the processes get the torchvision folder the install script made
and ``cpu_site/sitecustomize.py`` on their path.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CPU_EXTRAS = Path(sys.prefix) / "share" / "moe_backend" / "sglang-cpu"

collect_ignore = ["layer_check.py", "cpu_site"]


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("sglang") is not None:
        return
    skip = pytest.mark.skip(reason="sglang is not installed (scripts/ci_install_sglang.sh installs it)")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


def run_python(code_or_args, timeout=600, env=None):
    """Run ``python -c code`` (str) or ``python *args`` (list) in this folder with ``env``."""
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    path = [str(HERE / "cpu_site"), str(CPU_EXTRAS), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), **(env or {}))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)


@pytest.fixture
def python():
    return run_python
