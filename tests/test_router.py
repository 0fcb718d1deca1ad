"""The fused router (``g4route.router``) against a float64 oracle of Gemma 4's whole router.

What is asserted, on fresh random inputs, on every target (``torch`` and ``interpreter`` on the CPU, the
GPU backends under their markers):

- each logit is within ``router.logit_error_bound`` of the oracle's (``return_logits=True``);
- the chosen experts are exactly ``route()`` applied to those logits (same order, same tie rule), and the
  weights are ``route()``'s to float32 rounding;
- the chosen experts are the oracle's wherever the oracle's K-th place gap exceeds twice the bound, and
  the weights are within the relative tolerance the bound gives.
"""

from __future__ import annotations

import pytest
import torch

import g4route
from g4route import configs, registry, router_kernel
from g4route.router import folded_weight, logit_error_bound, router_torch
from g4route.router_kernel import RouterConfig

EPS = 1e-6


def oracle_logits(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, eps: float = EPS):
    """Gemma 4's router logits in float64: RMSNorm without weight, times scale and H**-0.5, projection."""
    xd = x.double()
    H = x.shape[-1]
    normed = xd * torch.rsqrt((xd * xd).mean(-1, keepdim=True) + eps)
    if scale is not None:
        normed = normed * scale.double()
    return (normed * H**-0.5) @ weight.double().T


def _inputs(gen, T, H, E, dtype, device, spread=1.0):
    x = (torch.randn(T, H, generator=gen) * spread).to(dtype).to(device)
    weight = (torch.randn(E, H, generator=gen) * H**-0.5).to(dtype).to(device)
    scale = (torch.rand(H, generator=gen) + 0.5).to(device)
    pes = (torch.rand(E, generator=gen) + 0.5).to(device)
    return x, weight, scale, pes


def assert_router_matches_oracle(x, weight, topk, scale, pes, renormalize=True, eps=EPS):
    weights, ids, logits = g4route.router(x, weight, topk, scale=scale, per_expert_scale=pes, eps=eps,
                                          renormalize=renormalize, return_logits=True)
    E = weight.shape[0]
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and logits.dtype == torch.float32
    assert ids.shape == (*x.shape[:-1], topk) and logits.shape == (*x.shape[:-1], E)
    oracle = oracle_logits(x.cpu(), weight.cpu(), None if scale is None else scale.cpu(), eps).reshape(-1, E)
    bound = logit_error_bound(x.cpu(), weight.cpu(), None if scale is None else scale.cpu(), eps).reshape(-1, E)
    # route() on the same device (G4ROUTE_BACKEND names the target's backend), before moving to the CPU.
    want_w, want_ids = g4route.route(logits.reshape(-1, E), topk, pes, renormalize=renormalize)
    want_w, want_ids = want_w.cpu(), want_ids.cpu()
    logits, ids, weights = logits.cpu().reshape(-1, E), ids.cpu().reshape(-1, topk), weights.cpu().reshape(-1, topk)

    # 1. The logits, within the stated bound.
    err = (logits.double() - oracle).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"a logit is {worst:.3g}x the stated bound away from the oracle"

    # 2. The selection is route()'s on these logits, exactly (ids) and to rounding (weights).
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=2e-6, atol=1e-7)

    # 3. Against the oracle: the same experts where the K-th place gap clears twice the bound.
    top = oracle.topk(min(topk + 1, E), dim=-1)
    delta = bound.amax(-1)
    clear = torch.ones_like(delta, dtype=torch.bool) if topk == E else \
        (top.values[:, topk - 1] - top.values[:, topk]) > 2 * delta
    assert torch.equal(ids[clear].long().sort(-1).values, top.indices[clear, :topk].sort(-1).values)
    # ... and weights within the relative tolerance those logit errors allow, where the set is the oracle's.
    chosen = oracle.gather(-1, ids.long())
    ref = torch.softmax(chosen, -1) if renormalize else torch.softmax(oracle, -1).gather(-1, ids.long())
    if pes is not None:
        ref = ref * pes.cpu().double()[ids.long()]
    tol = (torch.exp(2 * delta) - 1 + 1e-6)[:, None] * ref.abs() + 1e-7
    same = clear[:, None].expand_as(ref)
    assert bool(((weights.double() - ref).abs() <= tol)[same].all())
    return clear.float().mean().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 256, 128, 8), (37, 200, 100, 6), (70, 2816, 128, 8), (20, 64, 16, 16)],
                         ids=lambda s: "T{}-H{}-E{}-K{}".format(*s))
