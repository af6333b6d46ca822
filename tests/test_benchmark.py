"""Smoke tests of the hpcomm-bench CLI on the session's shared local gloo Worlds, in-process: tiny
cases where every method runs once, is verified (baselines against hpcomm, hpcomm against slicing
the global tensor) and timed; the tables must carry their columns and the presets their reports.
Timings at these sizes mean nothing; only the structure is checked."""

import json

from hpcomm.tools import bench as benchmark

TINY = ["--rows", "256", "--num-seqs", "4", "--hidden", "8", "--warmup", "0", "--iters", "1"]


def rows_of(text: str, size: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip() and line.split()[0] == size]


def test_cli_tiny_rows_to_hidden(capsys, tmp_path, world):
    out_json = tmp_path / "bench.json"
    code = benchmark.main(["--src", "rows=2", "--dst", "tp=2,tp_mode=hidden", "--nproc", "2", *TINY,
                           "--backward", "--wide", "--json", str(out_json)], worlds=world)
    text = capsys.readouterr().out
    assert code == 0, text
    lines = text.splitlines()
    head = next(line for line in lines if line.lstrip().startswith("size(B)")).split()
    for column in ("size(B)", "count", "time(us)", "algbw", "busbw", "f", "a2a(us)", "hp/a2a",
                   "ag(us)", "hp/ag", "dt(us)", "hp/dt", "copy(us)", "hp/copy", "wire(us)", "hp/wire",
                   "p2p(us)", "hp/p2p", "unc(us)", "hp/unc", "p2p/wire", "verified"):
        assert column in head, f"missing column {column} in {head}"
    rows = rows_of(text, "8192")
    assert [r[3] for r in rows] == ["fwd", "fwd+bwd"], text
    for r in rows:
        assert r[-1] == "ok" and "WRONG" not in r, text
        assert r.count("n/a") == 2, text  # copy only: rows cross the wire
    assert "#   copy: n/a (the plan sends rows off-rank)" in text
    results = json.loads(out_json.read_text())
    for r in results:
        assert r["verified"] == {"hpcomm": True, "a2a": True, "allgather": True, "dtensor": True}
        assert set(r["time_us"]) == {"hpcomm", "a2a", "allgather", "dtensor", "wire", "wire_p2p", "unchecked"}
        assert 0 < r["busbw_factor"] <= 1 and r["p2p_over_wire"] > 0


def test_preset_targets_tiny(capsys, tmp_path, world):
    """Every target gets its rows and a verdict; the no-wire case verifies the copy baseline."""
    out_json = tmp_path / "targets.json"
    code = benchmark.main(["--preset", "targets", *TINY, "--json", str(out_json)], worlds=world)
    text = capsys.readouterr().out
    assert code == 0, text
    verdicts = [line for line in text.splitlines() if line.startswith("TARGET ")]
    assert len(verdicts) == len(benchmark.PRESET_TARGETS), text
    for line, target in zip(verdicts, benchmark.PRESET_TARGETS):
        assert line.startswith(f"TARGET {target.name}:"), line
        # the >= 4 MiB floor of target (a) leaves nothing at this size; the rest apply
        assert line.endswith(("n/a",) if target.min_size else ("PASS", "MISS")), line
    # only verdict lines end in PASS or MISS: hpcomm.selfcheck counts them
    ends = [line for line in text.splitlines() if line.endswith(("PASS", "MISS"))]
    assert ends == [line for line in verdicts if not line.endswith("n/a")], text
    results = json.loads(out_json.read_text())
    sweep = [r["size"] for r in results if r["case"] == "CP zigzag -> CP contiguous"]
    assert sweep == [64 * 32, 128 * 32, 256 * 32], sweep  # from 64 rows, doubling
    copy = [r for r in results if "copy" in r["verified"]]
    assert len(copy) == 1 and copy[0]["verified"] == {"hpcomm": True, "copy": True}, copy
    assert copy[0]["max_wire_bytes"] == 0 and copy[0]["seq_lens"] == [64] * 4
    assert "# transport: wire = all_to_all_single" in text


def test_preset_megatron_tiny(capsys, tmp_path, world):
    """Colocated cases on 4 ranks, non-colocated ones on 6 (source then destination ranks)."""
    out_json = tmp_path / "megatron.json"
    code = benchmark.main(["--preset", "megatron", *TINY, "--json", str(out_json)], worlds=world)
    text = capsys.readouterr().out
    assert code == 0, text
    results = json.loads(out_json.read_text())
    assert {r["case"] for r in results} == {c.name for c in benchmark.PRESETS["megatron"]}
    for r in results:
        assert r["world_size"] == (6 if r["placement"] == "noncolocated" else 4), r["case"]
        assert all(r["verified"].values()) and {"wire", "wire_p2p"} <= set(r["time_us"]), r
    transport = text.split("# transport:")[1].splitlines()[1:]
    assert len([line for line in transport if "p2p/wire" in line]) == len(results), text


def test_world_size_mismatch_is_a_usage_error(capsys):
    code = benchmark.main(["--src", "dp=4", "--dst", "dp=2", "--placement", "noncolocated",
                           "--nproc", "4", *TINY])
    assert code == 2
    assert "needs 6 ranks, the world has 4" in capsys.readouterr().err
