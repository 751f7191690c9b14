"""Fixtures shared by several test modules, and the CI rule for ``pytest.importorskip``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch.distributed as dist
from dist_utils import LAUNCH_ENV, restore_launch_env
from modalmoe.runtime.data import make_demo
from required_imports import importorskip

# a required dependency that does not import fails under CI=true instead of skipping
pytest.importorskip = importorskip


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    """A test that leaves a default process group (or launcher variables) behind makes later
    in-process tests see a job that is not theirs: tear it down and fail the test that leaked it."""
    before = dist.is_available() and dist.is_initialized()
    env = {k: os.environ.get(k) for k in LAUNCH_ENV}
    yield
    leaked = not before and dist.is_available() and dist.is_initialized()
    if leaked:
        dist.destroy_process_group()
    changed = restore_launch_env(env)
    assert not leaked, "the test left a default process group initialised: destroy it (or run the job in a subprocess)"
    assert not changed, f"the test left launcher variables changed in os.environ: {changed} (use monkeypatch.setenv)"


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """The small demo set the multi-process training tests run on (read-only; built once). Modules
    that need another shape define their own ``demo``, which takes precedence."""
    d = tmp_path_factory.mktemp("demo")
    make_demo(d, n_train=64, n_eval=16, samples_per_shard=32, image_size=16)
    return d
