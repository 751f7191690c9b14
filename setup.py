"""Build and install modalmoe.

The repository root is the ``modalmoe`` package; ``runtime/``, ``models/`` and ``launch/`` map to
``modalmoe.runtime``, ``modalmoe.models`` and ``modalmoe.launch`` (never top-level packages).
The C++ extension ``modalmoe._C`` is built from ``csrc/`` with torch's cpp_extension and ninja:
CPU kernels always, CUDA kernels too when the installed torch was built with CUDA and nvcc is found
(a CUDA torch without nvcc warns loudly; MODALMOE_REQUIRE_CUDA=1 makes that an error, MODALMOE_NO_CUDA=1
builds CPU-only on purpose). The decisions live in csrc/build_checks.py.

Install with ``pip install --no-build-isolation -e .`` after torch: the build imports the torch you
already have instead of letting pip fetch another one into an isolated build environment.
"""

import glob
import importlib.util
import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - exercised only on a broken install
    sys.exit(
        "modalmoe's build needs torch already installed: run `pip install torch==2.13.0` (or your "
        "CUDA build of torch), then `pip install --no-build-isolation -e .`"
    )

PACKAGE_DIRS = {
    "modalmoe": ".",
    "modalmoe.runtime": "runtime",
    "modalmoe.runtime.moe": "runtime/moe",
    "modalmoe.runtime.data": "runtime/data",
    "modalmoe.runtime.tensor_parallel": "runtime/tensor_parallel",
    "modalmoe.ops": "ops",
    "modalmoe.models": "models",
    "modalmoe.train": "train",
    "modalmoe.study": "study",
    "modalmoe.launch": "launch",
}


class BuildPy(build_py):
    """Keep setup.py itself out of the installed ``modalmoe`` package (its folder is the repo root)."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "modalmoe":
            modules = [m for m in modules if m[1] not in ("setup",)]
        return modules


def _load_build_checks():
    """csrc/build_checks.py by path: the decisions below, importable by tests without running setup()."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "build_checks.py")
    spec = importlib.util.spec_from_file_location("modalmoe_build_checks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_checks = _load_build_checks()


def with_cuda() -> bool:
    """Decide CUDA or CPU-only, loudly; exit with the fix when the toolkit cannot build for this torch."""
    try:
        cuda, warning = build_checks.cuda_build_decision(torch.version.cuda, cpp_extension.CUDA_HOME, os.environ)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        if not cuda:
            return False
        nvcc = os.environ.get("PYTORCH_NVCC") or os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        try:
            version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
        except OSError as exc:
            version = f"{type(exc).__name__}: {exc}"
        build_checks.check_nvcc_matches_torch(torch.version.cuda, version, nvcc)
    except build_checks.BuildConfigError as exc:
        sys.exit(str(exc))
    arch_list = build_checks.cuda_arch_list(os.environ, torch.cuda.is_available())
    if arch_list is not None:
        print(f"modalmoe: no GPU visible and TORCH_CUDA_ARCH_LIST unset: compiling for {arch_list}", file=sys.stderr)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    return True


def extensions():
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return []
    cxx = ["-O3", "-std=c++20", "-fopenmp"]  # torch>=2.10 headers need C++20
    if with_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        return [
            cpp_extension.CUDAExtension(
                "modalmoe._C",
                sources,
                define_macros=[("MODALMOE_WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        cpp_extension.CppExtension(
            "modalmoe._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    ]


setup(
    name="modalmoe",
    version="0.1.0",
    description="Distributed training runtime for multimodal (image + text) Mixture-of-Experts models",
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    package_data={"modalmoe.launch": ["configs/*.yaml", "studies/*.yaml", "slurm/*.sbatch", "*.sh", "hostfile.example"]},
    ext_modules=extensions(),
    cmdclass={"build_py": BuildPy, "build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "deepspeed>=0.16",
        "webdataset>=0.2.90",
        "sentencepiece>=0.2",
        "pillow",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "safetensors",
        "ninja",
    ],
    extras_require={"mpi": ["mpi4py"], "test": ["pytest"]},
    entry_points={"console_scripts": ["modalmoe=modalmoe.launch.cli:main"]},
)