def test_router_against_the_oracle(target, gen, dtype, shape):
    _, device = target
    T, H, E, K = shape
    x, weight, scale, pes = _inputs(gen, T, H, E, dtype, device)
    assert_router_matches_oracle(x, weight, K, scale, pes)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "softmax-all"])
def test_router_options(target, gen, renormalize):
    _, device = target
    x, weight, scale, pes = _inputs(gen, 33, 96, 24, torch.bfloat16, device)
    assert_router_matches_oracle(x, weight, 4, scale, pes, renormalize=renormalize)
    assert_router_matches_oracle(x, weight, 4, None, None, renormalize=renormalize, eps=1e-3)


def test_router_batched_strided_and_out(target, gen):
    _, device = target
    x, weight, scale, pes = _inputs(gen, 60, 128, 32, torch.bfloat16, device)
    wide = torch.cat([x, x], dim=1).view(3, 20, 256)[..., ::2]  # strided rows, leading dims
    assert_router_matches_oracle(wide, weight, 5, scale, pes)
    assert_router_matches_oracle(wide, weight, 5, scale, torch.stack([pes, -pes], 1)[:, 0])  # a strided scale
    w, i, lg = g4route.router(wide, weight, 5, scale=scale, per_expert_scale=pes, return_logits=True)
    out = (torch.empty(3, 20, 5, device=device), torch.empty(3, 20, 5, dtype=torch.int32, device=device),
           torch.empty(3, 20, 32, device=device))
    got = g4route.router(wide, weight, 5, scale=scale, per_expert_scale=pes, return_logits=True, out=out)
    assert all(a is b for a, b in zip(got, out, strict=True))
    assert torch.equal(out[1], i) and torch.equal(out[0], w) and torch.equal(out[2], lg)
    w2, i2 = g4route.router(wide, weight, 5, scale=scale, per_expert_scale=pes)
    assert torch.equal(i2, i) and torch.equal(w2, w)


def test_router_second_launch_shapes(target, gen):
    """The split router's second launch routes one row a program up to 256 tokens and four above
    (router_kernel.reduce_shape): both shapes, and a last program with rows past T, match the oracle.
    H = 256 spans several hidden slices, so the launch splits (the interpreter's table splits in two)."""
    _, device = target
    for tokens in (3, 257, 301):
        x, weight, scale, pes = _inputs(gen, tokens, 256, 16, torch.bfloat16, device)
        assert_router_matches_oracle(x, weight, 4, scale, pes)


def test_router_edge_rows(target, gen):
    """A zero row (every logit 0: ids 0..K-1, equal weights), a NaN row (NaN weights, ids in range), huge and
    tiny magnitudes (the norm makes the logits scale-free)."""
    _, device = target
    x, weight, scale, pes = _inputs(gen, 6, 64, 16, torch.float32, device)
    x[0] = 0
    x[1, 3] = float("nan")
    x[2] *= 1e15  # its sum of squares (1e30 * H) stays finite in float32, as in Transformers
    x[3] *= 1e-30
    w, i, lg = g4route.router(x, weight, 4, scale=scale, return_logits=True)
    assert torch.equal(i[0].cpu(), torch.arange(4, dtype=torch.int32))
    torch.testing.assert_close(w[0].cpu(), torch.full((4,), 0.25))
    assert bool(torch.isnan(w[1]).all()) and bool(((i[1] >= 0) & (i[1] < 16)).all())
    assert bool(torch.isfinite(lg[2]).all()) and bool(torch.isfinite(lg[3]).all())
    assert_router_matches_oracle(x[2:], weight, 4, scale, pes)


def test_router_with_ties_follows_the_tie_rule(target, gen):
    """Duplicate expert rows in the weight give exactly equal logits: the lower id comes first, as route()."""
    _, device = target
    x, weight, scale, pes = _inputs(gen, 40, 64, 16, torch.bfloat16, device)
    weight[8:] = weight[:8]
    _w, i, lg = g4route.router(x, weight, 6, scale=scale, per_expert_scale=pes, return_logits=True)
    assert torch.equal(lg[:, 8:], lg[:, :8])
    _want_w, want_i = g4route.route(lg, 6, pes)
    assert torch.equal(i, want_i)


def test_router_refuses_bad_calls(gen):
    x, weight, _scale, pes = _inputs(gen, 4, 32, 8, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"proj_weight must have shape \[E, H\]"):
        g4route.router(x, weight.T, 2)
    with pytest.raises(TypeError, match="must share a dtype"):
        g4route.router(x, weight.float(), 2)
    with pytest.raises(ValueError, match="topk"):
        g4route.router(x, weight, 9)
    with pytest.raises(ValueError, match=r"scale must have shape \[H\]"):
        g4route.router(x, weight, 2, scale=pes)
    with pytest.raises(ValueError, match="eps"):
        g4route.router(x, weight, 2, eps=-1.0)
    with pytest.raises(TypeError, match="out must be"):
        g4route.router(x, weight, 2, return_logits=True, out=(torch.empty(4, 2), torch.empty(4, 2, dtype=torch.int32)))
    with pytest.raises(TypeError, match="no backward"):
        g4route.router(x, weight.clone().requires_grad_(), 2)
    with torch.no_grad():
        g4route.router(x, weight.clone().requires_grad_(), 2)


