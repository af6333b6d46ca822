"""Plan properties against brute force: every rank's plan built and inspected."""

from hypothesis import given
from hypothesis import strategies as st

from hpcomm import Layout
from hpcomm.plan import Plan
from strategies import dest_layouts, source_layouts


def brute_crosses_wire(plan):
    ranks = set(plan.src.ranks) | set(plan.dst.ranks)
    return any(plan.rank_plan(r).sends for r in ranks)


@st.composite
def own_rows(draw, src, cols=None):
    """A destination where each rank of ``src`` keeps a random subset of its own rows (and, with
    cols, a sub-window of its own columns): nothing crosses unless the source is partial."""
    rows = {}
    for r in src.ranks:
        mine = src.rows(r).tolist()
        rows[r] = draw(st.permutations(mine))[:draw(st.integers(0, len(mine)))]
    if cols is None:
        return Layout.from_rows(rows, src.num_rows)
    windows = {}
    for r in src.ranks:
        c0, c1 = src.cols(r)
        a, b = sorted(draw(st.lists(st.integers(c0, c1), min_size=2, max_size=2)))
        windows[r] = (a, b)
    return Layout.from_rows(rows, src.num_rows, windows, cols)


@st.composite
def plans(draw):
    num_rows = draw(st.integers(0, 20))
    cols = draw(st.none() | st.integers(1, 5))
    src = draw(source_layouts(num_rows, max_ranks=6, max_id=12, cols=cols))
    if draw(st.booleans()):
        src = src.as_partial()
    fill_missing = draw(st.booleans())
    kind = draw(st.sampled_from(["any", "own", "same"]))
    if kind == "own":
        dst = draw(own_rows(src, cols))
    elif kind == "same":
        dst = src.as_partial(False)
    else:
        dst = draw(dest_layouts(num_rows, max_ranks=6, max_id=12, cols=cols))
        if not fill_missing:  # every destination row needs a holder: keep the covering source
            src = draw(source_layouts(num_rows, max_ranks=6, max_id=12, cols=cols))
    return Plan(src, dst, fill_missing)


@given(plans())
def test_crosses_wire_matches_brute_force(plan):
    assert plan.crosses_wire() == brute_crosses_wire(plan)


def test_crosses_wire_examples():
    lay = Layout.cp([0, 1], [5, 7])
    assert not Plan(lay, lay).crosses_wire()
    assert Plan(lay, Layout.cp([0, 1], [5, 7], "contiguous")).crosses_wire()
    # a partial source with several holders of a row sums over the wire
    rep = Layout.replicated([0, 1], 12)
    assert not Plan(rep, lay).crosses_wire()
    assert Plan(rep.as_partial(), lay).crosses_wire()
    # a destination rank outside the source receives everything it holds
    assert Plan(rep, Layout.contiguous([0, 2], 12)).crosses_wire()
    assert not Plan(rep, Layout.from_rows({0: [1, 2], 2: []}, 12)).crosses_wire()
