"""Where the time goes, per kernel and per host op (torch.profiler), for the CUDA paths that lost to
HF or sat far from their floor in the last GPU runs (bench/GPU_NOTES.md):

- ``moe_train``: the routed experts' training step, bf16, 512 tokens (ours 3.67 ms, HF grouped_mm 2.27);
- ``moe_grouped_fwd``: the grouped forward, bf16, 4096 tokens (ours 2.30 ms, HF grouped_mm 1.76);
- ``mla_op_train``: the ``mla_prefill`` op's training step at 4K, fp32 and bf16 (its backward on
  batched GEMMs, CUDA's default since session 32; the scalar kernel took 911 ms in fp32);
- ``decode_step``: one eager ``MultiHeadLatentAttention`` decode step on a 4K ``LatentKVCache``, bf16
  (host-bound: ~0.4 ms eager, 0.07-0.10 ms replayed in a CUDA graph): launches and host time per op.

Each case runs a few warm-up calls, then profiles ``REPS`` calls; the tables are per call (totals / REPS).
Usage: ``python bench/gpu_breakdown.py [case ...]`` (default: every case). CUDA only.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import latentmoe

REPS = 5


def _profile(name: str, fn, sort: str = "self_cuda_time_total", rows: int = 22) -> None:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(REPS):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / REPS * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(REPS):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    cuda_ms = sum(e.self_device_time_total for e in events) / 1e3 / REPS
    print(f"\n### {name}: {wall:.3f} ms per call unprofiled; {kernels / REPS:.0f} kernels and "
          f"{cuda_ms:.3f} ms of device time per call (profiled)")
    print(events.table(sort_by=sort, row_limit=rows, max_name_column_width=60))


def _moe_setup(T: int):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=64,
                           num_experts_per_tok=6, n_group=8, topk_group=4, norm_topk_prob=True,
                           routed_scaling_factor=2.5, n_shared_experts=2, hidden_act="silu")
    torch.manual_seed(0)
    hf = DeepseekV3MoE(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    hf = hf.to(device="cuda", dtype=torch.bfloat16)
    hf.config._experts_implementation = "grouped_mm"
    x = torch.randn(T, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        _, w, idx = hf.gate(x)
    return hf, x, w, idx


def moe_train() -> None:
    hf, x, w, idx = _moe_setup(512)
    gu, down = hf.experts.gate_up_proj, hf.experts.down_proj

    def step(fn):
        def call():
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            fn(xg, wg).float().sum().backward()
            gu.grad = down.grad = None
        return call

    _profile("moe_train bf16 T=512: latentmoe",
             step(lambda xg, wg: latentmoe.ops.moe_experts(xg, gu, down, wg, idx, check_values=False)))
    _profile("moe_train bf16 T=512: HF grouped_mm", step(lambda xg, wg: hf.experts(xg, idx, wg)))


def moe_grouped_fwd() -> None:
    hf, x, w, idx = _moe_setup(4096)
    gu, down = hf.experts.gate_up_proj, hf.experts.down_proj
    with torch.no_grad():
        _profile("moe_grouped_fwd bf16 T=4096: latentmoe (auto)",
                 lambda: latentmoe.ops.moe_experts(x, gu, down, w, idx, check_values=False))
        _profile("moe_grouped_fwd bf16 T=4096: HF grouped_mm", lambda: hf.experts(x, idx, w))


def decode_step() -> None:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    H, C, R, L = 16, 512, 64, 4096
    cfg = DeepseekV3Config(hidden_size=2048, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=None,
                           kv_lora_rank=C, qk_rope_head_dim=R, qk_nope_head_dim=128, v_head_dim=128,
                           num_hidden_layers=1, max_position_embeddings=32768)
    mod = latentmoe.nn.MultiHeadLatentAttention(cfg, 0).to(device="cuda", dtype=torch.bfloat16).eval()
    rot = DeepseekV3RotaryEmbedding(cfg).to("cuda")
    cache = latentmoe.nn.LatentKVCache(1, 1, L + 64, C, R, dtype=torch.bfloat16, device="cuda")
    cache.kv[0][0, :L] = torch.randn(L, C + R, device="cuda", dtype=torch.bfloat16)
    cache.advance(0, L)
    x = torch.randn(1, 1, 2048, device="cuda", dtype=torch.bfloat16)
    pe = rot(x, torch.tensor([[L]], device="cuda"))

    def step():
        mod(x, pe, None, cache=cache)
        cache.trim([L])  # (host work of its own, a few µs; the step stays at L keys)

    with torch.no_grad():
        _profile("decode_step bf16 4K (eager, LatentKVCache)", step, sort="self_cpu_time_total", rows=40)


def mla_op_train() -> None:
    """The mla_prefill op's training step at 4K (forward + mla_prefill_backward, absorbed GEMMs)."""
    B, S, H, C, R, Dn, Dv = 1, 4096, 16, 512, 64, 128, 128
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(B, S, H, Dn + R, device="cuda", dtype=dtype, requires_grad=True)
        kv = torch.randn(B, S, C + R, device="cuda", dtype=dtype, requires_grad=True)
        kv_b = (torch.randn(H * (Dn + Dv), C, device="cuda") / C**0.5).to(dtype).requires_grad_()
        lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
        g = torch.randn(B, S, H, Dv, device="cuda", dtype=dtype)

        def step():
            w = kv_b.view(H, Dn + Dv, C)
            out, _ = latentmoe.ops.mla_prefill(q[..., :Dn], q[..., Dn:], kv, lens, w[:, :Dn], w[:, Dn:], 0.07)
            out.backward(g)
            q.grad = kv.grad = kv_b.grad = None

        _profile(f"mla_op_train {str(dtype)[6:]} 4K (mla_prefill + backward)", step, rows=16)


CASES = {"moe_train": moe_train, "moe_grouped_fwd": moe_grouped_fwd, "decode_step": decode_step,
         "mla_op_train": mla_op_train}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(CASES):
        try:
            CASES[name]()
        except Exception as e:  # one case's failure should not hide the others'
            print(f"\n### {name} FAILED: {type(e).__name__}: {e}")
