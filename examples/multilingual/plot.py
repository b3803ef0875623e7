#!/usr/bin/env python3
"""Draws the research program's pictures from its CSV outputs (matplotlib, headless):

    plot.py OUT_DIR

  curves.png          validation loss against step, one line per model (curves.csv)
  usage_<layer>.png   per MoE layer of the token/token model, the fraction of each task's tokens routed to each
                      expert (usage.csv): the paper's gating analysis
"""
import csv
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves(out):
    series = defaultdict(list)
    with open(os.path.join(out, "curves.csv")) as f:
        for row in csv.DictReader(f):
            series[row["model"]].append((int(row["step"]), float(row["val_loss"])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats per target token)")
    ax.set_title("Learning curves")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    fig.savefig(path, dpi=120)
    return [path]


def task_names(out):
    """Task names in task-id order, from the bleu_<task> columns of results.csv (ids if it is not there)."""
    path = os.path.join(out, "results.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        header = f.readline().strip().split(",")
    return [c[len("bleu_"):] for c in header if c.startswith("bleu_") and c != "bleu_avg"]


def usage(out):
    path = os.path.join(out, "usage.csv")
    if not os.path.exists(path):
        return []
    names = task_names(out)
    counts = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    with open(path) as f:
        for row in csv.DictReader(f):
            counts[row["layer"]][int(row["task"])][int(row["expert"])] = float(row["fraction"])
    paths = []
    for layer, table in counts.items():
        tasks = sorted(table)
        experts = sorted({e for t in tasks for e in table[t]})
        grid = [[table[t].get(e, 0.0) for e in experts] for t in tasks]
        fig, ax = plt.subplots(figsize=(max(6.0, 1 + 0.6 * len(experts)), 1.5 + 0.5 * len(tasks)))
        im = ax.imshow(grid, cmap="viridis", vmin=0.0, aspect="auto")
        ax.set_xticks(range(len(experts)), [str(e) for e in experts])
        ax.set_yticks(range(len(tasks)), [names[t] if t < len(names) else str(t) for t in tasks])
        ax.set_xlabel("expert")
        ax.set_ylabel("task")
        ax.set_title(f"{layer}\nshare of each task's tokens sent to each expert (rows sum to k)", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        name = os.path.join(out, "usage_" + layer.replace(".", "_").replace("/", "_") + ".png")
        fig.savefig(name, dpi=120)
        paths.append(name)
    return paths


def main():
    out = sys.argv[1]
    for p in curves(out) + usage(out):
        print(p)


if __name__ == "__main__":
    main()
