"""The routing contract in PyTorch: the ``torch`` backend, on any device.

It computes exactly what every backend computes (DESIGN.md section 2), and on a CPU it races the few lines
it replaces (softmax -> ``torch.topk`` -> divide by the sum -> times the scale, as Transformers writes Gemma
4's router), since ``patch_gemma4`` puts it there (``g4route bench`` on a CPU shows both; BENCHMARKS.md,
"CPU"). Below a hundred rows or so each torch op costs a microsecond or two whatever its size, and a
Python call level a few percent of a one-token call, so there the path is counted in ops and levels
(:func:`_route_few`): stock is six ops. ``torch.topk`` promises no order among equal logits and ours is
fixed (descending logit, then lower expert id), so the selection is made exact in one of these ways:

- One row (a decoding step, any dtype; :func:`_route_one`): ``torch.topk`` of ``K + 1`` into buffers kept
  per thread, and the rest in Python on its K + 1 values and ids, read as lists: where the values
  strictly decrease, the K chosen and their order are unique whatever the tie rule; a row that ties is
  put right (equal logits within the K in id order, a tie at the K-th place to the lowest ids holding
  it); the weights come from the exact logits in double precision, rounded once to float32, and both
  outputs are written through ctypes. Three torch ops (``torch.topk`` and the two outputs), where stock
  routing takes six.
- ``torch.topk`` of ``K + 1`` (float32, from two rows to :func:`packed_min_rows`; into buffers kept per
  thread, with their views made once), checked by one compare and one ``torch.equal``. float32 rows that
  tie, hold NaN or a K-th logit of ``-inf`` take the exact paths below. With autograd on, few rows take
  the same check on a plain ``torch.topk`` (fixed in Python), and more rows sort the rows that do not
  strictly decrease.
- Order keys from a table (bfloat16 and float16, from two rows to :func:`packed_min_rows`; their rows tie
  within their K + 1 about one time in three): each bit pattern maps to an int32 order key whose free low
  bits take the inverted expert id, so keys are distinct and one ``torch.topk`` of them is exact on every
  row (int32 keys sort about a tenth faster than floats). The chosen logits come back in float32 from a
  second table, by their patterns.
- Packed order keys (from :func:`packed_min_rows` rows on a CPU, where ``torch.topk`` costs up to about a
  microsecond a row): each logit becomes an int32 key on its bits (complemented: the smallest key is the
  largest logit; ``-0.0 == +0.0``) with the expert id in its low bits, so keys are distinct and one
  minimum along the row yields the winner and the tie rule at once; K minima, each one vectorised op over
  a chunk of rows that stays in cache and that torch splits between its threads. bfloat16 and float16
  logits leave enough low bits free and their keys are exact; float32 keys are truncated, so one more step
  tells whether the K-th place (or an order within the K) rests on truncated bits, and such rows are
  sorted. Rows holding NaN are sorted.

Off the CPU (the reference serves GPU calls past the kernel's limits) one ``torch.topk`` of 64-bit keys
(the order key above the inverted id) is exact on every row: the checks above would make the host wait on
the device, and a CUDA graph could not capture them.
"""

from __future__ import annotations

import array
import ctypes
import functools
import itertools
import math
import operator
import sys
import threading
from collections.abc import Callable

import torch

# From this many rows on a CPU the packed keys select (module docstring): a fixed cost of some fifty
# small ops (~100 us), then a fraction of ``torch.topk``'s time a row. Below, ``torch.topk`` does. Measured
# on the 2-core development host, E = 128, K = 8, float32 and bfloat16, one thread and two: packed keys
# 0.85-0.93x of stock at 128 rows, 1.03-1.16x at 160, 1.21-1.35x at 192 (topk 0.84-0.96x at all three).
# Again on 2026-11-27 (a busier day), the selection alone, float32 / bfloat16: packed keys 178 / 114 us
# against torch.topk's 99 / 101 at 128 rows, 138 / 147 against 129 / 151 at 160, 216 / 174 against
# 241 / 249 at 256: still the crossover. That holds with one intra-op thread (packed_min_rows()).
PACKED_MIN_ROWS = 160
# With more threads torch.topk splits its rows between them in one parallel region per call (stock
# routing's topk too), where each of the packed keys' ops over a chunk is a region of its own that wakes
# them, some twenty a chunk. On the 2-core host with two threads, 2026-11-28, x stock: float32 packed keys
# 0.60-0.87 from 256 to 1,024 rows, topk 0.95-1.02; 1.03 against 1.05 at 2,048; 1.05-1.09 against
# 1.04-1.07 at 4,096. bfloat16 key table against packed keys: 0.97 / 0.90 at 256, 0.86-0.87 / 0.77-0.78 at
# 512, 0.84-0.89 / 0.93 at 768, 0.85 / 0.95-0.96 at 1,024. With one thread: packed keys 1.48x at 1,024
# float32 rows, topk 1.04x.
_PACKED_MIN_ROWS_THREADED = {torch.float32: 4096, torch.bfloat16: 640, torch.float16: 640}
# Up to this many rows autograd's topk path checks and fixes its rows in Python (_ids_by_topk_few).
_FEW_ROWS = 4
# Rows per chunk of the packed-key path: a [rows, E] int32 chunk of 1 MiB at E = 128 stays in L2, and is
# large enough that torch splits each op between its threads.
_CHUNK_ROWS = 2048
# Free low bits of a float32 widened from each dtype: the expert id must fit in them for exact keys.
_FREE_BITS = {torch.bfloat16: 16, torch.float16: 13}
# Dtypes whose values float32 holds exactly: a scale of these needs no rounding to float32 first.
_WIDEN_EXACTLY = (torch.float32, torch.bfloat16, torch.float16)
_INT32_MAX = (1 << 31) - 1
# The CPU paths' buffers and tables are made on the CPU, with their dtype said, whatever
# torch.set_default_device() and set_default_dtype() say: their memory is read and written through ctypes
# and handed to CPU ops.
_CPU = torch.device("cpu")


