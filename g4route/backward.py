"""The backward of ``route()``: one Triton kernel (every vendor, and the interpreter), and the reference's
autograd for every other backend.

What the gradient is
--------------------
With ``z`` a row's logits (float32), ``ids`` its K chosen experts, ``s`` the per-expert scale (ones when
none), ``g`` the incoming gradient of the weights ``[K]`` and ``a_k = g_k * s[ids_k]``:

- ``renormalize=True``: ``q = softmax(z[ids])`` and ``w_k = q_k * s[ids_k]``, so
  ``dL/dz[ids_k] = q_k * (a_k - sum_j q_j a_j)`` and the gradient is zero at every other expert.
- ``renormalize=False``: ``p = softmax(z)`` over all E and ``w_k = p[ids_k] * s[ids_k]``, so
  ``dL/dz = p * (A - sum_k p[ids_k] a_k)`` with ``A`` holding ``a_k`` at ``ids_k`` and 0 elsewhere: every
  column has a gradient, and the whole row is read.
- ``dL/ds[e] = sum over (t, k) with ids[t, k] == e of g[t, k] * q[t, k]`` (``p[ids]`` for False).
- A row whose largest logit is ``-inf`` (every expert masked) has the constant weights 0: its gradient is
  0. A row with a NaN (or a ``+inf``) logit has NaN weights and gets NaN gradients, as autograd of
  ``torch.softmax`` would give; it never raises.

What the backward reads
-----------------------
The forward saves its ``[T, K]`` weights and ids and keeps the logits (the input itself, which autograd
holds anyway); no ``[T, E]`` float32 tensor is saved or made.

- ``renormalize=True`` (Gemma 4), the common case: ``q_k = w_k / s[ids_k]`` from the saved weights, so a
  row costs three ``[K]`` reads, a gather from the ``[E]`` scale and the ``[E]`` store, and no read of the
  logits. The division is exact to a couple of float32 ulps wherever ``w_k`` is a normal float and
  ``|s[ids_k]|`` lies in [2**-64, 2**64]. Rows outside that (a scale of 0, inf or NaN; weights of 0 or
  subnormal, as masked and NaN rows have) gather their K chosen logits and take the softmax over them,
  as the forward did: a masked load, so other rows read no logits. The row's largest logit is the chosen
  one in column 0 (the forward orders the ids by descending logit), so NaN rows keep NaN and ``-inf``
  rows are recognised exactly as the forward recognises them. The K results of a row land in their
  columns in one of two ways, chosen by the vendor's table (``backward_scatter``):

  - scattered (NVIDIA): the program stores the tile's zeros, waits at a barrier, then stores each row's
    K values at their columns. Two stores to one address from different threads are ordered only by the
    barrier: PTX's ``bar.sync`` orders a CTA's memory accesses (the AOT compile checks that the barrier
    is there, ``aot._barrier_between_stores``). This is the fast path: the store is bound by bandwidth.
  - a ``[rows, K, E]`` one-hot compare (AMD, Intel, where that ordering of global stores by Triton's
    barrier has not been checked): one store, every column computed.

  The scale's gradient (when asked for) always spreads by a ``[rows, K, E]`` one-hot, summed in a fixed
  order: it is what the kernel spends most of its time on (262,144 tokens on an H100: 95 us with it, 60
  without, float32). Both run on one warp a program.
- ``renormalize=False``, or a ``[K, E]`` one-hot too wide for registers: ``q`` (or ``p``) is recomputed
  from the logits: per row the K chosen logits (a gather), and for ``renormalize=False`` the whole row.

The kernel
----------
A program takes ``SUB_BLOCKS`` tiles of ``BLOCK_T`` rows and writes each ``[BLOCK_T, E]`` gradient tile
in the logits' dtype (zeros outside the chosen K for ``renormalize=True``), with float32 math: once, or
with the scattered store its zeros and then its K values a row.

The scale's gradient is reduced deterministically: each program writes its ``[E]`` partial sum (a fixed
reduction order within the program) to its own row of a ``[programs, E]`` float32 buffer, and
``torch.sum`` adds them up in a fixed order (in groups of ``_PARTIAL_GROUP`` programs where there are
many; no atomics), so repeated runs give bitwise-identical results.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import configs, kernel, launcher
from .kernel import tl, triton

# The launch shape of the path that recomputes from the logits (renormalize=False, and wide K x E): a GPU
# program's tile of about this many logits (one row at E = 128, on one warp), and this many rows per
# program in all (the scale's partial sums: [T / rows, E] float32). Chosen by a sweep on an H200
# (BENCHMARKS.md, "the backward's launch shape"): the kernel waits on its gathers, so many small programs
# keep more of them in flight; 512 logits and 64 rows, the first guess, took 2.2x as long at 262,144 tokens.
_GPU_TILE_ELEMENTS = 128
_GPU_ROWS_PER_PROGRAM = 16
# The path from the forward's weights (renormalize=True): one warp a program, tiles of about
# ``backward_one_hot`` [rows, K, E] one-hot elements (a vendor's table, backends/*.toml: 4,096 on NVIDIA,
# 4 rows at K = 8, E = 128; 1,024 on AMD and Intel, where larger tiles spilled in ahead-of-time compiles),
# this many rows a program. From a sweep on an H100 (BENCHMARKS.md, "the backward from the saved
# weights"): more warps or rows a program cost registers (the one-hot tile is held whole) and went 1.5-10x
# slower. Past _WEIGHTS_MAX_ONE_HOT elements a row (wide K x E) the one-hot tile would not fit in
# registers, and the path from the logits is used instead.
_GPU_WEIGHTS_ROWS_PER_PROGRAM = 32
# The programs' partial sums of the scale's gradient are added in groups of this many programs (the grid
# rounded up to a multiple of it; programs past the last row add zeros) where there are at least four
# groups: torch.sum over the first dim of a [programs, E] buffer keeps few threads busy (13.8 us for
# 8,192 x 128 float32 on an H100), two sums over a [groups, 64, E] view take 7.2 (BENCHMARKS.md).
_PARTIAL_GROUP = 64
_WEIGHTS_MAX_ONE_HOT = 4096


class BackwardConfig(NamedTuple):
    """How one backward launch is shaped: rows per tile, tiles per program, warps."""

    block_rows: int
    sub_blocks: int
    num_warps: int

    @property
    def rows_per_program(self) -> int:
        return self.block_rows * self.sub_blocks


def config_for(tokens: int, num_experts: int, interpret: bool, topk: int = 0,
               one_hot: int = configs.BACKWARD_ONE_HOT) -> BackwardConfig:
    """A simple default, not a tuned table. ``topk`` > 0: the launch of the path from the forward's weights
    (one warp; ``[rows, K, E]`` one-hot tiles of about ``one_hot`` elements;
    ``_GPU_WEIGHTS_ROWS_PER_PROGRAM`` rows a program). Otherwise, for the path from the logits: tiles of
    about ``_GPU_TILE_ELEMENTS`` logits (wider rows: one row), four elements a lane (larger tiles made the
    compiler keep every per-row value of the K steps in registers and spill; ahead-of-time compiles for
    sm_90 show no spill for K <= 8), ``_GPU_ROWS_PER_PROGRAM`` rows a program where there are that many.
    The interpreter runs programs one after another, so it gets one tile as large as
    ``kernel.MAX_TILE_ELEMENTS`` allows."""
    block_e = triton.next_power_of_2(num_experts)
    wanted = triton.next_power_of_2(max(tokens, 1))
    if interpret:
        return BackwardConfig(max(1, min(wanted, kernel.MAX_TILE_ELEMENTS // block_e)), 1, 1)
    if topk:
        block_rows = max(1, min(wanted, one_hot // (block_e * triton.next_power_of_2(topk))))
        return BackwardConfig(block_rows, max(1, min(wanted, _GPU_WEIGHTS_ROWS_PER_PROGRAM) // block_rows), 1)
    block_rows = max(1, min(wanted, _GPU_TILE_ELEMENTS // block_e))
    sub_blocks = max(1, min(wanted, _GPU_ROWS_PER_PROGRAM) // block_rows)
    return BackwardConfig(block_rows, sub_blocks, max(1, min(16, block_rows * block_e // 128)))


def from_weights(topk: int, num_experts: int, renormalize: bool, interpret: bool) -> bool:
    """Whether the kernel takes the path from the forward's weights: ``renormalize=True`` (with False every
    column has a gradient and the whole row is read anyway), and a one-hot ``[K, E]`` a row that fits in
    registers (any size under the interpreter)."""
    one_hot = triton.next_power_of_2(topk) * triton.next_power_of_2(num_experts)
    return renormalize and (interpret or one_hot <= _WEIGHTS_MAX_ONE_HOT)


def _tile_gradients(grad_w_ptr, logits_ptr, ids_ptr, scale_ptr, rows, row_ok, cols, E, stride_gt, stride_gk,
                    stride_lt, stride_le, stride_it, stride_ik, K: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_E: tl.constexpr, HAS_SCALE: tl.constexpr, RENORMALIZE: tl.constexpr,
                    LOGITS_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr):
    """``[BLOCK_T, BLOCK_E]`` tiles of the logits' gradient and of the scale-gradient terms (``g_k q_k`` at
    ``ids_k``) for the rows ``rows``, with ``q`` recomputed from the logits (a gather of the K chosen
    logits a row, or the whole row for ``renormalize=False``)."""
    logits_row = logits_ptr + rows * stride_lt
    ids_row = ids_ptr + rows * stride_it
    grad_row = grad_w_ptr + rows * stride_gt

    # Column 0 holds the row's largest logit (NaN ranks first). Rows past T read as -inf, i.e. as masked
    # rows: their gradient is 0 and they add nothing to the scale's.
    top = tl.load(ids_row, mask=row_ok, other=0)
    row_max = tl.load(logits_row + top * stride_le, mask=row_ok, other=float("-inf")).to(tl.float32)
    masked = row_max == float("-inf")
    shift = tl.where(masked, 0.0, row_max)  # -inf - -inf would be NaN; masked rows' terms are 0 anyway

    d_logits = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    d_scale = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    if RENORMALIZE:
        # q = softmax over the K chosen logits. One pass over the K: each one's exponential (and times a_k,
        # and g_k) lands in its column of a tile, the row sums build up, and the per-k values die at once
        # (two passes would have the compiler keep all K of them live between the passes, and spill).
        denom = tl.zeros([BLOCK_T], dtype=tl.float32)
        dot = tl.zeros([BLOCK_T], dtype=tl.float32)
        # e_k at ids_k; elsewhere -1, which no exponential is (NaN included): it marks the unchosen columns.
        exp_chosen = tl.full([BLOCK_T, BLOCK_E], -1.0, dtype=tl.float32)
        exp_a = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)  # e_k * a_k at ids_k
        for k in tl.static_range(K):
            idk = tl.load(ids_row + k * stride_ik, mask=row_ok, other=0)
            ek = tl.exp(tl.load(logits_row + idk * stride_le, mask=row_ok, other=float("-inf")).to(tl.float32)
                        - shift)
            gk = tl.load(grad_row + k * stride_gk, mask=row_ok, other=0.0)
            ak = gk
            if HAS_SCALE:
                ak = gk * tl.load(scale_ptr + idk, mask=row_ok, other=0.0).to(tl.float32)
            denom += ek
            dot += ek * ak
            hit = cols[None, :] == idk[:, None]  # the ids of a row are distinct: one k per column
            exp_chosen = tl.where(hit, ek[:, None], exp_chosen)
            if LOGITS_GRAD:
                exp_a = tl.where(hit, (ek * ak)[:, None], exp_a)
            if SCALE_GRAD:
                d_scale = tl.where(hit, (ek * gk)[:, None], d_scale)
        inv = tl.where(masked, 0.0, 1.0 / denom)  # masked rows: weights are the constant 0
        # Only the chosen columns: elsewhere 0, even where the row's inv is NaN (a NaN row).
        picked = exp_chosen != -1.0
        if LOGITS_GRAD:
            # q_k (a_k - sum_j q_j a_j) = (e_k a_k - e_k * dot / denom) / denom
            d_logits = tl.where(picked, (exp_a - exp_chosen * (dot * inv)[:, None]) * inv[:, None], 0.0)
        if SCALE_GRAD:
            d_scale = tl.where(picked, d_scale * inv[:, None], 0.0)  # g_k q_k
    else:
        # p = softmax over all E: the whole row is read (the gradient touches every column anyway).
        x = tl.load(logits_row[:, None] + cols[None, :] * stride_le, mask=row_ok[:, None] & (cols[None, :] < E),
                    other=float("-inf")).to(tl.float32)
        e = tl.exp(x - shift[:, None])
        inv = tl.where(masked, 0.0, 1.0 / tl.sum(e, axis=1))
        chosen = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)  # a_k at ids_k, 0 elsewhere
        dot = tl.zeros([BLOCK_T], dtype=tl.float32)
        for k in tl.static_range(K):
            idk = tl.load(ids_row + k * stride_ik, mask=row_ok, other=0)
            pk = tl.exp(tl.load(logits_row + idk * stride_le, mask=row_ok, other=float("-inf")).to(tl.float32)
                        - shift) * inv
            gk = tl.load(grad_row + k * stride_gk, mask=row_ok, other=0.0)
            ak = gk
            if HAS_SCALE:
                ak = gk * tl.load(scale_ptr + idk, mask=row_ok, other=0.0).to(tl.float32)
            dot += pk * ak
            hit = cols[None, :] == idk[:, None]
            if LOGITS_GRAD:
                chosen = tl.where(hit, ak[:, None], chosen)
            if SCALE_GRAD:
                d_scale = tl.where(hit, (gk * pk)[:, None], d_scale)
        if LOGITS_GRAD:
            d_logits = e * inv[:, None] * (chosen - dot[:, None])

    return d_logits, d_scale


def _weights_terms(grad_w_ptr, logits_ptr, weights_ptr, ids_ptr, scale_ptr, rows, row_ok, stride_gt, stride_gk,
                   stride_lt, stride_le, stride_wt, stride_wk, stride_it, stride_ik, K: tl.constexpr,
                   BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr):
    """``renormalize=True`` from the forward's weights, on ``[rows, BLOCK_K]`` tiles: the ids (-1 where
    ``ok`` is false), ``ok``, the logits' gradient at the K chosen and the scale-gradient terms ``g_k q_k``.

    Three coalesced loads and a gather from the ``[E]`` scale. ``q_k = w_k / s_k`` (exact to a couple of
    float32 ulps wherever ``w_k`` is a normal float and ``|s_k|`` lies in [2**-64, 2**64]); a row with a
    weight or scale outside that (a scale of 0, inf or NaN; a weight of 0 or subnormal, which masked and
    NaN rows have) gathers its K chosen logits and takes the softmax over them instead: a masked load, so
    rows that need no logits read none. Without a scale ``q = w`` exactly."""
    kk = tl.arange(0, BLOCK_K)
    ok = row_ok[:, None] & (kk < K)[None, :]
    ids = tl.load(ids_ptr + rows[:, None] * stride_it + kk[None, :] * stride_ik, mask=ok, other=-1)
    g = tl.load(grad_w_ptr + rows[:, None] * stride_gt + kk[None, :] * stride_gk, mask=ok, other=0.0)
    w = tl.load(weights_ptr + rows[:, None] * stride_wt + kk[None, :] * stride_wk, mask=ok, other=0.0)
    q = w
    a = g
    if HAS_SCALE:
        s = tl.load(scale_ptr + ids, mask=ok, other=1.0).to(tl.float32)
        a = g * s
        q = w / s
        safe = (tl.abs(w) >= 1.1754943508222875e-38) & (tl.abs(s) >= 5.421010862427522e-20) & \
            (tl.abs(s) <= 1.8446744073709552e19)
        inexact = tl.max((ok & ~safe).to(tl.int32), axis=1) > 0
        # The softmax over the K chosen logits, for those rows only. Column 0 holds the row's largest
        # logit (NaN first): -inf there is a masked row, whose weights (and gradient) are 0.
        z = tl.load(logits_ptr + rows[:, None] * stride_lt + ids * stride_le, mask=ok & inexact[:, None],
                    other=float("-inf")).to(tl.float32)
        top = tl.sum(tl.where(kk[None, :] == 0, z, 0.0), axis=1)
        masked = top == float("-inf")
        e = tl.exp(z - tl.where(masked, 0.0, top)[:, None])
        exact = tl.where(masked[:, None], 0.0, e / tl.sum(e, axis=1)[:, None])
        q = tl.where(inexact[:, None], exact, q)
    # q_k (a_k - sum_j q_j a_j), at the K chosen; every other column's gradient is 0.
    d = q * (a - tl.sum(q * a, axis=1)[:, None])
    return ids, ok, d, g * q


def _spread(ids, values, cols):
    """``[rows, K]`` values at their ids' columns of ``[rows, E]`` (zero elsewhere): a ``[rows, K, E]``
    one-hot, summed over K in a fixed order."""
    hit = ids[:, :, None] == cols[None, None, :]  # a row's ids are distinct
    return tl.sum(tl.where(hit, values[:, :, None], 0.0), axis=1)


def _route_backward_kernel(
    grad_w_ptr,
    logits_ptr,
    weights_ptr,
    ids_ptr,
    scale_ptr,
    grad_logits_ptr,
    grad_scale_ptr,
    T,
    E,
    stride_gt,
    stride_gk,
    stride_lt,
    stride_le,
    stride_wt,
    stride_wk,
    stride_it,
    stride_ik,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SUB_BLOCKS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    LOGITS_GRAD: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    SAVED_WEIGHTS: tl.constexpr,
    SCATTER: tl.constexpr,
):
    # A program takes SUB_BLOCKS tiles of BLOCK_T rows one after another: small tiles keep the per-row
    # values in few registers, several of them per program keep the scale's partial sums few.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    scale_sum = tl.zeros([BLOCK_E], dtype=tl.float32)
    for sub in range(SUB_BLOCKS):
        rows = (pid.to(tl.int64) * SUB_BLOCKS + sub) * BLOCK_T + tl.arange(0, BLOCK_T)  # 64-bit: T * E > 2**31
        row_ok = rows < T
        out = grad_logits_ptr + rows[:, None] * E + cols[None, :]
        out_ok = row_ok[:, None] & (cols[None, :] < E)
        if SAVED_WEIGHTS:
            ids, ok, d, gq = _weights_terms(grad_w_ptr, logits_ptr, weights_ptr, ids_ptr, scale_ptr, rows, row_ok,
                                            stride_gt, stride_gk, stride_lt, stride_le, stride_wt, stride_wk,
                                            stride_it, stride_ik, K, BLOCK_K, HAS_SCALE)
            if SCALE_GRAD:  # summed over the tile's rows in a fixed order (no atomics)
                scale_sum += tl.sum(_spread(ids, gq, cols), axis=0)
            if LOGITS_GRAD:
                if SCATTER:
                    # Zeros over the rows, then the K values a row at their columns. The barrier orders the
                    # two stores to one address (see the module docstring for where that holds).
                    tl.store(out, tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32), mask=out_ok)
                    tl.debug_barrier()
                    tl.store(grad_logits_ptr + rows[:, None] * E + ids, d, mask=ok)
                else:
                    # The K results a row spread over its E columns by a [rows, K, E] one-hot.
                    tl.store(out, _spread(ids, d, cols), mask=out_ok)
        else:
            d_logits, d_scale = _tile_gradients(grad_w_ptr, logits_ptr, ids_ptr, scale_ptr, rows, row_ok, cols, E,
                                                stride_gt, stride_gk, stride_lt, stride_le, stride_it, stride_ik, K,
                                                BLOCK_T, BLOCK_E, HAS_SCALE, RENORMALIZE, LOGITS_GRAD, SCALE_GRAD)
            if SCALE_GRAD:
                scale_sum += tl.sum(d_scale, axis=0)
            if LOGITS_GRAD:
                # Written once, every column (zeros included), in the logits' dtype (the store converts).
                tl.store(out, d_logits, mask=out_ok)
    if SCALE_GRAD:
        # This program's partial sum, in its own row of the [programs, E] buffer: no atomics.
        tl.store(grad_scale_ptr + pid.to(tl.int64) * E + cols, scale_sum, mask=cols < E)


if triton is not None:
    from triton.runtime.interpreter import InterpretedFunction

    _tile_gradients = triton.jit(_tile_gradients)
    _weights_terms = triton.jit(_weights_terms)
    _spread = triton.jit(_spread)
    _compiled_kernel = triton.jit(_route_backward_kernel)
    _interpreted_kernel = InterpretedFunction(_route_backward_kernel)


def runtime_args(grad_weights: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor | None, ids: torch.Tensor,
                 scale: torch.Tensor | None, grad_logits: torch.Tensor | None,
                 partials: torch.Tensor | None) -> tuple:
    """The backward kernel's runtime arguments, in its parameter order (also what ``aot.py`` compiles
    for). Pointers never read (their constexpr flag is off) stand in as the logits, and the gradient of
    the weights for missing weights. The kernel reads scale[id] at ``scale_ptr + id``: a strided scale is
    passed as a contiguous copy."""
    T, E = logits.shape
    saved = grad_weights if weights is None else weights
    return (grad_weights, logits, saved, ids, logits if scale is None else scale.contiguous(),
            logits if grad_logits is None else grad_logits, logits if partials is None else partials,
            T, E, *grad_weights.stride(), *logits.stride(), *saved.stride(), *ids.stride())


def constexprs(topk: int, num_experts: int, config: BackwardConfig, has_scale: bool, renormalize: bool,
               logits_grad: bool, scale_grad: bool, saved_weights: bool, scatter: bool = False) -> dict:
    """The backward kernel's compile-time arguments for one call shape (also used by ``aot.py``).
    ``saved_weights``: the forward's weights are passed (used for ``renormalize=True`` only)."""
    return {"K": topk, "BLOCK_T": config.block_rows, "SUB_BLOCKS": config.sub_blocks,
            "BLOCK_E": triton.next_power_of_2(num_experts), "BLOCK_K": triton.next_power_of_2(topk),
            "HAS_SCALE": has_scale,
            "RENORMALIZE": renormalize, "LOGITS_GRAD": logits_grad, "SCALE_GRAD": scale_grad,
            "SAVED_WEIGHTS": saved_weights and renormalize, "SCATTER": scatter and saved_weights and renormalize}


