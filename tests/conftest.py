
import pytest
from hypothesis import HealthCheck, settings

from transports import TRANSPORTS, close_all, shared_world

settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=None,
                     help="hypothesis examples per property test (long fuzzing runs)")
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    n = config.getoption("--fuzz-examples")
    if n:
        settings.register_profile("fuzz", parent=settings.get_profile("ci"), max_examples=n)
        settings.load_profile("fuzz")


@pytest.fixture(scope="session", params=list(TRANSPORTS))
def transport(request):
    """Every distributed test runs on both transports (tests/transports.py)."""
    return request.param


@pytest.fixture(scope="session")
def world(transport):
    """world(n) -> a reusable n-process gloo World on this transport (spawned once per session,
    size and transport)."""
    yield lambda n: shared_world(n, transport)
    close_all()
