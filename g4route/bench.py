"""``g4route bench``: g4route against the PyTorch reference (eager and compiled) and the bandwidth floor.

Every implementation's output is checked against the float64 oracle before it is timed. On CUDA every
size is timed as CUDA-graph replays (so the host's launch cost, tens of microseconds from Python, does
not hide the kernel's own time), each replay cycling through input copies larger than the L2 cache so
that the cache does not flatter a size that would fit in it.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from . import kernel, registry, timing
from .api import route
from .reference import reference_route

_ROTATE_BYTES = 256 << 20  # input copies per size: more than any current GPU's L2


@dataclass
class Row:
    dtype: str
    tokens: int
    g4route_us: float | None
    eager_us: float
    compiled_us: dict[str, float] = field(default_factory=dict)
    floor_us: float | None = None
    stock_us: float | None = None

    @property
    def floor_fraction(self) -> float | None:
        if self.g4route_us is None or self.floor_us is None:
            return None
        return self.floor_us / self.g4route_us


def _check(name: str, result, oracle, num_experts: int) -> None:
    """Raise if ``result`` (weights, ids) differs from the float64 oracle."""
    weights, ids = result
    ref_w, ref_ids = oracle
    if not bool(((ids >= 0) & (ids < num_experts)).all()) or not torch.equal(ids.long(), ref_ids):
        raise AssertionError(f"{name}: ids differ from the float64 oracle")
    torch.testing.assert_close(weights.double(), ref_w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def stock_routing(logits: torch.Tensor, topk: int, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma 4's routing as Transformers writes it (``Gemma4TextRouter.forward`` after the projection):
    the code that ``route()`` replaces, timed beside it. Its tie order is ``torch.topk``'s."""
    probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probabilities, topk, dim=-1)
    weights /= weights.sum(dim=-1, keepdim=True)
    return weights * scale[ids], ids


def _check_stock(result, logits: torch.Tensor, oracle) -> None:
    """``stock_routing`` orders tied logits as ``torch.topk`` does: compare the logits it chose (as a
    multiset) and, sorted the same way, its weights."""
    weights, ids = result
    ref_w, ref_ids = oracle
    x = logits.double()
    if not torch.equal(x.gather(-1, ids.long()).sort(-1).values, x.gather(-1, ref_ids).sort(-1).values):
        raise AssertionError("stock: the chosen logits differ from the float64 oracle's")
    if torch.equal(ids.long(), ref_ids):  # weights follow the scale of the chosen ids: compare where ids agree
        torch.testing.assert_close(weights.double(), ref_w, rtol=1e-5, atol=1e-6, msg=lambda m: f"stock: {m}")


def _inputs(tokens: int, num_experts: int, dtype: torch.dtype, device: torch.device):
    """Up to 16 copies of random logits for the timed calls to cycle through: more than the L2 cache on a
    GPU, and on a CPU no one input whose topk partition the branch predictor learns (2.5x faster at 64
    rows than over rotating inputs, which no real call enjoys)."""
    copies = max(1, min(16, _ROTATE_BYTES // max(1, tokens * num_experts * dtype.itemsize)))
    return [torch.randn(tokens, num_experts, device=device).mul_(2).to(dtype) for _ in range(copies)]


def time_us(fn: Callable, inputs: list[torch.Tensor], device: torch.device) -> float:
    """Median microseconds of ``fn(x)`` with ``x`` cycling through ``inputs``: graph replay on CUDA,
    device events elsewhere."""
    call = _Rotating(fn, inputs)
    if device.type == "cuda":
        return timing.graph_median_us(call, device, calls=max(20, len(inputs)))
    return timing.median_us(call, device)


class _Rotating:
    """Calls ``fn`` on the next input copy each time (defeats the L2 cache between timed calls)."""

    def __init__(self, fn: Callable, inputs: list[torch.Tensor]):
        self.fn, self.inputs, self.i = fn, inputs, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.inputs)
        return self.fn(self.inputs[self.i])


def _compiled_reference(mode: str, topk: int, renormalize: bool) -> Callable:
    # dynamic=True: one compilation serves every token count (per-shape compiles of max-autotune take
    # minutes each and would dominate the run).
    fn = torch.compile(reference_route, mode=None if mode == "default" else mode, dynamic=True)
    return lambda x, scale: fn(x, topk, scale, renormalize)


def _run_meta(device: torch.device, backend: str, num_experts: int, topk: int) -> dict:
    """What a results table's header says: date, command, device, backend, versions, shape."""
    return {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["g4route", *sys.argv[1:]]),
        "device": _device_name(device),
        "backend": backend,
        "torch": torch.__version__,
        "triton": None if kernel.triton is None else kernel.triton.__version__,
        "num_experts": num_experts,
        "topk": topk,
        "python": platform.python_version(),
    }


