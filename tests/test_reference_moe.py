"""latentmoe.reference.moe against HF DeepseekV3MoE / DeepseekV3TopkRouter / DeepseekV2TopkRouter."""

import pytest
import torch
from moe_helpers import CONFIGS, hf_moe, hf_v2_router, rel_err, sort_by_index

from latentmoe.reference import moe as ref


def _route_args(moe):
    g = moe.gate
    return dict(
        top_k=g.top_k, n_group=g.num_group, topk_group=g.topk_group,
        e_score_correction_bias=g.e_score_correction_bias, norm_topk_prob=g.norm_topk_prob,
        routed_scaling_factor=g.routed_scaling_factor,
    )


def _ref_forward(moe, x):
    sd = moe.state_dict()
    shared = (sd["shared_experts.gate_proj.weight"], sd["shared_experts.up_proj.weight"],
              sd["shared_experts.down_proj.weight"])
    return ref.moe_forward(x, sd["gate.weight"], sd["experts.gate_up_proj"], sd["experts.down_proj"],
                           shared, **_route_args(moe))


def _brute_route(scores, bias, top_k, n_group, topk_group):
    """Loop version of the selection rule with explicit (-value, index) sort keys."""
    T, E = scores.shape
    gs = E // n_group
    out = []
    for t in range(T):
        c = [(scores[t, e] + bias[e]).item() for e in range(E)]
        groups = []
        for g in range(n_group):
            vals = sorted(c[g * gs:(g + 1) * gs], reverse=True)
            groups.append((-(vals[0] + vals[1]) if gs > 1 else -vals[0], g))
        kept = {g for _, g in sorted(groups)[:topk_group]} if n_group > 1 else set(range(n_group))
        cand = sorted((-c[e], e) for e in range(E) if e // gs in kept)
        out.append([e for _, e in cand[:top_k]])
    return torch.tensor(out)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("T", [1, 29])
def test_route_matches_hf_router(name, T):
    moe = hf_moe(name)
    x = torch.randn(T, CONFIGS[name]["hidden_size"])
    logits_hf, w_hf, i_hf = moe.gate(x)
    logits = ref.router_logits(x, moe.gate.weight)
    torch.testing.assert_close(logits, logits_hf, rtol=0, atol=0)
    w, i, scores = ref.route(logits, **_route_args(moe))
    torch.testing.assert_close(scores, logits_hf.sigmoid())
    w_hf, i_hf = sort_by_index(w_hf, i_hf)
    w_s, i_s = sort_by_index(w, i)
    assert torch.equal(i_s, i_hf)
    assert rel_err(w_s, w_hf) <= 1e-6
    # Our order: descending biased score.
    choice = (scores + moe.gate.e_score_correction_bias).gather(1, i)
    assert (choice[:, :-1] >= choice[:, 1:]).all()


@pytest.mark.parametrize("T", [1, 33])
def test_softmax_route_matches_hf_v2_router(T):
    router = hf_v2_router(num_experts=10, top_k=3, hidden=24, scale=1.3)
    x = torch.randn(T, 24)
    logits_hf, w_hf, i_hf = router(x)
    w, i, scores = ref.route(ref.router_logits(x, router.weight), 3, score_func="softmax",
                             norm_topk_prob=False, routed_scaling_factor=1.3)
    w_hf, i_hf = sort_by_index(w_hf, i_hf)
    w, i = sort_by_index(w, i)
    assert torch.equal(i, i_hf)
    assert rel_err(w, w_hf) <= 1e-6
    torch.testing.assert_close(scores.sum(-1), torch.ones(T))


def test_softmax_norm_weights_sum_to_scale():
    logits = torch.randn(17, 12)
    w, i, s = ref.route(logits, 4, n_group=3, topk_group=2, score_func="softmax",
                        routed_scaling_factor=2.0)
    torch.testing.assert_close(w.sum(-1), torch.full((17,), 2.0))
    torch.testing.assert_close(w, 2.0 * s.gather(1, i) / s.gather(1, i).sum(-1, keepdim=True))


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (4, 1)])
def test_route_ties_lower_index(n_group, topk_group):
    # Logits drawn from 3 values: many exact ties in scores, group scores and at the top-k cut.
    logits = torch.randint(0, 3, (40, 16)).float()
    bias = torch.zeros(16)
    bias[::5] = 0.25  # ties of biased scores across distinct logits too
    w, i, s = ref.route(logits, 3, n_group=n_group, topk_group=topk_group,
                        e_score_correction_bias=bias)
    assert torch.equal(i, _brute_route(s, bias, 3, n_group, topk_group))


def test_route_all_equal_picks_first_experts():
    w, i, _ = ref.route(torch.full((3, 8), 0.7), 3, n_group=2, topk_group=1)
    assert torch.equal(i, torch.tensor([[0, 1, 2]] * 3))
    torch.testing.assert_close(w, torch.full((3, 3), 1 / 3))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("T", [1, 2, 31])
def test_moe_forward_matches_hf(name, T):
    moe = hf_moe(name)
    x = torch.randn(T, CONFIGS[name]["hidden_size"])
    assert rel_err(_ref_forward(moe, x), moe(x)) <= 1e-5


