"""One command that checks an installed hpcomm on this machine, GPU path included:

    python -m hpcomm.selfcheck            # everything this machine can run (< 5 min on a GPU box)
    python -m hpcomm.selfcheck --quick    # smaller tables and buffers (CPU subset: about a minute)
    python -m hpcomm.selfcheck --json     # one JSON document instead of the table

It builds nothing: it uses the kernels that are already built, and says which are missing.

- kernels: every built backend (cuda, triton, cpp, ...) bitwise against the pure-PyTorch reference,
  for every dtype, copy and accumulate, on tables mixing random short rows, long runs, column windows,
  broadcasts and empty segments; on a GPU also that apply runs under
  ``torch.cuda.set_sync_debug_mode("error")``. Triton on CPU runs in a subprocess under
  TRITON_INTERPRET=1 (the interpreter is chosen when triton is imported).
- bandwidth: pack and unpack of 1 KiB rows in random order, GB/s beside ``y.copy_(x)`` of the same
  bytes into a preallocated buffer (the copy bandwidth), after checking the result.
- transform: a one-rank process group (gloo on CPU, NCCL on a GPU), ``Transform`` forward and
  backward against indexing the global tensor; on a GPU the steady-state calls run under the sync
  debug mode, so a hidden device->host sync is an error.
- wire: the device path's per-call code end to end on one rank: a one-rank group whose transform
  sends its rows to itself through the transport (``loopback``: one ``batch_isend_irecv`` group
  per call, which NCCL allows), forward and backward, with ``out=`` and ``out_rows=``, against
  indexing; on a GPU calls 2-3 run under ``torch.cuda.set_sync_debug_mode("error")``; on CPU the
  same code runs on NCCL's emulation over gloo (HPCOMM_EMULATE_NCCL=1 for this check).
- simulate: a four-rank transform in one process (``Transform.simulate``) against slicing.
- graph (GPU): the transform captured in a CUDA graph and replayed on new data.
- compile: the transform under ``torch.compile`` (fullgraph), forward and gradient as eager.
- nccl (2+ GPUs): the three ``hpcomm-bench --preset targets`` cases over NCCL under torchrun (on 2-3
  GPUs the same cases at degree 2); a row passes when every method's output was verified.

Each check is a row PASS, FAIL or SKIPPED (with the reason); the exit status is 1 if any row failed
or the run outlived --timeout (it then prints every thread's stack instead of waiting forever).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch

from hpcomm import segments

CHECKS = ("kernels", "bandwidth", "transform", "wire", "simulate", "graph", "compile", "nccl")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)
NO_ADD_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# A GPU kernel below this fraction of the copy bandwidth on 1 KiB rows is not spreading over the
# device (the CUDA kernel is expected near copy speed, Triton above half of it).
GPU_MIN_COPY_RATIO = 0.25
MiB = 1 << 20


@dataclass
class Row:
    check: str
    target: str
    status: str  # PASS | FAIL | SKIPPED
    detail: str
    seconds: float = 0.0


@dataclass(frozen=True)
class Sizes:
    """Kernel tables: elements moved and lines per segment at most; bandwidth buffers in bytes."""

    kernel_elems: int
    kernel_lines: int
    bandwidth_bytes: int
    reps: int


def _sizes(device: torch.device, quick: bool, interpreted: bool = False) -> Sizes:
    if interpreted:  # the Triton interpreter runs each program in Python
        return Sizes(2048, 48, 0, 0)
    if device.type == "cuda":
        return Sizes(1 << 21 if quick else 1 << 23, 1 << 16, 64 * MiB if quick else 256 * MiB, 10 if quick else 30)
    return Sizes(1 << 18 if quick else 1 << 21, 4096, 16 * MiB if quick else 64 * MiB, 3 if quick else 7)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- kernels ---------------------------------------------------------------------------------------


def segment_table(budget: int, max_lines: int, seed: int) -> tuple[torch.Tensor, int, int]:
    """A table moving about ``budget`` elements, destinations disjoint, rows in random order: one
    long run, abutting lines (one run), a column window, a broadcast (src stride 0), empty segments
    and many short rows at odd offsets. Returns (table [n, 6], src_numel, dst_numel)."""
    g = torch.Generator().manual_seed(seed)

    def rand(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=g))

    long = max(1, budget // 8)
    width, short = rand(3, 40), rand(1, 33)
    specs = [  # (src_offset, num_lines, line_len, src_stride, dst_stride)
        (rand(0, 15), 1, long + rand(0, 7), 1, 1),
        (rand(0, 15), 4, long // 8, long // 8, long // 8),
        (rand(0, 15), max(1, min(max_lines, long // width)), width, width + rand(1, 9), width + rand(0, 9)),
        (rand(0, 15), max(1, min(max_lines, 64)), short, 0, short),
        (rand(0, 15), 0, 5, 5, 5),
        (rand(0, 15), 7, 0, 1, 1),
    ]
    src_numel = budget
    for _ in range(min(2000, max(8, budget // 2 // 150))):
        length = rand(1, 300)
        specs.append((rand(0, src_numel - length), 1, length, length, length))
    rows, dst_cursor = [], rand(0, 7)
    for src_offset, lines, length, src_stride, dst_stride in specs:
        rows.append([src_offset, dst_cursor, lines, length, src_stride, dst_stride])
        if lines and length:
            dst_cursor += (lines - 1) * dst_stride + length
            src_numel = max(src_numel, src_offset + (lines - 1) * src_stride + length)
        dst_cursor += rand(0, 5)
    order = torch.randperm(len(rows), generator=g)
    return torch.tensor(rows, dtype=torch.int64)[order].contiguous(), src_numel + rand(0, 3), dst_cursor + rand(0, 3)


def fill(numel: int, dtype: torch.dtype, seed: int, finite: bool, device: torch.device) -> torch.Tensor:
    """Random bits (every NaN payload and denormal a copy must keep), or finite values for adds."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        out = torch.randint(0, 2, (numel,), generator=g, dtype=torch.bool)
    elif finite and dtype.is_floating_point:
        out = (torch.randn(numel, generator=g, dtype=torch.float64) * 100).to(dtype)
    else:
        out = torch.randint(-128, 128, (numel * dtype.itemsize,), generator=g, dtype=torch.int8).view(dtype)
    return out.to(device)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