def run_bench(
    device: torch.device,
    tokens: list[int],
    dtypes: list[torch.dtype],
    num_experts: int,
    topk: int,
    compile_modes: list[str],
    progress: Callable[[str], None],
) -> tuple[list[Row], dict]:
    """Time every (dtype, T) on ``device``; return the rows and the run's metadata."""
    on_gpu = device.type != "cpu"
    backend = registry.select(device, num_experts, topk)
    meta = _run_meta(device, backend.name, num_experts, topk)
    if on_gpu:
        progress("measuring copy bandwidth")
        meta["copy_bandwidth_GBps"] = timing.copy_bandwidth(device) / 1e9
    if device.type == "cuda":
        # What one tiny kernel costs in graph replay: the floor under every small-T time.
        one = torch.zeros(1, device=device)
        meta["tiny_kernel_graph_us"] = time_us(lambda x: x.add_(1), [one], device)
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    compiled = {m: _compiled_reference(m, topk, True) for m in compile_modes}
    scale = (torch.rand(num_experts, device=device) + 0.5).float()
    rows: list[Row] = []
    for dtype in dtypes:
        for t in tokens:
            progress(f"{str(dtype).removeprefix('torch.')} T={t}")
            inputs = _inputs(t, num_experts, dtype, device)
            oracle = reference_route(inputs[0], topk, scale, True, torch.float64)
            impls: dict[str, Callable] = {"eager": lambda x: reference_route(x, topk, scale, True)}
            if on_gpu and backend.uses_kernel:
                out = (torch.empty(t, topk, device=device), torch.empty(t, topk, dtype=torch.int32, device=device))
                impls["g4route"] = lambda x, out=out: route(x, topk, scale, out=out)
            elif not on_gpu:  # route() itself, as a CPU caller (patch_gemma4) makes the call
                impls["g4route"] = lambda x: route(x, topk, scale)
            impls["stock"] = lambda x: stock_routing(x, topk, scale)
            for mode, fn in compiled.items():
                impls[mode] = lambda x, fn=fn: fn(x, scale)
            for name, fn in impls.items():
                if name == "stock":
                    _check_stock(fn(inputs[0]), inputs[0], oracle)
                else:
                    _check(name, fn(inputs[0]), oracle, num_experts)
            if on_gpu:
                times = {name: time_us(fn, inputs, device) for name, fn in impls.items()}
            else:  # host clocks: every column timed in alternation, over rotating inputs
                times = timing.interleaved_host_us({name: _Rotating(fn, inputs) for name, fn in impls.items()})
            floor = None
            if on_gpu:
                nbytes = t * num_experts * dtype.itemsize + t * topk * 8
                floor = nbytes / (meta["copy_bandwidth_GBps"] * 1e9) * 1e6
            rows.append(Row(str(dtype).removeprefix("torch."), t, times.get("g4route"), times["eager"],
                            {m: times[m] for m in compile_modes}, floor, times["stock"]))
            progress("  " + ", ".join(f"{k} {v:.2f} us" for k, v in times.items()))
    if on_gpu and backend.uses_kernel:
        meta["host_overhead"] = host_overhead(device, num_experts, topk)
    return rows, meta


