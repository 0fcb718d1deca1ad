"""The one Triton routing kernel and its launcher.

Every vendor runs this same source; only the launch configuration (rows per program, ``num_warps``,
``num_stages``, lanes per row) differs, and that comes from the tables in ``backends/`` through
``configs.py``.

How the kernel selects experts exactly
--------------------------------------
Each logit becomes a signed 32-bit *order key* computed on its bits (``_order_keys``): larger key ==
larger logit, ``-0.0`` and ``+0.0`` share a key, every NaN maps to one key above ``+inf`` (NaN ranks
first, as in ``torch.topk``), and padding columns (``E`` not a power of two) sit below ``-inf`` so they
are never chosen. The expert id, inverted (``BLOCK_E - 1 - id``), replaces the key's low
``log2(BLOCK_E)`` bits, so one integer reduction per step yields the winner and the tie rule at once
(equal logits: lower id first). ``K`` steps give the top-K in order; each step after the first is an add
and an unsigned min per element on the complemented keys (see ``_top_k``), and the winners stay in
registers until one store at the end.

The tile is ``[rows, chunks, columns]``: Triton spreads only the last axis over lanes (16-byte vectors),
so a row sits on ``lanes_per_row`` lanes with its chunks in each lane's registers. The chunk axis reduces
in registers and only ``log2(lanes_per_row)`` shuffles cross lanes per step; with every lane of a warp on
one row (``lanes_per_row = 0``) a step takes five.

- bfloat16 and float16 logits widen to float32 with 16 and 13 low mantissa bits zero, so the id fits
  in bits that were free: the packed keys are exact (``EXACT32``), and the chosen logits decode from
  them with no second read.
- float32 logits use every bit, so packing truncates them (monotone: a larger truncated key is a larger
  logit). The kernel takes one step past K. Where the K-th and the next winner share a truncated key,
  the K-th place is settled exactly: winners above that key stay, and the rest come from a second
  selection, over the logits sharing it, on keys made of the truncated-away bits and the id. Where
  winners within the K share a truncated key, the K are sorted by exact key. The chosen float32 logits
  are re-read (K per row, from the cached tile). Both fixes run only for tiles that need them.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import NamedTuple

import torch

from . import launcher

try:  # Triton is optional on CPU-only installs; the reference backend needs none of this.
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only on installs without Triton
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Shapes the kernel handles; anything else goes to the reference backend (see registry.supports).
MAX_EXPERTS = 4096
MAX_TOPK = 128
# Upper bound on BLOCK_T * BLOCK_E so a tile stays in registers; rows_per_program is clamped to it.
MAX_TILE_ELEMENTS = 16384


class LaunchConfig(NamedTuple):
    """How one launch is shaped: the tuned knobs that the tables in ``backends/`` hold.

    A named tuple rather than a dataclass: it is part of a cache key on every call, and a tuple hashes
    in C."""

    rows_per_program: int
    num_warps: int
    num_stages: int = 1
    # Lanes (threads) one row's logits are spread over, with 16-byte loads; 0: as many as one load of
    # the whole row gives (E / vector width, capped by the warp).
    lanes_per_row: int = 0

    def clamp(self, block_e: int) -> LaunchConfig:
        """Return this config with ``rows_per_program`` cut so the tile fits ``MAX_TILE_ELEMENTS``."""
        rows = max(1, min(self.rows_per_program, MAX_TILE_ELEMENTS // block_e))
        return LaunchConfig(1 << (rows.bit_length() - 1), self.num_warps, self.num_stages, self.lanes_per_row)

    def chunk(self, block_e: int, itemsize: int) -> int:
        """Columns per chunk of the kernel's tile: ``lanes_per_row`` lanes of 16-byte vectors."""
        if not self.lanes_per_row:
            return block_e
        return min(block_e, self.lanes_per_row * max(1, 16 // itemsize))


def _order_keys(x, cols, E, EVEN_E: tl.constexpr):
    """Signed 32-bit order keys of float32 logits: larger key == larger logit, exactly.

    On the bits, not by float compares (flush-to-zero cannot reorder subnormals). Adding +0.0 turns
    -0.0 into +0.0 (IEEE) so the two tie; sign-magnitude becomes two's complement order (a negative
    float maps to -magnitude - 1); every NaN maps to one key above +inf; padding columns (``cols >= E``)
    to a key below -inf.
    """
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(x != x, 0x7FFFFFFF, key)
    if not EVEN_E:
        key = tl.where(cols < E, key, -2147483647 - 1)
    return key


def _top_k(q, K: tl.constexpr, NSEL: tl.constexpr, BLOCK_K: tl.constexpr, LOW_MASK: tl.constexpr):
    """The ``K`` largest packed keys of each row, in descending order, as ``[rows, BLOCK_K]``.

    ``q`` holds the complemented packed keys (``~key``) of a ``[rows, chunks, columns]`` tile. With ``b``
    the last winner, ``b + q == (b - 1) - key``: as an unsigned number it is smallest for the largest key
    below ``b`` (keys at or above ``b`` wrap to huge values). So a step is an add and an unsigned min per
    element, and the tile is never written back. The chunk axis is reduced first: it lives in each
    thread's registers, so only the last reduction crosses lanes.

    Also returned, per row, for truncated keys: ``tied``, two of the K winners agree above ``LOW_MASK``
    (their order is the ids', not yet the logits'); and ``open_end`` (with ``NSEL = K + 1`` steps), the
    K-th winner and the next agree above ``LOW_MASK``, so the K-th place is not settled by these keys.
    """
    best = ~tl.min(tl.min(q, axis=1), axis=1)
    kk = tl.arange(0, BLOCK_K)[None, :]
    winners = tl.zeros([q.shape[0], BLOCK_K], dtype=q.dtype) + best[:, None]
    tied = best < best  # all False, in the rows' layout
    open_end = tied
    for k in tl.static_range(1, NSEL):
        step = tl.min(tl.min((best[:, None, None] + q).to(tl.uint32, bitcast=True), axis=1), axis=1)
        step = step.to(tl.int32, bitcast=True)
        following = best - 1 - step
        same = (following & ~LOW_MASK) == (best & ~LOW_MASK)
        best = following
        if k < K:
            winners = tl.where(kk == k, best[:, None], winners)
            tied = tied | same
        else:
            open_end = same
    return winners, tied, open_end


def _route_kernel(
    logits_ptr,
    scale_ptr,
    weights_ptr,
    ids_ptr,
    T,
    E,
    stride_lt,
    stride_le,
    stride_wt,
    stride_wk,
    stride_it,
    stride_ik,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr,
    EVEN_E: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    EXACT32: tl.constexpr,
):
    rows32 = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # the launcher keeps T < 2**31
    row_ok = rows32 < T
    # 64-bit offsets: T * E passes 2**31 at a quarter-million tokens and wide E.
    rows = rows32.to(tl.int64)
    # The tile is [rows, chunks, CHUNK]: a load spreads only the CHUNK axis over lanes, so a row sits on
    # CHUNK / (vector width) lanes with its chunks in registers. Fewer lanes a row, fewer shuffles a step.
    NCHUNK: tl.constexpr = BLOCK_E // CHUNK
    cols = (tl.arange(0, NCHUNK) * CHUNK)[None, :, None] + tl.arange(0, CHUNK)[None, None, :]
    src = logits_ptr + rows[:, None, None] * stride_lt + cols * stride_le
    if EVEN_E:
        x = tl.load(src, mask=row_ok[:, None, None], other=float("-inf")).to(tl.float32)
    else:
        x = tl.load(src, mask=row_ok[:, None, None] & (cols < E), other=float("-inf")).to(tl.float32)

    key = _order_keys(x, cols, E, EVEN_E)
    # The packed key puts the inverted id (BLOCK_E - 1 - id) in the low bits, so one max yields the
    # winner and equal logits go to the lower id; the selection works on its complement (see _top_k),
    # whose low bits are the id itself.
    LOW_MASK: tl.constexpr = BLOCK_E - 1
    q = (~key & ~LOW_MASK) | cols

    kk = tl.arange(0, BLOCK_K)[None, :]
    out_ok = row_ok[:, None] & (kk < K)
    if EXACT32:
        # 16-bit logits leave the low bits free: the packed selection is exact, and the chosen logits
        # decode from the keys themselves.
        winners, _, _ = _top_k(q, K, K, BLOCK_K, LOW_MASK)
        ids = LOW_MASK - (winners & LOW_MASK)
        high = winners & ~LOW_MASK
        vals = ((high ^ ((high >> 31) & 0x7FFFFFFF)) & ~LOW_MASK).to(tl.float32, bitcast=True)
    else:
        # float32 uses every bit, so the packed keys are truncated (monotone: a larger truncated key is
        # a larger logit, equal ones can be in either order). One step past K tells whether the K-th
        # place is settled.
        winners, tied, open_end = _top_k(q, K, K + 1, BLOCK_K, LOW_MASK)
        ids = LOW_MASK - (winners & LOW_MASK)
        if tl.max(open_end.to(tl.int32), axis=0) > 0:
            # Not settled in some row: logits that differ only in the truncated bits share the K-th
            # place. The winners above that truncated key stay; the rest of the K come from the group
            # sharing it, selected exactly on new packed keys of the bits truncation dropped and the id.
            # The keys come from a fresh read of the (cached) tile: keeping them live through the
            # selection would cost every tile registers for what few tiles need. This read's mask is
            # deliberately not the first read's: with the same mask (EVEN_E) the compiler merges the two
            # loads, and float32 at T = 262,144 went from 53.6 to 57.6 us on the H100 (BENCHMARKS.md).
            key = _order_keys(tl.load(src, mask=row_ok[:, None, None] & (cols < E), other=float("-inf")),
                              cols, E, EVEN_E)
            high = winners & ~LOW_MASK
            kth = tl.sum(tl.where(kk == K - 1, high, 0), axis=1)
            settled = tl.sum(((high > kth[:, None]) & (kk < K)).to(tl.int32), axis=1)
            group = (key & ~LOW_MASK) == kth[:, None, None]
            low = tl.where(group, (key & LOW_MASK) * BLOCK_E + (LOW_MASK - cols), -2147483647 - 1)
            chosen, _, _ = _top_k(~low, K, K, BLOCK_K, LOW_MASK)
            for j in tl.static_range(K):
                pick = tl.sum(tl.where(kk == j, LOW_MASK - (chosen & LOW_MASK), 0), axis=1)
                ids = tl.where(kk == settled[:, None] + j, pick[:, None], ids)
            tied = tied | open_end
        # The exact chosen logits: K values per row that the tile load has just cached.
        vals = tl.load(logits_ptr + rows[:, None] * stride_lt + ids * stride_le, mask=out_ok, other=0.0)
        vals = vals.to(tl.float32)
        if tl.max(tied.to(tl.int32), axis=0) > 0:
            # Winners with equal truncated keys came out in id order: sort the K by exact key (logit,
            # then lower id) to put them in logit order.
            exact = (_order_keys(vals, kk, K, True).to(tl.int64) << 32) | (LOW_MASK - ids).to(tl.int64)
            exact = tl.sort(tl.where(kk < K, exact, -9223372036854775807 - 1), dim=1, descending=True)
            ids = (LOW_MASK - (exact & LOW_MASK)).to(tl.int32)
            high = (exact >> 32).to(tl.int32)
            vals = (high ^ ((high >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)

    # Column 0 holds the row's largest logit (a sum of one term keeps NaN, unlike max).
    row_max = tl.sum(tl.where(kk == 0, vals, 0.0), axis=1)
    num = tl.where(out_ok, tl.exp(vals - row_max[:, None]), 0.0)
    if RENORMALIZE:
        denom = tl.sum(num, axis=1)
    else:
        denom = tl.sum(tl.sum(tl.exp(x - row_max[:, None, None]), axis=1), axis=1)  # softmax over all E
    _store_routing(num, denom, row_max, ids, rows, kk, out_ok, scale_ptr, weights_ptr, ids_ptr, stride_wt,
                   stride_wk, stride_it, stride_ik, HAS_SCALE)


def _store_routing(num, denom, row_max, ids, rows, kk, out_ok, scale_ptr, weights_ptr, ids_ptr, stride_wt,
                   stride_wk, stride_it, stride_ik, HAS_SCALE: tl.constexpr):
    """The end of every routing kernel (this one, and the fused router's): the weights from the chosen
    logits' ``exp(x - row max)`` and their row sum, the per-expert scale, and one store of weights and ids."""
    weights = num * (1.0 / denom)[:, None]  # one division per row
    # A row whose best logit is -inf has no usable expert: weight 0, never NaN. (NaN and +inf
    # maxima keep their NaN weights, as torch.softmax gives.)
    weights = tl.where(row_max[:, None] == float("-inf"), 0.0, weights)
    if HAS_SCALE:
        weights = weights * tl.load(scale_ptr + ids, mask=out_ok, other=1.0).to(tl.float32)
    tl.store(weights_ptr + rows[:, None] * stride_wt + kk * stride_wk, weights, mask=out_ok)
    tl.store(ids_ptr + rows[:, None] * stride_it + kk * stride_ik, ids, mask=out_ok)


if triton is not None:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    _order_keys = triton.jit(_order_keys)
    _top_k = triton.jit(_top_k)
    _store_routing = triton.jit(_store_routing)
    _compiled_kernel = triton.jit(_route_kernel)
    # The same source, run by Triton's CPU interpreter on CPU tensors (debugging and CPU CI).
    _interpreted_kernel = InterpretedFunction(_route_kernel)
    _direct = launcher.DirectLauncher(_compiled_kernel) if launcher.supported(triton) else None
else:  # pragma: no cover - installs without Triton
    _direct = None


# Triton's interpreter patches triton.language process-wide while a kernel runs (and so does
# _library_helpers_interpreted): two interpreted launches at once, in two threads, would undo each other's
# patches mid-run ("Did you forget to add @triton.jit?"). Interpreted launches take turns.
_INTERPRETER_LOCK = threading.Lock()


@contextlib.contextmanager
def _library_helpers_interpreted():
    """Let ``tl.max``/``tl.sum`` run inside the interpreted kernel.

    Triton decides at import time whether its own ``@jit`` helpers (``tl.max`` is one) are compiled
    or interpreted, from ``TRITON_INTERPRET``. We want both modes in one process, so for the span of
    an interpreted launch a helper call runs the helper's Python source under the interpreter, which
    is what ``TRITON_INTERPRET=1`` would have made of it.
    """
    import numpy  # a dependency of Triton's interpreter
    from triton.runtime.interpreter import _patch_lang

    def call_interpreted(self, *args, **kwargs):
        # What InterpretedFunction.__call__ does, except that the patches it makes to triton.language
        # are undone afterwards: left in place, they break every later compile in this process.
        scope = _patch_lang(self.fn)
        try:
            return InterpretedFunction(self.fn).rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    original = JITFunction.__call__
    JITFunction.__call__ = call_interpreted
    try:
        # NumPy warns on inf - inf and exp(nan); the kernel relies on IEEE results there, as a GPU does.
        with numpy.errstate(all="ignore"):
            yield
    finally:
        JITFunction.__call__ = original


@contextlib.contextmanager
def interpreting():
    """The span of an interpreted launch, of this module's kernel or another's (``backward.py``): the
    launches take turns (``_INTERPRETER_LOCK``) and Triton's own helpers run interpreted inside them."""
    with _INTERPRETER_LOCK, _library_helpers_interpreted():
        yield


def exact_in_32_bits(dtype: torch.dtype, block_e: int) -> bool:
    """Whether the 32-bit packed key is exact for ``dtype`` logits over ``block_e`` columns.

    float32 widened from bfloat16 leaves 16 low mantissa bits zero, from float16 13; the inverted
    expert id needs ``log2(block_e)`` of them. float32 logits have none free.
    """
    free_bits = {torch.bfloat16: 16, torch.float16: 13}.get(dtype, 0)
    return block_e.bit_length() - 1 <= free_bits


@functools.lru_cache(maxsize=4096)
def constexprs(dtype: torch.dtype, num_experts: int, topk: int, config: LaunchConfig, renormalize: bool,
               has_scale: bool) -> dict:
    """The kernel's compile-time arguments for one call shape (also used by ahead-of-time compiles)."""
    block_e = triton.next_power_of_2(num_experts)
    return {
        "K": topk,
        "BLOCK_T": config.clamp(block_e).rows_per_program,
        "BLOCK_E": block_e,
        "BLOCK_K": triton.next_power_of_2(topk),
        "CHUNK": config.chunk(block_e, dtype.itemsize),
        "EVEN_E": num_experts == block_e,
        "HAS_SCALE": has_scale,
        "RENORMALIZE": renormalize,
        "EXACT32": exact_in_32_bits(dtype, block_e),
    }


def _runtime_args(logits: torch.Tensor, scale: torch.Tensor | None, weights: torch.Tensor,
                  ids: torch.Tensor) -> tuple:
    """The kernel's runtime arguments, in its parameter order (the scale pointer is never read when
    HAS_SCALE is False, so the weights stand in for a missing scale). The kernel reads scale[id] at
    ``scale_ptr + id``: a strided scale is passed as a contiguous copy."""
    T, E = logits.shape
    return (logits, weights if scale is None else scale.contiguous(), weights, ids, T, E, *logits.stride(),
            *weights.stride(), *ids.stride())


# Rows per launch: row indices stay in int32 inside the kernel.
MAX_ROWS_PER_LAUNCH = 1 << 30


def launch(
    logits: torch.Tensor,
    topk: int,
    scale: torch.Tensor | None,
    renormalize: bool,
    weights: torch.Tensor,
    ids: torch.Tensor,
    config: LaunchConfig,
    interpret: bool = False,
    direct: bool = False,
) -> None:
    """Run the kernel on a 2-D ``[T, E]`` logits view, writing ``weights`` and ``ids`` ``[T, K]``.

    Inputs are assumed validated by ``api.route`` (shapes, dtypes, devices, ``1 <= K <= E``,
    ``E <= MAX_EXPERTS``, ``K <= MAX_TOPK``). ``interpret=True`` runs Triton's interpreter instead of
    a compiled kernel (CPU tensors). ``direct=True`` (NVIDIA) launches through ``launcher.DirectLauncher``
    where this Triton supports it.
    """
    if triton is None:
        raise RuntimeError(f"the Triton kernel needs the triton package ({TRITON_IMPORT_ERROR})")
    T, E = logits.shape
    meta = constexprs(logits.dtype, E, topk, config, renormalize, scale is not None)
    if interpret:
        with interpreting():
            _launch_in_slices(_interpreted_kernel, logits, scale, weights, ids, meta, config)
        return
    # Launch on the tensors' device and its current stream, whatever device is current (launcher.py).
    previous = launcher.enter_device(logits)
    try:
        if T > MAX_ROWS_PER_LAUNCH:
            _launch_in_slices(_compiled_kernel, logits, scale, weights, ids, meta, config)
        elif T:  # the common case, kept lean: it runs on every call
            grid = -(-T // meta["BLOCK_T"])
            args = _runtime_args(logits, scale, weights, ids)
            if direct and _direct is not None:
                _direct(grid, args, meta, config.num_warps, config.num_stages, logits.get_device())
            else:
                _compiled_kernel[(grid,)](*args, num_warps=config.num_warps, num_stages=config.num_stages, **meta)
    finally:
        launcher.leave_device(logits, previous)


def _launch_in_slices(kernel, logits, scale, weights, ids, meta: dict, config: LaunchConfig) -> None:
    """Launch over slices of at most ``MAX_ROWS_PER_LAUNCH`` rows (row indices stay in int32)."""
    T = logits.shape[0]
    for start in range(0, T, MAX_ROWS_PER_LAUNCH):
        rows = min(T - start, MAX_ROWS_PER_LAUNCH)
        x, w, i = logits, weights, ids
        if rows < T:  # only past 2**30 rows: slicing costs host time on every call
            x, w, i = logits[start:start + rows], weights[start:start + rows], ids[start:start + rows]
        kernel[(-(-rows // meta["BLOCK_T"]),)](*_runtime_args(x, scale, w, i), num_warps=config.num_warps,
                                              num_stages=config.num_stages, **meta)


def bare_launcher(logits: torch.Tensor, topk: int, scale: torch.Tensor | None, renormalize: bool,
                  weights: torch.Tensor, ids: torch.Tensor, config: LaunchConfig, direct: bool = False):
    """A closure doing nothing but launch the kernel on these exact arguments (everything else
    precomputed): ``kernel[grid](...)`` through Triton's dispatch, or with ``direct`` the kept launcher of
    ``launcher.DirectLauncher``. The baselines that ``g4route bench`` compares ``route()``'s host time with."""
    T, E = logits.shape
    meta = constexprs(logits.dtype, E, topk, config, renormalize, scale is not None)
    grid = -(-T // meta["BLOCK_T"])
    args = _runtime_args(logits, scale, weights, ids)
    if direct:
        if _direct is None:
            raise RuntimeError("the direct launcher is off for this Triton")
        device = logits.get_device()
        return lambda: _direct(grid, args, meta, config.num_warps, config.num_stages, device)
    launch_grid = _compiled_kernel[(grid,)]
    return lambda: launch_grid(*args, num_warps=config.num_warps, num_stages=config.num_stages, **meta)
