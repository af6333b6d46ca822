"""Every available kernel backend against the reference (hpcomm.segments.copy_segments_reference).

Results must be bitwise equal (the contract), so comparisons are on raw bytes and there is no
tolerance: copies move bits, and accumulation rounds once per element exactly like torch's add_.
NaN payloads are out of scope for accumulation only (copies move them untouched), so accumulate
inputs are finite. Triton runs on CPU tensors under TRITON_INTERPRET=1, set per test.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import subprocess
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcomm import segments

ROOT = pathlib.Path(__file__).resolve().parent.parent
AVAILABLE = segments.backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.int64,
          torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]
NO_ADD_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# The interpreter runs each Triton program in Python: keep its tables small.
MAX_LINES = {"cpp": 100_000, "cuda": 100_000, "triton": 64}
MAX_ELEMS = {"cpp": 1 << 18, "cuda": 1 << 18, "triton": 1 << 11}


def _device(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" else "cpu")


def _backend_params(names=tuple(n for n in segments.backend_names() if n != "torch")):
    params = []
    for name in names:
        reason = None
        if not AVAILABLE[name]:
            reason = f"backend {name!r} not available in this build"
        elif name == "cuda" and not torch.cuda.is_available():
            reason = "no CUDA device"
        params.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=reason or "")))
    return params


@pytest.fixture(params=_backend_params())
def backend(request, monkeypatch):
    if request.param == "triton" and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def _fill(numel: int, dtype: torch.dtype, seed: int, finite: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=g, dtype=torch.bool)
    if finite and dtype.is_floating_point:
        return (torch.randn(numel, generator=g, dtype=torch.float64) * 100).to(dtype)
    raw = torch.randint(-128, 128, (numel * dtype.itemsize,), generator=g, dtype=torch.int8)
    return raw.view(dtype)


@st.composite
def segment_tables(draw, max_lines: int, max_elems: int):
    """A table with non-overlapping destinations in random order, plus src/dst sizes."""
    num_segments = draw(st.integers(0, 12))
    segs, dst_cursor, src_needed, budget = [], draw(st.integers(0, 7)), 1, max_elems
    for _ in range(num_segments):
        line_len = draw(st.sampled_from([0, 1, 2, 3, 5, 8, 16, 17, 64, 250, 1024]))
        lines_cap = max(1, min(max_lines, budget // max(1, line_len)))
        num_lines = draw(st.one_of(st.integers(0, min(4, lines_cap)), st.integers(0, lines_cap)))
        kind = draw(st.sampled_from(["run", "strided", "window", "broadcast"]))
        if kind == "run":
            src_stride = dst_stride = line_len
        elif kind == "window":
            src_stride = line_len + draw(st.integers(0, 9))
            dst_stride = line_len + draw(st.integers(0, 9))
        elif kind == "strided":
            src_stride = draw(st.integers(0, 2 * line_len + 3))
            dst_stride = line_len + draw(st.integers(0, 3))
        else:
            src_stride, dst_stride = 0, line_len
        src_offset = draw(st.integers(0, 33))
        segs.append([src_offset, dst_cursor, num_lines, line_len, src_stride, dst_stride])
        if num_lines and line_len:
            dst_cursor += (num_lines - 1) * dst_stride + line_len
            src_needed = max(src_needed, src_offset + (num_lines - 1) * src_stride + line_len)
            budget = max(0, budget - num_lines * line_len)
        dst_cursor += draw(st.integers(0, 5))
    order = draw(st.permutations(range(num_segments)))
    table = torch.tensor([segs[i] for i in order], dtype=torch.int64).reshape(-1, 6)
    return table, src_needed + draw(st.integers(0, 3)), dst_cursor + draw(st.integers(0, 3))


def _check_against_reference(backend, dtype, table, src_numel, dst_numel, accumulate, seed):
    device = _device(backend)
    src = _fill(src_numel, dtype, seed, finite=accumulate)
    dst = _fill(dst_numel, dtype, seed + 1, finite=accumulate)
    expected = dst.clone()
    segments.copy_segments_reference(src, expected, table, accumulate)
    out = dst.to(device)
    segments.copy_segments(src.to(device), out, table, accumulate, backend=backend)
    assert torch.equal(out.cpu().view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "accumulate"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), seed=st.integers(0, 2**31))
def test_random_tables_match_reference(backend, dtype, accumulate, data, seed):
    if accumulate and dtype in NO_ADD_DTYPES:
        pytest.skip("float8 has no add; see test_float8_accumulate_raises")
    table, src_numel, dst_numel = data.draw(segment_tables(MAX_LINES[backend], MAX_ELEMS[backend]))
    _check_against_reference(backend, dtype, table, src_numel, dst_numel, accumulate, seed)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float64], ids=str)
@settings(max_examples=25, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**31))
def test_cuda_item_arithmetic_matches_reference(dtype, data, seed):
    """The CUDA kernel's work items (chunk_ends from the host prepare, work_item per item: the
    shared header csrc/include/segment_index.h), walked on the CPU, cover every segment exactly."""
    if not AVAILABLE["cpp"]:
        pytest.skip("hpcomm._C not built")
    from hpcomm import _C

    table, src_numel, dst_numel = data.draw(segment_tables(MAX_LINES["cpp"], MAX_ELEMS["cpp"]))
    src, dst = _fill(src_numel, dtype, seed, False), _fill(dst_numel, dtype, seed + 1, False)
    expected = dst.clone()
    segments.copy_segments_reference(src, expected, table)
    ends = _C.chunk_ends(table)
    assert torch.all(ends[1:] >= ends[:-1]) if len(ends) else True
    _C.copy_segments_by_items(src, dst, table, ends)
    assert torch.equal(dst.view(torch.uint8), expected.view(torch.uint8))


def test_cuda_items_split_long_lines_and_group_short_ones():
    if not AVAILABLE["cpp"]:
        pytest.skip("hpcomm._C not built")
    from hpcomm import _C

    item = 16 * 1024  # kItemElems
    table = torch.tensor([[0, 0, 1, 3 * item + 1, 0, 0],  # one long line: 4 column pieces
                          [0, 0, 10, 7, 9, 7],  # short strided lines: one item
                          [0, 0, 0, 5, 5, 5],  # empty: none
                          [0, 0, 2 * item, 1, 3, 1]])  # 1-element lines: 2 items
    assert _C.chunk_ends(table).tolist() == [4, 5, 5, 7]


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "accumulate"])
def test_empty_table_is_a_noop(backend, accumulate):
    src, dst = torch.ones(4, device=_device(backend)), torch.zeros(4, device=_device(backend))
    segments.copy_segments(src, dst, torch.empty(0, 6, dtype=torch.int64), accumulate, backend=backend)
    assert not dst.any()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
def test_many_random_rows_and_big_runs(backend, dtype):
    """Pack of unaligned random rows of 1 B to 3 KiB, mixed with runs bigger than a work item and a
    column window, into a destination large enough for streaming stores: every splitting path."""
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("too large for the Triton interpreter")
    g = torch.Generator().manual_seed(7)
    row_elems = 3072 // dtype.itemsize
    num_rows = 3000
    lens = torch.randint(1, row_elems, (num_rows,), generator=g).tolist()
    rows = torch.randperm(num_rows, generator=g).tolist()
    segs, cursor = [], 0
    for i, row in enumerate(rows):
        segs.append([row * row_elems + (i % 3), cursor, 1, lens[i] - (i % 3 if lens[i] > 3 else 0), 0, 0])
        cursor += segs[-1][3]
    src_numel = num_rows * row_elems
    big = (5 << 20) // dtype.itemsize
    segs.append([5, cursor, 1, big, big, big])
    cursor += big
    segs.append([3, cursor, 40_000, 2, row_elems // 64, 3])
    cursor += 40_000 * 3
    dst_numel = max(cursor, (17 << 20) // dtype.itemsize)
    table = torch.tensor(segs, dtype=torch.int64)
    for accumulate in (False, True):
        _check_against_reference(backend, dtype, table, src_numel, dst_numel, accumulate, seed=3)


@pytest.mark.parametrize("dtype", NO_ADD_DTYPES, ids=str)
def test_float8_accumulate_raises(backend, dtype):
    device = _device(backend)
    buf = torch.zeros(8, device=device).to(dtype)
    table = torch.tensor([[0, 0, 1, 8, 8, 8]])
    with pytest.raises(TypeError, match="accumulate"):
        segments.copy_segments(buf, buf.clone(), table, True, backend=backend)


@pytest.mark.parametrize("row, error", [([0, 0, 1, 9, 9, 9], IndexError), ([0, 4, 2, 4, 0, 4], IndexError),
                                        ([0, 0, -1, 4, 4, 4], ValueError), ([-1, 0, 1, 1, 1, 1], ValueError)])
@pytest.mark.parametrize("num_good", [0, 300], ids=["alone", "after-300-rows"])
def test_bad_table_raises(backend, row, error, num_good):
    """Also past the segment count where the CPU kernel splits the table across threads."""
    device = _device(backend)
    table = torch.tensor([[0, 0, 0, 1, 1, 1]] * num_good + [row])
    with pytest.raises(error):
        segments.copy_segments(torch.zeros(8, device=device), torch.zeros(8, device=device), table,
                               backend=backend)


def test_mismatched_dtypes_raise(backend):
    device = _device(backend)
    with pytest.raises(TypeError):
        segments.copy_segments(torch.zeros(8, device=device), torch.zeros(8, device=device, dtype=torch.float64),
                               torch.tensor([[0, 0, 1, 8, 8, 8]]), backend=backend)


def test_compiled_backends_match_registry():
    if not AVAILABLE["cpp"]:
        pytest.skip("hpcomm._C not built")
    from hpcomm import _C

    assert set(_C.compiled_backends()) == {name for name in ("cpp", "cuda") if AVAILABLE[name]}
    assert _C.is_cuda_compiled() == AVAILABLE["cuda"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("cu_file", sorted((ROOT / "csrc" / "kernels").glob("*.cu")), ids=lambda p: p.name)
def test_cuda_kernels_compile(cu_file, arch, tmp_path):
    # The CI command verbatim, run in a copy of csrc so its object file lands outside the repo.
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    rel = cu_file.relative_to(ROOT).as_posix()
    cmd = ["nvcc", "-std=c++17", f"-arch={arch}", "-Icsrc", "-Icsrc/include", "-c", rel]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not AVAILABLE["triton"], reason="triton not installed")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")  # the kernel has no multiply to fuse
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype, accumulate", [("*i32", False), ("*i16", True)], ids=["copy", "accumulate-bf16"])
def test_triton_kernel_compiles_for_cuda(arch, dtype, accumulate):
    """The interpreter does not compile: lower the kernel to PTX for real GPUs, no GPU needed."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hpcomm.triton_kernels import segment_copy

    signature = {"src": dtype, "dst": dtype, "table": "*i64", "chunk_ends": "*i64", "num_segments": "i32"}
    constexprs = {"PIECE": 8192, "ACCUMULATE": accumulate, "ROUND_VIA_FLOAT": False, "IS_BF16_BITS": accumulate,
                  "IS_BOOL": False, "BLOCK": 1024}
    source = ASTSource(triton.jit(segment_copy._segment_kernel),
                       {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs)
    assert "ld.global" in triton.compile(source, target=GPUTarget("cuda", arch, 32)).asm["ptx"]


ALL_BACKENDS = _backend_params(segments.backend_names())


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request, monkeypatch):
    if request.param == "triton" and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return segments.get_backend(request.param, _device(request.param))