def check_kernels(name: str, device: torch.device, sizes: Sizes, seeds: int) -> Row:
    """Bitwise against the reference for every dtype, copy and accumulate; the accumulate applies
    twice, as the engine does for partial sums."""
    backend = segments.get_backend(name, device)
    failures, cases = [], 0
    for seed in range(seeds):
        table, src_numel, dst_numel = segment_table(sizes.kernel_elems, sizes.kernel_lines, seed)
        prepared = backend.prepare(table, device)
        for dtype in DTYPES:
            for accumulate in (False, True):
                if accumulate and dtype in NO_ADD_DTYPES:
                    continue
                cases += 1
                src = fill(src_numel, dtype, seed, accumulate, torch.device("cpu"))
                dst = fill(dst_numel, dtype, seed + 1, accumulate, torch.device("cpu"))
                expected = dst.clone()
                out, src_dev = dst.to(device), src.to(device)
                for _ in range(1 + accumulate):
                    segments.copy_segments_reference(src, expected, table, accumulate)
                    backend.apply(prepared, src_dev, out, accumulate)
                if not _bitwise_equal(out, expected):
                    bad = int((out.cpu().view(torch.uint8) != expected.view(torch.uint8)).sum())
                    failures.append(f"{str(dtype).removeprefix('torch.')} {'add' if accumulate else 'copy'} "
                                    f"seed {seed}: {bad} bytes differ")
    if failures:
        return Row("kernels", f"{name}/{device.type}", "FAIL", "; ".join(failures[:4]) +
                   (f" (+{len(failures) - 4} more)" if len(failures) > 4 else ""))
    detail = f"bitwise = reference: {len(DTYPES)} dtypes x copy/add x {seeds} tables ({cases} cases)"
    if device.type == "cuda":
        detail += sync_free_apply(backend, device)
    return Row("kernels", f"{name}/{device.type}", "PASS", detail)


