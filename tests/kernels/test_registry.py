"""The selection table: auto picks table rows that can run, else the reference; names are checked."""

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
