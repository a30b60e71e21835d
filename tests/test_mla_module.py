"""latentmoe.nn.MultiHeadLatentAttention against HF DeepseekV3Attention (same weights, strict load)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import latentmoe
from latentmoe.nn import LatentKVCache, MultiHeadLatentAttention
from test_mla_common import (
    attention_pair,
    causal_additive_mask,
    hf_cache,
    hf_model_pair,
    make_config,
    make_hf_attention,
    offload_like_accelerate,
    rel_err,
    rope_embeddings,
)

CASES = [
    dict(heads=3, q_lora=24, interleave=True, yarn=False, B=2),
    dict(heads=1, q_lora=None, interleave=False, yarn=False, B=1),
    dict(heads=9, q_lora=None, interleave=True, yarn=True, B=3),
    dict(heads=3, q_lora=24, interleave=False, yarn=True, B=2),
]
STEPS = [9, 1, 1, 2, 1]  # prefill, then decode steps (one MTP-style 2-token step)


def _pair(case, dtype=torch.float32, device="cpu"):
    cfg = make_config(
        heads=case["heads"], q_lora=case["q_lora"], interleave=case["interleave"], yarn=case["yarn"]
    )
    hf, mine = attention_pair(cfg, dtype)
    return cfg, hf.to(device), mine.to(device)


def _run_steps(cfg, hf, mine, B, cache_kind, device="cpu", dtype=torch.float32, steps=STEPS,
               cache_kw="cache"):
    cache_hf = hf_cache(cfg)
    if cache_kind == "hf":
        cache_mine = hf_cache(cfg)
    else:
        page = {"contig": None, "paged": 4}[cache_kind]
        n_pages = None
        table = None
        if page is not None:  # a shared pool in random page order
            max_pages = (sum(steps) + page - 1) // page
            n_pages = B * max_pages + 3
            table = torch.randperm(n_pages)[: B * max_pages].view(B, max_pages).to(torch.int32)
        cache_mine = LatentKVCache(
            1, B, sum(steps), cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=dtype, device=device,
            page_size=page, num_pages=n_pages, block_table=table,
        )
    past, errs = 0, []
    for n in steps:
        x = torch.randn(B, n, cfg.hidden_size, dtype=dtype, device=device)
        pos = (past + torch.arange(n, device=device))[None].expand(B, -1)
        pe = rope_embeddings(cfg, pos.cpu(), dtype)
        pe = tuple(t.to(device) for t in pe)
        mask = causal_additive_mask(B, n, past, dtype).to(device)
        with torch.no_grad():
            want, _ = hf(x, pe, mask, cache=cache_hf)
            got, w = mine(x, pe, mask, **{cache_kw: cache_mine})
        assert w is None and got.shape == want.shape
        errs.append(rel_err(got, want))
        past += n
    return errs, cache_mine


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("cache_kind", ["hf", "contig", "paged"])
def test_prefill_then_decode_matches_hf(case, cache_kind):
    cfg, hf, mine = _pair(case)
    errs, _ = _run_steps(cfg, hf, mine, case["B"], cache_kind)
    assert max(errs) <= 1e-4, errs


@pytest.mark.parametrize("cache_kind", ["hf", "contig", "paged"])
def test_cache_as_past_key_values(cache_kind):
    # Older transformers pass the cache as past_key_values=: the same steps, the same results.
    cfg, hf, mine = _pair(CASES[1])
    errs, cache = _run_steps(cfg, hf, mine, CASES[1]["B"], cache_kind, cache_kw="past_key_values")
    assert max(errs) <= 1e-4, errs
    assert cache.get_seq_length(0) == sum(STEPS)
    x = torch.randn(CASES[1]["B"], 1, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.full((CASES[1]["B"], 1), sum(STEPS)))
    with torch.no_grad(), pytest.raises(ValueError, match="past_key_values"):
        mine(x, pe, None, cache=cache, past_key_values=hf_cache(cfg))


@pytest.mark.parametrize("cache_kind", ["hf", "contig", "paged"])
def test_decode_steps_use_the_kernel(monkeypatch, cache_kind):
    # Decode steps (even with HF's eager 4-D causal mask) must run the mla_decode kernel: on the
    # CPU (these tests' device) inside mla_decode_absorbed for at most 16 query rows (batch 2 x 1 or
    # 2 new tokens), else mla_decode between two products (as on CUDA).
    import latentmoe.nn.mla as mod

    calls = []
    for name in ("mla_decode", "mla_decode_absorbed"):
        def counting(*args, _real=getattr(mod, name), _name=name, **kwargs):
            calls.append((_name, args[0].shape[1]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, name, counting)
    cfg, hf, mine = _pair(CASES[0])
    errs, _ = _run_steps(cfg, hf, mine, 2, cache_kind, steps=[9, 1, 2])
    assert max(errs) <= 1e-4
    assert calls == [("mla_decode", 9), ("mla_decode_absorbed", 1), ("mla_decode_absorbed", 2)]


def test_training_uses_the_prefill_kernel(monkeypatch):
    import latentmoe.nn.mla as mod

    calls = []
    real = mod.mla_prefill
    monkeypatch.setattr(mod, "mla_prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg, hf, mine = _pair(CASES[0])
    x = torch.randn(2, 20, cfg.hidden_size, requires_grad=True)
    pe = rope_embeddings(cfg, torch.arange(20)[None].expand(2, -1))
    mine.train()(x, pe, None)[0].sum().backward()
    assert calls == [1] and mine.kv_b_proj.weight.grad is not None


@pytest.mark.parametrize("choice", ["auto", "kernel", "sdpa"])
def test_module_prefill_choice(monkeypatch, device, choice):
    # LATENTMOE_MLA_MODULE_PREFILL picks the module's prefill / training attention without a
    # LatentKVCache: auto is the mla_prefill kernel on the CPU and SDPA on CUDA (measured faster
    # there); every choice matches HF in the output and the gradients.
    import latentmoe.nn.mla as mod

    monkeypatch.setenv("LATENTMOE_MLA_MODULE_PREFILL", choice)
    calls, real = [], mod.mla_prefill
    monkeypatch.setattr(mod, "mla_prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg, hf, mine = _pair(CASES[0], device=device)
    B, S = 2, 20
    x = torch.randn(B, S, cfg.hidden_size, device=device, requires_grad=True)
    x_hf = x.detach().clone().requires_grad_()
    pe = tuple(t.to(device) for t in rope_embeddings(cfg, torch.arange(S)[None].expand(B, -1)))
    got = mine.train()(x, pe, None)[0]
    want = hf.train()(x_hf, pe, causal_additive_mask(B, S, 0).to(device))[0]
    got.square().sum().backward()
    want.square().sum().backward()
    tol = 1e-4 if device == "cpu" else 1e-3
    assert rel_err(got, want) <= tol and rel_err(x.grad, x_hf.grad) <= tol
    assert rel_err(mine.kv_b_proj.weight.grad, hf.kv_b_proj.weight.grad) <= tol
    kernel = choice == "kernel" or (choice == "auto" and device == "cpu")
    assert calls == ([1] if kernel else [])


@pytest.mark.parametrize("choice", ["auto", "kernel", "sdpa"])
@pytest.mark.parametrize("cache_kind", ["contig", "paged"])
def test_latent_cache_prefill_choice(monkeypatch, device, cache_kind, choice):
    # LATENTMOE_MLA_MODULE_PREFILL with a LatentKVCache: steps of more than decode_max_tokens new
    # tokens run mla_prefill on the cache, or SDPA on its rows' latents gathered and decompressed
    # (auto: the kernel on the CPU, SDPA on CUDA); both match HF step by step.
    import latentmoe.nn.mla as mod

    monkeypatch.setenv("LATENTMOE_MLA_MODULE_PREFILL", choice)
    calls, real = [], mod.mla_prefill
    monkeypatch.setattr(mod, "mla_prefill", lambda *a, **k: calls.append(a[0].shape[1]) or real(*a, **k))
    cfg, hf, mine = _pair(CASES[0], device=device)
    errs, cache = _run_steps(cfg, hf, mine, 2, cache_kind, device=device, steps=[20, 1, 18, 2])
    assert max(errs) <= (1e-4 if device == "cpu" else 1e-3), errs
    kernel = choice == "kernel" or (choice == "auto" and device == "cpu")
    assert calls == ([20, 18] if kernel else [])


def test_module_prefill_choice_rejects_unknown_values(monkeypatch):
    monkeypatch.setattr(os, "environ", {**os.environ, "LATENTMOE_MLA_MODULE_PREFILL": "flash"})
    with pytest.raises(ValueError, match="LATENTMOE_MLA_MODULE_PREFILL must be auto or kernel or sdpa"):
        latentmoe.reload_settings()
    monkeypatch.undo()
    latentmoe.reload_settings()


def test_deepseek_like_dims_decode():
    cfg = make_config(heads=4, q_lora=64, kv_lora=512, rope=64, nope=32, v=32, hidden=96)
    hf = make_hf_attention(cfg)
    mine = MultiHeadLatentAttention(cfg, 0)
    mine.load_state_dict(hf.state_dict(), strict=True)
    errs, _ = _run_steps(cfg, hf, mine.eval(), 2, "paged", steps=[40, 1, 1])
    assert max(errs) <= 1e-4, errs


def _without_prefill_kernel(monkeypatch):
    """Make the module believe the prefill op has no kernel here: the SDPA path."""
    import latentmoe.nn.mla as mod

    real = mod._has_kernel
    monkeypatch.setattr(mod, "_has_kernel", lambda op, dev: op != mod._PREFILL_OP and real(op, dev))


@pytest.mark.parametrize("prefill_kernel", [True, False])
@pytest.mark.parametrize("cache_kind", ["hf", "contig", "paged"])
def test_long_prefill(monkeypatch, cache_kind, prefill_kernel):
    # More new tokens than decode_max_tokens: mla_prefill kernel, or the SDPA path.
    import latentmoe.nn.mla as mod

    if not prefill_kernel:
        _without_prefill_kernel(monkeypatch)
    calls, real = [], mod.mla_prefill
    monkeypatch.setattr(mod, "mla_prefill", lambda *a, **k: calls.append(a[0].shape[1]) or real(*a, **k))
    cfg, hf, mine = _pair(CASES[0])
    errs, cache = _run_steps(cfg, hf, mine, 2, cache_kind, steps=[5, 20, 1, 18])
    assert max(errs) <= 1e-4, errs
    assert cache.get_seq_length(0) == 44
    assert calls == ([20, 18] if prefill_kernel else [])  # the path the test names ran


@pytest.mark.parametrize("cache_kind", ["latent", "hf"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_low_precision(dtype, cache_kind):
    case = CASES[0]
    cfg, hf32, _ = _pair(case)
    hf_low = make_hf_attention(cfg, dtype)
    mine_low = MultiHeadLatentAttention(cfg, 0).to(dtype)
    mine_low.load_state_dict(hf_low.state_dict(), strict=True)
    # Same inputs for three runs: fp32 HF (truth), HF in bf16, ours in bf16.
    B, past = 2, 0
    ours_cache = LatentKVCache(1, B, 16, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype)
    caches = [hf_cache(cfg), hf_cache(cfg), ours_cache if cache_kind == "latent" else hf_cache(cfg)]
    for n in [9, 1, 1]:
        x = torch.randn(B, n, cfg.hidden_size)
        pos = (past + torch.arange(n))[None].expand(B, -1)
        pe32 = rope_embeddings(cfg, pos)
        pel = rope_embeddings(cfg, pos, dtype)
        with torch.no_grad():
            truth, _ = hf32(x, pe32, causal_additive_mask(B, n, past), cache=caches[0])
            hf_l, _ = hf_low(x.to(dtype), pel, causal_additive_mask(B, n, past, dtype), cache=caches[1])
            ours, _ = mine_low(x.to(dtype), pel, None, cache=caches[2])
        err, hf_err = rel_err(ours, truth), rel_err(hf_l, truth)
        assert err <= 2 * hf_err + 1e-3, (err, hf_err)
        past += n


def _hf_model_pair(attn_impl):
    """(config, HF DeepseekV3Model, the same model with our attention in every layer), 2 layers."""
    from transformers import DeepseekV3Model

    return hf_model_pair(DeepseekV3Model, attn_impl)  # dense MLPs: the test is about attention


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_inside_hf_model_with_hf_cache(attn_impl):
    cfg, model, ours = _hf_model_pair(attn_impl)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    with torch.no_grad():
        a = model(ids, use_cache=True)
        b = ours(ids, use_cache=True)
        # Left padding in row 1: a real (non-causal-only) mask must be honoured too.
        pad_mask = torch.ones(2, 8, dtype=torch.long)
        pad_mask[1, :3] = 0
        a_pad = model(ids, attention_mask=pad_mask).last_hidden_state
        b_pad = ours(ids, attention_mask=pad_mask).last_hidden_state
        assert rel_err(b_pad[0], a_pad[0]) <= 1e-4 and rel_err(b_pad[1, 3:], a_pad[1, 3:]) <= 1e-4
        assert rel_err(b.last_hidden_state, a.last_hidden_state) <= 1e-4
        cache_a, cache_b = a.cache, b.cache
        for _ in range(3):
            nxt = torch.randint(0, cfg.vocab_size, (2, 1))
            a = model(nxt, cache=cache_a, use_cache=True)
            b = ours(nxt, cache=cache_b, use_cache=True)
            assert rel_err(b.last_hidden_state, a.last_hidden_state) <= 1e-4


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_inside_hf_model_with_hf_static_cache(attn_impl):
    # HF's StaticCache hands back its whole pre-allocated buffer (zeros past the written slots),
    # and its length as a device tensor; HF's sdpa path passes no mask for the first prefill
    # (causal from the first key). A prefill of 5 tokens, a chunk of 3 more, then decode steps.
    from transformers.cache_utils import StaticCache

    cfg, model, ours = _hf_model_pair(attn_impl)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    with torch.no_grad():
        cache_a = StaticCache(config=cfg, max_cache_len=32)
        cache_b = StaticCache(config=cfg, max_cache_len=32)
        steps = [ids[:, :5], ids[:, 5:]] + [torch.randint(0, cfg.vocab_size, (2, 1)) for _ in range(3)]
        for chunk in steps:
            a = model(chunk, cache=cache_a, use_cache=True).last_hidden_state
            b = ours(chunk, cache=cache_b, use_cache=True).last_hidden_state
            assert rel_err(b, a) <= 1e-4
        # What our layers wrote is what HF's wrote, and nothing past the written slots.
        for la, lb in zip(cache_a.layers, cache_b.layers):
            assert torch.allclose(lb.keys, la.keys, rtol=1e-4, atol=1e-5)
            assert torch.equal(lb.keys[:, :, 11:], torch.zeros_like(lb.keys[:, :, 11:]))


def _record_attention_paths(monkeypatch) -> list[str]:
    """The attention paths taken (absorbed decode: one mla_decode_absorbed call or separate ops; or
    decompressing SDPA), call by call."""
    paths = []
    for name in ("_fused_decode", "_absorbed_attention", "_sdpa_attention"):
        orig = getattr(MultiHeadLatentAttention, name)
        monkeypatch.setattr(MultiHeadLatentAttention, name,
                            lambda self, *a, _n=name, _o=orig, **k: (paths.append(_n), _o(self, *a, **k))[1])
    return paths


@pytest.mark.parametrize("compiled", [False, True])
def test_hf_static_cache_module_level_without_mask(monkeypatch, compiled):
    # StaticCache's get_seq_length is its own length tensor, advanced in place by update(): the
    # module must count the new tokens once. With mask=None (plain causal) the steps take the fused
    # decode (not SDPA over the whole buffer) and match HF's attention given the causal mask.
    from transformers.cache_utils import StaticCache

    cfg = make_config(heads=3, q_lora=24)
    hf, mine = attention_pair(cfg)
    paths = _record_attention_paths(monkeypatch)
    run = torch.compile(mine, backend="aot_eager") if compiled else mine
    B = 2
    c_hf, c_mine = StaticCache(config=cfg, max_cache_len=16), StaticCache(config=cfg, max_cache_len=16)
    past = 0
    for S in (5, 3, 1, 1):
        x = torch.randn(B, S, cfg.hidden_size)
        pe = rope_embeddings(cfg, (past + torch.arange(S))[None].expand(B, -1))
        with torch.no_grad():
            # HF's attention needs the mask over the static buffer (16 keys): unwritten ones hidden.
            mask = torch.full((B, 1, S, 16), torch.finfo().min)
            mask[..., : past + S] = causal_additive_mask(B, S, past)
            want, _ = hf(x, pe, mask, cache=c_hf)
            got, _ = run(x, pe, None, cache=c_mine)
        assert rel_err(got, want) <= 1e-4, S
        past += S
    if not compiled:
        assert paths == ["_fused_decode"] * 4, paths  # (the CPU, at most 16 query rows)


def test_hf_static_cache_generate_takes_the_kernels(monkeypatch):
    # generate(cache_implementation="static"): HF passes the causal mask over the whole buffer;
    # every step (prefill and decode) must take the fused decode, with HF's ids.
    from transformers import DeepseekV3ForCausalLM

    cfg, hf, ours = hf_model_pair(DeepseekV3ForCausalLM, "sdpa")
    ids = torch.randint(1, cfg.vocab_size, (2, 6))
    kw = dict(max_new_tokens=4, do_sample=False, cache_implementation="static")
    want = hf.generate(ids, **kw)
    paths = _record_attention_paths(monkeypatch)
    got = ours.generate(ids, **kw)
    assert torch.equal(got, want)
    assert paths and set(paths) == {"_fused_decode"}, paths  # (the CPU, at most 16 query rows)


def _left_padded(cfg, B, S, pad):
    """Inputs for S tokens per row, and HF's causal mask with row 1's first `pad` keys masked out
    (left padding; HF keeps fully padded query rows finite)."""
    x = torch.randn(B, S, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.arange(S)[None].expand(B, -1))
    mask = causal_additive_mask(B, S, 0).clone()
    mask[1, :, :, :pad] = torch.finfo(torch.float32).min
    mask[1, :, :pad, :] = 0
    return x, pe, mask


def test_padding_mask_is_honoured():
    # Left padding: row 1's first 3 keys are masked out. Not the plain causal mask, so the module
    # must take the masked path and still match HF.
    cfg, hf, mine = _pair(CASES[0])
    B, S = 2, 7
    x, pe, mask = _left_padded(cfg, B, S, 3)
    with torch.no_grad():
        want, _ = hf(x, pe, mask, cache=hf_cache(cfg))
        got, _ = mine(x, pe, mask, cache=hf_cache(cfg))
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("prefill_kernel", [True, False])
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gradients_match_hf(monkeypatch, case, prefill_kernel):
    if not prefill_kernel:
        _without_prefill_kernel(monkeypatch)
    cfg, hf, mine = _pair(case)
    hf.train()
    mine.train()
    B, S = case["B"], 11
    x = torch.randn(B, S, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.arange(S)[None].expand(B, -1))
    g = torch.randn(B, S, cfg.hidden_size)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_hf, _ = hf(xa, pe, causal_additive_mask(B, S, 0))
    out_me, _ = mine(xb, pe, None)
    (out_hf * g).sum().backward()
    (out_me * g).sum().backward()
    assert rel_err(out_me, out_hf) <= 1e-4
    assert rel_err(xb.grad, xa.grad) <= 1e-4
    hf_params = dict(hf.named_parameters())
    for name, p in mine.named_parameters():
        assert p.grad is not None, name
        assert rel_err(p.grad, hf_params[name].grad) <= 1e-4, name


def test_absorbed_weights_never_stale():
    cfg, hf, mine = _pair(CASES[0])
    _run_steps(cfg, hf, mine, 2, "contig", steps=[4, 1])  # a first decode (would fill any cache)
    with torch.no_grad():  # in-place update (what an optimizer step does)
        hf.kv_b_proj.weight.mul_(1.5).add_(0.01)
        mine.kv_b_proj.weight.mul_(1.5).add_(0.01)
    errs, _ = _run_steps(cfg, hf, mine, 2, "contig", steps=[4, 1])
    assert max(errs) <= 1e-4, errs
    hf2 = make_hf_attention(cfg, seed=7)  # load_state_dict of different weights
    mine.load_state_dict(hf2.state_dict(), strict=True)
    errs, _ = _run_steps(cfg, hf2, mine, 2, "paged", steps=[4, 1])
    assert max(errs) <= 1e-4, errs
    H, N = cfg.num_attention_heads, cfg.qk_nope_head_dim

    def expected(src):
        return src.detach().view(H, -1, cfg.kv_lora_rank)[:, :N]

    with torch.no_grad():  # (a cache would be used only without autograd)
        mine.absorbed_weights()
        mine.kv_b_proj.weight = torch.nn.Parameter(hf.kv_b_proj.weight.detach().clone())  # new storage
        assert torch.equal(mine.absorbed_weights()[0], expected(hf.kv_b_proj.weight))
        for scale in (2.0, 3.0):  # .data swaps: the version counter need not move
            mine.kv_b_proj.weight.data = hf.kv_b_proj.weight.detach() * scale
            assert torch.equal(mine.absorbed_weights()[0], expected(hf.kv_b_proj.weight * scale))
        # Two swaps between uses: the second weight may land where the first one was freed.
        for _ in range(3):
            mine.kv_b_proj.weight.data = hf.kv_b_proj.weight.detach() * 4.0
            mine.absorbed_weights()
            mine.kv_b_proj.weight.data = hf.kv_b_proj.weight.detach() * 5.0
            mine.kv_b_proj.weight.data = hf.kv_b_proj.weight.detach() * 6.0
            assert torch.equal(mine.absorbed_weights()[0], expected(hf.kv_b_proj.weight * 6.0))


def _decode_err(cfg, hf, mine, B=2, S=3):
    """Decode-sized call (no grad, S <= 16 new tokens): the absorbed path, against HF."""
    x = torch.randn(B, S, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.arange(S)[None].expand(B, -1))
    with torch.no_grad():
        want, _ = hf(x, pe, causal_additive_mask(B, S, 0))
        got, _ = mine(x, pe, None)
    return rel_err(got, want)


@pytest.mark.parametrize("how", ["fused_adamw", "fused_sgd", "data_copy", "data_mul", "foreach_data"])
def test_decode_follows_updates_that_skip_the_version_counter(how):
    # Fused optimizers and in-place updates through .data leave the weight's version counter as
    # it was; a cache of the absorbed weights keyed on it made decode use the old kv_b_proj.
    cfg, hf, mine = _pair(CASES[0])
    assert _decode_err(cfg, hf, mine) <= 1e-4  # a first decode call (would fill any cache)
    if how.startswith("fused"):
        for m in (hf, mine):
            m.train()
            opt = (torch.optim.AdamW(m.parameters(), lr=0.05, fused=True) if how == "fused_adamw"
                   else torch.optim.SGD(m.parameters(), lr=0.5, fused=True))
            torch.manual_seed(3)
            x = torch.randn(2, 20, cfg.hidden_size)
            pe = rope_embeddings(cfg, torch.arange(20)[None].expand(2, -1))
            m(x, pe, causal_additive_mask(2, 20, 0) if m is hf else None)[0].square().sum().backward()
            opt.step()
            m.eval()
        assert rel_err(mine.kv_b_proj.weight, hf.kv_b_proj.weight) <= 1e-5
    else:
        new = torch.randn_like(hf.kv_b_proj.weight) * 0.2
        for m in (hf, mine):
            w = m.kv_b_proj.weight
            if how == "data_copy":
                w.data.copy_(new)
            elif how == "data_mul":
                w.data.mul_(2.0)
            else:
                torch._foreach_mul_([w.data], 3.0)
    assert _decode_err(cfg, hf, mine) <= 1e-4


@pytest.mark.parametrize("cache_kind", [None, "hf", "contig"])
def test_autocast_bf16_matches_hf(cache_kind):
    # Under CPU autocast the projections run in bf16 (as HF's do) and the kernels get one dtype.
    cfg, hf, mine = _pair(CASES[0])
    B = 2
    caches = {None: (None, None), "hf": (hf_cache(cfg), hf_cache(cfg)),
              "contig": (hf_cache(cfg), LatentKVCache(1, B, 12, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                                      dtype=torch.bfloat16))}
    c_hf, c_me = caches[cache_kind]
    past = 0
    for S in ([8, 1, 2] if cache_kind else [8, 3]):
        x = torch.randn(B, S, cfg.hidden_size)
        pe = rope_embeddings(cfg, (past + torch.arange(S))[None].expand(B, -1))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            want, _ = hf(x, pe, causal_additive_mask(B, S, past), cache=c_hf)
            got, _ = mine(x, pe, None, cache=c_me)
        assert got.dtype == want.dtype == torch.bfloat16
        assert rel_err(got.float(), want.float()) <= 3e-2
        if cache_kind:
            past += S
    # training under autocast: gradients reach the fp32 weights
    x = torch.randn(B, 6, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.arange(6)[None].expand(B, -1))
    mine.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = mine(x, pe, None)
    out.float().square().sum().backward()
    assert mine.kv_b_proj.weight.grad is not None and mine.kv_b_proj.weight.grad.dtype == torch.float32


def test_latent_cache_dtype_and_broadcast_rope(device):
    # Rows are stored in the cache's dtype (a bf16 cache for an fp32 model), and cos / sin may be
    # shared by the batch ([1, S, R]) as with no cache or an HF cache.
    cfg, hf, mine = _pair(CASES[0], device=device)
    B, steps = 2, [5, 1, 1]
    c_hf = hf_cache(cfg)
    c16 = LatentKVCache(1, B, 7, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=torch.bfloat16, device=device)
    c32 = LatentKVCache(1, B, 7, cfg.kv_lora_rank, cfg.qk_rope_head_dim, page_size=2, device=device)
    past = 0
    for S in steps:
        x = torch.randn(B, S, cfg.hidden_size, device=device)
        pe = tuple(t.to(device) for t in rope_embeddings(cfg, (past + torch.arange(S))[None]))  # [1, S, R]
        with torch.no_grad():
            want, _ = hf(x, tuple(t.expand(B, -1, -1) for t in pe), causal_additive_mask(B, S, past).to(device), cache=c_hf)
            got32, _ = mine(x, pe, None, cache=c32)
            got16, _ = mine(x, pe, None, cache=c16)
        assert got16.dtype == torch.float32 and c16.kv[0].dtype == torch.bfloat16
        assert rel_err(got32, want) <= 1e-4
        assert rel_err(got16, want) <= 3e-2
        past += S


def test_latent_cache_with_a_strided_norm_weight():
    # A kv_a_layernorm weight loaded with assign=True from a strided view (a column of a stacked
    # checkpoint tensor) reached mla_append_cache as is: "'norm_weight' must be contiguous".
    cfg, hf, _ = _pair(CASES[0])
    sd = hf.state_dict()
    w = sd["kv_a_layernorm.weight"]
    sd["kv_a_layernorm.weight"] = torch.stack([w, torch.ones_like(w)], dim=1)[:, 0]
    mine = MultiHeadLatentAttention(cfg, 0).eval()
    mine.load_state_dict(sd, assign=True)
    assert not mine.kv_a_layernorm.weight.is_contiguous()
    errs, _ = _run_steps(cfg, hf, mine, 2, "contig")
    assert max(errs) <= 1e-4


@pytest.mark.parametrize("S", [5, 20])
def test_gradients_reach_a_learned_prefix(S):
    # Prefix tuning: a frozen layer, hidden states without grad, learned past keys / values in an
    # HF cache. The module read "no gradient needed" from the hidden states and its parameters only,
    # took the decode ops (no backward) for S <= decode_max_tokens, and backward raised.
    from transformers.cache_utils import DynamicCache

    cfg = make_config(heads=3, q_lora=None)
    hf, mine = attention_pair(cfg)
    for m in (hf, mine):
        m.requires_grad_(False).train()
    B, P = 2, 7
    prefix = torch.randn(B, 1, P, cfg.kv_lora_rank), torch.randn(B, 1, P, cfg.qk_rope_head_dim)
    x = torch.randn(B, S, cfg.hidden_size)
    pe = rope_embeddings(cfg, (torch.arange(S) + P)[None].expand(B, S))
    grads = []
    for mod, mask in ((hf, causal_additive_mask(B, S, P)), (mine, None)):
        k, v = (t.clone().requires_grad_() for t in prefix)
        cache = DynamicCache(config=cfg)
        cache.update(k, v, 0)
        out, _ = mod(x, pe, attention_mask=mask, past_key_values=cache)
        out.square().sum().backward()
        grads.append((k.grad, v.grad))
    for got, want in zip(grads[1], grads[0]):
        assert rel_err(got, want) <= 1e-4


def test_gradients_reach_learned_position_embeddings():
    # Only cos / sin require grad (a learned position embedding): the same short-forward decode path.
    cfg = make_config(heads=3, q_lora=None)
    hf, mine = attention_pair(cfg)
    for m in (hf, mine):
        m.requires_grad_(False)
    x = torch.randn(1, 4, cfg.hidden_size)
    cos, sin = rope_embeddings(cfg, torch.arange(4)[None])
    grads = []
    for mod in (hf, mine):
        c = cos.clone().requires_grad_()
        mod(x, (c, sin), attention_mask=causal_additive_mask(1, 4, 0) if mod is hf else None)[0].sum().backward()
        grads.append(c.grad)
    assert rel_err(grads[1], grads[0]) <= 1e-4


def test_float64_is_refused_up_front():
    cfg, hf, mine = _pair(CASES[0])
    mine.double()
    x = torch.randn(1, 3, cfg.hidden_size, dtype=torch.float64)
    pe = rope_embeddings(cfg, torch.arange(3)[None], torch.float64)
    with pytest.raises(ValueError, match="MultiHeadLatentAttention: 'hidden_states' must be float32"):
        mine(x, pe, None)


def test_export_with_dynamic_sequence_across_decode_sizes():
    # torch.export with a dynamic S spanning decode_max_tokens (and linear_small's row limit):
    # no branch on S while exporting; the program matches eager on both sides.
    from torch.export import Dim, export

    cfg, hf, mine = _pair(CASES[0])

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, cos, sin):
            return self.m(x, (cos, sin), None)[0]

    s = Dim("s", min=2, max=64)
    x = torch.randn(2, 6, cfg.hidden_size)
    cos, sin = rope_embeddings(cfg, torch.arange(6)[None].expand(2, -1))
    prog = export(Wrap(mine), (x, cos, sin), dynamic_shapes=({1: s}, {1: s}, {1: s}))
    for S in (3, 40):
        x = torch.randn(2, S, cfg.hidden_size)
        pe = rope_embeddings(cfg, torch.arange(S)[None].expand(2, -1))
        with torch.no_grad():
            want, _ = hf(x, pe, causal_additive_mask(2, S, 0))
        assert rel_err(prog.module()(x, *pe), want) <= 1e-4


def test_state_dict_keys_identical_to_hf():
    for q_lora in (None, 24):
        cfg = make_config(q_lora=q_lora)
        hf = make_hf_attention(cfg)
        mine = MultiHeadLatentAttention(cfg, 0)
        shapes = {k: v.shape for k, v in mine.state_dict().items()}
        assert shapes == {k: v.shape for k, v in hf.state_dict().items()}


def test_latent_cache_overflow_and_misuse():
    cfg, hf, mine = _pair(CASES[0])
    cache = LatentKVCache(1, 2, 5, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    x = torch.randn(2, 4, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.arange(4)[None].expand(2, -1))
    with torch.no_grad():
        mine(x, pe, None, cache=cache)
        x2 = torch.randn(2, 2, cfg.hidden_size)
        pe2 = rope_embeddings(cfg, (4 + torch.arange(2))[None].expand(2, -1))
        with pytest.raises(ValueError, match="capacity"):
            mine(x2, pe2, None, cache=cache)
    assert cache.get_seq_length(0) == 4  # a failed append changes nothing
    with pytest.raises(ValueError, match="no_grad"):
        mine(x2[:, :1], tuple(t[:, :1] for t in pe2), None, cache=cache)
    # A cache made for other dims, also with the same row width (C and R swapped): refused by name.
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    for dims in ((C + 1, R), (R, C)):
        swapped = LatentKVCache(1, 2, 5, *dims)
        with torch.no_grad(), pytest.raises(ValueError, match=f"made for kv_lora_rank={dims[0]}, rope_dim={dims[1]}"):
            mine(x, pe, None, cache=swapped)
        assert swapped.get_seq_length(0) == 0
    with pytest.raises(ValueError, match="block_table"):
        LatentKVCache(1, 2, 8, 4, 2, page_size=4, block_table=torch.zeros(3, 2, dtype=torch.int32))
    for bad in ([[0, 1], [2, 9]], [[0, -1], [2, 3]]):  # the decode / append calls trust the table
        with pytest.raises(ValueError, match="block_table"):
            table = torch.tensor(bad, dtype=torch.int32)
            LatentKVCache(1, 2, 8, 4, 2, page_size=4, num_pages=4, block_table=table)


def test_latent_cache_rejects_masks_it_cannot_honour():
    # A LatentKVCache attends causally over each row's own tokens. A left-padding mask is honoured
    # by storing only each row's real tokens (padding queries give 0); masks it cannot express so
    # (right padding, a key hidden from some queries only) must raise, not be ignored; None and the
    # plain causal mask (as HF builds it) are accepted.
    cfg, hf, mine = _pair(CASES[0])
    B, S = 2, 4
    x, pe, pad = _left_padded(cfg, B, S, 2)
    with torch.no_grad():
        cache = LatentKVCache(1, B, 8, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
        got, _ = mine(x, pe, pad, cache=cache)
        want, _ = hf(x, pe, pad)
        assert rel_err(got[0], want[0]) <= 1e-4 and rel_err(got[1, 2:], want[1, 2:]) <= 1e-4
        assert torch.all(got[1, :2] == 0)
        assert cache.lengths(0) == [4, 2] and cache.get_seq_length(0) == 4
        right = causal_additive_mask(B, S, 0).clone()
        right[1, :, :, 2:] = torch.finfo(torch.float32).min
        one_query = causal_additive_mask(B, S, 0).clone()
        one_query[1, :, 3, 0] = torch.finfo(torch.float32).min
        for bad in (right, one_query):
            cache = LatentKVCache(1, B, 8, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
            with pytest.raises(ValueError, match="attention_mask"):
                mine(x, pe, bad, cache=cache)
            assert cache.get_seq_length(0) == 0  # nothing appended
        a, _ = mine(x, pe, causal_additive_mask(B, S, 0), cache=cache)
        b, _ = mine(x, pe, None, cache=LatentKVCache(1, B, 8, cfg.kv_lora_rank, cfg.qk_rope_head_dim))
    torch.testing.assert_close(a, b)


def test_cache_bytes_per_token():
    cache = LatentKVCache(1, 1, 4, 512, 64, dtype=torch.bfloat16)
    assert cache.bytes_per_token == 576 * 2


def test_accepts_any_config_object_with_hf_field_names():
    from types import SimpleNamespace

    cfg, hf, _ = _pair(CASES[2])  # YaRN, no q_lora
    fields = [
        "hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "attention_bias", "rope_interleave", "rope_parameters",
    ]
    plain = SimpleNamespace(**{f: getattr(cfg, f) for f in fields})
    mine = MultiHeadLatentAttention(plain, 0).eval()
    mine.load_state_dict(hf.state_dict(), strict=True)
    assert mine.scaling == pytest.approx(hf.scaling, rel=1e-12)
    errs, _ = _run_steps(cfg, hf, mine, 2, "contig", steps=[6, 1])
    assert max(errs) <= 1e-4, errs


@pytest.mark.parametrize("cache_kind", ["hf", "contig", "paged"])
def test_module_on_device_matches_hf(device, cache_kind):
    # The same parity on every device (on CUDA: mla_decode/mla_append_cache CUDA kernels, SDPA prefill).
    cfg, hf, mine = _pair(CASES[2], device=device)
    errs, _ = _run_steps(cfg, hf, mine, 3, cache_kind, device=device, steps=[20, 1, 2, 1])
    assert max(errs) <= 1e-4, errs


def test_module_gradients_on_device(device):
    cfg, hf, mine = _pair(CASES[0], device=device)
    B, S = 2, 13
    x = torch.randn(B, S, cfg.hidden_size, device=device)
    pe = tuple(t.to(device) for t in rope_embeddings(cfg, torch.arange(S)[None].expand(B, -1)))
    g = torch.randn(B, S, cfg.hidden_size, device=device)
    (hf.train()(x, pe, causal_additive_mask(B, S, 0).to(device))[0] * g).sum().backward()
    (mine.train()(x, pe, None)[0] * g).sum().backward()
    hf_params = dict(hf.named_parameters())
    for name, p in mine.named_parameters():
        assert rel_err(p.grad, hf_params[name].grad) <= 1e-4, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_latent_cache_decode_step_captures_in_cuda_graph():
    # With a LatentKVCache the module's decode step makes no host copy (lengths from the cache's
    # host copy, append without the check), so one step can be captured in a CUDA graph and
    # replayed step after step: each replay appends at the next slot and attends over one more key.
    cfg, hf, mine = _pair(CASES[0])
    mine = mine.cuda().eval()
    B, P, n = 2, 5, 3  # batch, prompt length, decode steps
    cache = LatentKVCache(1, B, 40, cfg.kv_lora_rank, cfg.qk_rope_head_dim, device="cuda", page_size=16)
    xs = [torch.randn(B, 1, cfg.hidden_size, device="cuda") for _ in range(n)]
    pes = [tuple(t.cuda() for t in rope_embeddings(cfg, torch.full((B, 1), P + i))) for i in range(n)]
    with torch.no_grad():
        x0 = torch.randn(B, P, cfg.hidden_size, device="cuda")
        pe0 = tuple(t.cuda() for t in rope_embeddings(cfg, torch.arange(P)[None].expand(B, -1)))
        mine(x0, pe0, None, cache=cache)
        kv0, lens0 = cache.kv[0].clone(), cache.seqlens[0].clone()
        want = [mine(xs[i], pes[i], None, cache=cache)[0] for i in range(n)]  # eager steps
        cache.kv[0].copy_(kv0)
        cache.seqlens[0].copy_(lens0)
        cache._set_lens(0, [P] * B)
        x_in, cos_in, sin_in = xs[0].clone(), pes[0][0].clone(), pes[0][1].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph):
            got, _ = mine(x_in, (cos_in, sin_in), None, cache=cache)
        torch.cuda.current_stream().wait_stream(stream)
        cache.kv[0].copy_(kv0)  # the capture itself ran nothing; start from the prompt again
        cache.seqlens[0].copy_(lens0)
        for i in range(n):
            x_in.copy_(xs[i])
            cos_in.copy_(pes[i][0])
            sin_in.copy_(pes[i][1])
            graph.replay()
            torch.testing.assert_close(got, want[i], rtol=1e-5, atol=1e-5)
        assert cache.seqlens[0].tolist() == [P + n] * B


def test_torch_compile_fullgraph():
    # Training without a cache traces whole and matches eager; a 4-D mask is applied as given
    # (SDPA) while tracing; a LatentKVCache under fullgraph=True is refused.
    torch._dynamo.reset()
    cfg, hf, mine = _pair(CASES[0])
    mine.train()
    B, S = 2, 9
    x = torch.randn(B, S, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.arange(S)[None].expand(B, -1))
    mask = causal_additive_mask(B, S, 0)
    compiled = torch.compile(mine, fullgraph=True, backend="aot_eager")
    for m in (None, mask):
        res = []
        for fn in (mine, compiled):
            mine.zero_grad()
            xg = x.clone().requires_grad_()
            out, _ = fn(xg, pe, m)
            out.square().sum().backward()
            res.append((out.detach(), xg.grad, mine.kv_b_proj.weight.grad.clone(),
                        mine.q_b_proj.weight.grad.clone()))
        for a, b in zip(*res):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    mine.eval()
    with torch.no_grad():  # prefill, then decode steps on HF's cache
        c1, c2 = hf_cache(cfg), hf_cache(cfg)
        for past, n in ((0, S), (S, 1), (S + 1, 1)):
            xs = torch.randn(B, n, cfg.hidden_size)
            pes = rope_embeddings(cfg, (past + torch.arange(n))[None].expand(B, -1))
            torch.testing.assert_close(compiled(xs, pes, None, cache=c1)[0],
                                       mine(xs, pes, None, cache=c2)[0], rtol=1e-4, atol=1e-5)
    cache = LatentKVCache(1, B, 16, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    with torch.no_grad(), pytest.raises(torch._dynamo.exc.Unsupported, match="LatentKVCache keeps its lengths"):
        compiled(x, pe, None, cache=cache)
    assert cache.get_seq_length(0) == 0


def test_torch_compile_with_latent_cache_runs_the_cache_part_eagerly():
    # Without fullgraph: a graph break, the cache part eager and whole. It used to raise there and
    # fall back, and dynamo then compiled the helpers it called frame by frame: the projections
    # recompiled at every step until the recompile limit.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg, _, mine = _pair(CASES[0])
    mine.eval()
    compiled = torch.compile(mine, backend="eager")
    B = 2
    c1, c2 = (LatentKVCache(1, B, 32, cfg.kv_lora_rank, cfg.qk_rope_head_dim) for _ in range(2))
    past = 0
    with torch.no_grad():
        for S in (5, 1, 1, 1, 1, 1, 1, 1, 1, 1):
            x = torch.randn(B, S, cfg.hidden_size)
            pe = rope_embeddings(cfg, (past + torch.arange(S))[None].expand(B, -1))
            torch.testing.assert_close(compiled(x, pe, None, cache=c1)[0], mine(x, pe, None, cache=c2)[0])
            past += S
    assert c1.lengths(0) == c2.lengths(0) == [past] * B
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


class _LowRank(torch.nn.Module):
    """A LoRA-style wrapper (as peft builds): base linear plus a low-rank update. Not an nn.Linear,
    so the module must call it rather than read its weight."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(base.out_features, rank) * 0.3)

    def forward(self, x):
        return self.base(x) + (x @ self.a.t()) @ self.b.t()


