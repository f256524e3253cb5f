"""Persistent JSON cache of tuned configurations (docs/design.md §8.4).

One file holds the results of one *environment* (GPU name and the versions of
torch, Triton and CUDA), grouped by kernel; each kernel's group records the
kernel version it was tuned for (the ``KERNEL_VERSION`` of its launcher module)
and holds entries keyed by the problem signature and bucket::

    {"format": 2,
     "environment": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"},
     "kernels": {"sm90_triton_fp8": {"version": 1, "entries": {
         "fp8_block,E=32/256,k=8,H=7168,I=2048,T=512":
             {"config": {...}, "best_us": 412.0, "default_us": 455.5}}}}}

A file that is missing, corrupt or written by another environment is ignored
with one warning and replaced at the next save (tactics tuned on another GPU or
compiler are not trusted). A kernel whose version changed finds none of its old
entries; its group is replaced when it saves its first entry of the new version.
The other kernels' entries stay valid.

Format history: 1 keyed the whole file on the moe_backend package version (which did
not change with the kernels) and had one flat ``entries`` table; format 2 (this one)
keys each kernel's entries on its ``KERNEL_VERSION``. A format-1 file is ignored with
one warning and rewritten. Location: the ``cache_dir`` argument, else
``$MOE_BACKEND_CACHE_DIR``, else ``$XDG_CACHE_HOME/moe_backend``, else
``~/.cache/moe_backend``; the file is ``tuning.json`` there. Machines of
different GPUs sharing a home directory should point ``MOE_BACKEND_CACHE_DIR``
at one directory per GPU type.

Writes are atomic (a temporary file in the same directory, then ``os.replace``)
and merge the entries another process (another rank) saved meanwhile.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import tempfile
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .._checks import check_int, check_real
from ..expert_weights import PRECISIONS

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
CACHE_FILE = "tuning.json"
CACHE_DIR_ENV = "MOE_BACKEND_CACHE_DIR"

Config = Dict[str, Any]
PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class ProblemSignature:
    """What a tuned configuration depends on besides the bucket.

    ``kernel`` and ``kernel_version`` name the tuned kernel (its registry name and its
    launcher's ``KERNEL_VERSION``). ``num_experts`` is E_local (the experts this rank
    computes); ``num_global_experts`` (default: E_local) sets the EP degree and so the
    profiled load per expert.
    """

    precision: str
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    num_global_experts: Optional[int] = None
    _: KW_ONLY
    kernel: str
    kernel_version: int

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.kernel, str) or not self.kernel:
            raise TypeError(f"kernel: expected a non-empty kernel name, got {self.kernel!r}")
        check_int("kernel_version", self.kernel_version, minimum=1)
        for name in ("num_experts", "top_k", "hidden_size", "intermediate_size"):
            check_int(name, getattr(self, name), minimum=1)
        if self.num_global_experts is None:
            object.__setattr__(self, "num_global_experts", self.num_experts)
        check_int("num_global_experts", self.num_global_experts, minimum=self.num_experts)

    @property
    def name(self) -> str:
        """``precision,E=E_local/E_global,k=..,H=..,I=..``."""
        return (
            f"{self.precision},E={self.num_experts}/{self.num_global_experts},k={self.top_k},"
            f"H={self.hidden_size},I={self.intermediate_size}"
        )

    def key(self, bucket: int) -> str:
        """The cache key of this problem at ``bucket`` tokens (within its kernel's group)."""
        return f"{self.name},T={bucket}"


@dataclass(frozen=True)
class CacheEntry:
    """A tuned bucket: the chosen ``config`` and the median times (µs, finite and > 0) of it and
    of the default."""

    config: Config
    best_us: float
    default_us: float

    def __post_init__(self) -> None:
        check_config(self.config)
        for name in ("best_us", "default_us"):
            object.__setattr__(self, name, check_real(name, getattr(self, name), positive=True))


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def current_environment(device: Optional[torch.device] = None) -> Dict[str, str]:
    """The environment a tuned configuration is valid for (GPU name and the compiler stack's versions).

    The moe_backend version is not part of it: each kernel's ``KERNEL_VERSION`` says when
    its configurations go stale, so a release that leaves a kernel alone keeps its tuning.
    """
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "triton": _version("triton"), "cuda": torch.version.cuda or "-"}


