"""Patching hpcomm while the code under test runs (restored after): counting a function's calls,
and sending every host message of more than one segment in pieces."""

from contextlib import contextmanager
from typing import Any, Callable, Iterator


@contextmanager
def counted(owner: Any, name: str, keep: Callable[..., bool] = lambda *a, **k: True) -> Iterator[list]:
    """Patch ``owner.name`` to record the arguments of each call that ``keep`` accepts."""
    calls: list = []
    original = getattr(owner, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        if keep(*args, **kwargs):
            calls.append(args)
        return original(*args, **kwargs)

    setattr(owner, name, counting)
    try:
        yield calls
    finally:
        setattr(owner, name, original)


@contextmanager
def in_pieces(on: bool = True) -> Iterator[None]:
    """With ``on``, every host message of more than one segment travels in pieces, and every one
    block of a tensor on its own (as only big ones do otherwise), so small tensors take that path."""
    from hpcomm import comm, engine
    saved = comm.IN_PLACE_MIN
    comm.IN_PLACE_MIN = 1 if on else saved
    engine.EXECS._items.clear()  # prepared before: their messages are split the other way
    try:
        yield
    finally:
        comm.IN_PLACE_MIN = saved
        engine.EXECS._items.clear()
