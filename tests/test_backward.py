"""route()'s gradients: the backward kernel (interpreter on CPU, the GPU backends under their markers) and
autograd of the reference, against float64 autograd of an independent formula (tests/oracle.py).

Every case draws fresh inputs (the ``gen`` fixture prints the seed). The interpreter is slow: CPU cases
stay at a few hundred rows; the large sizes and the determinism check run on the GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from oracle import oracle, oracle_gradients
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import make_boxed_func

import g4route
from g4route import backward, configs, registry
from g4route.reference import reference_route

OPS = {"route": torch.ops.g4route.route.default, "route_autograd": torch.ops.g4route.route_autograd.default,
       "route_backward": torch.ops.g4route.route_backward.default}


@pytest.fixture(params=["one-hot", "scatter"])
def spread(request, monkeypatch):
    """Both ways the kernel writes the logits' gradient from the forward's weights, whatever the backend's
    table says: a ``[rows, K, E]`` one-hot (AMD, Intel), or zeros then the K values a row after a barrier
    (NVIDIA's ``backward_scatter``)."""
    load = configs.load_table
    scatter = request.param == "scatter"
    monkeypatch.setattr(configs, "load_table",
                        lambda vendor: dataclasses.replace(load(vendor), backward_scatter=scatter))
    return request.param


def _route_with_grads(logits, topk, scale, renormalize, grad_weights, scale_grad=True):
    """route() on leaf copies of the inputs; backward with ``grad_weights``: (ids, dlogits, dscale)."""
    x = logits.detach().clone().requires_grad_(True)
    s = None if scale is None else scale.detach().clone().requires_grad_(scale_grad)
    weights, ids = g4route.route(x, topk, s, renormalize=renormalize)
    assert weights.requires_grad and not ids.requires_grad
    weights.backward(grad_weights)
    return ids, x.grad, None if s is None else s.grad


def _assert_gradients(logits, topk, scale, renormalize, grad_weights, scale_grad=True):
    """route()'s gradients against the float64 oracle's, at float32 accuracy (the logits' dtype's rounding
    for 16-bit logits); the ids must be the contract's (the oracle's), so the gradient is of the contract."""
    ids, d_logits, d_scale = _route_with_grads(logits, topk, scale, renormalize, grad_weights, scale_grad)
    assert torch.equal(ids.long(), oracle(logits, topk, scale, renormalize)[1])
    ref_logits, ref_scale = oracle_gradients(logits, ids, grad_weights, scale, renormalize)
    assert d_logits.dtype == logits.dtype and d_logits.shape == logits.shape
    finite = torch.isfinite(grad_weights)
    g_max = float(grad_weights[finite].abs().max()) if bool(finite.any()) else 1.0
    s_max = 1.0 if scale is None else max(1.0, float(scale.double().abs().max()))
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[logits.dtype]
    atol = {torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-6}[logits.dtype] * g_max * s_max
    torch.testing.assert_close(d_logits.double(), ref_logits, rtol=rtol, atol=atol, equal_nan=True)
    if renormalize:  # exactly zero outside the chosen K (NaN rows included)
        outside = torch.ones_like(d_logits, dtype=torch.bool).scatter_(-1, ids.long(), False)
        assert bool((d_logits[outside] == 0).all())
    if scale is not None and scale_grad:
        assert d_scale.dtype == scale.dtype
        # A sum over tokens: bound its float32 error by the sum of the terms' magnitudes.
        _, magnitude = oracle_gradients(logits, ids, grad_weights.abs(), scale.abs(), renormalize)
        bound = 1e-5 * magnitude.nan_to_num(0.0) + 1e-7
        diff = (d_scale.double() - ref_scale).abs()
        same_nan = torch.isnan(d_scale.double()) == torch.isnan(ref_scale)
        assert bool(same_nan.all()), "NaN in one scale gradient and not in the other"
        assert bool((diff.nan_to_num(0.0) <= bound).all()), f"scale grad off by {float(diff.nan_to_num(0).max())}"
    return ids, d_logits


# ------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "softmax-all"])
@pytest.mark.parametrize("with_scale", [True, False], ids=["scale", "no-scale"])
def test_gradcheck_reference_in_float64(gen, renormalize, with_scale):
    """torch.autograd.gradcheck of the reference in float64, on logits whose gaps are far wider than the
    finite-difference step (so the selection does not change under it)."""
    T, E, K = 6, 12, 4
    logits = torch.randperm(T * E, generator=gen).reshape(T, E).double().div_(T * E / 6).requires_grad_(True)
    scale = (torch.rand(E, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True) if with_scale else None
    inputs = (logits, scale) if with_scale else (logits,)

    def weights(x, s=None):
        return reference_route(x, K, s, renormalize, torch.float64)[0]

    assert torch.autograd.gradcheck(weights, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


# -------------------------------------------------------------- route() on every target vs the oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "softmax-all"])
@pytest.mark.parametrize("shape", [(37, 24, 5), (64, 64, 8), (5, 7, 7), (9, 16, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gradients_match_the_oracle(target, gen, dtype, renormalize, shape):
    _, device = target
    T, E, K = shape
    logits = torch.randn(T, E, generator=gen).mul_(3).to(device, dtype)
    scale = (torch.rand(E, generator=gen) + 0.5).to(device)
    grad = torch.randn(T, K, generator=gen).to(device)
    _assert_gradients(logits, K, scale, renormalize, grad)
    _assert_gradients(logits, K, None, renormalize, grad)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "softmax-all"])
def test_gradients_with_ties_masked_and_nan_rows(target, gen, renormalize, spread):
    """bfloat16 small integers (ties within the K and at the K-th place), rows partly and wholly -inf,
    NaN and +inf rows, a scale with zeros: the oracle's values, NaN in and NaN out, never an error."""
    _, device = target
    T, E, K = 96, 20, 6
    logits = torch.randint(-3, 4, (T, E), generator=gen).float()
    logits[3, :] = float("-inf")  # every expert masked: weights 0, gradient 0
    logits[4, 2:] = float("-inf")  # fewer finite logits than K
    logits[5, 7] = float("nan")
    logits[6, :] = float("nan")
    logits[7, 1] = float("inf")
    logits[8, ::2] = float("-inf")
    scale = (torch.rand(E, generator=gen) + 0.5)
    scale[torch.randperm(E, generator=gen)[:4]] = 0.0  # zeros: the backward must not divide by the scale
    grad = torch.randn(T, K, generator=gen)
    for dtype in (torch.bfloat16, torch.float32):
        x = logits.to(device, dtype)
        ids, d_logits = _assert_gradients(x, K, scale.to(device), renormalize, grad.to(device))
        assert bool((d_logits[3] == 0).all())
        assert bool(torch.isnan(d_logits[6]).any()) and bool(torch.isnan(d_logits[5]).any())
        assert bool(torch.isfinite(d_logits[9:]).all())
        assert bool(((ids >= 0) & (ids < E)).all())


@pytest.mark.parametrize("tiles", ["default", "one-row"])
def test_gradients_where_the_weights_cannot_be_divided_by_the_scale(target, gen, monkeypatch, tiles, spread):
    """The kernel's backward takes q = w / s from the forward's weights where that division is exact, and
    recomputes a tile from the logits elsewhere: scales of 0, below 2**-64 (one subnormal), above 2**64,
    negative, and weights that underflow (logit gaps of about 90 inside the K) must still give the
    oracle's gradients; with one-row tiles, rows of either kind side by side in one launch (and the
    programs' partial sums of the scale's gradient added in groups)."""
    _, device = target
    if tiles == "one-row":  # 50 programs, their partial sums added in groups of 4 (52 programs: 2 add zeros)
        monkeypatch.setattr(backward, "config_for", lambda *args, **kwargs: backward.BackwardConfig(1, 4, 1))
        monkeypatch.setattr(backward, "_PARTIAL_GROUP", 4)
    T, E, K = 200, 24, 6
    logits = torch.randn(T, E, generator=gen).mul_(2)
    far = torch.rand(T, generator=gen) < 0.3
    logits[far, :K] = logits[far, :K] + torch.arange(K, 0, -1).float() * 18  # gaps of 18: tiny weights
    scale = torch.rand(E, generator=gen) + 0.5
    scale[[1, 5, 9, 13, 17, 21]] = torch.tensor([0.0, 1e-30, 3e-39, 1e25, -1.5, -2e-25])
    grad = torch.randn(T, K, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        for renormalize in (True, False):
            _assert_gradients(logits.to(device, dtype), K, scale.to(device), renormalize, grad.to(device))


def test_changing_the_weights_in_place_before_the_backward_is_an_error(target, gen):
    """The backward reads the forward's weights: autograd's version counter catches an in-place change."""
    _, device = target
    logits = torch.randn(12, 16, generator=gen).to(device).requires_grad_(True)
    weights, _ = g4route.route(logits, 4)
    weights.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        weights.sum().backward()


def test_gradients_of_strided_and_batched_logits(target, gen):
    """Strided rows (every other column of a wider leaf), a strided scale and leading batch dims: the
    gradient lands in the leaf's columns that were read, zero in the others."""
    _, device = target
    E, K = 32, 4
    wide = torch.randn(50, 2 * E, generator=gen).to(device).requires_grad_(True)
    scale = (torch.rand(2 * E, generator=gen) + 0.5).to(device)[::2]
    grad = torch.randn(50, K, generator=gen).to(device)
    weights, ids = g4route.route(wide[:, ::2], K, scale)
    weights.backward(grad)
    ref, _ = oracle_gradients(wide[:, ::2], ids, grad, scale)
    torch.testing.assert_close(wide.grad[:, ::2].double(), ref, rtol=1e-5, atol=1e-6)
    assert bool((wide.grad[:, 1::2] == 0).all())

    batched = torch.randn(3, 11, E, generator=gen).to(device, torch.bfloat16)
    grad3 = torch.randn(3, 11, K, generator=gen).to(device)
    _assert_gradients(batched, K, scale, False, grad3)


def test_gradient_of_a_sum_and_of_the_scale_alone(target, gen):
    """weights.sum() gives a broadcast (stride-0) gradient; a frozen logits tensor with a trainable scale
    gives the scale's gradient only; no tokens gives zero gradients."""
    _, device = target
    E, K = 40, 8
    logits = torch.randn(33, E, generator=gen).to(device)
    scale = (torch.rand(E, generator=gen) + 0.5).to(device).requires_grad_(True)
    weights, ids = g4route.route(logits, K, scale)
    weights.sum().backward()
    _, ref = oracle_gradients(logits, ids, torch.ones(33, K, device=device), scale)
    torch.testing.assert_close(scale.grad.double(), ref, rtol=1e-5, atol=1e-6)

    x = torch.randn(0, E, device=device, requires_grad=True)
    s = scale.detach().clone().requires_grad_(True)
    weights, _ = g4route.route(x, K, s, renormalize=False)
    weights.sum().backward()
    assert x.grad.shape == (0, E) and bool((s.grad == 0).all())


def test_no_grad_path_records_nothing(gen):
    logits = torch.randn(8, 16, generator=gen)
    weights, ids = g4route.route(logits, 4, torch.rand(16, generator=gen))
    assert weights.grad_fn is None and not weights.requires_grad and not ids.requires_grad
    with torch.no_grad():
        weights, _ = g4route.route(logits.requires_grad_(True), 4)
    assert weights.grad_fn is None


def test_double_backward_raises_a_clear_error(target, gen):
    """Through the operator (every forced backend; eager CPU calls without one: see below)."""
    _, device = target
    logits = torch.randn(10, 16, generator=gen).to(device).requires_grad_(True)
    weights, _ = g4route.route(logits, 4)
    (grad,) = torch.autograd.grad((weights * weights).sum(), logits, create_graph=True)  # first order: fine
    with pytest.raises(RuntimeError, match="differentiable once"):
        grad.sum().backward()


# ------------------------------------------------- eager CPU calls: autograd records the reference's ops


@pytest.fixture
def unforced(monkeypatch):
    """No ``G4ROUTE_BACKEND``: eager CPU calls take route()'s direct path to the torch backend, whose ops
    autograd records itself (the ``target`` fixture forces a backend, which takes the operator)."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "softmax-all"])
def test_eager_cpu_gradients_through_the_reference_ops(unforced, gen, renormalize):
    """The direct path's gradients against the float64 oracle: ties, rows partly and wholly -inf (0, not
    NaN), NaN and +inf rows, odd scales, bfloat16 and float32, few rows (the topk path) and many (the
    packed keys)."""
    for T in (2, 4):  # few rows: ties fixed in Python (no -inf here, which would take the exact paths)
        logits = torch.randint(-2, 3, (T, 12), generator=gen).float()
        scale = torch.rand(12, generator=gen) + 0.5
        grad = torch.randn(T, 5, generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            _assert_gradients(logits.to(dtype), 5, scale, renormalize, grad)
    for T in (3, 200):
        E, K = 20, 6
        logits = torch.randint(-3, 4, (T, E), generator=gen).float()
        logits[1, :] = float("-inf")
        logits[2, 2:] = float("-inf")
        if T > 3:
            logits[5, 7] = float("nan")
            logits[6, 1] = float("inf")
        scale = torch.rand(E, generator=gen) + 0.5
        scale[[1, 5, 9]] = torch.tensor([0.0, 1e-30, -1.5])
        grad = torch.randn(T, K, generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            x = logits.to(dtype)
            weights, _ = g4route.route(x.requires_grad_(True), K, scale, renormalize=renormalize)
            assert "g4route" not in type(weights.grad_fn).__name__  # the direct path, not the operator
            _, d_logits = _assert_gradients(x.detach(), K, scale, renormalize, grad)
            assert bool((d_logits[1] == 0).all())
            _assert_gradients(x.detach(), K, None, renormalize, grad)
    # An nn.Parameter scale (as Transformers holds Gemma 4's) takes the same direct path.
    parameter = torch.nn.Parameter(torch.rand(12, generator=gen) + 0.5)
    x = torch.randn(3, 12, generator=gen).requires_grad_(True)
    weights, ids = g4route.route(x, 5, parameter, renormalize=renormalize)
    assert "g4route" not in type(weights.grad_fn).__name__
    weights.sum().backward()
    grad, scale_grad = oracle_gradients(x.detach(), ids, torch.ones(3, 5), parameter.detach(), renormalize)
    torch.testing.assert_close(x.grad.double(), grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parameter.grad.double(), scale_grad, rtol=1e-5, atol=1e-6)


def test_eager_cpu_double_backward_works(unforced, gen):
    """The direct path records plain PyTorch ops, so a second derivative exists: it matches float64
    autograd of the reference's formula."""
    logits = torch.randn(10, 16, generator=gen)
    scale = torch.rand(16, generator=gen) + 0.5

    def second(x, s, dtype):
        x = x.to(dtype).requires_grad_(True)
        weights = g4route.route(x, 4, s)[0] if dtype == torch.float32 else reference_route(x, 4, s, True, dtype)[0]
        (grad,) = torch.autograd.grad((weights * weights).sum(), x, create_graph=True)
        return torch.autograd.grad(grad.pow(3).sum(), x)[0]

    torch.testing.assert_close(second(logits, scale, torch.float32).double(),
                               second(logits, scale.double(), torch.float64), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------- torch.compile, opcheck


def _train_step(router, hidden, scale):
    weights, ids = g4route.route(router(hidden), 4, scale)
    return (weights * ids.float().cos()).sum()


@pytest.mark.parametrize("backend", ["torch", "interpreter"])
def test_compiled_training_step_has_no_graph_break(gen, monkeypatch, backend):
    """torch.compile(fullgraph=True) of a training step: one forward node (route_autograd), one backward
    node (route_backward), no graph break, one compile for several token counts, eager's gradients."""
    if registry.why_not(registry.get(backend), torch.device("cpu"), 16, 4):
        pytest.skip(f"backend {backend} unavailable here")
    monkeypatch.setenv(registry.ENV_VAR, backend)
    torch._dynamo.reset()
    counters.clear()
    graphs = {"forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, _):
            graphs[kind].append(gm)
            return make_boxed_func(gm)
        return compiler

    compiled = torch.compile(_train_step, fullgraph=True, dynamic=True,
                             backend=aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")))
    router = torch.nn.Linear(24, 16, bias=False)
    scale = torch.nn.Parameter(torch.rand(16, generator=gen) + 0.5)
    try:
        for tokens in (5, 17, 40):
            hidden = torch.randn(tokens, 24, generator=gen)
            grads = []
            for step in (compiled, _train_step):
                router.zero_grad()
                scale.grad = None
                loss = step(router, hidden, scale)
                loss.backward()
                grads.append((loss.detach(), router.weight.grad.clone(), scale.grad.clone()))
            for ours, eager in zip(*grads, strict=True):
                torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-7)
    finally:
        torch._dynamo.reset()
    assert sum(counters["graph_break"].values()) == 0
    assert len(graphs["forward"]) == 1 and len(graphs["backward"]) == 1, "a token count recompiled"
    targets = {n.target for g in graphs["forward"] + graphs["backward"] for n in g.graph.nodes}
    assert OPS["route_autograd"] in targets and OPS["route_backward"] in targets


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "softmax-all"])
@pytest.mark.parametrize("backend", ["torch", "interpreter"])
def test_opcheck_route_autograd(gen, monkeypatch, backend, renormalize):
    if registry.why_not(registry.get(backend), torch.device("cpu"), 16, 4):
        pytest.skip(f"backend {backend} unavailable here")
    monkeypatch.setenv(registry.ENV_VAR, backend)
    logits = torch.randn(2, 7, 16, generator=gen).requires_grad_(True)
    scale = (torch.rand(16, generator=gen) + 0.5).requires_grad_(True)
    torch.library.opcheck(OPS["route_autograd"], (logits, 4, scale, renormalize))


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 4097, 65537])
@pytest.mark.parametrize("experts", [128, 96, 256])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "softmax-all"])
def test_gpu_gradients_large(gpu_target, gen, dtype, tokens, experts, renormalize, spread):
    _, device = gpu_target
    logits = torch.randn(tokens, experts, generator=gen).mul_(3).to(device, dtype)
    scale = (torch.rand(experts, generator=gen) + 0.5).to(device)
    grad = torch.randn(tokens, 8, generator=gen).to(device)
    _assert_gradients(logits, 8, scale, renormalize, grad)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "softmax-all"])