def default_cache_dir() -> Path:
    """``$MOE_BACKEND_CACHE_DIR``, else ``$XDG_CACHE_HOME/moe_backend``, else ``~/.cache/moe_backend``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moe_backend"


def check_config(config: object) -> Config:
    """Validate a configuration: a dict with str keys and JSON values (it is stored as JSON)."""
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise TypeError(f"config: expected a dict with str keys, got {config!r}")
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"config: expected JSON-serialisable values, got {config!r} ({exc})") from None
    return config


#: One kernel's group: the kernel version it was tuned for and its entries by key.
KernelEntries = Tuple[int, Dict[str, CacheEntry]]


class TuningCache:
    """The tuned configurations of the current environment, backed by ``<cache_dir>/tuning.json``.

    The file is read on first use; :meth:`put` changes memory only and :meth:`save`
    writes. ``environment`` defaults to :func:`current_environment`.
    """

    def __init__(self, cache_dir: Optional[PathLike] = None, *, environment: Optional[Dict[str, str]] = None) -> None:
        if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(
                f"cache_dir: expected a str or os.PathLike directory, got {type(cache_dir).__name__} {cache_dir!r}"
            )
        if environment is not None and not (
            isinstance(environment, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in environment.items())
        ):
            raise TypeError(f"environment: expected a dict of str to str, got {environment!r}")
        self.path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / CACHE_FILE
        self.environment = dict(environment) if environment is not None else current_environment()
        self._kernels: Optional[Dict[str, KernelEntries]] = None  # None: not read yet

    def get(self, signature: ProblemSignature, bucket: int) -> Optional[CacheEntry]:
        """The entry for ``signature`` at ``bucket``, or None (also when it was tuned for
        another version of the kernel)."""
        _check_key(signature, bucket)
        version, entries = self._loaded().get(signature.kernel, (None, {}))
        if version != signature.kernel_version:
            return None
        return entries.get(signature.key(bucket))

    def put(self, signature: ProblemSignature, bucket: int, entry: CacheEntry) -> None:
        """Record ``entry`` in memory (call :meth:`save` to persist). The first entry of a new
        kernel version drops the entries of the old one."""
        _check_key(signature, bucket)
        if not isinstance(entry, CacheEntry):
            raise TypeError(f"entry: expected a CacheEntry, got {type(entry).__name__}")
        check_config(entry.config)
        kernels = self._loaded()
        version, entries = kernels.get(signature.kernel, (signature.kernel_version, {}))
        if version != signature.kernel_version:
            logger.info(
                "kernel %s is now version %d: dropping its %d configurations tuned for version %d",
                signature.kernel,
                signature.kernel_version,
                len(entries),
                version,
            )
            entries = {}
        entries[signature.key(bucket)] = entry
        kernels[signature.kernel] = (signature.kernel_version, entries)

    def save(self) -> None:
        """Write the entries atomically, merged over those saved meanwhile by other processes
        (per kernel; where the versions differ, this process's group wins)."""
        merged = self._read(warn=False) or {}
        for kernel, (version, entries) in self._loaded().items():
            disk_version, disk_entries = merged.get(kernel, (version, {}))
            merged[kernel] = (version, {**disk_entries, **entries} if disk_version == version else dict(entries))
        payload = {
            "format": FORMAT_VERSION,
            "environment": self.environment,
            "kernels": {
                kernel: {"version": version, "entries": {key: vars(e) for key, e in sorted(entries.items())}}
                for kernel, (version, entries) in sorted(merged.items())
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{CACHE_FILE}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # readers see the old file or the new one, never a mix
        except BaseException:
            os.unlink(tmp)
            raise
        self._kernels = merged

    def _loaded(self) -> Dict[str, KernelEntries]:
        if self._kernels is None:
            self._kernels = self._read(warn=True) or {}
        return self._kernels

    def _read(self, *, warn: bool) -> Optional[Dict[str, KernelEntries]]:
        """The file's kernel groups, or None (with one warning when ``warn``) if unusable."""
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            self._unusable(warn, "no tuning cache yet")
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._unusable(warn, f"the tuning cache is unreadable ({exc})")
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            self._unusable(warn, "the tuning cache has an unknown format")
            return None
        if data.get("environment") != self.environment:
            self._unusable(warn, f"the tuning cache was written for {data.get('environment')}, not {self.environment}")
            return None
        try:
            return {kernel: _kernel_entries(group) for kernel, group in data["kernels"].items()}
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            self._unusable(warn, f"the tuning cache has a malformed entry ({exc!r})")
            return None

    def _unusable(self, warn: bool, why: str) -> None:
        if warn:
            logger.warning("%s at %s: ignoring it; tuned results will be written there anew", why, self.path)


def _check_key(signature: object, bucket: object) -> None:
    if not isinstance(signature, ProblemSignature):
        raise TypeError(f"signature: expected a ProblemSignature, got {type(signature).__name__}")
    check_int("bucket", bucket, minimum=1)


def _kernel_entries(group: Dict[str, Any]) -> KernelEntries:
    version = check_int("kernel version", group["version"], minimum=1)
    return version, {key: _entry(value) for key, value in group["entries"].items()}


def _entry(value: Dict[str, Any]) -> CacheEntry:
    """A cached entry (times must be JSON numbers; CacheEntry checks they are finite and > 0)."""
    return CacheEntry(value["config"], value["best_us"], value["default_us"])
