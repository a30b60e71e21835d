"""latentmoe.ops.moe_route (CPU and CUDA) against the reference and HF's routers."""

import pytest
import torch
from moe_helpers import CONFIGS, hf_moe, hf_v2_router, rel_err, sort_by_index

from latentmoe.ops import moe_route
from latentmoe.reference import moe as ref

ROUTINGS = {
    "v3": dict(top_k=4, n_group=4, topk_group=2, score_func="sigmoid", norm_topk_prob=True,
               routed_scaling_factor=2.5),
    "softmax_groups": dict(top_k=3, n_group=8, topk_group=3, score_func="softmax",
                           norm_topk_prob=True, routed_scaling_factor=1.0),
    "no_norm": dict(top_k=6, n_group=1, topk_group=1, score_func="sigmoid", norm_topk_prob=False,
                    routed_scaling_factor=1.3),
    "softmax_greedy": dict(top_k=2, n_group=1, topk_group=1, score_func="softmax",
                           norm_topk_prob=False, routed_scaling_factor=1.0),
    "top1_all_groups": dict(top_k=1, n_group=2, topk_group=2, score_func="sigmoid",
                            norm_topk_prob=True, routed_scaling_factor=1.0),
}


def _both(logits, bias, kw):
    ours = moe_route(logits, e_score_correction_bias=bias, **kw)
    want = ref.route(logits.cpu(), e_score_correction_bias=None if bias is None else bias.cpu(), **kw)
    return [t.cpu() for t in ours], want


@pytest.mark.parametrize("name", list(ROUTINGS))
@pytest.mark.parametrize("T", [1, 5, 257])
def test_route_matches_reference(device, name, T):
    E = 32
    logits = torch.randn(T, E, device=device) * 2
    bias = torch.randn(E, device=device) * 0.1 if name != "softmax_greedy" else None
    (w, i, s), (wr, ir, sr) = _both(logits, bias, ROUTINGS[name])
    assert i.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(i, ir)
    assert rel_err(w, wr) <= 1e-6
    assert rel_err(s, sr) <= 1e-6


@pytest.mark.parametrize("name", list(CONFIGS))
def test_route_matches_hf_v3_router(device, name):
    moe = hf_moe(name)
    x = torch.randn(41, CONFIGS[name]["hidden_size"])
    logits, w_hf, i_hf = moe.gate(x)
    g = moe.gate
    w, i, _ = moe_route(logits.to(device), g.top_k, n_group=g.num_group, topk_group=g.topk_group,
                        e_score_correction_bias=g.e_score_correction_bias.to(device),
                        norm_topk_prob=g.norm_topk_prob,
                        routed_scaling_factor=g.routed_scaling_factor)
    w, i = sort_by_index(w.cpu(), i.cpu())
    w_hf, i_hf = sort_by_index(w_hf, i_hf)
    assert torch.equal(i, i_hf)
    assert rel_err(w, w_hf) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_from_hidden_and_router_weight(device, dtype):
    # The hidden-states entry: logits computed from hidden + router weight, as HF's router does.
    moe = hf_moe("v3")
    g = moe.gate
    x = torch.randn(29, CONFIGS["v3"]["hidden_size"]).to(dtype)
    kw = dict(n_group=g.num_group, topk_group=g.topk_group, norm_topk_prob=g.norm_topk_prob,
              routed_scaling_factor=g.routed_scaling_factor)
    logits, w_hf, i_hf = g(x.float())
    xd = x.to(device).clone().requires_grad_()
    wd = g.weight.detach().to(device).requires_grad_()
    bias = g.e_score_correction_bias.to(device)
    w, i, scores = moe_route(xd, g.top_k, e_score_correction_bias=bias, router_weight=wd, **kw)
    w2, i2, scores2 = moe_route(torch.nn.functional.linear(x.to(device).float(), wd.detach()),
                                g.top_k, e_score_correction_bias=bias, **kw)
    assert torch.equal(i, i2) and torch.equal(w.detach(), w2) and torch.equal(scores.detach(), scores2)
    ws, iss = sort_by_index(w.detach().cpu(), i.cpu())
    w_hf, i_hf = sort_by_index(w_hf, i_hf)
    assert torch.equal(iss, i_hf)
    assert rel_err(ws, w_hf) <= 1e-6
    (w.square().sum() + scores.sum()).backward()  # gradients reach the router and the hidden states
    wr = g.weight.detach().clone().requires_grad_()
    xr = x.detach().float().clone().requires_grad_()
    wref, _, sref = moe_route(torch.nn.functional.linear(xr, wr), g.top_k,
                              e_score_correction_bias=g.e_score_correction_bias, **kw)
    (wref.square().sum() + sref.sum()).backward()
    assert rel_err(wd.grad.cpu(), wr.grad) <= 1e-5
    assert rel_err(xd.grad.cpu().float(), xr.grad) <= (1e-5 if dtype == torch.float32 else 1e-2)
    assert xd.grad.dtype == dtype


