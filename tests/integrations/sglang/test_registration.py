"""The plugin makes ``moe_backend`` a valid ``--moe-runner-backend`` of the real SGLang and checks its symbols."""

from importlib.metadata import entry_points


def test_entry_point_is_declared():
    names = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert names.get("moe_backend") == "moe_backend.integrations.sglang:register"


def _help_choices(stdout):
    """The ``{...}`` choices of ``--moe-runner-backend`` in argparse's help text."""
    flat = " ".join(stdout.split())
    start = flat.index("--moe-runner-backend {") + len("--moe-runner-backend {")
    return flat[start : flat.index("}", start)].replace(" ", "").split(",")


def test_launch_server_help_lists_and_accepts_the_name(python):
    # launch_server loads plugins before parsing; argparse checks the value before --help exits.
    res = python(["-m", "sglang.launch_server", "--moe-runner-backend", "moe_backend", "--help"])
    assert res.returncode == 0, res.stderr[-3000:]
    choices = _help_choices(res.stdout)
    assert "moe_backend" in choices and "triton" in choices, choices


def test_launch_server_rejects_a_wrong_name(python):
    res = python(["-m", "sglang.launch_server", "--moe-runner-backend", "moe_backendx", "--help"])
    assert res.returncode == 2
    assert "invalid choice: 'moe_backendx'" in res.stderr, res.stderr[-3000:]


REGISTRATION_CHECK = """
from sglang.srt.plugins import load_plugins
load_plugins()
import moe_backend.integrations.sglang as plugin
plugin.register()  # SGLang calls load_plugins in every process; a second call changes nothing
from sglang.srt.arg_groups.choices import MOE_RUNNER_BACKEND_CHOICES
assert MOE_RUNNER_BACKEND_CHOICES.count("moe_backend") == 1, MOE_RUNNER_BACKEND_CHOICES
from sglang.srt.layers.moe.utils import resolve_moe_runner_backend
assert resolve_moe_runner_backend("moe_backend").value == "moe_backend"
from sglang.srt.layers.moe.moe_runner import runner
from moe_backend.integrations.sglang.runner import make_runner_core
assert runner._CUSTOM_RUNNER_CORE_FACTORIES["moe_backend"] is make_runner_core
from sglang.srt.plugins.hook_registry import HookRegistry
from moe_backend.integrations.sglang import methods, warmup
for target in (*methods.AROUND_HOOKS, *methods.AFTER_HOOKS, *warmup.AROUND_HOOKS):
    assert target in HookRegistry._patched, target
from moe_backend.integrations.sglang import compat
assert compat.missing_symbols() == []
compat.SYMBOLS["sglang.srt.layers.moe.moe_runner.runner"] += ("register_moe_runner_core_v2",)
compat.SYMBOLS["sglang.srt.no_such_module"] = ("x",)
try:
    compat.check_symbols()
except RuntimeError as err:
    msg = str(err)
    assert "SGLang 0.5.23 lacks what the plugin needs" in msg, msg
    assert "sglang.srt.layers.moe.moe_runner.runner:register_moe_runner_core_v2" in msg, msg
    assert "sglang.srt.no_such_module (cannot import" in msg, msg
else:
    raise AssertionError("missing symbols not reported")
print("OK")
"""


def test_registration_is_idempotent_and_checks_symbols(python):
    res = python(REGISTRATION_CHECK)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]
