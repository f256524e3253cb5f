"""Opening a checkpoint directory: config.json damage is a ValueError naming the file, cause chained."""

import json
import re
import shutil

import pytest

from moe_backend.weights.checkpoint import Checkpoint, read_config


@pytest.mark.parametrize("content", [b'{"hidden_size": 256,', b"\xff\xfe\x00", b""])
def test_unreadable_config_names_the_file(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: not a readable JSON file")) as info:
        read_config(tmp_path)
    assert info.value.__cause__ is not None


def test_config_that_is_not_an_object_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: expected a JSON object")):
        read_config(tmp_path)


def test_bad_config_field_names_the_file(tiny_checkpoints, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["bf16"], path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "routed_scaling_factor": -1.0}))
    with pytest.raises(ValueError, match=re.escape(f"{path / 'config.json'}: routed_scaling_factor")):
        Checkpoint(path)


@pytest.mark.parametrize("path", [123, None, ["dir"]])
def test_path_of_the_wrong_type_is_named(path):
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike"):
        Checkpoint(path)
