"""latentmoe.nn.MoE against HF DeepseekV3MoE, and the "latentmoe" HF experts implementation."""

from unittest import mock

import pytest
import torch
from moe_helpers import CONFIGS, hf_config, hf_moe, rel_err

import latentmoe.hf
from latentmoe.nn import MoE, no_load_counting
from latentmoe.reference import moe as ref


def _pair(name, dtype=torch.float32, device="cpu", **kw):
    theirs = hf_moe(name, dtype)
    ours = MoE(hf_config(name), **kw).to(dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.to(device), theirs


def test_state_dict_identical_to_hf():
    for name in CONFIGS:
        theirs = hf_moe(name)
        ours = MoE(hf_config(name))
        a, b = ours.state_dict(), theirs.state_dict()
        assert list(a) == list(b)
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}
        theirs.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (3, 11)])
def test_forward_matches_hf(device, name, shape):
    ours, theirs = _pair(name, device=device)
    x = torch.randn(*shape, CONFIGS[name]["hidden_size"])
    assert rel_err(ours(x.to(device)).cpu(), theirs(x)) <= 1e-4


def test_forward_softmax_scoring_matches_reference(device):
    ours, theirs = _pair("v3", device=device, score_func="softmax")
    x = torch.randn(27, 40)
    sd = theirs.state_dict()
    want = ref.moe_forward(
        x.double(), sd["gate.weight"].double(), sd["experts.gate_up_proj"].double(),
        sd["experts.down_proj"].double(),
        tuple(sd[f"shared_experts.{n}.weight"].double() for n in ("gate_proj", "up_proj", "down_proj")),
        top_k=4, n_group=4, topk_group=2, e_score_correction_bias=sd["gate.e_score_correction_bias"],
        score_func="softmax", norm_topk_prob=True, routed_scaling_factor=2.5,
    )
    assert rel_err(ours(x.to(device)).cpu(), want) <= 1e-4


def test_one_expert_for_all_tokens_and_idle_experts(device):
    ours, theirs = _pair("no_norm")
    with torch.no_grad():
        for m in (ours, theirs):
            m.gate.weight.zero_()
            m.gate.e_score_correction_bias.zero_()
            m.gate.e_score_correction_bias[5] = 1.0
            m.gate.e_score_correction_bias[2] = 0.5
    ours.to(device)
    x = torch.randn(13, 32)
    assert rel_err(ours(x.to(device)).cpu(), theirs(x)) <= 1e-4
    assert ours.last_load.cpu().tolist() == [0, 0, 13, 0, 0, 13, 0, 0]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_match_hf(device, name):
    ours, theirs = _pair(name, device=device)
    h = CONFIGS[name]["hidden_size"]
    x = torch.randn(2, 9, h)
    g = torch.randn(2, 9, h)
    xh = x.clone().requires_grad_()
    (theirs(xh) * g).sum().backward()
    xo = x.to(device).requires_grad_()
    (ours(xo) * g.to(device)).sum().backward()
    assert rel_err(xo.grad.cpu(), xh.grad) <= 1e-4
    theirs_p = dict(theirs.named_parameters())
    for k, p in ours.named_parameters():
        # Relative to the gradient's size, but no finer than 1e-6 absolute: with top-1 and
        # norm_topk_prob the router's weight is s / (s + 1e-20) = 1, and its exact gradient (about
        # 1e-20) comes out of either implementation as fp32 rounding noise of about 1e-7.
        want = theirs_p[k].grad
        err = (p.grad.cpu() - want).abs().max().item()
        assert err <= 1e-4 * max(want.abs().max().item(), 1e-2), (k, err)


def test_bf16_forward(device):
    ours, theirs = _pair("v3", torch.bfloat16, device=device)
    x = torch.randn(37, 40)
    want = theirs.float()(x).double()  # same bf16-rounded weights, run in fp32
    hf_err = (theirs.bfloat16()(x.bfloat16()).double() - want).abs().max().item()
    err = (ours(x.bfloat16().to(device)).cpu().double() - want).abs().max().item()
    assert err <= 2 * hf_err + 1e-2, (err, hf_err)


def test_deterministic(device):
    ours, _ = _pair("v3", torch.bfloat16, device=device)
    x = torch.randn(64, 40, dtype=torch.bfloat16, device=device)
    assert torch.equal(ours(x), ours(x))


