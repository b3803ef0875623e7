#!/usr/bin/env python3
"""The baseline for bench/cuda/moe_layer.cu: the same token-routed MoE layer written the usual way in PyTorch.

bf16, d_model 1024, d_ff 4096, top-2 with weights normalized over the two, no capacity limit: a loop over the experts
that gathers each expert's tokens, runs its FFN and adds the weighted result back with index_add_. Times with CUDA
events around one forward, after overwriting a 256 MiB buffer (as the C++ benchmark does), and prints the median of
the repeats as JSON lines: {"name": "torch_moe_token<E>/N", "ms": ...}.

    python3 bench/cuda/torch_moe.py --out torch.json
"""
import argparse
import json
import statistics

import torch

C, F, K = 1024, 4096, 2


class TorchMoE(torch.nn.Module):
    def __init__(self, experts: int):
        super().__init__()
        self.gate = torch.nn.Linear(C, experts, bias=False)
        self.wi = torch.nn.ModuleList(torch.nn.Linear(C, F, bias=False) for _ in range(experts))
        self.wo = torch.nn.ModuleList(torch.nn.Linear(F, C, bias=False) for _ in range(experts))
        self.experts = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, K, dim=-1)
        weights = (weights / (weights.sum(dim=-1, keepdim=True) + 1e-9)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel() == 0:
                continue
            h = torch.relu(self.wi[e](x[token]))
            out.index_add_(0, token, self.wo[e](h) * weights[token, slot].unsqueeze(-1))
        return out


def median_ms(fn, repeats: int) -> float:
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        flush.fill_(1)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON-lines file to write")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for experts in (8, 32, 128):
            layer = TorchMoE(experts).to(device="cuda", dtype=torch.bfloat16)
            for tokens in (8, 16384):
                x = torch.randn(tokens, C, device="cuda", dtype=torch.bfloat16)
                ms = median_ms(lambda: layer(x), args.repeats)
                rows.append({"name": f"torch_moe_token<{experts}>/{tokens}", "ms": ms})
                print(json.dumps(rows[-1]), flush=True)
            del layer
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
