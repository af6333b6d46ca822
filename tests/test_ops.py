"""The custom ops under hpcomm:: pass torch.library.opcheck, and their gradients pass gradcheck in
float64 on CPU."""

import torch

from hpcomm import Layout, Transform, ops

# gather rows 5..6 and a strided 2x3 window, then scatter them back elsewhere
TABLE = torch.tensor([[10, 0, 2, 4, 4, 4], [1, 8, 2, 3, 4, 3]], dtype=torch.int64)
# the same source rows read twice (sent to two peers): pack's backward must add both gradients
TWICE = torch.tensor([[0, 0, 1, 6, 6, 6], [0, 6, 1, 6, 6, 6]], dtype=torch.int64)


def test_opcheck_pack_and_unpack():
    x = torch.randn(24, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.pack, (x, TABLE, 14))
    buf = torch.randn(14, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.unpack, (buf, TABLE[:, [1, 0, 2, 3, 5, 4]].contiguous(), 24))


def test_gradcheck_pack_and_unpack():
    x = torch.randn(24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.pack(t, TABLE, 14), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.pack(t, TWICE, 12), (x,))
    buf = torch.randn(14, dtype=torch.float64, requires_grad=True)
    back = TABLE[:, [1, 0, 2, 3, 5, 4]].contiguous()
    assert torch.autograd.gradcheck(lambda t: ops.unpack(t, back, 24), (buf,))


def opcheck_transform(rank, world_size):
    src = Layout.cp([0], [8, 8], "zigzag")
    dst = Layout.from_rows({0: [(5 * i) % 16 for i in range(16)]}, 16)  # a permutation
    t = Transform(src, dst, grad="adjoint")
    x = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.transform, (x, t._anchor, t._handle))
    torch.library.opcheck(ops.transform_backward, (torch.randn(16, 3, dtype=torch.float64), t._handle))
    return torch.autograd.gradcheck(lambda v: t(v), (x,))


def test_opcheck_and_gradcheck_transform(world):
    # one rank: gradcheck perturbs each input element in turn, which several ranks could not do
    # in step (their outputs depend on each other's inputs); multi-rank gradients are covered by
    # the adjoint identity and the gloo backward tests
    assert all(world(1).run(opcheck_transform))
