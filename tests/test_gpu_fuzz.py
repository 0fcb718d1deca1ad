"""The GPU kernel on random calls against the float64 oracle: shapes, dtypes, strides, leading dims, ties,
masked rows, NaN, infinities, magnitudes from subnormal to near overflow, scales of every layout and dtype,
and ``out=`` buffers that are columns of wider ones.

Runs under ``nox -s test-cuda`` / ``test-rocm`` / ``test-xpu`` (the ``gpu_target`` fixture sets the
marker). Each example is routed twice and the two results must be bitwise identical. The shapes come
from small sets (E, K, renormalize, scale or not, dtype) so the number of distinct kernel compiles stays
bounded; the test prints that number and how long the first call of a new (E, K) takes (compiling
included) against a warm call: ``pytest -s -k fuzz`` shows them.
"""

from __future__ import annotations

import os
import time

import torch
from oracle import assert_routes_like_oracle

import g4route
from g4route import kernel

EXAMPLES = 520
EXPERTS = (72, 128, 256)
TOPKS = (1, 8)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _logits(gen: torch.Generator, tokens: int, experts: int, dtype: torch.dtype) -> torch.Tensor:
    """One random [T, E] float32 tensor of a random kind (its rows are cast to ``dtype`` by the caller)."""
    kind = int(torch.randint(0, 7, (1,), generator=gen))
    magnitude = 10.0 ** float(torch.empty(1).uniform_(-3, 3, generator=gen))
    x = torch.randn(tokens, experts, generator=gen) * magnitude
    if kind == 1:  # ties: few distinct values
        x = torch.randint(-3, 4, (tokens, experts), generator=gen).float()
    elif kind == 2:  # masked experts and fully masked rows
        x[torch.rand(tokens, experts, generator=gen) < 0.4] = float("-inf")
        x[torch.rand(tokens, generator=gen) < 0.1] = float("-inf")
    elif kind == 3:  # NaN and +inf here and there
        r = torch.rand(tokens, experts, generator=gen)
        x[r < 0.01] = float("nan")
        x[(r >= 0.01) & (r < 0.02)] = float("inf")
    elif kind == 4:  # huge: close to the dtype's largest finite value
        x = x.sign() * torch.finfo(dtype).max * torch.rand(tokens, experts, generator=gen)
    elif kind == 5:  # tiny: subnormal in float32, signed zeros
        x = x * 1e-42
        x[torch.rand(tokens, experts, generator=gen) < 0.2] = -0.0
    elif kind == 6:  # float32 logits a few ulps apart (the truncated-key corner)
        base = torch.randn(tokens, 1, generator=gen).expand(tokens, experts).contiguous()
        ulps = torch.randint(-4, 5, (tokens, experts), generator=gen, dtype=torch.int32)
        x = (base.view(torch.int32) + ulps).view(torch.float32)
    return x


def _scale(gen: torch.Generator, experts: int, device: torch.device) -> torch.Tensor | None:
    """None, or a per-expert scale of a random layout: contiguous, every other element of a longer one, at
    an offset, one value expanded (stride 0), or in bfloat16. (The offset is 16 bytes and float64 is left
    to test_contract: Triton compiles anew for a pointer off 16-byte alignment and for each dtype.)"""
    kind = int(torch.randint(0, 6, (1,), generator=gen))
    if kind == 0:
        return None
    base = (torch.rand(2 * experts + 4, generator=gen) + 0.25).to(device)
    return {1: base[:experts], 2: base[1::2][:experts], 3: base[4:experts + 4], 4: base[:1].expand(experts),
            5: base[:experts].bfloat16()}[kind]


def _compiled_count() -> int:
    cache = getattr(kernel._compiled_kernel, "device_caches", None) or {}
    return sum(len(entry[0]) for entry in cache.values())


def _seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def test_fuzz_against_the_oracle(gpu_target):
    _, device = gpu_target
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    compiles_before = _compiled_count()
    start = time.perf_counter()
    for example in range(EXAMPLES):
        experts = EXPERTS[int(torch.randint(0, len(EXPERTS), (1,), generator=gen))]
        topk = min(experts, TOPKS[int(torch.randint(0, len(TOPKS), (1,), generator=gen))])
        dtype = DTYPES[example % len(DTYPES)]
        tokens = int(torch.randint(0, 3000, (1,), generator=gen)) if example % 5 else int(
            torch.randint(0, 4, (1,), generator=gen))
        renormalize = bool(torch.randint(0, 2, (1,), generator=gen))
        scale = _scale(gen, experts, device)
        x = _logits(gen, tokens, experts, dtype).to(dtype)
        layout = example % 4
        if layout == 1:  # strided rows: a slice of wider rows
            x = torch.cat([x, x[:, :3]], dim=1)[:, :experts]
        elif layout == 2 and tokens % 2 == 0:  # leading dims
            x = x.view(2, tokens // 2, experts)
        elif layout == 3 and tokens > 1:  # every other row of a taller tensor
            x = torch.cat([x, x], dim=1).view(tokens * 2, experts)[::2]
        logits = x.to(device)
        context = (f"example {example}: T={tokens} E={experts} K={topk} {dtype} renormalize={renormalize} "
                   f"scale={None if scale is None else (scale.dtype, scale.stride())} layout={layout} seed={seed}")
        first = g4route.route(logits, topk, scale, renormalize=renormalize)
        into_out = example % 6 == 2
        if into_out:  # out= buffers: columns of wider ones (16 bytes in), whose other columns stay as they were
            lead = logits.shape[:-1]
            wide_w = torch.full((*lead, topk + 8), 7.0, device=device)
            wide_i = torch.full((*lead, topk + 8), 7, dtype=torch.int32, device=device)
            second = g4route.route(logits, topk, scale, renormalize=renormalize,
                                   out=(wide_w[..., 4:topk + 4], wide_i[..., 4:topk + 4]))
            outside = [part for wide in (wide_w, wide_i) for part in (wide[..., :4], wide[..., topk + 4:])]
            assert all(bool((part == 7).all()) for part in outside), f"example {example}: out= wrote past its columns"
        else:
            second = g4route.route(logits, topk, scale, renormalize=renormalize)
        context += f" out={into_out}"
        try:
            assert_routes_like_oracle(first, logits, topk, scale, renormalize)
            assert torch.equal(_bits(first[0]), _bits(second[0])) and torch.equal(first[1], second[1]), \
                "two calls on the same input differ"
        except AssertionError as exc:
            raise AssertionError(f"{context}: {exc}") from None
    elapsed = time.perf_counter() - start
    compiles = _compiled_count() - compiles_before

    # A new (E, K): the first call compiles, the next ones reuse it.
    fresh = torch.randn(64, 200, device=device)
    first_call = _seconds(lambda: g4route.route(fresh, 5)[1].cpu())
    warm_call = _seconds(lambda: g4route.route(fresh, 5)[1].cpu())
    print(f"\nfuzz: {EXAMPLES} examples in {elapsed:.1f} s, {compiles} distinct kernel compiles; "
          f"a new (E=200, K=5) first call {first_call * 1e3:.0f} ms, warm call {warm_call * 1e6:.0f} us")