def test_forced_kernel_backend_past_the_fused_limits_says_so(gen, monkeypatch):
    x, weight, _, _ = _inputs(gen, 2, 16, router_kernel.MAX_EXPERTS + 1, torch.float32, torch.device("cpu"))
    monkeypatch.setenv(registry.ENV_VAR, "interpreter")
    with pytest.raises(ValueError, match="cannot run the fused router"):
        g4route.router(x, weight, 2)
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    assert_router_matches_oracle(x, weight, 2, None, None)


@pytest.mark.parametrize("config", [RouterConfig(16, 32, 1, 4, 1), RouterConfig(32, 16, 3, 4, 1),
                                    RouterConfig(16, 64, 8, 4, 1)], ids=["no-split", "split3", "split-clamped"])
@pytest.mark.parametrize("precise_norm", [True, False], ids=["precise-norm", "fast-norm"])
@pytest.mark.parametrize("squares_by_dot", [True, False], ids=["squares-dot", "squares-elementwise"])
def test_interpreted_launch_shapes_agree(gen, config, precise_norm, squares_by_dot):
    """Every launch shape, split or not, gives the same ids and the logits within the bound, with the norm's
    sqrt and division correctly rounded or not (``precise_norm``, Intel's table turns it off), and the sums
    of squares from ``x @ x.T`` (NVIDIA's table; not where block_t > block_h, "split3") or elementwise."""
    x, weight, scale, pes = _inputs(gen, 35, 200, 24, torch.bfloat16, torch.device("cpu"))
    shape = (35, 3)
    w, i = torch.empty(shape), torch.empty(shape, dtype=torch.int32)
    lg = torch.empty(35, 24)
    router_kernel.launch(x, folded_weight(weight, scale), 3, pes, EPS, True, w, i, lg, config, interpret=True,
                         precise_norm=precise_norm, squares_by_dot=squares_by_dot)
    oracle = oracle_logits(x, weight, scale)
    assert bool(((lg.double() - oracle).abs() <= logit_error_bound(x, weight, scale)).all())
    want_w, want_i = g4route.route(lg, 3, pes)
    assert torch.equal(i, want_i)
    torch.testing.assert_close(w, want_w, rtol=2e-6, atol=1e-7)


def test_torch_reference_rounds_where_the_kernel_does(gen):
    """router_torch rounds W * scale once to bfloat16, as the kernel's operand is: its logits and the
    interpreter's agree to float32 accumulation order."""
    x, weight, scale, pes = _inputs(gen, 24, 96, 16, torch.bfloat16, torch.device("cpu"))
    _, _, ref = router_torch(x, weight, 4, scale, pes, EPS, True)
    import os
    old = os.environ.get(registry.ENV_VAR)
    os.environ[registry.ENV_VAR] = "interpreter"
    try:
        _, _, lg = g4route.router(x, weight, 4, scale=scale, per_expert_scale=pes, return_logits=True)
    finally:
        os.environ.pop(registry.ENV_VAR) if old is None else os.environ.__setitem__(registry.ENV_VAR, old)
    torch.testing.assert_close(lg, ref, rtol=1e-5, atol=1e-6)


def test_folded_weight_is_kept_until_an_input_changes(gen):
    _, weight, scale, _ = _inputs(gen, 1, 32, 8, torch.bfloat16, torch.device("cpu"))
    first = folded_weight(weight, scale)
    assert torch.equal(first, (weight.float() * scale).to(torch.bfloat16))
    assert folded_weight(weight, scale) is first
    scale.mul_(2)  # in place: a new version
    second = folded_weight(weight, scale)
    assert second is not first and torch.equal(second, (weight.float() * scale).to(torch.bfloat16))
    weight.add_(1)
    assert torch.equal(folded_weight(weight, scale), (weight.float() * scale).to(torch.bfloat16))
    assert folded_weight(weight, None) is weight


def test_router_table_rows_parse_and_cover_every_t():
    for vendor in ("cuda", "rocm", "xpu", "interpreter"):
        table = configs.load_table(vendor)
        for family in (*table.families, table.default):
            for t in (1, 16, 256, 4096, 65536, 262144):
                for dtype in (torch.float32, torch.bfloat16):
                    config = table.router_config_for(family, t, dtype)
                    assert config.block_t >= 16 and config.block_h >= 16