def test_gpu_scale_gradient_is_bitwise_deterministic(gpu_target, gen, renormalize, spread):
    _, device = gpu_target
    logits = torch.randn(262144, 128, generator=gen).to(device, torch.bfloat16).requires_grad_(True)
    scale = (torch.rand(128, generator=gen) + 0.5).to(device).requires_grad_(True)
    grad = torch.randn(262144, 8, generator=gen).to(device)
    results = []
    for _ in range(5):
        logits.grad = scale.grad = None
        weights, _ = g4route.route(logits, 8, scale, renormalize=renormalize)
        weights.backward(grad)
        results.append((logits.grad.clone(), scale.grad.clone()))
    for d_logits, d_scale in results[1:]:
        assert torch.equal(d_scale, results[0][1]), "the scale's gradient differs between runs"
        assert torch.equal(d_logits, results[0][0])


def test_gpu_backward_makes_no_float32_logits_sized_tensor(gpu_target, gen):
    """Peak memory of the backward: the bfloat16 gradient it returns, the small per-program partial sums,
    and nothing of [T, E] float32 size."""
    _, device = gpu_target
    if device.type != "cuda":
        pytest.skip("memory statistics of torch.cuda")
    T, E, K = 65536, 128, 8
    logits = torch.randn(T, E, generator=gen).to(device, torch.bfloat16).requires_grad_(True)
    scale = (torch.rand(E, generator=gen) + 0.5).to(device).requires_grad_(True)
    for renormalize in (True, False):
        logits.grad = scale.grad = None
        weights, _ = g4route.route(logits, K, scale, renormalize=renormalize)
        grad = torch.randn(T, K, device=device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        weights.backward(grad)
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - before
        assert extra < T * E * 2 + T * E * 4 // 2, f"backward peak {extra} bytes over its inputs"
