"""Fixtures of the weights tests: the tiny checkpoints, written once per session."""

from pathlib import Path
from typing import Dict

import pytest

from moe_backend.weights.checkpoint_maker import make_checkpoints


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> Dict[str, Path]:
    """flavour (bf16, fp8, fp8_tensor, nvfp4) -> directory of the TINY checkpoint, seed 0. Read-only: a test
    that edits a checkpoint copies it first (see ``copy_checkpoint``)."""
    return make_checkpoints(tmp_path_factory.mktemp("tiny"))