@pytest.mark.parametrize("seq_aux", [False, True])
def test_aux_loss(seq_aux):
    ours, theirs = _pair("v3", aux_loss_alpha=0.01, seq_aux=seq_aux)
    x = torch.randn(3, 10, 40)
    ours.eval()
    ours(x)
    assert ours.aux_loss is None
    ours.train()
    ours(x)
    w = theirs.gate.weight.detach().clone().requires_grad_()
    _, idx, scores = ref.route(ref.router_logits(x, w), 4, n_group=4, topk_group=2,
                               e_score_correction_bias=theirs.gate.e_score_correction_bias,
                               routed_scaling_factor=2.5)
    want = (ref.aux_loss_sequence(scores, idx, 16, 0.01, 3) if seq_aux
            else ref.aux_loss_expert(scores, idx, 16, 0.01))
    assert abs(ours.aux_loss.item() - want.item()) <= 1e-6
    want.backward()
    ours.aux_loss.backward()
    assert rel_err(ours.gate.weight.grad, w.grad) <= 1e-4


def test_seq_aux_input_ranks():
    ours, theirs = _pair("v3", aux_loss_alpha=0.01, seq_aux=True)
    ours.train()
    x = torch.randn(10, 40)  # [T, hidden]: one sequence
    ours(x)
    w = theirs.gate.weight.detach()
    _, idx, scores = ref.route(ref.router_logits(x, w), 4, n_group=4, topk_group=2,
                               e_score_correction_bias=theirs.gate.e_score_correction_bias,
                               routed_scaling_factor=2.5)
    want = ref.aux_loss_sequence(scores, idx, 16, 0.01, 1)
    assert abs(ours.aux_loss.item() - want.item()) <= 1e-6
    with pytest.raises(ValueError, match="seq_aux"):
        ours(torch.randn(2, 3, 4, 40))  # which dim holds the sequences is ambiguous


def test_load_counts_and_update_bias():
    ours, _ = _pair("v3")
    x1, x2 = torch.randn(20, 40), torch.randn(7, 40)
    ours(x1)
    l1 = ours.last_load.clone()
    ours(x2)
    _, idx, _ = ours.route(x2)
    assert torch.equal(ours.last_load, ref.expert_load(idx, 16))
    assert torch.equal(ours.load_counts, l1 + ours.last_load)
    assert ours.load_counts.sum().item() == 27 * 4
    bias0 = ours.gate.e_score_correction_bias.clone()
    want = ref.update_bias(bias0, l1 + ours.last_load, 0.01)
    ours.update_bias(gamma=0.01)
    torch.testing.assert_close(ours.gate.e_score_correction_bias, want)
    assert ours.load_counts.sum().item() == 0
    load = torch.arange(16)
    ours.update_bias(load)
    torch.testing.assert_close(ours.gate.e_score_correction_bias, ref.update_bias(want, load, 0.001))


def test_reentrant_checkpointing_of_a_layer_counts_loads():
    # HF checkpoints whole decoder layers: with use_reentrant=True the first run is under no_grad
    # and the MoE's input (a norm's output) does not require grad there. A rule "count only with
    # grad mode on or inputs requiring grad" counted nothing and left aux_loss None.
    from torch.utils.checkpoint import checkpoint

    ours, _ = _pair("v3", aux_loss_alpha=0.01)
    ours.train()
    norm = torch.nn.LayerNorm(40)
    x = torch.randn(2, 5, 40, requires_grad=True)
    out = checkpoint(lambda h: h + ours(norm(h)), x, use_reentrant=True)
    aux = ours.aux_loss
    (out.sum() + aux).backward()
    assert int(ours.load_counts.sum()) == 2 * 5 * 4 and aux is not None
    assert ours.aux_loss is aux


def test_balancing_settings_are_checked():
    for kw in ({"aux_loss_alpha": -0.01}, {"aux_loss_alpha": float("nan")}, {"bias_update_speed": -1e-3},
               {"bias_update_speed": float("inf")}):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=f"'{name}' must be finite and >= 0"):
            _pair("v3", **kw)
    ours, _ = _pair("v3")
    ours(torch.randn(5, 40))
    counts, bias = ours.load_counts.clone(), ours.gate.e_score_correction_bias.clone()
    for gamma in (-1e-3, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="'gamma' must be finite and >= 0"):
            ours.update_bias(gamma=gamma)
    load = torch.ones(16)
    load[3] = float("nan")
    with pytest.raises(ValueError, match="'load' holds NaN or inf"):
        ours.update_bias(load)
    # Nothing changed by the refused calls (the counts were not reset).
    assert torch.equal(ours.load_counts, counts) and torch.equal(ours.gate.e_score_correction_bias, bias)


