"""Timing on any device: device events (CUDA, ROCm, XPU), graph replay for small work, host clocks on CPU.

Used by ``g4route bench`` and ``g4route tune``; never by unit tests (speed lives in the benchmark).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


def _event(device: torch.device):
    return torch.Event(device=device.type, enable_timing=True)


def median_us(fn: Callable[[], object], device: torch.device, *, warmup: int = 5, reps: int = 50) -> float:
    """Median microseconds of one ``fn()`` call: device events around each call after warm-up."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cpu":
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e6)
        return statistics.median(samples)
    pairs = [(_event(device), _event(device)) for _ in range(reps)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    synchronize(device)
    return statistics.median(start.elapsed_time(end) * 1e3 for start, end in pairs)


def interleaved_host_us(
    fns: dict[str, Callable[[], object]], *, rounds: int = 25, block_s: float = 2e-3
) -> dict[str, float]:
    """Median microseconds per call of each host-bound ``fn`` (CPU work), timed in alternating blocks.

    Each round times a block of calls of every function in turn (about ``block_s`` seconds each), so a
    host that slows down or speeds up mid-run (a busy neighbour, a frequency change) weighs on all of them
    alike; timing one after the other let such drift decide which was faster. The order rotates from
    round to round.
    """
    sizes = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        start = time.perf_counter()
        fn()
        sizes[name] = max(1, min(5000, round(block_s / max(time.perf_counter() - start, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        # Each round starts from the next function: whichever runs right after another that warmed the
        # same code or data would otherwise be favoured every round.
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, calls = fns[name], sizes[name]
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) * 1e6 / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def graph_median_us(fn: Callable[[], object], device: torch.device, *, calls: int = 20, reps: int = 30) -> float:
    """Median microseconds per ``fn()`` when ``calls`` of them replay from one CUDA graph.

    Graph replay removes the host's launch cost, which would otherwise dominate small token counts.
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_us(graph.replay, device, warmup=3, reps=reps) / calls


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src), device, warmup=3, reps=20)
    return 2 * nbytes / (us * 1e-6)


def host_us_per_call(fn: Callable[[], object], device: torch.device, *, calls: int = 2000) -> float:
    """Wall-clock microseconds per call from Python, synchronising once at the end (host-bound work)."""
    for _ in range(50):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e6 / calls
