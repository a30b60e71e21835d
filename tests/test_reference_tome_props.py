"""Edge cases and invariances of latentmoe.reference.tome beyond the tomesd comparison."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentmoe.reference import tome as T


def _identity(plan, batch, n):
    pos = torch.arange(n).expand(batch, n)
    return (
        torch.equal(plan.dest, pos)
        and torch.equal(plan.origin, pos)
        and plan.num_removed == 0
        and plan.src_idx.shape == (batch, 0)
    )


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_tiny_sequences(n):
    x = torch.randn(2, n, 4)
    for r in (0, 1, 5):
        plan = T.bipartite_soft_matching(x, r)
        # every even token is a source once there is at least one odd destination
        assert plan.num_removed == (min(r, (n + 1) // 2) if n >= 2 else 0)
        merged, size = T.merge_tokens(x, plan)
        assert merged.shape == (2, n - plan.num_removed, 4)
        assert T.unmerge_tokens(merged, plan).shape == x.shape
        causal = T.causal_adjacent_matching(x, r)
        assert causal.num_removed == min(r, n // 2)


def test_negative_r_and_everything_protected_are_identity():
    x = torch.randn(3, 10, 4)
    assert _identity(T.bipartite_soft_matching(x, -3), 3, 10)
    assert _identity(T.bipartite_soft_matching(x, 4, protected=torch.ones(10, dtype=torch.bool)), 3, 10)
    odd = torch.arange(10) % 2 == 1
    # every destination protected: no source has anywhere to go
    assert _identity(T.bipartite_soft_matching(x, 4, protected=odd), 3, 10)
    assert _identity(T.causal_adjacent_matching(x, 4, protected=odd), 3, 10)
    assert _identity(T.causal_adjacent_matching(x, -1), 3, 10)


def test_ties_break_to_lower_indices():
    """Identical metrics: every A token's best is the first B token, and the first A tokens merge."""
    x = torch.ones(2, 11, 3)
    plan = T.bipartite_soft_matching(x, 4)
    assert plan.src_idx.tolist() == [[0, 2, 4, 6]] * 2
    assert plan.dst_idx.tolist() == [[1, 1, 1, 1]] * 2
    causal = T.causal_adjacent_matching(x, 3)
    assert causal.src_idx.tolist() == [[0, 2, 4]] * 2
    assert causal.dst_idx.tolist() == [[1, 3, 5]] * 2


def test_cls_stays_first_in_sorted_layout():
    x = torch.randn(4, 25, 8)
    protected = torch.zeros(25, dtype=torch.bool)
    protected[0] = True
    plan = T.bipartite_soft_matching(x, 12, protected=protected)
    assert plan.num_removed == 12
    assert bool((plan.origin[:, 0] == 0).all())
    merged, size = T.merge_tokens(x, plan)
    assert torch.equal(merged[:, 0], x[:, 0]) and bool((size[:, 0] == 1).all())


def test_batch_rows_are_independent_and_layouts_group_alike():
    x = torch.randn(3, 21, 5, dtype=torch.float64)
    plan = T.bipartite_soft_matching(x, 7)
    tome_plan = T.bipartite_soft_matching(x, 7, layout="tome")
    for b in range(3):
        single = T.bipartite_soft_matching(x[b : b + 1], 7)
        for a, c in zip(plan, single):
            assert torch.equal(a[b : b + 1], c)
    # both layouts make the same groups, so inflating either merge gives the same tokens
    assert torch.equal(plan.src_idx, tome_plan.src_idx) and torch.equal(plan.dst_idx, tome_plan.dst_idx)
    torch.testing.assert_close(
        T.unmerge_tokens(T.merge_tokens(x, plan)[0], plan),
        T.unmerge_tokens(T.merge_tokens(x, tome_plan)[0], tome_plan),
        rtol=0,
        atol=0,
    )


def test_non_contiguous_and_scaled_metric_give_the_same_plan():
    x = torch.randn(2, 6, 19, dtype=torch.float64).transpose(1, 2)  # [2, 19, 6], non-contiguous
    plan = T.bipartite_soft_matching(x, 6)
    scaled = T.bipartite_soft_matching(x.contiguous() * 3.5, 6)  # cosine ignores scale
    for a, b in zip(plan, scaled):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_merge(dtype):
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    plan = T.bipartite_soft_matching(x, 15)
    size = torch.randint(1, 4, (2, 40)).to(dtype)
    ref, ref_size = T.merge_tokens(x, plan, size=size.double())
    low, low_size = T.merge_tokens(x.to(dtype), plan, size=size)
    assert low.dtype == dtype and low_size.dtype == dtype
    # fp32 accumulation: only the rounding of inputs and of the final result remains
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(low.double(), ref, rtol=4 * eps, atol=4 * eps * ref.abs().max().item())
    torch.testing.assert_close(low_size.double(), ref_size)


def test_sum_mode_and_proportional_bias_of_unit_sizes():
    x = torch.randn(2, 15, 3, dtype=torch.float64)
    plan = T.bipartite_soft_matching(x, 5)
    summed, size = T.merge_tokens(x, plan, mode="sum")
    mean, _ = T.merge_tokens(x, plan)
    torch.testing.assert_close(summed, mean * size[..., None].double())
    assert torch.equal(T.proportional_attention_bias(torch.ones(2, 4)), torch.zeros(2, 1, 1, 4))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 2), st.integers(1, 30), st.integers(0, 32), st.booleans(), st.integers(0, 2**31 - 1))
def test_merge_of_unmerge_is_identity(batch, n, r, causal, seed):
    """Inflating then merging (any sizes) gives back the merged tokens: every slot's copies agree."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 3, generator=g, dtype=torch.float64)
    plan = T.causal_adjacent_matching(x, r) if causal else T.bipartite_soft_matching(x, r)
    y = torch.randn(batch, plan.num_out, 3, generator=g, dtype=torch.float64)
    size = torch.rand(batch, n, generator=g, dtype=torch.float64) + 0.1
    again, _ = T.merge_tokens(T.unmerge_tokens(y, plan), plan, size=size)
    torch.testing.assert_close(again, y)


def test_device_parity(device):
    x = torch.randn(2, 33, 8)
    protected = torch.zeros(33, dtype=torch.bool)
    protected[0] = True
    for make in (
        lambda t: T.bipartite_soft_matching(t, 11, protected=protected.to(t.device)),
        lambda t: T.causal_adjacent_matching(t, 9),
        lambda t: T.random2d_soft_matching(t, 11, 3, 2, 2, 9, no_rand=True),
    ):
        cpu_plan, dev_plan = make(x), make(x.to(device))
        for a, b in zip(cpu_plan, dev_plan):
            assert b.device.type == device and torch.equal(a, b.cpu())
        merged, _ = T.merge_tokens(x.to(device), dev_plan)
        torch.testing.assert_close(merged.cpu(), T.merge_tokens(x, cpu_plan)[0])
