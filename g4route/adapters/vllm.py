"""A ``custom_routing_function`` for vLLM's ``FusedMoE``, bound to a Gemma 4 layer's per-expert scale.

For models built by hand. vLLM's own Gemma 4 model needs none of this: with g4route installed, the vLLM
plugin (``vllm_plugin.py``) routes it through g4route.

vLLM's ``FusedMoE(..., custom_routing_function=fn)`` calls ``fn(hidden_states=..., gating_output=...,
topk=..., renormalize=...)`` with the router logits ``[T, E]`` and takes back ``(topk_weights, topk_ids)``,
which it casts to float32 and int32 (or the expert kernel's index dtype). Gemma 4's per-expert scale is
not among those arguments, so the function closes over it::

    from g4route.adapters.vllm import make_vllm_routing_function

    self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))
    self.experts = FusedMoE(..., renormalize=True,
                            custom_routing_function=make_vllm_routing_function(self.per_expert_scale))

Nothing here imports vLLM: the function is plain PyTorch around ``g4route.route``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..api import route
from .engines import scale_for_inference

__all__ = ["make_vllm_routing_function"]

RoutingFunction = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def make_vllm_routing_function(per_expert_scale: torch.Tensor | None = None) -> RoutingFunction:
    """A vLLM ``custom_routing_function`` that routes with ``g4route.route`` and ``per_expert_scale``.

    Args:
        per_expert_scale: the layer's ``[E]`` scale (Gemma 4's ``per_expert_scale`` parameter), or
            ``None`` for none. The tensor object is bound, not its values: weights loaded into it later
            (``param.data.copy_``, as vLLM's loaders do) are used. A loader that replaces the parameter
            object instead needs the function made after loading.

    Returns:
        ``routing_function(hidden_states, gating_output, topk, renormalize) -> (topk_weights, topk_ids)``:
        float32 and int32 ``[T, K]``, exactly ``g4route.route(gating_output, topk, per_expert_scale,
        renormalize=renormalize)``. ``hidden_states`` is not used (it is part of vLLM's signature). The
        scale is detached when autograd is on (a parameter requires grad; routing is inference-only);
        logits that require grad are refused, as by ``route()``.
    """
    if per_expert_scale is not None and not isinstance(per_expert_scale, torch.Tensor):
        raise TypeError(f"per_expert_scale must be a torch.Tensor or None, got {type(per_expert_scale).__name__}")

    def routing_function(
        hidden_states: torch.Tensor,
        gating_output: torch.Tensor,
        topk: int,
        renormalize: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = scale_for_inference(per_expert_scale)
        return route(gating_output, topk, scale, renormalize=renormalize)

    routing_function.__qualname__ = routing_function.__name__ = "g4route_vllm_routing_function"
    return routing_function
