"""bench/bench_scale.py at 16 ranks: its per-rank and job counts against a brute-force count made
row by row from the layouts alone (each row's holders, the plan's documented replica rule: a rank
holding the row in the source copies it, any other reads holder ``position % holders``), forward
and the grad="replicated" backward, for both placements and both TP modes; and max data peers
stay below the rank count."""

import importlib.util
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "bench_scale.py"
_spec = importlib.util.spec_from_file_location("_bench_scale", _PATH)
assert _spec is not None and _spec.loader is not None
bs = importlib.util.module_from_spec(_spec)
sys.modules["_bench_scale"] = bs  # dataclasses look their module up while the class is made
_spec.loader.exec_module(bs)

RANKS = 16
HIDDEN = 64
ROW_BYTES = HIDDEN * 2
# 2 images per rank of 24 rows: rows that straddle zigzag chunks and SP splits
WORKLOAD = bs.make_workload(2 * RANKS, image_tokens=24, seed=3)


def holders(layout):
    """row -> positions (in layout.ranks) holding it, increasing."""
    out = defaultdict(list)
    for pos, r in enumerate(layout.ranks):
        for row in layout.rows(r).tolist():
            out[row].append(pos)
    return out


def brute_pairs(src, dst):
    """{(sender, receiver): rows} of moving src -> dst, counted row by row from the layouts."""
    held = holders(src)
    pairs = defaultdict(int)
    for d_pos, d in enumerate(dst.ranks):
        me = src.index(d) if src.has_rank(d) else -1
        for row in dst.rows(d).tolist():
            hs = held.get(row, [])
            if not hs or me in hs:
                continue  # no source (a gradient of zeros) or a local copy
            pairs[(src.ranks[hs[d_pos % len(hs)]], d)] += 1
    return pairs


def brute_stats(pairs, ranks):
    per = {}
    for r in ranks:
        send = {d for (s, d) in pairs if s == r}
        recv = {s for (s, d) in pairs if d == r}
        per[r] = {"send_peers": len(send), "recv_peers": len(recv), "data_peers": len(send | recv),
                  "msgs_sent": 2 * len(send) + len(recv - send),
                  "msgs_received": 2 * len(recv) + len(send - recv),
                  "bytes_sent": sum(n for (s, _), n in pairs.items() if s == r) * ROW_BYTES,
                  "bytes_received": sum(n for (_, d), n in pairs.items() if d == r) * ROW_BYTES,
                  "header_bytes_sent": 128 * len(send | recv)}
    return per


@pytest.mark.parametrize("placement", ["colocated", "noncolocated"])
@pytest.mark.parametrize("tp_mode", ["sp", "replicate"])
def test_counts_match_brute_force(placement, tp_mode):
    cfg = bs.make_config(RANKS, placement, tp_mode, cp=2, tp=2)
    assert cfg.cp * cfg.tp * cfg.dp + cfg.llm_offset == RANKS
    result = bs.measure(cfg, WORKLOAD, hidden=HIDDEN, cold_ranks=1)
    src, dst = bs.build_layouts(cfg, WORKLOAD)
    ranks = bs.transform_ranks(src, dst)
    k = len(ranks)
    assert k == RANKS
    for direction, (a, b) in (("fwd", (src, dst)), ("bwd", (dst, src))):
        pairs = brute_pairs(a, b)
        per = brute_stats(pairs, ranks)
        # the plan's messages carry exactly the brute-force rows, pair by pair
        plan = bs.forward_plan(src, dst) if direction == "fwd" else bs.backward_plan(src, dst)
        got = {(r, p): s.units() for r in ranks for p, s in plan.rank_plan(r).sends if len(s)}
        assert got == dict(pairs), direction
        for r in ranks:
            assert bs.rank_counts(plan.rank_plan(r), ROW_BYTES) == per[r], (direction, r)
        stats = result[direction]
        for key in per[ranks[0]]:
            vals = np.array([per[r][key] for r in ranks])
            assert stats[f"{key}_max"] == vals.max(), (direction, key)
            assert stats[f"{key}_mean"] == pytest.approx(vals.mean()), (direction, key)
        payloads = sum(p["send_peers"] for p in per.values())
        assert stats["job_payload_msgs"] == len(pairs) == payloads
        assert stats["job_msgs"] == sum(p["msgs_sent"] for p in per.values())
        assert stats["job_msgs"] == sum(p["msgs_received"] for p in per.values())  # every message lands
        assert stats["job_msgs_old"] == k * (k - 1) + payloads
        assert stats["job_bytes"] == sum(pairs.values()) * ROW_BYTES
        assert pairs, "the boundary moves rows at 16 ranks"
        assert 0 < stats["data_peers_max"] < k
        assert stats["sweep_s"] >= 0 and stats["cold_ms_max"] >= 0


def test_grid_rule_and_tables(capsys, tmp_path):
    # CP halved until CP x TP divides the LLM's ranks (TP kept): 48 LLM ranks -> 2 x 8 x 3
    assert bs.llm_grid(48, 8, 8) == (2, 8, 3)
    assert bs.llm_grid(768, 8, 8) == (8, 8, 12)
    cfg = bs.make_config(1024, "noncolocated", "sp")
    assert (cfg.encoder_ranks, cfg.llm_offset, cfg.cp, cfg.tp, cfg.dp) == (256, 256, 8, 8, 12)
    wl = bs.make_workload(40, image_tokens=256, seed=0)
    assert len(wl.image_lens) == 40 and len(wl.image_rows) == 40 * 256
    assert len(set(wl.image_rows.tolist())) == len(wl.image_rows) and wl.image_rows.max() < sum(wl.seq_lens)
    out = tmp_path / "scale.json"
    assert bs.main(["--ranks", str(RANKS), "--cp", "2", "--tp", "2", "--image-tokens", "24",
                    "--cold-ranks", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith(f"| {RANKS} |")]
    assert len(table) == 8 + 4  # 4 configurations x (fwd, bwd), then 4 planning rows
    results = json.loads(out.read_text())["results"]
    assert [(r["placement"], r["tp_mode"]) for r in results] == [
        ("colocated", "sp"), ("colocated", "replicate"), ("noncolocated", "sp"), ("noncolocated", "replicate")]
    for r in results:
        for d in ("fwd", "bwd"):
            assert r[d]["data_peers_max"] < RANKS and r[d]["job_msgs"] < r[d]["job_msgs_old"]
