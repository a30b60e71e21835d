"""MLA: decode step of latentmoe's MultiHeadLatentAttention vs HF DeepseekV3Attention, the mla_decode
op alone vs the read-once floor of the same cache bytes, prefill vs HF (sdpa), and cache bytes per
token vs an MHA cache. All figures are measured in the same run; goals from issue 3 sit beside them.

Model dims (issue 3's table): hidden 2048, 16 heads, kv_lora 512, rope 64, nope 128, v 128, no
q_lora; fp32 weights (~55 MB read per decode step), batch 1.
"""

from __future__ import annotations

import torch
from transformers import DeepseekV3Config
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RMSNorm,
    DeepseekV3RotaryEmbedding,
    apply_rotary_pos_emb_interleave,
)

import latentmoe
from bench.common import (
    check_close, env_setting, gemm_gflops, native_lowp_gemm, paired_ratio, ratio_row, read_bandwidth_gbs,
    row, time_ms, time_paired,
)
from latentmoe.reference.mla import mla_decode as ref_mla_decode

H, C, R, NOPE, V, HIDDEN = 16, 512, 64, 128, 128, 2048


def _config(attn_impl: str) -> DeepseekV3Config:
    cfg = DeepseekV3Config(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=H, num_key_value_heads=H, q_lora_rank=None, kv_lora_rank=C, qk_rope_head_dim=R,
        qk_nope_head_dim=NOPE, v_head_dim=V, max_position_embeddings=32768, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1,
    )
    cfg._attn_implementation = attn_impl
    return cfg


def _with_hf_weights(make_hf, make_ours, device, dtype):
    """(``make_hf()`` with seeded normal(0, fan_in^-1/2) weights, ``make_ours()`` loaded with the same
    weights), both on ``device`` in ``dtype``, in eval mode."""
    torch.manual_seed(0)
    hf = make_hf()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    hf = hf.to(device=device, dtype=dtype).eval()
    ours = make_ours().to(device=device, dtype=dtype).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def _modules(cfg, device, dtype):
    return _with_hf_weights(lambda: DeepseekV3Attention(cfg, 0),
                            lambda: latentmoe.nn.MultiHeadLatentAttention(cfg, 0), device, dtype)


def _decode_step_rows(device: str, dtype, contexts, reps: int) -> list[dict]:
    rows = []
    cfg = _config("sdpa")
    hf, ours = _modules(cfg, device, dtype)
    # On the CPU both modules' weights on 2 MiB pages (latentmoe.use_huge_pages, as README advises
    # for CPU decode): each step streams them from memory. Like for like: HF's too.
    pages = ""
    if device == "cpu":
        try:
            latentmoe.use_huge_pages([hf, ours])
            pages = "both modules' weights on 2 MiB pages (use_huge_pages); "
        except RuntimeError as e:
            pages = f"weights on 4 KiB pages ({str(e).split(': ')[-1]}); "
    rot = DeepseekV3RotaryEmbedding(cfg).to(device)
    dt = str(dtype).removeprefix("torch.")
    for L in contexts:
        # The same L cached tokens in both caches (random latents, as a prefill would leave them).
        c_kv = torch.randn(1, 1, L, C, device=device, dtype=dtype)
        k_pe = torch.randn(1, 1, L, R, device=device, dtype=dtype)
        hf_cache = DynamicCache(config=cfg)
        hf_cache.update(c_kv, k_pe, 0)
        n_steps = 2 + 5 * reps + 2  # the check, time_paired's warm-up, 5 rounds of reps steps, spare
        # Room for the eager steps and for the CUDA-graph replays (each appends one token; they
        # start again from L).
        ours_cache = latentmoe.nn.LatentKVCache(1, 1, L + n_steps + 64, C, R, dtype=dtype, device=device)
        ours_cache.kv[0][0, :L] = torch.cat([c_kv[0, 0], k_pe[0, 0]], dim=-1)
        ours_cache.advance(0, L)
        x = torch.randn(1, 1, HIDDEN, device=device, dtype=dtype)
        pe = rot(x, torch.tensor([[L]], device=device))
        mode = f"decode-step-{dt}"
        # Timed in alternation (rounds of `reps` calls each), the speedup taken round by round: on
        # a shared machine the memory's rate moved HF's step and ours by up to 1.3x between minutes.
        with torch.no_grad():
            # First one step of each on the same L cached tokens (both append token L): the outputs
            # must agree before a speed is reported.
            check_close(f"mla_decode_step {mode} L={L} vs HF", ours(x, pe, None, cache=ours_cache),
                        hf(x, pe, None, cache=hf_cache), dtype)
            stats, per_round = time_paired({"hf": lambda: hf(x, pe, None, cache=hf_cache),
                                            "ours": lambda: ours(x, pe, None, cache=ours_cache)},
                                           device, rounds=5, reps=reps)
        t_hf, t_ours = stats["hf"], stats["ours"]
        speedup = paired_ratio(per_round, "hf", "ours")
        if device.startswith("cuda"):
            rows += _graph_step_rows(ours, ours_cache, x, pe, L, t_hf, device, mode, reps)
        floor_ms, floor_note, floor_check = _step_floor_ms(ours, L, device, dtype)
        rows += [
            row("mla_decode_step", "hf", mode, L, t_hf, device),
            row("mla_decode_step", "latentmoe", mode, L, t_ours, device),
            row("mla_decode_step", "floor", mode, L, (floor_ms,) * 3, device, note=floor_note),
            ratio_row("mla_decode_step", "speedup_vs_hf", L, speedup, device,
                      f"goal >= 75x at 4K (issue 3); module vs module, projections included; {pages}median "
                      "of per-round ratios (timed in alternation)",
                      target=(">=", 75) if L == 4096 else None, floor=floor_check),
            ratio_row("mla_decode_step", "time_over_floor", L, t_ours[0] / floor_ms, device,
                      "how far the step is from this machine's floor", floor=floor_check),
            ratio_row("mla_decode_step", "hf_over_floor", L, t_hf[0] / floor_ms, device,
                      "HF's step / the floor (a lower bound of any step): no step can be faster than "
                      "HF by more than this on this machine"),
        ]
    return rows