def check_cuda_item_arithmetic(sizes: Sizes, seeds: int) -> Row:
    """The CUDA kernel's work items (numbered by the host prepare, cut by the shared header
    csrc/include/segment_index.h) walked on the CPU: every copy bitwise equal to the reference. This
    is the part of the CUDA kernel a machine without a GPU can check."""
    from hpcomm import _C

    for seed in range(seeds):
        table, src_numel, dst_numel = segment_table(sizes.kernel_elems, sizes.kernel_lines, seed)
        ends = _C.chunk_ends(table)
        for dtype in DTYPES:
            src, dst = fill(src_numel, dtype, seed, False, torch.device("cpu")), fill(
                dst_numel, dtype, seed + 1, False, torch.device("cpu"))
            expected = dst.clone()
            segments.copy_segments_reference(src, expected, table)
            _C.copy_segments_by_items(src, dst, table, ends)
            if not _bitwise_equal(dst, expected):
                return Row("kernels", "cuda-items/cpu", "FAIL", f"{dtype} seed {seed}: items miss or overlap")
    return Row("kernels", "cuda-items/cpu", "PASS", f"the CUDA work-item arithmetic walked on the CPU: "
               f"copies = reference, {len(DTYPES)} dtypes x {seeds} tables")


def sync_free_apply(backend: segments.Backend, device: torch.device) -> str:
    """apply under the sync debug mode: raises if a launch reads anything back to the host."""
    table, src_numel, dst_numel = segment_table(1 << 16, 256, 0)
    prepared = backend.prepare(table, device)
    src = torch.zeros(src_numel, device=device)
    dst = torch.zeros(dst_numel, device=device)
    for accumulate in (False, True):  # a first launch may compile and load modules
        backend.apply(prepared, src, dst, accumulate)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for accumulate in (False, True):
            backend.apply(prepared, src, dst, accumulate)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "; apply sync-free"


def kernels_in_interpreter(names: Sequence[str], quick: bool) -> list[Row]:
    """The kernel rows of ``names`` on CPU from a child process under TRITON_INTERPRET=1."""
    cmd = [sys.executable, "-m", "hpcomm.selfcheck", "--json", "--checks", "kernels", "--devices", "cpu",
           "--backends", ",".join(names)] + (["--quick"] if quick else [])
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        rows = [Row(**r) for r in json.loads(proc.stdout)["rows"]
                if r["check"] == "kernels" and r["target"].endswith("/cpu")]
    except (subprocess.TimeoutExpired, ValueError, KeyError, TypeError) as e:
        detail = f"{type(e).__name__}: {e}"
        if isinstance(e, ValueError):
            detail += f"; stderr: {proc.stderr.strip()[-500:]}"
        return [Row("kernels", f"{n}/cpu", "FAIL", f"interpreter subprocess: {detail}") for n in names]
    for r in rows:
        r.detail += " (TRITON_INTERPRET=1)"
    missing = [n for n in names if f"{n}/cpu" not in {r.target for r in rows}]
    return rows + [Row("kernels", f"{n}/cpu", "FAIL", f"interpreter subprocess reported nothing; exit "
                       f"{proc.returncode}") for n in missing]


# -- bandwidth -------------------------------------------------------------------------------------


