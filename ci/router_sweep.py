"""Launch shapes of the fused router on this GPU: the numbers behind the ``router`` rows of backends/*.toml.

Run on a GPU machine from the repository root: ``PYTHONPATH=. python3 ci/router_sweep.py [--write FAMILY]
[T,T,...]``; ``--write h200`` puts the fastest shapes into that family of ``backends/cuda.toml`` as its
``router`` rows (after its ``buckets``, where ``g4route tune --write`` leaves them alone; rows added by
hand, such as the float32 ones, are replaced too). ``--float32 [T,T,...]`` sweeps float32 hidden states
instead, over shapes that compile without spills for sm_90 (``python -m g4route.aot`` checks), and only
prints: their rows are added by hand, with ``dtypes = ["float32"]``.
For Gemma 4's shape (H = 2816, E = 128, K = 8, bfloat16 hidden states, scale and per-expert scale) it
times ``router_kernel.launch`` alone as CUDA-graph replays, the hidden states and weight cycling through
copies larger than the L2 cache, over a grid of (tokens a program, hidden slice, split, warps, stages)
that suits each T; checks each shape's ids against the first shape's (every shape computes the same
float32 logits up to accumulation order, so a differing id must be a near-tie: at most 1 in 1,000
rows); and prints the three fastest with the table's current choice.
"""

from __future__ import annotations

import datetime
import itertools
import re
import sys
from pathlib import Path

import torch
import triton

from g4route import configs, registry, router_kernel, timing
from g4route.router_kernel import RouterConfig

H, E, K = 2816, 128, 8


# float32 hidden states: 64-column slices (32 float32 columns a step) and at most 64 rows; 128-column slices
# of 32 or 64 rows spilled 248-336 B on sm_90, (16, 128, 4, 4, 3) 32 B (BENCHMARKS.md, eighth session).
FLOAT32_GRID = {
    256: [(16, 128, 22, 4, 2), (16, 64, 22, 4, 3), (16, 128, 11, 4, 3), (16, 64, 11, 4, 3)],
    4096: [(16, 64, 4, 4, 4), (32, 64, 4, 4, 4), (32, 64, 2, 4, 4), (64, 64, 2, 4, 4), (64, 64, 4, 4, 4),
           (16, 64, 8, 4, 4), (32, 64, 8, 4, 4)],
    None: [(32, 64, 1, 4, 4), (64, 64, 1, 4, 3), (64, 64, 1, 4, 4)],
}


def grid(tokens: int, dtype: torch.dtype = torch.bfloat16) -> list[RouterConfig]:
    if dtype == torch.float32:
        bound = next(b for b in FLOAT32_GRID if b is None or tokens <= b)
        return [RouterConfig(*s) for s in FLOAT32_GRID[bound]]
    if tokens <= 16:
        shapes = itertools.product([16], [128], [22, 44], [4], [2, 3])
    elif tokens <= 64:
        shapes = itertools.product([16], [64, 128], [11, 22], [4], [3])
    elif tokens <= 256:
        shapes = itertools.product([16, 32], [64, 128], [4, 8], [4], [3])
    elif tokens <= 4096:
        shapes = itertools.product([64, 128], [64, 128], [1, 2], [4, 8], [3])
    else:
        shapes = itertools.product([64, 128], [64, 128], [1], [4, 8], [3, 4])
    return [RouterConfig(*s) for s in shapes]


