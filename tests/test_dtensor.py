"""hpcomm.redistribute against DTensor on a 4-rank gloo world: the same local tensors as DTensor's
own same-mesh redistribute (bitwise) and as distribute_tensor on another mesh, disjoint ones
included; gradients against the DTensor convention (a shard of the upstream gradient, Partial
sources receiving the Replicate gradient) and, on the same mesh, against DTensor's own backward.

Shapes are uneven on purpose (torch.chunk leaves the last ranks short or empty). Every rank runs
every case and reports failures as strings, so one failing rank cannot leave the others waiting."""

import numpy as np
import torch
import torch.distributed as dist

from hpcomm.dtensor import layout_from_placements, placements_from_layout, redistribute, shard_box

SHAPE = (5, 3, 7)


def _meshes():
    from torch.distributed.device_mesh import DeviceMesh

    # every rank builds every mesh: DeviceMesh creates process groups collectively
    return {"2x2": DeviceMesh("cpu", [[0, 1], [2, 3]]), "all": DeviceMesh("cpu", [0, 1, 2, 3]),
            "01": DeviceMesh("cpu", [0, 1]), "23": DeviceMesh("cpu", [2, 3]),
            "021": DeviceMesh("cpu", [0, 2, 1])}


def _globals(shape):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(*shape, generator=g, dtype=torch.float64),
            torch.randn(*shape, generator=g, dtype=torch.float64))


