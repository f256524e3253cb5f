"""scripts/slim_triton_wheel.py: what it drops, strips and records (a small wheel, no download)."""

import _ctypes
import base64
import hashlib
import importlib.util
import shutil
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slim_triton_wheel.py"
pytestmark = pytest.mark.skipif(shutil.which("strip") is None, reason="needs binutils' strip")


def _slim():
    spec = importlib.util.spec_from_file_location("slim_triton_wheel", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wheel(path: Path, library: bytes) -> Path:
    wheel = path / "triton-3.8.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        ptxas = zipfile.ZipInfo("triton/backends/nvidia/bin/ptxas")
        ptxas.external_attr = 0o755 << 16
        zf.writestr(ptxas, b"\x7fELF tool")
        zf.writestr("triton/backends/nvidia/lib/cupti/libcupti.so.12", b"\x7fELF cupti")
        zf.writestr("triton/backends/nvidia/lib/libdevice.10.bc", b"bitcode")
        lib = zipfile.ZipInfo("triton/_C/libtriton.so")
        lib.external_attr = 0o755 << 16
        zf.writestr(lib, library)
        zf.writestr("triton/__init__.py", "__version__ = '3.8.0'\n")
        zf.writestr("triton-3.8.0.dist-info/RECORD", "stale\n")
    return wheel


def test_drops_tools_strips_libraries_and_rewrites_record(tmp_path):
    library = Path(_ctypes.__file__).read_bytes()  # a real ELF shared library
    (tmp_path / "in").mkdir()
    slim = _slim().slim_wheel(_wheel(tmp_path / "in", library), tmp_path / "out")
    with zipfile.ZipFile(slim) as zf:
        names = set(zf.namelist())
        assert names == {
            "triton/backends/nvidia/lib/libdevice.10.bc",
            "triton/_C/libtriton.so",
            "triton/__init__.py",
            "triton-3.8.0.dist-info/RECORD",
        }
        stripped = zf.read("triton/_C/libtriton.so")
        assert stripped.startswith(b"\x7fELF") and len(stripped) <= len(library)
        assert zf.getinfo("triton/_C/libtriton.so").external_attr >> 16 & 0o111
        rows = [row.split(",") for row in zf.read("triton-3.8.0.dist-info/RECORD").decode().splitlines()]
        assert {r[0] for r in rows} == names
        for name, digest, size in rows:
            if name.endswith("RECORD"):
                assert digest == size == ""
                continue
            data = zf.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, int(size)) == (f"sha256={expected}", len(data))


def test_refuses_to_overwrite_its_source(tmp_path):
    wheel = _wheel(tmp_path, Path(_ctypes.__file__).read_bytes())
    with pytest.raises(ValueError, match="out: must differ"):
        _slim().slim_wheel(wheel, tmp_path)