def launch(
    grad_weights: torch.Tensor,
    logits: torch.Tensor,
    weights: torch.Tensor | None,
    ids: torch.Tensor,
    scale: torch.Tensor | None,
    renormalize: bool,
    logits_grad: bool,
    scale_grad: bool,
    interpret: bool = False,
    one_hot: int = configs.BACKWARD_ONE_HOT,
    scatter: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of ``route()`` for 2-D ``[T, E]`` logits, ``[T, K]`` ids and weights (the forward's
    outputs, ids ordered by descending logit; ``weights`` may be ``None``: the softmax is then recomputed
    from the logits) and ``[T, K]`` float32 ``grad_weights``: ``(grad_logits, grad_scale)``, each ``None``
    where not asked for. ``grad_logits`` is ``[T, E]``, contiguous, in the logits' dtype; ``grad_scale`` is
    ``[E]`` float32 (the caller casts it to the scale's dtype). One kernel launch, then for the scale
    ``torch.sum`` over the programs' partial sums (two, over groups of them, where there are many).
    ``one_hot``: the vendor's tile size for the path from the weights (``backward_one_hot`` in
    ``backends/*.toml``); ``scatter``: that path stores zeros, then the K values a row after a barrier,
    instead of a one-hot (``backward_scatter``: only where the barrier orders the two stores, module
    docstring)."""
    if triton is None:
        raise RuntimeError(f"the Triton kernel needs the triton package ({kernel.TRITON_IMPORT_ERROR})")
    T, E = logits.shape
    K = ids.shape[1]
    grad_logits = torch.empty(T, E, dtype=logits.dtype, device=logits.device) if logits_grad else None
    if T == 0:
        return grad_logits, torch.zeros(E, dtype=torch.float32, device=logits.device) if scale_grad else None
    saved = weights is not None and from_weights(K, E, renormalize, interpret)
    config = config_for(T, E, interpret, K if saved else 0, one_hot)
    grid = -(-T // config.rows_per_program)
    grouped = scale_grad and grid >= 4 * _PARTIAL_GROUP
    if grouped:
        grid = -(-grid // _PARTIAL_GROUP) * _PARTIAL_GROUP
    partials = torch.empty(grid, E, dtype=torch.float32, device=logits.device) if scale_grad else None
    args = runtime_args(grad_weights, logits, weights if saved else None, ids, scale, grad_logits, partials)
    meta = constexprs(K, E, config, scale is not None, renormalize, logits_grad, scale_grad, saved, scatter)
    if interpret:
        with kernel.interpreting():
            _interpreted_kernel[(grid,)](*args, num_warps=config.num_warps, **meta)
    else:
        previous = launcher.enter_device(logits)  # the tensors' device and its current stream
        try:
            _compiled_kernel[(grid,)](*args, num_warps=config.num_warps, num_stages=1, **meta)
        finally:
            launcher.leave_device(logits, previous)
    if partials is None:
        grad_scale = None
    elif grouped:  # a fixed order either way: bitwise reproducible
        grad_scale = partials.view(-1, _PARTIAL_GROUP, E).sum(dim=1).sum(dim=0)
    else:
        grad_scale = partials.sum(dim=0) if grid > 1 else partials[0]
    return grad_logits, grad_scale


def reference_backward(
    grad_weights: torch.Tensor,
    logits: torch.Tensor,
    weights: torch.Tensor | None,
    ids: torch.Tensor,
    scale: torch.Tensor | None,
    renormalize: bool,
    logits_grad: bool,
    scale_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The same gradients for the ``torch`` backend (any device), in PyTorch ops: the gradient of the
    reference's formula at the ids the forward chose, written out (what autograd of ``reference_route``
    gives, without running the selection again or tracing it: recomputing the forward under
    ``torch.func.vjp`` cost about 400 us a call on a CPU, seven times eager autograd's whole step).

    With ``p`` the weights before the scale and ``g`` the incoming gradient times ``scale[ids]``: where
    ``renormalize``, ``dlogits[ids] = p * (g - sum(p * g))`` and zero elsewhere; otherwise ``dlogits =
    scatter(ids, p * g) - softmax(logits) * sum(p * g)``; ``dscale[e]`` sums ``grad_weights * p`` over the
    places that chose ``e``. A row whose every logit is ``-inf`` has constant weights 0 and gets 0; a NaN
    row gets NaN, as the forward's weights are NaN there. ``weights`` (the forward's) is not read: the
    softmax is recomputed here, at no extra cost on a CPU.
    """
    del weights  # the kernel's shortcut; the reference recomputes (same interface)
    x = logits.float()
    ids = ids.long()
    g = grad_weights.float()
    chosen = x.gather(1, ids)
    all_masked = chosen[:, :1] == float("-inf")
    probabilities = None if renormalize else torch.softmax(x, dim=-1)
    p = torch.softmax(chosen, dim=-1) if renormalize else probabilities.gather(1, ids)
    p = torch.where(all_masked, 0.0, p)
    grad_logits = grad_scale = None
    if logits_grad:
        gs = g if scale is None else g * scale.float()[ids]
        dot = (p * gs).sum(-1, keepdim=True)
        if renormalize:
            grad_logits = torch.zeros_like(x).scatter_(1, ids, p * (gs - dot))
        else:
            grad_logits = torch.zeros_like(x).scatter_(1, ids, p * gs) - probabilities * dot
            grad_logits = torch.where(all_masked, 0.0, grad_logits)
        grad_logits = grad_logits.to(logits.dtype)
    if scale_grad:
        grad_scale = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
        grad_scale.index_add_(0, ids.flatten(), (g * p).flatten())
    return grad_logits, grad_scale
