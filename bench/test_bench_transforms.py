"""pytest-benchmark suite for the issue's CPU targets: hpcomm beside its baseline on 4 gloo ranks,
rows of 1 KiB (fp32, hidden 256), one size per (case, baseline) pair of ``PRESET_TARGETS`` (the
sweep and the size floors are ``hpcomm-bench --preset targets``'s); run on demand, the default
test run does not collect bench/:

    python -m pytest bench/test_bench_transforms.py                       # 64 Ki rows
    HPCOMM_BENCH_ROWS=8192 python -m pytest bench/test_bench_transforms.py  # quicker

Each case is one pytest-benchmark group holding hpcomm and its baseline, so the comparison table
shows them side by side. A round is one call on every rank, started after a barrier, dispatched
from this process to the persistent World; pytest-benchmark's figures therefore include the
dispatch (about a millisecond), and ``extra_info["max_rank_median_us"]`` carries the median of the
in-rank times (max over ranks), the figure ``hpcomm-bench --preset targets`` prints. Both methods
are verified against each other (and hpcomm against slicing the global tensor) before timing.
"""

import os

import pytest
import torch
import torch.distributed as dist

from hpcomm.tools import bench as benchmark

ROWS = int(os.environ.get("HPCOMM_BENCH_ROWS", 65536))
ROUNDS, WARMUP = 10, 2

CASES = {c.name: c for c in benchmark.PRESETS["targets"]}
PAIRS = list(dict.fromkeys((t.case, t.baseline) for t in benchmark.PRESET_TARGETS))

_prepared: dict = {}  # per worker process: case name -> benchmark.Prepared


def case_config(name: str, baseline: str) -> dict:
    case = CASES[name]
    lens = [ROWS // 4] * 4 if case.equal_lens else benchmark.ragged_lens(ROWS, 16)
    return {"case": name, "src": benchmark.parse_spec(case.src), "dst": benchmark.parse_spec(case.dst),
            "src_text": case.src, "dst_text": case.dst, "placement": case.placement, "seq_lens": lens,
            "hidden": 256, "dtype": "float32", "backward": False, "methods": ["hpcomm", baseline],
            "seed": 0, "threads": benchmark.local_threads(4)}


def prepare_case(rank, world_size, cfg):
    """Build and verify once per worker; returns the verification flags (equal on every rank)."""
    _prepared[cfg["case"]] = benchmark.prepare(rank, world_size, cfg)
    return _prepared[cfg["case"]].verified


def timed_call(rank, world_size, case, method):
    """One barrier-started call; the slowest rank's seconds."""
    elapsed = torch.tensor([benchmark.time_once(_prepared[case], method)], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


@pytest.mark.parametrize("method", ["hpcomm", "baseline"])
@pytest.mark.parametrize("name,baseline", PAIRS, ids=[f"{c}|{b}" for c, b in PAIRS])
def test_target(benchmark_fixture, world4, name, baseline, method):
    cfg = case_config(name, baseline)
    verified = world4.run(prepare_case, cfg)[0]
    # the wire reference moves bytes only: nothing to verify
    expected = {"hpcomm": True, **({baseline: True} if baseline in benchmark.BASELINES else {})}
    assert verified == expected, verified
    method = baseline if method == "baseline" else method
    rank_times = []

    def call():
        rank_times.append(world4.run(timed_call, name, method)[0])

    targets = ", ".join(f"<= {t.ratio}x" for t in benchmark.PRESET_TARGETS
                        if (t.case, t.baseline) == (name, baseline))
    benchmark_fixture.group = f"{name} ({ROWS} rows; target hpcomm {targets} {baseline})"
    benchmark_fixture.pedantic(call, rounds=ROUNDS, warmup_rounds=WARMUP)
    benchmark_fixture.extra_info["max_rank_median_us"] = sorted(rank_times)[len(rank_times) // 2] * 1e6


@pytest.fixture
def benchmark_fixture(benchmark):
    """pytest-benchmark's fixture under a name that does not shadow the hpcomm.tools.bench module."""
    return benchmark
