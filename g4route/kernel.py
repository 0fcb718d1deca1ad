"""The one Triton routing kernel and its launcher.

Every vendor runs this same source; only the launch configuration (rows per program, ``num_warps``,
``num_stages``) differs, and that comes from the tables in ``backends/`` through ``configs.py``.

How the kernel selects experts exactly
--------------------------------------
Each logit is turned into a signed integer *order key*: larger key == larger logit, ``-0.0`` and
``+0.0`` share a key, every NaN maps to the largest key (NaN ranks above ``+inf``, as in
``torch.topk``) and padding columns (``E`` not a power of two) map below ``-inf`` so they are never
chosen. The expert id, inverted (``BLOCK_E - 1 - id``), is packed into the low bits of the key, so a
single integer ``max`` per step yields both the winner and the tie rule (equal logits: lower id
first). ``K`` such steps give the top-K in order.

Where the packed key lives:
- 16-bit inputs (bfloat16, float16) widen to float32 with at least 13 low mantissa bits equal to
  zero, so the id fits in those free bits of a 32-bit key and the packing is exact (``PACK32``).
- float32 inputs use every bit, so the key goes in the high half of an int64 and the id in the low
  half (exact, about twice the integer work).

The chosen logits are recovered from the keys themselves (no second read of the row), so the
softmax over the K winners costs K exponentials per token.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

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


@dataclass(frozen=True)
class LaunchConfig:
    """How one launch is shaped: the tuned knobs that the tables in ``backends/`` hold."""

    rows_per_program: int
    num_warps: int
    num_stages: int = 1

    def clamp(self, block_e: int) -> LaunchConfig:
        """Return this config with ``rows_per_program`` cut so the tile fits ``MAX_TILE_ELEMENTS``."""
        rows = max(1, min(self.rows_per_program, MAX_TILE_ELEMENTS // block_e))
        return LaunchConfig(1 << (rows.bit_length() - 1), self.num_warps, self.num_stages)


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
    HAS_SCALE: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    PACK32: tl.constexpr,
):
    # 64-bit row offsets: T * E may exceed 2**31 at a quarter-million tokens and large E.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    row_ok = rows < T
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    x = tl.load(
        logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le,
        mask=row_ok[:, None] & col_ok[None, :],
        other=float("-inf"),
    ).to(tl.float32)

    # Order key, computed on the bits so that no float comparison (and no flush-to-zero of
    # subnormals) can disturb the ranking.
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)  # -0.0 ranks as +0.0
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FFFFFFF, key)  # any NaN: above +inf
    key = tl.where(col_ok[None, :], key, -2147483648)  # padding: below -inf, never chosen
    inv_id = BLOCK_E - 1 - cols
    if PACK32:
        packed = (key & ~(BLOCK_E - 1)) | inv_id[None, :]
        taken = -2147483648
    else:
        packed = (key.to(tl.int64) << 32) | inv_id[None, :].to(tl.int64)
        taken = -9223372036854775807 - 1

    if not RENORMALIZE:
        # The softmax over all E experts needs the row maximum and the full sum of exponentials.
        row_key = tl.max(key, axis=1)
        row_max = tl.where(row_key < 0, row_key ^ 0x7FFFFFFF, row_key).to(tl.float32, bitcast=True)
        denom = tl.sum(tl.exp(x - row_max[:, None]), axis=1)

    kcols = tl.arange(0, BLOCK_K)
    chosen = tl.full([BLOCK_T, BLOCK_K], taken, packed.dtype)
    for k in tl.static_range(K):
        best = tl.max(packed, axis=1)
        # The id in the low bits makes each key unique, so exactly one element is retired.
        packed = tl.where(packed == best[:, None], taken, packed)
        chosen = tl.where(kcols[None, :] == k, best[:, None], chosen)

    # Unpack ids and the chosen logits. Column K..BLOCK_K-1 hold `taken` and are masked on store.
    if PACK32:
        ids = BLOCK_E - 1 - (chosen & (BLOCK_E - 1))
        # Negative keys had all-ones low bits before packing (the XOR), non-negative ones zeros.
        ckey = tl.where(chosen < 0, chosen | (BLOCK_E - 1), chosen & ~(BLOCK_E - 1))
    else:
        ids = (BLOCK_E - 1 - (chosen & 0xFFFFFFFF)).to(tl.int32)
        ckey = (chosen >> 32).to(tl.int32)
    vals = tl.where(ckey < 0, ckey ^ 0x7FFFFFFF, ckey).to(tl.float32, bitcast=True)
    k_ok = kcols < K
    if RENORMALIZE:
        # Softmax over the K winners; the first winner is the row's largest chosen logit.
        top = tl.max(tl.where(k_ok[None, :], ckey, -2147483648), axis=1)
        row_max = tl.where(top < 0, top ^ 0x7FFFFFFF, top).to(tl.float32, bitcast=True)
        num = tl.where(k_ok[None, :], tl.exp(vals - row_max[:, None]), 0.0)
        denom = tl.sum(num, axis=1)
    else:
        num = tl.exp(vals - row_max[:, None])
    weights = num / denom[:, None]
    # A row whose best logit is -inf has no usable expert: weight 0, never NaN. (NaN and +inf
    # maxima keep their NaN weights, as torch.softmax gives.)
    weights = tl.where(row_max[:, None] == float("-inf"), 0.0, weights)

    out_ok = row_ok[:, None] & k_ok[None, :]
    if HAS_SCALE:
        weights = weights * tl.load(scale_ptr + ids, mask=out_ok, other=1.0).to(tl.float32)
    tl.store(weights_ptr + rows[:, None] * stride_wt + kcols[None, :] * stride_wk, weights, mask=out_ok)
    tl.store(ids_ptr + rows[:, None] * stride_it + kcols[None, :] * stride_ik, ids, mask=out_ok)


if triton is not None:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    _compiled_kernel = triton.jit(_route_kernel)
    # The same source, run by Triton's CPU interpreter on CPU tensors (debugging and CPU CI).
    _interpreted_kernel = InterpretedFunction(_route_kernel)


@contextlib.contextmanager
def _library_helpers_interpreted():
    """Let ``tl.max``/``tl.sum`` run inside the interpreted kernel.

    Triton decides at import time whether its own ``@jit`` helpers (``tl.max`` is one) are compiled
    or interpreted, from ``TRITON_INTERPRET``. We want both modes in one process, so for the span of
    an interpreted launch a helper call runs the helper's Python source under the interpreter, which
    is what ``TRITON_INTERPRET=1`` would have made of it.
    """
    import numpy  # a dependency of Triton's interpreter

    original = JITFunction.__call__
    JITFunction.__call__ = lambda self, *args, **kwargs: InterpretedFunction(self.fn)(*args, **kwargs)
    try:
        # NumPy warns on inf - inf and exp(nan); the kernel relies on IEEE results there, as a GPU does.
        with numpy.errstate(all="ignore"):
            yield
    finally:
        JITFunction.__call__ = original


def packs_to_32_bits(dtype: torch.dtype, block_e: int) -> bool:
    """Whether the 32-bit packed key is exact for ``dtype`` logits over ``block_e`` columns.

    float32 widened from bfloat16 leaves 16 low mantissa bits zero, from float16 13; the inverted
    expert id needs ``log2(block_e)`` of them.
    """
    free_bits = {torch.bfloat16: 16, torch.float16: 13}.get(dtype, 0)
    return block_e.bit_length() - 1 <= free_bits


def launch(
    logits: torch.Tensor,
    topk: int,
    scale: torch.Tensor | None,
    renormalize: bool,
    weights: torch.Tensor,
    ids: torch.Tensor,
    config: LaunchConfig,
    interpret: bool = False,
) -> None:
    """Run the kernel on a 2-D ``[T, E]`` logits view, writing ``weights`` and ``ids`` ``[T, K]``.

    Inputs are assumed validated by ``api.route`` (shapes, dtypes, devices, ``1 <= K <= E``,
    ``E <= MAX_EXPERTS``, ``K <= MAX_TOPK``). ``interpret=True`` runs Triton's interpreter instead of
    a compiled kernel (CPU tensors).
    """
    if triton is None:
        raise RuntimeError(f"the Triton kernel needs the triton package ({TRITON_IMPORT_ERROR})")
    T, E = logits.shape
    if T == 0:
        return
    block_e = triton.next_power_of_2(E)
    cfg = config.clamp(block_e)
    kernel = _interpreted_kernel if interpret else _compiled_kernel
    grid = (math.ceil(T / cfg.rows_per_program),)
    with _library_helpers_interpreted() if interpret else contextlib.nullcontext():
        kernel[grid](
            logits,
            scale if scale is not None else weights,  # never read when HAS_SCALE is False
            weights,
            ids,
            T,
            E,
            logits.stride(0),
            logits.stride(1),
            weights.stride(0),
            weights.stride(1),
            ids.stride(0),
            ids.stride(1),
            K=topk,
            BLOCK_T=cfg.rows_per_program,
            BLOCK_E=block_e,
            BLOCK_K=triton.next_power_of_2(topk),
            HAS_SCALE=scale is not None,
            RENORMALIZE=renormalize,
            PACK32=packs_to_32_bits(logits.dtype, block_e),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
