"""``make bench``: every microbenchmark on the default device (CUDA if available, else CPU).

Prints a table and writes ``bench/results/<device>-<timestamp>.csv`` (one schema: bench/common.py)
and, next to it, ``<device>-<timestamp>.machine.json`` (CPU model, ISA, caches; or the GPU).
A family whose output check fails (ours vs the HF baseline, before anything is timed) is
reported FAILED and the run exits 1. The goals summary at the end gives each goal met / NOT MET,
or INVALID: machine contended where the floor it was measured against ran at under half this
run's 1-thread rates (bench/common.py: verdict).
Usage: python bench/run.py [--device cpu|cuda] [--full] [--only norm,mla,moe] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import (  # noqa: E402
    COLUMNS, FLOOR_PLAUSIBLE_FRACTION, INVALID, machine_info, plausibility_probe, verdict,
)

FAMILIES = ["norm", "mla", "mla_prefill", "moe"]


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'kernel':<22} {'provider':<24} {'mode':<18} {'x':>7} {'p50':>11} {'unit':<4} note")
    for r in rows:
        print(f"{r['kernel']:<22} {r['provider']:<24} {r['mode']:<18} {str(r['x']):>7} "
              f"{r['p50']:>11.4g} {r['unit']:<4} {r.get('note', '')}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help="all sizes, the issues' headline shapes (the default on CUDA; slow on CPU)")
    size.add_argument("--quick", action="store_true",
                      help="the quick set: smaller MoE shapes, fewer sizes (the default on CPU)")
    ap.add_argument("--only", default="", help="comma-separated families")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    if not args.quick and not args.full:
        args.full = args.device.startswith("cuda")

    families = [f for f in (args.only.split(",") if args.only else FAMILIES) if f]
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"{args.device}-{stamp}.csv")
    # The machine next to the CSV (<name>.machine.json): figures from different CPUs differ.
    machine = machine_info(args.device)
    # 1-thread read and GEMM rates, once per run: a floor far below them (another process on the
    # cores) makes the goals measured against it INVALID (bench/common.py: verdict).
    probe = plausibility_probe(args.device)
    if probe is not None:
        machine["plausibility_probe"] = {k: round(v, 2) for k, v in probe.items()}
    with open(path[: -len(".csv")] + ".machine.json", "w") as f:
        json.dump(machine, f, indent=1)
    print("[bench] machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), flush=True)
    rows, failed = [], []
    # The CSV and the table grow family by family, so a run cut short (a device time limit) keeps
    # what it measured.
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        f.flush()
        for fam in families:
            try:
                mod = importlib.import_module(f"bench.bench_{fam}")
            except ModuleNotFoundError as e:
                if e.name == f"bench.bench_{fam}":
                    print(f"[bench] no benchmark for {fam} yet")
                    continue
                raise
            print(f"[bench] {fam} on {args.device} ({'full' if args.full else 'quick'}) ...", flush=True)
            try:
                fam_rows = mod.run(args.device, quick=not args.full)
            except Exception as e:  # report and fail at the end, after the other families ran
                failed.append(fam)
                print(f"[bench] {fam} FAILED: {type(e).__name__}: {e}")
                continue
            for r in fam_rows:
                w.writerow({k: r.get(k, "") for k in COLUMNS})
            f.flush()
            _print_table(fam_rows)
            rows += fam_rows

    goals = [r for r in rows if r.get("goal")]
    if goals:
        print("\nGoals (issue targets; each figure measured in this run):")
        invalid = 0
        for r in goals:
            v = verdict(r)
            invalid += v == INVALID
            print(f"  {r['kernel']:<22} {r['provider']:<28} x={str(r['x']):<6} {r['p50']:>9.3g}  "
                  f"goal {r['goal']:<7} {v}   {r.get('note', '')}")
        if invalid:
            print(f"[bench] {invalid} goal verdict(s) {INVALID}: their floors ran at under "
                  f"{FLOOR_PLAUSIBLE_FRACTION:g}x this run's 1-thread rates (read "
                  f"{probe['read_gbs_1thread']:.3g} GB/s, fp32 GEMM {probe['gemm_gflops_1thread']:.3g} "
                  "GFLOP/s); another process "
                  "was busy on the cores. Rerun on a quiet machine.")
    print(f"\n[bench] wrote {path}")
    if failed:
        print(f"[bench] failed families: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
