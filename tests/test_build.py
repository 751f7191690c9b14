"""Tests for setup.py's build decisions (csrc/build_checks.py) with fake inputs, and for the CUDA
binding's includes. Nothing here compiles; csrc/check_cuda_compiles.sh does that in CI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from path_import import import_path

ROOT = Path(__file__).resolve().parents[1]
NVCC_13 = (
    "nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) 2005-2025 NVIDIA Corporation\n"
    "Built on Wed_Aug_20_01:58:59_PM_PDT_2025\nCuda compilation tools, release 13.0, V13.0.88\n"
    "Build cuda_13.0.r13.0/compiler.36424714_0\n"
)
NVCC_12 = "Cuda compilation tools, release 12.8, V12.8.93\nBuild cuda_12.8.r12.8/compiler.35583870_0\n"


bc = import_path(ROOT / "csrc" / "build_checks.py", "modalmoe_build_checks")


def test_cpu_torch_builds_cpu_only_quietly() -> None:
    assert bc.cuda_build_decision(None, None, {}) == (False, None)
    assert bc.cuda_build_decision(None, "/usr/local/cuda", {}) == (False, None)


def test_cuda_torch_with_toolkit_builds_cuda() -> None:
    assert bc.cuda_build_decision("13.0", "/usr/local/cuda", {}) == (True, None)
    assert bc.cuda_build_decision("13.0", "/usr/local/cuda", {"MODALMOE_REQUIRE_CUDA": "1"}) == (True, None)


def test_cuda_torch_without_toolkit_warns_loudly_with_the_fix() -> None:
    cuda, warning = bc.cuda_build_decision("12.8.1", None, {})
    assert cuda is False
    assert warning.count("\n") >= 4, "a multi-line banner, not a one-liner lost in the build log"
    assert "CUDA 12.8" in warning and "CUDA_HOME" in warning and "MODALMOE_NO_CUDA=1" in warning
    assert "MODALMOE_REQUIRE_CUDA=1" in warning


def test_require_cuda_turns_the_warning_into_an_error() -> None:
    with pytest.raises(bc.BuildConfigError, match="CUDA_HOME"):
        bc.cuda_build_decision("13.0", None, {"MODALMOE_REQUIRE_CUDA": "1"})
    with pytest.raises(bc.BuildConfigError, match="CPU-only build"):
        bc.cuda_build_decision(None, None, {"MODALMOE_REQUIRE_CUDA": "1"})
    with pytest.raises(bc.BuildConfigError, match="contradict"):
        bc.cuda_build_decision("13.0", "/usr/local/cuda", {"MODALMOE_REQUIRE_CUDA": "1", "MODALMOE_NO_CUDA": "1"})


def test_no_cuda_builds_cpu_only_on_purpose_and_quietly() -> None:
    assert bc.cuda_build_decision("13.0", None, {"MODALMOE_NO_CUDA": "1"}) == (False, None)
    assert bc.cuda_build_decision("13.0", "/usr/local/cuda", {"MODALMOE_NO_CUDA": "1"}) == (False, None)
    assert bc.cuda_build_decision("13.0", None, {"MODALMOE_NO_CUDA": "0"})[1] is not None


def test_arch_list_defaults_only_without_a_gpu_and_without_a_choice() -> None:
    assert bc.cuda_arch_list({}, gpu_visible=False) == "8.0;9.0"
    assert bc.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": ""}, gpu_visible=False) == "8.0;9.0"
    assert bc.cuda_arch_list({}, gpu_visible=True) is None
    assert bc.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "9.0a"}, gpu_visible=False) is None


def test_parse_nvcc_version() -> None:
    assert bc.parse_nvcc_version(NVCC_13) == (13, 0)
    assert bc.parse_nvcc_version(NVCC_12) == (12, 8)
    assert bc.parse_nvcc_version("V11.8.89") == (11, 8)
    assert bc.parse_nvcc_version("") is None


def test_nvcc_must_match_torch_major() -> None:
    bc.check_nvcc_matches_torch("13.0", NVCC_13)
    bc.check_nvcc_matches_torch("12.6", NVCC_12)  # minor versions may differ
    with pytest.raises(bc.BuildConfigError) as err:
        bc.check_nvcc_matches_torch("12.8", NVCC_13, "/usr/local/cuda/bin/nvcc")
    message = str(err.value)
    assert "CUDA 13.0" in message and "CUDA 12.8" in message and "/usr/local/cuda/bin/nvcc" in message
    assert "CUDA_HOME" in message and "MODALMOE_NO_CUDA=1" in message
    with pytest.raises(bc.BuildConfigError, match="could not read"):
        bc.check_nvcc_matches_torch("13.0", "sh: nvcc: not found")


def test_setup_uses_the_checks_and_lineinfo() -> None:
    setup_py = (ROOT / "setup.py").read_text()
    for name in ("cuda_build_decision", "check_nvcc_matches_torch", "cuda_arch_list"):
        assert f"build_checks.{name}(" in setup_py
    assert '"-lineinfo"' in setup_py


def test_cuda_bindings_include_no_aten_cuda_header() -> None:
    """ATen/cuda/* pulls in cuBLAS / cuSPARSE / cuSOLVER headers; c10/cuda is all a binding needs."""
    bindings = sorted((ROOT / "csrc" / "cuda").glob("*.cpp"))
    assert bindings
    for path in bindings:
        includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), flags=re.MULTILINE)
        assert includes, path
        offending = [inc for inc in includes if inc.startswith("ATen/cuda/")]
        assert not offending, f"{path.name} includes {offending}"
