"""route() under torch.compile, torch.export and CUDA graphs; the g4route::route / route_out operators.

CPU tests compile with the ``aot_eager`` backend (Dynamo, fake tensors, AOTAutograd's functionalisation:
everything but code generation) and once with Inductor; the GPU tests (marker cuda) use Inductor,
``mode="reduce-overhead"`` and hand-captured CUDA graphs.
"""

from __future__ import annotations

import re

import pytest
import torch
from oracle import assert_routes_like_oracle
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import g4route
from g4route import api, kernel, registry

E, K = 64, 8
OPS = {"route": torch.ops.g4route.route.default, "route_out": torch.ops.g4route.route_out.default}


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    """No compiled code, counters or forced backend carried over between tests."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def _route_nodes(graph_module: torch.fx.GraphModule) -> list[object]:
    return [n.target for n in graph_module.graph.nodes if n.op == "call_function" and n.target in OPS.values()]


def _route(logits, scale):
    return g4route.route(logits, K, scale)


def _route_out(logits, scale, weights, ids):
    g4route.route(logits, K, scale, out=(weights, ids))
    return weights, ids


def _route_nd(logits, scale):
    weights, ids = g4route.route(logits, K, scale, renormalize=False)
    return weights * 2, ids


# ------------------------------------------------------------------------------------ torch.compile, CPU


@pytest.mark.parametrize("form", ["route", "route_out"])
def test_compiled_route_is_one_node_no_graph_break_no_recompile(gen, form):
    counter = CompileCounterWithBackend("aot_eager")
    fn = _route if form == "route" else _route_out
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    scale = torch.rand(E, generator=gen) + 0.5
    for tokens in (2, 5, 33, 300, 7):  # 0 and 1 are sizes Dynamo specialises on: see the next test
        logits = torch.randn(tokens, E, generator=gen).mul_(3)
        args = (logits, scale)
        if form == "route_out":
            args += (torch.full((tokens, K), float("nan")), torch.full((tokens, K), -1, dtype=torch.int32))
        weights, ids = compiled(*args)
        if form == "route_out":
            assert weights is args[2] and ids is args[3]
        expected = g4route.route(logits, K, scale)
        assert torch.equal(ids, expected[1]) and torch.equal(weights, expected[0])
        assert_routes_like_oracle((weights, ids), logits, K, scale)
    assert _graph_breaks() == 0
    assert counter.frame_count == 1, "a new token count recompiled the dynamic graph"
    assert _route_nodes(counter.graphs[0]) == [OPS[form]]
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_compiled_route_leading_dims_and_edge_token_counts(gen):
    compiled = torch.compile(_route_nd, fullgraph=True, dynamic=True, backend="aot_eager")
    scale = torch.rand(E, generator=gen) + 0.5
    for shape in ((3, 5, E), (2, 9, E), (0, E), (1, E), (4, 0, E)):
        logits = torch.randn(shape, generator=gen).to(torch.bfloat16)
        weights, ids = compiled(logits, scale)
        expected = g4route.route(logits, K, scale, renormalize=False)
        assert weights.shape == (*shape[:-1], K) and ids.dtype == torch.int32
        assert torch.equal(ids, expected[1]) and torch.equal(weights, expected[0] * 2)
    assert _graph_breaks() == 0


def test_inductor_writes_the_out_buffers_in_place(gen):
    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(_route_out, fullgraph=True, dynamic=True)
    logits = torch.randn(9, E, generator=gen)
    scale = torch.rand(E, generator=gen) + 0.5
    weights, ids = torch.empty(9, K), torch.empty(9, K, dtype=torch.int32)
    (got_w, got_ids), codes = run_and_get_code(compiled, logits, scale, weights, ids)
    assert got_w is weights and got_ids is ids
    assert_routes_like_oracle((weights, ids), logits, K, scale)
    code = "\n".join(codes)
    calls = re.findall(r"torch\.ops\.g4route\.route_out\.default\(([^)]*)\)", code)
    assert len(calls) == 1, code
    # The op is handed the caller's buffers (graph inputs), not copies written back afterwards.
    assert "copy_" not in code and "clone" not in code, code
    assert _graph_breaks() == 0


def test_compiled_route_reads_the_backend_override_when_it_runs(gen, monkeypatch):
    if registry.why_not(registry.get("interpreter"), torch.device("cpu"), E, K):
        pytest.skip("the interpreter backend needs Triton")
    launches = []
    real_launch = kernel.launch

    def counting_launch(*args, **kwargs):
        launches.append(kwargs.get("interpret"))
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(kernel, "launch", counting_launch)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_route, fullgraph=True, dynamic=True, backend=counter)
    logits = torch.randn(6, E, generator=gen)
    scale = torch.rand(E, generator=gen) + 0.5

    monkeypatch.setenv(registry.ENV_VAR, "torch")
    by_reference = compiled(logits, scale)
    assert launches == []
    monkeypatch.setenv(registry.ENV_VAR, "interpreter")
    by_kernel = compiled(logits, scale)
    assert launches == [True], "G4ROUTE_BACKEND=interpreter did not launch the interpreted kernel"
    assert torch.equal(by_kernel[1], by_reference[1])
    torch.testing.assert_close(by_kernel[0], by_reference[0], rtol=1e-6, atol=1e-7)
    assert_routes_like_oracle(by_kernel, logits, K, scale)

    # A backend that cannot run here fails when the graph runs, with route()'s message, not a stale choice.
    monkeypatch.setenv(registry.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=f"{registry.ENV_VAR}=cuda cannot route"):
        compiled(logits, scale)
    monkeypatch.setenv(registry.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        compiled(logits, scale)
    assert counter.frame_count == 1 and _graph_breaks() == 0


def test_bad_calls_are_refused_while_tracing(gen):
    logits = torch.randn(4, E, generator=gen)

    def too_many(x):
        return g4route.route(x, E + 1)

    with pytest.raises(ValueError, match=r"topk must be in \[1, E\]"):
        torch.compile(too_many, dynamic=True, backend="aot_eager")(logits)
    # fullgraph=True: Dynamo reports the exception it observed, with route()'s message in it.
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"topk must be in \[1, E\]"):
        torch.compile(too_many, fullgraph=True, dynamic=True, backend="aot_eager")(logits)
    torch._dynamo.reset()
    out = (torch.empty(4, K), torch.empty(4, K, dtype=torch.int32))
    with pytest.raises(TypeError, match="out= cannot be used while gating_output or per_expert_scale requires grad"):
        torch.compile(_route_out, dynamic=True, backend="aot_eager")(logits.requires_grad_(True), None, *out)


# ------------------------------------------------------------------------- export, fake tensors, opcheck


def test_export_with_a_dynamic_token_count(gen):
    class Router(torch.nn.Module):
        def forward(self, logits, scale):
            return g4route.route(logits, K, scale)

    scale = torch.rand(E, generator=gen) + 0.5
    tokens = torch.export.Dim("tokens")
    exported = torch.export.export(Router(), (torch.randn(6, E, generator=gen), scale),
                                   dynamic_shapes=({0: tokens}, None))
    assert _route_nodes(exported.graph_module) == [OPS["route"]]
    logits = torch.randn(40, E, generator=gen)
    weights, ids = exported.module()(logits, scale)
    assert_routes_like_oracle((weights, ids), logits, K, scale)


def test_route_under_fake_tensor_mode_computes_only_shapes():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(3, 5, E, dtype=torch.bfloat16)
        weights, ids = g4route.route(logits, K, torch.empty(E))
        out = (torch.empty(3, 5, K), torch.empty(3, 5, K, dtype=torch.int32))
        returned = g4route.route(logits, K, out=out)
    assert isinstance(weights, FakeTensor) and weights.shape == (3, 5, K) and ids.dtype == torch.int32
    assert returned[0] is out[0] and returned[1] is out[1]


_OPCHECK_CASES = {
    "2d-scale-renorm": lambda g: (torch.randn(7, E, generator=g), torch.rand(E, generator=g) + 0.5, True),
    "3d-bf16-softmax-all": lambda g: (torch.randn(2, 5, E, generator=g).bfloat16(), None, False),
    "strided-fp16-half-scale": lambda g: (torch.randn(9, 3 * E, generator=g)[:, ::3].half(),
                                          torch.rand(E, generator=g).half(), True),
    "no-tokens": lambda g: (torch.randn(0, E, generator=g), torch.rand(E, generator=g), True),
}


@pytest.mark.parametrize("backend", ["torch", "interpreter"])
@pytest.mark.parametrize("case", list(_OPCHECK_CASES))
@pytest.mark.parametrize("form", ["route", "route_out"])
def test_opcheck(gen, monkeypatch, form, case, backend):
    if registry.why_not(registry.get(backend), torch.device("cpu"), E, K):
        pytest.skip(f"backend {backend} unavailable here")
    monkeypatch.setenv(registry.ENV_VAR, backend)
    logits, scale, renormalize = _OPCHECK_CASES[case](gen)
    args = (logits, K, scale, renormalize)
    if form == "route_out":
        lead = logits.shape[:-1]
        args += (torch.empty(*lead, K), torch.empty(*lead, K, dtype=torch.int32))
    torch.library.opcheck(OPS[form], args)


def test_out_buffer_view_check_agrees_with_torch(gen):
    """route() decides from strides whether an out buffer's rows flatten as a view (so tracing needs no
    try/except); that decision must be exactly torch's view rule."""
    storage = torch.empty(4096)
    for _ in range(400):
        ndim = int(torch.randint(3, 5, (), generator=gen))
        sizes = torch.randint(0, 4, (ndim,), generator=gen).tolist()
        sizes[-1] = max(sizes[-1], 1)  # K >= 1
        strides = torch.randint(0, 40, (ndim,), generator=gen).tolist()
        if torch.rand((), generator=gen) < 0.5:  # make some of them nest
            strides[-1] = 1
            for d in range(ndim - 2, -1, -1):
                strides[d] = strides[d + 1] * max(sizes[d + 1], 1)
        tensor = storage.as_strided(sizes, strides)
        try:
            tensor.view(-1, sizes[-1])
            flattens = True
        except RuntimeError:
            flattens = False
        assert api._rows_flatten_as_view(tensor) == flattens, (sizes, strides)


