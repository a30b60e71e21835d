"""Shared benchmark helpers: timing (median after warm-up), floors measured in the same run, and rows
in one CSV schema (kernel, provider, mode, metric, unit, x, p50, p20, p80, device, version, note,
goal). ``goal`` is set on ratio rows that carry an issue's target, as ``">= 75"`` / ``"<= 2"``."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable

import torch

COLUMNS = ["kernel", "provider", "mode", "metric", "unit", "x", "p50", "p20", "p80", "device", "version",
           "note", "goal"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, warmup: int = 3, reps: int = 10,
            min_time_s: float = 0.0) -> tuple[float, float, float]:
    """(p50, p20, p80) wall time of ``fn()`` in milliseconds after ``warmup`` calls.

    Repeats at least ``reps`` times, and more until ``min_time_s`` has passed.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time_s:
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 1000:
            break
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return statistics.median(times), q[1], q[7]


@contextlib.contextmanager
def env_setting(var: str, value: str):
    """Set one of the kernels' environment switches for a block (LATENTMOE_MLA_DECODE_KERNEL,
    LATENTMOE_MLA_PREFILL_FORWARD, LATENTMOE_MOE_BACKWARD_GEMM); the kernels read a snapshot of
    them, retaken here on entry and exit (latentmoe.reload_settings)."""
    import latentmoe

    old = os.environ.get(var)
    os.environ[var] = value
    latentmoe.reload_settings()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old
        latentmoe.reload_settings()


def time_paired(fns: dict, device: str, rounds: int = 9, reps: int = 3,
                warmup: int = 1) -> tuple[dict, dict]:
    """Times several functions in alternation, for ratios that hold on a shared machine.

    Each of ``rounds`` rounds times every function ``reps`` times in a row (the order rotating from
    round to round) and keeps the median; a ratio is then taken round by round
    (:func:`paired_ratio`), so a slow spell of the machine (memory bandwidth shared with other
    tenants can halve between minutes) slows both sides of the ratio alike.
    Returns ({name: (p50, p20, p80) over all calls, in ms}, {name: [per-round medians]}).
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    _sync(device)
    samples: dict[str, list[float]] = {n: [] for n in names}
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            ts = [time_ms(fns[name], device, warmup=0, reps=1)[0] for _ in range(reps)]
            samples[name] += ts
            per_round[name].append(statistics.median(ts))
    stats = {}
    for name, ts in samples.items():
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
        stats[name] = (statistics.median(ts), q[1], q[7])
    return stats, per_round


def paired_ratio(per_round: dict, num, den) -> float:
    """Median over rounds of time(num) / time(den) (den: one name, or several whose per-round
    minimum is the denominator, e.g. the faster of two floors)."""
    dens = list(den) if isinstance(den, (list, tuple)) else [den]
    return statistics.median(
        n / min(per_round[d][i] for d in dens) for i, n in enumerate(per_round[num]))


def row(kernel: str, provider: str, mode: str, x, t: tuple[float, float, float], device: str,
        metric: str = "time", unit: str = "ms", note: str = "") -> dict:
    import latentmoe

    p50, p20, p80 = t
    return dict(kernel=kernel, provider=provider, mode=mode, metric=metric, unit=unit, x=x,
                p50=p50, p20=p20, p80=p80, device=device, version=latentmoe.__version__, note=note)


def ratio_row(kernel: str, name: str, x, value: float, device: str, goal: str = "",
              target: tuple[str, float] | None = None) -> dict:
    """A derived figure (a ratio measured in this run), with its goal written beside it.

    ``target`` (``(">=", 75)``, ``("<=", 2)`` or ``("in", (0.85, 1.15))``) marks the row as an issue
    goal: ``make bench`` lists those rows at the end, each with met / NOT MET."""
    r = row(kernel, name, "ratio", x, (value, value, value), device, metric="ratio", unit="x", note=goal)
    if target is not None:
        op, bound = target
        if op == "in":
            r["goal"] = f"in {bound[0]:g}..{bound[1]:g}"
        elif op in (">=", "<=", ">", "<"):
            r["goal"] = f"{op} {bound:g}"
        else:
            raise ValueError(f"ratio_row: target op must be one of >=, <=, >, <, in; got {op!r}")
    return r


def goal_met(r: dict) -> bool:
    """Whether a row with a ``goal`` meets it."""
    op, bound = r["goal"].split()
    v = r["p50"]
    if op == "in":
        lo, hi = (float(t) for t in bound.split(".."))
        return lo <= v <= hi
    b = float(bound)
    return {">=": v >= b, "<=": v <= b, ">": v > b, "<": v < b}[op]


def read_bandwidth_gbs(nbytes: int, device: str) -> float:
    """Measured read-once bandwidth (GB/s) for a buffer of ``nbytes``: a plain fp32 sum over it
    (fp32 so the floor is bound by memory, not by a slow low-precision reduction)."""
    buf = torch.randn(max(1, nbytes // 4), device=device, dtype=torch.float32)
    t = time_ms(lambda: buf.sum(dtype=torch.float32), device, warmup=3, reps=20, min_time_s=0.2)[0]
    return nbytes / (t * 1e-3) / 1e9


def gemm_gflops(m: int, n: int, k: int, device: str, dtype=torch.float32) -> float:
    """Measured dense GEMM rate (GFLOP/s) of torch.mm at [m, k] x [k, n]."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    t = time_ms(lambda: torch.mm(a, b), device, warmup=2, reps=5, min_time_s=0.2)[0]
    return 2.0 * m * n * k / (t * 1e-3) / 1e9


def machine_info(device: str) -> dict:
    """What the figures were measured on (CPUs differ between runs: AVX2-only, AVX-512, AMX; the
    CPU paths and their floors differ with them). Read from /proc and /sys where they exist."""
    info = {"device": device, "torch": torch.__version__}
    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
        return info
    model, flags = "unknown", set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    caches = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    with contextlib.suppress(OSError):
        for entry in sorted(os.listdir(base)):
            with contextlib.suppress(OSError):
                with open(f"{base}/{entry}/level") as f:
                    level = f.read().strip()
                with open(f"{base}/{entry}/type") as f:
                    kind = f.read().strip()
                with open(f"{base}/{entry}/size") as f:
                    size = f.read().strip()
                if kind != "Instruction":
                    caches[f"L{level}"] = size
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"]
    info.update(cpu=model, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                isa_flags=[f for f in wanted if f in flags], caches=caches,
                LATENTMOE_CPU_ISA=os.environ.get("LATENTMOE_CPU_ISA", "auto"),
                LATENTMOE_CPU_LOWP_GEMM=os.environ.get("LATENTMOE_CPU_LOWP_GEMM", "auto"))
    return info