@contextlib.contextmanager
def _no_host_reads():
    """Fails on any read of a tensor's values on the host, or a table check."""
    def forbidden(*args, **kwargs):
        raise AssertionError("apply read a tensor back to the host or checked the table")

    names = ("cpu", "tolist", "item", "numpy", "__int__", "__index__", "__bool__", "__float__")
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(torch.Tensor, name, forbidden))
        stack.enter_context(mock.patch.object(segments, "checked_table", forbidden))
        stack.enter_context(mock.patch.object(segments, "table_extents", forbidden))
        yield


def test_prepare_once_apply_many_without_host_reads(any_backend):
    """apply only launches: no value of any tensor is read on the host, the table is not checked
    again, and prepare's work is not redone (counted)."""
    device = _device(any_backend.name)
    table = torch.tensor([[3, 0, 4, 5, 7, 5], [0, 20, 1, 40, 40, 40], [0, 60, 0, 9, 9, 9]])
    calls = []
    real_prepare = type(any_backend)._prepare

    def counting_prepare(self, rows, dev):
        calls.append(1)
        return real_prepare(self, rows, dev)

    with mock.patch.object(type(any_backend), "_prepare", counting_prepare):
        prepared = any_backend.prepare(table, device)
    assert calls == [1] and prepared.num_segments == 3
    assert (prepared.src_extent, prepared.dst_extent) == (40, 60)
    src = torch.arange(50, dtype=torch.float32, device=device)
    out = torch.zeros(64, device=device)
    expected = torch.zeros(64)
    for accumulate in (False, True, True):
        segments.copy_segments_reference(src.cpu(), expected, table, accumulate)
    with _no_host_reads():
        for accumulate in (False, True, True):
            any_backend.apply(prepared, src, out, accumulate)
    assert torch.equal(out.cpu(), expected)


