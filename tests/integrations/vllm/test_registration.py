"""The plugin makes ``moe_backend`` a valid ``--moe-backend`` in the real vLLM CLI and configs."""

import shutil
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest


def test_entry_point_is_declared():
    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("moe_backend") == "moe_backend.integrations.vllm:register"


def _vllm_cli():
    exe = shutil.which("vllm", path=str(Path(sys.executable).parent)) or shutil.which("vllm")
    if exe is None:
        pytest.skip("the vllm console script is not on PATH")
    return exe


def test_serve_help_lists_and_accepts_the_name(python):
    vllm = _vllm_cli()
    res = python([vllm, "serve", "--help=moe-backend"])
    assert res.returncode == 0, res.stderr[-2000:]
    choices = next(line for line in res.stdout.splitlines() if line.strip().startswith("--moe-backend {"))
    assert "moe_backend" in choices
    for spelling in ("moe_backend", "moe-backend"):
        # argparse checks the value when it reaches it, before --help exits.
        res = python([vllm, "serve", "--moe-backend", spelling, "--help=moe-backend"])
        assert res.returncode == 0, res.stderr[-2000:]


def test_serve_rejects_a_wrong_name(python):
    res = python([_vllm_cli(), "serve", "--moe-backend", "moe_backendx", "--help=moe-backend"])
    assert res.returncode == 2
    assert "invalid choice: 'moe_backendx'" in res.stderr


CONFIG_CHECK = """
from vllm.plugins import load_general_plugins
load_general_plugins()
import moe_backend.integrations.vllm as plugin
plugin.register()  # a second call (vLLM calls it again in EngineArgs) changes nothing
from typing import get_args
import pydantic
from vllm.config.kernel import KernelConfig, MoEBackend
from vllm.config.speculative import SpeculativeConfig
assert get_args(MoEBackend).count("moe_backend") == 1
assert KernelConfig(moe_backend="moe_backend").moe_backend == "moe_backend"
assert KernelConfig(moe_backend="moe-backend").moe_backend == "moe_backend"
assert KernelConfig(moe_backend="triton").moe_backend == "triton"
for wrong in ("moe_backendx", "nope"):
    try:
        KernelConfig(moe_backend=wrong)
    except pydantic.ValidationError:
        pass
    else:
        raise AssertionError(f"{wrong!r} accepted")
spec_type = SpeculativeConfig.__dataclass_fields__["moe_backend"].type
assert "moe_backend" in str(spec_type), spec_type
import logging
# our INFO lines reach the handlers of vLLM's logger (vLLM configures only its own)
seen = []
collect = logging.Handler()
collect.emit = lambda record: seen.append(record.getMessage())
logging.getLogger("vllm").addHandler(collect)
logging.getLogger("vllm").setLevel(logging.INFO)  # as vLLM's own configuration sets it
logging.getLogger("moe_backend.integrations.vllm.warmup").info("moe_backend: a tuning line")
assert "moe_backend: a tuning line" in seen, seen
print("OK")
"""


def test_config_validation_accepts_and_rejects(python):
    res = python(CONFIG_CHECK)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]
