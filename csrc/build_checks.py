"""setup.py's build decisions as pure functions of their inputs, so tests can feed them fakes.

A torch built with CUDA but no CUDA toolkit used to give a CPU-only extension without a word; a
build machine without a GPU crashed torch's arch detection; an nvcc of another major version than
torch's failed deep inside the compile. Each of those is decided here, with a message naming the fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = [
    "DEFAULT_CUDA_ARCH_LIST",
    "BuildConfigError",
    "cuda_build_decision",
    "cuda_arch_list",
    "parse_nvcc_version",
    "check_nvcc_matches_torch",
]

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"  # A100, H100: what a build machine without a GPU compiles for


class BuildConfigError(RuntimeError):
    """The build cannot produce what was asked for; the message says how to fix it."""


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "0") == "1"


def cuda_build_decision(
    torch_cuda: str | None, cuda_home: str | None, env: Mapping[str, str]
) -> tuple[bool, str | None]:
    """Whether to compile the CUDA kernels, and a warning to print loudly when the answer is a surprise.

    ``torch_cuda`` is ``torch.version.cuda``, ``cuda_home`` is ``cpp_extension.CUDA_HOME``.
    MODALMOE_NO_CUDA=1 builds CPU-only on purpose; MODALMOE_REQUIRE_CUDA=1 turns every reason for a
    CPU-only build into a BuildConfigError.
    """
    require = _flag(env, "MODALMOE_REQUIRE_CUDA")
    if _flag(env, "MODALMOE_NO_CUDA"):
        if require:
            raise BuildConfigError("MODALMOE_NO_CUDA=1 and MODALMOE_REQUIRE_CUDA=1 contradict each other: unset one")
        return False, None
    if torch_cuda is None:
        if require:
            raise BuildConfigError(
                "MODALMOE_REQUIRE_CUDA=1 but the installed torch is a CPU-only build (torch.version.cuda is "
                "None): install a CUDA build of torch first, then rebuild with "
                "`pip install --no-build-isolation -e .`"
            )
        return False, None
    if cuda_home is None:
        message = "\n".join([
            "",
            "=" * 100,
            f"modalmoe: torch was built with CUDA {torch_cuda}, but no CUDA toolkit (nvcc) was found:",
            "building the CPU kernels ONLY. CUDA tensors will then run the slow pure-PyTorch fallback.",
            f"  fix: install the CUDA toolkit matching torch's CUDA {_major_minor(torch_cuda)} and set CUDA_HOME",
            "       (e.g. CUDA_HOME=/usr/local/cuda), then `pip install --no-build-isolation -e .` again;",
            "  or:  set MODALMOE_NO_CUDA=1 to build CPU-only on purpose (silences this warning);",
            "       MODALMOE_REQUIRE_CUDA=1 turns this warning into an error.",
            "=" * 100,
        ])
        if require:
            raise BuildConfigError(message)
        return False, message
    return True, None


def cuda_arch_list(env: Mapping[str, str], gpu_visible: bool) -> str | None:
    """The TORCH_CUDA_ARCH_LIST to set, or None to leave it: torch's own detection needs a GPU."""
    if env.get("TORCH_CUDA_ARCH_LIST") or gpu_visible:
        return None
    return DEFAULT_CUDA_ARCH_LIST


def parse_nvcc_version(nvcc_output: str) -> tuple[int, int] | None:
    """(major, minor) from ``nvcc --version`` ("... Cuda compilation tools, release 13.0, V13.0.88")."""
    match = re.search(r"release (\d+)\.(\d+)", nvcc_output) or re.search(r"\bV(\d+)\.(\d+)", nvcc_output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_nvcc_matches_torch(torch_cuda: str, nvcc_output: str, nvcc_path: str = "nvcc") -> None:
    """Raise BuildConfigError unless nvcc's CUDA major version is torch's (minor versions may differ)."""
    nvcc = parse_nvcc_version(nvcc_output)
    if nvcc is None:
        raise BuildConfigError(
            f"modalmoe: could not read a CUDA version from `{nvcc_path} --version` (got {nvcc_output!r}); "
            "point CUDA_HOME at a working CUDA toolkit, or set MODALMOE_NO_CUDA=1 to build CPU-only"
        )
    torch_major = int(torch_cuda.split(".")[0])
    if nvcc[0] != torch_major:
        raise BuildConfigError(
            f"modalmoe: {nvcc_path} is CUDA {nvcc[0]}.{nvcc[1]} but torch was built with CUDA {torch_cuda}; "
            "their major versions must match. Fix: install the CUDA "
            f"{_major_minor(torch_cuda)} toolkit and set CUDA_HOME to it, or install the torch build for "
            f"CUDA {nvcc[0]}.x, or set "
            "MODALMOE_NO_CUDA=1 to build CPU-only"
        )


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])
