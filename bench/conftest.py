"""Fixtures of the on-demand benchmark suite (``python -m pytest bench/test_bench_transforms.py``);
the default ``python -m pytest`` run collects only tests/ (testpaths in pyproject.toml)."""

import pytest

from hpcomm.tools.launch import World


@pytest.fixture(scope="session")
def world4():
    """Four local gloo processes, spawned once for the whole suite."""
    with World(4, pg_timeout=600) as world:
        yield world