@pytest.mark.parametrize("wrapped", ["kv_b_proj", "o_proj", "q_b_proj"])
def test_wrapped_projections_are_called(wrapped):
    # Prefill and decode steps (the kernels' paths when every projection is a plain nn.Linear)
    # with one projection wrapped in a low-rank adapter, in both models: the adapter must act.
    # A forward hook on o_proj fires once per call.
    cfg, model, ours = _hf_model_pair("sdpa")
    torch.manual_seed(5)
    for m in (model, ours):
        for layer in m.layers:
            base = getattr(layer.self_attn, wrapped)
            setattr(layer.self_attn, wrapped, _LowRank(base))
    for la, lb in zip(model.layers, ours.layers):
        getattr(lb.self_attn, wrapped).load_state_dict(getattr(la.self_attn, wrapped).state_dict())
    calls = []
    ours.layers[0].self_attn.o_proj.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        a = model(ids, use_cache=True)
        b = ours(ids, use_cache=True)
        assert rel_err(b.last_hidden_state, a.last_hidden_state) <= 1e-4
        nxt = torch.randint(0, cfg.vocab_size, (2, 1))
        a2 = model(nxt, cache=a.cache, use_cache=True).last_hidden_state
        b2 = ours(nxt, cache=b.cache, use_cache=True).last_hidden_state
        assert rel_err(b2, a2) <= 1e-4
    assert len(calls) == 2
    # The adapter trains: its parameters get gradients matching HF's.
    (model(ids).last_hidden_state.sum()).backward()
    (ours(ids).last_hidden_state.sum()).backward()
    pa = getattr(model.layers[1].self_attn, wrapped).a.grad
    pb = getattr(ours.layers[1].self_attn, wrapped).a.grad
    assert pb is not None and rel_err(pb, pa) <= 1e-4


