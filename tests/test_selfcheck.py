"""``python -m hpcomm.selfcheck``: the CPU subset passes here, and a broken kernel backend makes it
fail (a check that cannot fail verifies nothing)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from hpcomm import segments, selfcheck

ROOT = pathlib.Path(__file__).resolve().parents[1]


class OneElementOff(segments.Backend):
    """The reference with one wrong element: what a subtle kernel bug looks like."""

    name = "one-element-off"
    device_types = ("cpu",)

    def _prepare(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        return rows

    def _launch(self, data: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, accumulate: bool) -> None:
        segments.copy_segments_reference(src, dst, data, accumulate)
        first = int(data[(data[:, 2] > 0) & (data[:, 3] > 0), 1].min())
        dst.view(torch.uint8)[first * dst.element_size()] ^= 1  # a flipped low bit (True <-> False for bool)


class Raising(OneElementOff):
    name = "raising"

    def _launch(self, data: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, accumulate: bool) -> None:
        raise RuntimeError("kernel launch failed")


@pytest.fixture
def broken(monkeypatch):
    for backend in (OneElementOff(), Raising()):
        monkeypatch.setitem(segments._REGISTRY, backend.name, backend)


def test_cpu_quick_run_passes():
    """The whole CPU subset in a fresh process, as a user runs it (Triton in its interpreter child)."""
    proc = subprocess.run([sys.executable, "-m", "hpcomm.selfcheck", "--quick", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    failed = [r for r in report["rows"] if r["status"] == "FAIL"]
    assert proc.returncode == 0 and report["ok"] and not failed, failed or proc.stderr[-2000:]
    status = {(r["check"], r["target"]): r["status"] for r in report["rows"]}
    for key in [("kernels", "cpp/cpu"), ("kernels", "cuda-items/cpu"), ("bandwidth", "cpp/cpu"),
                ("transform", "cpu"), ("simulate", "cpu"), ("compile", "cpu")]:
        assert status.get(key) == "PASS", key
    if segments.backends()["triton"]:
        assert status[("kernels", "triton/cpu")] == "PASS"
    if not torch.cuda.is_available():
        assert status[("graph", "cpu")] == status[("nccl", "bench targets")] == "SKIPPED"
        assert status[("kernels", "*/cuda")] == "SKIPPED"


@pytest.mark.parametrize("name, expected", [("one-element-off", "bytes differ"),
                                            ("raising", "RuntimeError: kernel launch failed")])
def test_broken_backend_fails(broken, capsys, name, expected):
    code = selfcheck.main(["--quick", "--checks", "kernels,bandwidth", "--backends", name])
    out = capsys.readouterr().out
    assert code == 1
    assert any(line.split()[:3] == ["kernels", f"{name}/cpu", "FAIL"] and expected in line
               for line in out.splitlines()), out
    assert out.rstrip().endswith(": FAIL")


def test_good_backend_restricted_run_passes(capsys):
    if not segments.backends()["cpp"]:
        pytest.skip("hpcomm._C not built")
    assert selfcheck.main(["--quick", "--json", "--checks", "kernels", "--backends", "cpp"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["target"], r["status"]) for r in rows if r["target"] == "cpp/cpu"] == [("cpp/cpu", "PASS")]


def test_unknown_backend_and_check(capsys):
    assert selfcheck.main(["--checks", "kernels", "--backends", "nope"]) == 1
    assert "unknown backend 'nope'" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        selfcheck.main(["--checks", "kernels,warp-drive"])


@pytest.mark.parametrize("gpus, nproc", [(2, 2), (3, 2), (8, 4)])
def test_nccl_commands_are_valid_bench_runs(monkeypatch, gpus, nproc):
    """No GPU here: the torchrun command lines are captured, and each one's bench arguments must
    parse and build layouts for its world size (what would otherwise fail only on a GPU box)."""
    from hpcomm.tools import bench

    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        out = "CP zigzag -> CP contiguous vs a2a ... target <= 1.1x  PASS\n" if nproc == 4 else "ok\n"
        return subprocess.CompletedProcess(cmd, 0, out, "")

    monkeypatch.setattr(selfcheck.subprocess, "run", fake_run)
    row = selfcheck.check_nccl(gpus, quick=True)
    assert row.status == "PASS" and row.target == f"{nproc} GPUs", row
    assert len(commands) == (1 if nproc == 4 else 3)
    for cmd in commands:
        assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
        assert f"--nproc-per-node={nproc}" in cmd
        argv = cmd[cmd.index("hpcomm.tools.bench") + 1:]
        args = bench.parse_args(argv)
        if args.preset == "targets":
            args.rows, args.hidden, args.dtype, args.placement = 65536, 256, "float32", "colocated"
        for cfg in bench.case_configs(args):
            bench.case_layouts(cfg, nproc)
    if nproc == 4:
        assert "1 PASS / 0 MISS" in row.detail


def test_nccl_failure_is_reported(monkeypatch):
    monkeypatch.setattr(selfcheck.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "NCCL error: unhandled"))
    row = selfcheck.check_nccl(4, quick=True)
    assert row.status == "FAIL" and "NCCL error" in row.detail


@pytest.mark.parametrize("stdout", ["Traceback: ImportError", '{"ok": true, "rows": []}'], ids=["crash", "silent"])
def test_interpreter_child_that_reports_nothing_fails(monkeypatch, stdout):
    monkeypatch.setattr(selfcheck.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, stdout, "boom"))
    (row,) = selfcheck.kernels_in_interpreter(["triton"], quick=True)
    assert (row.target, row.status) == ("triton/cpu", "FAIL") and "interpreter subprocess" in row.detail