def sweep(tokens: int, dtype: torch.dtype, device: torch.device):
    copies = max(1, min(32, (256 << 20) // ((tokens + E) * H * dtype.itemsize)))
    pairs = [(torch.randn(tokens, H, device=device).to(dtype), (torch.randn(E, H, device=device) * H**-0.5).to(dtype))
             for _ in range(copies)]
    pes = torch.rand(E, device=device) + 0.5
    options = registry.select(device, E, K).router_options()  # the vendor table's choices, as router() has them
    weights = torch.empty(tokens, K, device=device)
    ids = torch.empty(tokens, K, dtype=torch.int32, device=device)
    state = {"i": 0}

    def call(config):
        state["i"] = (state["i"] + 1) % copies
        x, w = pairs[state["i"]]
        router_kernel.launch(x, w, K, pes, 1e-6, True, weights, ids, None, config, **options)

    results, reference = [], None
    for config in grid(tokens, dtype):
        state["i"] = copies - 1
        try:
            call(config)
        except triton.runtime.errors.OutOfResources as exc:  # e.g. too many stages of large tiles
            print(f"  skipped {tuple(config)}: {exc}", flush=True)
            continue
        torch.cuda.synchronize(device)
        if reference is None:
            reference = ids.clone()
        differ = (ids != reference).any(-1).float().mean().item()
        if differ > 1e-3:
            raise AssertionError(f"{config}: ids differ from the first shape's on {differ:.2%} of rows")
        us = timing.graph_median_us(lambda config=config: call(config), device, calls=max(20, copies), reps=10)
        results.append((us, config))
    return sorted(results, key=lambda r: r[0])


def write_rows(path: Path, family: str, best: dict[int, RouterConfig], provenance: str) -> None:
    """Put ``router`` rows (one per swept T, the last unbounded) after ``family``'s buckets in ``path``."""
    rows = sorted(best.items())
    lines = [f"# router: {provenance}", "router = ["]
    for i, (t, c) in enumerate(rows):
        bound = "" if i == len(rows) - 1 else f"max_tokens = {t}, "
        lines.append(f"  {{ {bound}block_t = {c.block_t}, block_h = {c.block_h}, split = {c.split}, "
                     f"num_warps = {c.num_warps}, num_stages = {c.num_stages} }},")
    block = "\n".join([*lines, "]"]) + "\n"
    text = path.read_text()
    pattern = re.compile(r"(^\[\[family\]\]\nname = \"" + re.escape(family) + r"\"\n.*?^\]\n)"
                         r"(?:# router:[^\n]*\nrouter = \[.*?^\]\n)?", re.M | re.S)
    text, count = pattern.subn(lambda m: m.group(1) + block, text)
    if not count:
        raise SystemExit(f"no family {family!r} in {path}")
    configs.parse_table(text, str(path))  # never write a table the loader would reject
    path.write_text(text)


def main() -> None:
    args = sys.argv[1:]
    family = None
    dtype = torch.bfloat16
    if args[:1] == ["--write"]:
        family, args = args[1], args[2:]
    elif args[:1] == ["--float32"]:
        dtype, args = torch.float32, args[1:]
    device = torch.device("cuda")
    tokens = [int(t) for t in args[0].split(",")] if args else [1, 16, 64, 256, 1024, 4096, 16384, 65536]
    backend = registry.select(device, E, K)
    name = torch.cuda.get_device_name(device)
    print(f"# {name}, {str(dtype).removeprefix('torch.')}, H={H} E={E} K={K}")
    best = {}
    for t in tokens:
        ranked = sweep(t, dtype, device)
        best[t] = ranked[0][1]
        current = backend.router_config_for(device, t, dtype)
        mine = next((us for us, c in ranked if c == current), None)
        shown = "; ".join(f"{us:.2f} us {tuple(c)}" for us, c in ranked[:3])
        print(f"T={t}: {shown} | table {tuple(current)}: " + ("not in grid" if mine is None else f"{mine:.2f} us"),
              flush=True)
    if family:
        provenance = (f"ci/router_sweep.py on {name}, {datetime.date.today().isoformat()}, bfloat16 H={H} E={E} "
                      f"K={K}, torch {torch.__version__}")
        write_rows(Path("backends/cuda.toml"), family, best, provenance)
        print(f"wrote the router rows of family {family!r} into backends/cuda.toml")


if __name__ == "__main__":
    main()