@pytest.mark.parametrize("pad", ["left", "right", "none"])
def test_2d_padding_mask_and_block_mask(pad):
    # HF's flash-attention path hands attention a 2-D [B, keys] padding mask, its flex path a
    # BlockMask: both mean "causal and not padding", against the 4-D mask HF eager builds.
    from torch.nn.attention.flex_attention import create_block_mask

    cfg = make_config(heads=3, q_lora=24)
    hf, mine = attention_pair(cfg)
    B, S = 3, 6
    keep = torch.ones(B, S, dtype=torch.bool)
    if pad == "left":
        keep[1, :2] = False
    elif pad == "right":
        keep[2, 4:] = False
    x = torch.randn(B, S, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.arange(S)[None].expand(B, -1))
    causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
    mask4 = (causal[None, None] & keep[:, None, None, :])
    additive = torch.zeros(B, 1, S, S).masked_fill(~mask4, torch.finfo(torch.float32).min)

    def mod(b, h, q, k):
        return (k <= q) & keep[b, k]

    block = create_block_mask(mod, B, 1, S, S, device="cpu")
    with torch.no_grad():
        want, _ = hf(x, pe, additive)
        for mask in (keep.long(), keep, block):
            got, _ = mine(x, pe, mask)
            for b in range(B):  # rows of padding queries are not compared
                rows = keep[b] if pad == "right" else torch.ones(S, dtype=torch.bool)
                rows = rows & (keep[b].cumsum(0) > 0)
                assert rel_err(got[b, rows], want[b, rows]) <= 1e-4
    with pytest.raises(ValueError, match="attention_mask"):
        mine(x, pe, torch.ones(B, 1, S))


