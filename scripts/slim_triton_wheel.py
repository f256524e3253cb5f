"""Build a slim Triton wheel for a machine that has its own CUDA toolkit (the H200: CUDA 13.0).

A Triton wheel (3.8.0: 248 MB) is mostly things such a machine does not need: the bundled
CUDA tools (``ptxas``, ``ptxas-blackwell``, ``cuobjdump``, ``nvdisasm``), the CUPTI
profiling libraries, Triton's test tools, and the debug sections of its shared libraries (``libtriton.so``
is 482 MB, 190 MB without them). This script downloads the CPython manylinux x86_64 wheel
of one Triton release, drops the tools and CUPTI, strips the debug information from every
ELF shared library (``strip --strip-unneeded``: the dynamic symbols stay), and repacks the
wheel with a regenerated ``RECORD``. Kept: ``libdevice.10.bc``, the CUDA headers that
Triton's launcher stub is built with, everything else.

Install and use it on the GPU machine (no internet needed there)::

    pip install --no-deps --target /tmp/t38 triton-3.8.0-cp312-*.whl
    export PYTHONPATH=/tmp/t38                            # this Triton before the installed one
    export TRITON_PTXAS_PATH=/usr/local/cuda/bin/ptxas     # the tools the wheel no longer has
    export TRITON_CUOBJDUMP_PATH=/usr/local/cuda/bin/cuobjdump
    export TRITON_NVDISASM_PATH=/usr/local/cuda/bin/nvdisasm

(``TRITON_PTXAS_BLACKWELL_PATH`` would serve sm_100 and later; Hopper uses ``ptxas``.)
Triton's profiler (proton) needs CUPTI and does not work from the slim wheel.

Usage: ``python scripts/slim_triton_wheel.py --version 3.8.0 --out DIR [--python 3.12]
[--wheel PATH]`` (``--wheel``: slim a wheel already downloaded).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import List, Optional

logger = logging.getLogger("slim_triton_wheel")

#: Path prefixes inside the wheel that are dropped: the CUDA tools, the CUPTI libraries and
#: Triton's own test tools (FileCheck, the instrumentation and plugin test libraries).
DROPPED_PREFIXES = (
    "triton/backends/nvidia/bin/",
    "triton/backends/nvidia/lib/cupti",
    "triton/FileCheck",
    "triton/instrumentation/libGPUInstrumentationTestLib.so",
    "triton/plugins/libTritonPluginsTestLib.so",
)
ELF_MAGIC = b"\x7fELF"


def download_wheel(version: str, python: str, dest: Path) -> Path:
    """``pip download`` the manylinux x86_64 CPython wheel of Triton ``version`` for ``python``."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python,
            "--platform",
            "manylinux_2_28_x86_64",
            "--implementation",
            "cp",
            f"triton=={version}",
            "-d",
            str(dest),
        ],
        check=True,
    )
    wheels = sorted(dest.glob(f"triton-{version}-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one triton {version} wheel in {dest}, found {[w.name for w in wheels]}")
    return wheels[0]


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _strip(data: bytes, workdir: Path) -> bytes:
    """``data`` (an ELF file) without debug sections and local symbols."""
    path = workdir / "elf"
    path.write_bytes(data)
    subprocess.run(["strip", "--strip-unneeded", str(path)], check=True)
    return path.read_bytes()


def slim_wheel(source: Path, out_dir: Path) -> Path:
    """Write the slim copy of wheel ``source`` into ``out_dir`` (same file name); return its path."""
    if shutil.which("strip") is None:
        raise RuntimeError("strip (binutils) is needed to remove the debug sections")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / source.name
    if target.resolve() == source.resolve():
        raise ValueError(f"out: must differ from the source wheel's folder, got {out_dir}")
    records: List[str] = []
    record_name = None
    with (
        tempfile.TemporaryDirectory() as tmp,
        zipfile.ZipFile(source) as src,
        zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as dst,
    ):
        for info in src.infolist():
            name = info.filename
            if name.endswith(".dist-info/RECORD"):
                record_name = name
                continue
            if name.startswith(DROPPED_PREFIXES):
                continue
            data = src.read(info)
            if data.startswith(ELF_MAGIC) and ".so" in Path(name).name:
                data = _strip(data, Path(tmp))
            out_info = zipfile.ZipInfo(name, date_time=info.date_time)
            out_info.external_attr = info.external_attr  # keeps the executable bits
            out_info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(out_info, data)
            records.append(f"{name},{_record_hash(data)},{len(data)}")
        if record_name is None:
            raise ValueError(f"wheel: {source} has no .dist-info/RECORD")
        records.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(records) + "\n")
    logger.info("%s: %.1f MiB -> %.1f MiB", source.name, source.stat().st_size / 2**20, target.stat().st_size / 2**20)
    return target


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", required=True, help="Triton release, e.g. 3.8.0")
    parser.add_argument("--python", default="3.12", help="CPython version of the wheel (default 3.12)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the slim wheel")
    parser.add_argument("--wheel", type=Path, help="slim this downloaded wheel instead of downloading one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        source = args.wheel or download_wheel(args.version, args.python, Path(tmp))
        if not source.name.startswith(f"triton-{args.version}-"):
            raise ValueError(f"wheel: expected a triton {args.version} wheel, got {source.name}")
        print(slim_wheel(source, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
