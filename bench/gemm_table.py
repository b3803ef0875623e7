#!/usr/bin/env python3
"""Turns bench/gemm's JSON output (medians of repetitions) into the Markdown tables of bench/RESULTS.md.

usage: bench/gemm_table.py gemm.json
"""
import json
import sys

ROWS = (1, 2, 3, 4, 7, 8, 13, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
SHAPES = ((512, 1024, "the up-projection slab"), (2048, 256, "the down-projection slab"))


def main(path):
    medians = {}
    for b in json.load(open(path))["benchmarks"]:
        if b.get("aggregate_name", "median") == "median":
            name = b["run_name"] if "run_name" in b else b["name"]
            medians[name.replace("/manual_time", "").replace("/real_time", "")] = b
    for k, n, what in SHAPES:
        print(f"k {k}, n {n} ({what}):\n")
        print("| m | tmoe gemm_serial (us) | GFLOP/s | weight GB/s | Eigen (us) | GFLOP/s | Eigen / tmoe |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for m in ROWS:
            s = medians.get(f"BM_Gemm_Serial/k:{k}/n:{n}/m:{m}")
            e = medians.get(f"BM_Gemm_Eigen/k:{k}/n:{n}/m:{m}")
            if s is None or e is None:
                continue
            print(f"| {m} | {s['real_time']:.0f} | {s['GFLOP/s']:.1f} | {s['weight GB/s']:.1f} | "
                  f"{e['real_time']:.0f} | {e['GFLOP/s']:.1f} | {e['real_time'] / s['real_time']:.2f} |")
        print()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
