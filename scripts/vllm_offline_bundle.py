"""Pack vLLM and the packages its offline ``LLM(...).generate`` path imports for a Hopper machine
without internet, in parts of at most ``--part-mib`` (xz-compressed tar files).

The vLLM wheel is unpacked as a plain directory (its dist-info kept, so
``importlib.metadata.version("vllm")`` works) and stripped of what a DeepSeek-V3 (MLA)
model on an H100 does not use: the FlashAttention 2 binary (Hopper runs FA3, which vLLM
0.26 needs for MLA prefill), the Rust front end ``vllm-rs``, and the DeepGEMM and
SM100 FMHA sources with their CUDA headers (``third_party/deep_gemm``,
``third_party/fmha_sm100``; run with ``VLLM_USE_DEEP_GEMM=0``). With ``--prune-sm90``
the CUDA fat binaries of the kept extensions lose the payloads an SM90 GPU cannot load
(cubins of other architectures, PTX newer than compute_90): they are overwritten with
zeros, which the compressor removes, and every entry header stays as it was, so the
driver picks the same image on an H100 as from the original file.

The small wheels are installed next to vLLM (``pip install --target``, no dependencies).
On the target machine each part unpacks into one directory that goes on ``PYTHONPATH``::

    python3 -c "import sys,tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='fully_trusted')" \\
        PART.tar /tmp/site

Usage::

    python scripts/vllm_offline_bundle.py VLLM_WHEEL OUT_PREFIX --wheels DIR [--prune-sm90]
        [--part-mib 55] [--python python3.12]

writes ``OUT_PREFIX-part1.tar``, ``-part2.tar``, ...: large binaries first, then the rest.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, List, Tuple

#: Paths under the wheel's ``vllm/`` that are left out.
DROP = ("vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm-rs", "third_party/deep_gemm", "third_party/fmha_sm100")
#: Files at least this large go into the first parts, one part each while they fit.
LARGE = 8 << 20
FATBIN_MAGIC = 0xBA55ED50


def _sections(data: bytes) -> dict:
    """ELF64 section name -> (file offset, size)."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    out = {}
    for name, _, _, _, offset, size in headers:
        end = data.index(b"\0", strtab + name)
        out[data[strtab + name:end].decode()] = (offset, size)
    return out


def fatbin_entries(data: bytes) -> Iterator[Tuple[int, int, int, int]]:
    """``(kind, arch, payload offset, payload size)`` of every entry in ``.nv_fatbin``
    (kind 1: PTX, 2: cubin; arch 90 for sm_90/sm_90a)."""
    sections = _sections(data)
    if ".nv_fatbin" not in sections:
        return
    pos, end = sections[".nv_fatbin"]
    end += pos
    while pos + 16 <= end:
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # containers are 8-byte aligned
            continue
        entry, container_end = pos + header_size, pos + header_size + fat_size
        while entry < container_end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            if entry_header == 0:
                break
            arch, = struct.unpack_from("<I", data, entry + 28)
            yield kind, arch, entry + entry_header, payload
            entry += entry_header + payload
        pos = container_end


def prune_for_sm90(path: Path) -> int:
    """Zero the fatbin payloads an SM90 GPU cannot use; returns the bytes zeroed."""
    data = bytearray(path.read_bytes())
    zeroed = 0
    for kind, arch, offset, size in list(fatbin_entries(bytes(data))):
        usable = arch == 90 if kind == 2 else arch <= 90
        if not usable:
            data[offset:offset + size] = bytes(size)
            zeroed += size
    path.write_bytes(bytes(data))
    return zeroed


def stage(wheel: Path, wheels: Path, site: Path, python: str, prune: bool) -> None:
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    for rel in DROP:
        target = site / "vllm" / rel
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    if prune:
        for so in sorted((site / "vllm").rglob("*.so")):
            zeroed = prune_for_sm90(so)
            if zeroed:
                print(f"pruned {so.relative_to(site)}: {zeroed / 2**20:.1f} MiB of non-SM90 code zeroed")
    found = sorted(str(w) for w in wheels.glob("*.whl"))
    if found:
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(site), *found], check=True)


def _xz(paths: List[Path], root: Path, out=None) -> int:
    """xz -9e of a tar of ``paths`` (relative to ``root``) into ``out``; returns its size."""
    tar = subprocess.Popen(["tar", "-C", str(root), "--no-recursion", "-cf", "-", "-T", "-"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    xz = subprocess.Popen(["xz", "-9e", "-T2", "-c"], stdin=tar.stdout,
                          stdout=subprocess.PIPE if out is None else out)
    tar.stdout.close()
    tar.stdin.write("".join(f"{p.relative_to(root)}\n" for p in paths).encode())
    tar.stdin.close()
    size = len(xz.communicate()[0]) if out is None else (xz.wait(), 0)[1]
    if tar.wait() or xz.returncode:
        raise SystemExit("tar | xz failed")
    return size


def write_parts(site: Path, prefix: Path, limit: int) -> List[Path]:
    files = sorted((p for p in site.rglob("*") if p.is_file() or p.is_symlink()),
                   key=lambda p: -p.lstat().st_size)
    large = [p for p in files if p.lstat().st_size >= LARGE]
    small = [p for p in files if p.lstat().st_size < LARGE]
    with ThreadPoolExecutor(2) as pool:
        sizes = list(pool.map(lambda p: _xz([p], site), large))
    groups: List[list] = []
    for p, size in zip(large, sizes, strict=True):  # first fit by compressed size
        for g in groups:
            if g[0] + size <= limit:
                g[0] += size
                g[1].append(p)
                break
        else:
            groups.append([size, [p]])
    groups.append([0, small])
    parts = []
    for i, (_, members) in enumerate(groups, 1):
        out = Path(f"{prefix}-part{i}.tar")
        with open(out, "wb") as f:
            _xz(members, site, f)
        size = out.stat().st_size
        print(f"{out}: {size / 2**20:.1f} MiB, {len(members)} files")
        if size > limit:
            raise SystemExit(f"{out} is larger than {limit / 2**20:.0f} MiB: split the large files differently")
        parts.append(out)
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="the vLLM wheel")
    parser.add_argument("prefix", type=Path, help="output prefix: PREFIX-partN.tar")
    parser.add_argument("--wheels", type=Path, required=True, help="directory of the small wheels to add")
    parser.add_argument("--prune-sm90", action="store_true", help="zero fatbin payloads an SM90 GPU cannot load")
    parser.add_argument("--part-mib", type=int, default=55)
    parser.add_argument("--python", default=sys.executable, help="the pip that installs the small wheels")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vllm_bundle_") as tmp:
        site = Path(tmp) / "site"
        stage(args.wheel, args.wheels, site, args.python, args.prune_sm90)
        args.prefix.parent.mkdir(parents=True, exist_ok=True)
        write_parts(site, args.prefix, args.part_mib << 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
