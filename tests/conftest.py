"""Fixtures shared by several test modules, and the CI rule for ``pytest.importorskip``."""

from __future__ import annotations

from pathlib import Path

import pytest
from modalmoe.runtime.data import make_demo
from required_imports import importorskip

# a required dependency that does not import fails under CI=true instead of skipping
pytest.importorskip = importorskip


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """The small demo set the multi-process training tests run on (read-only; built once). Modules
    that need another shape define their own ``demo``, which takes precedence."""
    d = tmp_path_factory.mktemp("demo")
    make_demo(d, n_train=64, n_eval=16, samples_per_shard=32, image_size=16)
    return d