def test_route_router_weight_bad_args():
    x, w = torch.randn(5, 12), torch.randn(16, 12)
    with pytest.raises(ValueError, match="router_weight"):
        moe_route(x, 2, router_weight=w[:, :11])  # hidden sizes differ
    with pytest.raises(ValueError, match="router_weight"):
        moe_route(x, 2, router_weight=w[None])
    with pytest.raises(ValueError, match="router_weight"):
        moe_route(x, 2, router_weight=w.double())
    with pytest.raises(ValueError, match="router_weight"):
        moe_route(x.long(), 2, router_weight=w)
    with pytest.raises(ValueError, match="top_k|k"):
        moe_route(x, 17, router_weight=w)  # k > E, E from the router weight


def test_route_router_weight_meta():
    # Shapes only (meta tensors, as a model built on the meta device would trace them): the router
    # GEMM ran under torch.autocast("meta"), which raised "unsupported scalarType".
    x, w = torch.randn(5, 12, device="meta"), torch.randn(16, 12, device="meta", dtype=torch.bfloat16)
    weights, indices, scores = moe_route(x, 3, router_weight=w)
    assert weights.device.type == "meta" and weights.shape == (5, 3) and weights.dtype == torch.float32
    assert indices.shape == (5, 3) and indices.dtype == torch.int64 and scores.shape == (5, 16)


def test_module_with_a_hooked_router_on_meta():
    # A hook on the gate sends the forward through MoERouter.forward, which had the same
    # autocast("meta") failure.
    from moe_helpers import hf_config

    from latentmoe.nn import MoE

    with torch.device("meta"):
        moe = MoE(hf_config("v3"))
    moe.gate.register_forward_hook(lambda mod, args, out: None)
    out = moe(torch.randn(2, 3, moe.hidden_size, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 3, moe.hidden_size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_route_router_weight_device_mismatch():
    with pytest.raises(RuntimeError, match="router_weight"):
        moe_route(torch.randn(5, 12, device="cuda"), 2, router_weight=torch.randn(16, 12))


def test_softmax_route_matches_hf_v2_router(device):
    router = hf_v2_router(num_experts=12, top_k=3, hidden=20, scale=1.5)
    x = torch.randn(37, 20)
    logits, w_hf, i_hf = router(x)
    w, i, _ = moe_route(logits.to(device), 3, score_func="softmax", norm_topk_prob=False,
                        routed_scaling_factor=1.5)
    w, i = sort_by_index(w.cpu(), i.cpu())
    w_hf, i_hf = sort_by_index(w_hf, i_hf)
    assert torch.equal(i, i_hf)
    assert rel_err(w, w_hf) <= 1e-6


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (4, 1), (8, 3)])
def test_route_ties_lower_index(device, n_group, topk_group):
    logits = torch.randint(0, 3, (64, 16), device=device).float()
    bias = torch.zeros(16, device=device)
    bias[::5] = 0.25
    kw = dict(top_k=2, n_group=n_group, topk_group=topk_group)
    (w, i, _), (wr, ir, _) = _both(logits, bias, kw)
    assert torch.equal(i, ir)
    w, i, _ = moe_route(torch.full((3, 8), 0.3, device=device), 3, n_group=2, topk_group=1)
    assert i.cpu().tolist() == [[0, 1, 2]] * 3


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_route_gradients(device, name):
    kw = ROUTINGS[name]
    logits = torch.randn(19, 24, dtype=torch.float64)
    bias = torch.randn(24) * 0.1
    gw, gs = torch.randn(19, kw["top_k"], dtype=torch.float64), torch.randn(19, 24, dtype=torch.float64)
    lr = logits.clone().requires_grad_()
    wr, _, sr = ref.route(lr, e_score_correction_bias=bias, **kw)
    ((wr * gw).sum() + (sr * gs).sum()).backward()
    lo = logits.float().to(device).requires_grad_()
    w, _, s = moe_route(lo, e_score_correction_bias=bias.to(device), **kw)
    ((w * gw.float().to(device)).sum() + (s * gs.float().to(device)).sum()).backward()
    torch.testing.assert_close(lo.grad.cpu().double(), lr.grad, rtol=1e-4, atol=1e-6)
    # weights only (scores unused): the scores' grad arrives as None/zeros
    lo.grad = None
    w, _, _ = moe_route(lo, e_score_correction_bias=bias.to(device), **kw)
    (w * gw.float().to(device)).sum().backward()
    lr.grad = None
    wr, _, _ = ref.route(lr, e_score_correction_bias=bias, **kw)
    (wr * gw).sum().backward()
    torch.testing.assert_close(lo.grad.cpu().double(), lr.grad, rtol=1e-4, atol=1e-6)
    # scores only (weights unused): the weights' grad arrives as None and counts as zeros
    lo.grad = lr.grad = None
    _, _, s = moe_route(lo, e_score_correction_bias=bias.to(device), **kw)
    (s * gs.float().to(device)).sum().backward()
    _, _, sr = ref.route(lr, e_score_correction_bias=bias, **kw)
    (sr * gs).sum().backward()
    torch.testing.assert_close(lo.grad.cpu().double(), lr.grad, rtol=1e-4, atol=1e-6)