def test_update_bias_compares_large_counts_exactly():
    # Counts above 2^24 (global counts, long accumulations) were compared in fp32: 2^24 + 1 rounded
    # to the mean, and that expert got no step.
    ours, _ = _pair("v3")
    load = torch.full((16,), 2**24, dtype=torch.int64)
    load[0], load[1] = 2**24 + 1, 2**24 - 1
    bias0 = ours.gate.e_score_correction_bias.clone()
    ours.update_bias(load, gamma=1.0)
    step = torch.zeros(16)
    step[0], step[1] = -1.0, 1.0
    assert torch.equal(ours.gate.e_score_correction_bias, bias0 + step)


def test_rejects_non_silu():
    cfg = hf_config("v3")
    cfg.hidden_act = "gelu"
    with pytest.raises(ValueError, match="silu"):
        MoE(cfg)


def _tiny_causal_lm(impl):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=None,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_shared_experts=1,
    )
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM._from_config(cfg, experts_implementation=impl)


def test_hf_experts_interface():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert "latentmoe" in ALL_EXPERTS_FUNCTIONS
    model = _tiny_causal_lm("latentmoe")
    assert model.config._experts_implementation == "latentmoe"
    ids = torch.randint(0, 97, (2, 9))
    with mock.patch.object(latentmoe.hf, "moe_experts", wraps=latentmoe.hf.moe_experts) as spy:
        ours = model(ids).logits
    assert spy.call_count == 1  # one MoE layer
    ours.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_experts_implementation("eager")
    eager = model(ids).logits
    eager.sum().backward()
    assert rel_err(ours, eager) <= 1e-4
    for k, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().max() > 0:
            assert rel_err(grads[k], p.grad) <= 1e-3, k
    # Setting it on the config of an existing model works too.
    model.config._experts_implementation = "latentmoe"
    with mock.patch.object(latentmoe.hf, "moe_experts", wraps=latentmoe.hf.moe_experts) as spy:
        torch.testing.assert_close(model(ids).logits, ours)
    assert spy.call_count == 1


def _custom_gate(self, gate_up_out):
    gate, up = gate_up_out.chunk(2, dim=-1)
    return (up + 1) * gate * torch.sigmoid(1.702 * gate)  # a clamped-style SwiGLU variant


@pytest.mark.parametrize("what", ["has_bias", "is_transposed", "is_concatenated", "has_gate",
                                  "has_post_expert_norm", "_is_expert_parallel", "act_fn",
                                  "_apply_gate"])
