"""What one launch can do at all, in CUDA-graph replay, beside the fused router (issue 12's targets).

Run on a CUDA machine from the repository root: ``PYTHONPATH=. python3 ci/router_floor.py 1,256,4096,65536``.

Columns, per T (bfloat16, H = 2816, E = 128), each over 32 rotating (x, W) pairs as g4route bench --router:
  tiny      one 1-element add_ (a graph node's floor)
  read      one Triton launch that reads x and W once (sum into one float per program): the best a single
            launch reads those bytes in, whatever it computes
  read_last one launch that reads W with P programs, writes [P, E] partials, and whose last-arriving program
            (an acq_rel counter, reset by it) sums them: the single-launch split-K pattern, no MMA (T=1)
  mm        cuBLAS x @ W.T, float32 out: the projection alone
  router    g4route.router (two launches below 4,097 tokens: split + reduce)
"""
import sys

import torch
import triton
import triton.language as tl

from g4route import router, timing
from g4route.bench import _Rotating

dev = torch.device("cuda")
H, E, K = 2816, 128, 8


@triton.jit
def read2(a_ptr, na, b_ptr, nb, out_ptr, BLOCK: tl.constexpr, PER: tl.constexpr):
    pid = tl.program_id(0)
    per_prog = BLOCK * PER
    pa = tl.cdiv(na, per_prog)
    acc = tl.zeros([BLOCK], tl.float32)
    if pid < pa:
        base = pid * per_prog
        for i in tl.static_range(PER):
            offs = base + i * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(a_ptr + offs, mask=offs < na, other=0.0).to(tl.float32)
    else:
        base = (pid - pa) * per_prog
        for i in tl.static_range(PER):
            offs = base + i * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(b_ptr + offs, mask=offs < nb, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


@triton.jit
def read_last(w_ptr, nb, part_ptr, cnt_ptr, out_ptr, P, BLOCK: tl.constexpr, PER: tl.constexpr, EB: tl.constexpr,
              RB: tl.constexpr):
    pid = tl.program_id(0)
    per_prog = BLOCK * PER
    acc = tl.zeros([BLOCK], tl.float32)
    base = pid * per_prog
    for i in tl.static_range(PER):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + offs, mask=offs < nb, other=0.0).to(tl.float32)
    part = tl.sum(tl.reshape(acc, [BLOCK // EB, EB]), axis=0)
    cols = tl.arange(0, EB)
    tl.store(part_ptr + pid * EB + cols, part)
    old = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if old == P - 1:
        tot = tl.zeros([EB], tl.float32)
        for r0 in range(0, P, RB):
            rows = r0 + tl.arange(0, RB)
            tot += tl.sum(tl.load(part_ptr + rows[:, None] * EB + cols[None, :], mask=rows[:, None] < P, other=0.0,
                                  cache_modifier=".cg"), axis=0)
        tl.store(out_ptr + cols, tot)
        tl.atomic_xchg(cnt_ptr, 0)


def gus(fn, args):
    return timing.graph_median_us(_Rotating(fn, args), dev, calls=max(20, len(args)))


def main():
    tokens = [int(t) for t in (sys.argv[1] if len(sys.argv) > 1 else "1,256,4096,65536").split(",")]
    bw = timing.copy_bandwidth(dev) / 1e9
    print(f"# {torch.cuda.get_device_name()} copy bandwidth {bw:.0f} GB/s", flush=True)
    one = torch.zeros(1, device=dev)
    tiny = gus(lambda x: x.add_(1), [one])
    scale = (torch.rand(H, device=dev) + 0.5).bfloat16()
    pes = torch.rand(E, device=dev) + 0.5
    rows = []
    for t in tokens:
        copies = max(1, min(32, (256 << 20) // ((t + E) * H * 2)))
        pairs = [(torch.randn(t, H, device=dev).bfloat16(), (torch.randn(E, H, device=dev) * H**-0.5).bfloat16())
                 for _ in range(copies)]
        out = (torch.empty(t, K, device=dev), torch.empty(t, K, dtype=torch.int32, device=dev))
        for x, w in pairs:
            router(x, w, K, scale=scale, per_expert_scale=pes, out=out)
        res = {"tiny": tiny}
        best = None
        for block, per in [(1024, 1), (1024, 2), (1024, 4), (2048, 4), (1024, 8), (2048, 8)]:
            na, nb = t * H, E * H
            grid = triton.cdiv(na, block * per) + triton.cdiv(nb, block * per)
            sink = torch.empty(grid, device=dev)
            us = gus(lambda p, g=grid, s=sink, b=block, q=per: read2[(g,)](p[0], p[0].numel(), p[1], p[1].numel(), s,
                                                                             BLOCK=b, PER=q), pairs)
            best = us if best is None else min(best, us)
        res["read"] = best
        if t == 1:
            best = None
            for block, per in [(1024, 1), (1024, 2), (2048, 1), (2048, 2), (1024, 4)]:
                nb = E * H
                P = triton.cdiv(nb, block * per)
                part = torch.empty(P, E, device=dev)
                cnt = torch.zeros(1, dtype=torch.int32, device=dev)
                sink = torch.empty(E, device=dev)
                us = gus(lambda p, P=P, part=part, cnt=cnt, s=sink, b=block, q=per: read_last[(P,)](
                    p[1], p[1].numel(), part, cnt, s, P, BLOCK=b, PER=q, EB=E, RB=32), pairs)
                best = us if best is None else min(best, us)
            res["read_last"] = best
        res["mm"] = gus(lambda p: torch.mm(p[0], p[1].T, out_dtype=torch.float32), pairs)
        res["router"] = gus(lambda p, o=out: router(p[0], p[1], K, scale=scale, per_expert_scale=pes, out=o), pairs)
        res["floor"] = (t + E) * H * 2 / (bw * 1e9) * 1e6
        rows.append((t, res))
        print(t, {k: round(v, 2) for k, v in res.items()}, flush=True)
    cols = ["tiny", "read", "read_last", "mm", "router", "floor"]
    print("| T | " + " | ".join(f"{c} us" for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for t, res in rows:
        print(f"| {t:,} | " + " | ".join(f"{res[c]:.2f}" if c in res else "-" for c in cols) + " |")


main()