def row_tables(num_rows: int, row_elems: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack (rows in random order -> contiguous) and unpack (the reverse) tables, [num_rows, 6]."""
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    scattered, packed = order * row_elems, torch.arange(num_rows) * row_elems
    ones, width = torch.ones(num_rows, dtype=torch.int64), torch.full((num_rows,), row_elems)
    pack = torch.stack([scattered, packed, ones, width, width, width], 1).contiguous()
    unpack = torch.stack([packed, scattered, ones, width, width, width], 1).contiguous()
    return pack, unpack


def best_seconds(fns: dict[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, float]:
    """Best time of each fn, interleaved so that load elsewhere hits all alike."""
    best = {name: math.inf for name in fns}
    for _ in range(reps + 1):  # the first round warms up
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def check_bandwidth(name: str, device: torch.device, sizes: Sizes) -> Row:
    """GB/s (bytes moved once) of pack and unpack of 1 KiB rows beside y.copy_(x)."""
    backend = segments.get_backend(name, device)
    row_bytes = 1024
    num_rows = sizes.bandwidth_bytes // row_bytes
    pack, unpack = row_tables(num_rows, row_bytes, 0)
    x = torch.randint(0, 256, (num_rows * row_bytes,), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    packed = {kind: backend.prepare(t, device) for kind, t in (("pack", pack), ("unpack", unpack))}
    backend.apply(packed["pack"], x, y, False)
    expected = x.view(num_rows, row_bytes)[pack[:, 0].to(device) // row_bytes].reshape(-1)
    if not torch.equal(y, expected):
        return Row("bandwidth", f"{name}/{device.type}", "FAIL", "pack result differs from indexing")
    best = best_seconds({"pack": lambda: backend.apply(packed["pack"], x, y, False),
                         "unpack": lambda: backend.apply(packed["unpack"], y, x, False),
                         "copy_": lambda: y.copy_(x)}, sizes.reps, device)
    gbps = {k: x.numel() / s / 1e9 for k, s in best.items()}
    ratios = {k: gbps[k] / gbps["copy_"] for k in ("pack", "unpack")}
    detail = (f"{x.numel() // MiB} MiB of 1 KiB rows: pack {gbps['pack']:.1f} GB/s ({ratios['pack']:.2f}x copy_), "
              f"unpack {gbps['unpack']:.1f} GB/s ({ratios['unpack']:.2f}x), copy_ {gbps['copy_']:.1f} GB/s")
    if device.type == "cuda" and min(ratios.values()) < GPU_MIN_COPY_RATIO:
        return Row("bandwidth", f"{name}/{device.type}", "FAIL", detail + f"; below {GPU_MIN_COPY_RATIO}x copy_")
    return Row("bandwidth", f"{name}/{device.type}", "PASS", detail)


# -- transform paths -------------------------------------------------------------------------------


class OneRankGroup:
    """A default process group of world size 1 (gloo on CPU, NCCL on a GPU) over TCP on a free port;
    reuses an existing one, and destroys only the one it made."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.owned = device, False

    def __enter__(self) -> OneRankGroup:
        import torch.distributed as dist

        from hpcomm.tools.launch import free_port

        if not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                    timeout=timedelta(seconds=120))
            self.owned = True
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        if self.owned:
            dist.destroy_process_group()


SEQ_LENS = (5, 7, 300, 61)
HIDDEN = 48


def _one_rank_case(device: torch.device, dtype: torch.dtype) -> tuple[Any, torch.Tensor, torch.Tensor, Any, Any]:
    """CP zigzag -> contiguous on rank 0: (transform, x_global [n, HIDDEN], rank 0's x, src, dst)."""
    from hpcomm import Layout, Transform

    n = sum(SEQ_LENS)
    src = Layout.cp([0], list(SEQ_LENS), "zigzag")
    dst = Layout.contiguous([0], n)
    x_global = torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)
    return Transform(src, dst), x_global, src.shard(x_global, 0), src, dst