def host_overhead(device: torch.device, num_experts: int, topk: int) -> dict[str, float]:
    """Host microseconds per call at T=1 with no graph: ``route()`` against a bare launch of the kernel
    through Triton (``kernel[grid](...)``, every argument precomputed) and, where the backend launches
    directly, against the kept launcher alone (the floor under route())."""
    backend = registry.select(device, num_experts, topk)
    logits = torch.randn(1, num_experts, device=device)
    scale = torch.rand(num_experts, device=device)
    out = (torch.empty(1, topk, device=device), torch.empty(1, topk, dtype=torch.int32, device=device))
    config = backend.config_for(device, 1, logits.dtype)
    calls = {
        "bare_launch_us": kernel.bare_launcher(logits, topk, scale, True, out[0], out[1], config),
        "route_us": lambda: route(logits, topk, scale, out=out),
    }
    if backend.direct_launch and kernel._direct is not None:
        calls["direct_launch_us"] = kernel.bare_launcher(logits, topk, scale, True, out[0], out[1], config, True)
    # Alternate them in several rounds: a shared host drifts, and a drift must not land on one side.
    runs: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(7):
        for name, fn in calls.items():
            runs[name].append(timing.host_us_per_call(fn, device, calls=1000))
    result = {name: statistics.median(r) for name, r in runs.items()}
    result["ratio"] = result["route_us"] / result["bare_launch_us"]
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "xpu":
        return torch.xpu.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def _fmt(us: float | None) -> str:
    return "-" if us is None else f"{us:,.2f}" if us < 100 else f"{us:,.1f}"


def format_table(rows: list[Row], meta: dict, compile_modes: list[str]) -> str:
    """The results as a Markdown table, then geometric-mean speedups."""
    head = ["dtype", "T", "g4route us", "stock us", "eager us", *[f"compile[{m}] us" for m in compile_modes],
            "floor us", "floor/g4route", "x stock", "x eager", *[f"x compile[{m}]" for m in compile_modes]]
    lines = [f"# {meta['device']} | backend {meta['backend']} | E={meta['num_experts']} K={meta['topk']} | "
             f"torch {meta['torch']} triton {meta['triton']} | {meta['date']}"]
    if "copy_bandwidth_GBps" in meta:
        lines.append(f"# copy bandwidth {meta['copy_bandwidth_GBps']:,.0f} GB/s (read + write)")
    if "tiny_kernel_graph_us" in meta:
        lines.append(f"# a one-element add_ kernel in graph replay: {meta['tiny_kernel_graph_us']:.2f} us")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    speedups: dict[str, list[float]] = {}
    for r in rows:
        ratio = {}
        if r.g4route_us:
            ratio = {"stock": r.stock_us / r.g4route_us, "eager": r.eager_us / r.g4route_us,
                     **{m: r.compiled_us[m] / r.g4route_us for m in compile_modes}}
            for k, v in ratio.items():
                speedups.setdefault(k, []).append(v)
        frac = r.floor_fraction
        cells = [r.dtype, f"{r.tokens:,}", _fmt(r.g4route_us), _fmt(r.stock_us), _fmt(r.eager_us),
                 *[_fmt(r.compiled_us[m]) for m in compile_modes], _fmt(r.floor_us),
                 "-" if frac is None else f"{frac:.0%}",
                 *[f"{ratio[k]:.2f}x" if k in ratio else "-" for k in ["stock", "eager", *compile_modes]]]
        lines.append("| " + " | ".join(cells) + " |")
    if speedups:
        lines.append("geometric-mean speedup of g4route: " + ", ".join(
            f"{k} {math.exp(sum(map(math.log, v)) / len(v)):.1f}x" for k, v in speedups.items()))
    if rows and rows[0].floor_us is None:
        lines.append("no GPU: g4route is route() on the torch backend (the PyTorch reference); stock is "
                     "Transformers' routing code; eager is the reference called directly")
    if "host_overhead" in meta:
        h = meta["host_overhead"]
        direct = f", direct launch alone {h['direct_launch_us']:.2f} us" if "direct_launch_us" in h else ""
        lines.append(f"host overhead at T=1 (no graph, median of 7 alternating rounds): "
                     f"route() {h['route_us']:.2f} us, bare Triton launch {h['bare_launch_us']:.2f} us, "
                     f"ratio {h['ratio']:.2f}{direct}")
    return "\n".join(lines)


