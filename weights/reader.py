"""Tensor-by-tensor reads from a (sharded) safetensors checkpoint.

The shard of each key comes from ``model.safetensors.index.json`` (``weight_map``),
or the checkpoint is a single ``model.safetensors``. Shards are opened lazily with
``safe_open``; a tensor it returns is backed by the shard's memory mapping, and
every page read stays resident (and counts in the RSS) while the shard is open.
So the reader closes its shards once ``release_bytes`` have been read through
them: the resident set stays near what the caller keeps plus that budget, however
large the shards are.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, FrozenSet, Union

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: Bytes read through open shards before they are closed (their mapped pages released).
DEFAULT_RELEASE_BYTES = 32 << 20


def _weight_map(root: Path) -> Dict[str, str]:
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected a 'weight_map' object mapping tensor names to shard files")
        return weight_map
    if (root / SINGLE_FILE).is_file():
        with safe_open(str(root / SINGLE_FILE), framework="pt") as f:
            return {key: SINGLE_FILE for key in f.keys()}
    raise ValueError(f"{root}: no {INDEX_FILE} or {SINGLE_FILE} (not a safetensors checkpoint directory)")


class ShardedReader:
    """Reads single tensors by name; close it (or use it as a context manager) when done."""

    def __init__(self, path: Union[str, Path], release_bytes: int = DEFAULT_RELEASE_BYTES) -> None:
        self.root = Path(path)
        self.release_bytes = release_bytes
        self._weight_map = _weight_map(self.root)
        for shard in set(self._weight_map.values()):
            if not (self.root / shard).is_file():
                raise ValueError(f"{self.root}: shard {shard!r} listed in {INDEX_FILE} does not exist")
        self._open: Dict[str, object] = {}
        self._bytes_since_release = 0

    def keys(self) -> FrozenSet[str]:
        """Every tensor name of the checkpoint."""
        return frozenset(self._weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self._weight_map

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
            handle = self._open[shard] = safe_open(str(self.root / shard), framework="pt")
        tensor = handle.get_tensor(key)
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
