"""The PyTorch reference's selection paths (reference.py's module docstring) against the float64 oracle.

Each path decides exactness its own way (a Python check of few rows, a tensor check, a 16-bit key table,
packed keys truncated or exact, a sort), so each is driven here with the inputs that stress its rule:
ties everywhere, ties that only the truncated low bits of a float32 key would break, NaN of both signs,
signed zeros, infinities and fully masked rows. Fresh random inputs every run (the ``gen`` fixture).
"""

from __future__ import annotations

import threading

import pytest
import torch
from fresh_thread import in_a_fresh_thread
from oracle import oracle

from g4route import reference
from g4route.reference import reference_route, route_torch, select_experts

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True, params=[1, 2], ids=["one-thread", "two-threads"])
def intra_op_threads(request):
    """Every test here runs with one intra-op thread and with two: the CPU paths' row bands change with the
    count (reference.packed_min_rows), so each band meets each path."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)

MODES = ["plain", "ties", "truncated", "special", "masked"]
# One per path on a CPU: few rows checked in Python, the topk / key-table band (weights by torch.softmax,
# then by hand past _SOFTMAX_MAX_ROWS), the packed keys in one chunk and in several (the last one short)
# with one thread; with two, the topk / key-table band reaches further (intra_op_threads).
ROWS = [1, 3, reference._FEW_ROWS, reference._FEW_ROWS + 1, 40, reference._SOFTMAX_MAX_ROWS,
        reference._SOFTMAX_MAX_ROWS + 1, reference.PACKED_MIN_ROWS - 1, reference.PACKED_MIN_ROWS,
        reference._CHUNK_ROWS + 37]


def _logits(mode: str, rows: int, experts: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, experts, generator=gen) * float(torch.rand(1, generator=gen) * 8 + 0.5)
    if mode == "ties":  # a handful of values: ties at every place, the K-th included
        x = x.round()
    elif mode == "truncated":
        # float32 values that agree above the low 7 bits of their bits, in groups of up to 4 columns: the
        # packed keys keep only the high bits, so the order among these rests on the check and the sort.
        base = torch.randn(rows, (experts + 3) // 4, generator=gen).repeat_interleave(4, dim=1)[:, :experts]
        noise = torch.randint(0, 128, (rows, experts), generator=gen, dtype=torch.int32)
        x = ((base.view(torch.int32) & ~127) | noise).view(torch.float32)
    elif mode == "special":
        r = torch.rand(rows, experts, generator=gen)
        x[r < 0.01] = float("nan")
        x[(r >= 0.01) & (r < 0.02)] = -float("nan")
        x[(r >= 0.02) & (r < 0.04)] = float("inf")
        x[(r >= 0.04) & (r < 0.06)] = -float("inf")
        x[(r >= 0.3) & (r < 0.5)] = -0.0
        x[(r >= 0.5) & (r < 0.7)] = 0.0
    elif mode == "masked":
        x[torch.rand(rows, experts, generator=gen) < 0.5] = -float("inf")
        x[torch.rand(rows, generator=gen) < 0.2] = -float("inf")  # whole rows: weight 0
    return x.to(dtype)


def _assert_like_oracle(logits, topk, scale, renormalize):
    ref_w, ref_ids = oracle(logits, topk, scale, renormalize)
    w, ids = reference_route(logits, topk, scale, renormalize)
    assert ids.dtype == torch.int64 and torch.equal(ids, ref_ids)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-6, equal_nan=True)
    w32, ids32 = route_torch(logits, topk, scale, renormalize)
    assert ids32.dtype == torch.int32 and ids32.is_contiguous() and torch.equal(ids32.long(), ref_ids)
    torch.testing.assert_close(w32, w, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(select_experts(logits, topk)[0], ref_ids)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_path_every_mode(rows, dtype, gen):
    experts = 128
    scale = torch.rand(experts, generator=gen) + 0.5
    for mode in MODES:
        if mode == "truncated" and dtype != torch.float32:
            continue
        logits = _logits(mode, rows, experts, dtype, gen)
        _assert_like_oracle(logits, 8, scale, True)
    _assert_like_oracle(_logits("ties", rows, experts, dtype, gen), 8, None, False)


@pytest.mark.parametrize("rows", [1, reference._FEW_ROWS, 40, reference.PACKED_MIN_ROWS + 5])
def test_odd_shapes(rows, gen):
    """E not a power of two (the id bits), K == E (the sort), K = 1, K = E - 1, the widest E of the few-row
    paths, strided rows."""
    for experts, topk in ((5, 5), (5, 1), (5, 4), (67, 3), (300, 16), (4096, 8)):
        for dtype in DTYPES:
            for mode in ("ties", "special"):
                _assert_like_oracle(_logits(mode, rows, experts, dtype, gen), topk, None, True)
    wide = _logits("ties", rows, 200, torch.bfloat16, gen)
    _assert_like_oracle(wide[:, 10:138], 8, torch.rand(128, generator=gen) + 0.5, True)
    wide = _logits("truncated", rows, 200, torch.float32, gen)
    _assert_like_oracle(wide[:, 10:138], 8, torch.rand(128, generator=gen) + 0.5, True)


def test_ties_beyond_the_kth_place(gen):
    """Few rows whose K-th logit ties with logits well beyond the K + 1 that torch.topk returned: the
    lowest ids holding it must win, wherever they sit in the row."""
    for dtype in DTYPES:
        for rows in (1, reference._FEW_ROWS):
            x = torch.full((rows, 64), -3.0)
            x[:, 40:] = torch.randn(rows, 24, generator=gen).abs() + 1  # 24 above the tie: K = 8 needs none
            x[:, 50:] = 0.5  # 14 equal logits from id 50 on; the first 8 of them are not topk's own
            x[:, 5] = 0.5
            x[:, 3] = -0.0  # ±0 below: never chosen
            _assert_like_oracle(x.to(dtype), 30, None, True)
            x[:, 60] = 0.0
            x[:, 61] = -0.0  # ±0 tied at the K-th place
            x[:, 40:50] = 7.0
            _assert_like_oracle(torch.where(x == 0.5, 0.0, x).to(dtype), 12, None, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_path_outputs_never_alias_its_buffers(dtype, gen):
    """Few rows are selected into buffers kept per thread (reference._route_few; past PACKED_MIN_ROWS rows,
    with several threads, the first rows of a larger bucket's): what a call returns must survive the next
    call of the same shape, on either its settled or its fixed path."""
    for rows in (1, 3, 40, reference.PACKED_MIN_ROWS - 1, 300):
        for mode in ("plain", "ties"):
            first = _logits(mode, rows, 128, dtype, gen)
            outputs = [route_torch(first, 8, None, True), reference_route(first, 8, None, True)]
            kept = [tuple(t.clone() for t in out) for out in outputs]
            for _ in range(2):
                route_torch(_logits(mode, rows, 128, dtype, gen), 8, None, True)
                reference_route(_logits(mode, rows, 128, dtype, gen), 8, None, True)
            for out, copy in zip(outputs, kept, strict=True):
                assert all(torch.equal(a, b) for a, b in zip(out, copy, strict=True))
            _assert_like_oracle(first, 8, None, True)


def test_small_path_in_threads(gen):
    """Eight threads routing few rows at once, each through its own buffers: every result is the oracle's."""
    cases = [(_logits(mode, rows, 128, dtype, gen), torch.rand(128, generator=gen) + 0.5)
             for rows in (1, 4, 33) for dtype in DTYPES for mode in ("plain", "ties")]
    wanted = [oracle(x, 8, scale, True) for x, scale in cases]
    failures = []
    start = threading.Barrier(8)

    def work(offset: int) -> None:
        start.wait()
        for step in range(60):
            i = (offset + step) % len(cases)
            w, ids = route_torch(cases[i][0], 8, cases[i][1], True)
            if not torch.equal(ids.long(), wanted[i][1]) or not torch.allclose(w.double(), wanted[i][0],
                                                                             rtol=1e-5, atol=1e-6):
                failures.append(i)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


@pytest.mark.parametrize("rows", [1, 40, reference.PACKED_MIN_ROWS + 5])
def test_buffers_made_under_inference_mode_serve_calls_outside_it(rows, gen):
    """The buffers kept per thread (few rows, and the packed keys' scratch) are made by the thread's first
    call: made under torch.inference_mode() they must still take in-place writes outside it (an inference
    tensor cannot), as an engine's warm-up under inference mode followed by ordinary calls would need."""
    cases = [_logits("plain", rows, 128, dtype, gen) for dtype in DTYPES for _ in range(2)]

    def body() -> None:
        with torch.inference_mode():
            for x in cases[::2]:
                _assert_like_oracle(x, 8, None, True)
        for x in cases:
            _assert_like_oracle(x, 8, None, True)

    in_a_fresh_thread(body)


def test_another_default_device_changes_nothing(gen):
    """Under torch.set_default_device("meta") (a script that sets "cuda" does the same to tensors made
    without a device) CPU calls still route on the CPU, every path's buffers and tables made afresh in a
    new thread: the paths make theirs on the CPU whatever the default."""
    cases = [(_logits(mode, rows, 128, dtype, gen), torch.rand(128, generator=gen) + 0.5)
             for rows in (1, 4, 40, reference.PACKED_MIN_ROWS + 140, reference._CHUNK_ROWS + 37)
             for dtype in (torch.float32, torch.bfloat16) for mode in ("plain", "ties")]
    trained = [(_logits("ties", rows, 128, torch.float32, gen), torch.rand(128, generator=gen) + 0.5)
               for rows in (1, 3, 200)]

    def body() -> None:
        torch.set_default_device("meta")
        try:
            for x, scale in cases:
                _assert_like_oracle(x, 8, scale, True)
            for x, scale in trained:
                w, _ = route_torch(x.requires_grad_(True), 8, scale, True)
                w.sum().backward()
                assert x.grad.is_cpu and bool(x.grad.isfinite().all())
        finally:
            torch.set_default_device(None)

    in_a_fresh_thread(body)


@pytest.mark.parametrize("rows", [1, 40])
def test_scale_gradient_with_frozen_logits_over_two_calls(rows, gen):
    """Logits that need no gradient but a scale that does (a frozen projection, a trained per-expert
    scale), two layers' calls before one backward: the ids that the scale's gradient keeps must be each
    call's own, not a buffer the next call overwrites."""
    scale = (torch.rand(128, generator=gen) + 0.5).requires_grad_(True)
    xs = [_logits("plain", rows, 128, torch.float32, gen) for _ in range(2)]
    total = sum(route_torch(x, 8, scale, True)[0].sum() for x in xs)
    total.backward()
    s64 = scale.detach().double().requires_grad_(True)
    sum(oracle(x, 8, s64, True)[0].sum() for x in xs).backward()
    torch.testing.assert_close(scale.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 40, reference.PACKED_MIN_ROWS])
