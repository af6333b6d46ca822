"""Local multi-process worlds over gloo: ``spawn`` runs one function on N fresh processes;
``World`` keeps N processes alive and runs many functions on them (spawning costs seconds).

Functions must be importable (module level) so that spawned processes can unpickle them; each is
called as ``fn(rank, world_size, *args)`` inside an initialized default process group.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess
    from multiprocessing.queues import Queue


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """End this worker process as soon as its parent ``parent_pid`` ends, however it ends: a parent
    killed by SIGKILL cannot stop its workers, which would otherwise live on (busy, or waiting on
    their peers forever). Linux delivers SIGKILL to a child whose parent dies once prctl asks for
    it; a thread polling the parent's pid covers other systems and a parent that died before the
    prctl call. Linux sends the signal when the parent's thread that started the worker ends: start
    workers from a thread that outlives them (the main thread)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


class RemoteError(RuntimeError):
    """An exception raised on one or more ranks of a World (or a rank's process died), with their
    tracebacks; ``results`` holds what the other ranks returned."""

    def __init__(self, failures: dict[int, str], results: dict[int, object]) -> None:
        self.failures, self.results = failures, results
        detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        super().__init__(f"ranks {sorted(failures)} failed:\n{detail}")


def _worker(rank: int, world_size: int, port: int,
            tasks: Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None],
            results: Queue[tuple[int, bool, Any]], pg_timeout: float, parent_pid: int,
            env: dict[str, str]) -> None:
    die_with_parent(parent_pid)
    os.environ.update(env)
    # share the cores among the ranks, as torchrun's OMP_NUM_THREADS=1 does (torch is already
    # imported here, so the environment variable alone would come too late)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=pg_timeout))
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            fn, args = task
            try:
                results.put((rank, True, fn(rank, world_size, *args)))
            except BaseException:  # report every failure, including asserts, to the parent
                results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class World:
    """N local gloo processes reused across calls. ``run(fn, *args)`` returns the per-rank results
    or raises RemoteError; a call that does not finish within ``timeout`` kills the world (the
    next call starts a fresh one) and raises TimeoutError. ``env``: set in every process before
    the process group starts (e.g. HPCOMM_EMULATE_NCCL=1)."""

    def __init__(self, world_size: int, pg_timeout: float = 60.0, env: dict[str, str] | None = None) -> None:
        self.world_size, self.pg_timeout, self.env = world_size, pg_timeout, dict(env or {})
        self._procs: list[BaseProcess] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        port = free_port()
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(r, self.world_size, port, self._tasks[r], self._results,
                                         self.pg_timeout, os.getpid(), self.env))
                       for r in range(self.world_size)]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> list[Any]:
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for q in self._tasks:
            q.put((fn, args))
        out: dict[int, object] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(out) + len(failures) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=0.2)
                (out if ok else failures)[rank] = value
            except queue.Empty:
                for r, p in enumerate(self._procs):
                    if r not in out and r not in failures and not p.is_alive():
                        failures[r] = f"process exited with code {p.exitcode}"
                if time.monotonic() > deadline:
                    self.close()
                    raise TimeoutError(f"{fn.__name__} did not finish on all {self.world_size} ranks "
                                       f"within {timeout} s (finished: {sorted(out) + sorted(failures)})")
        if failures:
            # a failed call may leave messages in flight or a member dead: start afresh next time
            self.close()
            raise RemoteError(failures, out)
        return [out[r] for r in range(self.world_size)]

    def close(self) -> None:
        for p in self._procs:
            if p.pid is None:  # never started (spawning failed): nothing to stop
                continue
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        self._procs = []

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._procs:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        self.close()


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` once on a fresh local gloo world; per-rank results."""
    with World(world_size) as world:
        return world.run(fn, *args, timeout=timeout)
