"""``g4route bench --router``: the fused router against the ways Gemma 4's router runs today.

Columns, each checked before it is timed, each timed as CUDA-graph replays on CUDA (device events
elsewhere) with the hidden states and the projection weight cycling through copies larger than the L2
cache (a model's layers each read their own weight):

- ``transformers``: ``Gemma4TextRouter.forward`` as Transformers writes it, eager (:func:`stock_router`).
- ``unfused``: the best pipeline without a fused kernel: ``torch.compile`` of the norm and scaling, one
  cuBLAS projection with float32 logits, then ``route()`` (three launches).
- ``route``: ``route()`` alone on precomputed float32 logits.
- ``router``: ``g4route.router()``, one launch.
- ``floor``: reading the hidden states and the weight once at the measured copy bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import registry, timing
from .api import route
from .bench import _ROTATE_BYTES, _Rotating, _run_meta
from .router import logit_error_bound, router

HIDDEN = 2816  # Gemma 4 26B-A4B's hidden size
EPS = 1e-6


@dataclass
class RouterRow:
    dtype: str
    tokens: int
    transformers_us: float
    unfused_us: float | None
    route_us: float | None
    router_us: float
    floor_us: float | None


def stock_router(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, per_expert_scale: torch.Tensor,
                 topk: int, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma 4's router as Transformers (5.13 and later) writes it: the norm in float32, rounded back to the
    model's dtype, times ``scale`` and ``H**-0.5`` in that dtype, the projection in that dtype, the softmax
    in float32, ``torch.topk``, renormalise, times the per-expert scale."""
    wide = x.float()
    normed = (wide * torch.pow(wide.pow(2).mean(-1, keepdim=True) + eps, -0.5)).type_as(x)
    logits = torch.nn.functional.linear(normed * scale * x.shape[-1] ** -0.5, weight)
    probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probabilities, topk, dim=-1)
    weights /= weights.sum(dim=-1, keepdim=True)
    return weights * per_expert_scale[ids], ids


def _scaled_hidden(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """The unfused pipeline's first launch (compiled): normalised hidden states times the scale and
    ``H**-0.5``, in the model's dtype."""
    wide = x.float()
    return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps) * scale.float()
            * x.shape[-1] ** -0.5).to(x.dtype)


