"""The fused router kernel: Gemma 4's RMSNorm, projection and routing in one Triton launch.

Gemma 4's router computes ``logits = proj(rmsnorm(x) * scale * H**-0.5)`` and routes them. The norm is
one scalar per token, so it commutes with the projection::

    logits[t, e] = rsqrt(mean(x[t]**2) + eps) * H**-0.5 * sum_h (x[t, h] * scale[h]) * W[e, h]

One program owns ``BLOCK_T`` tokens and all ``E`` experts (``E <= MAX_EXPERTS``: the whole logits row is
one tile). It walks the hidden dimension in ``BLOCK_H`` slices, accumulating the squares of ``x`` in
float32 beside a tensor-core product ``x @ V.T`` with float32 accumulation, where ``V = W * scale``
(``router.folded_weight``: formed once per weight, rounded once to its dtype), then scales the product by
the norm and selects the top-K in registers: the logits never go to memory (unless ``return_logits``
asks for them). ``x`` goes to the tensor cores as loaded: forming ``x * scale`` in the loop instead put
the elementwise work between the loads and the product and cost 100 of 240 us at 65,536 tokens on an
H200 (BENCHMARKS.md). Where the vendor table says so (``router_squares_by_dot``: NVIDIA), 16-bit ``x``'s
sums of squares come from the tensor cores too, as the diagonal of ``x @ x.T`` (``SQUARES_BY_DOT``), so
``x`` has no use in registers: squaring it elementwise needs a register copy, which cost 6% at 65,536
tokens on an H100 (see the loop for why that copy is there); on Intel's pvc stand-in the transposed
product spilled.

Few tokens cannot fill the GPU with one program per ``BLOCK_T`` rows: each program would stream the
whole ``[E, H]`` weight through one SM. There the launch splits the hidden dimension over ``SPLIT``
programs per row block, each writing its float32 partial products and sums of squares, and a second,
small launch (``_reduce_kernel``) adds the ``SPLIT`` partials in a fixed order (bitwise reproducible)
and routes. A single launch whose last-arriving program does the sum (a counter per row block) was
tried first: on an H200 its ids differed between launch shapes on up to 3% of rows (the cause was not
isolated before it was replaced; the pipeline race described in the loop below was found later), and
it needs zeroed counters that outlive a launch, awkward under CUDA-graph capture. Two launches cost
about a microsecond more and share no state.

The selection is exact on the float32 logits, with ``route()``'s order keys (``kernel._order_keys``:
NaN first, ``-0.0 == +0.0``) and tie rule (equal logits: lower id first). A float32 key uses every
bit, so the expert id cannot be packed into it as ``route()``'s kernel does for 16-bit logits: each of
the K steps takes the row's largest key, then the lowest id holding it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import kernel, launcher
from .kernel import _order_keys, _store_routing, tl, triton

# Shapes the fused kernel takes; other calls go to the PyTorch reference (router.py).
MAX_EXPERTS = 256  # the [BLOCK_T, E] float32 accumulator stays in registers
MAX_TOPK = 32  # the selection is unrolled K times


class RouterConfig(NamedTuple):
    """One launch shape of the fused router, as the ``router`` rows of ``backends/*.toml`` give it."""

    block_t: int  # tokens per program (at least 16: the tensor cores' smallest M)
    block_h: int  # hidden-dimension slice per loop step, for 16-bit hidden states (float32: half as many)
    split: int  # programs sharing one row block's hidden dimension (1: no split)
    num_warps: int
    num_stages: int = 3


def _router_kernel(
    x_ptr, w_ptr, scale_ptr, weights_ptr, ids_ptr, logits_ptr, part_ptr, squares_ptr,
    T, H, E,
    stride_xt, stride_xh, stride_we, stride_wh,
    stride_wt, stride_wk, stride_it, stride_ik, stride_lt, stride_le,
    eps, root_size,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    STEPS: tl.constexpr,
    EVEN_E: tl.constexpr,
    EVEN_H: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    WRITE_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDEN_DOT: tl.constexpr,
    PRECISE_NORM: tl.constexpr,
    SQUARES_BY_DOT: tl.constexpr,
):
    block = tl.program_id(0)
    part = tl.program_id(1)
    rows32 = block * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows32 < T
    rows = rows32.to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < E
    hh = tl.arange(0, BLOCK_H)

    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    if SQUARES_BY_DOT:
        # x x^T on the tensor cores: its diagonal is each row's sum of squares (16-bit products are exact
        # in float32, the sum float32 as the elementwise one is), and x has no use outside the products.
        squares = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    else:
        # Squares accumulate elementwise and reduce once after the loop: a reduction across lanes every
        # step would sit between the loads and the product.
        squares = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    # This program's share of the hidden dimension: STEPS slices of BLOCK_H from its part's start.
    h_start = part * (STEPS * BLOCK_H)
    for step in range(STEPS):
        h = h_start + step * BLOCK_H + hh
        if EVEN_H:
            x = tl.load(x_ptr + rows[:, None] * stride_xt + h[None, :] * stride_xh, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptr + experts[None, :] * stride_we + h[:, None] * stride_wh, mask=expert_ok[None, :],
                        other=0.0)
        else:
            h_ok = h < H
            x = tl.load(x_ptr + rows[:, None] * stride_xt + h[None, :] * stride_xh,
                        mask=row_ok[:, None] & h_ok[None, :], other=0.0)
            w = tl.load(w_ptr + experts[None, :] * stride_we + h[:, None] * stride_wh,
                        mask=expert_ok[None, :] & h_ok[:, None], other=0.0)
        if WIDEN_DOT:
            # Triton 3.6's interpreter multiplies bfloat16 tiles as their raw uint16 bits: under it, the
            # kernel takes the bfloat16 values as (exact) float32 ones, and NumPy's float32 product is right.
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if SQUARES_BY_DOT:
            squares = tl.dot(x, tl.trans(x), squares, input_precision=DOT_PRECISION)
        else:
            wide = x.to(tl.float32)
            # The product takes x from registers, not from the shared-memory copy the pipeline loaded:
            # with both a register use (the squares) and the product's shared-memory use, Triton 3.6 gave
            # x's copies one pipeline slot fewer than the asynchronous product needs, so the next slice's
            # load overwrote a slice still being multiplied (wrong logits on up to 11% of rows on an H200,
            # varying with the launch shape). The select is that register hop: 161 us at 65,536 tokens
            # against the racy version's 139, and x is still read once (BENCHMARKS.md).
            x = tl.where(row_ok[:, None], x, 0.0)
            squares += wide * wide
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    if SQUARES_BY_DOT:
        tt = tl.arange(0, BLOCK_T)
        squares = tl.sum(tl.where(tt[:, None] == tt[None, :], squares, 0.0), axis=1)
    else:
        squares = tl.sum(squares, axis=1)
    if SPLIT == 1:
        _route_rows(acc, squares, rows, row_ok, experts, scale_ptr, weights_ptr, ids_ptr, logits_ptr, H, E,
                    stride_wt, stride_wk, stride_it, stride_ik, stride_lt, stride_le, eps, root_size,
                    K, BLOCK_T, BLOCK_E, BLOCK_K, EVEN_E, HAS_SCALE, RENORMALIZE, WRITE_LOGITS, PRECISE_NORM)
    else:
        # Partials: products [SPLIT, T_padded, BLOCK_E] and sums of squares [SPLIT, T_padded], float32; only
        # the rows that exist are written (one of sixteen at T = 1). _reduce_kernel adds them and routes.
        padded = tl.num_programs(0) * BLOCK_T
        tl.store(part_ptr + (part * padded + rows[:, None]) * BLOCK_E + experts[None, :], acc, mask=row_ok[:, None])
        tl.store(squares_ptr + part * padded + rows, squares, mask=row_ok)


def _reduce_kernel(
    part_ptr, squares_ptr, scale_ptr, weights_ptr, ids_ptr, logits_ptr,
    T, H, E, padded,
    stride_wt, stride_wk, stride_it, stride_ik, stride_lt, stride_le,
    eps, root_size,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_E: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    WRITE_LOGITS: tl.constexpr,
    PRECISE_NORM: tl.constexpr,
):
    """The second launch of a split router: add the ``SPLIT`` partials of ``BLOCK_T`` rows in a fixed order
    (bitwise reproducible) and route them."""
    rows32 = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows32 < T
    rows = rows32.to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    total = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    squares = tl.zeros([BLOCK_T], dtype=tl.float32)
    for p in tl.static_range(SPLIT):  # unrolled: every partial's load in flight at once
        total += tl.load(part_ptr + (p * padded + rows[:, None]) * BLOCK_E + experts[None, :], mask=row_ok[:, None],
                         other=0.0)
        squares += tl.load(squares_ptr + p * padded + rows, mask=row_ok, other=0.0)
    _route_rows(total, squares, rows, row_ok, experts, scale_ptr, weights_ptr, ids_ptr, logits_ptr, H, E, stride_wt,
                stride_wk, stride_it, stride_ik, stride_lt, stride_le, eps, root_size, K, BLOCK_T, BLOCK_E, BLOCK_K,
                EVEN_E, HAS_SCALE, RENORMALIZE, WRITE_LOGITS, PRECISE_NORM)


def _route_rows(acc, squares, rows, row_ok, experts, scale_ptr, weights_ptr, ids_ptr, logits_ptr, H, E,
                stride_wt, stride_wk, stride_it, stride_ik, stride_lt, stride_le, eps, root_size,
                K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_E: tl.constexpr, HAS_SCALE: tl.constexpr, RENORMALIZE: tl.constexpr,
                WRITE_LOGITS: tl.constexpr, PRECISE_NORM: tl.constexpr):
    """Norm-scale the accumulated products into float32 logits and route them (``route()``'s contract)."""
    if PRECISE_NORM:  # correctly rounded sqrt and division
        inv_rms = tl.div_rn(1.0, tl.sqrt_rn(squares / H + eps)) * root_size
    else:  # the hardware's approximations (a few ulps, inside the bound's 4 g): Intel's precise ones spill
        inv_rms = (1.0 / tl.sqrt(squares / H + eps)) * root_size
    cols = experts[None, :]
    logits = acc * inv_rms[:, None]
    if not EVEN_E:
        logits = tl.where(cols < E, logits, float("-inf"))
    if WRITE_LOGITS:
        tl.store(logits_ptr + rows[:, None] * stride_lt + cols * stride_le, logits,
                 mask=row_ok[:, None] & (cols < E))

    key = _order_keys(logits, cols, E, EVEN_E)
    kk = tl.arange(0, BLOCK_K)[None, :]
    ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    vals = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for k in tl.static_range(K):
        best = tl.max(key, axis=1)
        pick = tl.min(tl.where(key == best[:, None], cols, BLOCK_E), axis=1)  # equal logits: the lower id
        key = tl.where(cols == pick[:, None], -2147483647 - 1, key)
        # The order key back to its float32 (exact: the key is the bits, with -0.0 read as +0.0).
        value = (best ^ ((best >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        ids = tl.where(kk == k, pick[:, None], ids)
        vals = tl.where(kk == k, value[:, None], vals)

    out_ok = row_ok[:, None] & (kk < K)
    row_max = tl.sum(tl.where(kk == 0, vals, 0.0), axis=1)  # a sum of one term keeps NaN, unlike max
    num = tl.where(out_ok, tl.exp(vals - row_max[:, None]), 0.0)
    if RENORMALIZE:
        denom = tl.sum(num, axis=1)
    else:
        denom = tl.sum(tl.exp(logits - row_max[:, None]), axis=1)
    _store_routing(num, denom, row_max, ids, rows, kk, out_ok, scale_ptr, weights_ptr, ids_ptr, stride_wt,
                   stride_wk, stride_it, stride_ik, HAS_SCALE)


if triton is not None:
    from triton.runtime.interpreter import InterpretedFunction

    _route_rows = triton.jit(_route_rows)
    _compiled_kernel = triton.jit(_router_kernel)
    _interpreted_kernel = InterpretedFunction(_router_kernel)
    _compiled_reduce = triton.jit(_reduce_kernel)
    _interpreted_reduce = InterpretedFunction(_reduce_kernel)


def dot_precision(dtype: torch.dtype, float32_dot: str = "tf32x3") -> str:
    """The tensor cores' input precision: the vendor table's ``float32_dot`` for float32 hidden states (NVIDIA:
    TF32x3, each factor split into two TF32 parts and three products, about float32's accuracy; one TF32
    product would drop 13 bits of every factor), the dtype itself otherwise."""
    return float32_dot if dtype == torch.float32 else "ieee"


def constexprs(dtype: torch.dtype, hidden: int, experts: int, topk: int, config: RouterConfig, has_scale: bool,
               renormalize: bool, write_logits: bool, interpret: bool = False, float32_dot: str = "tf32x3",
               precise_norm: bool = True, squares_by_dot: bool = False) -> dict:
    """The kernel's compile-time arguments for one call shape (shared with the ahead-of-time compiles)."""
    # float32 tiles take the same bytes a pipeline stage as 16-bit ones (shared memory bounds the stages).
    block_h = max(16, config.block_h * 2 // dtype.itemsize)
    slices = -(-hidden // block_h)
    split = max(1, min(config.split, slices))
    steps = -(-slices // split)
    split = -(-slices // steps)  # no part left without a slice
    return {
        "K": topk,
        "BLOCK_T": config.block_t,
        "BLOCK_H": block_h,
        "BLOCK_E": max(16, triton.next_power_of_2(experts)),
        "BLOCK_K": triton.next_power_of_2(topk),
        "SPLIT": split,
        "STEPS": steps,
        "EVEN_E": experts == max(16, triton.next_power_of_2(experts)),
        "EVEN_H": hidden == split * steps * block_h,
        "HAS_SCALE": has_scale,
        "RENORMALIZE": renormalize,
        "WRITE_LOGITS": write_logits,
        # The interpreter's dot is NumPy's float32 product whatever the precision asked.
        "DOT_PRECISION": "ieee" if interpret else dot_precision(dtype, float32_dot),
        "WIDEN_DOT": interpret and dtype == torch.bfloat16,
        "PRECISE_NORM": precise_norm,
        # x x^T's accumulator is [BLOCK_T, BLOCK_T], the elementwise one [BLOCK_T, BLOCK_H]: beyond that the
        # product costs registers (128-row tiles spilled on sm_80). float32 x would need TF32x3 products.
        "SQUARES_BY_DOT": squares_by_dot and dtype != torch.float32 and config.block_t <= block_h,
    }


def runtime_args(hidden: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, weights: torch.Tensor,
                 ids: torch.Tensor, logits: torch.Tensor | None, partials: torch.Tensor | None,
                 squares: torch.Tensor | None, eps: float) -> tuple:
    """The kernel's runtime arguments in its parameter order. Pointers the constexprs say are unused are
    never read: ``weights`` stands in for them."""
    T, H = hidden.shape
    E = weight.shape[0]
    logit_strides = (0, 0) if logits is None else logits.stride()
    return (hidden, weight, weights if scale is None else scale, weights, ids, weights if logits is None else logits,
            weights if partials is None else partials, weights if squares is None else squares, T, H, E,
            *hidden.stride(), *weight.stride(), *weights.stride(), *ids.stride(), *logit_strides, float(eps),
            float(H) ** -0.5)


def reduce_shape(tokens: int) -> tuple[int, int]:
    """(rows a program, warps) of the split router's second launch for ``tokens`` rows.

    Few rows, so that all SPLIT partials' loads fit in registers at once (16 rows spilled at SPLIT = 22; a
    loop over them instead cost 1-3 us at T <= 16 on an H200). Up to 256 tokens one row on one warp: the
    selection's reductions stay within the warp, and the second launch took 2.25-2.38 us where 4 rows on
    4 warps took 2.65-2.85 (H100, 1 and 256 tokens). Above, 4 rows on 4 warps as before: at 4,096 tokens
    4.43 us, one row on one warp 4.87 (BENCHMARKS.md)."""
    return (1, 1) if tokens <= 256 else (4, 4)


def reduce_args(partials: torch.Tensor, squares: torch.Tensor, scale: torch.Tensor | None, weights: torch.Tensor,
                ids: torch.Tensor, logits: torch.Tensor | None, hidden_size: int, experts: int, eps: float) -> tuple:
    """The second launch's runtime arguments in its parameter order."""
    T = weights.shape[0]
    logit_strides = (0, 0) if logits is None else logits.stride()
    return (partials, squares, weights if scale is None else scale, weights, ids, weights if logits is None else logits,
            T, hidden_size, experts, partials.shape[1], *weights.stride(), *ids.stride(), *logit_strides,
            float(eps), float(hidden_size) ** -0.5)


def reduce_constexprs(meta: dict, rows: int) -> dict:
    """The second launch's compile-time arguments, from the first's, for ``rows`` rows a program."""
    keep = ("K", "BLOCK_E", "BLOCK_K", "SPLIT", "EVEN_E", "HAS_SCALE", "RENORMALIZE", "WRITE_LOGITS", "PRECISE_NORM")
    return {"BLOCK_T": rows, **{k: meta[k] for k in keep}}


def launch(hidden: torch.Tensor, weight: torch.Tensor, topk: int, scale: torch.Tensor | None, eps: float,
           renormalize: bool, weights: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor | None,
           config: RouterConfig, interpret: bool = False, float32_dot: str = "tf32x3",
           precise_norm: bool = True, squares_by_dot: bool = False) -> None:
    """Run the fused router on ``[T, H]`` hidden states and an ``[E, H]`` weight (the norm's scale folded in:
    ``router.folded_weight``), writing ``[T, K]`` weights
    and ids (and the ``[T, E]`` float32 logits where ``logits`` is given).

    Inputs are assumed validated by ``router.router`` (dtypes, shapes, devices, ``E <= MAX_EXPERTS``,
    ``K <= MAX_TOPK``, ``T < 2**31``)."""
    if triton is None:
        raise RuntimeError(f"the Triton kernel needs the triton package ({kernel.TRITON_IMPORT_ERROR})")
    T, H = hidden.shape
    if T == 0:
        return
    E = weight.shape[0]
    if scale is not None:
        scale = scale.contiguous()  # the kernels read scale[id] at scale_ptr + id
    meta = constexprs(hidden.dtype, H, E, topk, config, scale is not None, renormalize, logits is not None, interpret,
                      float32_dot, precise_norm, squares_by_dot)
    blocks = -(-T // config.block_t)
    partials = squares = None
    if meta["SPLIT"] > 1:
        partials = hidden.new_empty((meta["SPLIT"], blocks * config.block_t, meta["BLOCK_E"]), dtype=torch.float32)
        squares = hidden.new_empty((meta["SPLIT"], blocks * config.block_t), dtype=torch.float32)
    args = runtime_args(hidden, weight, scale, weights, ids, logits, partials, squares, eps)
    grid = (blocks, meta["SPLIT"])
    if meta["SPLIT"] > 1:
        rows, warps = reduce_shape(T)
        second = (reduce_args(partials, squares, scale, weights, ids, logits, H, E, eps),
                  reduce_constexprs(meta, rows), (-(-T // rows),))
    if interpret:
        with kernel.interpreting():
            _interpreted_kernel[grid](*args, num_warps=config.num_warps, num_stages=config.num_stages, **meta)
            if meta["SPLIT"] > 1:
                _interpreted_reduce[second[2]](*second[0], num_warps=warps, **second[1])
        return
    previous = launcher.enter_device(hidden)
    try:
        _compiled_kernel[grid](*args, num_warps=config.num_warps, num_stages=config.num_stages, **meta)
        if meta["SPLIT"] > 1:
            _compiled_reduce[second[2]](*second[0], num_warps=warps, num_stages=1, **second[1])
    finally:
        launcher.leave_device(hidden, previous)