def check_transform(device: torch.device) -> Row:
    """Forward and backward on a one-rank group against indexing; steady state without host syncs
    on a GPU."""
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        t, x_global, x0, src, dst = _one_rank_case(device, dtype)
        gy_global = torch.randn(x_global.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
        expected_y, expected_grad = dst.shard(x_global, 0), src.shard(gy_global, 0)
        gy = dst.shard(gy_global, 0)  # outside the sync debug mode: shard copies indices to the device
        for call in range(3):  # the first call plans and prepares; the others must not sync
            x = x0.clone().requires_grad_(True)
            with _sync_debug(device, enabled=call > 0):
                y = t(x)
                y.backward(gy)
            if not torch.equal(y.detach(), expected_y) or x.grad is None or not torch.equal(x.grad, expected_grad):
                return Row("transform", device.type, "FAIL", f"{dtype}: call {call} differs from indexing")
        results.append(str(dtype).removeprefix("torch."))
    how = "; calls 2-3 under sync debug mode 'error'" if device.type == "cuda" else ""
    return Row("transform", device.type, "PASS", f"1-rank {'nccl' if device.type == 'cuda' else 'gloo'}, "
               f"cp zigzag -> contiguous, fwd+bwd = indexing ({', '.join(results)}){how}")


def check_wire(device: torch.device) -> Row:
    """The device path through the wire on one rank (see the module docstring)."""
    import torch.distributed as dist

    from hpcomm import Layout, Transform

    saved = os.environ.get("HPCOMM_EMULATE_NCCL")
    if device.type == "cpu":
        from hpcomm import emulate_nccl

        os.environ["HPCOMM_EMULATE_NCCL"] = "1"
        emulate_nccl.install()
    groups: list[int] = []
    try:
        n = sum(SEQ_LENS)
        src, dst = Layout.cp([0], list(SEQ_LENS), "zigzag"), Layout.contiguous([0], n)
        t = Transform(src, dst, grad="sum", loopback=True)
        x_global = torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(3)).to(device)
        x0, expected = src.shard(x_global, 0), dst.shard(x_global, 0)
        gy, expected_grad = expected * 2, x0 * 2
        out, big, rows = torch.empty_like(expected), torch.zeros(n + 4, HIDDEN, device=device), \
            torch.arange(n, device=device) + 2
        for call in range(3):  # the first call plans and prepares; the others must not sync
            x = x0.clone().requires_grad_(True)
            with _sync_debug(device, enabled=call > 0):
                posting = dist.batch_isend_irecv
                dist.batch_isend_irecv = _counting(posting, groups)
                try:
                    y = t(x)
                    y.backward(gy)
                    t(x0, out=out)
                    t(x0, out=big, out_rows=rows)
                finally:
                    dist.batch_isend_irecv = posting
            if not (torch.equal(y.detach(), expected) and x.grad is not None and torch.equal(x.grad, expected_grad)
                    and torch.equal(out, expected) and torch.equal(big[2:2 + n], expected)):
                return Row("wire", device.type, "FAIL", f"call {call} differs from indexing")
    finally:
        if saved is None:
            os.environ.pop("HPCOMM_EMULATE_NCCL", None)
        else:
            os.environ["HPCOMM_EMULATE_NCCL"] = saved
    if len(groups) != 3 * 4:
        return Row("wire", device.type, "FAIL", f"{len(groups)} grouped posts for 3 x 4 calls")
    how = "calls 2-3 under sync debug mode 'error'" if device.type == "cuda" else "NCCL emulated on gloo"
    return Row("wire", device.type, "PASS", f"1-rank loopback through batch_isend_irecv, fwd+bwd, out=, "
               f"out_rows= = indexing; {how}")


def _counting(post: Callable[..., Any], groups: list[int]) -> Callable[..., Any]:
    def counted(ops: Any) -> Any:
        groups.append(len(ops))
        return post(ops)
    return counted


class _sync_debug:
    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.on = enabled and device.type == "cuda"

    def __enter__(self) -> None:
        if self.on:
            torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc: object) -> None:
        if self.on:
            torch.cuda.set_sync_debug_mode("default")


def check_simulate(device: torch.device) -> Row:
    """A four-rank transform in one process, forward and backward, against slicing."""
    from hpcomm import Layout, Transform

    ranks = [0, 1, 2, 3]
    n = sum(SEQ_LENS)
    src = Layout.cp(ranks, list(SEQ_LENS), "zigzag")
    dst = Layout.dp(ranks, list(SEQ_LENS), "balanced")
    t = Transform(src, dst)
    x_global = torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(2), device="cpu").to(device)
    ys = t.simulate({r: src.shard(x_global, r) for r in ranks})
    bad = [r for r in ranks if not torch.equal(ys[r], dst.shard(x_global, r))]
    grads = t.simulate_backward({r: dst.shard(x_global, r) * 3 for r in ranks})
    bad += [r for r in ranks if not torch.equal(grads[r], src.shard(x_global * 3, r))]
    if bad:
        return Row("simulate", device.type, "FAIL", f"ranks {sorted(set(bad))} differ from slicing")
    return Row("simulate", device.type, "PASS", "4 ranks in one process, cp zigzag -> dp balanced, fwd+bwd = slicing")


def check_graph(device: torch.device) -> Row:
    """Forward captured in a CUDA graph, replayed on new data."""
    t, x_global, x0, src, dst = _one_rank_case(device, torch.float32)
    static_x = x0.clone()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):  # warm up (plan, prepared tables) outside the capture
            t(static_x)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = t(static_x)
    new_global = x_global * 2 + 1
    static_x.copy_(src.shard(new_global, 0))
    graph.replay()
    torch.cuda.synchronize(device)
    if not torch.equal(static_y, dst.shard(new_global, 0)):
        return Row("graph", device.type, "FAIL", "replay on new data differs from indexing")
    return Row("graph", device.type, "PASS", "forward captured once, replayed on new data = indexing")