def test_hf_experts_interface_refuses_what_it_does_not_compute(what):
    # Each layout or function the kernel does not implement raises, never a silently different
    # result: the decorator's flags, HF's expert parallelism, another activation, and a class's
    # own gate (as transformers' MiniMax-M3 experts define).
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    cfg = hf_config("v3")
    cls = DeepseekV3Experts
    if what == "_apply_gate":
        cls = type("GatedExperts", (DeepseekV3Experts,), {"_apply_gate": _custom_gate})
    experts = cls(cfg)
    experts.config._experts_implementation = "latentmoe"
    if what == "act_fn":
        experts.act_fn = torch.nn.GELU()
    elif what in ("is_concatenated", "has_gate"):
        setattr(experts, what, False)
    elif what != "_apply_gate":
        setattr(experts, what, True)
    x = torch.randn(4, cfg.hidden_size)
    idx = torch.randint(0, cfg.n_routed_experts, (4, cfg.num_experts_per_tok))
    w = torch.rand(4, cfg.num_experts_per_tok)
    with pytest.raises(NotImplementedError, match="latentmoe experts implementation does not support"):
        experts(x, idx, w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_forward_captures_in_cuda_graph():
    # The module's forward makes no host copy (router indices go unchecked, loads are counted
    # without bincount), so a CUDA graph captures it; replays match eager calls.
    ours, _ = _pair("v3", device="cuda")
    ours.eval()
    xs = [torch.randn(3, 5, 40, device="cuda") for _ in range(3)]
    with torch.no_grad():
        want = [ours(x) for x in xs]
        x_in = xs[0].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            ours(x_in)  # warm-up outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                got = ours(x_in)
        torch.cuda.current_stream().wait_stream(stream)
        for x, w in zip(xs, want):
            x_in.copy_(x)
            graph.replay()
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_training():
    # The module traces whole (no graph breaks): forward, aux loss and gradients as in eager.
    torch._dynamo.reset()
    ours, _ = _pair("v3", aux_loss_alpha=0.01, seq_aux=True)
    ours.train()
    x = torch.randn(3, 7, 40)
    grads = []
    for fn in (ours, torch.compile(ours, fullgraph=True, backend="aot_eager")):
        ours.zero_grad()
        xg = x.clone().requires_grad_()
        out = fn(xg)
        (out.square().sum() + ours.aux_loss).backward()
        grads.append((out.detach(), ours.aux_loss.detach(), xg.grad, ours.gate.weight.grad.clone(),
                      ours.experts.gate_up_proj.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bias_stays_fp32_and_updates_in_bf16():
    # update_bias moves the selection bias by gamma = 1e-3: representable in fp32, lost in bf16
    # once |bias| > 0.25. The bias stays fp32 through .to(bfloat16) (as HF's from_pretrained keeps it).
    ours, _ = _pair("v3")
    ours = ours.to(torch.bfloat16)
    bias = ours.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and ours.experts.gate_up_proj.dtype == torch.bfloat16
    with torch.no_grad():
        bias.fill_(1.0)
    ours(torch.randn(7, 40, dtype=torch.bfloat16))
    ours.update_bias()
    assert (ours.gate.e_score_correction_bias != 1.0).all()


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_keeps_figures(reentrant):
    # The recomputation in backward must not count loads twice or replace aux_loss; with
    # non-reentrant checkpointing the router's gradient (aux loss included) matches no checkpointing.
    from torch.utils.checkpoint import checkpoint

    ours, _ = _pair("v3", aux_loss_alpha=0.01)
    ours.train()
    x = torch.randn(2, 7, 40)

    def step(use_ckpt):
        ours.zero_grad()
        ours.load_counts.zero_()
        xi = x.clone().requires_grad_()
        out = checkpoint(ours, xi, use_reentrant=reentrant) if use_ckpt else ours(xi)
        aux = ours.aux_loss
        (out.sum() + aux).backward()
        assert ours.aux_loss is aux
        return ours.load_counts.clone(), ours.gate.weight.grad.clone(), aux

    counts, grad, _ = step(False)
    counts_ck, grad_ck, aux_ck = step(True)
    assert torch.equal(counts_ck, counts) and int(counts.sum()) == 2 * 7 * 4
    if not reentrant:
        assert aux_ck.requires_grad
        torch.testing.assert_close(grad_ck, grad)
    else:  # documented: reentrant checkpointing runs the forward without autograd
        assert not aux_ck.requires_grad


def test_cast_keeps_bias_values():
    # .to(bf16) / .half() keep the bias fp32 *and* its values (not cast down and back up).
    ours, _ = _pair("v3")
    with torch.no_grad():
        ours.gate.e_score_correction_bias.copy_(1.0 + 2e-4 * torch.arange(ours.num_experts))
    want = ours.gate.e_score_correction_bias.clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(ours)
        assert torch.equal(ours.gate.e_score_correction_bias, want)


def test_autocast_bf16():
    # The router runs in fp32 under autocast (moe_route takes fp32 logits); the routed experts in
    # their weights' dtype; the shared experts follow autocast. HF gives the same up to bf16.
    ours, theirs = _pair("v3")
    x = torch.randn(3, 11, CONFIGS["v3"]["hidden_size"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = theirs(x)
        got = ours(x)
        got_bf16_in = ours(x.bfloat16())  # activations in bf16, weights fp32
    assert got.dtype == want.dtype == torch.float32
    assert rel_err(got, want) <= 3e-2
    # The routed experts' part exactly as without autocast (fp32 router and experts): only the
    # shared experts change.
    shared = ours.shared_experts
    ours.shared_experts = None
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            routed_ac = ours(x)
        routed = ours(x)
    finally:
        ours.shared_experts = shared
    assert rel_err(routed_ac, routed) <= 1e-6
    assert got_bf16_in.dtype == torch.bfloat16 and rel_err(got_bf16_in.float(), want) <= 5e-2
    ours.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours(x).float().square().sum().backward()
    assert ours.gate.weight.grad is not None and ours.experts.gate_up_proj.grad is not None


def test_deepcopy_and_pickle_after_training_forward():
    # aux_loss belongs to the step's autograd graph: copies take its value (an EMA / eval copy).
    import copy
    import io

    ours = MoE(hf_config("v3"), aux_loss_alpha=0.01).train()
    ours(torch.randn(2, 5, CONFIGS["v3"]["hidden_size"]))
    assert ours.aux_loss.requires_grad
    twin = copy.deepcopy(ours)
    assert torch.equal(twin.aux_loss, ours.aux_loss.detach()) and not twin.aux_loss.requires_grad
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded.experts.down_proj, ours.experts.down_proj)
    assert ours.aux_loss.requires_grad  # the original keeps its graph


def test_to_empty_off_meta_restarts_the_counts():
    # to_empty on a materialised module gave load_counts uninitialised storage (only a meta
    # module's counts were zeroed); it is not in the state_dict, so update_bias then moved the
    # bias by garbage. Moves and casts keep the counts.
    torch.manual_seed(0)
    ours = MoE(hf_config("v3")).train()
    ours(torch.randn(16, CONFIGS["v3"]["hidden_size"]))
    counts = ours.load_counts.clone()
    assert int(counts.sum()) == 16 * ours.top_k
    ours.to("cpu").double().float()
    assert torch.equal(ours.load_counts, counts)
    for _ in range(3):
        ours.to_empty(device="cpu")
        assert torch.equal(ours.load_counts, torch.zeros_like(counts))


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_meta_init_then_load(assign, compiled):
    # Big-model loading: build on the meta device, then to_empty + load_state_dict, or
    # load_state_dict(assign=True). load_counts (not in the state_dict) must start from zeros.
    theirs = hf_moe("v3")
    with torch.device("meta"):
        ours = MoE(hf_config("v3"))
    if assign:
        ours.load_state_dict(theirs.state_dict(), assign=True)
    else:
        ours.to_empty(device="cpu")
        ours.load_state_dict(theirs.state_dict())
        assert torch.equal(ours.load_counts, torch.zeros_like(ours.load_counts))
    x = torch.randn(9, CONFIGS["v3"]["hidden_size"])
    # Compiled: the meta counts are replaced in the graph too (they were repaired in eager
    # forwards only, and the compiled first forward failed on a meta / cpu mismatch).
    fwd = torch.compile(ours, fullgraph=True, backend="aot_eager") if compiled else ours
    assert rel_err(fwd(x), theirs(x)) <= 1e-4
    assert ours.load_counts.device.type == "cpu"
    assert int(ours.load_counts.sum()) == 9 * ours.top_k
    assert torch.equal(ours.load_counts, ours.last_load)


def test_assign_load_of_a_bf16_state_dict_keeps_the_bias_fp32():
    # assign=True puts the state dict's own tensors in place; the bias comes back to fp32 (as
    # .to(bf16) keeps it) so update_bias's small steps still register.
    sd = {k: v.to(torch.bfloat16) for k, v in MoE(hf_config("v3")).state_dict().items()}
    with torch.device("meta"):
        ours = MoE(hf_config("v3"))
    ours.load_state_dict(sd, assign=True)
    bias = ours.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, sd["gate.e_score_correction_bias"].float())
    assert ours.experts.gate_up_proj.dtype == torch.bfloat16  # the rest as given


@pytest.mark.parametrize("field, value", [("moe_intermediate_size", 0), ("hidden_size", -1),
                                          ("n_routed_experts", 0)])
def test_bad_sizes_in_the_config_are_named(field, value):
    cfg = hf_config("v3")
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=f"MoE: config.{field} must be an int >= 1"):
        MoE(cfg)


def test_empty_batch_aux_loss_is_zero():
    ours = MoE(hf_config("v3"), aux_loss_alpha=0.01).train()
    for seq_aux in (False, True):
        ours.seq_aux = seq_aux
        out = ours(torch.randn(0, CONFIGS["v3"]["hidden_size"]))
        assert out.shape == (0, CONFIGS["v3"]["hidden_size"])
        assert ours.aux_loss.item() == 0.0


def test_float64_is_refused_up_front():
    ours = MoE(hf_config("v3")).double()
    with pytest.raises(ValueError, match="MoE: 'hidden_states' must be float32"):
        ours(torch.randn(3, CONFIGS["v3"]["hidden_size"], dtype=torch.float64))


@pytest.mark.parametrize("shared", [0, 2])
def test_wrong_hidden_size_is_refused(shared):
    # [8, H/2] has as many values as [4, H]: the reshape to [-1, H] ran on garbage "tokens" (no
    # shared experts) or failed in linear_small naming its 'weight' (with them).
    cfg = hf_config("v3")
    cfg.n_shared_experts = shared
    ours, H = MoE(cfg), cfg.hidden_size
    for x in (torch.randn(8, H // 2), torch.randn(3, H + 1), torch.randn(())):
        with pytest.raises(ValueError, match=rf"MoE: 'hidden_states' must be \[\.\.\., hidden_size={H}\]"):
            ours(x)


def test_offloaded_weights_like_accelerate():
    # accelerate's offloading: weights on meta, brought in by each module's patched forward. The
    # router, experts and shared experts must each be called as modules.
    from test_mla_common import offload_like_accelerate

    ours, theirs = _pair("v3")
    offload_like_accelerate(ours)
    assert ours.gate.weight.is_meta and ours.experts.gate_up_proj.is_meta
    for shape in [(1, 1), (3, 11)]:
        x = torch.randn(*shape, CONFIGS["v3"]["hidden_size"])
        with torch.no_grad():
            assert rel_err(ours(x), theirs(x)) <= 1e-4


def test_load_counts_are_a_normal_tensor_under_inference_mode():
    # Built, moved or first run (after a meta init) under torch.inference_mode(): the counts stay
    # a normal tensor, so a training forward outside it (compiled too: a compiled forward cannot
    # test for inference tensors) can count into them in place.
    with torch.inference_mode():
        ours = MoE(hf_config("v3"))
        assert not ours.load_counts.is_inference()
        ours.to(torch.float32)
        assert not ours.load_counts.is_inference()
    ours.load_counts.add_(1)
    sd = MoE(hf_config("v3")).state_dict()
    with torch.device("meta"):
        ours = MoE(hf_config("v3"))
    ours.load_state_dict(sd, assign=True)
    x = torch.randn(3, CONFIGS["v3"]["hidden_size"])
    ours.eval()
    with torch.inference_mode():
        ours(x)  # the meta counts are replaced here
    assert not ours.load_counts.is_inference()
    ours.train()
    with torch.no_grad():
        torch.compile(ours, backend="eager")(x)
    assert int(ours.load_counts.sum()) == 3 * ours.top_k


def test_made_under_inference_mode_runs_outside_it():
    # Built (or loaded) under torch.inference_mode(), then run under no_grad (what generate does):
    # the in-place load counting and update_bias must not hit inference tensors.
    with torch.inference_mode():
        ours, theirs = _pair("v3")
        ours.eval()
    x = torch.randn(5, CONFIGS["v3"]["hidden_size"])
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x)) <= 1e-4
        ours.train()  # (eval forwards do not count)
        ours(x)
        ours(x)
    assert int(ours.load_counts.sum()) == 2 * 5 * ours.top_k
    ours.update_bias()
    assert int(ours.load_counts.sum()) == 0
    assert (ours.gate.e_score_correction_bias != theirs.gate.e_score_correction_bias).any()


def _experts_module(act_fn=None):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    cfg = hf_config("v3")
    experts = DeepseekV3Experts(cfg)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.2)
    if act_fn is not None:
        del experts.act_fn  # (a registered module: a plain function can't replace it in place)
        experts.act_fn = act_fn
    x = torch.randn(9, cfg.hidden_size)
    idx = torch.randint(0, cfg.n_routed_experts, (9, cfg.num_experts_per_tok))
    w = torch.rand(9, cfg.num_experts_per_tok)
    return cfg, experts, x, idx, w


@pytest.mark.parametrize("act", ["functional", "module"])
def test_hf_experts_interface_accepts_plain_silu_forms(act):
    # act_fn as torch.nn.functional.silu (transformers' Lfm2-MoE experts) or an nn.SiLU module is
    # SwiGLU the kernel computes: it must run, not be refused as "another activation".
    import torch.nn.functional as F

    cfg, experts, x, idx, w = _experts_module(F.silu if act == "functional" else torch.nn.SiLU())
    cfg._experts_implementation = "eager"
    want = experts(x, idx, w)
    cfg._experts_implementation = "latentmoe"
    assert rel_err(experts(x, idx, w), want) <= 1e-5


def test_hf_experts_interface_autocast_mixed_dtypes():
    # fp32 weights, bf16 activations under autocast: computed in the weights' dtype and returned in
    # the activations' (as transformers' grouped_mm), not a dtype error from the kernel.
    cfg, experts, x, idx, w = _experts_module()
    cfg._experts_implementation = "eager"
    want = experts(x, idx, w)
    cfg._experts_implementation = "latentmoe"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = experts(x.bfloat16(), idx, w)
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), want) <= 2e-2


