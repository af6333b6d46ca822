"""Smoke test of the hpcomm-bench CLI: a tiny case on 2 local gloo ranks (the session's shared
World), in-process, where every baseline applies; the table must carry the nccl-tests columns and
every method must verify."""

import json

from hpcomm.tools import bench as benchmark


def test_cli_tiny_rows_to_hidden(capsys, tmp_path, world):
    out_json = tmp_path / "bench.json"
    code = benchmark.main(["--src", "rows=2", "--dst", "tp=2,tp_mode=hidden", "--nproc", "2",
                           "--rows", "256", "--num-seqs", "4", "--hidden", "8", "--warmup", "0",
                           "--iters", "1", "--backward", "--json", str(out_json)], world=world(2))
    text = capsys.readouterr().out
    assert code == 0, text
    lines = text.splitlines()
    head = next(line for line in lines if line.lstrip().startswith("size(B)")).split()
    for column in ("size(B)", "count", "time(us)", "algbw", "busbw", "f", "a2a(us)", "hp/a2a",
                   "ag(us)", "hp/ag", "dt(us)", "hp/dt", "wire(us)", "hp/wire", "verified"):
        assert column in head, f"missing column {column} in {head}"
    rows = [line.split() for line in lines if line.strip() and line.split()[0] == "8192"]
    assert [r[3] for r in rows] == ["fwd", "fwd+bwd"], text
    for r in rows:
        assert r[-1] == "ok" and "n/a" not in r and "WRONG" not in r, text
    results = json.loads(out_json.read_text())
    for r in results:
        assert r["verified"] == {"hpcomm": True, "a2a": True, "allgather": True, "dtensor": True}
        assert set(r["time_us"]) == {"hpcomm", "a2a", "allgather", "dtensor", "wire"}
        assert 0 < r["busbw_factor"] <= 1
