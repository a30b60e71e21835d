"""``model.generate(..., cache=LatentKVCache(...))`` in a stock HF ``DeepseekV3ForCausalLM`` whose
attention modules are latentmoe's ``MultiHeadLatentAttention``, against HF's own run with a
``DynamicCache`` (same weights): the same generated ids, logits within LOGITS_TOL."""

from __future__ import annotations

import functools

import pytest
import torch

from latentmoe.nn import LatentKVCache, MultiHeadLatentAttention
from test_mla_common import (
    attention_pair,
    causal_additive_mask,
    hf_cache,
    hf_model_pair,
    make_config,
    rel_err,
    rope_embeddings,
)

LOGITS_TOL = 1e-5  # max |ours - HF| / max |HF| over the logits of every step
PAD = 0


@functools.lru_cache(maxsize=None)
def _models(attn_impl: str = "sdpa", moe: bool = False):
    """(config, HF model, the same model with our attention in every layer), 2 layers, random weights.
    Dense MLPs unless ``moe`` (then layer 1 is a routed-experts layer). Cached: generate does not
    change the models."""
    from transformers import DeepseekV3ForCausalLM

    return hf_model_pair(DeepseekV3ForCausalLM, attn_impl, moe)


def _on(device: str, *models):
    """Copies of ``models`` on ``device`` (the cached CPU models stay as they are)."""
    import copy

    return [m if device == "cpu" else copy.deepcopy(m).to(device) for m in models]


def _cache(cfg, batch, capacity, page_size=None, **kw):
    return LatentKVCache(
        cfg.num_hidden_layers, batch, capacity, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
        page_size=page_size, **kw,
    )


