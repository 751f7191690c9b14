"""``pytest.importorskip`` that cannot skip a required package in CI.

A dependency listed in requirements.txt (or torch, installed first) that fails to import is a broken
install, not an optional feature: under ``CI=true`` its ``importorskip`` fails the test instead of
skipping it, so CI cannot go green with the tests that need it skipped. Elsewhere it still skips.
conftest.py installs :func:`importorskip` as ``pytest.importorskip``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

__all__ = ["in_ci", "required_modules", "importorskip"]

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"
_IMPORT_NAMES = {"pillow": "PIL", "pyyaml": "yaml"}  # distributions whose module is named otherwise
_original_importorskip = pytest.importorskip


def in_ci(env: Mapping[str, str] | None = None) -> bool:
    return (os.environ if env is None else env).get("CI", "").strip().lower() in ("1", "true", "yes")


def required_modules(requirements: Path = REQUIREMENTS) -> frozenset[str]:
    """Top-level module names of the packages requirements.txt lists, and torch."""
    names = {"torch"}
    for line in requirements.read_text().splitlines():
        name = re.split(r"[\s<>=!~;\[#@]", line.strip(), maxsplit=1)[0].lower()
        if name:
            names.add(_IMPORT_NAMES.get(name, name.replace("-", "_")))
    return frozenset(names)


def importorskip(modname: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return _original_importorskip(modname, *args, **kwargs)
    except pytest.skip.Exception as skip:
        if in_ci() and modname.split(".")[0] in required_modules():
            pytest.fail(
                f"{modname} did not import, and {modname.split('.')[0]} is required (requirements.txt); "
                f"CI=true does not skip it: {skip}",
                pytrace=False,
            )
        raise
