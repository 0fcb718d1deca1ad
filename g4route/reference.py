"""The routing contract in PyTorch: the ``torch`` backend, on any device.

It computes exactly what every backend computes (DESIGN.md section 2), and on a CPU it has to be at
least as fast as the few lines it replaces (softmax -> ``torch.topk`` -> divide by the sum -> times the
scale, as Transformers writes Gemma 4's router), since ``patch_gemma4`` puts it there. ``torch.topk``
promises no order among equal logits and ours is fixed (descending logit, then lower expert id), so the
selection is made exact in one of two ways, each falling back to a stable sort only on rows it cannot
settle:

- ``torch.topk`` of ``K + 1``: where those ``K + 1`` logits strictly decrease, the K chosen and their
  order are unique, whatever the tie rule. Rows with a tie, a NaN, or ``-0.0`` beside ``+0.0`` are sorted.
  This is the path for few float32 rows. bfloat16 and float16 rows tie often; for them a table maps each
  bit pattern to an order key with room for the id, and one ``torch.topk`` of those keys is exact.
- Packed order keys (many rows on a CPU, where ``torch.topk`` costs about a microsecond a row): each
  logit becomes an integer key on its bits (larger key == larger logit, ``-0.0 == +0.0``) with the
  inverted expert id in its low bits, so keys are distinct and one maximum yields the winner and the tie
  rule at once. Rows are transposed to ``[E, rows]`` so each of the K maxima is one vectorised pass
  across rows, in chunks that stay in cache. bfloat16 and float16 logits leave enough low bits free and
  their keys are exact; float32 keys are truncated, so one more step tells whether the K-th place (or an
  order within the K) rests on truncated bits, and such rows are sorted. Rows holding NaN are sorted.

Off the CPU (the reference serves GPU calls past the kernel's limits) one ``torch.topk`` of 64-bit keys
(the order key above the inverted id) is exact on every row: the checks above would make the host wait on
the device, and a CUDA graph could not capture them.
"""

from __future__ import annotations

import functools
import itertools

import torch

# Up to this many rows, and on every device but the CPU, torch.topk selects (fewer launches); beyond,
# on a CPU, the packed keys do (a fixed cost of some twenty small ops, then about a third of topk's
# time a row). Measured on the 2-core development host, bfloat16 and float32, E = 128, K = 8.
TOPK_MAX_ROWS = 256
# Rows per chunk of the packed-key path: an [E, rows] float32 chunk of 512 KiB at E = 128 stays in L2.
_CHUNK_ROWS = 1024
# Free low bits of a float32 widened from each dtype: the expert id must fit in them for exact keys.
_FREE_BITS = {torch.bfloat16: 16, torch.float16: 13}
_INT32_MIN = -(1 << 31)


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


