"""An opened Hugging Face DeepSeek-V3 checkpoint directory: config, quantization, tensors.

A directory holds ``config.json``, ``model.safetensors.index.json`` and its shards
(or one ``model.safetensors``), and for ModelOpt exports ``hf_quant_config.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Tuple, Union

from .linear import CheckpointLinear, read_linear
from .model_config import DeepSeekV3Spec
from .quant_config import QuantSpec
from .reader import DEFAULT_RELEASE_BYTES, ShardedReader, read_json

CONFIG_FILE = "config.json"


def _check_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike directory, got {type(path).__name__} {path!r}")
    return Path(path)


def read_config(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The parsed ``config.json`` of checkpoint directory ``path`` (``ValueError`` naming the file
    when it is missing, not JSON, or not a JSON object)."""
    config_file = _check_path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"{path}: no {CONFIG_FILE} (not a Hugging Face checkpoint directory)")
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object")
    return config


class Checkpoint:
    """Config (:attr:`spec`), quantization (:attr:`quant`) and a tensor reader (:attr:`reader`).

    Close it (or use it as a context manager) to release the shards it has open.
    """

    def __init__(self, path: Union[str, os.PathLike], release_bytes: int = DEFAULT_RELEASE_BYTES) -> None:
        self.path = _check_path(path)
        self.config = read_config(self.path)
        self.spec = DeepSeekV3Spec.from_config(self.config, source=str(self.path / CONFIG_FILE))
        self.quant = QuantSpec.from_checkpoint(self.path, self.config)
        self.reader = ShardedReader(self.path, release_bytes)

    def linear(self, module: str, shape: Tuple[int, int]) -> CheckpointLinear:
        """The linear ``module`` (weight ``[N, K] = shape``) in the format the checkpoint stores it."""
        return read_linear(self.reader, module, self.quant.format_of(module), shape)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