def test_hf_experts_interface_autocast_whole_moe():
    # A whole HF DeepseekV3MoE under autocast with fp32 weights (the usual mixed-precision setup):
    # HF's router gives bf16 routing weights there, which the kernel (fp32 compute) refused.
    moe = hf_moe("v3")
    x = torch.randn(2, 5, moe.config.hidden_size)
    for train in (True, False):  # training, and eval under no_grad (generate under autocast)
        moe.train(train)
        outs = {}
        for impl in ("eager", "latentmoe"):
            moe.config._experts_implementation = impl
            with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(train):
                outs[impl] = moe(x)
            if train:
                outs[impl].float().sum().backward()
        assert outs["latentmoe"].dtype == outs["eager"].dtype
        assert rel_err(outs["latentmoe"].float(), outs["eager"].float()) <= 2e-2


def test_nan_router_weight_propagates_like_hf():
    # A NaN row in the router weight (a diverged run): HF's outputs are NaN for every token (its
    # topk picks the NaN expert); ours must not come out finite.
    ours, theirs = _pair("v3")
    with torch.no_grad():
        for m in (ours, theirs):
            m.gate.weight[5] = float("nan")
    x = torch.randn(2, 6, CONFIGS["v3"]["hidden_size"])
    assert torch.equal(torch.isnan(ours(x)), torch.isnan(theirs(x)))