def _ids_by_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids, chosen logits or None when some rows were re-sorted) through ``torch.topk`` of ``K + 1``."""
    vals, ids = torch.topk(x, k + 1, dim=-1)
    if x.shape[0] <= 4 and x.device.type == "cpu":  # a few Python compares beat tensor ops here
        settled = all(a > b for row in vals.tolist() for a, b in itertools.pairwise(row))
    else:  # every step strictly down; a NaN step is not (the maximum of the steps is then NaN)
        settled = float(torch.diff(vals, dim=-1).amax()) < 0
    if settled:
        return _first_k(ids, k), _first_k(vals, k)
    unsettled = ~(vals[:, :k] > vals[:, 1:]).all(-1)
    return _resort_rows(x, _first_k(ids, k), unsettled, k), None


@functools.cache
def _id_bits(num_experts: int) -> tuple[int, torch.Tensor]:
    """The low-bit mask that holds an expert id over ``num_experts`` columns, and the ids ``[E]`` (int32,
    CPU)."""
    return (1 << (num_experts - 1).bit_length()) - 1, torch.arange(num_experts, dtype=torch.int32)


@functools.cache
def _key_table(dtype: torch.dtype) -> torch.Tensor:
    """Every bit pattern of a 16-bit float ``dtype`` -> its order key, complemented, its free low bits zero.

    The key is the float32 value's bits in two's-complement order (``-0.0`` shares ``+0.0``'s, every NaN
    gets one key above ``+inf``), complemented so that the smallest key is the largest logit. Indexed by
    the pattern read as a signed int16 (``take`` wraps negative indices to the table's end).
    """
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = patterns.float()
    keys = _complemented_keys(values + 0.0)
    keys = torch.where(values.isnan(), ~0x7FFFFFFF, keys)
    keys &= ~((1 << _FREE_BITS[dtype]) - 1)
    # Index i of the table is pattern i - 32768: roll it so pattern p (as int16) sits at p mod 65536.
    return keys.roll(-(1 << 15))


def _complemented_keys(values: torch.Tensor) -> torch.Tensor:
    """``~key`` of float32 values: the bits, sign-magnitude to two's complement, then complemented."""
    bits = values.view(torch.int32)
    return bits ^ ~((bits >> 31) & 0x7FFFFFFF)


def _ids_by_key_table(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-K ids of bfloat16/float16 CPU logits: complemented keys from :func:`_key_table` with the
    id in their free low bits (distinct keys, lower id first among equal logits), the K smallest by one
    ``torch.topk``. Exact on every input, NaN and ±0 included, with no check."""
    _, expert_ids = _id_bits(x.shape[-1])
    keys = _key_table(x.dtype).take(x.view(torch.int16).long())
    keys |= expert_ids
    return torch.topk(keys, k, dim=-1, largest=False).indices


def _ids_by_packed_keys(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-K ids of a CPU ``[T, E]`` tile through packed order keys, K vectorised minima a chunk.

    Keys are complemented (the smallest is the largest logit) with the expert id in their low bits, so a
    minimum yields the winner with the lower id first among equal logits, and the winner's low bits are
    its id.
    """
    T, E = x.shape
    low, expert_ids = _id_bits(E)
    expert_ids = expert_ids.unsqueeze(1)
    exact = low_bits_free(x.dtype, E)
    steps = k if exact else k + 1
    rows = min(T, _CHUNK_ROWS)
    keys = torch.empty(E, rows, dtype=torch.float32)  # reused by every chunk: no page faults per op
    bits = keys.view(torch.int32)
    sign = torch.empty(E, rows, dtype=torch.int32)
    winners = torch.empty(steps, T, dtype=torch.int32)
    unsettled = torch.zeros(T, dtype=torch.bool)
    for start in range(0, T, rows):
        n = min(rows, T - start)
        kf, kb, sg = keys[:, :n], bits[:, :n], sign[:, :n]
        kf.copy_(x[start:start + n].t())
        kf.add_(0.0)  # IEEE: -0.0 + 0.0 == +0.0, so the two zeros share a key
        # A NaN anywhere in a row is settled by the sort (every NaN ties, above +inf): the max tells.
        unsettled[start:start + n] = kf.amax(0).isnan()
        # ~key, in place (as _complemented_keys): bits ^ ~((bits >> 31) & 0x7FFFFFFF).
        torch.bitwise_right_shift(kb, 31, out=sg)
        sg.bitwise_and_(0x7FFFFFFF)
        sg.bitwise_not_()
        kb.bitwise_xor_(sg)
        kb.bitwise_and_(~low)
        kb.bitwise_or_(expert_ids)
        for step in range(steps):
            win = torch.amin(kb, 0, keepdim=True)
            winners[step, start:start + n] = win
            if step + 1 < steps:  # knock the winner out; keys are distinct, so exactly it
                kb.scatter_(0, (win & low).long(), 0x7FFFFFFF)
    ids = (winners[:k] & low).t().long()
    if not exact:
        # Winners that agree above the truncated bits may be out of order, or (at the K-th place) the
        # wrong ones: such rows are sorted.
        high = winners & ~low
        unsettled |= (high[1:] == high[:-1]).any(0)
    if bool(unsettled.any()):
        ids = _resort_rows(x, ids, unsettled, k)
    return ids


def low_bits_free(dtype: torch.dtype, num_experts: int) -> bool:
    """Whether float32 values widened from ``dtype`` have enough zero low bits to hold an expert id."""
    return (num_experts - 1).bit_length() <= _FREE_BITS.get(dtype, 0)


def select_experts(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The contract's top-K of a 2-D ``[T, E]`` tensor: int64 ids ``[T, K]`` by descending logit, ties to
    the lower expert id, NaN above ``+inf``, ``-0.0 == +0.0``; with the chosen logits (in the logits'
    dtype) when they came for free and no row's maximum is ``-inf``, else ``None``. The path is chosen by
    cost (module docstring)."""
    T, E = logits.shape
    if logits.device.type != "cpu":
        # The paths below would wait on the device to look at their checks, and could not be captured in
        # a CUDA graph.
        return _ids_by_wide_keys(logits, topk), None
    if topk == E or T == 0:
        return _sorted_ids(logits, topk), None
    if E > 4096:
        return _ids_by_topk(logits, topk)
    if T > TOPK_MAX_ROWS:
        return _ids_by_packed_keys(logits, topk), None
    if not low_bits_free(logits.dtype, E):
        return _ids_by_topk(logits, topk)  # float32: ties are rare, and checked
    if T <= 2:  # one stable sort is exact and cheapest here
        order = torch.sort(logits, dim=-1, descending=True, stable=True)
        masked_row = float("-inf") in order.values.select(1, 0).tolist()
        return _first_k(order.indices, topk), None if masked_row else _first_k(order.values, topk)
    return _ids_by_key_table(logits, topk), None


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
    ids, chosen = select_experts(logits, topk)
    # Chosen logits come back only where no row's maximum is -inf: then the masked-row fix below (three
    # ops a call) has nothing to do.
    settled = chosen is not None
    if chosen is None:
        chosen = logits.gather(-1, ids)
    if renormalize:
        w = torch.softmax(chosen, dim=-1) if chosen.dtype == compute_dtype else \
            torch.softmax(chosen, dim=-1, dtype=compute_dtype)
    else:
        w = torch.softmax(logits, dim=-1, dtype=compute_dtype).gather(-1, ids)
    if not settled and not _no_masked_row(chosen):
        # The first chosen logit is the row's maximum; -inf there means every expert is masked, where
        # softmax gives NaN: weight 0 instead.
        w = torch.where(chosen[:, :1] == float("-inf"), 0.0, w)
    if scale is not None:
        w = w * (scale if scale.dtype == compute_dtype else scale.to(compute_dtype)).take(ids)
    return w, ids


def _no_masked_row(chosen: torch.Tensor) -> bool:
    """Whether no row's first chosen logit (its maximum) is ``-inf``, when a few Python compares can tell
    (few rows on a CPU); ``False`` when unknown."""
    return chosen.shape[0] <= 16 and chosen.device.type == "cpu" and \
        float("-inf") not in chosen.select(1, 0).tolist()


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
