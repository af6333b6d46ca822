
import pytest
from hypothesis import HealthCheck, settings

from hpcomm.tools.launch import World

settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=None,
                     help="hypothesis examples per property test (long fuzzing runs)")


def pytest_configure(config):
    n = config.getoption("--fuzz-examples")
    if n:
        settings.register_profile("fuzz", parent=settings.get_profile("ci"), max_examples=n)
        settings.load_profile("fuzz")


_worlds: dict[int, World] = {}


@pytest.fixture(scope="session")
def world():
    """world(n) -> a reusable n-process gloo World (spawned once per session and size)."""
    def get(n: int) -> World:
        if n not in _worlds:
            _worlds[n] = World(n)
        return _worlds[n]
    yield get
    for w in _worlds.values():
        w.__exit__(None, None, None)
    _worlds.clear()
