"""The Blackwell readiness check against the real FlashInfer 0.7.2 package layout (cubin dir, JIT dir)."""

import logging
import sys

import pytest

pytest.importorskip("flashinfer")

from flashinfer.jit import (
    cubin_loader,  # noqa: E402
    env as jit_env,  # noqa: E402
)

from moe_backend.kernels.sm100 import TESTED_FLASHINFER, readiness  # noqa: E402
from moe_backend.kernels.sm100.readiness import (  # noqa: E402
    MODULE_NAME,
    FlashInferNotReadyError,
    check_flashinfer_ready,
    readiness_problems,
)


@pytest.fixture
def bare(monkeypatch, tmp_path):
    """Empty cubin and JIT caches, no prebuilt module, no nvcc, downloads allowed."""
    monkeypatch.setattr(jit_env, "FLASHINFER_CUBIN_DIR", tmp_path / "cubins")
    monkeypatch.setattr(jit_env, "FLASHINFER_JIT_DIR", tmp_path / "jit")
    monkeypatch.setattr(jit_env, "has_flashinfer_jit_cache", lambda: False)
    monkeypatch.setattr(readiness.shutil, "which", lambda name: None)
    for var in ("CUDA_HOME", "CUDA_PATH", "FLASHINFER_NO_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_tested_version_is_installed():
    import flashinfer

    assert flashinfer.__version__ == TESTED_FLASHINFER


def test_missing_flashinfer_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import raises ImportError
    (problem,) = readiness_problems()
    assert "flashinfer is not importable" in problem and "moe-backend[flashinfer]" in problem
    with pytest.raises(FlashInferNotReadyError, match="apache-tvm-ffi"):
        check_flashinfer_ready()


def test_offline_without_cubins_or_compiler_names_both(bare, monkeypatch):
    monkeypatch.setenv("FLASHINFER_NO_DOWNLOAD", "1")
    cubins, module = readiness_problems()
    assert f"flashinfer-cubin=={TESTED_FLASHINFER}" in cubins and "FLASHINFER_NO_DOWNLOAD" in cubins
    assert str(bare / "cubins") in cubins
    assert f"flashinfer-jit-cache=={TESTED_FLASHINFER}" in module and "nvcc" in module and MODULE_NAME in module
    with pytest.raises(FlashInferNotReadyError, match="cannot start: the TRT-LLM-gen MoE cubins"):
        check_flashinfer_ready()


def test_downloads_allowed_and_module_built_is_ready(bare, caplog):
    (bare / "jit" / MODULE_NAME).mkdir(parents=True)
    (bare / "jit" / MODULE_NAME / f"{MODULE_NAME}.so").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger=readiness.__name__):
        check_flashinfer_ready()
    assert "warm-up downloads them" in caplog.text


def test_cached_cubins_and_a_compiler_are_ready(bare, monkeypatch):
    monkeypatch.setenv("FLASHINFER_NO_DOWNLOAD", "1")
    monkeypatch.setattr(cubin_loader, "load_cubin", lambda path, sha256: b"checksums")  # as if verified on disk
    monkeypatch.setattr(readiness.shutil, "which", lambda name: "/usr/local/cuda/bin/nvcc" if name == "nvcc" else None)
    assert readiness_problems() == []


def test_cubin_check_reads_flashinfer_checksum_file(bare, monkeypatch):
    """A checksums.txt that does not hash to FlashInfer's pinned value counts as missing."""
    from flashinfer.artifacts import ArtifactPath

    monkeypatch.setenv("FLASHINFER_NO_DOWNLOAD", "1")
    path = bare / "cubins" / ArtifactPath.TRTLLM_GEN_BMM / "checksums.txt"
    path.parent.mkdir(parents=True)
    path.write_text("not the release's checksums\n")
    assert any("cubins are not in" in p for p in readiness_problems())
