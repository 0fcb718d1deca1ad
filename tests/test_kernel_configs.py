"""The kernel under every shape of launch config a table may hold, on hostile inputs.

The tables pick one config per token-count bucket, so route() alone exercises few of them; here the
kernel runs directly under many (rows per program, warps, lanes per row, including a whole row per
load), on the interpreter (CPU) and on each available GPU backend.
"""

from __future__ import annotations

import pytest
import torch
from oracle import assert_routes_like_oracle

from g4route import kernel, registry
from g4route.kernel import LaunchConfig

CONFIGS = [
    LaunchConfig(1, 1),
    LaunchConfig(1, 1, lanes_per_row=4),
    LaunchConfig(4, 1, lanes_per_row=1),
    LaunchConfig(4, 2, lanes_per_row=2),
    LaunchConfig(16, 1, lanes_per_row=4),
    LaunchConfig(16, 4, lanes_per_row=8),
    LaunchConfig(2, 1, lanes_per_row=32),
]


def _bits(value: int) -> float:
    return torch.tensor([value], dtype=torch.int32).view(torch.float32).item()


# NaNs of both signs and several payloads (every NaN ties with every other), signed zeros, infinities,
# the extremes, subnormals.
SPECIALS = torch.tensor([float("nan"), -float("nan"), _bits(0x7F800001), _bits(-0x00400001), float("inf"),
                         float("-inf"), -0.0, 0.0, 3.0e38, -3.0e38, 1e-45, -1e-45, 1e-40, -1e-40])


def _hostile(gen, tokens: int, experts: int) -> torch.Tensor:
    pick = torch.randint(0, 3 * len(SPECIALS), (tokens, experts), generator=gen)
    ties = torch.randint(-2, 3, (tokens, experts), generator=gen).float()
    special = SPECIALS[pick.clamp(max=len(SPECIALS) - 1)]
    x = torch.where(pick < len(SPECIALS), special, torch.randn(tokens, experts, generator=gen))
    return torch.where((pick >= len(SPECIALS)) & (pick < 2 * len(SPECIALS)), ties, x)


@pytest.fixture
def kernel_target(target):
    backend, device = target
    if not registry.get(backend).uses_kernel:
        pytest.skip(f"backend {backend} does not run the kernel")
    return backend == "interpreter", device


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"r{c.rows_per_program}-w{c.num_warps}-l{c.lanes_per_row}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(37, 128, 8), (20, 96, 8), (9, 256, 1)], ids=lambda s: "T{}-E{}-K{}".format(*s))
def test_every_config_shape_routes_like_the_oracle(kernel_target, gen, config, dtype, shape):
    interpret, device = kernel_target
    tokens, experts, topk = shape
    logits = _hostile(gen, tokens, experts).to(dtype).to(device)
    scale = (torch.rand(experts, generator=gen) + 0.5).to(device)
    for renormalize, s in ((True, scale), (False, None)):
        weights = torch.empty(tokens, topk, device=device)
        ids = torch.empty(tokens, topk, dtype=torch.int32, device=device)
        kernel.launch(logits, topk, s, renormalize, weights, ids, config, interpret=interpret)
        assert_routes_like_oracle((weights, ids), logits, topk, s, renormalize)


def test_float32_winners_sharing_a_truncated_key(kernel_target, gen):
    """float32 logits that agree in all but their lowest bits, the larger one on the higher id: the
    kernel's 32-bit keys see them as equal, and only its exact re-check puts them in logit order. Rows
    with such pairs inside the top K, and rows where the pair straddles the K-th place."""
    interpret, device = kernel_target
    tokens, experts, topk = 64, 128, 8
    base = torch.full((tokens, experts), -50.0).view(torch.int32)
    base += torch.randint(0, 1 << 20, (tokens, experts), generator=gen, dtype=torch.int32)
    logits = base.view(torch.float32).clone()
    for row in range(tokens):
        perm = torch.randperm(experts, generator=gen)
        # Nine well separated values, positions 0..8 of the top; place `row % 9` gets a twin 3 ulps up
        # on a higher id, so the twin belongs before it.
        value = 4.0 + torch.arange(9, 0, -1, dtype=torch.float32)
        logits[row, perm[:9]] = value
        twin_of = int(perm[row % 9])
        higher = [int(e) for e in perm[9:] if int(e) > twin_of]
        if higher:
            twin = higher[0]
            logits[row, twin] = (logits[row, twin_of].view(torch.int32) + 3).view(torch.float32)
    logits = logits.to(device)
    scale = (torch.rand(experts, generator=gen) + 0.5).to(device)  # the scales must follow the reordering
    for config in (LaunchConfig(1, 1), LaunchConfig(16, 1, lanes_per_row=2), LaunchConfig(4, 1, lanes_per_row=4)):
        weights = torch.empty(tokens, topk, device=device)
        ids = torch.empty(tokens, topk, dtype=torch.int32, device=device)
        kernel.launch(logits, topk, scale, True, weights, ids, config, interpret=interpret)
        assert_routes_like_oracle((weights, ids), logits, topk, scale)