def write_json(path: str, rows: list[Row], meta: dict) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) | {"floor_fraction": r.floor_fraction} for r in rows]}, f,
                  indent=1)


def write_plot(path: str, rows: list[Row], meta: dict) -> None:
    """Time and fraction of the floor against T (needs the ``plot`` extra: matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'g4route[plot]'") from None
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(12, 4.5))
    for dtype in sorted({r.dtype for r in rows}):
        sel = [r for r in rows if r.dtype == dtype]
        ts = [r.tokens for r in sel]
        ax_t.plot(ts, [r.eager_us for r in sel], "--", label=f"eager {dtype}")
        if sel[0].g4route_us is not None:
            ax_t.plot(ts, [r.g4route_us for r in sel], "o-", label=f"g4route {dtype}")
            ax_f.plot(ts, [r.floor_fraction for r in sel], "o-", label=dtype)
        if sel[0].floor_us is not None:
            ax_t.plot(ts, [r.floor_us for r in sel], ":", label=f"floor {dtype}")
    ax_t.set(xscale="log", yscale="log", xlabel="tokens", ylabel="us", title=meta["device"])
    ax_f.set(xscale="log", xlabel="tokens", ylabel="floor / g4route time", ylim=(0, 1.05),
             title=f"fraction of the bandwidth floor (E={meta['num_experts']}, K={meta['topk']})")
    ax_t.legend(fontsize=7)
    ax_f.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------ bench --backward


@dataclass
class BackwardRow:
    dtype: str
    tokens: int
    forward_us: float  # g4route forward alone, no autograd
    train_us: float  # g4route forward + backward (logits and scale)
    eager_us: float  # autograd of the eager reference
    compiled_us: float | None  # autograd of torch.compile(reference)
    peak_mib: dict[str, float] = field(default_factory=dict)  # peak memory over the inputs, per implementation
    logits_only_us: float | None = None  # g4route forward + backward, the scale frozen (LoRA-style fine-tuning)


def _peak_mib(fn: Callable, device: torch.device) -> float:
    """Peak memory allocated by one ``fn()`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return float("nan")
    timing.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    timing.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _backward_timer(device: torch.device) -> Callable[[Callable], float]:
    """Median microseconds of a call: replays of a CUDA graph holding ten calls on CUDA (forward and
    backward captured together, autograd's backward included, as ``torch.cuda.make_graphed_callables``
    does), so the GPU's time shows rather than the host's; device events elsewhere."""
    if device.type == "cuda":
        return lambda fn: timing.graph_median_us(fn, device, calls=10)
    return lambda fn: timing.median_us(fn, device)


def run_backward_bench(
    device: torch.device,
    tokens: list[int],
    dtypes: list[torch.dtype],
    num_experts: int,
    topk: int,
    compiled: bool,
    progress: Callable[[str], None],
) -> tuple[list[BackwardRow], dict]:
    """Forward + backward (gradients of the logits and the scale, renormalize=True) of route() against
    autograd of the reference, eager and compiled, and against route()'s forward alone, each timed as
    CUDA-graph replays on CUDA (``_backward_timer``), with device events elsewhere."""
    backend = registry.select(device, num_experts, topk)
    meta = _run_meta(device, backend.name, num_experts, topk)
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    compiled_ref = torch.compile(reference_route, dynamic=True) if compiled else None
    scale = (torch.rand(num_experts, device=device) + 0.5).requires_grad_(True)
    rows: list[BackwardRow] = []
    for dtype in dtypes:
        for t in tokens:
            progress(f"backward {str(dtype).removeprefix('torch.')} T={t}")
            x = torch.randn(t, num_experts, device=device).mul_(2).to(dtype).requires_grad_(True)
            grad = torch.randn(t, topk, device=device)

            def g4(x=x, grad=grad):
                return torch.autograd.grad(route(x, topk, scale)[0], (x, scale), grad)

            def eager(x=x, grad=grad):
                return torch.autograd.grad(reference_route(x, topk, scale, True)[0], (x, scale), grad)

            def g4_logits(x=x, grad=grad):  # the scale frozen: no scale gradient to reduce
                return torch.autograd.grad(route(x, topk, scale.detach())[0], (x,), grad)

            impls = {"g4route": g4, "eager": eager}
            if compiled_ref is not None:
                impls["compiled"] = lambda x=x, grad=grad: torch.autograd.grad(
                    compiled_ref(x, topk, scale, True)[0], (x, scale), grad)
            expected = eager()
            rtol = 1e-2 if dtype != torch.float32 else 1e-5
            for name, fn in impls.items():
                d_logits, d_scale = fn()
                torch.testing.assert_close(d_logits.float(), expected[0].float(), rtol=rtol, atol=1e-5,
                                           msg=lambda m, name=name: f"{name}: {m}")
                # The scale's gradient sums T * K / E terms of either sign an expert: float32 sums in another
                # order differ by more than the elementwise tolerance, so compare at the size of the sums.
                torch.testing.assert_close(d_scale, expected[1], rtol=1e-4,
                                           atol=1e-5 * float(expected[1].abs().max()) + 1e-6,
                                           msg=lambda m, name=name: f"{name} (scale): {m}")
            with torch.no_grad():
                forward_us = _backward_timer(device)(lambda x=x: route(x, topk, scale))
            times = {name: _backward_timer(device)(fn) for name, fn in impls.items()}
            torch.testing.assert_close(g4_logits()[0].float(), expected[0].float(), rtol=rtol, atol=1e-5,
                                       msg=lambda m: f"g4route, scale frozen: {m}")
            logits_only_us = _backward_timer(device)(g4_logits)
            peaks = {name: _peak_mib(fn, device) for name, fn in impls.items()}
            rows.append(BackwardRow(str(dtype).removeprefix("torch."), t, forward_us, times["g4route"],
                                    times["eager"], times.get("compiled"), peaks, logits_only_us))
            progress("  " + ", ".join(f"{k} {v:.1f} us" for k, v in
                                      {"forward": forward_us, **times, "g4route scale frozen": logits_only_us}.items()))
            del x, grad, expected
    return rows, meta


def format_backward_table(rows: list[BackwardRow], meta: dict) -> str:
    """The forward+backward results as a Markdown table."""
    lines = [f"# {meta['device']} | backend {meta['backend']} | E={meta['num_experts']} K={meta['topk']} | "
             f"torch {meta['torch']} triton {meta['triton']} | {meta['date']}",
             "# forward+backward: gradients of the logits and the scale (renormalize=True); CUDA-graph replay "
             "on CUDA (device events elsewhere); peak: memory allocated above the inputs, no graph"]
    head = ["dtype", "T", "g4route fwd us", "g4route fwd+bwd us", "fwd+bwd / fwd", "eager fwd+bwd us",
            "compiled fwd+bwd us", "x eager", "x compiled", "peak MiB g4route / eager / compiled",
            "scale frozen: fwd+bwd us (/ fwd)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        peaks = " / ".join("-" if math.isnan(r.peak_mib.get(k, math.nan)) else f"{r.peak_mib[k]:,.1f}"
                           for k in ("g4route", "eager", "compiled"))
        cells = [r.dtype, f"{r.tokens:,}", _fmt(r.forward_us), _fmt(r.train_us), f"{r.train_us / r.forward_us:.2f}",
                 _fmt(r.eager_us), _fmt(r.compiled_us), f"{r.eager_us / r.train_us:.1f}x",
                 "-" if r.compiled_us is None else f"{r.compiled_us / r.train_us:.1f}x", peaks,
                 "-" if r.logits_only_us is None else
                 f"{_fmt(r.logits_only_us)} ({r.logits_only_us / r.forward_us:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    if meta["backend"] not in ("cuda", "rocm", "xpu"):
        lines.append("no GPU kernel here: g4route's columns are the reference's gradient in PyTorch ops (backend "
                     f"{meta['backend']}); the targets (fwd+bwd within 2x of fwd, 10x eager at T >= 65,536) need a GPU")
    return "\n".join(lines)
