"""Device placement and streams: route() runs on its tensors' device and on that device's current stream,
whatever device is current, on both launch paths (Triton's ``kernel[grid]`` and ``launcher.DirectLauncher``).

- The stream tests need one GPU (``cuda`` marker, ``nox -s test-cuda``).
- The ``multigpu`` tests need two (``nox -s test-cuda`` runs them where ``torch.cuda.device_count() >= 2``
  and skips them, saying so, elsewhere). Each makes ``cuda:0`` current and routes tensors on ``cuda:1``:
  what a Transformers model spread over GPUs (``device_map="auto"``) does on every layer past the first GPU.

ROCm builds take the same code path (``torch.cuda`` calls answered by HIP); these tests carry the ``cuda``
marker only because the direct launcher, one of the two paths, exists only on NVIDIA.
"""

from __future__ import annotations

import threading

import pytest
import torch
from oracle import assert_routes_like_oracle

import g4route
from g4route import kernel, registry

_NEEDS_CUDA = "no NVIDIA GPU visible (torch.cuda.is_available() is False or not a CUDA build)"


def _cuda_ok() -> bool:
    return torch.cuda.is_available() and torch.version.cuda is not None


def _two_gpus_reason() -> str:
    if not _cuda_ok():
        return _NEEDS_CUDA
    return f"needs two GPUs, this machine has {torch.cuda.device_count()}"


def _marked(*marks):
    def apply(test):
        for mark in marks:
            test = mark(test)
        return test

    return apply


needs_cuda = _marked(pytest.mark.cuda, pytest.mark.skipif(not _cuda_ok(), reason=_NEEDS_CUDA))
needs_two_gpus = _marked(pytest.mark.cuda, pytest.mark.multigpu,
                         pytest.mark.skipif(not _cuda_ok() or torch.cuda.device_count() < 2,
                                            reason=_two_gpus_reason()))


@pytest.fixture(params=["direct", "triton"])
def launch_path(request, monkeypatch):
    """Which launch path route() takes: the kept launchers of DirectLauncher, or Triton's own dispatch."""
    monkeypatch.setenv(registry.ENV_VAR, "cuda")
    if request.param == "triton":
        monkeypatch.setattr(kernel, "_direct", None)
    elif kernel._direct is None:
        pytest.skip("the direct launcher is off for this Triton")
    return request.param


@pytest.fixture
def first_gpu_current():
    """cuda:0 is the current device for the test, and is again afterwards whatever the test did."""
    torch.cuda.set_device(0)
    yield
    torch.cuda.set_device(0)


def _logits(tokens: int, dtype: torch.dtype, device, gen, experts: int = 128) -> torch.Tensor:
    return torch.randn(tokens, experts, generator=gen).mul_(3).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------ streams