@pytest.mark.parametrize("seq_aux", [False, True])
def test_aux_loss_finite_when_a_tokens_scores_underflow(seq_aux):
    # Every logit of one token below about -104: its sigmoid scores are all exactly 0. The balance
    # loss normalises scores per token: that token must add 0, not 0/0 (NaN router gradients).
    ours, _ = _pair("v3", aux_loss_alpha=0.01, seq_aux=seq_aux)
    ours.train()
    x = torch.randn(1, 5, CONFIGS["v3"]["hidden_size"])
    with torch.no_grad():
        ours.gate.weight.copy_(torch.randn_like(ours.gate.weight).abs())
        x[0, 2] = -1e3 * torch.ones(x.shape[-1])  # logits ~ -1e3 * row sums: every score 0
    ours(x)
    ours.aux_loss.backward()
    assert torch.isfinite(ours.aux_loss) and torch.isfinite(ours.gate.weight.grad).all()


def test_backward_hook_on_the_gate_fires():
    # The router's weight is read in place when the gate is plain: a backward hook on it fires
    # only if it is called, so a hooked gate is called.
    name = list(CONFIGS)[0]
    ours, theirs = _pair(name)
    seen = {"ours": [], "theirs": []}
    for tag, m in (("ours", ours), ("theirs", theirs)):
        m.gate.register_full_backward_hook(lambda mod, gi, go, tag=tag: seen[tag].append(
            sum(float(t.norm()) for t in go if t is not None)))
    x = torch.randn(2, 5, CONFIGS[name]["hidden_size"], requires_grad=True)
    g = torch.randn(2, 5, CONFIGS[name]["hidden_size"])
    (theirs(x) * g).sum().backward()
    (ours(x) * g).sum().backward()
    assert len(seen["ours"]) == len(seen["theirs"]) == 1 and seen["ours"][0] > 0


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # HF's zero-width MLP
def test_no_shared_experts_state_dict_identical_to_hf():
    # n_shared_experts=0: HF builds zero-width shared experts (their keys are in its state_dict);
    # so does MoE, and strict loading works both ways. They add nothing.
    theirs = hf_moe(list(CONFIGS)[0], n_shared_experts=0).eval()
    cfg = theirs.config
    ours = MoE(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert ours.shared_experts.down_proj.weight.shape == theirs.shared_experts.down_proj.weight.shape
    x = torch.randn(2, 5, cfg.hidden_size)
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x)) <= 1e-4


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # HF's zero-width MLP
def test_no_shared_experts_get_zero_size_grads_as_hf():
    # DDP needs a gradient for every parameter that requires one: the zero-width shared experts got
    # None (skipped in forward), and DDP's next forward raised "parameters that were not used".
    # Inference forwards still skip them.
    theirs = hf_moe(list(CONFIGS)[0], n_shared_experts=0).train()
    ours = MoE(theirs.config).train()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 5, theirs.config.hidden_size)
    g = torch.randn_like(x)
    (theirs(x) * g).sum().backward()
    (ours(x) * g).sum().backward()
    mine, hf = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for name in ("shared_experts.gate_proj.weight", "shared_experts.up_proj.weight", "shared_experts.down_proj.weight"):
        assert mine[name].grad is not None and mine[name].grad.shape == hf[name].grad.shape == mine[name].shape
    torch.testing.assert_close(mine["gate.weight"].grad, hf["gate.weight"].grad, rtol=1e-4, atol=1e-6)
    with mock.patch.object(type(ours.shared_experts), "forward", side_effect=AssertionError("ran")):
        with torch.no_grad():
            ours(x)
        ours.shared_experts.requires_grad_(False)
        ours(x)


