"""The selection table: auto picks table rows that can run, else the reference; names are checked."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from moe_backend.kernels import registry


def test_cpu_auto_is_reference_for_every_precision():
    for precision in ("bf16", "fp8_block", "fp8_tensor", "nvfp4"):
        for routed in (False, True):
            assert registry.select_kernel(precision, torch.device("cpu"), routed).name == "reference"


def test_unknown_precision_and_kernel():
    with pytest.raises(ValueError, match="precision: expected one of"):
        registry.select_kernel("int4", torch.device("cpu"), False)
    with pytest.raises(ValueError, match="kernel: expected 'auto' or one of"):
        registry.select_kernel("bf16", torch.device("cpu"), False, "nope")


def test_interpretable_kernel_runs_on_cpu_only_under_interpreter(monkeypatch):
    k = registry.Kernel("k", ("bf16",), ((9, 0),), prepare=lambda w: w, run=None, interpretable=True)
    monkeypatch.setattr(registry, "INTERPRETING", True)
    assert k.unavailable_reason("bf16", torch.device("cpu")) is None
    monkeypatch.setattr(registry, "INTERPRETING", False)
    assert "needs a CUDA GPU" in k.unavailable_reason("bf16", torch.device("cpu"))


def test_missing_package_is_a_reason():
    k = registry.Kernel("k", ("bf16",), None, prepare=lambda w: w, run=None, requires=("no_such_pkg_xyz",))
    assert "no_such_pkg_xyz" in k.unavailable_reason("bf16", torch.device("cpu"))


def test_table_rows_name_registered_kernels():
    for (precision, _cap, _routed), names in registry.SELECTION_TABLE.items():
        for name in names:
            assert precision in registry.KERNELS[name].precisions


def test_available_kernels_lists_reasons():
    table = registry.available_kernels(torch.device("cpu"))
    assert table["reference"]["nvfp4"] is None


def test_weight_on_input_defect_keeps_layers_off_a_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    for precision, name in (("fp8_block", "sm90_triton_fp8"), ("nvfp4", "sm90_triton_nvfp4")):
        assert registry.select_kernel(precision, cpu, True, name, weight_on_input=True).name == name
    defective = dataclasses.replace(registry.SM90_FP8, weight_on_input_defect="a recorded defect")
    monkeypatch.setitem(registry.KERNELS, "sm90_triton_fp8", defective)
    with pytest.raises(registry.KernelUnavailableError, match="not supported: a recorded defect"):
        registry.select_kernel("fp8_block", cpu, True, "sm90_triton_fp8", weight_on_input=True)


@pytest.fixture
def blackwell(monkeypatch):
    """A CUDA device query answering sm_100 / sm_103; flashinfer present or not as the test says."""
    import importlib.util

    real = importlib.util.find_spec

    def set_gpu(cap, flashinfer=True):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)

        def find_spec(name, *a):
            return (object() if flashinfer else None) if name == "flashinfer" else real(name, *a)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        return torch.device("cuda")

    return set_gpu


@pytest.mark.parametrize("cap", [(10, 0), (10, 3)])
def test_blackwell_rows_pick_flashinfer(blackwell, cap):
    gpu = blackwell(cap)
    for precision in ("fp8_block", "fp8_tensor", "nvfp4"):
        for routed in (False, True):
            assert registry.select_kernel(precision, gpu, routed).name == f"sm100_flashinfer_{precision}"
    assert registry.select_kernel("bf16", gpu, False).name == "reference"
    # FlashInfer scales the GEMM1 input by the router weight for FP8 per tensor only
    assert registry.select_kernel("fp8_tensor", gpu, True, weight_on_input=True).name == "sm100_flashinfer_fp8_tensor"
    assert registry.select_kernel("fp8_block", gpu, True, weight_on_input=True).name == "reference"


def test_blackwell_without_flashinfer_falls_back_or_names_it(blackwell):
    gpu = blackwell((10, 0), flashinfer=False)
    assert registry.select_kernel("nvfp4", gpu, True).name == "reference"
    with pytest.raises(registry.KernelUnavailableError, match="flashinfer are not installed"):
        registry.select_kernel("nvfp4", gpu, True, "sm100_flashinfer_nvfp4")


def test_sm100_kernels_on_hopper_and_cpu(blackwell):
    assert "sm_100, sm_103" in registry.SM100_NVFP4.unavailable_reason("nvfp4", blackwell((9, 0)))
    reason = registry.SM100_FP8_BLOCK.unavailable_reason("fp8_block", torch.device("cpu"))
    assert "needs a CUDA GPU" in reason and "TRITON_INTERPRET" not in reason


def test_contract_extension_leaves_hopper_kernels_alone():
    ctx = registry.LayerContext(256, 8, registry.RoutingConfig.deepseek_v3())
    assert ctx.max_num_tokens == 8192  # FlashInfer's default until the layer's warm-up sets it
    for kernel in (registry.REFERENCE, registry.SM90_FP8, registry.SM90_NVFP4):
        assert not kernel.takes_context and kernel.run_computed is None and kernel.warmup is None
        assert not kernel.routes(ctx)
    for kernel in (registry.SM100_FP8_BLOCK, registry.SM100_FP8_TENSOR, registry.SM100_NVFP4):
        assert kernel.takes_context and kernel.routes(ctx) and kernel.capabilities == registry.BLACKWELL
        assert not kernel.routes(registry.LayerContext(256, 8, registry.RoutingConfig("softmax")))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: registry.select_kernel("fp8_block", 0, True), TypeError, "device: expected a torch.device or str"),
        (lambda: registry.select_kernel("fp8_block", "quantum", True), ValueError, "device: expected a device"),
        (lambda: registry.select_kernel("fp8_block", torch.device("cpu"), "yes"), TypeError, "routed: expected a bool"),
        (
            lambda: registry.select_kernel("fp8_block", torch.device("cpu"), True, None),
            TypeError,
            "kernel: expected a str",
        ),
        (
            lambda: registry.select_kernel(["fp8_block"], torch.device("cpu"), True),
            ValueError,
            "precision: expected one of",
        ),
        (
            lambda: registry.select_kernel("fp8_block", torch.device("cpu"), True, weight_on_input=1),
            TypeError,
            "weight_on_input: expected a bool",
        ),
        (lambda: registry.available_kernels(None), TypeError, "device: expected a torch.device or str"),
    ],
)
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_tuning_spaces_resolve_lazily_without_importing_triton_at_package_import():
    code = (
        "import sys, moe_backend\n"
        "from moe_backend.kernels import registry\n"
        "assert registry.SM90_FP8.tunable and registry.SM90_NVFP4.tunable and not registry.REFERENCE.tunable\n"
        "assert 'triton' not in sys.modules, 'importing moe_backend imported Triton'\n"
        "assert registry.SM90_NVFP4.tuning_space().version >= 1\n"
        "assert 'triton' in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_probe_is_asked_last_and_its_reason_reported():
    asked = []

    def probe():
        asked.append(True)
        return "the package 'quack' is broken"

    k = registry.Kernel("k", ("bf16",), ((9, 0),), prepare=lambda w: w, run=None, probe=probe)
    assert "needs a CUDA GPU" in k.unavailable_reason("bf16", torch.device("cpu"))
    assert not asked, "the probe ran although the device already rules the kernel out"
    k = registry.Kernel("k", ("bf16",), None, prepare=lambda w: w, run=None, probe=probe)
    assert k.unavailable_reason("bf16", torch.device("cpu")) == "the package 'quack' is broken"


def test_grouped_bf16_kernel_is_registered_and_refuses_cpu_and_weight_on_input():
    kernel = registry.KERNELS["sm90_quack_grouped_bf16"]
    assert kernel.precompile is not None and kernel.tunable
    assert "needs a CUDA GPU" in kernel.unavailable_reason("nvfp4", torch.device("cpu"))
    assert "apply_router_weight_on_input" in kernel.unavailable_reason("bf16", torch.device("cpu"), True)
    with pytest.raises(registry.KernelUnavailableError, match="sm90_quack_grouped_bf16"):
        registry.select_kernel("bf16", torch.device("cpu"), False, "sm90_quack_grouped_bf16")


def _fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(registry, "_WARNED_FALLBACKS", set())
    return torch.device("cuda", 0)


def _fallback_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == registry.__name__ and r.levelname == "WARNING"]


def test_gpu_without_a_kernel_for_its_capability_warns_once(monkeypatch, caplog):
    gpu = _fake_gpu(monkeypatch, (8, 0))
    for routed in (False, True, False):
        assert registry.select_kernel("fp8_block", gpu, routed).name == "reference"
    assert _fallback_warnings(caplog) == [
        "fp8_block MoE on sm_80 runs the torch reference, not a fused kernel: no fused kernel serves fp8_block on sm_80"
    ]


def test_gpu_fallback_names_each_reason_once(monkeypatch, caplog):
    gpu = _fake_gpu(monkeypatch, (9, 0))
    no_triton = dataclasses.replace(registry.SM90_NVFP4, requires=("no_such_triton_xyz",))
    monkeypatch.setitem(registry.KERNELS, "sm90_triton_nvfp4", no_triton)
    defective = dataclasses.replace(registry.SM90_FP8, weight_on_input_defect="a recorded defect")
    monkeypatch.setitem(registry.KERNELS, "sm90_triton_fp8", defective)
    for _ in range(2):
        assert registry.select_kernel("nvfp4", gpu, True).name == "reference"
        assert registry.select_kernel("fp8_block", gpu, True, weight_on_input=True).name == "reference"
    warnings = _fallback_warnings(caplog)
    assert len(warnings) == 2
    assert "sm90_triton_nvfp4: the package(s) no_such_triton_xyz are not installed" in warnings[0]
    assert "sm90_triton_fp8: apply_router_weight_on_input is not supported: a recorded defect" in warnings[1]


def test_cpu_reference_is_silent(caplog):
    registry.select_kernel("fp8_block", torch.device("cpu"), True)
    assert _fallback_warnings(caplog) == []
