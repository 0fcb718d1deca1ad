"""Where a CPU route() call's time goes, against stock routing (issue 9, deliverable 4; BENCHMARKS.md, "CPU").

Run from the repository root: ``PYTHONPATH=. python3 ci/cpu_paths.py [T,T,...] [threads]``.

Two tables, E = 128, K = 8, float32 and bfloat16, every column timed in alternation over 16 rotating inputs
(``timing.interleaved_host_us``, as ``g4route bench`` on a CPU):

  layers    stock routing; route(); the torch backend (``route_torch``) called directly; the path it takes
            (one row, few rows) called directly: what route()'s argument checks and call levels cost
  bands     route() with the packed keys from 160 rows, as with one intra-op thread, against route() with
            torch.topk's paths to packed_min_rows(): which band serves a token count best with these threads
"""
import sys

import torch

from g4route import reference, route, timing
from g4route.bench import _Rotating, stock_routing

E, K = 128, 8


def _row(title: str, times: dict[str, float]) -> None:
    stock = times["stock"]
    print(f"{title:16} " + "  ".join(f"{name} {us:8.1f} us ({stock / us:.2f}x)" for name, us in times.items()),
          flush=True)


def layers(tokens: list[int], scale: torch.Tensor) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for t in [t for t in tokens if t < reference.PACKED_MIN_ROWS]:
            xs = [torch.randn(t, E).mul_(2).to(dtype) for _ in range(16)]
            path = reference._route_one if t == 1 else reference._route_few
            fns = {"stock": lambda x: stock_routing(x, K, scale), "route": lambda x: route(x, K, scale),
                   "route_torch": lambda x: reference.route_torch(x, K, scale, True),
                   "path": lambda x, path=path: path(x, K, scale)}
            _row(f"{str(dtype)[6:]} T={t}", timing.interleaved_host_us({n: _Rotating(f, xs) for n, f in fns.items()}))


def bands(tokens: list[int], scale: torch.Tensor) -> None:
    chosen = dict(reference._PACKED_MIN_ROWS_THREADED)
    one_thread = dict.fromkeys(chosen, reference.PACKED_MIN_ROWS)

    def with_band(band: dict):
        def call(x):
            reference._PACKED_MIN_ROWS_THREADED = band
            return route(x, K, scale)
        return call

    try:
        for dtype in (torch.float32, torch.bfloat16):
            for t in [t for t in tokens if t >= reference.PACKED_MIN_ROWS]:
                xs = [torch.randn(t, E).mul_(2).to(dtype) for _ in range(16)]
                fns = {"stock": lambda x: stock_routing(x, K, scale), "packed from 160": with_band(one_thread),
                       "packed_min_rows()": with_band(chosen)}
                _row(f"{str(dtype)[6:]} T={t}",
                     timing.interleaved_host_us({n: _Rotating(f, xs) for n, f in fns.items()}, rounds=15))
    finally:
        reference._PACKED_MIN_ROWS_THREADED = chosen


def main() -> None:
    tokens = [int(t) for t in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 4, 16, 64, 256, 1024, 4096]
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    print(f"{torch.get_num_threads()} intra-op threads; E={E} K={K}; torch {torch.__version__}")
    scale = torch.rand(E) + 0.5
    layers(tokens, scale)
    bands(tokens, scale)


if __name__ == "__main__":
    main()