def check_compile(device: torch.device, quick: bool) -> Row:
    """torch.compile(fullgraph=True) of a step around the transform: forward and gradient as eager."""
    import torch._dynamo

    compiler = "aot_eager" if quick else "inductor"
    t, _, x0, _, _ = _one_rank_case(device, torch.float64 if device.type == "cpu" else torch.float32)

    def step(x: torch.Tensor) -> torch.Tensor:
        return (t(x * 2) ** 2).sum(-1)

    x = x0.clone().requires_grad_(True)
    eager = step(x)
    eager.sum().backward()
    eager_grad, x.grad = x.grad, None
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)(x)
    compiled.sum().backward()
    # the elementwise ops around the transform may be fused and reordered: same values to 1e-5
    ok = torch.allclose(compiled, eager, rtol=1e-5, atol=0) and x.grad is not None and eager_grad is not None \
        and torch.allclose(x.grad, eager_grad, rtol=1e-5, atol=0)
    return Row("compile", device.type, "PASS" if ok else "FAIL",
               f"fullgraph, backend {compiler}: fwd+grad {'=' if ok else '!='} eager (rtol 1e-5)")


def check_nccl(num_gpus: int, quick: bool) -> Row:
    """The bench targets over NCCL under torchrun, one rank per GPU."""
    from hpcomm.tools.bench import TARGETS

    nproc = 4 if num_gpus >= 4 else 2
    iters = ["--iters", "5" if quick else "20", "--warmup", "2" if quick else "5"]
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "hpcomm.tools.bench"]
    if nproc == 4:
        runs = [base + ["--preset", "targets"] + iters]
    else:  # the preset needs 4 ranks: the same cases at degree 2
        runs = [base + ["--src", re.sub(r"=4\b", "=2", s), "--dst", re.sub(r"=4\b", "=2", d),
                        "--methods", f"hpcomm,{b}"] + iters for _, s, d, b, _ in TARGETS]
    verdicts = []
    for cmd in runs:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            return Row("nccl", f"{nproc} GPUs", "FAIL", f"timed out: {' '.join(cmd[2:])}")
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return Row("nccl", f"{nproc} GPUs", "FAIL", f"exit {proc.returncode}: {' | '.join(tail)}")
        verdicts += [line.split()[-1] for line in proc.stdout.splitlines() if line.endswith(("PASS", "MISS"))]
    what = "preset targets" if nproc == 4 else "target cases at degree 2"
    extra = f"; targets {verdicts.count('PASS')} PASS / {verdicts.count('MISS')} MISS" if verdicts else ""
    return Row("nccl", f"{nproc} GPUs", "PASS", f"hpcomm-bench {what}: every output verified{extra}")


# -- driver ----------------------------------------------------------------------------------------


