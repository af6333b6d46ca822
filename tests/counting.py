"""Patching hpcomm while the code under test runs (restored after): counting a function's calls."""

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
