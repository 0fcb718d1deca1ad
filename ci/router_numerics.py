"""How far the fused router and Transformers' unfused bfloat16 router are from a float64 oracle.

Run from the repository root on any machine: ``PYTHONPATH=. python3 ci/router_numerics.py [T]``. On random
bfloat16 hidden states (H = 2816, E = 128, K = 8, a learned-looking scale and per-expert scale, the
weight at Gemma 4's initial spread) it reports, for each implementation: the worst logit error as a
fraction of the logits' spread, the share of tokens whose chosen experts differ from the oracle's, and
the share whose K-th place is tied in that implementation's own logits. The fused router runs as
``G4ROUTE_BACKEND`` selects (the PyTorch reference on a CPU: the kernel's roundings, another summation
order); ``logit_error_bound`` is printed beside it.
"""

from __future__ import annotations

import sys

import torch

import g4route
from g4route.bench_router import stock_router
from g4route.router import logit_error_bound

H, E, K, EPS = 2816, 128, 8, 1e-6


def main() -> None:
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, H, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(E, H, generator=gen) * H**-0.5).to(torch.bfloat16)
    scale = (torch.rand(H, generator=gen) + 0.5).to(torch.bfloat16)
    pes = torch.rand(E, generator=gen) + 0.5

    xd = x.double()
    oracle = (xd * torch.rsqrt((xd * xd).mean(-1, keepdim=True) + EPS) * scale.double() * H**-0.5) @ weight.double().T
    spread = float(oracle.std())
    want = oracle.topk(K, dim=-1).indices.sort(-1).values

    # Transformers' bfloat16 logits (the projection's output, before the float32 softmax).
    wide = x.float()
    normed = (wide * torch.pow(wide.pow(2).mean(-1, keepdim=True) + EPS, -0.5)).to(torch.bfloat16)
    stock_logits = torch.nn.functional.linear(normed * scale * H**-0.5, weight).double()
    _, stock_ids = stock_router(x, weight, scale, pes, K, EPS)

    _, fused_ids, fused_logits = g4route.router(x, weight, K, scale=scale, per_expert_scale=pes, eps=EPS,
                                                return_logits=True)
    bound = logit_error_bound(x, weight, scale, EPS)

    def report(name: str, logits: torch.Tensor, ids: torch.Tensor) -> None:
        error = float((logits - oracle).abs().max()) / spread
        differ = float((ids.long().sort(-1).values != want).any(-1).float().mean())
        top = logits.topk(K + 1, dim=-1).values
        tied = float((top[:, K - 1] == top[:, K]).float().mean())
        print(f"| {name} | {error:.2e} | {differ:.2%} | {tied:.2%} |")

    print(f"# {tokens:,} tokens, bfloat16, H={H} E={E} K={K}; logit spread (std) {spread:.3f}; "
          f"backend {g4route.backend_for('cpu', E, K)}")
    print("| router | worst logit error / spread | experts differ from the oracle | K-th place tied |")
    print("|---|---|---|---|")
    report("Transformers, bfloat16", stock_logits, stock_ids)
    report("g4route.router()", fused_logits.double(), fused_ids)
    worst = float(((fused_logits.double() - oracle).abs() / bound).max())
    print(f"g4route.router(): worst error / its bound {worst:.3f}; median bound / spread "
          f"{float(bound.median()) / spread:.2e}")


if __name__ == "__main__":
    main()