def test_eval_forwards_set_last_load_but_do_not_count():
    # update_bias balances training batches: a validation pass or generate between training steps
    # (eval mode) must not steer it. last_load is every forward's.
    ours, _ = _pair("v3")
    h = CONFIGS["v3"]["hidden_size"]
    x_train, x_eval = torch.randn(20, h), torch.randn(30, h)
    ours(x_train)
    train_load = ours.last_load.clone()
    ours.eval()
    with torch.no_grad():
        ours(x_eval)
    _, idx, _ = ours.route(x_eval)
    assert torch.equal(ours.last_load, ref.expert_load(idx, ours.num_experts))
    assert torch.equal(ours.load_counts, train_load)
    ours.train()
    bias0 = ours.gate.e_score_correction_bias.clone()
    ours.update_bias(gamma=0.01)
    torch.testing.assert_close(ours.gate.e_score_correction_bias, ref.update_bias(bias0, train_load, 0.01))


def test_no_load_counting_keeps_generate_out_of_the_bias_update():
    # RL-style rollouts: generate from a model kept in train() mode. Inside no_load_counting its
    # tokens leave load_counts alone (last_load is still set); outside they are counted.
    model = _tiny_causal_lm("eager")
    hf_mlp = model.model.layers[1].mlp
    ours = MoE(model.config)
    ours.load_state_dict(hf_mlp.state_dict(), strict=True)
    model.model.layers[1].mlp = ours
    model.train()
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with no_load_counting(model) as m:
        assert m is model and ours.count_loads is False
        model.generate(ids, **kw)
    assert ours.count_loads is True
    assert int(ours.load_counts.sum()) == 0 and int(ours.last_load.sum()) == ours.top_k  # last step: 1 token
    model.generate(ids, **kw)
    assert int(ours.load_counts.sum()) == (5 + 1 + 1) * ours.top_k  # prompt, then 2 single-token steps
    # Each module's own setting comes back, also after an exception.
    ours.count_loads = False
    with pytest.raises(RuntimeError, match="boom"), no_load_counting(model):
        raise RuntimeError("boom")
    assert ours.count_loads is False
    ours.count_loads = True
    counts = ours.load_counts.clone()
    with pytest.raises(RuntimeError, match="boom"), no_load_counting(model):
        ours(torch.randn(4, model.config.hidden_size))
        raise RuntimeError("boom")
    assert ours.count_loads is True and torch.equal(ours.load_counts, counts)


