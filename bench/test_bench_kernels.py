"""pytest-benchmark suite of the segment-copy kernels; on demand only:

    pytest bench/test_bench_kernels.py --benchmark-only

Each case times the kernel backend and, as benchmarks of the same group, its baselines
(``y.copy_(x)`` of the same bytes and torch's index ops; see bench/bench_kernels.py): compare them
in the group table. The kernel's table is prepared once; only apply is timed. extra_info carries GB/s
(bytes moved once / best time).
"""

from __future__ import annotations

import pytest
import torch

from bench_kernels import MiB, Case, index_baseline, make_workload
from hpcomm import segments

CASES = [Case(op, row_bytes, run_rows, 64 * MiB) for op in ("pack", "unpack", "copy")
         for row_bytes in (64, 1024, 65536) for run_rows in (1, 256) if run_rows * row_bytes <= 32 * MiB]
_current: dict[Case, object] = {}


@pytest.fixture(autouse=True)
def _on_demand(request):
    if not request.config.getoption("benchmark_only", default=False):
        pytest.skip("benchmarks run on demand: pytest bench/test_bench_kernels.py --benchmark-only")


def _workload(case: Case):
    # One case's buffers at a time: three 64 MiB tensors per case would add up to gigabytes.
    if case not in _current:
        _current.clear()
        _current[case] = make_workload(case)
    return _current[case]


@pytest.mark.parametrize("impl", ["cpp", "torch-index", "copy_"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.row_bytes}B-run{c.run_rows}")
def test_segment_copy(benchmark, case, impl):
    if impl == "cpp" and not segments.backends()["cpp"]:
        pytest.skip("hpcomm._C not built")
    w = _workload(case)
    benchmark.group = f"{case.op} {case.row_bytes} B rows, runs of {case.run_rows}"
    if impl == "cpp":
        backend = segments.get_backend("cpp", torch.device("cpu"))
        prepared = backend.prepare(w.table, torch.device("cpu"))
        fn = lambda: backend.apply(prepared, w.src, w.dst, False)  # noqa: E731
    else:
        fn = {"torch-index": lambda: index_baseline(case, w), "copy_": lambda: w.dst.copy_(w.src)}[impl]
    benchmark.pedantic(fn, rounds=7, warmup_rounds=1)
    benchmark.extra_info["GB/s"] = w.nbytes / benchmark.stats.stats.min / 1e9
