"""The sharded reader's refusals: a damaged index or shard is a ValueError naming the file, cause chained."""

import re
import shutil

import pytest
import torch
from checkpoint_edits import edited_copy, shard_of
from safetensors import SafetensorError
from safetensors.torch import save_file

from moe_backend.weights.reader import INDEX_FILE, SINGLE_FILE, ShardedReader

KEY = "model.layers.2.mlp.experts.3.up_proj.weight"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path):
    path.write_bytes(b"")


def _garbage_header(path):
    path.write_bytes(b"\xff" * 64)


@pytest.mark.parametrize("damage", [_truncate, _empty, _garbage_header])
def test_damaged_shard_is_named(tiny_checkpoints, tmp_path, damage):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["bf16"], path)
    shard = shard_of(path, KEY)
    damage(shard)
    reader = ShardedReader(path)
    with pytest.raises(ValueError, match=re.escape(str(shard))) as info:
        reader.get(KEY)
    assert isinstance(info.value.__cause__, SafetensorError)


def test_tensor_listed_in_index_but_absent_from_its_shard(tiny_checkpoints, tmp_path):
    path = edited_copy(tiny_checkpoints["bf16"], tmp_path / "ckpt", KEY, None, keep_in_index=True)
    with pytest.raises(ValueError, match=rf"{re.escape(str(shard_of(path, KEY)))}: cannot read tensor '{KEY}'") as info:
        ShardedReader(path).get(KEY)
    assert isinstance(info.value.__cause__, SafetensorError)


def test_damaged_single_file_is_named(tmp_path):
    (tmp_path / SINGLE_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / SINGLE_FILE))):
        ShardedReader(tmp_path)


@pytest.mark.parametrize(
    "index_text, match",
    [
        ("{not json", "not a readable JSON file"),
        ("[1, 2]", "expected a 'weight_map' object"),
        ('{"weight_map": []}', "expected a 'weight_map' object"),
        ('{"weight_map": {"a": 3}}', "expected 'weight_map' to map tensor names to shard file names"),
        ('{"weight_map": {"a": "../outside.safetensors"}}', "is not a file inside the checkpoint directory"),
        ('{"weight_map": {"a": "/etc/passwd"}}', "is not a file inside the checkpoint directory"),
        ('{"weight_map": {"a": "missing.safetensors"}}', "shard 'missing.safetensors' listed in"),
    ],
)
def test_bad_index_is_named(tmp_path, index_text, match):
    (tmp_path / INDEX_FILE).write_text(index_text)
    with pytest.raises(ValueError, match=match) as info:
        ShardedReader(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_binary_index_is_named_with_cause(tmp_path):
    (tmp_path / INDEX_FILE).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / INDEX_FILE))) as info:
        ShardedReader(tmp_path)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"path": 123}, TypeError, "path: expected a str or os.PathLike"),
        ({"release_bytes": -1}, ValueError, "release_bytes: expected an int >= 0"),
        ({"release_bytes": 1.5}, TypeError, "release_bytes: expected an int"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, error, match):
    save_file({"x": torch.zeros(2)}, str(tmp_path / SINGLE_FILE))
    with pytest.raises(error, match=match):
        ShardedReader(**{"path": tmp_path, **kwargs})


def test_good_single_file_reads(tmp_path):
    save_file({"x": torch.arange(3.0)}, str(tmp_path / SINGLE_FILE))
    with ShardedReader(tmp_path) as reader:
        assert torch.equal(reader.get("x"), torch.arange(3.0)) and reader.file_of("x") == tmp_path / SINGLE_FILE
