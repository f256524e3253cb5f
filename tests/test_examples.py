"""The examples run on the tiny checkpoints: routing replay, and the streaming memory measurement."""

import importlib.util
from pathlib import Path

import pytest
import torch

from moe_backend.weights.checkpoint_maker import make_checkpoints
from moe_backend.weights.memory import supported

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("tiny"), flavours=["fp8", "nvfp4"])


@pytest.mark.parametrize("flavour", ["fp8", "nvfp4"])
def test_load_and_replay(checkpoints, flavour, capsys):
    assert _example("load_and_replay").run(checkpoints[flavour], -1, 32, torch.device("cpu"))
    assert "replayed ids equal: True; outputs equal: True" in capsys.readouterr().out


@pytest.mark.skipif(not supported(), reason="peak RSS is measured through Linux /proc")
def test_measure_load_memory(checkpoints):
    growth, layer, total = _example("measure_load_memory").peak_growth(checkpoints["fp8"], keep=True)
    assert total == 3 * layer and growth > 0
