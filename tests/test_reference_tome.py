"""latentmoe.reference.tome against tomesd (merge and unmerge), a brute-force ToMe, and properties."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from latentmoe.reference import tome as T

tomesd_merge = pytest.importorskip("tomesd.merge")

# (batch, h, w, sx, sy, r): odd grids, ragged edges (h % sy, w % sx != 0), r = 0, r past the source count.
TOMESD_CASES = [
    (1, 5, 7, 2, 2, 6),
    (2, 7, 9, 2, 2, 13),
    (3, 9, 5, 3, 2, 17),
    (2, 6, 11, 2, 3, 40),
    (2, 8, 8, 2, 2, 48),  # exactly the number of sources: everything merges
    (3, 13, 7, 2, 2, 999),  # clamped
    (2, 5, 5, 2, 2, 0),  # nothing to do
    (1, 4, 3, 1, 1, 5),  # 1x1 cells: every token is a destination, no sources
]


def _tomesd_slot_of(unmerge_fn, batch: int, num_out: int) -> torch.Tensor:
    """For each original token, the row of tomesd's merged output it came from (via its unmerge)."""
    tags = torch.arange(num_out, dtype=torch.float64).expand(batch, num_out)[..., None]
    return unmerge_fn(tags.contiguous())[..., 0].round().long()


def _tomesd_pair(x, h, w, sx, sy, r, no_rand, seed):
    gen = torch.Generator().manual_seed(seed) if not no_rand else None
    merge_fn, unmerge_fn = tomesd_merge.bipartite_soft_matching_random2d(
        x, w, h, sx, sy, r, no_rand=no_rand, generator=gen
    )
    return merge_fn, unmerge_fn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("no_rand", [True, False])
@pytest.mark.parametrize("batch,h,w,sx,sy,r", TOMESD_CASES)
def test_merge_and_unmerge_match_tomesd(batch, h, w, sx, sy, r, no_rand, dtype):
    n, channels, seed = h * w, 7, 1234
    x = torch.randn(batch, n, channels, dtype=dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)

    merge_fn, unmerge_fn = _tomesd_pair(x, h, w, sx, sy, r, no_rand, seed)
    gen = None if no_rand else torch.Generator().manual_seed(seed)
    plan = T.random2d_soft_matching(x, w, h, sx, sy, r, no_rand=no_rand, generator=gen)

    expected_merged = merge_fn(x)
    merged, merged_size = T.merge_tokens(x, plan)
    assert merged.shape == expected_merged.shape
    assert merged.dtype == dtype

    # Unmerge is order-defined, so it must agree exactly, also applied to tomesd's own merge output.
    torch.testing.assert_close(T.unmerge_tokens(merged, plan), unmerge_fn(expected_merged), **tol)

    # tomesd orders its merged rows by an unstable sort, so map rows by what its unmerge says.
    if plan.num_removed > 0:
        slot_of = _tomesd_slot_of(unmerge_fn, batch, plan.num_out)
        perm = slot_of.gather(1, plan.origin)  # tomesd row of each of our slots
        assert sorted(perm[0].tolist()) == list(range(plan.num_out))
        expected_ours = expected_merged.gather(1, perm[..., None].expand_as(merged))
        torch.testing.assert_close(merged, expected_ours, **tol)
        counts = merge_fn(torch.ones(batch, n, 1, dtype=dtype), mode="sum")[..., 0]
        torch.testing.assert_close(merged_size, counts.gather(1, perm).float())
        # both sides agree which tokens share a slot
        assert torch.equal(slot_of, perm.gather(1, plan.dest))
    else:
        torch.testing.assert_close(merged, expected_merged, rtol=0, atol=0)


