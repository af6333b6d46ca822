"""The custom ops under hpcomm:: pass torch.library.opcheck, and their gradients pass gradcheck in
float64 on CPU."""

import torch

from hpcomm import Layout, Transform, ops

def opcheck_transform(rank, world_size):
    src = Layout.cp([0], [8, 8], "zigzag")
    dst = Layout.from_rows({0: [(5 * i) % 16 for i in range(16)]}, 16)  # a permutation
    t = Transform(src, dst, grad="adjoint")
    x = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.transform, (x, t._anchor, t._handle, t._sizes(0)))
    torch.library.opcheck(ops.transform_backward, (torch.randn(16, 3, dtype=torch.float64), t._handle, [16, 3]))
    return torch.autograd.gradcheck(lambda v: t(v), (x,))


def test_opcheck_and_gradcheck_transform(world):
    # one rank: gradcheck perturbs each input element in turn, which several ranks could not do
    # in step (their outputs depend on each other's inputs); multi-rank gradients are covered by
    # the adjoint identity and the gloo backward tests
    assert all(world(1).run(opcheck_transform))