def _cpu_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=_CPU)


_INT32_MAX_T = torch.tensor(_INT32_MAX, dtype=torch.int32, device=_CPU)
# Rows above which the renormalised weights are exp(x - max) / sum by hand: torch.softmax over a short
# last dim (K = 8) is not vectorised along it and costs about 0.07 us a row (2026-11-27: 13.5 us at 159
# rows against 8.2 for the four plain ops, 7.5 against 7.0 at 64, 5.0 against 6.3 at 16). Below, the one
# op costs less than four, each of which costs about a microsecond at any such size.
_SOFTMAX_MAX_ROWS = 64


def _scatter_index_dtype() -> torch.dtype:
    """int32 where ``scatter_`` takes int32 indices (PyTorch 2.8 and later), int64 before: the winners'
    ids are then masked out of their int32 keys without a cast (``scatter_`` on a CPU still widens the
    index itself, so a step keeps one conversion either way)."""
    try:
        torch.zeros(1, 2, device=_CPU).scatter_(1, torch.ones(1, 1, dtype=torch.int32, device=_CPU), 1.0)
    except RuntimeError:
        return torch.int64
    return torch.int32


_SCATTER_INDEX = _scatter_index_dtype()


def _sorted_ids(x: torch.Tensor, k: int) -> torch.Tensor:
    """The contract's order by a stable descending sort (NaN first, ``-0.0 == +0.0``): the slow, sure way
    on a CPU."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]


def _ids_by_wide_keys(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-K ids off the CPU: 64-bit keys (the float32 order key above, the inverted id below) are
    distinct and carry the tie rule, so one ``torch.topk`` settles every row with no check, no host sync
    and nothing a CUDA graph cannot capture. (A CUDA stable sort was not used: on bfloat16 rows holding
    NaN it did not rank the NaN first, seen on an H200 with PyTorch 2.11.)"""
    num_experts = x.shape[-1]
    values = x.float() + 0.0  # IEEE: -0.0 + 0.0 == +0.0, so the two zeros share a key
    bits = values.view(torch.int32)
    keys = torch.where(values.isnan(), 0x7FFFFFFF, bits ^ ((bits >> 31) & 0x7FFFFFFF))
    inverted_ids = torch.arange(num_experts - 1, -1, -1, device=x.device)
    return torch.topk((keys.long() << 32) | inverted_ids, k, dim=-1).indices


