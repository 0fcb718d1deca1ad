"""Device-only parity: the sizes a CPU cannot afford, 64-bit offsets, CUDA-graph capture.

Runs under ``nox -s test-cuda`` / ``test-rocm`` / ``test-xpu`` (markers set by the gpu_target fixture).
"""

from __future__ import annotations

import pytest
import torch
from oracle import assert_routes_like_oracle

import g4route
from g4route import kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tokens", [0, 1, 7, 2048, 262144])
@pytest.mark.parametrize("experts", [128, 96, 256])
@pytest.mark.parametrize("topk", [1, 8])
def test_parity_grid(gpu_target, dtype, tokens, experts, topk):
    _, device = gpu_target
    logits = torch.randn(tokens, experts, device=device).mul_(3).to(dtype)
    scale = torch.rand(experts, device=device) + 0.5
    for renormalize in (True, False):
        result = g4route.route(logits, topk, scale, renormalize=renormalize)
        assert_routes_like_oracle(result, logits, topk, scale, renormalize)


def test_tuned_configs_all_agree(gpu_target):
    """Every bucket of the device's table computes the same answer (a bad tuned row would show here)."""
    backend_name, device = gpu_target
    backend = g4route.registry.get(backend_name)
    logits = torch.randn(3000, 128, device=device, dtype=torch.bfloat16)
    for t in (1, 16, 256, 4096, 65536, 262144):
        for dtype in (torch.float32, torch.bfloat16):
            config = backend.config_for(device, t, dtype)
            x = logits.to(dtype)
            w = torch.empty(3000, 8, device=device)
            ids = torch.empty(3000, 8, dtype=torch.int32, device=device)
            kernel.launch(x, 8, None, True, w, ids, config)
            assert_routes_like_oracle((w, ids), x, 8)


def test_offsets_past_two_to_the_31(gpu_target):
    """T * E > 2**31 elements: rows at the far end must be read from the right place."""
    _, device = gpu_target
    experts = 4096
    tokens = (1 << 31) // experts + 64
    try:
        logits = torch.empty(tokens, experts, device=device, dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough device memory for a 4 GiB input")
    logits.normal_()
    weights, ids = g4route.route(logits, 8)
    tail = slice(tokens - 4096, tokens)
    assert_routes_like_oracle((weights[tail], ids[tail]), logits[tail], 8)
    assert_routes_like_oracle((weights[:64], ids[:64]), logits[:64], 8)


def test_cuda_graph_capture_and_replay(gpu_target):
    _, device = gpu_target
    if device.type != "cuda":
        pytest.skip("CUDA graphs are a torch.cuda feature")
    logits = torch.randn(64, 128, device=device)
    scale = torch.rand(128, device=device)
    out = (torch.empty(64, 8, device=device), torch.empty(64, 8, dtype=torch.int32, device=device))
    g4route.route(logits, 8, scale, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g4route.route(logits, 8, scale, out=out)
    for _ in range(3):
        logits.copy_(torch.randn(64, 128, device=device))
        graph.replay()
        torch.cuda.synchronize(device)
        assert_routes_like_oracle(out, logits, 8, scale)


def test_direct_launches_across_specialisations(gpu_target, gen):
    """Token counts, alignments, scale dtypes and strides that Triton specialises on differently, each
    routed twice (the second call takes the kept launcher where the backend launches directly)."""
    backend_name, device = gpu_target
    wide = torch.randn(300, 136, generator=gen).to(device)
    for tokens in (1, 2, 16, 17, 300):
        for logits in (wide[:tokens, :128], wide[:tokens, 1:129], wide[:tokens, 8:136].to(torch.bfloat16)):
            for scale in (None, (torch.rand(128, generator=gen) + 0.5).to(device, torch.bfloat16)):
                for _ in range(2):
                    assert_routes_like_oracle(g4route.route(logits, 8, scale), logits, 8, scale)
    if g4route.registry.get(backend_name).direct_launch and kernel._direct is not None:
        assert kernel._direct._entries, "the direct launcher kept no launcher"