def _busy(stream: torch.cuda.Stream, device) -> None:
    """Keep ``stream`` busy for a while (a spin kernel), so work queued behind it cannot have run yet."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(500_000_000)  # cycles: about a quarter of a second at 2 GHz


def _assert_ran_on(stream: torch.cuda.Stream, route_call, out, logits, device) -> None:
    """``route_call`` (queued behind a busy ``stream``) wrote ``out`` on ``stream``: invisible to another
    stream until the busy work ends, then right."""
    weights, ids = out
    ids.fill_(-1)
    weights.fill_(float("nan"))
    torch.cuda.synchronize(device)
    _busy(stream, device)
    route_call()
    # Read on the device's default stream, which does not wait for `stream`.
    early = ids.to("cpu")
    still_busy = not stream.query()
    assert still_busy, "the spin kernel ended before the check: the test proves nothing (make it longer)"
    assert bool((early == -1).all()), "the outputs were written before the busy stream got to the kernel"
    stream.synchronize()
    assert_routes_like_oracle(out, logits, 8)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_runs_on_the_current_stream(launch_path, dtype, gen):
    device = torch.device("cuda", torch.cuda.current_device())
    logits = _logits(300, dtype, device, gen)
    out = (torch.empty(300, 8, device=device), torch.empty(300, 8, dtype=torch.int32, device=device))
    g4route.route(logits, 8, out=out)  # the first call compiles (and, on the direct path, keeps the launcher)
    side = torch.cuda.Stream(device)

    def on_side_stream():
        with torch.cuda.stream(side):
            g4route.route(logits, 8, out=out)

    _assert_ran_on(side, on_side_stream, out, logits, device)


# ---------------------------------------------------------------------------------------- multi-GPU


@needs_two_gpus
@pytest.mark.parametrize("tokens", [1, 300, 70000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_route_on_the_second_gpu_with_the_first_current(launch_path, first_gpu_current, dtype, tokens, gen):
    device = torch.device("cuda", 1)
    logits = _logits(tokens, dtype, device, gen)
    scale = (torch.rand(128, generator=gen) + 0.5).to(device)
    for _ in range(2):  # the second call takes the kept launcher on the direct path
        weights, ids = g4route.route(logits, 8, scale)
        assert weights.device == device and ids.device == device
        assert torch.cuda.current_device() == 0, "route() left another device current"
        assert_routes_like_oracle((weights, ids), logits, 8, scale)


@needs_two_gpus
def test_out_buffers_on_the_second_gpu(launch_path, first_gpu_current, gen):
    device = torch.device("cuda", 1)
    logits = _logits(4096, torch.bfloat16, device, gen).view(2, 2048, 128)
    out = (torch.empty(2, 2048, 8, device=device), torch.empty(2, 2048, 8, dtype=torch.int32, device=device))
    for _ in range(2):
        assert g4route.route(logits, 8, out=out) is not None
        assert_routes_like_oracle(out, logits, 8)
    assert torch.cuda.current_device() == 0


@needs_two_gpus
def test_both_gpus_in_turn_keep_separate_launchers(launch_path, first_gpu_current, gen):
    """The same shapes on cuda:0 and cuda:1, alternating: a kept launcher is good for one device only."""
    inputs = [_logits(64, torch.float32, torch.device("cuda", i), gen) for i in (0, 1)]
    for _ in range(3):
        for logits in inputs:
            assert_routes_like_oracle(g4route.route(logits, 8), logits, 8)


@needs_two_gpus
def test_stream_of_the_tensors_device_not_of_the_current_one(launch_path, first_gpu_current, gen):
    """cuda:1's current stream is a busy side stream while cuda:0 is current: the kernel must queue on
    that stream (the tensors' device's current stream), not on cuda:0's nor on cuda:1's default."""
    device = torch.device("cuda", 1)
    logits = _logits(300, torch.float32, device, gen)
    out = (torch.empty(300, 8, device=device), torch.empty(300, 8, dtype=torch.int32, device=device))
    g4route.route(logits, 8, out=out)
    side = torch.cuda.Stream(device)
    previous = torch.cuda.current_stream(device)
    torch.cuda.set_stream(side)  # also makes cuda:1 current ...
    torch.cuda.set_device(0)  # ... so make cuda:0 current again; cuda:1 keeps `side` as its current stream
    try:
        assert torch.cuda.current_stream(device) == side and torch.cuda.current_device() == 0
        with torch.cuda.device(1):
            default_1 = torch.cuda.default_stream(device)
        # The check reads on cuda:1's default stream (ids.to("cpu") runs on the current stream of the
        # tensor's device, which is `side` now): read through an explicit stream context instead.
        ids = out[1]
        ids.fill_(-1)
        torch.cuda.synchronize(device)
        _busy(side, device)
        g4route.route(logits, 8, out=out)
        with torch.cuda.stream(default_1):
            early = ids.to("cpu")
        torch.cuda.set_device(0)
        assert not side.query(), "the spin kernel ended before the check: the test proves nothing"
        assert bool((early == -1).all()), "the kernel did not queue on cuda:1's current stream"
        side.synchronize()
        assert_routes_like_oracle(out, logits, 8)
    finally:
        torch.cuda.set_stream(previous)
        torch.cuda.set_device(0)


@needs_two_gpus
def test_graph_captured_on_the_second_gpu(launch_path, first_gpu_current, gen):
    device = torch.device("cuda", 1)
    logits = _logits(64, torch.float32, device, gen)
    scale = (torch.rand(128, generator=gen) + 0.5).to(device)
    out = (torch.empty(64, 8, device=device), torch.empty(64, 8, dtype=torch.int32, device=device))
    g4route.route(logits, 8, scale, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    # The capture stream is cuda:1's; inside, cuda:0 is made current again: the launch must still go to
    # cuda:1's current stream, the capturing one (a launch elsewhere would not be in the graph).
    with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)), torch.cuda.device(0):
        g4route.route(logits, 8, scale, out=out)
    assert torch.cuda.current_device() == 0
    for _ in range(3):
        logits.copy_(_logits(64, torch.float32, device, gen))
        out[1].fill_(-1)
        graph.replay()
        torch.cuda.synchronize(device)
        assert_routes_like_oracle(out, logits, 8, scale)


@needs_two_gpus
def test_compiled_function_on_the_second_gpu(first_gpu_current, gen, monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "cuda")
    device = torch.device("cuda", 1)
    proj = torch.randn(128, 64, generator=gen).to(device)
    scale = (torch.rand(128, generator=gen) + 0.5).to(device)

    @torch.compile(fullgraph=True, dynamic=True)
    def route_tokens(hidden):
        return g4route.route(hidden @ proj.T, 8, scale)

    torch._dynamo.reset()
    try:
        for tokens in (3, 300, 5000):
            hidden = torch.randn(tokens, 64, generator=gen).to(device)
            weights, ids = route_tokens(hidden)
            assert ids.device == device and torch.cuda.current_device() == 0
            assert_routes_like_oracle((weights, ids), hidden @ proj.T, 8, scale)
    finally:
        torch._dynamo.reset()


@needs_two_gpus
def test_threads_each_on_its_own_gpu_at_once(launch_path, first_gpu_current):
    """One thread per GPU, started together, each routing its own tensors many times (first calls,
    compiles included, at the same moment): every result right, on the right device."""
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            device = torch.device("cuda", index)
            gen = torch.Generator().manual_seed(1000 + index)
            shapes = ((17, torch.float32, 96), (300, torch.bfloat16, 128), (2048, torch.float16, 64))
            cases = [_logits(t, dtype, device, gen, experts=e) for t, dtype, e in shapes]
            barrier.wait()
            for _ in range(20):
                for logits in cases:
                    weights, ids = g4route.route(logits, 8)
                    assert ids.device == device
                    assert_routes_like_oracle((weights, ids), logits, 8)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@needs_two_gpus
def test_transformers_model_split_over_two_gpus(first_gpu_current, gen, monkeypatch):
    """A tiny random Gemma 4 MoE model with its layers on cuda:0 and cuda:1 (as device_map="auto" would
    place them), patched with patch_gemma4: the same expert ids as unpatched, and the same logits."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    modeling = pytest.importorskip("transformers.models.gemma4.modeling_gemma4",
                                   reason="transformers with Gemma 4 is not installed")
    from g4route.adapters.transformers import patch_gemma4

    config = modeling.Gemma4TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=16, enable_moe_block=True, num_experts=16,
        top_k_experts=4, moe_intermediate_size=32, hidden_size_per_layer_input=0, vocab_size_per_layer_input=256,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
    )
    torch.manual_seed(0)
    model = modeling.Gemma4ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.router.proj.weight.normal_(0.0, 1.0)
            layer.router.per_expert_scale.uniform_(0.5, 1.5)
    _split_over_two_gpus(model)
    ids_seen: list[list[torch.Tensor]] = []

    def record(module, args, output):
        ids_seen[-1].append(output[2].cpu())

    hooks = [layer.router.register_forward_hook(record) for layer in model.model.layers]
    input_ids = torch.randint(0, 256, (2, 40), generator=gen).to("cuda:0")
    try:
        with torch.no_grad():
            ids_seen.append([])
            reference = model(input_ids, use_cache=False).logits
            ids_seen.append([])
            with patch_gemma4(model):
                patched = model(input_ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    assert {p.device.index for p in model.parameters()} == {0, 1}
    assert len(ids_seen[0]) == len(ids_seen[1]) == config.num_hidden_layers
    for before, after in zip(*ids_seen, strict=True):
        assert torch.equal(after, before)
    torch.testing.assert_close(patched, reference, rtol=1e-5, atol=1e-5)


def _split_over_two_gpus(model) -> None:
    """Embeddings and the first half of the layers on cuda:0, the rest and the final norm on cuda:1, with
    hooks moving each module's inputs to its device (what accelerate's device_map="auto" dispatch does).
    The head shares its weight with the embeddings (tied), so it stays on cuda:0."""
    layers = model.model.layers
    half = len(layers) // 2
    model.to("cuda:0")
    for layer in layers[half:]:
        layer.to("cuda:1")
    model.model.norm.to("cuda:1")

    def to_device(device):
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, (tuple, list)):
                return type(value)(move(v) for v in value)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            return value

        def hook(module, args, kwargs):
            return move(args), {k: move(v) for k, v in kwargs.items()}

        return hook

    for layer in layers:
        device = next(layer.parameters()).device
        layer.register_forward_pre_hook(to_device(device), with_kwargs=True)
    model.model.norm.register_forward_pre_hook(to_device(torch.device("cuda:1")), with_kwargs=True)
    model.lm_head.register_forward_pre_hook(to_device(torch.device("cuda:0")), with_kwargs=True)