def _projection(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One cuBLAS projection with float32 logits (``torch.mm(..., out_dtype=float32)``; a float32 product
    where this PyTorch lacks ``out_dtype``: ``_projection_kind`` says which ran)."""
    if _OUT_DTYPE:
        return torch.mm(a, weight.T, out_dtype=torch.float32)
    return torch.mm(a.float(), weight.float().T)


def _projection_kind(device: torch.device, dtype: torch.dtype) -> str:
    global _OUT_DTYPE
    a = torch.ones(2, 16, device=device, dtype=dtype)
    try:
        _OUT_DTYPE = dtype != torch.float32 and torch.mm(a, a.T, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        _OUT_DTYPE = False
    return "torch.mm(out_dtype=float32)" if _OUT_DTYPE else "float32 torch.mm"


_OUT_DTYPE = False


def _oracle(x, weight, scale, eps):
    xd = x.double()
    r = torch.rsqrt((xd * xd).mean(-1, keepdim=True) + eps) * x.shape[-1] ** -0.5
    return (xd * scale.double()) @ weight.double().T * r


def check_router(x, weight, scale, pes, topk, result) -> None:
    """Raise unless ``router()``'s ids are the float64 oracle's wherever its K-th place gap exceeds the
    documented bound (see router.py)."""
    _weights, ids = result[:2]
    logits = _oracle(x, weight, scale, EPS)
    bound = logit_error_bound(x, weight, scale, EPS).amax(-1)
    top = logits.topk(topk + 1, dim=-1)
    clear = (top.values[:, topk - 1] - top.values[:, topk]) > 2 * bound
    got = ids.long().sort(-1).values
    want = top.indices[:, :topk].sort(-1).values
    if not torch.equal(got[clear], want[clear]):
        raise AssertionError("router: chosen experts differ from the float64 oracle outside the bound")


def run_router_bench(device: torch.device, tokens: list[int], dtypes: list[torch.dtype], num_experts: int,
                     topk: int, hidden: int, progress: Callable[[str], None]) -> tuple[list[RouterRow], dict]:
    """Time the four ways of routing (and the floor) at each (dtype, T); return the rows and the metadata."""
    on_gpu = device.type != "cpu"
    backend = registry.select(device, num_experts, topk)
    meta = _run_meta(device, backend.name, num_experts, topk)
    meta["hidden"] = hidden
    if on_gpu:
        progress("measuring copy bandwidth")
        meta["copy_bandwidth_GBps"] = timing.copy_bandwidth(device) / 1e9
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    norm = torch.compile(_scaled_hidden, dynamic=True) if on_gpu else _scaled_hidden
    rows: list[RouterRow] = []
    for dtype in dtypes:
        meta[f"projection_{str(dtype).removeprefix('torch.')}"] = _projection_kind(device, dtype)
        scale = (torch.rand(hidden, device=device) + 0.5).to(dtype)
        pes = torch.rand(num_experts, device=device) + 0.5
        for t in tokens:
            progress(f"router {str(dtype).removeprefix('torch.')} T={t}")
            pair_bytes = (t + num_experts) * hidden * dtype.itemsize
            copies = max(1, min(32, _ROTATE_BYTES // pair_bytes)) if on_gpu else 1
            inputs = [(torch.randn(t, hidden, device=device).to(dtype),
                       (torch.randn(num_experts, hidden, device=device) * hidden**-0.5).to(dtype))
                      for _ in range(copies)]
            # The route() column's float32 logits (a GPU column only).
            logits = [_projection(_scaled_hidden(x, scale, EPS), w) for x, w in inputs] if on_gpu else []
            out = (torch.empty(t, topk, device=device), torch.empty(t, topk, dtype=torch.int32, device=device))
            # Each copy stands for a layer: its weight is folded with the scale once, as a model's first call
            # does (router.folded_weight), not inside the timed graphs.
            for x, w in inputs:
                router(x, w, topk, scale=scale, per_expert_scale=pes, out=out)
            x0, w0 = inputs[0]
            check_router(x0, w0, scale, pes, topk, router(x0, w0, topk, scale=scale, per_expert_scale=pes))
            bound = {"scale": scale, "pes": pes, "out": out}  # bound now: the lambdas outlive this iteration
            impls: dict[str, tuple[Callable, list]] = {
                "transformers": (lambda p, b=bound: stock_router(p[0], p[1], b["scale"], b["pes"], topk), inputs),
                "router": (lambda p, b=bound: router(p[0], p[1], topk, scale=b["scale"], per_expert_scale=b["pes"],
                                                     out=b["out"]), inputs),
            }
            if on_gpu:
                impls["unfused"] = (lambda p, b=bound: route(_projection(norm(p[0], b["scale"], EPS), p[1]), topk,
                                                             b["pes"], out=b["out"]), inputs)
                impls["route"] = (lambda lg, b=bound: route(lg, topk, b["pes"], out=b["out"]), logits)
            times = {}
            for name, (fn, args) in impls.items():
                call = _Rotating(fn, args)
                times[name] = (timing.graph_median_us(call, device, calls=max(20, len(args)))
                               if device.type == "cuda" else timing.median_us(call, device))
            floor = None
            if on_gpu:
                floor = (t + num_experts) * hidden * dtype.itemsize / (meta["copy_bandwidth_GBps"] * 1e9) * 1e6
            rows.append(RouterRow(str(dtype).removeprefix("torch."), t, times["transformers"], times.get("unfused"),
                                  times.get("route"), times["router"], floor))
            progress("  " + ", ".join(f"{k} {v:.2f} us" for k, v in times.items()))
            del inputs, logits
    return rows, meta


def _fmt(us: float | None) -> str:
    return "-" if us is None else f"{us:,.1f}" if us >= 100 else f"{us:.2f}"


def format_router_table(rows: list[RouterRow], meta: dict) -> str:
    """The results as a Markdown table."""
    bandwidth = meta.get("copy_bandwidth_GBps")
    lines = [f"# {meta['device']} | backend {meta['backend']} | H={meta['hidden']} E={meta['num_experts']} "
             f"K={meta['topk']} | torch {meta['torch']} triton {meta['triton']} | {meta['date']}",
             f"# {meta['command']}" + (f" | copy bandwidth {bandwidth / 1e3:.2f} TB/s" if bandwidth else ""),
             ("# CUDA-graph replay, hidden states and weight cycling through copies larger than the L2 cache; "
              "unfused projection: " + ", ".join(f"{k.removeprefix('projection_')} {v}" for k, v in meta.items()
                                                if k.startswith("projection_")))
             if bandwidth else "# no GPU: host clocks; router() is the PyTorch reference here (the kernel needs a GPU)"]
    head = ["dtype", "T", "transformers us", "unfused us", "route() alone us", "router() us", "floor us",
            "router / floor", "unfused / router"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.dtype, f"{r.tokens:,}", _fmt(r.transformers_us), _fmt(r.unfused_us), _fmt(r.route_us),
                 _fmt(r.router_us), _fmt(r.floor_us),
                 "-" if r.floor_us is None else f"{r.router_us / r.floor_us:.2f}",
                 "-" if r.unfused_us is None else f"{r.unfused_us / r.router_us:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
