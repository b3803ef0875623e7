#!/usr/bin/env python3
"""Turns the outputs of bench/cuda/moe_layer.cu (Google Benchmark JSON) and bench/cuda/torch_moe.py (JSON lines) into
the GPU table of bench/RESULTS.md: each figure and its ratio to the same-run baseline, with the issue's targets.

    python3 bench/cuda/table.py bench.json [torch.json]
"""
import json
import re
import sys


def medians(path):
    """name (without the /manual_time suffix) -> median entry."""
    with open(path) as f:
        data = json.load(f)
    out = {}
    for b in data["benchmarks"]:
        if b.get("aggregate_name", "median") != "median":
            continue
        name = re.sub(r"/manual_time(_median)?$", "", b.get("run_name", b["name"]))
        out[name] = b
    return out, data.get("context", {})


def us(entry):
    scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}[entry.get("time_unit", "us")]
    return entry["real_time"] * scale


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    bench, context = medians(sys.argv[1])
    torch = {}
    if len(sys.argv) > 2:
        with open(sys.argv[2]) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    torch[r["name"]] = r["ms"] * 1e3
    copy_bw = bench["copy_d2d"]["GBps"] if "copy_d2d" in bench else float("nan")
    print(f"device copy bandwidth (read + write): {copy_bw:.0f} GB/s")
    print()
    print("| layer | tokens | time (us) | TFLOP/s | vs dense | weights GB/s | vs copy | vs PyTorch | target |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for kind in ("dense_ffn", "moe_token<8>", "moe_token<32>", "moe_token<128>", "moe_task<8>", "moe_task<32>",
                 "moe_task<128>"):
        for n in (1, 8, 64, 16384):
            name = f"{kind}/{n}"
            if name not in bench:
                continue
            b = bench[name]
            t = us(b)
            tf = b.get("TFLOPs", 0)
            gbs = b.get("weight_GBps", 0)
            dense = bench.get(f"dense_ffn/{n}")
            vs_dense = tf / dense["TFLOPs"] if dense else float("nan")
            vs_copy = gbs / copy_bw
            # The PyTorch baseline is the token-routed layer, so only the token rows get a ratio.
            vs_torch = torch.get(f"torch_{kind}/{n}", float("nan")) / t if kind.startswith("moe_token") else float("nan")
            target = ""
            if kind.startswith("moe_token") and n == 16384:
                target = f"dense >= 0.70: {'met' if vs_dense >= 0.70 else 'MISSED'}; torch >= 3x: {'met' if vs_torch >= 3 else 'MISSED'}"
            elif kind.startswith("moe_task") and n == 16384:
                target = f"dense >= 0.90: {'met' if vs_dense >= 0.90 else 'MISSED'}"
            elif kind.startswith("moe") and n in (1, 8, 64):
                target = f"copy >= 0.60: {'met' if vs_copy >= 0.60 else 'MISSED'}"
                if kind.startswith("moe_token") and n == 8:
                    target += f"; torch >= 5x: {'met' if vs_torch >= 5 else 'MISSED'}"
            torch_cell = "-" if vs_torch != vs_torch else f"{vs_torch:.1f}x"
            print(f"| {kind} | {n} | {t:.1f} | {tf:.1f} | {vs_dense:.2f} | {gbs:.0f} | {vs_copy:.2f} | {torch_cell} | {target} |")


if __name__ == "__main__":
    main()