def test_triton_apply_is_one_launch_of_prepared_device_data(monkeypatch):
    """The launch gets the prepared table and chunk_ends themselves (no copy, no cumsum per call)."""
    if not AVAILABLE["triton"]:
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from hpcomm.triton_kernels import segment_copy

    backend = segments.get_backend("triton", torch.device("cpu"))
    prepared = backend.prepare(torch.tensor([[0, 0, 1, 20000, 1, 1], [0, 0, 3, 2, 4, 2]]), torch.device("cpu"))
    launches = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    monkeypatch.setattr(segment_copy, "_kernel", lambda interpret: FakeKernel())
    with _no_host_reads():
        backend.apply(prepared, torch.zeros(20000), torch.zeros(20000), False)
    (grid, args, kwargs), = launches
    assert args[2] is prepared.data.table and args[3] is prepared.data.chunk_ends
    # 20000 elements in pieces of 8192, then 3 strided lines; the interpreter caps the grid at 4
    assert prepared.data.chunk_ends.tolist() == [3, 6] and grid == (4,)


@pytest.mark.parametrize("short", ["src", "dst"])
def test_prepared_extents_catch_small_buffers(any_backend, short):
    device = _device(any_backend.name)
    prepared = any_backend.prepare(torch.tensor([[2, 1, 3, 4, 6, 5]]), device)
    assert (prepared.src_extent, prepared.dst_extent) == (18, 15)
    src = torch.zeros(18 - (short == "src"), device=device)
    dst = torch.zeros(15 - (short == "dst"), device=device)
    with pytest.raises(IndexError, match="18 elements of src"):
        any_backend.apply(prepared, src, dst, False)
    any_backend.apply(prepared, torch.zeros(18, device=device), torch.zeros(15, device=device), False)