def test_module_made_under_inference_mode():
    # Inference tensors have no version counter: the absorbed weights are views there, not cached.
    cfg = make_config(heads=3, q_lora=24)
    hf = make_hf_attention(cfg)
    with torch.inference_mode():
        mine = MultiHeadLatentAttention(cfg, 0).eval()
        mine.load_state_dict(hf.state_dict(), strict=True)
        cache_a, cache_b = hf_cache(cfg), hf_cache(cfg)
        for past, n in ((0, 5), (5, 1), (6, 1)):
            x = torch.randn(2, n, cfg.hidden_size)
            pe = rope_embeddings(cfg, (past + torch.arange(n))[None].expand(2, -1))
            want, _ = hf(x, pe, causal_additive_mask(2, n, past), cache=cache_a)
            got, _ = mine(x, pe, None, cache=cache_b)
            assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("page_size", [None, 4])
def test_latent_cache_wrapped_kv_b_matches_kernels_varlen(page_size):
    # A wrapped kv_b_proj (here a zero low-rank update: the same function) takes the path that
    # decompresses the cached rows through the layer; with rows of different lengths each row must
    # still attend to its own tokens only, as the kernels do. Decode and a 20-token chunk.
    cfg = make_config(heads=3, q_lora=24)
    plain = MultiHeadLatentAttention(cfg, 0).eval()
    wrapped = MultiHeadLatentAttention(cfg, 0).eval()
    wrapped.load_state_dict(plain.state_dict())
    wrapped.kv_b_proj = _LowRank(wrapped.kv_b_proj)
    with torch.no_grad():
        wrapped.kv_b_proj.b.zero_()
    B, lens = 3, [9, 4, 7]
    caches = [LatentKVCache(1, B, 64, cfg.kv_lora_rank, cfg.qk_rope_head_dim, page_size=page_size)
              for _ in range(2)]
    rows = torch.randn(B, max(lens), cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    for cache in caches:
        for b, n in enumerate(lens):
            t = torch.arange(n)
            slots = t if page_size is None else cache.block_table[b, t // page_size].long() * page_size + t % page_size
            flat = cache.kv[0].view(-1, rows.shape[-1]) if page_size else cache.kv[0][b]
            flat[slots] = rows[b, :n]
        cache.seqlens[0].copy_(torch.tensor(lens, dtype=torch.int32))
        cache._set_lens(0, list(lens))
    import latentmoe.nn.mla as mod

    calls = []
    real_decode, real_fused, real_prefill = mod.mla_decode, mod.mla_decode_absorbed, mod.mla_prefill
    mod.mla_decode = lambda *a, **k: calls.append(("decode", a[0].shape[1])) or real_decode(*a, **k)
    mod.mla_decode_absorbed = lambda *a, **k: calls.append(("decode", a[0].shape[1])) or real_fused(*a, **k)
    mod.mla_prefill = lambda *a, **k: calls.append(("prefill", a[0].shape[1])) or real_prefill(*a, **k)
    try:
        with torch.no_grad():
            for n in (1, 20):
                x = torch.randn(B, n, cfg.hidden_size)
                pos = torch.tensor(lens)[:, None] + torch.arange(n)
                pe = rope_embeddings(cfg, pos)
                want, _ = plain(x, pe, None, cache=caches[0])
                got, _ = wrapped(x, pe, None, cache=caches[1])
                assert rel_err(got, want) <= 1e-4
                lens = [v + n for v in lens]
    finally:
        mod.mla_decode, mod.mla_decode_absorbed, mod.mla_prefill = real_decode, real_fused, real_prefill
    # The plain module ran the kernels, the wrapped one neither (so the comparison is independent).
    assert calls == [("decode", 1), ("prefill", 20)]


def test_bias_only_training_takes_the_autograd_path():
    # Frozen weights, trainable biases (attention_bias=True): projections of few rows must not go
    # through linear_small (no autograd), whose call PyTorch flags with a warning.
    import warnings

    cfg = make_config(q_lora=24)
    cfg.attention_bias = True
    torch.manual_seed(0)
    mine = MultiHeadLatentAttention(cfg, 0).train()
    for name, p in mine.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    x = torch.randn(1, 3, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.arange(3)[None])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = mine(x, pe, None)
        out.square().sum().backward()
    assert mine.o_proj.bias.grad is not None and mine.kv_a_proj_with_mqa.bias.grad is not None


@pytest.mark.parametrize("cache_kind", [None, "hf"])
def test_offloaded_weights_like_accelerate(cache_kind):
    # accelerate's offloading keeps weights on meta and loads them in a patched forward: every
    # sub-layer must be called as a module (no direct weight reads), prefill and decode.
    cfg, hf, mine = _pair(CASES[0])
    offload_like_accelerate(mine)
    assert mine.kv_b_proj.weight.is_meta and mine.kv_a_layernorm.weight.is_meta
    B = 2
    c_hf, c_me = (hf_cache(cfg), hf_cache(cfg)) if cache_kind else (None, None)
    past = 0
    for S in ([7, 1, 2] if cache_kind else [7, 3]):
        x = torch.randn(B, S, cfg.hidden_size)
        pe = rope_embeddings(cfg, (past + torch.arange(S))[None].expand(B, -1))
        with torch.no_grad():
            want, _ = hf(x, pe, causal_additive_mask(B, S, past), cache=c_hf)
            got, _ = mine(x, pe, None, cache=c_me)
        assert rel_err(got, want) <= 1e-4
        past += S if cache_kind else 0
    cache = LatentKVCache(1, B, 8, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    with torch.no_grad(), pytest.raises(ValueError, match="plain RMSNorm"):
        mine(torch.randn(B, 2, cfg.hidden_size), rope_embeddings(cfg, torch.arange(2)[None].expand(B, -1)),
             None, cache=cache)


def test_compiled_decode_with_growing_cache_does_not_recompile_per_step():
    # torch.compile of decode steps over an HF DynamicCache: the cache length stays symbolic (the
    # mla_decode schema takes max_seqlen as a SymInt), so after the automatic-dynamic recompile
    # every step reuses one graph, as HF's attention does; it once recompiled every step until the
    # recompile limit, then silently ran eagerly.
    import torch._dynamo.utils as dynamo_utils

    cfg, hf, mine = _pair(CASES[0])
    B, P = 2, 5
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    comp = torch.compile(mine, backend="aot_eager")
    c_hf, c_me = hf_cache(cfg), hf_cache(cfg)
    x = torch.randn(B, P, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.arange(P)[None].expand(B, -1))
    with torch.no_grad():
        hf(x, pe, causal_additive_mask(B, P, 0), cache=c_hf)
        mine(x, pe, None, cache=c_me)
        graphs = []
        for step in range(6):
            x = torch.randn(B, 1, cfg.hidden_size)
            pe = rope_embeddings(cfg, torch.full((B, 1), P + step))
            want, _ = hf(x, pe, causal_additive_mask(B, 1, P + step), cache=c_hf)
            got, _ = comp(x, pe, None, cache=c_me)
            assert rel_err(got, want) <= 1e-4
            graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    assert graphs[-1] <= 2 and graphs[-1] == graphs[2], graphs


@pytest.mark.parametrize("page", [None, 3])
def test_latent_cache_trim_after_padded_prefill(page):
    # Right-padded prefill of rows with different prompt lengths, then trim: each row decodes from
    # its own length, as if its prompt had been prefilled alone.
    cfg, hf, mine = _pair(CASES[0])
    lens, P = [6, 3], 6
    x = torch.randn(2, P, cfg.hidden_size)
    cache = LatentKVCache(1, 2, 10, cfg.kv_lora_rank, cfg.qk_rope_head_dim, page_size=page)
    with torch.no_grad():
        mine(x, rope_embeddings(cfg, torch.arange(P)[None].expand(2, -1)), None, cache=cache)
    cache.trim(torch.tensor(lens))
    assert cache.lengths(0) == lens and cache.seqlens[0].tolist() == lens
    steps = torch.randn(2, 2, cfg.hidden_size)
    outs = []
    for t in range(2):  # both rows step together, each at its own position
        pos = torch.tensor([[lens[0] + t], [lens[1] + t]])
        with torch.no_grad():
            outs.append(mine(steps[:, t:t + 1], rope_embeddings(cfg, pos), None, cache=cache)[0])
    for b, n in enumerate(lens):  # row b alone through HF: its prompt, then the same two tokens
        c_hf = hf_cache(cfg)
        with torch.no_grad():
            hf(x[b:b + 1, :n], rope_embeddings(cfg, torch.arange(n)[None]), causal_additive_mask(1, n, 0), cache=c_hf)
            for t in range(2):
                pe_b = rope_embeddings(cfg, torch.tensor([[n + t]]))
                want, _ = hf(steps[b:b + 1, t:t + 1], pe_b, causal_additive_mask(1, 1, n + t), cache=c_hf)
                assert rel_err(outs[t][b:b + 1], want) <= 1e-4, (b, t)
    with pytest.raises(ValueError, match="trimming cannot add"):
        cache.trim([9, 1])
    with pytest.raises(ValueError, match="layer_idx 1 is out of range"):
        cache.lengths(1)


def _steps_vs_hf(cfg, hf, mine, cache_kind, B=2, steps=(20, 1, 3)):
    """Max relative error of ``mine`` against ``hf`` over a prefill (prefill kernel) and decode
    steps (absorbed decode), with an HF cache each or a LatentKVCache for ``mine``."""
    c_hf = hf_cache(cfg)
    c_mine = hf_cache(cfg) if cache_kind == "hf" else LatentKVCache(
        1, B, sum(steps), cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    past, errs = 0, []
    for n in steps:
        x = torch.randn(B, n, cfg.hidden_size)
        pe = rope_embeddings(cfg, (past + torch.arange(n))[None].expand(B, -1))
        with torch.no_grad():
            want, _ = hf(x, pe, causal_additive_mask(B, n, past), cache=c_hf)
            got, _ = mine(x, pe, None, cache=c_mine)
        errs.append(rel_err(got, want))
        past += n
    return max(errs)


def _train_grads_vs_hf(cfg, hf, mine, S=7):
    """(output error, {name: gradient error}) of one training step of both modules."""
    x = torch.randn(2, S, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.arange(S)[None].expand(2, -1))
    g = torch.randn(2, S, cfg.hidden_size)
    a, _ = hf(x, pe, causal_additive_mask(2, S, 0))
    b, _ = mine(x, pe, None)
    (a * g).sum().backward()
    (b * g).sum().backward()
    theirs = dict(hf.named_parameters())
    return rel_err(b, a), {n: (float("inf") if p.grad is None else rel_err(p.grad, theirs[n].grad))
                           for n, p in mine.named_parameters()}


@pytest.mark.parametrize("cache_kind", ["hf", "contig"])
def test_kv_b_proj_with_a_bias_is_applied(cache_kind):
    # A kv_b_proj swapped for an nn.Linear with a bias (HF's has none): the kernels read only the
    # weight, so such a layer is called (the decompressing path), in inference and in training.
    cfg = make_config(heads=3, q_lora=None)
    hf, mine = attention_pair(cfg)
    biased = torch.nn.Linear(cfg.kv_lora_rank, hf.kv_b_proj.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(hf.kv_b_proj.weight)
        biased.bias.normal_(0, 0.5)
    hf.kv_b_proj = biased
    mine.kv_b_proj = torch.nn.Linear(cfg.kv_lora_rank, biased.out_features, bias=True)
    mine.kv_b_proj.load_state_dict(biased.state_dict())
    assert _steps_vs_hf(cfg, hf, mine, cache_kind) <= 1e-4
    err, grads = _train_grads_vs_hf(cfg, hf.train(), mine.train())
    assert err <= 1e-4 and max(grads.values()) <= 1e-4, grads


@pytest.mark.parametrize("cache_kind", ["hf", "contig"])
def test_non_contiguous_kv_b_proj_weight(cache_kind):
    # A weight loaded with assign=True from a transposed tensor (the same values, column-major).
    cfg = make_config(heads=3, q_lora=24)
    hf, mine = attention_pair(cfg)
    state = mine.state_dict()
    w = state["kv_b_proj.weight"]
    state["kv_b_proj.weight"] = w.t().contiguous().t()
    mine.load_state_dict(state, assign=True)
    assert not mine.kv_b_proj.weight.is_contiguous()
    assert _steps_vs_hf(cfg, hf, mine, cache_kind) <= 1e-4
    err, grads = _train_grads_vs_hf(cfg, hf.train(), mine.train())
    assert err <= 1e-4 and max(grads.values()) <= 1e-4, grads


def test_backward_hooks_on_read_submodules_fire():
    # kv_b_proj and kv_a_layernorm are read in place by the kernels when plain: a backward hook
    # (its own, or a global one) fires only if the module is called, so such modules are called.
    from torch.nn.modules.module import register_module_full_backward_hook

    cfg = make_config(heads=3, q_lora=24)
    for sub in ("kv_b_proj", "kv_a_layernorm", "global"):
        hf, mine = attention_pair(cfg)
        seen = {"hf": [], "mine": []}
        handles = []
        if sub == "global":
            handles.append(register_module_full_backward_hook(
                lambda mod, gi, go: seen["hf" if seen.get("_hf") else "mine"].append(type(mod).__name__)))
        else:
            for tag, m in (("hf", hf), ("mine", mine)):
                handles.append(getattr(m, sub).register_full_backward_hook(
                    lambda mod, gi, go, tag=tag: seen[tag].append(float(go[0].norm()))))
        try:
            if sub == "global":
                seen["_hf"] = True
                S = 5
                x = torch.randn(1, S, cfg.hidden_size, requires_grad=True)
                pe = rope_embeddings(cfg, torch.arange(S)[None])
                hf(x, pe, causal_additive_mask(1, S, 0))[0].sum().backward()
                seen["_hf"] = False
                mine(x, pe, None)[0].sum().backward()
                # The same modules fire (class names differ: RMSNorm / DeepseekV3RMSNorm, ...).
                assert len(seen["mine"]) == len(seen["hf"]), seen
                assert seen["mine"].count("Linear") == seen["hf"].count("Linear") >= 4, seen
            else:
                _train_grads_vs_hf(cfg, hf.train(), mine.train())
                assert len(seen["mine"]) == len(seen["hf"]) == 1
                assert abs(seen["mine"][0] - seen["hf"][0]) <= 1e-4 * seen["hf"][0]
        finally:
            for h in handles:
                h.remove()


def test_latent_cache_made_under_inference_mode_used_under_no_grad():
    # The cache's buffers are written in place: made under inference_mode they are still normal
    # tensors, so generate-style use under no_grad works (and the other way round).
    cfg = make_config(heads=3, q_lora=24)
    hf, mine = attention_pair(cfg)
    for make_mode, use_mode in ((torch.inference_mode, torch.no_grad), (torch.no_grad, torch.inference_mode)):
        with make_mode():
            cache = LatentKVCache(1, 2, 8, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
        c_hf, past = hf_cache(cfg), 0
        for n in (5, 1):
            x = torch.randn(2, n, cfg.hidden_size)
            pe = rope_embeddings(cfg, (past + torch.arange(n))[None].expand(2, -1))
            with use_mode():
                want, _ = hf(x, pe, causal_additive_mask(2, n, past), cache=c_hf)
                got, _ = mine(x, pe, None, cache=cache)
            assert rel_err(got, want) <= 1e-4
            past += n
        assert cache.lengths(0) == [6, 6]


def _left_padded_mask(B: int, S: int, pads) -> torch.Tensor:
    """HF eager's fp32 additive mask ``[B, 1, S, S]`` of a prefill whose row ``b`` starts with
    ``pads[b]`` padding tokens (hidden as keys from every query)."""
    pad = torch.arange(S)[None, :] < torch.tensor(pads)[:, None]
    return causal_additive_mask(B, S, 0).masked_fill(pad[:, None, None, :], torch.finfo(torch.float32).min)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_padding_rows_match_hf_eager(dtype):
    # HF eager's fp32 additive mask (finfo(fp32).min) under autocast: cast to bf16 / fp16 it would be
    # -inf, and a fully masked (left-padding) query row would give 0 where HF, adding the fp32 mask
    # before an fp32 softmax, gives the uniform average. Those rows feed HF's causal-LM loss.
    cfg = make_config(heads=3, q_lora=24)
    hf, mine = attention_pair(cfg)
    B, S = 2, 8
    x = torch.randn(B, S, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.arange(S)[None].expand(B, -1))
    mask = _left_padded_mask(B, S, [3, 0])
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        want, _ = hf(x, pe, mask)
        got, _ = mine(x, pe, mask)
    assert want[0, :3].abs().max() > 0  # HF's padding rows are not 0
    assert rel_err(got[0, :3].float(), want[0, :3].float()) <= 3e-2
    assert rel_err(got.float(), want.float()) <= 3e-2


@pytest.mark.parametrize("q_lora", [None, 24])
def test_fp16_eager_padding_rows_match_hf(q_lora):
    # An fp16 module under HF eager's fp16 additive mask (finfo(fp16).min): HF adds it to fp16
    # scores, where it saturates, so a fully masked (left-padding) query row is the uniform average
    # over the keys; SDPA added it in fp32 and gave a softmax over the masked keys instead (those
    # rows feed HF's causal-LM loss, and through them the gradients of every token).
    cfg = make_config(heads=3, q_lora=q_lora)
    hf, mine = attention_pair(cfg)
    hf, mine = hf.half().train(), mine.half().train()
    B, S = 3, 9
    x = torch.randn(B, S, cfg.hidden_size).half()
    pe = tuple(t.half() for t in rope_embeddings(cfg, torch.arange(S)[None].expand(B, -1)))
    mask = _left_padded_mask(B, S, [0, 4, 7])
    mask = mask.clamp(min=torch.finfo(torch.float16).min).half()
    g = torch.randn(B, S, cfg.hidden_size).half()
    outs = []
    for m in (hf, mine):
        xi = x.clone().requires_grad_()
        out, _ = m(xi, pe, mask)
        out.backward(g)
        outs.append((out.float(), xi.grad.float(), {n: p.grad.float() for n, p in m.named_parameters()}))
    (want, gx_want, gp_want), (got, gx, gp) = outs
    assert rel_err(got[1:, :4], want[1:, :4]) <= 1e-2  # padding rows (through SDPA: 1 to 3)
    assert rel_err(got, want) <= 1e-2
    assert rel_err(gx, gx_want) <= 2e-2
    for n in gp_want:
        assert rel_err(gp[n], gp_want[n]) <= 2e-2, n


def test_fp16_eager_padding_rows_with_large_scores_follow_fp32():
    # With large scores HF's fp16 sum (score + finfo(fp16).min) no longer saturates evenly: it
    # rounds to steps of 32 or overflows to -inf (a row whose every score does is NaN, and NaN
    # reaches every token in the next layer). Ours gives the fp32 result (the uniform average),
    # as HF does in fp32.
    cfg = make_config(heads=3, q_lora=24)
    hf, mine = attention_pair(cfg)
    with torch.no_grad():
        for m in (hf, mine):
            m.q_b_proj.weight.mul_(3)
            m.kv_b_proj.weight.mul_(3)
    mine16, hf16 = copy.deepcopy(mine).half(), copy.deepcopy(hf).half()
    B, S = 2, 7
    x = torch.randn(B, S, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.arange(S)[None].expand(B, -1))
    mask = _left_padded_mask(B, S, [0, 5])
    mask16 = mask.clamp(min=torch.finfo(torch.float16).min).half()
    pe16 = tuple(t.half() for t in pe)
    with torch.no_grad():
        want, _ = hf(x, pe, mask)
        got, _ = mine16(x.half(), pe16, mask16)
        theirs, _ = hf16(x.half(), pe16, mask16)
    assert rel_err(theirs[1, :5], want[1, :5]) > 0.5  # (the case: HF's fp16 padding rows are off)
    assert torch.isfinite(got).all()
    assert rel_err(got[1, :5], want[1, :5]) <= 1e-2
    assert rel_err(got, want) <= 1e-2


def test_latent_cache_refuses_training_mode_with_attention_dropout():
    # The fused kernels apply no dropout: a module left in training mode with attention_dropout > 0
    # would decode as in eval mode, silently. It raises; eval() decodes.
    cfg = make_config(heads=3, q_lora=24)
    cfg.attention_dropout = 0.1
    hf, mine = attention_pair(cfg)
    cache = LatentKVCache(1, 2, 8, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    x = torch.randn(2, 3, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.arange(3)[None].expand(2, -1))
    mine.train()
    with torch.no_grad(), pytest.raises(ValueError, match="model.eval"):
        mine(x, pe, None, cache=cache)
    assert cache.lengths(0) == [0, 0]
    mine.eval()
    with torch.no_grad():
        want, _ = hf.eval()(x, pe, causal_additive_mask(2, 3, 0))
        got, _ = mine(x, pe, None, cache=cache)
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
@pytest.mark.parametrize("with_cache", [False, True])
def test_no_queries_give_an_empty_output(shape, with_cache):
    # An empty batch or no new tokens: HF's attention fails to reshape (and our kernels refuse empty
    # tensors); the module returns the empty [B, S, hidden] output, the cache untouched, and the
    # backward still reaches the parameters (zero gradients).
    cfg, _, mine = _pair(CASES[0])
    B, S = shape
    cache = hf_cache(cfg) if with_cache else None
    if cache is not None:
        prompt = torch.randn(2, 3, cfg.hidden_size)
        with torch.no_grad():
            mine(prompt, rope_embeddings(cfg, torch.arange(3).expand(2, 3)), None, past_key_values=cache)
        before = [t.clone() for t in (cache.layers[0].keys, cache.layers[0].values)]
    x = torch.randn(B, S, cfg.hidden_size, requires_grad=not with_cache)
    pos = torch.arange(S).expand(B, S)
    out, _ = mine(x, rope_embeddings(cfg, pos), None, past_key_values=cache)
    assert out.shape == (B, S, cfg.hidden_size)
    if cache is not None:
        assert cache.get_seq_length(0) == 3
        assert all(torch.equal(a, b) for a, b in zip(before, (cache.layers[0].keys, cache.layers[0].values)))
    else:
        out.sum().backward()
        assert mine.o_proj.weight.grad is not None and not mine.o_proj.weight.grad.any()
        # Frozen weights: the output still requires grad through hidden_states (zero gradients).
        mine.requires_grad_(False)
        out, _ = mine(x, rope_embeddings(cfg, pos), None)
        out.sum().backward()
        assert x.grad is not None and not x.grad.any()


@pytest.mark.parametrize("bad", ["narrow", "wide", "no_batch_dim", "other_tokens", "sin_only"])
@pytest.mark.parametrize("mode", ["training", "no_cache", "hf_cache", "latent_cache"])
def test_position_embeddings_of_the_wrong_shape_raise(bad, mode):
    # A cos / sin whose width is not qk_rope_head_dim was sliced silently on the prefill, training and
    # SDPA paths (interleaved RoPE takes cos[..., :R/2]): wrong outputs, no error. Every path checks
    # it now, naming the argument; the right shapes, [B, S, R] and the batch-shared [1, S, R], pass.
    cfg, _, mine = _pair(CASES[0])
    B, S, R = 2, 5, cfg.qk_rope_head_dim
    x = torch.randn(B, S, cfg.hidden_size, requires_grad=mode == "training")
    cos, sin = rope_embeddings(cfg, torch.arange(S).expand(B, S))
    cache = {"training": None, "no_cache": None, "hf_cache": hf_cache(cfg),
             "latent_cache": LatentKVCache(1, B, 16, cfg.kv_lora_rank, R)}[mode]
    bad_cos = {
        "narrow": cos[..., : R // 2], "wide": torch.cat([cos, cos], -1), "no_batch_dim": cos[0],
        "other_tokens": cos[:, :-1], "sin_only": cos,
    }[bad]
    bad_sin = sin[:, :, :-2] if bad == "sin_only" else bad_sin_like(bad_cos, sin)
    ctx = torch.enable_grad() if mode == "training" else torch.no_grad()
    with ctx:
        with pytest.raises(ValueError, match="position_embeddings' (cos|sin) has shape"):
            mine(x, (bad_cos, bad_sin), None, past_key_values=cache)
        for good in ((cos, sin), (cos[:1], sin[:1])):
            out, _ = mine(x, good, None, past_key_values=copy.deepcopy(cache))
            assert out.shape == (B, S, cfg.hidden_size) and torch.isfinite(out).all()


def bad_sin_like(bad_cos, sin):
    """sin cut or widened as bad_cos is (so only the shape's named check can catch it)."""
    if bad_cos.dim() != sin.dim():
        return sin[0]
    if bad_cos.shape[1] != sin.shape[1]:
        return sin[:, : bad_cos.shape[1]]
    w = bad_cos.shape[-1]
    return sin[..., :w] if w <= sin.shape[-1] else torch.cat([sin, sin], -1)


@pytest.mark.parametrize("kind", ["bool", "additive", "2d"])
@pytest.mark.parametrize("with_cache", [False, True, "latent"])
def test_4d_mask_missing_keys_raises(kind, with_cache):
    # A 4-D mask covering fewer keys than the layer attends over was padded with 'hidden' columns, so
    # the last queries silently lost their own keys (HF raises on the shape). Now ValueError; the full
    # mask still matches HF.
    cfg, hf, mine = _pair(CASES[0])
    B, S = 2, 4
    cache_hf, cache_mine = (hf_cache(cfg), hf_cache(cfg)) if with_cache else (None, None)
    if with_cache == "latent":  # (its mask analysis raises before any write too)
        cache_mine = LatentKVCache(1, B, 16, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    past = 0
    if with_cache:
        past = 3
        p = torch.randn(B, past, cfg.hidden_size)
        emb = rope_embeddings(cfg, torch.arange(past).expand(B, past))
        with torch.no_grad():
            hf(p, emb, causal_additive_mask(B, past, 0), past_key_values=cache_hf)
            mine(p, emb, causal_additive_mask(B, past, 0), past_key_values=cache_mine)
    x = torch.randn(B, S, cfg.hidden_size)
    emb = rope_embeddings(cfg, (past + torch.arange(S)).expand(B, S))
    additive = causal_additive_mask(B, S, past)
    full = {"bool": additive == 0, "additive": additive, "2d": torch.ones(B, past + S, dtype=torch.long)}[kind]
    with torch.no_grad():
        with pytest.raises(ValueError, match="'attention_mask' covers"):
            mine(x, emb, full[..., :-1], past_key_values=cache_mine)
        want, _ = hf(x, emb, additive, past_key_values=cache_hf)  # (HF eager adds the mask: additive)
        got, _ = mine(x, emb, full, past_key_values=cache_mine)
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("page_size", [None, 4])
def test_latent_cache_sdpa_prefill_ignores_stale_slots(monkeypatch, page_size):
    # The SDPA prefill on a LatentKVCache gathers every row up to the longest row's length: a
    # shorter row's slots past its own length hold old contents (here NaN; a reset() cache keeps
    # its old rows). Masked, they still reached the output through 0 x NaN in P.V. The kernel
    # never reads them; both paths now give what an unpoisoned cache gives.
    cfg, _, mine = _pair(CASES[0])
    B, S1, S2 = 2, 20, 18
    x1, x2 = torch.randn(B, S1, cfg.hidden_size), torch.randn(B, S2, cfg.hidden_size)
    m1 = torch.ones(B, S1, dtype=torch.long)
    m1[1, :15] = 0  # row 1: 5 real tokens, so 23 against row 0's 38 after the second step
    m2 = torch.cat([m1, torch.ones(B, S2, dtype=torch.long)], 1)
    pos = (m2.cumsum(1) - 1).clamp_min(0)
    pe1, pe2 = rope_embeddings(cfg, pos[:, :S1]), rope_embeddings(cfg, pos[:, S1:])
    for choice in ("kernel", "sdpa"):
        monkeypatch.setenv("LATENTMOE_MLA_MODULE_PREFILL", choice)
        outs = []
        for poison in (False, True):
            cache = LatentKVCache(1, B, 64, cfg.kv_lora_rank, cfg.qk_rope_head_dim, page_size=page_size)
            if poison:
                cache.kv[0].fill_(float("nan"))
            with torch.no_grad():
                mine(x1, pe1, m1, cache=cache)
                outs.append(mine(x2, pe2, m2, cache=cache)[0])
            assert cache.lengths(0) == [38, 23]
        assert torch.isfinite(outs[1]).all() and torch.equal(outs[0], outs[1]), choice


def test_short_mask_with_a_static_cache():
    # HF's StaticCache hands back its whole buffer: a 4-D mask covering the written keys but not the
    # unwritten slots is padded (those slots hidden) and matches HF with the full mask; one missing a
    # written key raises (checked on the host: the cache's length is a device tensor there).
    from transformers import StaticCache

    cfg, hf, mine = _pair(CASES[0])
    B, S, cap = 2, 5, 12
    x = torch.randn(B, S, cfg.hidden_size)
    emb = rope_embeddings(cfg, torch.arange(S).expand(B, S))
    full = torch.full((B, 1, S, cap), torch.finfo(torch.float32).min)
    full[..., :S] = causal_additive_mask(B, S, 0)
    with torch.no_grad():
        want, _ = hf(x, emb, full, past_key_values=StaticCache(config=cfg, max_cache_len=cap))
        got, _ = mine(x, emb, full[..., :S], past_key_values=StaticCache(config=cfg, max_cache_len=cap))
        with pytest.raises(ValueError, match="'attention_mask' covers 4 keys, but the layer attends over 5"):
            mine(x, emb, full[..., : S - 1], past_key_values=StaticCache(config=cfg, max_cache_len=cap))
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("S", [5, 20])  # the decode path (no grad, S <= decode_max_tokens), the prefill kernel
def test_vmap_over_inputs(S):
    # The README says vmap over inputs works for MultiHeadLatentAttention: each slice of the mapped
    # dimension as its own call (HF's output for each, too).
    cfg, hf, mine = _pair(CASES[0])
    B = 2
    xs = torch.randn(3, B, S, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.arange(S)[None].expand(B, -1))
    with torch.no_grad():
        got = torch.func.vmap(lambda x: mine(x, pe, None)[0])(xs)
        want = torch.stack([hf(x, pe, causal_additive_mask(B, S, 0))[0] for x in xs])
    assert got.shape == want.shape and rel_err(got, want) <= 1e-4


def test_block_mask_missing_keys_raises_before_the_cache_is_written():
    # A BlockMask over fewer keys than the cached plus new tokens took the last queries' own keys
    # away; it raises, and the HF cache is left as it was (checked before the write).
    from torch.nn.attention.flex_attention import create_block_mask

    cfg, _, mine = _pair(CASES[0])
    B, P, S = 2, 3, 4
    cache = hf_cache(cfg)
    with torch.no_grad():
        mine(torch.randn(B, P, cfg.hidden_size), rope_embeddings(cfg, torch.arange(P).expand(B, P)), None,
             past_key_values=cache)
        before = [t.clone() for t in (cache.layers[0].keys, cache.layers[0].values)]
        x = torch.randn(B, S, cfg.hidden_size)
        emb = rope_embeddings(cfg, (P + torch.arange(S)).expand(B, S))
        short = create_block_mask(lambda b, h, q, k: k <= q + P, B, 1, S, P + S - 1, device="cpu")
        with pytest.raises(ValueError, match="'attention_mask' covers 6 keys, but the layer attends over 7"):
            mine(x, emb, short, past_key_values=cache)
    assert cache.get_seq_length(0) == P
    assert all(torch.equal(a, b) for a, b in zip(before, (cache.layers[0].keys, cache.layers[0].values)))