# ------------------------------------------------------------------ the guard itself, on any machine


class _FakeTensor:
    """What launcher.enter_device reads of a tensor: its device index and whether it is CUDA-type (NVIDIA
    and AMD: HIP answers torch.cuda's calls) or XPU."""

    def __init__(self, index: int, kind: str):
        self.index, self.is_cuda, self.is_xpu = index, kind == "cuda", kind == "xpu"

    def get_device(self) -> int:
        return self.index


@pytest.mark.parametrize("kind", ["cuda", "xpu"])
def test_enter_device_switches_only_when_needed_and_restores(kind, monkeypatch):
    """The guard every compiled launch takes (forward and backward), checked without a GPU: it makes the
    tensor's device current when another one is, says which to restore, and restores it."""
    from g4route import launcher

    current = [0]
    if kind == "cuda":
        monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: current[0], raising=False)  # CPU builds lack it
        monkeypatch.setattr(torch._C, "_cuda_setDevice", lambda i: current.__setitem__(0, i), raising=False)
    else:
        monkeypatch.setattr(torch.xpu, "current_device", lambda: current[0])
        monkeypatch.setattr(torch.xpu, "set_device", lambda i: current.__setitem__(0, i))
    on_second = _FakeTensor(1, kind)
    previous = launcher.enter_device(on_second)
    assert (previous, current[0]) == (0, 1)
    launcher.leave_device(on_second, previous)
    assert current[0] == 0
    on_first = _FakeTensor(0, kind)
    assert launcher.enter_device(on_first) == -1 and current[0] == 0  # already current: nothing to undo
    launcher.leave_device(on_first, -1)
    assert current[0] == 0
    cpu = _FakeTensor(-1, "cpu")
    assert launcher.enter_device(cpu) == -1 and current[0] == 0
