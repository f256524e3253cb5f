"""One linear as a checkpoint stores it: bad scale values and dtypes are refused naming the shard file
and the tensor (the scale rule of moe_backend.expert_weights)."""

import re

import pytest
import torch
from checkpoint_edits import edited_copy, shard_of

from moe_backend.quant import FP8_DTYPE
from moe_backend.weights.checkpoint import Checkpoint

EXPERT = "model.layers.2.mlp.experts.6.gate_proj"
SHARED = "model.layers.2.mlp.shared_experts.down_proj"
SHAPES = {EXPERT: (128, 256), SHARED: (256, 128)}


def _stored(path, key):
    with Checkpoint(path) as ckpt:
        return ckpt.reader.get(key).clone()


def _with(path, key, index, value):
    t = _stored(path, key)
    t.view(-1)[index] = value
    return t


def _nvfp4_code(value: float):
    return torch.tensor([value]).to(FP8_DTYPE)[0]


CASES = [
    ("nvfp4", f"{EXPERT}.weight_scale_2", lambda p, k: torch.tensor(0.0), r"expected a finite positive scale, got 0.0"),
    ("nvfp4", f"{EXPERT}.weight_scale_2", lambda p, k: torch.tensor(float("nan")), "finite positive scale, got nan"),
    ("nvfp4", f"{EXPERT}.weight_scale_2", lambda p, k: torch.tensor(-1e-3), "finite positive scale, got -0.001"),
    ("nvfp4", f"{EXPERT}.weight_scale_2", lambda p, k: torch.tensor([float("inf")]), "finite positive scale, got inf"),
    ("nvfp4", f"{SHARED}.weight_scale_2", lambda p, k: torch.tensor(-1.0), "finite positive scale, got -1.0"),
    (
        "nvfp4",
        f"{EXPERT}.weight_scale",
        lambda p, k: _with(p, k, 3 * 16 + 5, float("nan")),
        r"expected scales finite and >= 0, got nan at index \[3, 5\]",
    ),
    (
        "nvfp4",
        f"{EXPERT}.weight_scale",
        lambda p, k: _with(p, k, 17, -2.0),
        r"expected scales finite and >= 0, got -2.0 at index \[1, 1\]",
    ),
    ("nvfp4", f"{SHARED}.weight_scale", lambda p, k: _with(p, k, 0, -1.0), r"got -1.0 at index \[0, 0\]"),
    ("fp8", f"{EXPERT}.weight_scale_inv", lambda p, k: _with(p, k, 1, float("nan")), r"got nan at index \[0, 1\]"),
    ("fp8", f"{EXPERT}.weight_scale_inv", lambda p, k: _with(p, k, 0, -0.5), r"got -0.5 at index \[0, 0\]"),
    ("fp8", f"{EXPERT}.weight_scale_inv", lambda p, k: _with(p, k, 1, float("inf")), r"got inf at index \[0, 1\]"),
    ("fp8", f"{SHARED}.weight_scale_inv", lambda p, k: _with(p, k, 0, float("-inf")), r"got -inf at index \[0, 0\]"),
    (
        "fp8_tensor",
        f"{EXPERT}.weight_scale",
        lambda p, k: torch.tensor(float("-inf")),
        "finite positive scale, got -inf",
    ),
    ("fp8_tensor", f"{SHARED}.input_scale", lambda p, k: torch.tensor(0.0), "finite positive scale, got 0.0"),
]


@pytest.mark.parametrize("flavour, key, value, match", CASES)
def test_bad_scales_name_the_file_and_tensor(tiny_checkpoints, tmp_path, flavour, key, value, match):
    src = tiny_checkpoints[flavour]
    path = edited_copy(src, tmp_path / "ckpt", key, value(src, key))
    module = key.rsplit(".", 1)[0]
    with Checkpoint(path) as ckpt, pytest.raises(ValueError, match=match) as info:
        ckpt.linear(module, SHAPES[module])
    assert str(info.value).startswith(f"{shard_of(path, key)}: {key}: ")


@pytest.mark.parametrize(
    "flavour, suffix, value",
    [
        ("fp8", "weight", lambda t: t.to(torch.bfloat16)),
        ("nvfp4", "weight_scale", lambda t: t.float()),
        ("nvfp4", "weight_scale_2", lambda t: t.double()),
    ],
)
def test_wrong_dtype_names_the_file(tiny_checkpoints, tmp_path, flavour, suffix, value):
    key = f"{EXPERT}.{suffix}"
    src = tiny_checkpoints[flavour]
    path = edited_copy(src, tmp_path / "ckpt", key, value(_stored(src, key)))
    with (
        Checkpoint(path) as ckpt,
        pytest.raises(TypeError, match=re.escape(f"{shard_of(path, key)}: {key}: expected dtype")) as info,
    ):
        ckpt.linear(EXPERT, SHAPES[EXPERT])
    assert isinstance(info.value.__cause__, TypeError)


@pytest.mark.parametrize("flavour, suffix", [("fp8", "weight_scale_inv"), ("nvfp4", "weight_scale")])
def test_zero_block_scales_are_accepted(tiny_checkpoints, tmp_path, flavour, suffix):
    """An all-zero block quantizes to a zero block scale: it dequantizes to zeros, which is right."""
    key = f"{EXPERT}.{suffix}"
    src = tiny_checkpoints[flavour]
    path = edited_copy(src, tmp_path / "ckpt", key, _with(src, key, 0, 0.0))
    with Checkpoint(path) as ckpt:
        w = ckpt.linear(EXPERT, SHAPES[EXPERT]).dequantize()
    rows, cols = (128, 128) if flavour == "fp8" else (1, 16)
    assert bool((w[:rows, :cols] == 0).all()) and bool(torch.isfinite(w).all())
