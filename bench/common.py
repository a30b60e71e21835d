"""Shared benchmark helpers: timing (median after warm-up), floors measured in the same run, and rows
in one CSV schema (kernel, provider, mode, metric, unit, x, p50, p20, p80, device, version, note,
goal). ``goal`` is set on ratio rows that carry an issue's target, as ``">= 75"`` / ``"<= 2"``.

Before a comparison is timed, ours is checked against its baseline (:func:`check_close`): a wrong
output raises, and run.py fails the family instead of printing a speed. A floor under a goal is
checked against 1-thread rates probed once per run (:func:`plausibility_probe`): a floor far
slower than one thread can go (another process on the cores) makes the goal's verdict INVALID
(:func:`verdict`), not met."""

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
              target: tuple[str, float] | None = None, floor: tuple[str, float, float] | None = None) -> dict:
    """A derived figure (a ratio measured in this run), with its goal written beside it.

    ``target`` (``(">=", 75)``, ``("<=", 2)`` or ``("in", (0.85, 1.15))``) marks the row as an issue
    goal: ``make bench`` lists those rows at the end, each with met / NOT MET (:func:`verdict`).
    ``floor`` (``("read", bytes, ms)`` or ``("gemm", flops, ms)``): the floor the ratio is taken
    against, checked against this run's 1-thread probe (:func:`floor_implausible`); an implausibly
    slow floor marks the row invalid (its note says why; the goal's verdict is INVALID)."""
    r = row(kernel, name, "ratio", x, (value, value, value), device, metric="ratio", unit="x", note=goal)
    if floor is not None:
        reason = floor_implausible(*floor, device)
        if reason:
            r["invalid"] = reason
            r["note"] = f"{reason}; {goal}" if goal else reason
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
    """Whether a row with a ``goal`` meets it (the figure alone; :func:`verdict` also weighs the
    floor's plausibility)."""
    op, bound = r["goal"].split()
    v = r["p50"]
    if op == "in":
        lo, hi = (float(t) for t in bound.split(".."))
        return lo <= v <= hi
    b = float(bound)
    return {">=": v >= b, "<=": v <= b, ">": v > b, "<": v < b}[op]


INVALID = "INVALID: machine contended"


def verdict(r: dict) -> str:
    """The verdict on a goal row: "met", "NOT MET", or :data:`INVALID` when the floor it was measured
    against ran implausibly slowly (the machine was busy: neither met nor missed can be told)."""
    if r.get("invalid"):
        return INVALID
    return "met" if goal_met(r) else "NOT MET"


class OutputMismatch(RuntimeError):
    """Ours disagrees with the baseline it is timed against: no speed is reported for it."""


# max |ours - baseline| / max |baseline| allowed before a comparison is timed, by output dtype.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| in fp64 (NaN where either has a NaN or an infinity, or the
    shapes differ)."""
    if tuple(ours.shape) != tuple(ref.shape):
        return float("nan")
    a, b = ours.detach().double(), ref.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    return err / scale if scale > 0 else err


def check_close(what: str, ours, ref, dtype=None, tol: float | None = None) -> float:
    """Raise :class:`OutputMismatch` unless ``ours`` matches the baseline ``ref`` (the first element
    of a tuple output is compared) within ``tol`` (default :data:`TOLERANCE` of ``dtype``, or of
    ``ref``'s dtype) relative to ``ref``'s largest magnitude. Call it once, outside the timed
    region, before a comparison is timed. Returns the relative error."""
    if isinstance(ours, (tuple, list)):
        ours = ours[0]
    if isinstance(ref, (tuple, list)):
        ref = ref[0]
    if tol is None:
        tol = TOLERANCE.get(dtype or ref.dtype, 5e-2)
    rel = max_rel_err(ours, ref)
    if not rel <= tol:  # NaN fails too
        raise OutputMismatch(
            f"{what}: ours differs from the baseline: max rel error {rel:.3g} > {tol:g} "
            f"(shapes {tuple(ours.shape)} vs {tuple(ref.shape)}); not timed")
    return rel


# A floor implying less than this fraction of one thread's rate (probed once per run) is not a floor
# of a quiet machine: with other processes busy on the cores, every OpenMP region waits on
# descheduled threads (a 2-thread region took ~8 ms), floors collapse and a goal reads as met.
FLOOR_PLAUSIBLE_FRACTION = 0.5
_PROBE: dict = {}


def plausibility_probe(device: str) -> dict | None:
    """1-thread rates measured once per run (CPU only; None elsewhere): ``read_gbs`` (an fp32 sum
    over 64 MiB, from memory) and ``gemm_gflops`` (fp32 torch.mm at 512^3). A floor in this run
    is implausible when it implies under :data:`FLOOR_PLAUSIBLE_FRACTION` of them."""
    if device != "cpu":
        return None
    if device not in _PROBE:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            read = read_bandwidth_gbs(64 << 20, device)
            gemm = gemm_gflops(512, 512, 512, device)
        finally:
            torch.set_num_threads(n)
        _PROBE[device] = {"read_gbs_1thread": read, "gemm_gflops_1thread": gemm}
    return _PROBE[device]


def floor_implausible(kind: str, amount: float, floor_ms: float, device: str) -> str:
    """"" when a floor (``kind`` "read": ``amount`` bytes, or "gemm": ``amount`` FLOPs, in
    ``floor_ms``) is plausible for this machine; otherwise the reason, starting with
    :data:`INVALID`."""
    probe = plausibility_probe(device)
    if probe is None or not floor_ms > 0 or not amount > 0:
        return ""
    if kind == "read":
        rate, ref, unit = amount / (floor_ms * 1e-3) / 1e9, probe["read_gbs_1thread"], "GB/s"
    elif kind == "gemm":
        rate, ref, unit = amount / (floor_ms * 1e-3) / 1e9, probe["gemm_gflops_1thread"], "GFLOP/s"
    else:
        raise ValueError(f"floor kind must be 'read' or 'gemm', got {kind!r}")
    if rate >= FLOOR_PLAUSIBLE_FRACTION * ref:
        return ""
    return (f"{INVALID}: the floor ran at {rate:.3g} {unit}, under {FLOOR_PLAUSIBLE_FRACTION:g}x this "
            f"run's 1-thread probe ({ref:.3g} {unit})")


def native_lowp_gemm(device: str, dtype) -> bool:
    """Whether torch.mm in ``dtype`` runs at a hardware rate here: always on CUDA and for fp32; on
    the CPU for bf16 / fp16 only where oneDNN has native support (AVX-512 / AMX); elsewhere a
    bf16 torch.mm runs at ~1 GFLOP/s (a 2048^3 product took ~14 s on 2 AVX2 cores)."""
    if not device.startswith("cpu") or dtype in (torch.float32, torch.float64):
        return True
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        pass
    return False


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
