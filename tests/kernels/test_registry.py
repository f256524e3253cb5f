"""The selection table: auto picks table rows that can run, else the reference; names are checked."""

import dataclasses

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
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert k.unavailable_reason("bf16", torch.device("cpu")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
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


def test_weight_on_input_defect_keeps_fp8_layers_off_the_triton_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    kernel = registry.select_kernel("fp8_block", cpu, True, "sm90_triton_fp8")
    assert kernel.name == "sm90_triton_fp8"
    with pytest.raises(registry.KernelUnavailableError, match="apply_router_weight_on_input is not supported"):
        registry.select_kernel("fp8_block", cpu, True, "sm90_triton_fp8", weight_on_input=True)
    assert registry.select_kernel("nvfp4", cpu, True, "sm90_triton_nvfp4", weight_on_input=True).name \
        == "sm90_triton_nvfp4"


def _fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(registry, "_WARNED_FALLBACKS", set())
    return torch.device("cuda", 0)


def _fallback_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == registry.__name__ and r.levelname == "WARNING"]


def test_gpu_without_a_kernel_for_its_capability_warns_once(monkeypatch, caplog):
    gpu = _fake_gpu(monkeypatch, (8, 0))
    for routed in (False, True, False):
        assert registry.select_kernel("fp8_block", gpu, routed).name == "reference"
    assert _fallback_warnings(caplog) == [
        "fp8_block MoE on sm_80 runs the torch reference, not a fused kernel: "
        "no fused kernel serves fp8_block on sm_80"]


def test_gpu_fallback_names_each_reason_once(monkeypatch, caplog):
    gpu = _fake_gpu(monkeypatch, (9, 0))
    no_triton = dataclasses.replace(registry.SM90_NVFP4, requires=("no_such_triton_xyz",))
    monkeypatch.setitem(registry.KERNELS, "sm90_triton_nvfp4", no_triton)
    for _ in range(2):
        assert registry.select_kernel("nvfp4", gpu, True).name == "reference"
        assert registry.select_kernel("fp8_block", gpu, True, weight_on_input=True).name == "reference"
    warnings = _fallback_warnings(caplog)
    assert len(warnings) == 2
    assert "sm90_triton_nvfp4: the package(s) no_such_triton_xyz are not installed" in warnings[0]
    assert "sm90_triton_fp8: apply_router_weight_on_input is not supported" in warnings[1]


def test_cpu_reference_is_silent(caplog):
    registry.select_kernel("fp8_block", torch.device("cpu"), True)
    assert _fallback_warnings(caplog) == []