def test_router_table_errors_name_the_row():
    bad = '[default]\nbuckets = [{ rows_per_program = 1, num_warps = 1 }]\nrouter = [{ block_t = 8, block_h = 64, ' \
          'num_warps = 4 }]\n'
    with pytest.raises(ValueError, match=r"router 0: block_t and block_h must be at least 16"):
        configs.parse_table(bad, "x.toml")


def test_float32_dot_must_be_a_known_precision():
    table = '[default]\nbuckets = [{ rows_per_program = 1, num_warps = 1 }]\n'
    assert configs.parse_table(table, "x.toml").float32_dot == "tf32x3"
    with pytest.raises(ValueError, match="float32_dot must be one of"):
        configs.parse_table('float32_dot = "tf32"\n' + table, "x.toml")
    assert {configs.load_table(v).float32_dot for v in ("cuda", "rocm", "xpu")} == {"tf32x3", "bf16x6", "ieee"}


def test_compiled_router_is_one_node(gen, monkeypatch):
    """torch.compile(fullgraph=True) traces router() as the g4route::router operator, dynamic T included."""
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    x, weight, scale, pes = _inputs(gen, 9, 64, 16, torch.bfloat16, torch.device("cpu"))

    @torch.compile(fullgraph=True, dynamic=True, backend="eager")
    def f(h):
        return g4route.router(h, weight, 4, scale=scale, per_expert_scale=pes)

    for t in (9, 5):
        w, i = f(x[:t])
        ew, ei = g4route.router(x[:t], weight, 4, scale=scale, per_expert_scale=pes)
        assert torch.equal(i, ei) and torch.equal(w, ew)


def test_opcheck_router(gen):
    x, weight, scale, pes = _inputs(gen, 7, 32, 8, torch.bfloat16, torch.device("cpu"))
    torch.library.opcheck(torch.ops.g4route.router.default, (x, weight, 3, scale, pes, EPS, True, True))
    out = (torch.empty(7, 3), torch.empty(7, 3, dtype=torch.int32), torch.empty(7, 8))
    torch.library.opcheck(torch.ops.g4route.router_out.default, (x, weight, 3, scale, pes, EPS, True, *out))


# ------------------------------------------------------------------------------------------ GPU only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens", [1, 5, 16, 100, 256, 1000, 4096, 20000, 65536])
def test_gpu_router_every_bucket(gpu_target, gen, dtype, tokens):
    """Gemma 4's shape at every T of the tuned table (split and unsplit launches) against the oracle."""
    _, device = gpu_target
    x, weight, scale, pes = _inputs(gen, tokens, 2816, 128, dtype, device)
    share = assert_router_matches_oracle(x, weight, 8, scale, pes)
    if tokens >= 1000:  # the bound excuses only near-ties: most rows are checked against the oracle
        assert share > 0.5


def test_gpu_router_is_bitwise_reproducible_and_graph_safe(gpu_target, gen):
    """Split launches add their partials in a fixed order: repeats are bitwise equal, eager and in a CUDA
    graph replayed several times (no state outlives a launch)."""
    _, device = gpu_target
    for tokens in (3, 200, 3000):
        x, weight, scale, pes = _inputs(gen, tokens, 2816, 128, torch.bfloat16, device)
        first = g4route.router(x, weight, 8, scale=scale, per_expert_scale=pes, return_logits=True)
        for _ in range(3):
            again = g4route.router(x, weight, 8, scale=scale, per_expert_scale=pes, return_logits=True)
            assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        out = tuple(torch.empty_like(t) for t in first)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            g4route.router(x, weight, 8, scale=scale, per_expert_scale=pes, return_logits=True, out=out)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g4route.router(x, weight, 8, scale=scale, per_expert_scale=pes, return_logits=True, out=out)
        for _ in range(3):
            for t in out:
                t.zero_()
            graph.replay()
            torch.cuda.synchronize(device)
            assert all(torch.equal(a, b) for a, b in zip(first, out, strict=True))


def test_gpu_router_under_torch_compile(gpu_target, gen):
    _, device = gpu_target
    x, weight, scale, pes = _inputs(gen, 300, 2816, 128, torch.bfloat16, device)
    f = torch.compile(lambda h: g4route.router(h, weight, 8, scale=scale, per_expert_scale=pes), fullgraph=True)
    w, i = f(x)
    ew, ei = g4route.router(x, weight, 8, scale=scale, per_expert_scale=pes)
    assert torch.equal(i, ei) and torch.equal(w, ew)