def _capture_graph(fn, reset=lambda: None, warmups: int = 2):
    """CUDA: `fn` warmed up, then captured in a CUDA graph on a side stream. `reset` runs before
    each warm-up call and before the capture (state the calls advance, e.g. cache lengths)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):  # outside the capture
            reset()
            fn()
        reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    return graph


def _graph_step_rows(ours, cache, x, pe, L, t_hf, device, mode, reps) -> list[dict]:
    """CUDA: the module's decode step captured in a CUDA graph and replayed (no host work per
    step: the ops make no device-to-host copy with a LatentKVCache). Each replay appends one more
    token (lengths L + 1, L + 2, ...; at most ~25 replays, within the cache's spare room)."""

    def at_length_L():
        cache.seqlens[0] = torch.full_like(cache.seqlens[0], L)
        cache._set_lens(0, [L] * cache.batch_size)

    try:
        with torch.no_grad():
            graph = _capture_graph(lambda: ours(x, pe, None, cache=cache), reset=at_length_L)
            t = time_ms(graph.replay, device, warmup=3, reps=20)
    except Exception as e:  # report, and keep the other rows of this family
        return [row("mla_decode_step", "latentmoe_cuda_graph", mode, L, (float("nan"),) * 3, device,
                    note=f"failed: {type(e).__name__}: {e}"[:200])]
    return [
        row("mla_decode_step", "latentmoe_cuda_graph", mode, L, t, device,
            note="step captured once, replayed"),
        ratio_row("mla_decode_step", "graph_speedup_vs_hf", L, t_hf[0] / t[0], device,
                  "no goal (not like-with-like: our step captured in a CUDA graph vs HF eager; the "
                  ">= 75x goal is speedup_vs_hf, eager module vs eager module)"),
    ]


def _attention_flops(Sq: int, L: int) -> float:
    """FLOPs of absorbed attention for one batch row: scores over C+R, weighted sum over C."""
    return 2.0 * Sq * H * L * ((C + R) + C)


_RATES: dict = {}


def _gemm_rate(device: str, dtype) -> float:
    """Dense GEMM rate (GFLOP/s) of a large torch.mm, measured once per run: the compute floor's rate.
    A 16-bit dtype's is the faster of its own torch.mm and fp32's: on CPUs without bf16 GEMM
    hardware (AVX2 only) torch.mm in bf16 runs at under 1 GFLOP/s, while the products of 16-bit
    operands can run in fp32 at fp32's rate, so the slower rate would be no floor. On the CPU fp32's
    is also the faster of torch.mm and latentmoe's own fp32 GEMM (linear_f32): MKL runs its AVX2
    code on AMD CPUs, at about half the rate of the AVX-512 FMA units (Zen 5: ~193 vs ~400).
    Where the CPU has no native 16-bit GEMM (common.native_lowp_gemm) the 16-bit torch.mm is not
    timed at all (a 2048^3 one took ~14 s per call on 2 AVX2 cores): fp32's rate is the faster."""
    key = (device, dtype)
    if key not in _RATES:
        rate = gemm_gflops(2048, 2048, 2048, device, dtype) if native_lowp_gemm(device, dtype) else 0.0
        if device == "cpu" and dtype == torch.float32:
            a = torch.randn(2048, 2048)
            b = torch.randn(2048, 2048)
            t = time_ms(lambda: latentmoe.ops.linear_f32(a, b), device, warmup=2, reps=5, min_time_s=0.2)[0]
            rate = max(rate, 2.0 * 2048**3 / (t * 1e-3) / 1e9)
        if dtype != torch.float32:
            rate = max(rate, _gemm_rate(device, torch.float32))
        _RATES[key] = rate
    return _RATES[key]


def _step_floor_ms(mod, L: int, device: str, dtype) -> tuple[float, str, tuple]:
    """Floor of one decode step on this machine, measured now, a lower bound: the weights
    (projections, the absorbed kv_b weights) read once, at the read bandwidth of a buffer that
    size, then the attention, which can at best overlap reading the latent cache with its FLOPs:
    weights_read + max(cache_read, attention FLOPs at the dense GEMM rate). (Reading the cache and
    the arithmetic overlap, so their sum would be no lower bound.) Also the weights' read as a
    ``ratio_row`` floor check (a contended machine marks the step's goal INVALID)."""
    elt = torch.finfo(dtype).bits // 8
    w_bytes = sum(p.numel() for n, p in mod.named_parameters() if "layernorm" not in n) * elt
    cache_bytes = L * (C + R) * elt
    w_ms = w_bytes / (read_bandwidth_gbs(w_bytes, device) * 1e9) * 1e3
    cache_ms = cache_bytes / (read_bandwidth_gbs(cache_bytes, device) * 1e9) * 1e3
    rate = _gemm_rate(device, dtype)
    flop_ms = _attention_flops(1, L) / (rate * 1e9) * 1e3
    note = (f"weights {w_bytes / 2**20:.0f} MiB read once ({w_ms:.2f} ms) + max(cache "
            f"{cache_bytes / 2**20:.1f} MiB read ({cache_ms:.2f} ms), attention "
            f"{_attention_flops(1, L) / 1e6:.0f} MFLOP at {rate:.0f} GFLOP/s ({flop_ms:.2f} ms))")
    return w_ms + max(cache_ms, flop_ms), note, ("read", w_bytes, w_ms)


def _graph_op_rows(fn, device: str, mode: str, L: int) -> list[dict]:
    """CUDA: `fn` (one op call) captured in a CUDA graph and replayed: device time without the
    host's per-call work (argument checks, allocations, launches)."""
    try:
        t = time_ms(_capture_graph(fn).replay, device, warmup=3, reps=20, min_time_s=0.1)
        note = "one call captured in a CUDA graph, replayed: kernels only"
    except Exception as e:  # report, keep the other rows
        t, note = (float("nan"),) * 3, f"failed: {type(e).__name__}: {e}"[:200]
    return [row("mla_decode", "latentmoe_graph", mode, L, t, device, note=note)]


def _decode_op_rows(device: str, dtype, contexts) -> list[dict]:
    rows = []
    dt = str(dtype).removeprefix("torch.")
    for L in contexts:
        q_latent = torch.randn(1, 1, H, C, device=device, dtype=dtype)
        q_pe = torch.randn(1, 1, H, R, device=device, dtype=dtype)
        kv = torch.randn(1, L, C + R, device=device, dtype=dtype)
        lens = torch.tensor([L], dtype=torch.int32, device=device)
        scale = (NOPE + R) ** -0.5
        mode = f"op-{dt}"
        # The op against the fp32 reference (latentmoe.reference.mla) once, before timing.
        check_close(f"mla_decode {mode} L={L} vs reference",
                    latentmoe.ops.mla_decode(q_latent, q_pe, kv, lens, scale, max_seqlen=L)[0],
                    ref_mla_decode(q_latent, q_pe, kv, lens, scale)[0], dtype)
        # As the module calls it: max_seqlen known on the host (no copy of the lengths, no sync).
        nbytes = kv.numel() * kv.element_size()
        buf = torch.randn(nbytes // 4, device=device)  # fp32: a bandwidth-bound read
        # The op and its read floor timed in alternation, the ratio taken round by round
        # (time_paired): on a shared machine the floor moves by up to 2x between minutes.
        stats, per_round = time_paired(
            {"op": lambda: latentmoe.ops.mla_decode(q_latent, q_pe, kv, lens, scale, max_seqlen=L),
             "floor": lambda: buf.sum(dtype=torch.float32)}, device, rounds=9, reps=5, warmup=3)
        t_op, floor_ms = stats["op"], stats["floor"][0]
        t_checked = time_ms(lambda: latentmoe.ops.mla_decode(q_latent, q_pe, kv, lens, scale), device,
                            warmup=3, reps=20, min_time_s=0.2)
        if device.startswith("cuda"):  # the kernels' own time: one call captured, replayed
            rows += _graph_op_rows(lambda: latentmoe.ops.mla_decode(q_latent, q_pe, kv, lens, scale, max_seqlen=L),
                                   device, mode, L)
        rate = _gemm_rate(device, dtype)
        flop_ms = _attention_flops(1, L) / (rate * 1e9) * 1e3
        rows += [
            row("mla_decode", "latentmoe", mode, L, t_op, device,
                note=(f"{torch.get_num_threads()} CPU threads; " if device == "cpu" else "")
                + "max_seqlen given (as the module calls it)"),
            row("mla_decode", "latentmoe_checked", mode, L, t_checked, device,
                note="max_seqlen=-1: lengths checked on a host copy" + (" (one sync)" if device != "cpu" else "")),
            row("mla_decode", "read_once_floor", mode, L, stats["floor"], device,
                note=f"fp32 sum over {nbytes / 2**20:.1f} MiB (the cache's bytes)"),
            row("mla_decode", "compute_floor", mode, L, (flop_ms,) * 3, device,
                note=f"{_attention_flops(1, L) / 1e6:.0f} MFLOP at the dense GEMM rate {rate:.0f} GFLOP/s"),
            ratio_row("mla_decode", "time_over_floor", L, paired_ratio(per_round, "op", "floor"), device,
                      f"{mode}; goal <= 2x the read-once floor (issue 3); median of per-round ratios "
                      "(timed in alternation)", target=("<=", 2), floor=("read", nbytes, floor_ms)),
            ratio_row("mla_decode", "time_over_compute_floor", L, t_op[0] / flop_ms, device,
                      f"{mode}; compute floor / read floor = {flop_ms / floor_ms:.1f}x: "
                      + ("compute-bound here" if flop_ms > floor_ms else "bandwidth-bound here")),
        ]
        rows += _cuda_cores_rows(lambda: latentmoe.ops.mla_decode(q_latent, q_pe, kv, lens, scale, max_seqlen=L),
                                 device, dtype, mode, L, t_op)
    return rows


def _decode_kernel(name: str):
    """Force mla_decode's split kernel."""
    return env_setting("LATENTMOE_MLA_DECODE_KERNEL", name)


def _cuda_cores_rows(fn, device: str, dtype, mode: str, L: int, t_auto) -> list[dict]:
    """bf16 / fp16 on CUDA run the tensor-core split kernel; the CUDA-core one, forced, for scale."""
    if not device.startswith("cuda") or dtype == torch.float32:
        return []
    with _decode_kernel("cuda_cores"):
        t_cc = time_ms(fn, device, warmup=3, reps=10, min_time_s=0.2)
    return [
        row("mla_decode", "latentmoe_cuda_cores", mode, L, t_cc, device,
            note="LATENTMOE_MLA_DECODE_KERNEL=cuda_cores (the default here is the tensor-core kernel)"),
        ratio_row("mla_decode", "tensor_cores_speedup", L, t_cc[0] / t_auto[0], device,
                  f"{mode}; CUDA-core time / tensor-core time, no goal"),
    ]


def _decode_op_scale_rows(device: str, dtype, B: int, heads: int, L: int) -> list[dict]:
    """The op at a serving-size batch (CUDA only, no goal): B rows of L keys, `heads` heads. With
    many heads the op does ~(C+R+C)*heads FLOPs per cached value read; on fp32 CUDA cores it is
    then bound by arithmetic, not the read."""
    dt = str(dtype).removeprefix("torch.")
    q_latent = torch.randn(B, 1, heads, C, device=device, dtype=dtype)
    q_pe = torch.randn(B, 1, heads, R, device=device, dtype=dtype)
    kv = torch.randn(B, L, C + R, device=device, dtype=dtype)
    lens = torch.full((B,), L, dtype=torch.int32, device=device)
    def op():
        return latentmoe.ops.mla_decode(q_latent, q_pe, kv, lens, 0.1, max_seqlen=L)

    t = time_ms(op, device, warmup=3, reps=10, min_time_s=0.2)
    nbytes = kv.numel() * kv.element_size()
    floor_ms = nbytes / (read_bandwidth_gbs(nbytes, device) * 1e9) * 1e3
    flops = B * 2.0 * heads * L * ((C + R) + C)
    mode = f"op-{dt}-B{B}-H{heads}"
    return _cuda_cores_rows(op, device, dtype, mode, L, t) + [
        row("mla_decode", "latentmoe", mode, L, t, device, note="max_seqlen given"),
        row("mla_decode", "read_once_floor", mode, L, (floor_ms,) * 3, device,
            note=f"plain read of {nbytes / 2**20:.0f} MiB at measured bandwidth"),
        ratio_row("mla_decode", "time_over_floor", L, t[0] / floor_ms, device,
                  f"{mode}; no goal: {flops / 1e9:.0f} GFLOP, {flops / (t[0] * 1e-3) / 1e12:.1f} TFLOP/s achieved"),
    ]


def _linear_rows(device: str, dtype) -> list[dict]:
    """linear_small (the module's decode-step projections) vs F.linear at the q_proj shape
    ([1, 2048] x [3072, 2048]^T), against reading the weight once."""
    rows = []
    dt = str(dtype).removeprefix("torch.")
    w = torch.randn(H * (NOPE + R), HIDDEN, device=device, dtype=dtype)
    for M in (1, 4, 16):
        x = torch.randn(M, HIDDEN, device=device, dtype=dtype)
        mode = f"q_proj-{dt}-M{M}"
        check_close(f"linear_small {mode} vs F.linear", latentmoe.ops.linear_small(x, w),
                    torch.nn.functional.linear(x, w), dtype)
        t_f = time_ms(lambda: torch.nn.functional.linear(x, w), device, warmup=3, reps=20, min_time_s=0.2)
        t_o = time_ms(lambda: latentmoe.ops.linear_small(x, w), device, warmup=3, reps=20, min_time_s=0.2)
        nbytes = w.numel() * w.element_size()
        floor_ms = nbytes / (read_bandwidth_gbs(nbytes, device) * 1e9) * 1e3
        rows += [
            row("linear_small", "torch_linear", mode, M, t_f, device),
            row("linear_small", "latentmoe", mode, M, t_o, device),
            row("linear_small", "read_once_floor", mode, M, (floor_ms,) * 3, device,
                note=f"plain read of the {nbytes / 2**20:.0f} MiB weight"),
            ratio_row("linear_small", "speedup_vs_torch", M, t_f[0] / t_o[0], device, f"{mode}; no goal"),
            ratio_row("linear_small", "time_over_floor", M, t_o[0] / floor_ms, device, f"{mode}; no goal"),
        ]
    return rows


def _linear_f32_rows() -> list[dict]:
    """linear_f32 (the module's fp32 CPU projections of more than 16 rows, where
    latentmoe._C.cpu_f32_gemm() picks it) vs F.linear (ATen's fp32 GEMM: MKL sgemm on x86), timed
    in alternation at the module's prefill shapes with 1024 tokens: q_proj [1024, 2048] x [3072,
    2048]^T and o_proj [1024, 2048] x [2048, 2048]^T. The rate of each is in its note."""
    rows = []
    chosen = latentmoe._C.cpu_f32_gemm()
    for name, N in (("q_proj", H * (NOPE + R)), ("o_proj", HIDDEN)):
        M, K = 1024, HIDDEN
        x, w = torch.randn(M, K), torch.randn(N, K) / K**0.5
        check_close(f"linear_f32 {name} vs F.linear", latentmoe.ops.linear_f32(x, w),
                    torch.nn.functional.linear(x, w), torch.float32)
        stats, per_round = time_paired({"ours": lambda: latentmoe.ops.linear_f32(x, w),
                                        "aten": lambda: torch.nn.functional.linear(x, w)}, "cpu", rounds=5, reps=3)
        mode = f"{name}-float32-M{M}"
        rate = {k: 2.0 * M * N * K / (v[0] * 1e-3) / 1e9 for k, v in stats.items()}
        rows += [
            row("linear_f32", "torch_linear", mode, M, stats["aten"], "cpu", note=f"{rate['aten']:.0f} GFLOP/s"),
            row("linear_f32", "latentmoe", mode, M, stats["ours"], "cpu", note=f"{rate['ours']:.0f} GFLOP/s"),
            ratio_row("linear_f32", "speedup_vs_torch", M, paired_ratio(per_round, "aten", "ours"), "cpu",
                      f"{mode}; no goal; the modules take it here: {chosen} (LATENTMOE_CPU_F32_GEMM)"),
        ]
    return rows


def _absorbed_rows(dtype) -> list[dict]:
    """The module's two absorbed per-head products of a CPU decode step (q_nope @ W_UK and
    o_latent @ W_UV^T on views of kv_b_proj's weight, 16 heads, one row each): bmm_small against
    the path the module takes otherwise (ATen's bmm in fp32, bf16 weights converted per call) and
    against a plain read of the weight bytes, timed in alternation. Each call reads another of
    several copies of the weight (64 MiB or more in all), so the weights come from memory, as in a
    decode step of a model that does not fit the caches; the floor reads rotating buffers alike."""
    rows = []
    dt = str(dtype).removeprefix("torch.")
    nbytes = H * (NOPE + V) * C * torch.finfo(dtype).bits // 8  # both products read the weight once
    copies = max(2, -(-(64 << 20) // nbytes))
    wvs = [(torch.randn(H * (NOPE + V), C) / C**0.5).to(dtype).view(H, NOPE + V, C) for _ in range(copies)]
    bufs = [torch.randn(max(1, nbytes // 4)) for _ in range(copies)]
    q, o = torch.randn(H, 1, NOPE).to(dtype), torch.randn(H, 1, C).to(dtype)
    turn = {"ours": 0, "aten": 0, "floor": 0}

    def next_of(name, items):
        turn[name] += 1
        return items[turn[name] % len(items)]

    def ours():
        wv = next_of("ours", wvs)
        latentmoe.ops.bmm_small(q, wv[:, :NOPE])
        latentmoe.ops.bmm_small(o, wv[:, NOPE:].transpose(1, 2))

    def aten():
        wv = next_of("aten", wvs)
        torch.bmm(q.float(), wv[:, :NOPE].float())
        torch.bmm(o.float(), wv[:, NOPE:].transpose(1, 2).float())

    stats, per_round = time_paired({"ours": ours, "aten": aten, "floor": lambda: next_of("floor", bufs).sum()},
                                   "cpu", rounds=9, reps=5)
    mode = f"absorbed-{dt}-H{H}"
    rows += [
        row("bmm_small", "aten_bmm_fp32", mode, 1, stats["aten"], "cpu",
            note="torch.bmm in fp32 (bf16 weights converted per call): the module's path before bmm_small"),
        row("bmm_small", "latentmoe", mode, 1, stats["ours"], "cpu", note="both products, bmm_small"),
        row("bmm_small", "read_once_floor", mode, 1, stats["floor"], "cpu",
            note=f"plain read of {nbytes / 2**20:.0f} MiB (the weight's bytes) from memory"),
        ratio_row("bmm_small", "speedup_vs_aten", 1, paired_ratio(per_round, "aten", "ours"), "cpu",
                  f"{mode}; weights from memory; no goal; median of per-round ratios"),
        ratio_row("bmm_small", "time_over_floor", 1, paired_ratio(per_round, "ours", "floor"), "cpu",
                  f"{mode}; weights from memory; no goal; median of per-round ratios"),
    ]
    return rows


def _fused_decode_rows(dtype, L: int) -> list[dict]:
    """A CPU decode step's attention at L cached tokens (16 heads, one query row): one
    mla_decode_absorbed call against the separate ops the module ran before it (the rope of q_pe,
    bmm_small, mla_decode, bmm_small and the reshapes between them, from Python), timed in
    alternation on the same inputs. The weights and the cache stay in the caches here: the rows
    show what the per-op dispatch and the Python between the ops cost."""
    from latentmoe.nn.mla import _rotate

    dt = str(dtype).removeprefix("torch.")
    torch.manual_seed(0)
    q = torch.randn(1, 1, H, NOPE + R).to(dtype)
    ang = torch.randn(1, 1, R // 2)
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    w = (torch.randn(H * (NOPE + V), C) / C**0.5).to(dtype)
    cache = torch.randn(1, L + 1, C + R).to(dtype)
    lens = torch.tensor([L], dtype=torch.int32)
    scale = (NOPE + R) ** -0.5
    wv = w.view(H, NOPE + V, C)

    def fused():
        return latentmoe.ops.mla_decode_absorbed(q, cos, sin, w, cache, lens, scale, NOPE, max_seqlen=L)

    def separate():
        q_pe = _rotate(q[..., NOPE:], cos, sin, True)
        q_lat = latentmoe.ops.bmm_small(q[..., :NOPE].permute(2, 0, 1, 3).reshape(H, 1, NOPE).contiguous(), wv[:, :NOPE])
        o_lat, _ = latentmoe.ops.mla_decode(q_lat.view(H, 1, 1, C).permute(1, 2, 0, 3).contiguous(), q_pe.contiguous(),
                                            cache, lens, scale, max_seqlen=L)
        out = latentmoe.ops.bmm_small(o_lat.permute(2, 0, 1, 3).reshape(H, 1, C), wv[:, NOPE:].transpose(1, 2))
        return out.view(H, 1, 1, V).permute(1, 2, 0, 3)

    with torch.no_grad():
        stats, per_round = time_paired({"fused": fused, "separate": separate}, "cpu", rounds=9, reps=9)
    mode = f"attention-{dt}-H{H}"
    return [
        row("mla_decode_absorbed", "separate_ops", mode, L, stats["separate"], "cpu",
            note="rope + bmm_small + mla_decode + bmm_small from Python (the module's path before the fused op)"),
        row("mla_decode_absorbed", "latentmoe", mode, L, stats["fused"], "cpu", note="one mla_decode_absorbed call"),
        ratio_row("mla_decode_absorbed", "speedup_vs_separate", L, paired_ratio(per_round, "separate", "fused"), "cpu",
                  f"{mode}; no goal (what the dispatch between the ops costs); median of per-round ratios"),
    ]


def _append_rows(device: str, dtype) -> list[dict]:
    """mla_append_cache (kv_a_layernorm + RoPE of k_pe + write into the cache slots, one kernel) vs
    the same three steps with HF's modules / functions and a slice write, and vs the bytes floor."""
    rows = []
    dt = str(dtype).removeprefix("torch.")
    cfg = _config("sdpa")
    rot = DeepseekV3RotaryEmbedding(cfg).to(device)
    norm = DeepseekV3RMSNorm(C).to(device=device, dtype=dtype)
    for B, S, L0 in [(32, 1, 4096), (1, 4096, 0)]:  # a decode step of 32 rows; a 4K prefill
        cache = torch.zeros(B, L0 + S + 8, C + R, device=device, dtype=dtype)
        lens = torch.full((B,), L0, dtype=torch.int32, device=device)
        latent = torch.randn(B, S, C, device=device, dtype=dtype)
        k_pe = torch.randn(B, S, R, device=device, dtype=dtype)
        cos, sin = rot(latent, (L0 + torch.arange(S, device=device))[None].expand(B, -1))
        cos, sin = cos.to(dtype), sin.to(dtype)
        w = norm.weight

        def ours():
            latentmoe.ops.mla_append_cache(cache, latent, k_pe, w, norm.variance_epsilon, cos, sin, lens)

        def hf_steps():
            c = norm(latent)
            k = k_pe.view(B, 1, S, R)
            _, k_rot = apply_rotary_pos_emb_interleave(k, k, cos, sin)
            cache[:, L0:L0 + S, :C] = c
            cache[:, L0:L0 + S, C:] = k_rot[:, 0]

        with torch.no_grad():
            t_ours = time_ms(ours, device, warmup=3, reps=20, min_time_s=0.2)
            t_hf = time_ms(hf_steps, device, warmup=3, reps=20, min_time_s=0.2)
        elt = torch.finfo(dtype).bits // 8
        nbytes = B * S * ((C + R) * elt * 2 + 2 * R * elt)  # read latent, k_pe, cos, sin; write rows
        floor_ms = nbytes / (read_bandwidth_gbs(nbytes, device) * 1e9) * 1e3
        mode = f"append-{dt}-B{B}-S{S}"
        rows += [
            row("mla_append_cache", "hf_steps", mode, B * S, t_hf, device,
                note="DeepseekV3RMSNorm + apply_rotary_pos_emb_interleave + slice writes"),
            row("mla_append_cache", "latentmoe", mode, B * S, t_ours, device),
            row("mla_append_cache", "bytes_floor", mode, B * S, (floor_ms,) * 3, device,
                note=f"{nbytes / 2**20:.2f} MiB read+written at the measured read bandwidth"),
            ratio_row("mla_append_cache", "speedup_vs_hf_steps", B * S, t_hf[0] / t_ours[0], device, mode),
            ratio_row("mla_append_cache", "time_over_floor", B * S, t_ours[0] / floor_ms, device, mode),
        ]
    return rows


def _prefill_rows(device: str, dtype, lengths) -> list[dict]:
    rows = []
    cfg = _config("sdpa")
    hf, ours = _modules(cfg, device, dtype)
    rot = DeepseekV3RotaryEmbedding(cfg).to(device)
    dt = str(dtype).removeprefix("torch.")
    for L in lengths:
        x = torch.randn(1, L, HIDDEN, device=device, dtype=dtype)
        pe = rot(x, torch.arange(L, device=device)[None])
        # In alternation, the speedup taken round by round (timed apart, it moved between 1.8x and
        # 3.0x from run to run on a shared 2-core machine).
        mode = f"prefill-{dt}"
        with torch.no_grad():
            check_close(f"mla_prefill {mode} L={L} vs HF sdpa", ours(x, pe, None), hf(x, pe, None), dtype)
            # (3 rounds of one call on the CPU, where a call takes seconds; 7 of 3 on a GPU.)
            cpu = device == "cpu"
            stats, per_round = time_paired({"hf": lambda: hf(x, pe, None), "ours": lambda: ours(x, pe, None)},
                                           device, rounds=3 if cpu else 7, reps=1 if cpu else 3)
        t_hf, t_ours = stats["hf"], stats["ours"]
        # A read just after the timing vouches for the machine's state (no floor here to do it): a
        # contended run marks the goal INVALID instead of met / NOT MET.
        probe_bytes = 64 << 20
        probe = ("read", probe_bytes, probe_bytes / (read_bandwidth_gbs(probe_bytes, device) * 1e9) * 1e3)
        rows += [
            row("mla_prefill", "hf_sdpa", mode, L, t_hf, device),
            row("mla_prefill", "latentmoe", mode, L, t_ours, device, note=_prefill_note(device, dtype)),
            ratio_row("mla_prefill", "speedup_vs_hf", L, paired_ratio(per_round, "hf", "ours"), device,
                      "goal >= 2x at 4K (issue 3); median of per-round ratios (timed in alternation)",
                      target=(">=", 2) if L == 4096 else None, floor=probe),
        ]
        if device.startswith("cuda"):
            # The module's default on CUDA is SDPA on decompressed K/V (LATENTMOE_MLA_MODULE_PREFILL):
            # the mla_prefill op, forced, for scale (its forward on batched GEMMs by default).
            with torch.no_grad(), env_setting("LATENTMOE_MLA_MODULE_PREFILL", "kernel"):
                t_op = time_ms(lambda: ours(x, pe, None), device, warmup=1, reps=3)
                rows += [
                    row("mla_prefill", "latentmoe_op", mode, L, t_op, device,
                        note="LATENTMOE_MLA_MODULE_PREFILL=kernel: " + _prefill_note(device, dtype, "kernel")),
                    ratio_row("mla_prefill", "op_speedup_vs_hf", L, t_hf[0] / t_op[0], device,
                              "the mla_prefill op's path vs HF sdpa; no goal (context)"),
                ]
                # The op's other forwards, forced: the per-head prefill kernel (CUDA cores), and in
                # bf16 / fp16 the absorbed path through mla_decode's tensor-core kernel (the default
                # before session 32).
                others = [("kernel", "per-head decompression, CUDA cores")]
                if dtype != torch.float32:
                    others.append(("absorbed", "absorbed queries through mla_decode's tensor cores"))
                for choice, what in others:
                    with env_setting("LATENTMOE_MLA_PREFILL_FORWARD", choice):
                        t_other = time_ms(lambda: ours(x, pe, None), device, warmup=1, reps=3)
                    rows += [
                        row("mla_prefill", f"latentmoe_prefill_{choice}", mode, L, t_other, device,
                            note=f"LATENTMOE_MLA_PREFILL_FORWARD={choice} ({what})"),
                        ratio_row("mla_prefill", f"gemm_speedup_vs_{choice}", L, t_other[0] / t_op[0], device,
                                  f"the op's default (GEMMs) vs its {choice} forward forced; no goal"),
                    ]
    return rows


def _train_rows(device: str, dtype, L: int) -> list[dict]:
    """A training step of the layer (forward + backward, gradients for input and weights) vs HF
    autograd (sdpa). No goal in issue 3; it shows what the mla_prefill backward buys."""
    cfg = _config("sdpa")
    hf, ours = _modules(cfg, device, dtype)
    hf.train()
    ours.train()
    rot = DeepseekV3RotaryEmbedding(cfg).to(device)
    x = torch.randn(1, L, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    pe = rot(x, torch.arange(L, device=device)[None])
    g = torch.randn(1, L, HIDDEN, device=device, dtype=dtype)

    def step(mod):
        return lambda: mod(x, pe, None)[0].backward(g)

    # In alternation (a step is ~1 s on the CPU; three unpaired calls each moved the ratio by 0.2).
    stats, per_round = time_paired({"hf": step(hf), "ours": step(ours)}, device, rounds=5, reps=1)
    mode = f"train-step-{str(dtype).removeprefix('torch.')}"
    default = _prefill_note(device, dtype)
    rows = [
        row("mla_train_step", "hf_sdpa_autograd", mode, L, stats["hf"], device),
        row("mla_train_step", "latentmoe", mode, L, stats["ours"], device, note=default),
        ratio_row("mla_train_step", "speedup_vs_hf", L, paired_ratio(per_round, "hf", "ours"), device,
                  "no goal (context); median of per-round ratios (timed in alternation)"),
    ]
    if device.startswith("cuda"):  # the default is SDPA there: mla_prefill + its backward, forced
        with env_setting("LATENTMOE_MLA_MODULE_PREFILL", "kernel"):
            t_op = time_ms(step(ours), device, warmup=1, reps=2)
        rows += [
            row("mla_train_step", "latentmoe_op", mode, L, t_op, device,
                note="LATENTMOE_MLA_MODULE_PREFILL=kernel: mla_prefill + mla_prefill_backward (absorbed GEMMs "
                     "by default on CUDA)"),
            ratio_row("mla_train_step", "op_speedup_vs_hf", L, stats["hf"][0] / t_op[0], device,
                      "the mla_prefill op's path vs HF; no goal (context)"),
        ]
    return rows


def _prefill_note(device: str, dtype=torch.float32, choice: str | None = None) -> str:
    """The module's prefill path on ``device`` (under LATENTMOE_MLA_MODULE_PREFILL, or ``choice``)."""
    choice = choice or latentmoe._settings.mla_module_prefill()
    has = latentmoe.nn.mla._has_kernel(latentmoe.nn.mla._PREFILL_OP, torch.device(device))
    if has and (choice == "kernel" or (choice == "auto" and not device.startswith("cuda"))):
        if device.startswith("cuda"):
            return "mla_prefill: absorbed queries on batched GEMMs (cuBLAS), chunked"
        return "mla_prefill kernel (in-kernel latent decompression)"
    why = "no mla_prefill kernel for this device" if not has else f"LATENTMOE_MLA_MODULE_PREFILL={choice}"
    return f"SDPA on per-head K/V decompressed by kv_b_proj ({why})"


# The module's prefill peak on the CPU, in a fresh process (bench_mla_prefill.cpu_child_peak_extra):
# the layer, its input and the rotary tables made and touched first, a 64-token warm-up, then the
# high-water mark reset (reset_peak).
_CPU_MODULE_PEAK_SCRIPT = """
import json, torch, latentmoe
from bench.bench_mla import _config, _modules, HIDDEN
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

L, dt = {L}, torch.{dtype}
cfg = _config("sdpa")
hf, ours = _modules(cfg, "cpu", dt)
del hf
x = torch.empty(1, L, HIDDEN, dtype=dt).normal_()
pe = DeepseekV3RotaryEmbedding(cfg)(x, torch.arange(L)[None])
with torch.no_grad():
    ours(x[:, :64], tuple(t[:, :64] for t in pe), None)
    before = status_kib("VmRSS")
    reset_peak()
    out = ours(x, pe, None)[0]
    peak = status_kib("VmHWM")
print(json.dumps({{"extra": max(0, (peak - before) * 1024 - out.numel() * out.element_size())}}))
"""


def _prefill_memory_rows(device: str, dtype, L: int) -> list[dict]:
    """Extra peak memory (beyond inputs and outputs) of a prefill of L tokens through the module:
    ours vs HF on CUDA; on the CPU ours alone (peak RSS in a fresh process; HF's sdpa layer at 16K
    takes minutes here, and issue 3 measured it out of memory in 24 GiB)."""
    if device == "cpu":
        from bench.bench_mla_prefill import cpu_child_peak_extra

        extra = cpu_child_peak_extra(_CPU_MODULE_PEAK_SCRIPT.format(L=L, dtype=str(dtype).removeprefix("torch.")))
        r = row("mla_prefill", "latentmoe", f"peak-extra-{str(dtype).removeprefix('torch.')}", L,
                (extra / 2**30,) * 3, device, metric="memory", unit="GiB",
                note="goal < 4 GiB extra at 16K (issue 3); the module's forward (projections included), "
                     "outputs excluded; peak RSS in a fresh process")
        r["goal"] = "< 4"
        return [r]
    rows = []
    cfg = _config("sdpa")
    hf, ours = _modules(cfg, device, dtype)
    rot = DeepseekV3RotaryEmbedding(cfg).to(device)
    x = torch.randn(1, L, HIDDEN, device=device, dtype=dtype)
    pe = rot(x, torch.arange(L, device=device)[None])
    for name, mod in [("hf_sdpa", hf), ("latentmoe", ours)]:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            with torch.no_grad():
                out = mod(x, pe, None)[0]
            extra = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()
            del out
        except torch.OutOfMemoryError:
            extra = float("inf")
        r = row("mla_prefill", name, f"peak-extra-{str(dtype).removeprefix('torch.')}", L,
                (extra / 2**30,) * 3, device, metric="memory", unit="GiB",
                note="goal < 4 GiB extra at 16K (issue 3); the module's forward" if name == "latentmoe" else "")
        if name == "latentmoe" and L == 16384:
            r["goal"] = "< 4"
        rows.append(r)
    return rows


def _cache_bytes_rows(device: str) -> list[dict]:
    rows = []
    for name, heads, nope, v in [("bench-model", H, NOPE, V), ("deepseek-v3", 128, 128, 128)]:
        cache = latentmoe.nn.LatentKVCache(1, 1, 1, C, R, dtype=torch.bfloat16, device="cpu")
        mla_bytes = cache.bytes_per_token
        mha_bytes = heads * ((nope + R) + v) * 2  # per-head K (nope+rope) and V, bf16
        rows += [
            row("mla_cache", "latentmoe", f"bytes-per-token-{name}", 1, (mla_bytes,) * 3, device,
                metric="bytes", unit="B"),
            row("mla_cache", "mha", f"bytes-per-token-{name}", 1, (mha_bytes,) * 3, device,
                metric="bytes", unit="B"),
            ratio_row("mla_cache", "mha_over_mla", 1, mha_bytes / mla_bytes, device,
                      f"{name}: cache bytes per token per layer, MHA / MLA"),
        ]
    return rows


def smoke(device: str) -> None:
    """Call every MLA op once on small odd shapes (contiguous and paged, every dtype); for
    compute-sanitizer runs on the GPU (wire into bench/gpu_smoke.py)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for page_size in (None, 17):
            B, Sq, heads, c, r = 3, 2, 9, 48, 16
            lens = torch.tensor([0, 5, 40], dtype=torch.int32, device=device)
            if page_size is None:
                kv = torch.randn(B, 45, c + r, device=device, dtype=dtype)
                table = None
            else:
                kv = torch.randn(3 * B, page_size, c + r, device=device, dtype=dtype)
                table = torch.randperm(3 * B, device=device).view(B, 3).to(torch.int32)
            latent = torch.randn(B, Sq, c, device=device, dtype=dtype)
            k_pe = torch.randn(B, Sq, r, device=device, dtype=dtype)
            cos = torch.randn(B, Sq, r, device=device, dtype=dtype)
            sin = torch.randn(B, Sq, r, device=device, dtype=dtype)
            w = torch.ones(c, device=device, dtype=dtype)
            latentmoe.ops.mla_append_cache(kv, latent, k_pe, w, 1e-6, cos, sin, lens, block_table=table)
            q_latent = torch.randn(B, Sq, heads, c, device=device, dtype=dtype)
            q_pe = torch.randn(B, Sq, heads, r, device=device, dtype=dtype)
            latentmoe.ops.mla_decode(q_latent, q_pe, kv, lens + Sq, 0.1, block_table=table, window=7)
            if device.startswith("cuda"):
                # Unchecked calls with bad values (the sanitizer must see no access out of bounds):
                # lengths past the capacity and negative, table entries outside the pool.
                cap = kv.shape[1] if table is None else 3 * page_size
                bad_lens = torch.tensor([10**6, -5, 7], dtype=torch.int32, device=device)
                bad_table = None
                if table is not None:
                    bad_table = table.clone()
                    bad_table[:, 1] = 10**6
                latentmoe.ops.mla_append_cache(kv, latent, k_pe, w, 1e-6, cos, sin, bad_lens,
                                               block_table=bad_table, check_values=False)
                latentmoe.ops.mla_decode(q_latent, q_pe, kv, bad_lens, 0.1, block_table=bad_table,
                                         max_seqlen=cap)


def _generate_rows(device: str, dtype, prompt: int, new: int, pads=(0, 64, 128, 256)) -> list[dict]:
    """HF ``generate`` end to end (greedy; a 1-layer DeepseekV3ForCausalLM at the bench dims, a
    left-padded batch): HF's attention with its DynamicCache vs latentmoe's attention with a
    LatentKVCache (prefill kernel, then decode steps on the latent cache; padding not stored)."""
    from transformers import DeepseekV3ForCausalLM

    cfg = _config("sdpa")
    hf, ours = _with_hf_weights(lambda: DeepseekV3ForCausalLM(cfg), lambda: DeepseekV3ForCausalLM(cfg), device, dtype)
    attn = latentmoe.nn.MultiHeadLatentAttention(cfg, 0).to(device=device, dtype=dtype)
    attn.load_state_dict(ours.model.layers[0].self_attn.state_dict(), strict=True)
    ours.model.layers[0].self_attn = attn.eval()
    B = len(pads)
    ids = torch.randint(1, cfg.vocab_size, (B, prompt), device=device)
    mask = torch.ones(B, prompt, dtype=torch.long, device=device)
    for b, n in enumerate(pads):
        ids[b, :n], mask[b, :n] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    cache = latentmoe.nn.LatentKVCache(1, B, prompt + new, C, R, dtype=dtype, device=device)

    def ours_generate():
        cache.reset()
        return ours.generate(ids, cache=cache, **kw)

    with torch.no_grad():
        same = torch.equal(hf.generate(ids, **kw), ours_generate())
    dt = str(dtype).removeprefix("torch.")
    mode = f"generate-{dt}-B{B}-P{prompt}-new{new}"
    if not same:
        # No speed for outputs that differ (as check_close), but only these rows go: raising would
        # drop the family's other rows too. (tests/test_latent_cache_generate.py checks the ids.)
        nan = (float("nan"),) * 3
        note = f"NOT TIMED: greedy ids differ from HF's (left padding {list(pads)})"
        print(f"[bench] mla_generate {mode}: {note}", flush=True)
        return [row("mla_generate", "hf", mode, prompt, nan, device, note=note),
                row("mla_generate", "latentmoe", mode, prompt, nan, device, note=note)]
    with torch.no_grad():
        t, per_round = time_paired({"hf": lambda: hf.generate(ids, **kw), "ours": ours_generate}, device,
                                   rounds=3, reps=1)
    note = f"left padding {list(pads)}; greedy ids identical to HF's"
    return [
        row("mla_generate", "hf", mode, prompt, t["hf"], device, note=note),
        row("mla_generate", "latentmoe", mode, prompt, t["ours"], device, note=note),
        ratio_row("mla_generate", "speedup_vs_hf", prompt, paired_ratio(per_round, "hf", "ours"), device,
                  "no goal (end to end: prefill + decode steps, MLP and lm_head included); median of "
                  "per-round ratios"),
    ]


def run(device: str, quick: bool) -> list[dict]:
    dtype = torch.float32
    contexts = [1024, 4096, 16384]  # issue 3's decode contexts, quick runs included
    rows = _decode_step_rows(device, dtype, contexts, reps=5)
    rows += _decode_op_rows(device, dtype, contexts)
    rows += _append_rows(device, dtype)
    rows += _linear_rows(device, dtype)
    if device == "cpu":  # the bf16 path (vdpbf16ps tiles on AVX512_BF16 CPUs)
        rows += _linear_rows(device, torch.bfloat16)
    if device == "cpu":  # CPU-only ops (on CUDA the module calls torch.bmm and cuBLAS)
        rows += _linear_f32_rows()
        for dt in (torch.float32, torch.bfloat16):
            rows += _absorbed_rows(dt)
            rows += _fused_decode_rows(dt, 1024)
    if device.startswith("cuda"):
        rows += _decode_op_rows(device, torch.bfloat16, contexts)
    else:  # the CPU's bf16 path (vdpbf16ps scores where the CPU has AVX512_BF16), at the goal's 4K
        rows += _decode_op_rows(device, torch.bfloat16, [4096])
    if device.startswith("cuda"):
        if not quick:
            for heads in (16, 128):
                rows += _decode_op_scale_rows(device, torch.bfloat16, 64, heads, 4096)
            rows += _decode_op_scale_rows(device, torch.bfloat16, 1, 128, 16384)  # V3's heads, one sequence
    rows += _prefill_rows(device, dtype, [4096])  # the goal's size, also in quick runs
    if device.startswith("cuda"):
        rows += _prefill_rows(device, torch.bfloat16, [4096])
    rows += _train_rows(device, dtype, 1024 if quick else 4096)
    if device.startswith("cuda"):  # bf16: the op's path is the absorbed forward and backward on tensor cores
        rows += _train_rows(device, torch.bfloat16, 1024 if quick else 4096)
    if device.startswith("cuda") and not quick:
        rows += _prefill_memory_rows(device, torch.bfloat16, 16384)
    elif device == "cpu":  # the goal's size, also in quick runs (about 20 s on 2 cores)
        rows += _prefill_memory_rows(device, dtype, 16384)
    rows += _generate_rows(device, dtype, 1024 if quick else 4096, 16)
    rows += _cache_bytes_rows(device)
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full", action="store_true")
    a = ap.parse_args()
    for r in run(a.device, quick=not a.full):
        print(f"{r['kernel']:16} {r['provider']:16} {r['mode']:22} {r['x']:>6} {r['p50']:10.4g} {r['unit']:3}"
              f" {r['note']}")
