"""torch.compile(fullgraph=True) through the hpcomm::transform custom op on a 2-rank gloo world:
no graph break, the same forward and the same gradients as eager.

The destination-only rank 1 matters: its input does not require grad, so only the op's anchor keeps
its output in the graph, and its compiled backward must still run the collective that sends its
gradients to rank 0 (the ops are registered as ordered effects so that the compiler keeps it)."""

import pytest

from hpcomm import Layout, Transform, ops


LENS = [5, 7]


def _compiled_matches_eager(rank, world_size, backend, via_call):
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config

    src, dst = Layout.dp([0], LENS), Layout.cp([0, 1], LENS, "zigzag")
    t = Transform(src, dst)
    x_global = torch.randn(sum(LENS), 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = (src.shard(x_global, rank) if rank in src.ranks else x_global[:0]).clone()
    x.requires_grad_(rank in src.ranks)

    def step(x):
        y = t(x * 2) if via_call else ops.transform(x * 2, t._anchor, t._handle, t._sizes(rank))
        return (y ** 2).sum(-1)

    eager = step(x)
    eager.sum().backward()
    eager_grad = x.grad.clone() if x.requires_grad else None
    x.grad = None
    torch._dynamo.reset()
    # no compile caches: an entry compiled before hpcomm registered its ops as effectful would
    # bring back a backward graph without the collective
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = torch.compile(step, fullgraph=True, backend=backend)(x)
    compiled.sum().backward()
    ok_fwd = torch.allclose(compiled, eager, rtol=1e-12, atol=0)
    ok_bwd = eager_grad is None or torch.allclose(x.grad, eager_grad, rtol=1e-12, atol=0)
    return ok_fwd, ok_bwd, compiled.requires_grad


def _check(results):
    for rank, (ok_fwd, ok_bwd, in_graph) in enumerate(results):
        assert ok_fwd, f"rank {rank}: compiled forward differs from eager"
        assert ok_bwd, f"rank {rank}: compiled gradient differs from eager"
        assert in_graph, f"rank {rank}: compiled output is not in the autograd graph"


def test_compile_op_inductor(world):
    """The op itself (what ``t(x)`` lowers to) under inductor: fake impls read the shapes, the
    registered autograd runs the collective backward. float64: eager and inductor agree to 1e-12
    (the elementwise ops around the transform may be fused and reordered)."""
    _check(world(2).run(_compiled_matches_eager, "inductor", False))


def test_compile_transform_call(world):
    """``t(x)`` itself compiles with fullgraph=True: under compilation it goes straight to the op,
    whose fake implementation reads the output's size from a tensor."""
    _check(world(2).run(_compiled_matches_eager, "aot_eager", True))


def _changing_layouts(rank, world_size, backend, dynamic, as_attr, into):
    """A compiled module that gets a new Transform every step (lengths change every step): outputs
    and gradients match eager, and the graph is reused (compiles counted)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    proj = torch.nn.Linear(4, 4).double()

    class Boundary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.t = proj, None

        def forward(self, x, emb, rows, t=None):
            t = t if t is not None else self.t
            y = t(x * 2, out=emb * 1, out_rows=rows) if into else t(x * 2)
            return self.proj(y).square().sum()

    model = Boundary()
    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=dynamic)
    same = True
    for step in range(10):
        g = torch.Generator().manual_seed(step)
        lens = torch.randint(3, 12, (3,), generator=g).tolist()
        src, dst = Layout.cp([0, 1], lens, "zigzag"), Layout.dp([0, 1], lens, "balanced")
        model.t = t = Transform(src, dst)
        x = src.shard(torch.randn(sum(lens), 4, generator=g, dtype=torch.float64), rank).clone().requires_grad_()
        n = dst.local_num_rows(rank)
        emb = torch.randn(n + 2, 4, dtype=torch.float64, requires_grad=True)
        rows = torch.arange(n) + 1
        grads = []
        for fn in (model, compiled):
            loss = fn(x, emb, rows, None if as_attr else t)
            loss.backward()
            grads.append((loss.detach(), x.grad.clone(), proj.weight.grad.clone(),
                          emb.grad.clone() if into else None))
            x.grad = proj.weight.grad = emb.grad = None
        (l0, *g0), (l1, *g1) = grads
        same &= torch.allclose(l0, l1, rtol=1e-10) and all(
            a is None or torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(g0, g1))
    return same, counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("backend,dynamic,as_attr,into", [
    ("aot_eager", None, True, False), ("aot_eager", None, False, True), ("inductor", True, False, False)])
def test_new_layout_every_step_reuses_the_graph(world, backend, dynamic, as_attr, into):
    for rank, (same, graphs) in enumerate(world(2).run(_changing_layouts, backend, dynamic, as_attr, into,
                                                       timeout=600)):
        assert same, f"rank {rank}: compiled results differ from eager"
        assert graphs <= 3, f"rank {rank}: {graphs} compilations over 10 steps"