def test_route_opcheck(device):
    logits = torch.randn(9, 16, device=device, requires_grad=True)
    bias = torch.randn(16, device=device)
    for args in [(logits, bias, 4, 4, 2, "sigmoid", True, 2.5),
                 (logits, None, 3, 1, 1, "softmax", False, 1.0)]:
        torch.library.opcheck(torch.ops.latentmoe.moe_route.default, args)
    s = torch.rand(9, 16, device=device)
    idx = torch.stack([torch.randperm(16)[:3] for _ in range(9)]).to(device)
    torch.library.opcheck(torch.ops.latentmoe.moe_route_backward.default,
                          (torch.randn(9, 3, device=device), torch.randn(9, 16, device=device),
                           s, idx, "sigmoid", True, 1.0))


def _route_backward_args(device, T=9, E=16, K=3):
    s = torch.rand(T, E, device=device)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(device)
    return torch.randn(T, K, device=device), torch.randn(T, E, device=device), s, idx


@pytest.mark.parametrize("bad", [16, -1, 10**8])
def test_route_backward_rejects_bad_indices(bad):
    # The backward op indexes the scores and its output by `indices`: values outside [0, E) are a
    # ValueError naming it (once a SIGSEGV at 1e8), and score_func must be a known name.
    gw, gs, s, idx = _route_backward_args("cpu")
    idx[4, 1] = bad
    with pytest.raises(ValueError, match="'indices' holds"):
        torch.ops.latentmoe.moe_route_backward.default(gw, gs, s, idx, "sigmoid", True, 1.0)
    with pytest.raises(ValueError, match="score_func"):
        torch.ops.latentmoe.moe_route_backward.default(gw, gs, s, idx.clamp(0, 15), "tanh", True, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("norm", [True, False])
def test_route_backward_cuda_skips_bad_indices(norm):
    # CUDA does not copy the indices to the host to check them: an entry outside [0, E) is
    # skipped (nothing read or written out of bounds), as if that column were not there.
    gw, gs, s, idx = _route_backward_args("cuda")
    bad = idx.clone()
    bad[:, 1] = torch.tensor([16, -1, 10**8] * 3, device="cuda")
    op = torch.ops.latentmoe.moe_route_backward.default
    got = op(gw, gs, s, bad, "sigmoid", norm, 2.0)
    keep = [0, 2]
    want = op(gw[:, keep].contiguous(), gs, s, idx[:, keep].contiguous(), "sigmoid", norm, 2.0)
    torch.testing.assert_close(got, want)


def test_route_compile(device):
    f = torch.compile(lambda l, b: moe_route(l, 2, n_group=2, topk_group=1,
                                             e_score_correction_bias=b), fullgraph=True)
    logits, bias = torch.randn(6, 8, device=device), torch.randn(8, device=device)
    for a, b in zip(f(logits, bias), moe_route(logits, 2, n_group=2, topk_group=1,
                                               e_score_correction_bias=bias)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(top_k=17), "top_k"),                          # k > E
        (dict(top_k=9, n_group=4, topk_group=2), "top_k"),  # k > experts of the kept groups
        (dict(top_k=2, n_group=4, topk_group=5), "topk_group"),
        (dict(top_k=2, n_group=3, topk_group=1), "n_group"),  # 16 % 3 != 0
        (dict(top_k=0), "top_k"),
        (dict(top_k=2, score_func="tanh"), "score_func"),
    ],
)
def test_route_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moe_route(torch.randn(4, 16), **kwargs)