def test_views_are_addressed_from_their_start(any_backend):
    """Offsets count from the tensor, not from its storage (buffers are often slices of a pool)."""
    device = _device(any_backend.name)
    table = torch.tensor([[1, 2, 2, 3, 4, 3]])
    src = torch.arange(30, dtype=torch.float32, device=device)[10:]
    out = torch.zeros(40, device=device)
    any_backend.apply(any_backend.prepare(table, device), src, out[5:], False)
    expected = torch.zeros(40)
    expected[7:13] = torch.tensor([11., 12., 13., 15., 16., 17.])
    assert torch.equal(out.cpu(), expected)


def test_torch_backend_converts_dtypes():
    table = torch.tensor([[0, 1, 1, 3, 3, 3]])
    out = torch.zeros(4, dtype=torch.bfloat16)
    segments.copy_segments(torch.tensor([1.5, 2.25, 3.0]), out, table, backend="torch")
    assert out.tolist() == [0.0, 1.5, 2.25, 3.0]
    segments.copy_segments(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), out, table, True, backend="torch")
    assert out.tolist() == [0.0, 2.5, 3.25, 4.0]


def test_explicit_backend_errors(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="unknown backend 'nccl'; known: auto, cuda, cpp, triton, torch"):
        segments.get_backend("nccl", cpu)
    if not AVAILABLE["cuda"]:
        with pytest.raises(ValueError, match="'cuda' is not available in this build"):
            segments.get_backend("cuda", cpu)
    if AVAILABLE["cpp"]:
        with pytest.raises(ValueError, match="'cpp' runs on cpu tensors, not cuda"):
            segments.get_backend("cpp", torch.device("cuda"))
    if AVAILABLE["triton"]:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            segments.get_backend("triton", cpu)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert segments.get_backend("triton", cpu).name == "triton"
    assert segments.get_backend("auto", cpu).name == ("cpp" if AVAILABLE["cpp"] else "torch")
    assert segments.get_backend("torch", torch.device("meta")).name == "torch"


def test_malformed_tables_raise_in_prepare():
    backend = segments.get_backend("torch", torch.device("cpu"))
    with pytest.raises(TypeError, match="int64"):
        backend.prepare(torch.zeros(1, 6, dtype=torch.int32), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"\[num_segments, 6\]"):
        backend.prepare(torch.zeros(1, 5, dtype=torch.int64), torch.device("cpu"))
    with pytest.raises(ValueError, match="segment 1 has a negative entry"):
        backend.prepare(torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, -1, 1]]), torch.device("cpu"))


def test_registered_backend_is_known_but_never_auto(monkeypatch):
    class Doubling(segments.Backend):
        name = "doubling"
        device_types = ("cpu",)

        def _prepare(self, rows, device):
            return rows

        def _launch(self, data, src, dst, accumulate):
            segments.copy_segments_reference(src * 2, dst, data, accumulate)

    monkeypatch.setitem(segments._REGISTRY, "doubling", Doubling())
    assert segments.backend_names()[-1] == "doubling" and segments.backends()["doubling"]
    assert segments.get_backend("auto", torch.device("cpu")).name != "doubling"
    out = torch.zeros(2)
    segments.copy_segments(torch.ones(2), out, torch.tensor([[0, 0, 1, 2, 2, 2]]), backend="doubling")
    assert out.tolist() == [2.0, 2.0]
