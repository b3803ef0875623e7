#!/usr/bin/env python3
"""Turns moe_layer's JSON output (with --benchmark_repetitions=3 --benchmark_report_aggregates_only=true) into the
tables of bench/RESULTS.md: every case's medians, and issue 2's targets. A filtered run (--benchmark_filter) gets the
cases it has; the targets whose cases it lacks are skipped. Without repetitions each case's single run is used.

usage: bench/moe_layer_table.py moe_layer.json
"""
import json
import sys


def main(path):
    data = json.load(open(path))
    med = {}
    repeated = any(b.get("aggregate_name") == "median" for b in data["benchmarks"])
    for b in data["benchmarks"]:
        if repeated and b.get("aggregate_name") != "median":
            continue
        med[b.get("run_name", b["name"]).replace("/real_time", "").replace("/manual_time", "")] = b
    print("| case | time (us) | tokens/s | GFLOP/s | experts | weight MB | roofline (us) | fraction | GB/s now | "
          "fraction now |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, b in med.items():
        if "Ceiling" in name:
            continue
        t = b["real_time"] if b["time_unit"] == "us" else b["real_time"] / 1e3
        ex = b.get("experts_touched")
        now = b.get("roofline_frac_now")
        print("| %s | %s | %s | %.1f | %s | %.1f | %s | %.2f | %s | %s |" % (
            name, format(round(t), ","), format(round(b["tokens/s"]), ","), b["GFLOP/s"],
            "" if ex is None else "%.0f" % ex, b["weight_MB"], format(round(b["roofline_us"]), ","),
            b["roofline_frac"], "" if now is None else "%.1f" % b["read_GB/s_now"],
            "" if now is None else "%.2f" % now))

    def time(name):
        b = med[name]
        return b["real_time"] if b["time_unit"] == "us" else b["real_time"] / 1e3

    big = ("BM_Dense/d_ff:4096/tokens:4096", "BM_MoE_Task/E:32/tokens:4096", "BM_MoE_Token/E:32/tokens:4096",
           "BM_Stage_TokenExperts/E:32/tokens:4096")
    if all(n in med for n in big):
        dense, task, token, experts = (time(n) for n in big)
        print("\ntask/dense %.3f, token/dense %.3f, layer minus expert stage over layer %.3f"
              % (task / dense, token / dense, (token - experts) / token))
        stages = ("BM_Stage_TokenGating/E:32/tokens:4096", "BM_Stage_TokenPermute/E:32/tokens:4096")
        if all(n in med for n in stages):
            gating, permute = (time(n) for n in stages)
            print("overhead share (gating %.0f us + permutation and combine %.0f us, each timed alone, over the layer)"
                  " %.3f" % (gating, permute, (gating + permute) / token))
    small_batch_grid(med, "BM_MoE", "roofline_frac", "warm: back-to-back calls, weights that fit stay in the L3")
    small_batch_grid(med, "BM_Cold_MoE", "roofline_frac",
                     "cold: caches evicted before each call, weights from DRAM; against the ceilings of the run's start")
    small_batch_grid(med, "BM_Cold_MoE", "roofline_frac_now",
                     "cold, against the bandwidth each case measured in its own eviction passes (the best of them)")


def small_batch_grid(med, prefix, key, label):
    """Issue 2's small-batch target: the fraction of the roofline at 1, 8 and 64 tokens, per granularity and E."""
    names = {(g, e, n): "%s_%s/E:%d/tokens:%d" % (prefix, g, e, n) for g in ("Token", "Sentence", "Task")
             for e in (8, 32, 128) for n in (1, 8, 64)}
    if not all(n in med for n in names.values()):
        return
    print("\n%s\n\n| granularity | E | 1 token | 8 tokens | 64 tokens |\n|---|---:|---:|---:|---:|" % label)
    passed = total = 0
    for g in ("Token", "Sentence", "Task"):
        for e in (8, 32, 128):
            cells = []
            for n in (1, 8, 64):
                f = med[names[(g, e, n)]][key]
                total += 1
                passed += f >= 0.7
                cells.append("%.2f%s" % (f, "" if f >= 0.7 else " **FAIL**"))
            print("| %s | %d | %s |" % (g.lower(), e, " | ".join(cells)))
    print("\n%d of %d small-batch cases reach 70%% (%s, %s)" % (passed, total, prefix, key))
    fixed = {(e, n): "%s_TaskFixed/E:%d/tokens:%d" % (prefix, e, n) for e in (8, 32, 128) for n in (1, 8, 64)}
    if all(n in med for n in fixed.values()):
        print("\ntask routing with every task's logits computed once (Input::task_logits), the same grid:\n\n"
              "| granularity | E | 1 token | 8 tokens | 64 tokens |\n|---|---:|---:|---:|---:|")
        for e in (8, 32, 128):
            cells = ["%.2f%s" % (med[fixed[(e, n)]][key], "" if med[fixed[(e, n)]][key] >= 0.7 else " **FAIL**")
                     for n in (1, 8, 64)]
            print("| task, fixed logits | %d | %s |" % (e, " | ".join(cells)))


if __name__ == "__main__":
    main(sys.argv[1])
