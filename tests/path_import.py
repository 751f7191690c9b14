"""Import a script that is not part of the package (csrc/build_checks.py, .ci/pytest_gate.py) by
its path, so its tests call it without running it as a program."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

__all__ = ["import_path"]


def import_path(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
