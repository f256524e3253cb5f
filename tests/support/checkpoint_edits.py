"""Damaged copies of the tiny test checkpoints, for tests of the loader's refusals."""

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from moe_backend.weights.reader import INDEX_FILE


def shard_of(ckpt_dir: Path, key: str) -> Path:
    """The shard file of checkpoint ``ckpt_dir`` that holds tensor ``key``."""
    return ckpt_dir / json.loads((ckpt_dir / INDEX_FILE).read_text())["weight_map"][key]


def edited_copy(src: Path, dst: Path, key: str, value: Optional[torch.Tensor], *, keep_in_index: bool = False) -> Path:
    """A copy of checkpoint ``src`` with tensor ``key`` replaced by ``value``. ``value`` None drops
    the tensor from its shard and (unless ``keep_in_index``) from the index."""
    shutil.copytree(src, dst)
    index = json.loads((dst / INDEX_FILE).read_text())
    shard = index["weight_map"][key]
    tensors = load_file(str(dst / shard))
    if value is None:
        del tensors[key]
        if not keep_in_index:
            del index["weight_map"][key]
            (dst / INDEX_FILE).write_text(json.dumps(index))
    else:
        tensors[key] = value
    save_file(tensors, str(dst / shard))
    return dst
