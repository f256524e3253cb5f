"""Pack vLLM and the packages its offline ``LLM(...).generate`` path imports for a Hopper machine
without internet, in parts of at most ``--part-mib`` (xz-compressed tar files). One command::

    python scripts/vllm_offline_bundle.py OUT_PREFIX --prune-sm90 [--vllm 0.26.0]
        [--present scripts/h200_image_packages.txt] [--part-mib 55] [--xz-level 9e]

downloads the vLLM wheel, resolves the wheels it needs on the target and writes
``OUT_PREFIX-part1.tar``, ``-part2.tar``, ... (large binaries first, then the rest) and
``OUT_PREFIX-manifest.json`` (what was carried, skipped and found on the target).

**What is carried.** vLLM's ``Requires-Dist`` and theirs, recursively (markers evaluated for
CPython 3.12 on Linux x86-64, extras followed), less what the target has (``--present``: one
``name`` or ``name==version`` a line, e.g. ``pip list --format=freeze`` there; a version that a
requirement excludes is carried anyway) and less :data:`SKIP`: the GPU kernel and media packages a
DeepSeek-V3 (MLA) model on Hopper never imports, gigabytes between them. Everything else goes in,
so the offline ``LLM(...)`` finds what it imports at start-up (``llguidance``, ``xgrammar``,
``mistral_common`` and their requirements) without a hand-picked list. Each wheel is fetched with
``pip download --no-deps`` for the target's tags and installed into the bundle with
``pip install --target`` (no dependencies, the target's tags).

The vLLM wheel is unpacked as a plain directory (its dist-info kept, so
``importlib.metadata.version("vllm")`` works) and stripped of what a DeepSeek-V3 (MLA)
model on Hopper does not use: the FlashAttention 2 binary (Hopper runs FA3, which vLLM
0.26 needs for MLA prefill), the Rust front end ``vllm-rs``, and the DeepGEMM and
SM100 FMHA sources with their CUDA headers (``third_party/deep_gemm``,
``third_party/fmha_sm100``; run with ``VLLM_USE_DEEP_GEMM=0``). With ``--prune-sm90``
the CUDA fat binaries of the kept extensions lose the payloads an SM90 GPU cannot load
(cubins of other architectures, PTX newer than compute_90): they are overwritten with
zeros, which the compressor removes, and every entry header stays as it was, so the
driver picks the same image on an H100 or H200 as from the original file.

On the target machine every part unpacks into one directory that goes on ``PYTHONPATH``::

    for p in PREFIX-part*.tar; do python3 -c \
        "import sys,tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='fully_trusted')" \
        "$p" /tmp/site; done
    export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional, Tuple

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

#: Paths under the wheel's ``vllm/`` that are left out.
DROP = ("vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm-rs", "third_party/deep_gemm", "third_party/fmha_sm100")
#: Files at least this large go into the first parts, one part each while they fit.
LARGE = 8 << 20
FATBIN_MAGIC = 0xBA55ED50
#: xz level whose sizes place the large files into parts.
ESTIMATE_LEVEL = "1"
#: The GPU machines' interpreter, for environment markers and wheel tags.
TARGET_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "platform_machine": "x86_64",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
}
#: pip's options for wheels that install on the target (pip matches manylinux tags exactly).
TARGET_TAGS = (
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    *(a for n in range(39, 16, -1) for a in ("--platform", f"manylinux_2_{n}_x86_64")),
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "manylinux1_x86_64",
)
#: vLLM requirements not carried, with the reason; together gigabytes. vLLM 0.26 imports each only
#: inside the backend that uses it (FlashInfer's attention and sampler, FlashAttention 4 and SM100
#: kernels for the CuTe DSL packages, TileLang's mHC kernels, video decoding, its loaders), none of
#: which a DeepSeek-V3 (MLA) model on Hopper selects; the single-GPU runs in docs/performance.md ran
#: without FlashInfer.
SKIP = {
    "torchcodec": "video decoding (multimodal models)",
    "pynvvideocodec": "video decoding (multimodal models)",
    "flashinfer-python": "FlashInfer kernels: optional on Hopper (run with VLLM_USE_FLASHINFER_SAMPLER=0)",
    "apache-tvm-ffi": "the FFI of FlashInfer and TileLang",
    "tilelang": "TileLang kernels of other models",
    "nvidia-cudnn-frontend": "cuDNN attention, not chosen for MLA on Hopper",
    "nvidia-cutlass-dsl": "CuTe DSL kernels (FlashAttention 4, SM100 FMHA), not for SM90",
    "quack-kernels": "CuTe DSL kernels (FlashAttention 4), not for SM90",
    "tokenspeed-mla": "SM100 MLA kernels",
    "humming-kernels": "CuTe DSL kernels of other GPUs",
    "fastsafetensors": "an optional loader (--load-format fastsafetensors)",
}
#: Packages of the target kept even where a requirement excludes their version, with the reason.
KEEP = {
    "numpy": "the image's torch, OpenCV and Numba use it; mistral_common caps numpy<2.4 on Python <= 3.12 "
    "only, in its metadata (no cap on 3.13), and nothing checks it at import",
}


def _sections(data: bytes) -> dict:
    """ELF64 section name -> (file offset, size)."""
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    out = {}
    for name, _, _, _, offset, size in headers:
        end = data.index(b"\0", strtab + name)
        out[data[strtab + name : end].decode()] = (offset, size)
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
            (arch,) = struct.unpack_from("<I", data, entry + 28)
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
            data[offset : offset + size] = bytes(size)
            zeroed += size
    path.write_bytes(bytes(data))
    return zeroed


@dataclass(frozen=True)
class Dist:
    """One wheel: its canonical ``name``, ``version``, ``Requires-Dist`` lines and file."""

    name: str
    version: str
    requires: Tuple[str, ...]
    path: Optional[Path] = None


@dataclass
class Resolution:
    """What :func:`resolve` decided: ``carried`` wheels by name; ``skipped`` name -> reason;
    ``present`` name -> the target's version (None: not known) and what was asked of it;
    ``replaced``: present packages whose known version a requirement excludes (carried instead);
    ``kept``: those kept all the same (``keep``), with the reason."""

    carried: Dict[str, Dist] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    present: Dict[str, dict] = field(default_factory=dict)
    replaced: Dict[str, dict] = field(default_factory=dict)
    kept: Dict[str, str] = field(default_factory=dict)


#: ``fetch(name, specifier, extras) -> Dist``: the newest wheel of ``name`` within ``specifier``.
Fetch = Callable[[str, SpecifierSet, FrozenSet[str]], Dist]


def applies(requirement: Requirement, extras: FrozenSet[str], env: Dict[str, str]) -> bool:
    """Does a ``Requires-Dist`` line apply on ``env`` when its package was asked for with ``extras``?"""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**env, "extra": e}) for e in ("", *extras))


def resolve(
    roots: List[str],
    fetch: Fetch,
    present: Dict[str, Optional[str]],
    skip: Dict[str, str],
    keep: Dict[str, str],
    env: Dict[str, str],
) -> Resolution:
    """The wheels to carry for the requirement lines ``roots`` (a package's ``Requires-Dist``), and why
    the others are not carried.

    Breadth first; a name asked for again with a narrower specifier or more extras is fetched again
    within every specifier seen so far. ``present`` (canonical name -> version or None) and ``skip``
    (canonical name -> reason) end the walk at a name; a present version that a specifier excludes
    is carried and listed in ``replaced``, unless ``keep`` (canonical name -> reason) names it. A requirement
    pip cannot meet stops with pip's error.
    """
    result = Resolution()
    specs: Dict[str, SpecifierSet] = {}
    extras: Dict[str, FrozenSet[str]] = {}
    queue = deque((r, "the root") for r in map(Requirement, roots) if applies(r, frozenset(), env))
    while queue:
        req, parent = queue.popleft()
        name = canonicalize_name(req.name)
        if name in skip:
            result.skipped[name] = skip[name]
            continue
        if name in present and name not in result.carried:
            have = present[name]
            entry = result.present.setdefault(name, {"version": have, "required": []})
            entry["required"].append(f"{parent}: {req.specifier or 'any'}")
            if have is None or req.specifier.contains(have, prereleases=True):
                continue
            if name in keep:
                result.kept[name] = keep[name]
                continue
            result.replaced[name] = entry
        spec = specs.get(name, SpecifierSet()) & req.specifier
        wanted = extras.get(name, frozenset()) | frozenset(req.extras)
        have_dist = result.carried.get(name)
        if have_dist is not None and spec.contains(have_dist.version, prereleases=True) and wanted == extras[name]:
            continue
        specs[name], extras[name] = spec, wanted
        dist = fetch(name, spec, wanted)
        result.carried[name] = dist
        queue.extend(
            (sub, f"{name} {dist.version}") for sub in map(Requirement, dist.requires) if applies(sub, wanted, env)
        )
    return result


def read_present(path: Path) -> Dict[str, Optional[str]]:
    """``name`` or ``name==version`` lines (``#`` comments, ``pip list --format=freeze`` output)
    -> canonical name -> version or None."""
    present: Dict[str, Optional[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#")[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        present[canonicalize_name(name.strip())] = version.strip() or None
    return present


def wheel_dist(path: Path) -> Dist:
    """The :class:`Dist` of a wheel file, from its name and its ``METADATA``."""
    name, version, _, _ = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        headers = HeaderParser().parsestr(zf.read(meta).decode("utf-8"))
    return Dist(name, str(version), tuple(headers.get_all("Requires-Dist") or ()), path)


def pip_fetch(dest: Path) -> Fetch:
    """A :data:`Fetch` through ``pip download --no-deps`` of wheels for the target into ``dest``."""

    def fetch(name: str, spec: SpecifierSet, extras: FrozenSet[str]) -> Dist:
        print(f"fetch {name}{spec}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                *TARGET_TAGS,
                "-d",
                str(dest),
                f"{name}{spec}",
            ],
            check=True,
        )
        found = [
            wheel_dist(w) for w in dest.glob("*.whl") if canonicalize_name(parse_wheel_filename(w.name)[0]) == name
        ]
        fits = [d for d in found if spec.contains(d.version, prereleases=True)]
        if not fits:
            raise SystemExit(f"pip downloaded no wheel of {name}{spec} into {dest}")
        return max(fits, key=lambda d: parse_wheel_filename(d.path.name)[1])

    return fetch


def stage(wheel: Path, wheels: List[Path], site: Path, prune: bool) -> None:
    """Unpack, strip and (``prune``) SM90-prune the vLLM ``wheel`` into ``site``; install ``wheels`` beside it."""
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
    if wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                *TARGET_TAGS,
                "--target",
                str(site),
                *map(str, wheels),
            ],
            check=True,
        )


def _xz(paths: List[Path], root: Path, level: str, out=None) -> int:
    """``xz -LEVEL`` of a tar of ``paths`` (relative to ``root``) into ``out``; returns its size."""
    tar = subprocess.Popen(
        ["tar", "-C", str(root), "--no-recursion", "-cf", "-", "-T", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    xz = subprocess.Popen(
        ["xz", f"-{level}", "-T2", "-c"], stdin=tar.stdout, stdout=subprocess.PIPE if out is None else out
    )
    tar.stdout.close()
    tar.stdin.write("".join(f"{p.relative_to(root)}\n" for p in paths).encode())
    tar.stdin.close()
    size = len(xz.communicate()[0]) if out is None else (xz.wait(), 0)[1]
    if tar.wait() or xz.returncode:
        raise SystemExit("tar | xz failed")
    return size


def write_parts(site: Path, prefix: Path, limit: int, level: str) -> List[Path]:
    """``PREFIX-partN.tar`` (xz ``level``) of every file under ``site``, each at most ``limit`` bytes: the
    large files first fit into parts by their size at :data:`ESTIMATE_LEVEL` (an upper bound of the size
    at any stronger level, found in a fraction of the time), then one part of all the small files."""
    files = sorted((p for p in site.rglob("*") if p.is_file() or p.is_symlink()), key=lambda p: -p.lstat().st_size)
    large = [p for p in files if p.lstat().st_size >= LARGE]
    small = [p for p in files if p.lstat().st_size < LARGE]
    with ThreadPoolExecutor(2) as pool:
        sizes = list(pool.map(lambda p: _xz([p], site, ESTIMATE_LEVEL), large))
    groups: List[list] = []
    for p, size in zip(large, sizes, strict=True):  # first fit by the estimated compressed size
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
            _xz(members, site, level, f)
        size = out.stat().st_size
        print(f"{out}: {size / 2**20:.1f} MiB, {len(members)} files")
        if size > limit:
            raise SystemExit(f"{out} is larger than {limit / 2**20:.0f} MiB: split the large files differently")
        parts.append(out)
    return parts


def manifest(vllm: Dist, resolution: Resolution, parts: List[Path], level: str) -> dict:
    """The bundle's record: vLLM, the wheels carried, skipped and found on the target, the parts."""
    return {
        "vllm": vllm.version,
        "target": TARGET_ENV,
        "carried": {n: d.version for n, d in sorted(resolution.carried.items())},
        "skipped": dict(sorted(resolution.skipped.items())),
        "present_on_target": dict(sorted(resolution.present.items())),
        "replaced_on_target": dict(sorted(resolution.replaced.items())),
        "kept_on_target": dict(sorted(resolution.kept.items())),
        "parts": {p.name: p.stat().st_size for p in parts},
        "xz_level": level,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefix", type=Path, help="output prefix: PREFIX-partN.tar, PREFIX-manifest.json")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--vllm", default="0.26.0", help="the vLLM version to download (default 0.26.0)")
    source.add_argument("--vllm-wheel", type=Path, help="a vLLM wheel already here (instead of --vllm)")
    parser.add_argument(
        "--present",
        type=Path,
        default=Path(__file__).with_name("h200_image_packages.txt"),
        help="the target's packages, 'name' or 'name==version' a line (default: the H200 image's)",
    )
    parser.add_argument(
        "--downloads", type=Path, help="where downloaded wheels are kept and reused (default PREFIX's folder/wheels)"
    )
    parser.add_argument("--prune-sm90", action="store_true", help="zero fatbin payloads an SM90 GPU cannot load")
    parser.add_argument("--part-mib", type=int, default=55)
    parser.add_argument("--xz-level", default="9e", help="xz preset of the parts (default 9e: smallest, slowest)")
    args = parser.parse_args()
    downloads = args.downloads or args.prefix.parent / "wheels"
    downloads.mkdir(parents=True, exist_ok=True)
    args.prefix.parent.mkdir(parents=True, exist_ok=True)
    fetch = pip_fetch(downloads)
    vllm = (
        wheel_dist(args.vllm_wheel) if args.vllm_wheel else fetch("vllm", SpecifierSet(f"=={args.vllm}"), frozenset())
    )
    resolution = resolve(list(vllm.requires), fetch, read_present(args.present), SKIP, KEEP, TARGET_ENV)
    with tempfile.TemporaryDirectory(prefix="vllm_bundle_") as tmp:
        site = Path(tmp) / "site"
        stage(vllm.path, [d.path for d in resolution.carried.values()], site, args.prune_sm90)
        parts = write_parts(site, args.prefix, args.part_mib << 20, args.xz_level)
    record = manifest(vllm, resolution, parts, args.xz_level)
    Path(f"{args.prefix}-manifest.json").write_text(json.dumps(record, indent=2))
    shown = ("carried", "skipped", "replaced_on_target", "kept_on_target", "parts")
    print(json.dumps({k: record[k] for k in shown}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
