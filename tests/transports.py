"""The transports every distributed test runs on, and the worlds the tests share: gloo's host
path, and the device path (what an NCCL group takes) with NCCL's semantics emulated on gloo
(hpcomm.emulate_nccl). A module of its own: spawned workers import test modules by name, and
another folder's conftest.py may come first on their path."""

from hpcomm.tools.launch import World

TRANSPORTS = {"gloo": {}, "nccl-emulated": {"HPCOMM_EMULATE_NCCL": "1"}}
_worlds: dict[tuple[int, str], World] = {}


def shared_world(n: int, transport: str) -> World:
    """An n-process World on this transport, spawned once per session."""
    if (n, transport) not in _worlds:
        _worlds[(n, transport)] = World(n, env=TRANSPORTS[transport])
    return _worlds[(n, transport)]


def close_all() -> None:
    for w in _worlds.values():
        w.__exit__(None, None, None)
    _worlds.clear()