# ------------------------------------------------------------------------------------------- GPU (cuda)


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no GPU visible to torch.cuda")
    return torch.device("cuda", 0)


@pytest.mark.cuda
def test_cuda_compiled_route_matches_eager(cuda):
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(_route_nd, fullgraph=True, dynamic=True, backend=counter)
    scale = torch.rand(128, device=cuda) + 0.5
    for tokens in (3, 64, 4097, 70000):
        logits = torch.randn(tokens, 128, device=cuda, dtype=torch.bfloat16)
        weights, ids = compiled(logits, scale)
        expected = g4route.route(logits, K, scale, renormalize=False)
        assert torch.equal(ids, expected[1]) and torch.equal(weights, expected[0] * 2)
    assert counter.frame_count == 1 and _graph_breaks() == 0


@pytest.mark.cuda
def test_cuda_graph_capture_of_the_compiled_route(cuda):
    """torch.compile(mode="reduce-overhead") (CUDA graph trees) and a compiled call captured by hand."""
    scale = torch.rand(128, device=cuda) + 0.5
    weights = torch.empty(64, K, device=cuda)
    ids = torch.empty(64, K, dtype=torch.int32, device=cuda)
    logits = torch.randn(64, 128, device=cuda)
    reduce_overhead = torch.compile(_route, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up, recording, then replays
        logits.copy_(torch.randn(64, 128, device=cuda))
        result = reduce_overhead(logits, scale)
        assert_routes_like_oracle(result, logits, K, scale)
    compiled_out = torch.compile(_route_out, fullgraph=True)
    stream = torch.cuda.Stream(cuda)
    stream.wait_stream(torch.cuda.current_stream(cuda))
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile and warm up outside the capture
            compiled_out(logits, scale, weights, ids)
    torch.cuda.current_stream(cuda).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        compiled_out(logits, scale, weights, ids)
    for _ in range(3):
        logits.copy_(torch.randn(64, 128, device=cuda))
        weights.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize(cuda)
        assert_routes_like_oracle((weights, ids), logits, K, scale)


@pytest.mark.cuda
def test_cuda_graph_capture_of_the_op(cuda):
    logits = torch.randn(33, 128, device=cuda, dtype=torch.bfloat16)
    scale = torch.rand(128, device=cuda) + 0.5
    weights = torch.empty(33, K, device=cuda)
    ids = torch.empty(33, K, dtype=torch.int32, device=cuda)
    OPS["route_out"](logits, K, scale, True, weights, ids)  # compile the kernel outside the capture
    torch.cuda.synchronize(cuda)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        OPS["route_out"](logits, K, scale, True, weights, ids)
    for _ in range(3):
        logits.copy_(torch.randn(33, 128, device=cuda))
        graph.replay()
        torch.cuda.synchronize(cuda)
        assert_routes_like_oracle((weights, ids), logits, K, scale)


def _allocations(device) -> tuple[int, int]:
    """(allocation requests so far, bytes allocated now) of the caching allocator."""
    stats = torch.cuda.memory_stats(device)
    return stats.get("allocation.all.allocated", 0), torch.cuda.memory_allocated(device)


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["route(out=)", "route(out=) 3-d", "op", "compiled"])
def test_cuda_out_path_allocates_nothing(cuda, path):
    tokens = 4096
    three_d = path.endswith("3-d")
    logits = torch.randn(tokens, 128, device=cuda, dtype=torch.bfloat16)
    scale = torch.rand(128, device=cuda) + 0.5
    weights = torch.empty(tokens, K, device=cuda)
    ids = torch.empty(tokens, K, dtype=torch.int32, device=cuda)
    if three_d:
        logits, weights, ids = logits.view(64, 64, 128), weights.view(64, 64, K), ids.view(64, 64, K)
    if path == "op":
        call = lambda: OPS["route_out"](logits, K, scale, True, weights, ids)  # noqa: E731
    elif path == "compiled":
        compiled = torch.compile(_route_out, fullgraph=True, dynamic=True)
        call = lambda: compiled(logits, scale, weights, ids)  # noqa: E731
    else:
        call = lambda: g4route.route(logits, K, scale, out=(weights, ids))  # noqa: E731
    for _ in range(3):  # warm-up: Triton compiles, Inductor compiles, the allocator settles
        call()
    torch.cuda.synchronize(cuda)
    torch.cuda.reset_peak_memory_stats(cuda)
    requests, allocated = _allocations(cuda)
    for _ in range(10):
        call()
    torch.cuda.synchronize(cuda)
    requests_after, allocated_after = _allocations(cuda)
    assert requests_after == requests, f"{path}: {requests_after - requests} allocations in 10 calls"
    assert allocated_after == allocated
    assert torch.cuda.max_memory_allocated(cuda) == allocated, f"{path}: a temporary was allocated"
    assert_routes_like_oracle((weights, ids), logits, K, scale)
