"""Tensor-by-tensor reads from a (sharded) safetensors checkpoint.

The shard of each key comes from ``model.safetensors.index.json`` (``weight_map``),
or the checkpoint is a single ``model.safetensors``. Shards are opened lazily with
``safe_open``; a tensor it returns is backed by the shard's memory mapping, and
every page read stays resident (and counts in the RSS) while the shard is open.
So the reader closes its shards once ``release_bytes`` have been read through
them: the resident set stays near what the caller keeps plus that budget, however
large the shards are.

A damaged checkpoint (an index that is not JSON or names shards outside the directory, a
truncated or empty shard, a tensor the index lists but its shard lacks) raises ``ValueError``
naming the file and the tensor, with the underlying error chained.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any, Dict, FrozenSet, Union

import torch
from safetensors import SafetensorError, safe_open

from moe_backend._checks import check_int

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: Bytes read through open shards before they are closed (their mapped pages released).
DEFAULT_RELEASE_BYTES = 32 << 20


def read_json(path: Path) -> Any:
    """The parsed JSON file ``path``; ``ValueError`` naming the file (cause chained) when it cannot be
    read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from exc


def _open_shard(path: Path) -> Any:
    """``safe_open`` on ``path``; ``ValueError`` naming the file for a damaged or unreadable shard."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc


def _check_shard_name(index: Path, key: object, shard: object) -> None:
    if not isinstance(key, str) or not isinstance(shard, str):
        raise ValueError(
            f"{index}: expected 'weight_map' to map tensor names to shard file names, got {key!r}: {shard!r}"
        )
    parts = PurePosixPath(shard).parts
    if not parts or PurePosixPath(shard).is_absolute() or ".." in parts or os.path.isabs(shard):
        raise ValueError(f"{index}: shard {shard!r} of tensor {key!r} is not a file inside the checkpoint directory")


def _weight_map(root: Path) -> Dict[str, str]:
    index = root / INDEX_FILE
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected a 'weight_map' object mapping tensor names to shard files")
        for key, shard in weight_map.items():
            _check_shard_name(index, key, shard)
        return weight_map
    if (root / SINGLE_FILE).is_file():
        with _open_shard(root / SINGLE_FILE) as f:
            return {key: SINGLE_FILE for key in f.keys()}
    raise ValueError(f"{root}: no {INDEX_FILE} or {SINGLE_FILE} (not a safetensors checkpoint directory)")


class ShardedReader:
    """Reads single tensors by name; close it (or use it as a context manager) when done."""

    def __init__(self, path: Union[str, os.PathLike], release_bytes: int = DEFAULT_RELEASE_BYTES) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a str or os.PathLike directory, got {type(path).__name__} {path!r}")
        self.root = Path(path)
        self.release_bytes = check_int("release_bytes", release_bytes, minimum=0)
        self._weight_map = _weight_map(self.root)
        for shard in set(self._weight_map.values()):
            if not (self.root / shard).is_file():
                raise ValueError(f"{self.root}: shard {shard!r} listed in {INDEX_FILE} does not exist")
        self._open: Dict[str, Any] = {}  # shard file -> safetensors handle
        self._bytes_since_release = 0

    def keys(self) -> FrozenSet[str]:
        """Every tensor name of the checkpoint."""
        return frozenset(self._weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self._weight_map

    def file_of(self, key: str) -> Path:
        """The shard file holding tensor ``key`` (which must be listed)."""
        return self.root / self._weight_map[key]

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as stored (dtype and shape of the file), backed by the shard's
        mapping: copy what you keep. Raises ``ValueError`` naming a missing key."""
        shard = self._weight_map.get(key)
        if shard is None:
            raise ValueError(f"{self.root}: tensor {key!r} is missing from the checkpoint")
        if self._bytes_since_release >= self.release_bytes:
            self.close()
        handle = self._open.get(shard)
        if handle is None:
            logger.debug("opening shard %s", shard)
            handle = self._open[shard] = _open_shard(self.root / shard)
        try:
            tensor = handle.get_tensor(key)
        except SafetensorError as exc:
            raise ValueError(f"{self.root / shard}: cannot read tensor {key!r} listed in {INDEX_FILE} ({exc})") from exc
        self._bytes_since_release += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        """Close every open shard, releasing the pages read through it."""
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()
        self._bytes_since_release = 0

    def __enter__(self) -> "ShardedReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