def _resort_rows(x: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """``ids`` with the rows flagged in ``rows`` (a bool mask) replaced by their sorted selection."""
    where = rows.nonzero().squeeze(1)
    ids = ids.clone()
    ids[where] = _sorted_ids(x[where], k)
    return ids


def _first_k(t: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` columns of a contiguous 2-D tensor, as a view: ``as_strided`` costs half of what
    ``t[:, :k]`` does, which matters at one token."""
    return t.as_strided((t.shape[0], k), (t.shape[1], 1))


def _fixed_row(x: torch.Tensor, r: int, row: list[float], line: list[int], k: int) -> list[int] | None:
    """Row ``r``'s K ids in the contract's order from its ``torch.topk`` of ``K + 1`` (``row`` the values
    as floats, ``line`` the ids), whose values do not strictly decrease; ``None`` for a row holding NaN
    (``torch.topk`` puts it first) or whose K-th logit is ``-inf``: those take the exact paths.

    Equal logits within the K go in ascending id order and, where the K-th logit equals the (K+1)-th,
    the lowest ids holding it win, found in the row itself. ``-0.0 == +0.0`` in Python as in the contract.
    """
    last = row[k - 1]
    if row[0] != row[0] or last == -math.inf:
        return None
    if last != row[k]:
        return _runs_in_id_order(row, line[:k])
    held = row.index(last)  # the places before hold larger logits
    above = _runs_in_id_order(row, line[:held])
    values, start = x[r].tolist(), 0
    for _ in range(k - held):  # the K-th place is tied beyond the K + 1: the lowest ids holding it
        start = values.index(last, start) + 1
        above.append(start - 1)
    return above


def _runs_in_id_order(row: list[float], ids: list[int]) -> list[int]:
    """``ids`` (the first ids of a descending ``row``, in place), each run of equal logits among them in
    ascending id order: at two or three times the speed of sorting (logit, id) pairs."""
    n, j = len(ids), 0
    while j < n - 1:
        if row[j] == row[j + 1]:
            end = j + 1
            while end < n - 1 and row[end] == row[end + 1]:
                end += 1
            ids[j:end + 1] = sorted(ids[j:end + 1])
            j = end + 1
        else:
            j += 1
    return ids


def _ids_tensor(lines: list[list[int]], k: int) -> torch.Tensor:
    """int64 ``[len(lines), k]`` from the first ``k`` of each list: through a buffer, as torch.tensor(list)
    costs 3 us at one token, four times this."""
    data = array.array("q", itertools.chain.from_iterable(line[:k] for line in lines))
    return torch.frombuffer(data, dtype=torch.int64).view(len(lines), k)


def _ids_by_topk_few(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids, chosen logits or None) of a few CPU rows through ``torch.topk`` of ``K + 1``, checked and
    fixed in Python (:func:`_fixed_row`): a few list compares cost less than the tensor ops that would
    check them. The path of autograd calls (:func:`_route_few` serves the others)."""
    vals, ids = torch.topk(x, k + 1)
    fixed = None
    rows = vals.tolist()
    for r, row in enumerate(rows):
        if all(map(operator.gt, row, row[1:])):  # operator.gt: half the cost of float.__gt__
            continue
        if fixed is None:
            fixed = ids.tolist()
        fixed[r] = _fixed_row(x, r, row, fixed[r], k)
        if fixed[r] is None:
            if low_bits_free(x.dtype, x.shape[1]):
                return _ids_by_key_table(x, k), None
            unsettled = torch.tensor([not all(map(operator.gt, line, line[1:])) for line in rows], device=_CPU)
            return _resort_rows(x, _first_k(ids, k), unsettled, k), None
    # The first K columns, as views. In place where autograd allows it: a new view object costs about
    # as much again, and at one token every half microsecond shows.
    shape, strides = (len(rows), k), (k + 1, 1)
    if vals.requires_grad:  # topk's backward reads its outputs as they were
        vals, ids = vals.as_strided(shape, strides), ids.as_strided(shape, strides)
    else:
        vals, ids = vals.as_strided_(shape, strides), ids.as_strided_(shape, strides)
    if fixed is not None:
        ids = _ids_tensor(fixed, k)
        if vals.requires_grad:
            # The values are right (equal logits), but autograd would send their gradients to the columns
            # torch.topk picked, not to the fixed ids: the caller gathers the chosen logits at the ids.
            return ids, None
    return ids, vals


_SMALL = threading.local()


def _new_buffers(key: tuple, make: Callable[..., tuple[torch.Tensor, ...]], *args) -> tuple[torch.Tensor, ...]:
    """This thread's buffers for ``key`` (a shape), made now by ``make(*args)``; the caller looks up
    ``_SMALL.cache[key]`` itself first (a call level costs a few percent of a one-token call). Kept per
    shape, a few dozen at most: fresh outputs and views cost about a microsecond a call at one token, and
    fresh buffers of a few hundred rows come from ``mmap`` and fault their pages in (80 us of a 450 us
    call at 256 bfloat16 rows). Made as normal tensors even when the first call comes under
    torch.inference_mode(): an inference tensor cannot be written in place outside it, and the next call
    may come from outside."""
    cache = getattr(_SMALL, "cache", None)
    if cache is None or len(cache) >= 64:
        cache = _SMALL.cache = {}
    with torch.inference_mode(False):
        buffers = cache[key] = make(*args)
    return buffers


def _buffer_rows(rows: int) -> int:
    """The rows of the buffers that serve a call of ``rows``: as many below ``PACKED_MIN_ROWS``, else the
    next power of two, whose first rows the call views (torch.topk's paths reach a few thousand rows with
    several threads: packed_min_rows()), so that varying token counts keep at most a few sets a thread."""
    return rows if rows < PACKED_MIN_ROWS else 1 << (rows - 1).bit_length()


def packed_min_rows(dtype: torch.dtype) -> int:
    """The CPU rows from which the packed keys select (module docstring): ``PACKED_MIN_ROWS`` with one
    intra-op thread, more with several (by dtype), where ``torch.topk`` gains from them and the packed keys'
    many small ops do not."""
    if torch.get_num_threads() == 1:
        return PACKED_MIN_ROWS
    return _PACKED_MIN_ROWS_THREADED.get(dtype, PACKED_MIN_ROWS)


def _records(logits: torch.Tensor, scale: torch.Tensor | None) -> bool:
    """Whether autograd records this call. Then the ids must not be a buffer of :func:`_new_buffers`: the
    scale's gradient saves them (``index_select``), and the thread's next call would overwrite them."""
    return torch.is_grad_enabled() and (logits.requires_grad or (scale is not None and scale.requires_grad))


def _route_small(logits: torch.Tensor, topk: int,
                 scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A renormalised call of these 2-D logits where it has few CPU rows, ``K < E <= 4096`` and nothing
    for autograd to record: :func:`_route_one` for one row (a decoding step), :func:`_route_few` for more.
    ``None`` for any other call, or where the path declines it (the caller's general path decides)."""
    T, E = logits.shape
    # packed_min_rows() asks torch for its thread count: not for the calls below its least value.
    if (T > 0 and (T < PACKED_MIN_ROWS or packed_min_rows(logits.dtype) > T) and topk < E <= 4096
            and logits.is_cpu and not _records(logits, scale)):
        return (_route_one if T == 1 else _route_few)(logits, topk, scale)
    return None


def _checked_buffers(rows: int, k: int) -> tuple[torch.Tensor, ...]:
    """For the checked topk of :func:`_route_few` (float32): topk's values and ids ``[rows, K + 1]``, their
    views (the first K values, the last K values, the first K ids), the step check ``[rows, K]``, an
    all-true one to compare it with, and the chosen logits ``[rows, K]`` made contiguous."""
    vals, ids = _cpu_empty((rows, k + 1), torch.float32), _cpu_empty((rows, k + 1), torch.int64)
    shape, strides = (rows, k), (k + 1, 1)
    return (vals, ids, vals.as_strided(shape, strides), vals.as_strided(shape, strides, 1),
            ids.as_strided(shape, strides), _cpu_empty(shape, torch.bool), _cpu_empty(shape, torch.bool).fill_(True),
            _cpu_empty(shape, torch.float32))


def _keyed_buffers(rows: int, k: int, num_experts: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """For :func:`_keyed_topk`: table indices and keys ``[rows, E]`` (int32), topk's keys and ids, the chosen
    patterns and logits ``[rows, K]``; with the views that the ops take, made once (a view costs about
    half a microsecond a call), and the tables (a cached call costs a few percent of a call).

    The indices are zeros whose low 16 bits of each int32 are also seen as a ``[rows, E]`` tensor of
    ``dtype`` (even 16-bit halves on a little-endian host, odd ones on a big-endian one): a copy of the
    logits into that view leaves each logit's bit pattern, read unsigned, in its int32, in one op and with
    no view of the caller's tensor."""
    index, keys = _cpu_empty((rows, num_experts), torch.int32).zero_(), _cpu_empty((rows, num_experts), torch.int32)
    low_halves = index.view(dtype).as_strided((rows, num_experts), (2 * num_experts, 2), _LOW_HALF)
    patterns, chosen = _cpu_empty((rows, k), torch.int32), _cpu_empty((rows, k), torch.float32)
    return (low_halves, index, index.view(-1), keys, keys.view(-1), _cpu_empty((rows, k), torch.int32),
            _cpu_empty((rows, k), torch.int64), patterns, patterns.view(-1), chosen, chosen.view(-1),
            chosen.select(1, 0), _key_table(dtype), _inverted_ids(num_experts), _value_table(dtype))


# Which 16-bit half of an int32 holds its low bits (see _keyed_buffers).
_LOW_HALF = 0 if sys.byteorder == "little" else 1


def _keyed_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen logits in float32, ids) ``[T, K]`` of 16-bit CPU rows, and the first column of the chosen
    (each row's maximum) ``[T]``: this thread's buffers, valid until its next call of this shape (past
    159 rows, of any shape in the same power-of-two bucket: :func:`_buffer_rows`).

    Each logit's order key (:func:`_key_table`) takes the inverted expert id in its free low bits: keys are
    distinct, the larger key the larger logit, the lower id first among equal logits, so one ``torch.topk``
    of them is exact on every row, NaN and ±0 included, with no check (and int32 keys sort about a tenth
    faster than floats, whose comparator tests for NaN). The table is read with ``index_select`` and int32
    indices from the unsigned patterns: less than half of ``take``'s cost with int64 ones (9.5 against
    23 us at 64 rows)."""
    T, E = x.shape
    rows = _buffer_rows(T)
    key = (rows, k, E, x.dtype)
    try:
        buffers = _SMALL.cache[key]
    except (AttributeError, KeyError):
        buffers = _new_buffers(key, _keyed_buffers, rows, k, E, x.dtype)
    (low_halves, index, index_flat, keys, keys_flat, vals, ids, patterns, patterns_flat, chosen, chosen_flat,
     maxima, key_table, inverted_ids, value_table) = buffers
    if rows != T:  # the first T rows of larger buffers
        low_halves, index, keys, vals, ids, patterns, chosen, maxima = (
            t[:T] for t in (low_halves, index, keys, vals, ids, patterns, chosen, maxima))
        index_flat, keys_flat, patterns_flat, chosen_flat = (
            index_flat[:T * E], keys_flat[:T * E], patterns_flat[:T * k], chosen_flat[:T * k])
    low_halves.copy_(x)
    torch.index_select(key_table, 0, index_flat, out=keys_flat)
    keys.bitwise_or_(inverted_ids)
    torch.topk(keys, k, out=(vals, ids))
    # The chosen logits in float32 from their bit patterns: fewer ops than gathering 16-bit logits and
    # widening them (softmax's own widening of 16-bit input costs more again).
    torch.gather(index, 1, ids, out=patterns)
    torch.index_select(value_table, 0, patterns_flat, out=chosen_flat)
    return chosen, ids, maxima


def _one_buffers(k: int, dtype: torch.dtype) -> tuple:
    """For :func:`_route_one`: topk's values and ids ``[1, K + 1]``; ctypes arrays over their memory, made
    once, that read them as lists (the values only where float32: ctypes has no 16-bit float); and the
    outputs' templates (``torch.empty_like`` of one costs two thirds of ``torch.empty`` of its shape); and
    the ctypes array types that write K float32 weights and K int32 ids into fresh tensors."""
    vals, ids = _cpu_empty((1, k + 1), dtype), _cpu_empty((1, k + 1), torch.int64)
    values = (ctypes.c_float * (k + 1)).from_address(vals.data_ptr()) if dtype is torch.float32 else None
    return (vals, ids, values, (ctypes.c_int64 * (k + 1)).from_address(ids.data_ptr()),
            _cpu_empty((1, k), torch.float32), _cpu_empty((1, k), torch.int32), ctypes.c_float * k, ctypes.c_int32 * k)


def _route_one(x: torch.Tensor, k: int, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fresh float32 weights and int32 ids ``[1, K]`` of one CPU row (a decoding step), renormalised, with
    nothing for autograd to record (checked by the caller, as for :func:`_route_few`); ``None`` where the
    caller's general path must decide: a row holding NaN or ``+inf``, or whose K-th logit is ``-inf``.

    Stock routing takes about 15 us here, six torch ops, and each torch op costs one or two microseconds
    whatever its size, where a Python float operation costs a few dozen nanoseconds. So the only torch
    ops are ``torch.topk`` of ``K + 1`` (into this thread's buffers) and the two fresh outputs: the K + 1
    values and ids come to Python as lists, a row that does not strictly decrease is put right there
    (:func:`_fixed_row`; a 16-bit row ties about one time in three), the weights are computed from the
    exact logits in double precision and rounded once to float32 (at least as accurate as float32
    arithmetic), and both lists are written into the outputs through ctypes, which costs less than any op
    that makes a tensor of a list. The buffers and the scale (where float32 and contiguous) are read the
    same way.
    """
    key = (k, x.dtype)
    try:
        vals, ids, vals_array, ids_list, like_weights, like_ids, weights_array, ids_array = _SMALL.cache[key]
    except (AttributeError, KeyError):
        (vals, ids, vals_array, ids_list, like_weights, like_ids, weights_array,
         ids_array) = _new_buffers(key, _one_buffers, k, x.dtype)
    torch.topk(x, k + 1, out=(vals, ids))
    row = vals.tolist()[0] if vals_array is None else vals_array[:]
    line = ids_list[:]
    if not all(map(operator.gt, row, row[1:])):  # operator.gt: half the cost of float.__gt__
        line = _fixed_row(x, 0, row, line, k)
        if line is None:
            return None
    top = row[0]
    if top == math.inf:
        return None
    exps = [math.exp(v - top) for v in row[:k]]  # v <= top, both finite: no overflow
    total = sum(exps)
    line = line[:k]
    weights, out_ids = torch.empty_like(like_weights), torch.empty_like(like_ids)
    if scale is None:
        values = [e / total for e in exps]
    else:
        if scale.dtype is torch.float32 and scale.stride(0) == 1:
            factors = (ctypes.c_float * scale.shape[0]).from_address(scale.data_ptr())
        elif scale.dtype in _WIDEN_EXACTLY:  # a 16-bit scale (a bfloat16 model's): its values as they are
            factors = scale.tolist()
        else:
            factors = scale.float().tolist()  # the contract multiplies by the scale rounded to float32
        values = [e / total * f for e, f in zip(exps, [factors[i] for i in line], strict=True)]
    weights_array.from_address(weights.data_ptr())[:] = values
    ids_array.from_address(out_ids.data_ptr())[:] = line
    return weights, out_ids


def _route_few(x: torch.Tensor, k: int, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fresh float32 weights and int32 ids ``[T, K]`` of few CPU rows (``1 < T <`` :func:`packed_min_rows`,
    ``K < E <= 4096``, checked by the caller), renormalised, with nothing for autograd to record. Stock
    routing costs six ops, so this path counts its own and its call levels (module docstring).

    float32: ``torch.topk`` of ``K + 1`` into this thread's buffers, one compare of each value with the
    next and one ``torch.equal`` (a host answer with no ``item()``); where every row strictly decreases,
    the K and their order are unique. bfloat16 and float16 (a row ties within its K + 1 about one time in
    three): exact keys (:func:`_keyed_topk`), whose weights are the contract's for rows holding NaN or
    ``+inf`` too (NaN). ``None`` where the caller's general path must decide: a float32 row that ties
    within its K + 1, holds NaN or is all ``-inf``; a 16-bit row that is all ``-inf`` (weight 0, where
    softmax gives NaN).
    """
    T = x.shape[0]
    if x.dtype is torch.float32:
        rows = _buffer_rows(T)
        key = (rows, k)
        try:
            buffers = _SMALL.cache[key]
        except (AttributeError, KeyError):
            buffers = _new_buffers(key, _checked_buffers, rows, k)
        if rows != T:  # the first T rows of larger buffers
            buffers = tuple(t[:T] for t in buffers)
        vals, ids, head, tail, head_ids, steps, all_true, contiguous = buffers
        torch.topk(x, k + 1, out=(vals, ids))
        # NaN, -0.0 beside +0.0 and a row of -inf compare False.
        if not torch.equal(torch.gt(head, tail, out=steps), all_true):
            return None
        # softmax of the strided head would copy it first, at twice this copy's cost (4 rows).
        chosen, ids = contiguous.copy_(head) if T <= _SOFTMAX_MAX_ROWS else head, head_ids
    else:
        if not low_bits_free(x.dtype, x.shape[1]):
            return None
        chosen, ids, maxima = _keyed_topk(x, k)
        if -math.inf in maxima.tolist():  # a list costs less than a tensor op here
            return None
    w = _descending_softmax(chosen) if T > _SOFTMAX_MAX_ROWS else torch.softmax(chosen, -1)
    if scale is not None:
        # A 16-bit scale multiplies as it is (float32 holds its values exactly): one op fewer.
        w.mul_((scale if scale.dtype in _WIDEN_EXACTLY else scale.float()).take(ids))
    return w, ids.int()


def _ids_by_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids, chosen logits or None when some rows were re-sorted) through ``torch.topk`` of ``K + 1``."""
    vals, ids = torch.topk(x, k + 1)
    # Every step strictly down; a NaN step is not (the maximum is then NaN). One host read of one
    # reduction: at these sizes each op costs about a microsecond whatever it does, so the count matters.
    if torch.diff(vals).amax().item() < 0:
        return _first_k_(ids, vals, k)
    unsettled = ~(vals[:, :k] > vals[:, 1:]).all(-1)
    return _resort_rows(x, _first_k(ids, k), unsettled, k), None


def _first_k_(ids: torch.Tensor, vals: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_first_k` of both fresh ``torch.topk`` outputs, in place where autograd allows it (topk's
    backward reads both outputs as they were): a new view object costs about as much again."""
    shape, strides = (ids.shape[0], k), (ids.shape[1], 1)
    if vals.requires_grad:
        return ids.as_strided(shape, strides), vals.as_strided(shape, strides)
    return ids.as_strided_(shape, strides), vals.as_strided_(shape, strides)


@functools.cache
def _id_bits(num_experts: int) -> tuple[int, torch.Tensor]:
    """The low-bit mask that holds an expert id over ``num_experts`` columns, and the ids ``[E]`` (int32,
    CPU)."""
    return (1 << (num_experts - 1).bit_length()) - 1, torch.arange(num_experts, dtype=torch.int32, device=_CPU)


@functools.cache
def _key_table(dtype: torch.dtype) -> torch.Tensor:
    """Every bit pattern of a 16-bit float ``dtype`` -> its order key (int32), its free low bits zero.

    The key is the float32 value's bits in two's-complement order, so a larger key is a larger logit;
    ``-0.0`` shares ``+0.0``'s and every NaN gets one key above ``+inf``. Indexed by the pattern read as
    an unsigned 16-bit integer.
    """
    values = _patterns(dtype).float()
    bits = (values + 0.0).view(torch.int32)  # IEEE: -0.0 + 0.0 == +0.0
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    keys = torch.where(values.isnan(), 0x7FFFFFFF, keys)
    return keys & ~((1 << _FREE_BITS[dtype]) - 1)


@functools.cache
def _value_table(dtype: torch.dtype) -> torch.Tensor:
    """Every bit pattern of a 16-bit float ``dtype`` -> its value in float32, indexed as :func:`_key_table`."""
    return _patterns(dtype).float()


def _patterns(dtype: torch.dtype) -> torch.Tensor:
    """Every 16-bit pattern as ``dtype``, pattern ``p`` at index ``p`` (int16 wraps the upper half)."""
    return torch.arange(1 << 16, dtype=torch.int32, device=_CPU).to(torch.int16).view(dtype)


def _ids_by_key_table(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-K ids of bfloat16/float16 CPU logits (``E <= 4096``), fresh: :func:`_keyed_topk`'s."""
    return _keyed_topk(x, k)[1].clone()


@functools.cache
def _inverted_ids(num_experts: int) -> torch.Tensor:
    """``low - id`` for every expert (int32 ``[E]``, ``low`` the id bits' mask): larger for lower ids."""
    low, expert_ids = _id_bits(num_experts)
    return low - expert_ids


@functools.cache
def _id_operands(num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The id bits' mask as an int32 tensor, and ``~id`` for every expert (int32 ``[E]``)."""
    low, expert_ids = _id_bits(num_experts)
    return torch.tensor(low, dtype=torch.int32, device=_CPU), ~expert_ids


def _ids_by_packed_keys(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Exact top-K ids of a CPU ``[T, E]`` tile through packed order keys: int64 ids and, contiguous,
    int32 ids ``[T, K]``; and whether some row's maximum is ``-inf``.

    Each logit becomes an int32 key on its bits, complemented (the smallest key is the largest logit),
    with the expert id in its low bits, so keys are distinct and a row's minimum yields the winner with the
    lower id first among equal logits; its low bits give the id. K minima a row along the row (no
    transpose), each knocking its winner out. Every op works on a whole ``[rows, E]`` chunk (three ops a
    step, whatever the row count), so torch splits it between its threads.
    """
    T, E = x.shape
    low, _ = _id_bits(E)
    low_t, inverted_ids = _id_operands(E)
    exact = low_bits_free(x.dtype, E)
    steps = k if exact else k + 1
    rows = min(T, _CHUNK_ROWS)
    keys, sign, where = _scratch(rows, E)
    winners = torch.empty(T, steps, dtype=torch.int32, device=x.device)
    maxima = torch.empty(T, dtype=torch.float32, device=x.device)
    for start in range(0, T, rows):
        n = min(rows, T - start)
        kf, sg, wh = (keys, sign, where) if n == rows else (keys[:n], sign[:n], where[:n])
        kb = kf.view(torch.int32)
        # IEEE: -0.0 + 0.0 == +0.0, so the two zeros share a key; 16-bit logits widen exactly.
        torch.add(x[start:start + n], 0.0, out=kf)
        # A NaN anywhere in a row is settled by the sort (every NaN ties, above +inf): the max tells.
        torch.amax(kf, 1, out=maxima[start:start + n])
        # bits ^ ((bits >> 31) & 0x7FFFFFFF): sign-magnitude to two's complement, in place ...
        torch.bitwise_right_shift(kb, 31, out=sg)
        sg.bitwise_and_(0x7FFFFFFF)
        kb.bitwise_xor_(sg)
        # ... then complemented above the low bits, the id in them: (key | low) ^ ~id.
        kb.bitwise_or_(low)
        kb.bitwise_xor_(inverted_ids)
        columns = winners[start:start + n].split(1, dim=1)
        # Tensor operands, not Python ints: a scalar costs a conversion op a call, a third of a step.
        knocked_out = _INT32_MAX_T.expand(n, 1)
        for step, column in enumerate(columns):
            torch.amin(kb, 1, keepdim=True, out=column)
            if step + 1 < steps:  # knock the winner out; keys are distinct, so exactly it
                torch.bitwise_and(column, low_t, out=wh)
                kb.scatter_(1, wh, knocked_out)
    ids32 = (winners if exact else winners[:, :k]) & low
    unsettled = maxima.isnan()
    if not exact:
        # Winners that agree above the truncated bits may be out of order, or (at the K-th place) the
        # wrong ones: such rows are sorted.
        high = winners | low
        unsettled |= (high[:, 1:] == high[:, :-1]).any(1)
    ids = ids32.long()
    if bool(unsettled.any()):
        ids = _resort_rows(x, ids, unsettled, k)
        ids32 = ids.int()
    return ids, ids32, bool((maxima == -math.inf).any())


_SCRATCH = threading.local()


def _scratch(rows: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This thread's work buffers for a ``[rows, E]`` chunk: float32 keys, int32 signs, scatter indices.

    Kept between calls (one set a thread, grown as needed: 2 MiB at E = 128): fresh buffers of this size
    come from ``mmap`` and fault their pages in on first touch, which cost about a fifth of a 1,024-row
    call on the development host.
    """
    need = rows * num_experts
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None or buffers[0].numel() < need or buffers[2].numel() < rows:
        size, index_size = max(need, _CHUNK_ROWS * 128), max(rows, _CHUNK_ROWS)
        with torch.inference_mode(False):  # see _new_buffers
            buffers = (_cpu_empty((size,), torch.float32), _cpu_empty((size,), torch.int32),
                       _cpu_empty((index_size,), _SCATTER_INDEX))
        _SCRATCH.buffers = buffers
    keys, sign, where = buffers
    return keys[:need].view(rows, num_experts), sign[:need].view(rows, num_experts), where[:rows].view(rows, 1)


def low_bits_free(dtype: torch.dtype, num_experts: int) -> bool:
    """Whether float32 values widened from ``dtype`` have enough zero low bits to hold an expert id."""
    return (num_experts - 1).bit_length() <= _FREE_BITS.get(dtype, 0)


def _select(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`select_experts`, with the int32 ids ``[T, K]`` (contiguous) when the path made them."""
    T, E = logits.shape
    # Tested first and cheaply (is_cpu, not device.type): one token's whole call is ~10 us.
    if 0 < T <= _FEW_ROWS and topk < E <= 4096 and logits.is_cpu:
        return *_ids_by_topk_few(logits, topk), None
    if not logits.is_cpu:
        # The paths below would wait on the device to look at their checks, and could not be captured in
        # a CUDA graph.
        return _ids_by_wide_keys(logits, topk), None, None
    if topk == E or T == 0:
        return _sorted_ids(logits, topk), None, None
    if E > 4096:
        return *_ids_by_topk(logits, topk), None
    if T >= PACKED_MIN_ROWS and packed_min_rows(logits.dtype) <= T:
        ids, ids32, masked = _ids_by_packed_keys(logits.detach(), topk)  # ids only: no graph to record
        # With no row's maximum -inf, the chosen logits spare the caller its masked-row fix (three ops
        # over [T, K], more than this check over [T]).
        return ids, None if masked else logits.gather(1, ids), ids32
    if low_bits_free(logits.dtype, E):
        return _ids_by_key_table(logits, topk), None, None  # 16-bit logits tie often: no check needed
    return *_ids_by_topk(logits, topk), None


def select_experts(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The contract's top-K of a 2-D ``[T, E]`` tensor: int64 ids ``[T, K]`` by descending logit, ties to
    the lower expert id, NaN above ``+inf``, ``-0.0 == +0.0``; with the chosen logits (in the logits'
    dtype) when they came for free and no row's maximum is ``-inf``, else ``None``. The path is chosen by
    cost (module docstring)."""
    ids, chosen, _ = _select(logits, topk)
    return ids, chosen


def reference_route(
    logits: torch.Tensor,
    topk: int,
    scale: torch.Tensor | None,
    renormalize: bool,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route a 2-D ``[T, E]`` logits tensor; return ``compute_dtype`` weights and int64 ids ``[T, K]``.

    Arithmetic is done in ``compute_dtype`` (float32, like the kernel; float64 makes the oracle that
    ``g4route bench`` checks against). Rules:
    - ids: the K largest logits, by descending logit, ties to the lower expert id; NaN ranks above
      ``+inf`` and ``-0.0`` equals ``+0.0`` (:func:`select_experts`).
    - ``renormalize``: softmax over the K chosen logits; otherwise softmax over all E, gathered.
    - a row whose largest logit is ``-inf`` gets weight 0; NaN or ``+inf`` maxima give NaN weights.
    - weights are multiplied by ``scale[ids]`` when a scale is given.
    The weights are differentiable with respect to ``logits`` and ``scale`` (gather, softmax, product).
    """
    w, ids, ids32 = _route(logits, topk, scale, renormalize, compute_dtype)
    return w, ids32.long() if ids is None else ids


def route_torch(
    logits: torch.Tensor,
    topk: int,
    scale: torch.Tensor | None,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``torch`` backend's fresh outputs: :func:`reference_route` in float32, with int32 ids
    (contiguous, as route() returns them)."""
    # Few rows first, with no detour through _route: at one token each call level costs a few percent.
    if renormalize:
        result = _route_small(logits, topk, scale)
        if result is not None:
            return result
    w, ids, ids32 = _route_general(logits, topk, scale, renormalize, torch.float32)
    return w, ids.int() if ids32 is None else ids32


def _route(
    logits: torch.Tensor,
    topk: int,
    scale: torch.Tensor | None,
    renormalize: bool,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Weights, and the int64 ids, the int32 ids or both (``None`` for the one not made): the paths of few
    rows (:func:`_route_small`) make only the int32 ones."""
    if renormalize and compute_dtype is torch.float32:
        result = _route_small(logits, topk, scale)
        if result is not None:
            return result[0], None, result[1]
    return _route_general(logits, topk, scale, renormalize, compute_dtype)


def _route_general(logits: torch.Tensor, topk: int, scale: torch.Tensor | None, renormalize: bool,
                   compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`_route` past the paths of few rows: any call, any device."""
    T = logits.shape[0]
    ids, chosen, ids32 = _select(logits, topk)
    # Chosen logits come back only where no row's maximum is -inf: then the masked-row fix below (three
    # ops a call) has nothing to do.
    settled = chosen is not None
    if chosen is None:
        chosen = logits.gather(-1, ids)
    masked = None if settled or _no_masked_row(chosen) else chosen[:, :1] == float("-inf")
    if masked is not None and (chosen.requires_grad or (not renormalize and logits.requires_grad)):
        # A row of only -inf has the constant weights 0, so its gradient is 0. Its softmax would be NaN,
        # and autograd would carry NaN back through the where() below: such rows take 0.0 in its place.
        chosen = torch.where(masked, 0.0, chosen)
        if not renormalize:
            logits = torch.where(masked, 0.0, logits)
    if renormalize and T > _SOFTMAX_MAX_ROWS:
        w = _descending_softmax(chosen if chosen.dtype == compute_dtype else chosen.to(compute_dtype))
    elif renormalize:
        w = torch.softmax(chosen, -1) if chosen.dtype == compute_dtype else \
            torch.softmax(chosen, -1, dtype=compute_dtype)
    else:
        w = torch.softmax(logits, -1, dtype=compute_dtype).gather(-1, ids)
    if masked is not None:
        # The first chosen logit is the row's maximum; -inf there means every expert is masked, where
        # softmax gives NaN: weight 0 instead.
        w = torch.where(masked, 0.0, w)
    if scale is not None:
        table = scale if scale.dtype == compute_dtype else scale.to(compute_dtype)
        # take's backward (index_put_ with accumulate) is slow on a CPU; index_select's is index_add_:
        # 6.6 against 10.6 ms for a 16,384-token training step (BENCHMARKS.md).
        factor = table.index_select(0, ids.reshape(-1)).view(ids.shape) if table.requires_grad else table.take(ids)
        # In place saves an allocation, but softmax's backward reads its output: not while autograd records.
        w = w * factor if w.requires_grad else w.mul_(factor)
    return w, ids, ids32


def _descending_softmax(chosen: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(chosen, -1)`` of ``[T, K]`` rows that descend (NaN first) in four plain ops, which
    cost less past ``_SOFTMAX_MAX_ROWS`` rows: the first column is each row's maximum, as softmax would
    subtract, so the arithmetic is softmax's, NaN where it gives NaN. In place where autograd allows it."""
    # chosen[:, :1], at a third of its cost
    w = torch.exp(chosen - chosen.as_strided((chosen.shape[0], 1), (chosen.stride(0), 1)))
    total = w.sum(-1, keepdim=True)
    return w / total if w.requires_grad else w.div_(total)


def _no_masked_row(chosen: torch.Tensor) -> bool:
    """Whether no row's first chosen logit (its maximum) is ``-inf``, where looking costs less than the
    fix (on a CPU: a few Python compares for few rows, one compare and ``any`` over ``[T]`` beyond);
    ``False`` when unknown (off the CPU: no host sync)."""
    if not chosen.is_cpu:
        return False
    first = chosen.select(1, 0)
    if chosen.shape[0] <= 16:
        return -math.inf not in first.tolist()
    return not bool((first == -math.inf).any())


def route_reference(
    logits: torch.Tensor,
    topk: int,
    scale: torch.Tensor | None,
    renormalize: bool,
    weights: torch.Tensor,
    ids: torch.Tensor,
) -> None:
    """The ``torch`` backend: ``reference_route`` in float32, written into ``weights`` and ``ids``."""
    w, order = reference_route(logits, topk, scale, renormalize)
    weights.copy_(w)
    ids.copy_(order)
