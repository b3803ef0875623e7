#!/usr/bin/env python3
"""Turns decode_throughput's JSON output into the Markdown tables of bench/RESULTS.md.

usage: bench/decode_table.py decode.json
"""
import json
import sys

MODELS = ["dense", "dense_2F", "subnet_32", "token_task_32", "token_token_32", "subnet_128", "token_task_128",
          "token_token_128"]


def main(path):
    data = json.load(open(path))
    rows = {}
    for b in data["benchmarks"]:
        name = b["name"]
        if not name.startswith("BM_Decode/"):
            continue
        _, model, batch, _ = name.split("/")
        rows.setdefault(model, {})[int(batch.split(":")[1])] = b
    batches = sorted({k for m in rows.values() for k in m})
    print("tokens/s (roofline fraction):\n")
    print("| model | " + " | ".join(str(b) for b in batches) + " | peak |")
    print("|---|" + "---:|" * (len(batches) + 1))
    peaks = {}
    for m in MODELS:
        if m not in rows:
            continue
        cells = []
        for b in batches:
            r = rows[m].get(b)
            cells.append("" if r is None else "%.0f (%.2f)" % (r["tokens/s"], r["roofline_frac"]))
        peak = max(r["tokens/s"] for r in rows[m].values())
        peaks[m] = peak
        print("| %s | %s | %.0f |" % (m, " | ".join(cells), peak))
    print("\nms per decoder step (batch time / 32), and experts a decoder MoE layer reads per step:\n")
    print("| model | " + " | ".join(str(b) for b in batches) + " |")
    print("|---|" + "---:|" * len(batches))
    for m in MODELS:
        if m not in rows:
            continue
        cells = []
        for b in batches:
            r = rows[m].get(b)
            if r is None:
                cells.append("")
            elif r["touched_experts"] > 0:
                cells.append("%.2f / %.1f" % (r["step_ms"], r["touched_experts"]))
            else:
                cells.append("%.2f" % r["step_ms"])
        print("| %s | %s |" % (m, " | ".join(cells)))
    print("\nRatios (same run):\n")
    for e in ("32", "128"):
        s, t = "subnet_" + e, "token_token_" + e
        if s in peaks and t in peaks:
            print("- E=%s: peak tokens/s, sub-network over token/token: %.2fx" % (e, peaks[s] / peaks[t]))
        if s in rows and t in rows:
            for b in (1, 8):
                if b in rows[s] and b in rows[t]:
                    print("  - batch %d step latency, token/token over sub-network: %.2fx" %
                          (b, rows[t][b]["step_ms"] / rows[s][b]["step_ms"]))
        if s in rows and "dense_2F" in rows:
            worst = min(rows["dense_2F"][b]["step_ms"] / rows[s][b]["step_ms"] for b in rows[s] if b in rows["dense_2F"])
            best = max(rows["dense_2F"][b]["step_ms"] / rows[s][b]["step_ms"] for b in rows[s] if b in rows["dense_2F"])
            print("  - sub-network speed over dense 2F across batch sizes: %.2fx to %.2fx" % (worst, best))


if __name__ == "__main__":
    main(sys.argv[1])
