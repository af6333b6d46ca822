"""``validate=True`` (or ``HPCOMM_VALIDATE=1``): the full cross-rank check before every call, for
debugging. Every rank of the transform sends its fingerprint, direction, dtype, device and trailing
shape to the first one, which sends the table back; all raise the same error if any differs. The
per-call header (hpcomm.protocol) already catches disagreements between data peers; this adds the
ranks that exchange nothing with each other.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from hpcomm.protocol import device_code, device_name, digest, dtype_code, dtype_name, transform_name


# -- validate=True: the full cross-rank check ------------------------------------------------------

_SHOWN_DIMS = 8
_FIELDS = 7 + _SHOWN_DIMS


def _dims(row: list[int]) -> str:
    shown = row[7:7 + min(row[6], _SHOWN_DIMS)]
    return str(shown)[:-1] + (", ...]" if row[6] > _SHOWN_DIMS else "]")


def gather(fields: list[int], ranks: Sequence[int], transport: Any) -> list[list[int]]:
    """Every participant's int64 fields on every participant: each sends its own to the first
    participant, which sends the stacked table back to all (on the host channel, so ranks outside
    the transform need not take part)."""
    rank = dist.get_rank()
    leader = ranks[0]
    table = torch.empty(len(ranks), len(fields), dtype=torch.int64)
    deadline, channel = transport.deadline(), transport.channel
    if rank == leader:
        table[ranks.index(rank)] = torch.tensor(fields)
        others = [(p, table[i]) for i, p in enumerate(ranks) if p != rank]
        sends, recvs = [(p, table.view(-1)) for p, _ in others], others
    else:
        sends, recvs = [(leader, torch.tensor(fields))], [(leader, table.view(-1))]
    if rank == leader:  # the table goes back only once every row is in it
        for pending in channel.post([], recvs, "validation", deadline)[1]:
            pending.wait()
        for pending in channel.post(sends, [], "validation", deadline)[0]:
            pending.wait()
    else:
        sent, got = channel.post(sends, recvs, "validation", deadline)
        for pending in [*sent, *got]:
            pending.wait()
    return table.tolist()


def agree(fingerprint: int, ranks: Sequence[int], rank: int, x: torch.Tensor, trailing: Sequence[int],
          backward: bool, error: Exception | None, transport: Any, extra: int = 0) -> None:
    """Cross-rank validation: every participant raises the same error if any disagrees on the
    transform, direction, dtype, device or trailing shape, or failed its own check. ``extra``: a
    flag a rank raises for a check of its own (e.g. replicas' gradients differ)."""
    ok = error is None
    dims = list(trailing)
    fields = [fingerprint, int(backward), int(not ok) | (extra << 1)]
    if ok:
        fields += [dtype_code(x.dtype), device_code(x.device), digest(repr(dims)), len(dims), *dims[:_SHOWN_DIMS]]
    fields += [-1] * (_FIELDS - len(fields))
    table = gather(fields, ranks, transport)
    problems = []
    keys = [tuple(row[:2]) for row in table]
    majority = max(keys, key=keys.count)  # name the odd ones out, not the leader
    agreeing = [r for r, key in zip(ranks, keys) if key == majority]
    for r, row, key in zip(ranks, table, keys):
        if key != majority:
            problems.append(f"rank {r} calls a different transform (or direction) than ranks {agreeing}")
        elif row[2] & 1:
            problems.append(f"rank {r} failed its own input check")
        elif row[2] >> 1:
            problems.append(f"rank {r}: destination replicas' gradients differ under grad='replicated' "
                            f"(they hold partial gradients: use grad='sum')")
    good = [(r, row) for r, row in zip(ranks, table) if not row[2] & 1]
    for r, row in good[1:]:
        r0, row0 = good[0]
        if row[3] != row0[3]:
            problems.append(f"rank {r} passes {dtype_name(row[3])}, rank {r0} passes {dtype_name(row0[3])}")
        if row[4] != row0[4]:
            problems.append(f"rank {r} passes a {device_name(row[4])} tensor, rank {r0} a "
                            f"{device_name(row0[4])} tensor")
        if row[5] != row0[5]:
            problems.append(f"rank {r} passes trailing dims {_dims(row)}, rank {r0} passes {_dims(row0)}")
    if problems:
        detail = str(error) if error is not None else "; ".join(problems)
        raise ValueError(f"hpcomm validation failed on rank {rank} ({transform_name(fingerprint)}): {detail}"
                         + (f" (all problems: {'; '.join(problems)})" if error is not None else ""))