def _timed(fn: Callable[[], Row | list[Row]], check: str, target: str) -> list[Row]:
    """Runs one check; an exception is that check's FAIL, never the end of the run."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001  (every failure becomes a row)
        first_line = next(iter(str(e).strip().splitlines()), "")[:300]
        out = Row(check, target, "FAIL", f"{type(e).__name__}: {first_line}")
    rows = out if isinstance(out, list) else [out]
    for r in rows:
        r.seconds = r.seconds or round(time.perf_counter() - t0, 2)
    return rows


def _interpreter_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def run(args: argparse.Namespace) -> Iterator[Row]:
    """Every requested check, one row at a time."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = [torch.device(d) for d in args.devices] if args.devices else \
        [torch.device("cpu")] + ([torch.device("cuda", 0)] if gpus else [])
    names = args.backends or [n for n in segments.backend_names() if n != "torch"]
    available = segments.backends()
    for name in names:
        if name in available and not available[name]:
            yield Row("kernels", f"{name}/any", "SKIPPED", f"backend {name!r} is not available in this build")
    for device in devices:
        sizes = _sizes(device, args.quick)
        for name in names:
            if name not in available:
                yield Row("kernels", f"{name}/{device.type}", "FAIL", f"unknown backend {name!r}")
                continue
            backend = segments.lookup_backend(name)
            if backend is None or device.type not in backend.device_types:
                continue
            for check in ("kernels", "bandwidth"):
                if check not in args.checks:
                    continue
                target = f"{name}/{device.type}"
                reason = backend.unusable_reason(device)
                on_interpreter = name == "triton" and device.type == "cpu"
                if check == "kernels" and reason is None:
                    s = _sizes(device, args.quick, on_interpreter)
                    yield from _timed(lambda: check_kernels(name, device, s, 1 if args.quick else 3), check, target)
                elif check == "kernels" and on_interpreter and _interpreter_available():
                    # the interpreter must be on before triton is imported: a child process
                    yield from _timed(lambda: kernels_in_interpreter([name], args.quick), check, target)
                elif check == "bandwidth" and on_interpreter:
                    yield Row(check, target, "SKIPPED", "interpreted Triton says nothing about bandwidth")
                elif reason is not None:
                    yield Row(check, target, "SKIPPED", reason)
                else:
                    yield from _timed(lambda: check_bandwidth(name, device, sizes), check, target)
    if "kernels" in args.checks and "cuda" in names and any(d.type == "cpu" for d in devices) and \
            segments.backends()["cpp"]:
        yield from _timed(lambda: check_cuda_item_arithmetic(_sizes(torch.device("cpu"), args.quick),
                                                             1 if args.quick else 3), "kernels", "cuda-items/cpu")
    if not gpus:
        yield from (Row(c, "*/cuda", "SKIPPED", "no CUDA device") for c in ("kernels", "bandwidth") if c in args.checks)
    for device in devices:
        needs_group = set(args.checks) & {"transform", "wire", "graph", "compile"}
        with OneRankGroup(device) if needs_group else contextlib.nullcontext():
            for check, fn in (("transform", lambda: check_transform(device)),
                              ("wire", lambda: check_wire(device)),
                              ("simulate", lambda: check_simulate(device)),
                              ("graph", lambda: check_graph(device)),
                              ("compile", lambda: check_compile(device, args.quick))):
                if check in args.checks and check == "graph" and device.type != "cuda":
                    yield Row(check, device.type, "SKIPPED", "CUDA graphs need a CUDA device")
                elif check in args.checks:
                    yield from _timed(fn, check, device.type)
    if "nccl" in args.checks:
        if gpus >= 2:
            yield from _timed(lambda: check_nccl(gpus, args.quick), "nccl", f"{gpus} GPUs")
        else:
            yield Row("nccl", "bench targets", "SKIPPED", f"needs 2+ GPUs, found {gpus}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hpcomm.selfcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller tables and buffers")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--backends", type=lambda s: [n for n in s.split(",") if n],
                   help="kernel backends to check (default: every one but the reference, torch)")
    p.add_argument("--checks", type=lambda s: [n for n in s.split(",") if n], default=list(CHECKS),
                   help=f"subset of {','.join(CHECKS)}")
    p.add_argument("--devices", type=lambda s: [n for n in s.split(",") if n], help="e.g. cpu or cpu,cuda:0")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a hung run dumps every "
                   "thread's stack and exits 1 (default 900)")
    args = p.parse_args(argv)
    unknown = set(args.checks) - set(CHECKS)
    if unknown:
        p.error(f"unknown checks {sorted(unknown)}; expected a subset of {','.join(CHECKS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the checks, prints the table (or JSON); 1 if any check failed, else 0."""
    args = parse_args(argv)
    # a hung kernel, collective or compile must end in a failure, not in a wait forever
    # (to the process's own stderr: a captured sys.stderr, as under pytest, has no file descriptor)
    faulthandler.dump_traceback_later(args.timeout, exit=True, file=sys.__stderr__ or 2)
    try:
        return _main(args)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    rows: list[Row] = []
    if not args.json:
        print(f"hpcomm selfcheck: torch {torch.__version__}, "
              f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPU(s), "
              f"backends built: {', '.join(n for n, ok in segments.backends().items() if ok)}")
        print(f"{'check':<10} {'target':<15} {'status':<8} {'s':>6}  detail", flush=True)
    for row in run(args):
        rows.append(row)
        if not args.json:
            print(f"{row.check:<10} {row.target:<15} {row.status:<8} {row.seconds:>6.1f}  {row.detail}", flush=True)
    failed = [r for r in rows if r.status == "FAIL"]
    if args.json:
        print(json.dumps({"ok": not failed, "seconds": round(time.perf_counter() - t0, 1),
                          "rows": [asdict(r) for r in rows]}, indent=1))
    else:
        counts = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "SKIPPED")}
        print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIPPED']} skipped in "
              f"{time.perf_counter() - t0:.0f} s" + (": FAIL" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
