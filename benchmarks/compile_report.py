"""Compile the region-attention kernel for sm_80 (A100) and sm_90 (H100/H200) without a GPU
and report registers, spills and shared memory of every configuration in the table.

    env -u TRITON_INTERPRET python benchmarks/compile_report.py [--all-candidates]

Writes benchmarks/results/compile_report_triton<version>.csv. The heuristic's choice for each
(head dim, dtype) is marked; tests/kernels/test_compile.py asserts those never spill.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import asdict


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anyms_kernels._compile import resource_usage  # noqa: E402
from anyms_kernels._triton import TRITON_VERSION  # noqa: E402
from anyms_kernels.ops.region_attention import TRITON_DTYPES, TRITON_HEAD_DIMS, config_candidates  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all-candidates", action="store_true", help="also compile the autotuner's other candidates")
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    rows = []
    for arch in (int(a) for a in args.archs.split(",")):
        for dtype in TRITON_DTYPES:
            for head_dim in TRITON_HEAD_DIMS:
                cands = config_candidates(head_dim, dtype)
                for i, cfg in enumerate(cands if args.all_candidates else cands[:1]):
                    r = asdict(resource_usage(head_dim, dtype, cfg, arch=arch))
                    r["heuristic_choice"] = i == 0
                    rows.append(r)
                    print(f"sm_{arch} {r['dtype']:>4} D={head_dim:<3} BLOCK_M={cfg.block_m:<3} L77 "
                          f"warps={cfg.num_warps} regs={r['registers']:<3} stack={r['stack_bytes']:<4} "
                          f"spill={r['spill_stores']}/{r['spill_loads']} smem={r['shared_bytes']}"
                          f"{'  <- heuristic' if i == 0 else ''}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    version = ".".join(map(str, TRITON_VERSION))
    path = os.path.join(args.out, f"compile_report_triton{version}.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("wrote", path)


if __name__ == "__main__":
    main()
