"""The built wheel installs everything under moe_backend: no generic top-level names."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import moe_backend

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="needs setuptools to build")
def test_wheel_namespace(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    # The version is written once, in moe_backend/__init__.py; the wheel takes it from there.
    (wheel,) = tmp_path.glob(f"moe_backend-{moe_backend.__version__}-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert f"\nVersion: {moe_backend.__version__}\n" in zipfile.ZipFile(wheel).read(metadata).decode()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"moe_backend"}
    for module in (
        "moe_backend/weights/__init__.py",
        "moe_backend/integrations/vllm/__init__.py",
        "moe_backend/integrations/sglang/__init__.py",
        "moe_backend/quant/nvfp4.py",
    ):
        assert module in names
    for init in (
        list(ROOT.glob("moe_backend/**/__init__.py"))
        + list(ROOT.glob("weights/**/__init__.py"))
        + list(ROOT.glob("integrations/**/__init__.py"))
    ):
        rel = init.relative_to(ROOT).as_posix()
        installed = rel if rel.startswith("moe_backend/") else f"moe_backend/{rel}"
        assert installed in names, f"{rel} is missing from pyproject's packages list"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "moe-backend = moe_backend.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_subpackages_resolve():
    import moe_backend.integrations.vllm
    import moe_backend.weights

    assert Path(moe_backend.weights.__file__).parent == ROOT / "weights"
    assert Path(moe_backend.integrations.vllm.__file__).parent == ROOT / "integrations" / "vllm"
