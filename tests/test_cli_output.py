"""The command-line tools as a terminal or a log sees them: hpcomm-train writes one clean line per
step into a pipe and leaves no worker behind when it is killed; hpcomm-bench's default table fits
120 columns and --json prints one JSON document; hpcomm-advise echoes what it reasons about and
documents every option with its default."""

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from hpcomm.advisor import cli as advise
from hpcomm.tools import bench
from hpcomm.trainer import train

# The smallest distributed run: 2 processes, encoder dp=2 -> LLM tp=2, 4 samples a step.
TRAIN = [sys.executable, "-m", "hpcomm.trainer.train", "--nproc", "2", "--encoder", "dp=2",
         "--llm", "tp=2", "--batch-size", "4"]
BENCH_TINY = ["--src", "rows=2", "--dst", "tp=2,tp_mode=hidden", "--nproc", "2", "--rows", "256",
              "--num-seqs", "4", "--hidden", "8", "--warmup", "0", "--iters", "1"]


def train_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HPCOMM_TIMEOUT"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_train_output_in_a_pipe_is_one_line_per_step(tmp_path):
    plot = tmp_path / "loss.png"
    proc = subprocess.run([*TRAIN, "--steps", "3", "--plot", str(plot)], capture_output=True,
                          text=True, timeout=300, env=train_env())
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout and "\r" not in proc.stderr  # no progress bar redraws
    lines = proc.stdout.splitlines()
    assert all(line.strip() for line in lines), proc.stdout  # no blank lines
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["0", "1", "2"], proc.stdout
    assert "sample caption after 3 steps (a short run: expect it to be partly wrong)" in proc.stdout
    assert f"wrote the loss curve to {plot}" in proc.stdout and plot.stat().st_size > 0


def children(pid: int) -> list[int]:
    return [int(c) for task in os.listdir(f"/proc/{pid}/task")
            for c in open(f"/proc/{pid}/task/{task}/children").read().split()]


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (one whose parent died may wait for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("sig,timeout", [(signal.SIGKILL, None), (signal.SIGTERM, "7"),
                                         (signal.SIGINT, None)])
def test_killing_train_ends_its_workers(sig, timeout):
    """The workers are up (the first step is logged); the main process is killed; within a few
    seconds no worker remains. Also: the workers run with HPCOMM_TIMEOUT set (default 60 s)."""
    options = ["--timeout", timeout] if timeout else []
    proc = subprocess.Popen([*TRAIN, "--steps", "100000", *options], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=train_env())
    workers: list[int] = []
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready and proc.stdout.readline().startswith("step "), proc.stderr.read()
        workers = [c for c in children(proc.pid)
                   if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]
        assert len(workers) == 2, workers
        for w in workers:
            environ = open(f"/proc/{w}/environ", "rb").read().split(b"\0")
            assert f"HPCOMM_TIMEOUT={timeout or 60}".encode() in environ
        os.kill(proc.pid, sig)
        code = proc.wait(timeout=30)
        if sig != signal.SIGKILL:  # handled: the workers are stopped, the exit status says why
            assert code == 128 + sig, proc.stderr.read()
        deadline = time.monotonic() + 5
        while any(map(alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(alive, workers)), [w for w in workers if alive(w)]
    finally:
        for pid in [proc.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def test_bench_default_table_fits_120_columns(capsys, world):
    # the widest default table: every method compared with hpcomm
    cfg = bench.case_configs(bench.parse_args(BENCH_TINY))[0]
    lines = bench.legend(cfg, 4, "gloo, local processes, 1 thread(s) each", wide=False)
    lines.append(bench.header(bench.columns(bench.METHODS, wide=False)))
    assert max(map(len, lines)) <= bench.WIDTH, lines
    # a run (the unchecked reference is left out: it stands in for engine internals, and
    # test_benchmark runs it)
    methods = ",".join(m for m in bench.METHODS if m != "unchecked")
    assert bench.main([*BENCH_TINY, "--backward", "--methods", methods], worlds=world) == 0
    out = capsys.readouterr().out
    head = next(line for line in out.splitlines() if line.lstrip().startswith("size(B)"))
    assert "hp/a2a" in head and "a2a(us)" not in head  # ratios by default, times with --wide
    rows = [line for line in out.splitlines() if line.split()[:1] == ["8192"]]
    assert len(rows) == 2, out
    too_wide = [line for line in out.splitlines() if len(line) > bench.WIDTH]
    assert not too_wide, too_wide


def test_bench_json_prints_one_document(capsys, world):
    assert bench.main([*BENCH_TINY, "--methods", "hpcomm,a2a", "--json"], worlds=world) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["size"] for r in rows] == [8192] and rows[0]["verified"]["hpcomm"]
    head = next(line for line in captured.err.splitlines() if line.lstrip().startswith("size(B)"))
    assert head.split()[-2:] == ["hp/a2a", "verified"], head  # the requested methods only


def test_advise_documents_every_option_and_echoes_its_inputs(capsys):
    for action in advise.parser()._actions:
        if action.dest != "help":
            assert action.help and "default" in action.help, action.option_strings
    with pytest.raises(SystemExit):
        advise.main(["--help"])
    assert "tokens per sample, image tokens included (default: 8192)" in " ".join(
        capsys.readouterr().out.split())
    assert advise.main(["--gpus", "16", "--context", "4096", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "model vit-8b: encoder 27 layers, hidden 1152, 16 heads" in out
    assert "LLM 32 layers, hidden 4096, 32 heads (8 KV)" in out
    assert out.startswith("model vit-8b") and "cluster h100: 16 GPUs, 8 per node" in out


def test_train_help_states_the_timeout_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert "HPCOMM_TIMEOUT" in capsys.readouterr().out
    assert train.parse_args(["--timeout", "5"]).timeout == 5
