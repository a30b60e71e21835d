"""RMSNorm (and fused add+RMSNorm) vs HF DeepseekV3RMSNorm, and vs the read+write floor."""

from __future__ import annotations

import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

import latentmoe
from bench.common import check_close, ratio_row, read_bandwidth_gbs, row, time_ms


def run(device: str, quick: bool) -> list[dict]:
    rows = []
    hidden = 7168
    dtypes = [torch.bfloat16] if quick else [torch.float32, torch.bfloat16]
    tokens_list = [512] if quick else [1, 512, 4096]
    for dtype in dtypes:
        dt = str(dtype).removeprefix("torch.")
        for tokens in tokens_list:
            x = torch.randn(tokens, hidden, device=device, dtype=dtype)
            r = torch.randn_like(x)
            hf = DeepseekV3RMSNorm(hidden).to(device=device, dtype=dtype)
            ours = latentmoe.nn.RMSNorm(hidden).to(device=device, dtype=dtype)
            with torch.no_grad():
                # Outputs checked once before timing (OutputMismatch fails the family).
                check_close(f"rms_norm {dt} T={tokens}", ours(x), hf(x))
                normed, summed = ours(x, r)
                check_close(f"add_rms_norm {dt} T={tokens} (normed)", normed, hf(x + r))
                check_close(f"add_rms_norm {dt} T={tokens} (sum)", summed, x + r)
                t_hf = time_ms(lambda: hf(x), device, min_time_s=0.2)
                t_ours = time_ms(lambda: ours(x), device, min_time_s=0.2)
                t_hf_add = time_ms(lambda: hf(x + r), device, min_time_s=0.2)
                t_ours_add = time_ms(lambda: ours(x, r), device, min_time_s=0.2)
            nbytes = 2 * x.numel() * x.element_size()  # read x, write out
            floor_ms = nbytes / (read_bandwidth_gbs(nbytes, device) * 1e9) * 1e3
            mode = f"fwd-{dt}"
            rows += [
                row("rms_norm", "hf", mode, tokens, t_hf, device),
                row("rms_norm", "latentmoe", mode, tokens, t_ours, device),
                row("add_rms_norm", "hf", mode, tokens, t_hf_add, device),
                row("add_rms_norm", "latentmoe", mode, tokens, t_ours_add, device),
                ratio_row("rms_norm", "speedup_vs_hf", tokens, t_hf[0] / t_ours[0], device, mode),
                ratio_row("add_rms_norm", "speedup_vs_hf", tokens, t_hf_add[0] / t_ours_add[0], device, mode),
                ratio_row("rms_norm", "time_over_floor", tokens, t_ours[0] / floor_ms, device,
                          f"{mode}; floor = read+write bytes at measured read bandwidth"),
            ]
    return rows