def test_route_bad_tensors():
    with pytest.raises(ValueError, match="logits"):
        moe_route(torch.randn(4, 16).half(), 2)
    with pytest.raises(ValueError, match="logits"):
        moe_route(torch.randn(2, 4, 16), 2)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        moe_route(torch.randn(4, 16), 2, e_score_correction_bias=torch.randn(15))
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        moe_route(torch.randn(4, 16), 2, e_score_correction_bias=torch.randn(16).double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_route_device_mismatch():
    with pytest.raises(RuntimeError, match="e_score_correction_bias"):
        moe_route(torch.randn(4, 16, device="cuda"), 2, e_score_correction_bias=torch.randn(16))


@pytest.mark.parametrize("top_k", [2, 4])
def test_route_non_finite_inputs_stay_in_bounds(device, top_k):
    # A group holding +inf and -inf biased scores sums to NaN (was read as "excluded": with every
    # other group used up the selection indexed expert -1, corrupting memory at top_k=4). Such a
    # group now ranks last; NaN logits rank as -inf. Indices stay in [0, E), distinct.
    logits = torch.zeros(3, 4)
    logits[2, 1] = float("nan")
    bias = torch.tensor([float("inf"), float("-inf"), 0.0, 0.0])
    w, idx, _ = moe_route(logits.to(device), top_k, n_group=2, topk_group=2,
                          e_score_correction_bias=bias.to(device))
    idx = idx.cpu()
    assert ((idx >= 0) & (idx < 4)).all()
    assert all(len(set(row.tolist())) == top_k for row in idx)
    assert idx[0].tolist() == [0, 2, 3, 1][:top_k]  # +inf first, -inf last, ties to the lower index


@pytest.mark.parametrize("E", [64, 256, 1000])
def test_softmax_scores_accuracy(device, E):
    # The softmax denominator is a tree sum (math::tree_sum), shared with the CUDA kernels: the
    # scores stay as close to fp64 as torch.softmax's. A running sum over 256 exps was ~1e-6 off.
    x = torch.randn(2048, E, generator=torch.Generator().manual_seed(E)) * 0.1
    _, _, s = moe_route(x.to(device), 4, score_func="softmax", norm_topk_prob=False)
    exact = torch.softmax(x.double(), -1)
    err = ((s.cpu().double() - exact).abs() / exact).max().item()
    assert err <= 4e-7


@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_nan_bias_reaches_the_weights(device, groups):
    # A NaN selection bias (a corrupted parameter) was read as "exclude this expert": finite outputs
    # routed around it, where HF's topk sends every token to it. Both hide the NaN; it now makes
    # every token's weights NaN, as a NaN score does, with the picks in range and distinct.
    logits = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(16, generator=torch.Generator().manual_seed(2)) * 0.1
    bias[5] = float("nan")
    n_group, topk_group = groups
    w, idx, s = moe_route(logits.to(device), 4, n_group=n_group, topk_group=topk_group,
                          e_score_correction_bias=bias.to(device))
    w, idx = w.cpu(), idx.cpu()
    assert torch.isnan(w).all()
    assert not torch.isnan(s.cpu()).any()  # the scores are unbiased
    assert ((idx >= 0) & (idx < 16)).all() and all(len(set(r.tolist())) == 4 for r in idx)
    assert not (idx == 5).any()


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("norm", [True, False])
def test_nan_score_reaches_the_weights(device, score_func, norm):
    # A NaN logit (e.g. a NaN row of the router weight) must not be hidden: HF's topk picks the NaN
    # expert, so the token's output is NaN. Here the picks stay among the finite scores (in range,
    # deterministic) and every weight of that token is NaN; other tokens are untouched.
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    logits[1, 5] = float("nan")
    w, idx, _ = moe_route(logits.to(device), 2, n_group=2, topk_group=1, score_func=score_func,
                          norm_topk_prob=norm)
    w, idx = w.cpu(), idx.cpu()
    assert torch.isnan(w[1]).all()
    assert not torch.isnan(w[[0, 2, 3]]).any()
    assert ((idx >= 0) & (idx < 8)).all() and len(set(idx[1].tolist())) == 2
    want_w, want_idx, _ = moe_route(logits[[0, 2, 3]].to(device), 2, n_group=2, topk_group=1,
                                    score_func=score_func, norm_topk_prob=norm)
    assert torch.equal(w[[0, 2, 3]], want_w.cpu()) and torch.equal(idx[[0, 2, 3]], want_idx.cpu())