def test_moe_forward_3d_input_and_bf16():
    moe = hf_moe("v3")
    x = torch.randn(2, 7, 40)
    assert rel_err(_ref_forward(moe, x), moe(x)) <= 1e-5
    moe16 = hf_moe("v3", dtype=torch.bfloat16)
    xb = x.bfloat16()
    # Both run their GEMMs in bf16; compare with a bf16-appropriate tolerance.
    assert rel_err(_ref_forward(moe16, xb), moe16(xb)) <= 3e-2


def test_all_tokens_one_expert_and_idle_experts():
    moe = hf_moe("no_norm")
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[5] = 0.0
        moe.gate.e_score_correction_bias.zero_()
        moe.gate.e_score_correction_bias[5] = 1.0
        moe.gate.e_score_correction_bias[2] = 0.5
    x = torch.randn(9, 32)
    _, _, i = moe.gate(x)
    assert set(i.flatten().tolist()) == {2, 5}  # six experts idle, every token on expert 5
    assert rel_err(_ref_forward(moe, x), moe(x)) <= 1e-5


def test_gradients_match_hf():
    moe = hf_moe("v3").double()
    x = torch.randn(11, 40, dtype=torch.float64, requires_grad=True)
    g = torch.randn(11, 40, dtype=torch.float64)
    (moe(x) * g).sum().backward()
    hf_grads = [x.grad.clone()] + [p.grad.clone() for p in moe.parameters()]
    x.grad = None
    params = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in moe.named_parameters()}
    sd = dict(moe.state_dict())
    sd.update(params)
    shared = tuple(sd[f"shared_experts.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
    out = ref.moe_forward(x, sd["gate.weight"], sd["experts.gate_up_proj"], sd["experts.down_proj"],
                          shared, **_route_args(moe))
    (out * g).sum().backward()
    ours = [x.grad] + [params[k].grad for k, _ in moe.named_parameters()]
    for a, b in zip(ours, hf_grads):
        assert rel_err(a, b) <= 1e-6  # the router runs in fp32 (as HF)


def test_aux_losses():
    E, k = 8, 2
    # Perfect balance: uniform scores and every expert chosen equally -> loss == alpha.
    scores = torch.full((8, E), 0.5)
    indices = torch.arange(16).reshape(8, 2) % E
    torch.testing.assert_close(ref.aux_loss_expert(scores, indices, E, 0.01), torch.tensor(0.01))
    # Explicit formula with loops.
    scores = torch.rand(12, E)
    indices = torch.stack([torch.randperm(E)[:k] for _ in range(12)])
    f = [sum(int(e in row) for row in indices.tolist()) / (12 * k) for e in range(E)]
    p = [(scores[:, e] / scores.sum(-1)).mean().item() for e in range(E)]
    want = 0.1 * E * sum(a * b for a, b in zip(f, p))
    assert abs(ref.aux_loss_expert(scores, indices, E, 0.1).item() - want) < 1e-6
    # Sequence-wise: mean of per-sequence losses; one sequence equals the expert-level loss.
    seq = ref.aux_loss_sequence(scores, indices, E, 0.1, batch_size=3)
    per = [ref.aux_loss_expert(scores[4 * b:4 * b + 4], indices[4 * b:4 * b + 4], E, 0.1)
           for b in range(3)]
    torch.testing.assert_close(seq, torch.stack(per).mean())
    torch.testing.assert_close(ref.aux_loss_sequence(scores, indices, E, 0.1, 1),
                               ref.aux_loss_expert(scores, indices, E, 0.1))
    # Differentiable in the scores.
    s = scores.clone().requires_grad_()
    ref.aux_loss_expert(s, indices, E, 0.1).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_update_bias_and_load():
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    load = ref.expert_load(indices, 5)
    assert load.tolist() == [4, 2, 1, 1, 0]
    bias = torch.randn(5)
    new = ref.update_bias(bias, load, 0.001)
    torch.testing.assert_close(new - bias, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]) * 0.001)  # mean 1.6


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(top_k=9), "top_k"),
        (dict(top_k=2, n_group=3), "n_group"),
        (dict(top_k=2, n_group=2, topk_group=3), "topk_group"),
        (dict(top_k=2, score_func="relu"), "score_func"),
    ],
)
def test_route_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ref.route(torch.randn(3, 8), **kwargs)


def test_swiglu_experts_fp64_sum_stays_fp64():
    # The weighted sum was accumulated in fp32 for every dtype (7e-8 off an fp64 loop): fp64 inputs
    # now accumulate in fp64.
    g = torch.Generator().manual_seed(0)
    T, E, K, H, I = 9, 5, 3, 16, 12
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    gu = torch.randn(E, 2 * I, H, generator=g, dtype=torch.float64)
    down = torch.randn(E, H, I, generator=g, dtype=torch.float64)
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    want = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(K):
            e = int(idx[t, j])
            gate, up = (gu[e] @ x[t]).chunk(2)
            want[t] += w[t, j] * (down[e] @ (torch.nn.functional.silu(gate) * up))
    got = ref.swiglu_experts(x, gu, down, w, idx)
    assert got.dtype == torch.float64 and rel_err(got, want) <= 1e-13
