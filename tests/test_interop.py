"""hpcomm beside another library's traffic on the same default group, in a real torchrun job: 100
iterations of transforms (several built before the first call) interleaved with tag-0
point-to-point, subgroup and world collectives, barriers and ``all_gather_object``, on both
transports; the job's results are exact and its processes exit with status 0, with and without
``destroy_process_group``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from transports import TRANSPORTS

JOB = Path(__file__).with_name("interop_job.py")


# each transport once, and each way of ending the job once (a run takes about half a minute)
@pytest.mark.parametrize("transport,destroy", [("gloo", False), ("nccl-emulated", True)])
def test_interleaved_with_other_traffic_for_100_iterations(transport, destroy):
    env = {**os.environ, **TRANSPORTS[transport], "OMP_NUM_THREADS": "1", "HPCOMM_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", str(JOB),
           "--iters", "100", *(["--destroy"] if destroy else [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "interop ok: 100 iterations" in proc.stdout, output[-3000:]
    assert "terminate called" not in output, output[-3000:]