@pytest.mark.parametrize("batch,h,w,sx,sy,r", [c for c in TOMESD_CASES if 0 < c[-1] < 999])
def test_tome_layout_matches_tomesd_unmerged_rows(batch, h, w, sx, sy, r):
    """With layout="tome" the unmerged source rows come first, by decreasing similarity, as in tomesd."""
    x = torch.randn(batch, h * w, 5, dtype=torch.float64)
    merge_fn, _ = _tomesd_pair(x, h, w, sx, sy, r, True, 0)
    plan = T.random2d_soft_matching(x, w, h, sx, sy, r, no_rand=True, layout="tome")
    num_dst = int(T.random2d_partition(h, w, sx, sy, no_rand=True).sum())
    num_unmerged = plan.num_out - num_dst
    merged, _ = T.merge_tokens(x, plan)
    torch.testing.assert_close(merged[:, :num_unmerged], merge_fn(x)[:, :num_unmerged], rtol=0, atol=0)


@pytest.mark.parametrize("h,w,sx,sy", [(7, 9, 2, 2), (6, 11, 2, 3), (5, 5, 1, 1), (3, 8, 4, 2), (1, 1, 2, 2)])
def test_random2d_partition_rule(h, w, sx, sy):
    is_dst = T.random2d_partition(h, w, sx, sy, no_rand=True)
    expected = [
        y % sy == 0 and x % sx == 0 and y < (h // sy) * sy and x < (w // sx) * sx
        for y in range(h)
        for x in range(w)
    ]
    assert is_dst.tolist() == expected
    # random: exactly one destination per full cell, none outside the covered region
    rand = T.random2d_partition(h, w, sx, sy, generator=torch.Generator().manual_seed(5)).view(h, w)
    covered = rand[: (h // sy) * sy, : (w // sx) * sx]
    cells = covered.reshape(h // sy, sy, w // sx, sx).sum(dim=(1, 3))
    assert bool((cells == 1).all())
    assert int(rand.sum()) == (h // sy) * (w // sx)


def _brute_force_tome(metric, r, protected):
    """ToMe spelled out one batch row and one token at a time (alternate split, first-max ties)."""
    batch, n, _ = metric.shape
    out = []
    for b in range(batch):
        unit = [metric[b, i] / max(metric[b, i].norm().item(), 1e-12) for i in range(n)]
        a_tokens = [i for i in range(0, n, 2)]
        b_tokens = [i for i in range(1, n, 2) if not protected[i]]
        edges = []
        for i in a_tokens:
            if protected[i] or not b_tokens:
                continue
            sims = [float(unit[i] @ unit[j]) for j in b_tokens]
            best = max(range(len(sims)), key=lambda k: (sims[k], -k))
            edges.append((-sims[best], i, b_tokens[best]))
        edges.sort()
        out.append([(i, j) for _, i, j in edges[:r]])
    return out


@pytest.mark.parametrize("n,r,protect", [(17, 5, [0]), (24, 11, [0, 1]), (9, 20, [0, 3, 4]), (6, 2, [])])
def test_alternate_matching_vs_brute_force(n, r, protect):
    metric = torch.randn(3, n, 6, dtype=torch.float64)
    protected = torch.zeros(n, dtype=torch.bool)
    protected[protect] = True
    plan = T.bipartite_soft_matching(metric, r, protected=protected)
    expected = _brute_force_tome(metric, r, protected.tolist())
    for b in range(3):
        assert list(zip(plan.src_idx[b].tolist(), plan.dst_idx[b].tolist())) == expected[b]


def test_weighted_merge_composes():
    """Two rounds of size-weighted merging equal one mean over every original token in each slot."""
    x = torch.randn(2, 31, 4, dtype=torch.float64)
    plan1 = T.bipartite_soft_matching(x, 9)
    y1, s1 = T.merge_tokens(x, plan1)
    plan2 = T.bipartite_soft_matching(y1, 7)
    y2, s2 = T.merge_tokens(y1, plan2, size=s1)
    total_dest = plan2.dest.gather(1, plan1.dest)  # original token -> final slot
    for b in range(2):
        for slot in range(plan2.num_out):
            members = (total_dest[b] == slot).nonzero().flatten()
            torch.testing.assert_close(y2[b, slot], x[b, members].mean(0))
            assert s2[b, slot].item() == len(members)
    # unmerging twice restores each original token's final slot value
    twice = T.unmerge_tokens(T.unmerge_tokens(y2, plan2), plan1)
    torch.testing.assert_close(twice, y2.gather(1, total_dest[..., None].expand(2, 31, 4)))


def test_proportional_attention_equals_attention_over_inflated_tokens():
    """Keys of size s with a log(s) bias weigh like s copies: compare against SDPA on unmerged K/V."""
    batch, n, heads, dim = 2, 23, 3, 8
    k = torch.randn(batch, n, heads * dim, dtype=torch.float64)
    v = torch.randn(batch, n, heads * dim, dtype=torch.float64)
    q = torch.randn(batch, heads, 5, dim, dtype=torch.float64)
    plan = T.bipartite_soft_matching(k, 8)
    k_m, size = T.merge_tokens(k, plan)
    v_m, _ = T.merge_tokens(v, plan)

    def heads_first(t):
        return t.view(batch, -1, heads, dim).transpose(1, 2)

    bias = T.proportional_attention_bias(size.double())
    assert bias.shape == (batch, 1, 1, plan.num_out)
    ours = F.scaled_dot_product_attention(q, heads_first(k_m), heads_first(v_m), attn_mask=bias)
    inflated = F.scaled_dot_product_attention(
        q, heads_first(T.unmerge_tokens(k_m, plan)), heads_first(T.unmerge_tokens(v_m, plan))
    )
    torch.testing.assert_close(ours, inflated)


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 9, 4)
    with pytest.raises(ValueError, match="metric"):
        T.bipartite_soft_matching(x[0], 2)
    with pytest.raises(ValueError, match="protected"):
        T.bipartite_soft_matching(x, 2, protected=torch.zeros(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_dst"):
        T.bipartite_soft_matching(x, 2, is_dst=torch.zeros(9))
    with pytest.raises(ValueError, match="layout"):
        T.bipartite_soft_matching(x, 2, layout="random")
    with pytest.raises(ValueError, match="metric"):
        T.random2d_soft_matching(x, 4, 2, 2, 2, 3)
    plan = T.bipartite_soft_matching(x, 2)
    with pytest.raises(ValueError, match="size"):
        T.merge_tokens(x, plan, size=torch.ones(2, 8))
    with pytest.raises(ValueError, match="mode"):
        T.merge_tokens(x, plan, mode="amax")
    with pytest.raises(ValueError, match="x must be"):
        T.merge_tokens(x[:, :8], plan)
    with pytest.raises(ValueError, match="y must be"):
        T.unmerge_tokens(x, plan)
    with pytest.raises(ValueError, match="sx"):
        T.random2d_partition(4, 4, 0, 2)


# ----------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ----------------------------------------------------------------------------------------------


@st.composite
def merge_problems(draw):
    batch = draw(st.integers(1, 3))
    n = draw(st.integers(1, 40))
    channels = draw(st.integers(1, 5))
    r = draw(st.integers(0, n + 2))
    protected = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, n, channels, r, torch.tensor(protected, dtype=torch.bool), seed


def _check_plan_invariants(plan, x, size, protected, expected_r):
    batch, n, _ = x.shape
    m = n - expected_r
    assert plan.num_removed == expected_r and plan.num_out == m
    assert plan.dest.shape == (batch, n) and plan.origin.shape == (batch, m)
    assert plan.dest.dtype == plan.origin.dtype == plan.src_idx.dtype == plan.dst_idx.dtype == torch.int64
    pos = torch.arange(n).expand(batch, n)
    # each slot is owned by its origin token; sources go where dst_idx says
    assert torch.equal(plan.dest.gather(1, plan.origin), torch.arange(m).expand(batch, m))
    assert torch.equal(plan.dest.gather(1, plan.src_idx), plan.dest.gather(1, plan.dst_idx))

    merged, merged_size = T.merge_tokens(x, plan, size=size)
    assert merged.shape == (batch, m, x.shape[2])
    # unmerge restores count and order: survivors get their own value, sources their destination's
    tags = T.unmerge_tokens(plan.origin[..., None].double(), plan)[..., 0].long()
    expected_tags = pos.clone()
    expected_tags.scatter_(1, plan.src_idx, plan.dst_idx)
    assert torch.equal(tags, expected_tags)
    # sizes are conserved
    torch.testing.assert_close(merged_size.sum(1), size.sum(1))
    # protected tokens never merge and pass through untouched
    for b in range(batch):
        involved = set(plan.src_idx[b].tolist()) | set(plan.dst_idx[b].tolist())
        for i in protected.nonzero().flatten().tolist():
            assert i not in involved
            slot = plan.dest[b, i].item()
            assert torch.equal(merged[b, slot], x[b, i])
            assert merged_size[b, slot].item() == size[b, i].item()
    return merged


@settings(max_examples=60, deadline=None)
@given(merge_problems(), st.sampled_from(["sorted", "tome"]))
def test_property_bipartite(problem, layout):
    batch, n, channels, r, protected, seed = problem
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, channels, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (batch, n), generator=g).double()
    plan = T.bipartite_soft_matching(x, r, protected=protected, layout=layout)
    sources = [i for i in range(0, n, 2) if not protected[i]]
    any_dst = any(not protected[i] for i in range(1, n, 2))
    expected_r = min(r, len(sources)) if any_dst else 0
    _check_plan_invariants(plan, x, size, protected, expected_r)
    assert bool((plan.src_idx % 2 == 0).all()) and bool((plan.dst_idx % 2 == 1).all())
    if layout == "sorted":
        assert bool((plan.origin[:, 1:] > plan.origin[:, :-1]).all())


@settings(max_examples=60, deadline=None)
@given(merge_problems())
def test_property_causal(problem):
    batch, n, channels, r, protected, seed = problem
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, channels, generator=g, dtype=torch.float64)
    size = torch.rand(batch, n, generator=g, dtype=torch.float64) + 0.5
    plan = T.causal_adjacent_matching(x, r, protected=protected)
    pairs = [i for i in range(0, n - 1, 2) if not protected[i] and not protected[i + 1]]
    _check_plan_invariants(plan, x, size, protected, min(r, len(pairs)))
    # only adjacent pairs merge, into the later token
    assert torch.equal(plan.dst_idx, plan.src_idx + 1)
    assert bool((plan.src_idx % 2 == 0).all())
    assert bool((plan.origin[:, 1:] > plan.origin[:, :-1]).all())
    # no slot holds a token later than its position: a causal mask on origin never shows the future
    pos = torch.arange(n).expand(batch, n)
    assert bool((pos <= plan.origin.gather(1, plan.dest)).all())
    # the r merged pairs are the r most similar eligible pairs
    if plan.num_removed:
        unit = F.normalize(x, dim=-1)
        sims = (unit[:, :-1] * unit[:, 1:]).sum(-1)
        for b in range(batch):
            chosen = sims[b, plan.src_idx[b]]
            rest = [sims[b, i].item() for i in pairs if i not in set(plan.src_idx[b].tolist())]
            if rest:
                assert chosen.min().item() >= max(rest)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 2),
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(0, 90),
    st.integers(0, 2**31 - 1),
)
def test_property_random2d(batch, h, w, sx, sy, r, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, h * w, 3, generator=g, dtype=torch.float64)
    plan = T.random2d_soft_matching(x, w, h, sx, sy, r, generator=g)
    num_dst = (h // sy) * (w // sx)
    expected_r = min(r, h * w - num_dst) if num_dst else 0
    ones = torch.ones(batch, h * w, dtype=torch.float64)
    _check_plan_invariants(plan, x, ones, torch.zeros(h * w, dtype=torch.bool), expected_r)


def test_zero_metric_vectors_do_not_produce_nan():
    x = torch.randn(2, 12, 4)
    x[:, 3] = 0
    plan = T.bipartite_soft_matching(x, 5)
    merged, _ = T.merge_tokens(x, plan)
    assert not merged.isnan().any()
    assert math.isfinite(merged.sum().item())
