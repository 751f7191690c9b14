"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from modalmoe.runtime.data import make_demo


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """The small demo set the multi-process training tests run on (read-only; built once). Modules
    that need another shape define their own ``demo``, which takes precedence."""
    d = tmp_path_factory.mktemp("demo")
    make_demo(d, n_train=64, n_eval=16, samples_per_shard=32, image_size=16)
    return d