def _source(mesh, placements, x):
    """A leaf DTensor on mesh; a Partial dim splits x into unequal parts that sum to x."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

    plain = tuple(Replicate() if isinstance(p, Partial) else p for p in placements)
    local = distribute_tensor(x, mesh, plain).to_local()
    coord = mesh.get_coordinate()
    if coord is not None:
        for m, p in enumerate(placements):
            if isinstance(p, Partial):
                k = mesh.size(m)
                weight = (1.0 if coord[m] == 0 else 0.0) + (coord[m] - (k - 1) / 2) * 0.25
                local = local * weight
    dt = DTensor.from_local(local.detach(), mesh, placements, shape=x.shape, stride=x.stride())
    return dt.requires_grad_()


def _expected_grad(mesh, placements, w):
    """w's shard at this rank's coordinate (a Partial dim holds all of it)."""
    coord = mesh.get_coordinate()
    if coord is None:
        return w.new_empty(0)
    box = shard_box(mesh.mesh.shape, placements, w.shape, coord)
    return w[tuple(slice(a, b) for a, b in box)]


def _run_case(meshes, src_name, src_pl, dst_name, dst_pl, shape, against_dtensor):
    from torch.distributed.tensor import Partial

    src_mesh, dst_mesh = meshes[src_name], meshes[dst_name]
    x, w = _globals(shape)
    errors = []
    inp = _source(src_mesh, src_pl, x)
    out = redistribute(inp, dst_mesh, dst_pl)
    if dst_mesh.get_coordinate() is not None:
        if any(isinstance(p, Partial) for p in dst_pl):
            ok = torch.allclose(out.full_tensor(), x, rtol=0, atol=1e-12)
        else:  # the local shard itself (full_tensor on the mesh [0, 2, 1] gathers out of order);
            # bitwise unless the source holds partial sums
            want = _expected_grad(dst_mesh, dst_pl, x)
            ok = (torch.allclose(out.to_local(), want, rtol=0, atol=1e-12)
                  if any(isinstance(p, Partial) for p in src_pl) else torch.equal(out.to_local(), want))
        if not ok:
            errors.append("forward value")
        loss = (out.full_tensor() * w).sum()
    else:
        if out.to_local().numel():
            errors.append("non-member of the destination mesh got a non-empty local tensor")
        loss = out.to_local().sum()
    loss.backward()
    got = inp.grad.to_local() if inp.grad is not None else None
    want_grad = _expected_grad(src_mesh, src_pl, w)
    if src_mesh.get_coordinate() is not None and (got is None or not torch.allclose(
            got, want_grad, rtol=0, atol=1e-12)):
        errors.append("gradient")
    if against_dtensor:
        ref_in = _source(src_mesh, src_pl, x)
        ref = ref_in.redistribute(dst_mesh, dst_pl)
        # bitwise, but for partial sums, which DTensor and hpcomm may add in different orders
        same = torch.equal if not any(isinstance(p, Partial) for p in src_pl) else (
            lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-12))
        if not same(out.to_local(), ref.to_local()):
            errors.append("local tensor differs from DTensor.redistribute")
        (ref.full_tensor() * w).sum().backward()
        if not same(got, ref_in.grad.to_local()):
            errors.append("gradient differs from DTensor.redistribute's")
    return errors


def _placements(spec):
    from torch.distributed.tensor import Partial, Replicate, Shard

    return tuple({"R": Replicate(), "P": Partial()}.get(s) or Shard(int(s[1:])) for s in spec.split(","))


SAME_MESH = [  # (src, dst) on the 2x2 mesh, every pair DTensor itself supports
    ("S0,S1", "R,R"), ("R,R", "S1,S2"), ("S0,S0", "S2,S1"), ("S2,R", "S0,S2"), ("P,S1", "S0,R"),
    ("P,P", "S2,S0"), ("S0,S2", "S2,S0"),
]
OTHER = [  # (src mesh, src, dst mesh, dst): another mesh, or a Partial destination (DTensor refuses both)
    ("2x2", "S1,S0", "2x2", "P,R"),
    ("01", "S0", "23", "S1"), ("01", "P", "23", "R"), ("all", "S2", "01", "S0"),
    ("23", "R", "2x2", "S1,S0"), ("2x2", "S0,P", "021", "S2"), ("01", "S1", "23", "P"),
]


def dtensor_cases(rank, world_size):
    meshes = _meshes()
    failures = []
    for src, dst in SAME_MESH:
        for shape in (SHAPE, (3, 9)) if "S2" not in src + dst else (SHAPE,):
            errs = _run_case(meshes, "2x2", _placements(src), "2x2", _placements(dst), shape, True)
            failures += [f"2x2 {src} -> {dst} {shape}: {e}" for e in errs]
    for src_mesh, src, dst_mesh, dst in OTHER:
        errs = _run_case(meshes, src_mesh, _placements(src), dst_mesh, _placements(dst), SHAPE, False)
        failures += [f"{src_mesh} {src} -> {dst_mesh} {dst}: {e}" for e in errs]
    x = torch.arange(float(np.prod(SHAPE))).reshape(SHAPE)
    for spec in ("S0,S1", "S2,S0", "R,S2", "S1,S1"):
        from torch.distributed.tensor import distribute_tensor

        pl = _placements(spec)
        layout = layout_from_placements(meshes["2x2"], pl, SHAPE)
        local = distribute_tensor(x, meshes["2x2"], pl).to_local()
        if not torch.equal(layout.shard(x.reshape(-1, SHAPE[-1]), rank).reshape(-1),
                           local.reshape(-1)):
            failures.append(f"layout of {spec} differs from distribute_tensor's shard")
        back = placements_from_layout(layout, meshes["2x2"], SHAPE)
        if layout_from_placements(meshes["2x2"], back, SHAPE) != layout:
            failures.append(f"placements_from_layout({spec}) gave {back}")
    dist.barrier()
    return failures


def test_redistribute_matches_dtensor(world):
    results = world(4).run(dtensor_cases)
    for rank, failures in enumerate(results):
        assert not failures, f"rank {rank}: {failures}"


def bad_placements(rank, world_size):
    from torch.distributed.tensor import Partial, Replicate, Shard

    meshes = _meshes()
    messages = []
    for pl in ((Partial(), Replicate()), (Shard(3), Shard(0)), (Partial("max"), Shard(0))):
        try:
            layout_from_placements(meshes["2x2"], pl, SHAPE)
        except ValueError as e:
            messages.append(str(e))
    odd = layout_from_placements(meshes["2x2"], (Shard(0), Shard(1)), SHAPE)
    try:
        placements_from_layout(odd, meshes["all"], SHAPE)
    except ValueError as e:
        messages.append(str(e))
    return messages


def test_bad_placements(world):
    messages = world(4).run(bad_placements)[0]
    assert len(messages) == 4, messages
    assert "Partial with Replicate" in messages[0]
    assert "shards dim 3" in messages[1]
    assert "Partial('sum')" in messages[2]
    assert "not expressible" in messages[3]