def test_count_loads_under_compile_and_from_old_pickles():
    # A compiled forward follows count_loads (a guard: the graph recompiles when it flips), and a
    # module pickled before the attribute existed counts (the class default).
    import pickle

    ours, _ = _pair("v3")
    ours.train()
    f = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 40)
    f(x)
    counted = int(ours.load_counts.sum())
    with no_load_counting(ours):
        f(x)
    assert int(ours.load_counts.sum()) == counted == 6 * ours.top_k
    f(x)
    assert int(ours.load_counts.sum()) == 2 * counted
    old = pickle.loads(pickle.dumps(ours))
    old.__dict__.pop("count_loads", None)
    old.load_counts.zero_()
    old(x)
    assert int(old.load_counts.sum()) == counted


@pytest.mark.parametrize("cast", ["to", "half", "assign"])
def test_router_weight_stays_fp32_values_included(cast):
    # HF's from_pretrained keeps gate.weight fp32 in a bf16 / fp16 model (_keep_in_fp32_modules_strict):
    # ours keeps it too, with its fp32 values (not the cast's rounded ones), so a bf16 model routes
    # as HF's loaded one. A bf16-rounded weight picked another expert set for some tokens.
    torch.manual_seed(0)
    ours = MoE(hf_config("v3"))
    with torch.no_grad():
        ours.gate.weight.add_(1e-4 * torch.randn_like(ours.gate.weight))  # not bf16-representable
    exact = ours.gate.weight.detach().clone()
    param = ours.gate.weight
    ours.gate.weight.grad = torch.randn_like(exact)
    grad = ours.gate.weight.grad.clone()
    low = torch.float16 if cast == "half" else torch.bfloat16
    if cast == "assign":
        sd = {k: (v.to(low) if v.is_floating_point() else v) for k, v in ours.state_dict().items()}
        ours.load_state_dict(sd, assign=True)
        exact = exact.to(low).float()  # the checkpoint's own values
    else:
        ours = ours.half() if cast == "half" else ours.to(low)
        assert ours.gate.weight is param  # the same Parameter (an optimizer's reference holds)
        assert torch.equal(ours.gate.weight.grad, grad)
    assert ours.experts.gate_up_proj.dtype == low
    assert ours.gate.weight.dtype == torch.float32 and torch.equal(ours.gate.weight.detach(), exact)
    # Against HF as from_pretrained loads it in that dtype: the experts low, the router fp32.
    theirs = hf_moe("v3").to(low)
    theirs.load_state_dict(ours.state_dict())
    theirs.gate.weight.data = ours.gate.weight.detach().clone()
    assert theirs.gate.weight.dtype == torch.float32
    x = torch.randn(64, CONFIGS["v3"]["hidden_size"], dtype=low)
    want = theirs(x).float()
    got = ours(x).float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