def _prompts(P: int, pads, seed: int = 1):
    """``len(pads)`` prompts of P tokens, row b left-padded with ``pads[b]`` pad tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (len(pads), P), generator=g)
    mask = torch.ones(len(pads), P, dtype=torch.long)
    for b, n in enumerate(pads):
        ids[b, :n], mask[b, :n] = PAD, 0
    return ids, mask


def _greedy(**kw):
    return dict(do_sample=False, pad_token_id=PAD, return_dict_in_generate=True, output_logits=True, **kw)


def _assert_same(ours, hf):
    assert torch.equal(ours.sequences, hf.sequences), (ours.sequences, hf.sequences)
    assert len(ours.logits) == len(hf.logits)
    for step, (a, b) in enumerate(zip(ours.logits, hf.logits)):
        err = float((a - b).abs().max() / b.abs().max())
        assert err <= LOGITS_TOL, (step, err)


def _no_sdpa(monkeypatch):
    """Fail if the module falls back to decompressed K/V: with plain projections, a LatentKVCache
    runs the fused kernels at every step, padded or not, its prefill steps on mla_prefill (asked
    for: on CUDA the default there is SDPA, LATENTMOE_MLA_MODULE_PREFILL)."""

    def fail(*args, **kwargs):
        raise AssertionError("the SDPA path ran")

    monkeypatch.setenv("LATENTMOE_MLA_MODULE_PREFILL", "kernel")
    monkeypatch.setattr(MultiHeadLatentAttention, "_sdpa_attention", fail)


@pytest.mark.parametrize("page_size", [None, 4])
@pytest.mark.parametrize("P", [7, 20])  # prefill through mla_decode (<= 16 tokens) / mla_prefill
@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_greedy_left_padded_batch_matches_dynamic_cache(monkeypatch, device, attn_impl, P, page_size):
    cfg, hf, ours = _models(attn_impl)
    hf, ours = _on(device, hf, ours)
    pads, new = [0, 3, 5], 6
    ids, mask = (t.to(device) for t in _prompts(P, pads))
    want = hf.generate(ids, attention_mask=mask, **_greedy(max_new_tokens=new))
    cache = _cache(cfg, 3, P + new - 1, page_size, device=device)
    _no_sdpa(monkeypatch)
    got = ours.generate(ids, attention_mask=mask, cache=cache, **_greedy(max_new_tokens=new))
    _assert_same(got, want)
    assert got.cache is cache
    # Padding is not stored: each row holds its prompt and the generated tokens fed back.
    for layer in range(cfg.num_hidden_layers):
        assert cache.lengths(layer) == [P - n + new - 1 for n in pads]
        assert cache.seqlens[layer].tolist() == cache.lengths(layer)
        assert cache.get_seq_length(layer) == P + new - 1


@pytest.mark.parametrize("page_size", [None, 4])
def test_greedy_left_padded_batch_with_sdpa_prefill(monkeypatch, device, page_size):
    # LATENTMOE_MLA_MODULE_PREFILL=sdpa (CUDA's default): the prompt's step runs SDPA on each row's
    # latents gathered from the cache (padding left out) and decompressed, the decode steps the
    # fused kernels; the same greedy ids and logits as HF's.
    monkeypatch.setenv("LATENTMOE_MLA_MODULE_PREFILL", "sdpa")
    cfg, hf, ours = _models("sdpa")
    hf, ours = _on(device, hf, ours)
    pads, new, P = [0, 3, 5], 6, 20
    ids, mask = (t.to(device) for t in _prompts(P, pads))
    want = hf.generate(ids, attention_mask=mask, **_greedy(max_new_tokens=new))
    cache = _cache(cfg, 3, P + new - 1, page_size, device=device)
    calls = []
    real = MultiHeadLatentAttention._sdpa_attention
    monkeypatch.setattr(MultiHeadLatentAttention, "_sdpa_attention",
                        lambda self, *a, **k: calls.append(a[0].shape[1]) or real(self, *a, **k))
    got = ours.generate(ids, attention_mask=mask, cache=cache, **_greedy(max_new_tokens=new))
    _assert_same(got, want)
    assert calls == [P] * cfg.num_hidden_layers  # the prompt's step in every layer, no decode step
    for layer in range(cfg.num_hidden_layers):
        assert cache.lengths(layer) == [P - n + new - 1 for n in pads]


@pytest.mark.parametrize("page_size", [None, 3])
def test_greedy_without_padding_and_deprecated_kwarg(page_size):
    # No attention mask at all (HF drops an all-ones one), and the cache passed under the name
    # transformers deprecates (past_key_values=) but still accepts.
    cfg, hf, ours = _models("sdpa")
    ids, _ = _prompts(9, [0, 0])
    want = hf.generate(ids, **_greedy(max_new_tokens=5))
    cache = _cache(cfg, 2, 13, page_size)
    with pytest.warns(FutureWarning, match="past_key_values"):
        got = ours.generate(ids, past_key_values=cache, **_greedy(max_new_tokens=5))
    _assert_same(got, want)
    assert cache.lengths(0) == cache.lengths(1) == [13, 13]


def test_model_with_routed_experts():
    # The stock layer stack with a routed-experts layer (only attention is swapped).
    cfg, hf, ours = _models("sdpa", moe=True)
    ids, mask = _prompts(8, [0, 2])
    want = hf.generate(ids, attention_mask=mask, **_greedy(max_new_tokens=5))
    got = ours.generate(ids, attention_mask=mask, cache=_cache(cfg, 2, 12), **_greedy(max_new_tokens=5))
    _assert_same(got, want)


@pytest.mark.parametrize("page_size", [None, 4])
def test_beam_search_reorders_rows(device, page_size):
    cfg, hf, ours = _models("eager")
    hf, ours = _on(device, hf, ours)
    ids, mask = (t.to(device) for t in _prompts(8, [0, 3]))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True,
              output_scores=True)
    want = hf.generate(ids, attention_mask=mask, **kw)
    cache = _cache(cfg, 2 * 3, 8 + 6 - 1, page_size, device=device)  # batch * num_beams rows
    orders, reorder = [], cache.reorder_cache

    def spy(beam_idx):
        orders.append(beam_idx.tolist())
        reorder(beam_idx)

    cache.reorder_cache = spy
    got = ours.generate(ids, attention_mask=mask, cache=cache, **kw)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=0, atol=1e-5)
    assert any(o != list(range(6)) for o in orders)  # rows really moved


@pytest.mark.parametrize("how", ["prompt_lookup", "assistant_model"])
def test_assisted_decoding_crops_rejected_drafts(how):
    # Assisted generation (batch 1): each step verifies the drafted tokens in one forward and crops
    # the rejected ones from the cache. Drafts from prompt lookup, or from a second model (HF's own,
    # with its own DynamicCache: the routed-experts variant, so some drafts are rejected).
    cfg, hf, ours = _models("sdpa")
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])
    if how == "prompt_lookup":
        kw = _greedy(max_new_tokens=12, prompt_lookup_num_tokens=3)
    else:
        kw = _greedy(max_new_tokens=12, assistant_model=_models("sdpa", moe=True)[1])
    want = hf.generate(ids, **kw)
    assert torch.equal(want.sequences, hf.generate(ids, **_greedy(max_new_tokens=12)).sequences)
    cache = _cache(cfg, 1, 40, page_size=4)
    crops, crop = [], cache.crop
    cache.crop = lambda n: (crops.append(n), crop(n))[1]
    got = ours.generate(ids, cache=cache, **kw)
    _assert_same(got, want)
    assert any(n < 0 for n in crops)
    assert cache.get_seq_length() == cache.lengths(0)[0] == got.sequences.shape[1] - 1


def test_continue_generation_then_reset():
    # A second generate call continues from the cache (full ids and mask passed again); reset()
    # empties it for a new batch.
    from transformers import DynamicCache

    cfg, hf, ours = _models("eager")
    ids, mask = _prompts(6, [0, 2])
    dyn, cache = DynamicCache(config=cfg), _cache(cfg, 2, 6 + 8 - 1)
    first_hf = hf.generate(ids, attention_mask=mask, cache=dyn, **_greedy(max_new_tokens=4))
    first = ours.generate(ids, attention_mask=mask, cache=cache, **_greedy(max_new_tokens=4))
    _assert_same(first, first_hf)
    mask2 = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], dim=1)
    second_hf = hf.generate(first_hf.sequences, attention_mask=mask2, cache=dyn, **_greedy(max_new_tokens=4))
    second = ours.generate(first.sequences, attention_mask=mask2, cache=cache, **_greedy(max_new_tokens=4))
    _assert_same(second, second_hf)
    assert cache.lengths(0) == [13, 11]
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.lengths(1) == [0, 0]
    _assert_same(ours.generate(ids, attention_mask=mask, cache=cache, **_greedy(max_new_tokens=4)), first_hf)


@pytest.mark.parametrize("page_size", [None, 4])
@pytest.mark.parametrize("P2", [5, 20])  # the new turn's step through mla_decode (<= 16 tokens) / mla_prefill
def test_continue_with_a_left_padded_new_turn(monkeypatch, device, P2, page_size):
    # Multi-turn chat: a second generate call appends each row's next turn, left-padded to a common
    # length, after the first call's output. The previous turn's last token is not cached yet, so
    # that step holds [last token, padding, new turn]: padding between a row's real tokens.
    from transformers import DynamicCache

    cfg, hf, ours = _models("sdpa")
    hf, ours = _on(device, hf, ours)
    pads, new = [0, 2, 4], 4
    ids, mask = (t.to(device) for t in _prompts(6, pads))
    capacity = 6 + new + P2 + new - 1
    dyn, cache = DynamicCache(config=cfg), _cache(cfg, 3, capacity, page_size, device=device)
    _no_sdpa(monkeypatch)
    first_hf = hf.generate(ids, attention_mask=mask, cache=dyn, **_greedy(max_new_tokens=new))
    first = ours.generate(ids, attention_mask=mask, cache=cache, **_greedy(max_new_tokens=new))
    _assert_same(first, first_hf)
    turn_pads = [P2 - 1, 0, 3]
    turn, turn_mask = (t.to(device) for t in _prompts(P2, turn_pads, seed=2))
    ids2 = torch.cat([first.sequences, turn], dim=1)
    mask2 = torch.cat([mask, torch.ones(3, new, dtype=torch.long, device=device), turn_mask], dim=1)
    second_hf = hf.generate(ids2, attention_mask=mask2, cache=dyn, **_greedy(max_new_tokens=new))
    second = ours.generate(ids2, attention_mask=mask2, cache=cache, **_greedy(max_new_tokens=new))
    _assert_same(second, second_hf)
    for layer in range(cfg.num_hidden_layers):
        assert cache.lengths(layer) == [6 - a + new + P2 - b + new - 1 for a, b in zip(pads, turn_pads)]
        assert cache.get_seq_length(layer) == capacity


def test_wrapped_kv_b_proj_left_padded():
    # A hooked kv_b_proj takes the path that decompresses K/V through the layer (SDPA), where
    # padding queries see no key at all: their rows must not turn into NaN anywhere.
    cfg, hf, ours = _models("sdpa")
    calls = []
    handles = [layer.self_attn.kv_b_proj.register_forward_hook(lambda *a: calls.append(1))
               for layer in ours.model.layers]
    try:
        ids, mask = _prompts(7, [0, 4])
        want = hf.generate(ids, attention_mask=mask, **_greedy(max_new_tokens=4, output_hidden_states=True))
        got = ours.generate(ids, attention_mask=mask, cache=_cache(cfg, 2, 10),
                            **_greedy(max_new_tokens=4, output_hidden_states=True))
    finally:
        for h in handles:
            h.remove()
    assert calls
    _assert_same(got, want)
    assert all(torch.isfinite(h).all() for step in got.hidden_states for h in step)


def test_capacity_overflow_is_refused_and_writes_nothing():
    cfg, hf, ours = _models("sdpa")
    ids, mask = _prompts(6, [0, 2])
    cache = _cache(cfg, 2, 8)  # needs 6 + 5 - 1 = 10
    with pytest.raises(ValueError, match="capacity is 8"):
        ours.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=5, do_sample=False,
                      pad_token_id=PAD)
    # The prefill and two decode steps went in; the step that did not fit changed nothing.
    for layer in range(2):
        assert cache.get_seq_length(layer) == 8 and cache.lengths(layer) == [8, 6]


def test_overflow_of_a_later_layer_is_refused_before_the_first_is_written():
    # Layers trimmed apart: layer 0 has room for the step, layer 1 does not. The step must raise
    # before layer 0 is written (it was advanced, then layer 1 raised: the layers disagreed).
    cfg, hf, ours = _models("sdpa")
    ids, mask = _prompts(8, [0, 0])
    cache = _cache(cfg, 2, 8)
    with torch.no_grad():
        ours(ids, attention_mask=mask, cache=cache)
        cache.trim([5, 4], layer_idx=0)
        kv0 = cache.kv[0].clone()
        with pytest.raises(ValueError, match="layer 1 would hold 9 tokens but capacity is 8"):
            ours(ids[:, :1], cache=cache)
    assert cache.lengths(0) == [5, 4] and cache.get_seq_length(0) == 5
    assert cache.lengths(1) == [8, 8] and cache.get_seq_length(1) == 8
    assert torch.equal(cache.kv[0], kv0)


def test_reserve_tracks_every_layers_longest_row():
    # reserve() reads a running maximum per layer (no scan of every row per step): after any mix
    # of advance / trim / crop / reorder_cache / reset it must refuse exactly the steps that would
    # overflow some layer (layer 0 checks them all).
    gen = torch.Generator().manual_seed(11)
    rand = lambda n: int(torch.randint(n, (), generator=gen))  # noqa: E731
    L, B, cap = 3, 3, 12
    cache = LatentKVCache(L, B, cap, 4, 2)
    for _ in range(300):
        op, layer = rand(6), rand(L)
        held = cache.lengths(layer)
        if op == 0 and max(held) < cap:
            cache.advance(layer, rand(cap - max(held) + 1))
        elif op == 1 and max(held) + 2 <= cap:
            cache.advance(layer, [rand(3) for _ in range(B)], positions=2)
        elif op == 2:
            cache.trim([rand(h + 1) for h in held], layer_idx=layer)
        elif op == 3:
            cache.reorder_cache(torch.randint(B, (B,), generator=gen))
        elif op == 4:
            n = min(cache.get_seq_length(i) - cache._dense_from[i] for i in range(L))
            cache.crop(-rand(n + 1))
        elif rand(10) == 0:
            cache.reset()
        for i in range(L):
            most = max(cache.lengths(i))
            for n_new in range(cap - most, cap - most + 2):
                over = max(max(cache.lengths(j)) for j in range(L)) + n_new > cap if i == 0 else most + n_new > cap
                if over:
                    with pytest.raises(ValueError, match="would hold"):
                        cache.reserve(i, n_new)
                else:
                    cache.reserve(i, n_new)


def test_refusals():
    cfg, hf, ours = _models("sdpa")
    ids, mask = _prompts(6, [0, 2])
    kw = dict(max_new_tokens=2, do_sample=False, pad_token_id=PAD)
    with pytest.raises(ValueError, match="num_beams"):  # beams need batch * num_beams rows
        ours.generate(ids, attention_mask=mask, cache=_cache(cfg, 2, 16), num_beams=2, **kw)
    with pytest.raises(ValueError, match="update"):  # HF's own attention cannot write latents
        hf.generate(ids, attention_mask=mask, cache=_cache(cfg, 2, 16), **kw)
    cache = _cache(cfg, 2, 16)
    with pytest.raises(ValueError, match="right padding"):  # HF only logs a warning for it
        ours.generate(ids.flip(1), attention_mask=mask.flip(1), cache=cache, **kw)
    assert cache.get_seq_length() == 0 and cache.lengths(0) == [0, 0]


def test_crop_and_reorder_arguments():
    cfg, hf, ours = _models("sdpa")
    ids, mask = _prompts(6, [0, 2])
    cache = _cache(cfg, 2, 16)
    ours.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    assert cache.get_seq_length() == 9 and cache.lengths(0) == [9, 7]
    with pytest.raises(ValueError, match="tokens_to_remove"):
        cache.crop(2)  # HF's convention is negative
    with pytest.raises(ValueError, match="only its last 7"):
        cache.crop(-8)  # back into the prompt, where row 1 holds padding
    cache.crop(0)
    cache.crop(-7)
    assert cache.get_seq_length(1) == 2 and cache.lengths(1) == [2, 0] and cache.seqlens[1].tolist() == [2, 0]
    with pytest.raises(ValueError, match="beam_idx"):
        cache.reorder_cache(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="beam_idx"):
        cache.reorder_cache(torch.tensor([0.0, 1.0]))
    cache.reorder_cache(torch.tensor([0, 0]))
    assert cache.lengths(0) == [2, 2] and torch.equal(cache.kv[0][1, :2], cache.kv[0][0, :2])
    table = torch.tensor([[0, 1], [0, 1]], dtype=torch.int32)  # both rows on the same pages
    shared = _cache(cfg, 2, 8, page_size=4, num_pages=2, block_table=table)
    shared.advance(0, 1)
    with pytest.raises(ValueError, match="share pages"):
        shared.reorder_cache(torch.tensor([1, 0]))


def test_cache_interface_values():
    # What transformers' generate and mask builders read from a cache.
    cfg, _, _ = _models("sdpa")
    cache = _cache(cfg, 2, 16)
    assert cache.is_compileable is False and cache.is_croppable is True
    assert cache.is_sliding == cache.is_linear == [False, False]
    cache.advance(0, [3, 1], positions=4)
    assert cache.get_seq_length(0) == cache.get_query_offset(0) == 4 and cache.lengths(0) == [3, 1]
    assert cache.get_mask_sizes(2, 0) == (6, 0) and cache.get_max_length() == 16
    cache.activate_past_recording()  # nothing to record: every token is kept
    cache.activate_past_recording(recurrent_states_to_keep=3)  # transformers >= 5.25 passes this
    assert cache.get_recurrent_states_to_keep() == cache.get_recurrent_states_to_keep(1) == 0
    assert cache.is_recording_past(0) is False
    with pytest.raises(ValueError, match="layer_idx"):
        cache.get_recurrent_states_to_keep(2)
    with pytest.raises(ValueError, match="n_new"):
        cache.advance(0, [5, 1], positions=4)


def test_module_padding_in_a_later_step():
    # Module level: a row's padding may also come in a later step, before that step's real tokens
    # (e.g. a chunked prefill): real queries match HF's masked attention, padding queries give 0.
    cfg = make_config(heads=3, q_lora=24)
    hf, mine = attention_pair(cfg)
    B, T = 2, 7
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 3:5] = False  # row 1: 3 tokens, 2 padding, 2 tokens
    pos = (keep.long().cumsum(1) - 1).clamp_min(0)
    x = torch.randn(B, T, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    c_hf, c_mine = hf_cache(cfg), LatentKVCache(1, B, 8, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    for lo, hi in ((0, 3), (3, T)):
        mask = causal_additive_mask(B, hi - lo, lo).masked_fill(~keep[:, None, None, :hi], torch.finfo().min)
        pe = rope_embeddings(cfg, pos[:, lo:hi])
        with torch.no_grad():
            want, _ = hf(x[:, lo:hi], pe, mask, cache=c_hf)
            got, _ = mine(x[:, lo:hi], pe, mask, cache=c_mine)
        real = keep[:, lo:hi]
        assert rel_err(got[real], want[real]) <= 1e-4
        assert torch.all(got[~real] == 0)
    assert c_mine.lengths(0) == [7, 5] and c_mine.get_seq_length(0) == 7
    # A decode step whose mask disagrees with what the rows hold (row 0 never had padding) is refused.
    keep = torch.cat([keep, torch.ones(B, 1, dtype=torch.bool)], dim=1)
    keep[0, 0] = False
    mask = causal_additive_mask(B, 1, T).masked_fill(~keep[:, None, None, :], torch.finfo().min)
    pe = rope_embeddings(cfg, pos[:, -1:] + 1)
    with torch.no_grad(), pytest.raises(ValueError, match=r"shows \[6, 5\] unpadded earlier keys"):
        mine(x[:, :1], pe, mask, cache=c_mine)
    assert c_mine.lengths(0) == [7, 5] and c_mine.get_seq_length(0) == 7


def test_crop_stops_at_padding_between_real_tokens():
    # Padding between a row's real tokens of one step (a continued batch's new left-padded turn):
    # crop() may give back only the positions after the step's last padding. It took the padding to
    # come first in each row, allowed one position too many, and took a real token from the row.
    cfg = make_config(heads=3, q_lora=24)
    hf, mine = attention_pair(cfg)
    B, T = 2, 7
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 4:6] = False  # row 1, second step (positions 3..6): token, 2 padding, token
    pos = (keep.long().cumsum(1) - 1).clamp_min(0)
    x = torch.randn(B, T + 1, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    c_hf, c_mine = hf_cache(cfg), LatentKVCache(1, B, 9, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    for lo, hi in ((0, 3), (3, T)):
        mask = causal_additive_mask(B, hi - lo, lo).masked_fill(~keep[:, None, None, :hi], torch.finfo().min)
        with torch.no_grad():
            hf(x[:, lo:hi], rope_embeddings(cfg, pos[:, lo:hi]), mask, cache=c_hf)
            mine(x[:, lo:hi], rope_embeddings(cfg, pos[:, lo:hi]), mask, cache=c_mine)
    assert c_mine.lengths(0) == [7, 5]
    with pytest.raises(ValueError, match="can give back only its last 1 of 7 positions"):
        c_mine.crop(-2)
    assert c_mine.lengths(0) == [7, 5] and c_mine.get_seq_length(0) == 7
    c_mine.crop(-1)
    c_hf.crop(-1)
    assert c_mine.lengths(0) == [6, 4] and c_mine.get_seq_length(0) == 6
    # The next token at position 6 again: the same attention as HF's cropped cache.
    keep = torch.cat([keep[:, :6], torch.ones(B, 1, dtype=torch.bool)], dim=1)
    mask = causal_additive_mask(B, 1, 6).masked_fill(~keep[:, None, None, :], torch.finfo().min)
    pe = rope_embeddings(cfg, (keep.long().cumsum(1) - 1)[:, -1:])
    with torch.no_grad():
        want, _ = hf(x[:, T:], pe, mask, cache=c_hf)
        got, _ = mine(x[:, T:], pe, mask, cache=c_mine)
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("hooked", [False, True])  # fused kernels / decompressed K/V (SDPA)
@pytest.mark.parametrize("page_size", [None, 1, 5])
def test_module_random_padding_patterns(hooked, page_size):
    # Module level, several steps (decode and prefill sizes) with padding anywhere but after a row's
    # last real token of the step (a step may also be all padding): real queries match HF's
    # masked attention over its DynamicCache (which keeps the padding), padding queries give 0.
    cfg = make_config(heads=3, q_lora=None)
    hf, mine = attention_pair(cfg)
    calls = []
    if hooked:
        mine.kv_b_proj.register_forward_hook(lambda *a: calls.append(1))
    g = torch.Generator().manual_seed(11)
    B, steps = 4, [1, 6, 1, 19, 3, 1]
    T = sum(steps)
    keep = torch.rand(B, T, generator=g) > 0.4
    lo = 0
    for S in steps:  # each row's last token of a step is real unless the whole step is padding
        seg = keep[:, lo:lo + S]
        seg[:, -1] |= seg.any(1)
        lo += S
    keep[0, :] = True  # one row without padding
    keep[1, 1:7] = False  # one row whose whole second step is padding
    pos = (keep.long().cumsum(1) - 1).clamp_min(0)
    x = torch.randn(B, T, cfg.hidden_size, generator=g)
    c_hf = hf_cache(cfg)
    c_mine = LatentKVCache(1, B, T, cfg.kv_lora_rank, cfg.qk_rope_head_dim, page_size=page_size)
    lo = 0
    for S in steps:
        hi = lo + S
        mask = causal_additive_mask(B, S, lo).masked_fill(~keep[:, None, None, :hi], torch.finfo().min)
        pe = rope_embeddings(cfg, pos[:, lo:hi])
        with torch.no_grad():
            want, _ = hf(x[:, lo:hi], pe, mask, cache=c_hf)
            got, _ = mine(x[:, lo:hi], pe, mask, cache=c_mine)
        real = keep[:, lo:hi]
        if real.any():
            assert rel_err(got[real], want[real]) <= 1e-4, S
        assert torch.all(got[~real] == 0)
        assert c_mine.lengths(0) == keep[:, :hi].sum(1).tolist() and c_mine.get_seq_length(0) == hi
        lo = hi
    assert bool(calls) == hooked


def test_plain_mask_after_left_out_padding_is_refused():
    # Rows that left padding out hold fewer tokens than positions: a continuation without a mask
    # (pad == eos, so HF cannot infer one: it attends over the pads it stored) cannot be honoured
    # and must raise, not attend at the wrong rotary positions. trim() / reset() start over.
    cfg, hf, ours = _models("sdpa")
    ids, mask = _prompts(6, [0, 3])
    kw = dict(do_sample=False, pad_token_id=PAD, eos_token_id=PAD)
    cache = _cache(cfg, 2, 30)
    first = ours.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=3, **kw)
    assert cache.lengths(0) == [8, 5] and cache.get_seq_length(0) == 8
    with pytest.raises(ValueError, match=r"rows hold \[8, 5\] tokens of 8 positions"):
        ours.generate(first, cache=cache, max_new_tokens=2, **kw)
    assert cache.lengths(0) == [8, 5]  # nothing written
    cache.trim(cache.lengths(0))  # the rows' lengths as they are: from here the rows are the truth
    ours.generate(first, cache=cache, max_new_tokens=1, **kw)


def test_advance_takes_index_like_counts_and_empty_steps_are_refused():
    import numpy as np

    cfg, _, ours = _models("sdpa")
    cache = _cache(cfg, 2, 16)
    cache.advance(0, np.int64(2))
    cache.advance(0, torch.tensor(1))
    assert cache.lengths(0) == [3, 3] and cache.get_seq_length(0) == 3
    for bad in (4, -2, 0):  # out of range; 0 leaves 3 positions after it, but row 1 got only 2 tokens
        with pytest.raises(ValueError, match="'last_padding' must be in"):
            cache.advance(0, [4, 2], positions=4, last_padding=bad)
    assert cache.lengths(0) == [3, 3] and cache.get_seq_length(0) == 3
    cache.advance(0, [4, 2], positions=4, last_padding=1)
    assert cache.lengths(0) == [7, 5] and cache.get_seq_length(0) == 7
    with pytest.raises(ValueError, match="can give back only its last 2 of 7"):
        cache.crop(-3)
    cache.reset()
    cache.advance(0, np.int64(3))
    attn = ours.model.layers[0].self_attn
    x = torch.zeros(2, 0, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.zeros(2, 0, dtype=torch.long))
    with torch.no_grad(), pytest.raises(ValueError, match="no new tokens"):
        attn(x, pe, None, cache=cache)


def test_mask_analysis_once_per_step(monkeypatch):
    # Every layer of a step gets the same mask tensor: its analysis (host syncs on a GPU) runs in
    # the first layer only, and again at every step; the ids stay HF's. crop / reorder_cache /
    # reset / trim drop the kept analysis.
    cfg, hf, ours = _models("eager")  # eager: HF passes a 4-D mask at every step
    calls = []
    orig = MultiHeadLatentAttention._analyse_latent_cache_mask
    monkeypatch.setattr(MultiHeadLatentAttention, "_analyse_latent_cache_mask",
                        lambda self, *a: (calls.append(self.layer_idx), orig(self, *a))[1])
    ids, mask = _prompts(6, [0, 2])
    new = 4
    want = hf.generate(ids, attention_mask=mask, **_greedy(max_new_tokens=new))
    cache = _cache(cfg, 2, 6 + new - 1)
    got = ours.generate(ids, attention_mask=mask, cache=cache, **_greedy(max_new_tokens=new))
    _assert_same(got, want)
    assert cfg.num_hidden_layers == 2 and calls == [0] * new
    for drop in (lambda c: c.crop(0), lambda c: c.reorder_cache(torch.tensor([1, 0])), lambda c: c.reset(),
                 lambda c: c.trim(c.lengths(0))):
        cache._mask_memo = ("key", 0, (True, None, None))
        drop(cache)
        assert cache._mask_memo is None


def test_mask_memo_is_tied_to_the_mask_tensor(monkeypatch):
    # The memo was keyed by the mask's id and address only: a mask made per layer and freed can
    # leave the next layer's mask (other values) at the same id and address, which then reused the
    # first one's analysis. The memo now also holds the tensor by a weak reference (forged here:
    # a key matching another tensor), and copies of the cache drop it (pickle cannot hold one).
    import pickle

    cfg, _, ours = _models("eager")
    layers = [layer.self_attn for layer in ours.model.layers]
    calls = []
    orig = MultiHeadLatentAttention._analyse_latent_cache_mask
    monkeypatch.setattr(MultiHeadLatentAttention, "_analyse_latent_cache_mask",
                        lambda self, *a: (calls.append(self.layer_idx), orig(self, *a))[1])
    cache = _cache(cfg, 2, 8)
    B, S = 2, 3
    m1 = torch.full((B, 1, S, S), float("-inf")).triu(1)
    layers[0]._latent_cache_new_tokens(m1, B, S, cache)
    layers[1]._latent_cache_new_tokens(m1, B, S, cache)
    assert calls == [0]
    m2 = m1.clone()
    key, layer, result, ref = cache._mask_memo
    cache._mask_memo = ((id(m2), m2.data_ptr()) + key[2:], 0, result, ref)
    layers[1]._latent_cache_new_tokens(m2, B, S, cache)
    assert calls == [0, 1]
    assert cache._mask_memo is not None and pickle.loads(pickle.dumps(cache))._mask_memo is None


def _continuous_batching():
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.25"):
        pytest.skip("HF's continuous batching of MLA latents needs transformers >= 5.25 (HF's own model fails before)")
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=-1)
    # Small pages: a prompt of 19 tokens spans two; up to 64 tokens per step (several requests packed).
    return dict(generation_config=gen, progress_bar=False, warmup=False,
                continuous_batching_config=ContinuousBatchingConfig(num_blocks=16, page_size=8, max_batch_tokens=64))


@pytest.mark.parametrize("attn_impl, moe", [("sdpa", False), ("eager", True)])
def test_continuous_batching_matches_hf(attn_impl, moe):
    # transformers 5.25's generate_batch keeps MLA latents in its PagedAttentionCache and packs every
    # request of a step into one sequence (keys handed back by cache.update, a 4-D mask keeping the
    # requests apart). The module failed on it (get_seq_length), which HF only logs: empty outputs.
    kw = _continuous_batching()
    cfg, hf, ours = _models(attn_impl, moe)
    g = torch.Generator().manual_seed(5)
    reqs = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (6, 3, 19, 1)]
    want = hf.generate_batch(inputs=reqs, **kw)
    got = ours.generate_batch(inputs=reqs, **kw)
    want = {k: v.generated_tokens for k, v in want.items()}
    got = {k: v.generated_tokens for k, v in got.items()}
    assert all(len(v) == 5 for v in want.values())
    assert got == want
    # Each request alone, with HF's plain generate: what continuous batching must reproduce.
    for r, key in zip(reqs, sorted(want)):
        alone = hf.generate(torch.tensor([r]), generation_config=kw["generation_config"])  # (no EOS stop)
        assert alone[0, len(r):].tolist() == want[key]


def test_paged_cache_modes_the_module_cannot_attend_are_refused():
    cfg = make_config(heads=3, q_lora=24)
    attn = MultiHeadLatentAttention(cfg, 0).eval()
    x = torch.randn(1, 4, cfg.hidden_size)
    pe = rope_embeddings(cfg, torch.arange(4)[None])

    class Paged:  # what the module may touch of HF's PagedAttentionCache: nothing before the checks
        pass

    index = dict(write_index=[torch.arange(4)], read_index=[torch.arange(4)])
    with torch.no_grad(), pytest.raises(ValueError, match="block-table mode"):
        attn(x, pe, causal_additive_mask(1, 4, 4), cache=Paged(), block_table=torch.zeros(1, 1), **index)
    with torch.no_grad(), pytest.raises(ValueError, match="cu_seq_lens_q / cu_seq_lens_k"):
        attn(x, pe, None, cache=Paged(), **index)  # no mask and nothing to build one from
    with torch.no_grad(), pytest.raises(ValueError, match="4-D attention mask or none"):
        attn(x, pe, torch.ones(1, 4), cache=Paged(), **index)


def test_continuous_batching_without_a_mask_builds_the_packed_causal_one():
    # HF's flash-attention path (e.g. auto_switch_to_flash on a GPU) passes no mask to a packed step,
    # only cu_seq_lens_q / cu_seq_lens_k: the module builds the block-diagonal causal mask itself.
    # Here HF's sdpa run drops the mask before our module sees it; the mask built must equal HF's.
    from latentmoe.nn.mla import _packed_causal_keep

    kw = _continuous_batching()
    cfg, hf, ours = _models("sdpa", False)
    g = torch.Generator().manual_seed(6)
    reqs = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (6, 3, 19, 1)]
    want = {k: v.generated_tokens for k, v in hf.generate_batch(inputs=reqs, **kw).items()}
    steps = []

    def no_mask(module, args, kwargs):
        mask = kwargs.pop("attention_mask", None)
        if module.layer_idx == 0:
            cu_k = kwargs["cu_seq_lens_k"]
            # (clones: HF rewrites its mask and lengths buffers in place at each step)
            steps.append((mask.clone(), kwargs["cu_seq_lens_q"].clone(), next(iter(cu_k.values())).clone()))
        kwargs["attention_mask"] = None
        return args, kwargs

    hooks = [layer.self_attn.register_forward_pre_hook(no_mask, with_kwargs=True) for layer in ours.model.layers]
    try:
        got = {k: v.generated_tokens for k, v in ours.generate_batch(inputs=reqs, **kw).items()}
    finally:
        for h in hooks:
            h.remove()
    assert got == want and len(steps) > 1
    for mask, cu_q, cu_k in steps:
        Q, K = mask.shape[-2:]
        built = _packed_causal_keep(cu_q, cu_k, Q, K, "cpu")
        real = int(cu_q[-1])
        assert torch.equal(built[..., :real, :], (mask > torch.finfo(mask.dtype).min / 2)[..., :real, :])


def test_packed_causal_mask_against_a_loop():
    # The mask built for a packed continuous-batching step without HF's mask, against a plain loop:
    # empty requests, a request whose keys are all new, padding queries past cu_q[-1] (which see
    # key 0 only: finite, unused outputs) and padding keys past cu_k[-1] (seen by no one).
    from latentmoe.nn.mla import _packed_causal_keep

    g = torch.Generator().manual_seed(9)
    for _ in range(200):
        n = int(torch.randint(1, 5, (), generator=g))
        q_lens = torch.randint(0, 4, (n,), generator=g)
        past = torch.randint(0, 5, (n,), generator=g)
        k_lens = q_lens + past
        cu_q = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)]).int()
        cu_k = torch.cat([torch.zeros(1, dtype=torch.long), k_lens.cumsum(0)]).int()
        Q, K = int(cu_q[-1]) + int(torch.randint(0, 3, (), generator=g)), int(cu_k[-1]) + int(torch.randint(0, 3, (), generator=g))
        if Q == 0 or K == 0:
            continue
        want = torch.zeros(Q, K, dtype=torch.bool)
        for r in range(n):
            for j in range(int(q_lens[r])):
                want[int(cu_q[r]) + j, int(cu_k[r]) : int(cu_k[r]) + int(past[r]) + j + 1] = True
        want[int(cu_q[-1]):, 0] = True
        assert torch.equal(_packed_causal_keep(cu_q, cu_k, Q, K, "cpu")[0, 0], want)


def test_cache_pickled_before_the_running_maximum_still_works():
    import pickle

    cache = LatentKVCache(2, 2, 8, 4, 2)
    cache.advance(0, 3)
    cache.advance(1, 3)
    state = cache.__getstate__()
    del state["_row_max"]  # what a pickle made before _row_max existed holds
    old = LatentKVCache.__new__(LatentKVCache)
    old.__setstate__(state)
    old = pickle.loads(pickle.dumps(old))
    assert old._row_max == [3, 3]
    old.reserve(0, 5)
    with pytest.raises(ValueError, match="would hold 9 tokens"):
        old.reserve(0, 6)


def test_continuing_after_rows_stopped_on_eos():
    # A batch whose first turn stopped on EOS in some rows: generate appended pad tokens there and
    # stored them (masked 1). A continuation whose mask hides them is refused with the way out; one
    # that keeps them at 1 (as the first turn attended them) matches HF with that mask.
    from transformers import DynamicCache

    cfg, hf, ours = _models("sdpa")
    ids, mask = _prompts(6, [0, 2, 4])
    probe = hf.generate(ids, attention_mask=mask, max_new_tokens=6, **_greedy())
    eos = int(probe.sequences[1, 7])  # row 1's second new token: it stops there
    kw = _greedy(max_new_tokens=6, eos_token_id=eos)
    dyn, lat = DynamicCache(config=cfg), _cache(cfg, 3, 40)
    want = hf.generate(ids, attention_mask=mask, cache=dyn, **kw)
    got = ours.generate(ids, attention_mask=mask, cache=lat, **kw)
    _assert_same(got, want)
    seq = want.sequences
    assert (seq[:, 6:] == PAD).any()  # some row was padded after its EOS
    ids2 = torch.cat([seq, torch.tensor([[30, 31, 32]] * 3)], 1)
    hidden = torch.cat([mask, (seq[:, 6:] != PAD).long(), torch.ones(3, 3, dtype=torch.long)], 1)
    with pytest.raises(ValueError, match="cannot be hidden afterwards"):
        ours.generate(ids2, attention_mask=hidden, cache=lat, **_greedy(max_new_tokens=3))
    assert lat.get_seq_length(0) == seq.shape[1] - 1  # nothing written by the refused step
    kept = torch.cat([mask, torch.ones(3, seq.shape[1] - 6 + 3, dtype=torch.long)], 1)
    want2 = hf.generate(ids2, attention_mask=kept, cache=dyn, **_greedy(max_new_tokens=3))
    got2 = ours.generate(ids2, attention_mask=kept, cache=lat, **_greedy(max_new_tokens=3))
    _assert_same(got2, want2)
