"""route() against the float64 oracle, once per target (backend x device), on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from fresh_thread import in_a_fresh_thread
from oracle import assert_routes_like_oracle, oracle

import g4route

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (T, E, K): E not a power of two, K = 1 and K = E, E = 1, wide E with large K.
SHAPES = [(1, 128, 8), (7, 96, 8), (33, 256, 1), (64, 6, 6), (5, 1, 1), (17, 1000, 32), (300, 128, 8)]


def _logits(gen, shape, dtype, device):
    return torch.randn(shape, generator=gen).mul_(3).to(dtype).to(device)


def _scale(gen, num_experts, device, dtype=torch.float32):
    return (torch.rand(num_experts, generator=gen) + 0.5).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}-K{}".format(*s))
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "softmax-all"])
def test_random_logits(target, gen, dtype, shape, renormalize):
    _, device = target
    T, E, K = shape
    logits = _logits(gen, (T, E), dtype, device)
    scale = _scale(gen, E, device)
    assert_routes_like_oracle(g4route.route(logits, K, scale, renormalize=renormalize), logits, K, scale, renormalize)
    assert_routes_like_oracle(g4route.route(logits, K, renormalize=renormalize), logits, K, None, renormalize)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_go_to_the_lower_expert_id(target, gen, dtype):
    _, device = target
    # Few distinct values: nearly every selection crosses a tie, in every dtype.
    logits = torch.randint(-2, 3, (200, 64), generator=gen).to(dtype).to(device)
    weights, ids = g4route.route(logits, 8)
    assert_routes_like_oracle((weights, ids), logits, 8)
    # Independent of the oracle: same chosen logits as torch.topk, and ids rise within equal logits.
    chosen = logits.float().gather(-1, ids.long())
    torch.testing.assert_close(chosen, torch.topk(logits.float(), 8).values)
    same = chosen[:, 1:] == chosen[:, :-1]
    assert bool((ids[:, 1:] > ids[:, :-1])[same].all())


def test_negative_zero_ties_positive_zero(target):
    _, device = target
    logits = torch.tensor([[0.0, -0.0, -1.0, 0.0], [-0.0, 0.0, -0.0, 2.0]], device=device)
    _, ids = g4route.route(logits, 3)
    assert ids.tolist() == [[0, 1, 3], [3, 0, 1]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "softmax-all"])
def test_minus_inf_rows_get_zero_weight(target, gen, dtype, renormalize):
    _, device = target
    logits = _logits(gen, (6, 40), dtype, device)
    logits[0] = float("-inf")  # every expert masked
    logits[1, 3:] = float("-inf")  # fewer finite experts than K
    logits[2, ::2] = float("-inf")  # half masked
    scale = _scale(gen, 40, device)
    result = g4route.route(logits, 8, scale, renormalize=renormalize)
    assert_routes_like_oracle(result, logits, 8, scale, renormalize)
    weights, ids = result
    assert not bool(weights.isnan().any())
    assert weights[0].tolist() == [0.0] * 8 and ids[0].tolist() == list(range(8))
    assert bool((weights[1, 3:] == 0).all()) and sorted(ids[1, :3].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "softmax-all"])
def test_minus_inf_against_oracle(target, gen, renormalize):
    _, device = target
    logits = _logits(gen, (50, 40), torch.float32, device)
    logits[torch.rand(50, 40, generator=gen).to(device) < 0.7] = float("-inf")
    logits[0] = float("-inf")
    scale = _scale(gen, 40, device)
    assert_routes_like_oracle(g4route.route(logits, 8, scale, renormalize=renormalize), logits, 8, scale, renormalize)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_ranks_first_and_poisons_only_its_row(target, gen, dtype):
    _, device = target
    logits = _logits(gen, (4, 32), dtype, device)
    logits[1, 5] = float("nan")
    logits[1, 9] = float("nan")
    logits[2, 7] = float("inf")
    weights, ids = g4route.route(logits, 4)
    assert_routes_like_oracle((weights, ids), logits, 4)
    assert ids[1, :2].tolist() == [5, 9] and ids[2, 0].item() == 7
    assert bool(weights[1].isnan().all()) and bool(weights[2].isnan().all())
    assert not bool(weights[[0, 3]].isnan().any())


def test_ids_stay_in_range_on_hostile_rows(target, gen):
    _, device = target
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e38, -1e38, 1e-45])
    pick = torch.randint(0, len(specials) + 1, (256, 72), generator=gen)
    logits = torch.where(pick < len(specials), specials[pick.clamp(max=len(specials) - 1)],
                         torch.randn(256, 72, generator=gen)).to(device)
    for dtype in DTYPES:
        x = logits.to(dtype)
        assert_routes_like_oracle(g4route.route(x, 8), x, 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_leading_dims_and_strided_rows(target, gen, dtype):
    _, device = target
    batch = _logits(gen, (2, 3, 5, 48), dtype, device)
    assert_routes_like_oracle(g4route.route(batch, 4), batch, 4)
    wide = _logits(gen, (37, 200), dtype, device)
    rows = wide[:, 10:138]  # row stride 200, contiguous columns
    cols = wide[:, ::2][:, :96]  # column stride 2
    transposed = _logits(gen, (64, 30), dtype, device).t()  # E=64 with column stride 30
    for view in (rows, cols, transposed, batch.transpose(0, 1)):
        assert_routes_like_oracle(g4route.route(view, 8), view, 8)


def test_empty_inputs(target):
    _, device = target
    for shape in ((0, 128), (2, 0, 16)):
        weights, ids = g4route.route(torch.randn(shape, device=device), 8)
        assert weights.shape == (*shape[:-1], 8) and ids.shape == (*shape[:-1], 8)
        assert weights.dtype == torch.float32 and ids.dtype == torch.int32


def test_out_buffers_are_written_in_place(target, gen):
    _, device = target
    logits = _logits(gen, (3, 9, 64), torch.bfloat16, device)
    weights = torch.full((3, 9, 8), float("nan"), device=device)
    ids = torch.full((3, 9, 8), -1, dtype=torch.int32, device=device)
    result = g4route.route(logits, 8, out=(weights, ids))
    assert result[0] is weights and result[1] is ids
    assert_routes_like_oracle(result, logits, 8)
    # Strided out buffers (columns of a wider buffer) are written without touching their neighbours.
    big_w = torch.full((27, 16), 7.0, device=device)
    big_i = torch.full((27, 16), 7, dtype=torch.int32, device=device)
    flat = logits.reshape(27, 64)
    g4route.route(flat, 8, out=(big_w[:, 4:12], big_i[:, 4:12]))
    assert_routes_like_oracle((big_w[:, 4:12], big_i[:, 4:12]), flat, 8)
    assert bool((big_w[:, :4] == 7).all() and (big_w[:, 12:] == 7).all() and (big_i[:, :4] == 7).all())


@pytest.mark.parametrize("rows", [1, 21])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_scale_dtypes(target, gen, scale_dtype, rows):
    _, device = target
    logits = _logits(gen, (rows, 128), torch.float32, device)
    scale = _scale(gen, 128, device, scale_dtype)
    assert_routes_like_oracle(g4route.route(logits, 8, scale), logits, 8, scale)


@pytest.mark.parametrize("rows", [1, 21])
def test_scale_layouts(target, gen, rows):
    """A strided scale, and an nn.Parameter that requires grad (as Transformers holds Gemma 4's) under
    no_grad, route as a plain contiguous one does."""
    _, device = target
    logits = _logits(gen, (rows, 128), torch.bfloat16, device)
    strided = _scale(gen, 256, device)[::2]
    parameter = torch.nn.Parameter(_scale(gen, 128, device))
    with torch.no_grad():
        for scale in (strided, parameter):
            assert_routes_like_oracle(g4route.route(logits, 8, scale), logits, 8, scale)


def test_a_float64_default_dtype_changes_nothing(target, gen):
    """Under torch.set_default_dtype(torch.float64) (some numerics code sets it) every path, its buffers made
    afresh (a new thread has none), still returns float32 weights with the oracle's values."""
    _, device = target
    cases = [(_logits(gen, (rows, 128), dtype, device), _scale(gen, 128, device))
             for rows in (1, 4, 40, 300) for dtype in (torch.float32, torch.bfloat16)]

    def body() -> None:
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            for logits, scale in cases:
                assert_routes_like_oracle(g4route.route(logits, 8, scale), logits, 8, scale)
        finally:
            torch.set_default_dtype(before)

    in_a_fresh_thread(body)


def test_weights_are_softmax_of_chosen(target, gen):
    """A property check that does not go through the oracle's code."""
    _, device = target
    logits = _logits(gen, (50, 128), torch.float32, device)
    weights, ids = g4route.route(logits, 8)
    torch.testing.assert_close(weights.sum(-1), torch.ones(50, device=device))
    chosen = logits.gather(-1, ids.long()).double()
    torch.testing.assert_close(weights.double(), torch.softmax(chosen, -1), rtol=1e-5, atol=1e-7)
    assert bool((weights[:, :-1] >= weights[:, 1:]).all())


def test_oracle_agrees_with_a_lexicographic_sort(gen):
    """The oracle's selection, checked against NumPy's lexsort on tie-heavy rows with NaN and -0.0."""
    np = pytest.importorskip("numpy")
    x = torch.randint(-3, 4, (300, 20), generator=gen).double()
    x[torch.rand(300, 20, generator=gen) < 0.05] = float("nan")
    x[torch.rand(300, 20, generator=gen) < 0.1] = -0.0
    _, ids = oracle(x, 20)
    a = x.numpy()
    col = np.broadcast_to(np.arange(20), a.shape)
    keys = [(c, -np.nan_to_num(r, nan=0.0), -np.isnan(r).astype(int)) for r, c in zip(a, col, strict=True)]
    expect = np.stack([np.lexsort(k) for k in keys])
    assert (ids.numpy() == expect).all()


def test_float32_logits_a_few_ulps_apart(target, gen):
    """Logits that differ only in their lowest mantissa bits: exact order, not a truncated one."""
    _, device = target
    base = torch.randn(128, 1, generator=gen)
    ulps = torch.randint(-300, 300, (128, 128), generator=gen, dtype=torch.int32)
    logits = (base.view(torch.int32) + ulps).view(torch.float32).to(device)
    weights, ids = g4route.route(logits, 8)
    assert_routes_like_oracle((weights, ids), logits, 8)


def test_interpreter_leaves_triton_language_as_it_found_it(monkeypatch):
    """The interpreter backend patches triton.language while it runs; a patch left behind breaks every
    later compile of a GPU kernel in the same process."""
    tl = pytest.importorskip("triton.language")
    if g4route.registry.why_not(g4route.registry.get("interpreter"), torch.device("cpu"), 8, 2):
        pytest.skip("no Triton here")
    monkeypatch.setenv("G4ROUTE_BACKEND", "interpreter")
    g4route.route(torch.randn(9, 8), 2)  # first use: Triton's one-time set-up is not a leak
    modules = (tl, tl.core, tl.core.tensor, tl.math)
    before = [dict(vars(m)) for m in modules]
    g4route.route(torch.randn(9, 8), 2)
    for module, snapshot in zip(modules, before, strict=True):
        after = dict(vars(module))
        changed = sorted(k for k in snapshot.keys() | after.keys() if snapshot.get(k) is not after.get(k))
        assert not changed, f"{module} still patched: {changed[:5]}"


_THREADS_SCRIPT = """
import os, sys, threading
import torch
sys.path.insert(0, {tests!r})
from oracle import assert_routes_like_oracle
import g4route

barrier = threading.Barrier(8)
failures = []

def work(i):
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    logits = torch.randn(5 + i, 16 + 8 * i, generator=gen).to([torch.float32, torch.bfloat16][i % 2])
    barrier.wait()
    try:
        assert_routes_like_oracle(g4route.route(logits, 3), logits, 3)
    except BaseException as exc:
        failures.append(f"thread {{i}}: {{type(exc).__name__}}: {{exc}}")

threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("\\n".join(failures) or "all 8 threads routed correctly")
sys.exit(1 if failures else 0)
"""


def test_interpreter_first_calls_from_eight_threads_at_once():
    """Triton's interpreter patches triton.language process-wide while a kernel runs: eight threads making
    their first route() calls together (a fresh process, so they really are the first) must not undo each
    other's patches mid-run."""
    if g4route.registry.why_not(g4route.registry.get("interpreter"), torch.device("cpu"), 8, 2):
        pytest.skip("no Triton here")
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "G4ROUTE_BACKEND": "interpreter"}
    result = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT.format(tests=tests)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