def test_weights_are_differentiable(rows, gen):
    """reference_route's weights carry gradients to the logits and the scale, as the float64 oracle's do."""
    logits = _logits("plain", rows, 32, torch.float32, gen).requires_grad_(True)
    scale = (torch.rand(32, generator=gen) + 0.5).requires_grad_(True)
    w, _ = reference_route(logits, 4, scale, True)
    w.sum().backward()
    x64, s64 = logits.detach().double().requires_grad_(True), scale.detach().double().requires_grad_(True)
    ref_w, _ = oracle(x64, 4, s64, True)
    ref_w.sum().backward()
    torch.testing.assert_close(logits.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scale.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_key_table_indices_are_the_unsigned_patterns(dtype, gen):
    """The keyed path copies 16-bit logits into the low halves of zeroed int32s: each index must be the
    logit's bit pattern read unsigned (the sign bit included, so negative logits index the upper half of
    the table), whatever the logits' strides, and the high halves must stay zero from call to call."""
    for rows in (2, 40):
        for mode in ("ties", "special"):
            wide = _logits(mode, rows, 256, dtype, gen)
            x = wide[:, ::2]  # strided rows
            reference._keyed_topk(x, 8)
            index = reference._SMALL.cache[(rows, 8, 128, dtype)][1]
            wanted = x.contiguous().view(torch.int16).int() & 0xFFFF
            assert torch.equal(index, wanted)
            assert bool((index >= 0x8000).any())  # negative logits were among them
