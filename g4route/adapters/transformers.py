"""Make a Hugging Face Transformers Gemma 4 MoE model route through g4route: ``patch_gemma4(model)``.

How Transformers routes Gemma 4 (``transformers/models/gemma4/modeling_gemma4.py``, Transformers 5.5
and later): each MoE decoder layer holds a ``Gemma4TextRouter`` (``layer.router``) whose ``forward(x)``
normalises ``x`` (an RMSNorm without weight, times ``router.scale`` and ``hidden_size ** -0.5``),
projects it to expert scores ``[T, E]`` with ``router.proj``, and returns ``(router_probabilities,
top_k_weights, top_k_index)``: the softmax over all experts, then ``torch.topk`` of it, the K weights
renormalised to sum to 1 and multiplied by ``router.per_expert_scale[top_k_index]``. The decoder layer
passes the last two to ``Gemma4TextExperts``; the first is what ``output_router_logits=True`` records
(Transformers 5.19 and later; earlier Gemma 4 outputs have no ``router_logits``).

``patch_gemma4`` gives each router a forward that keeps the normalisation and projection (the router's
own submodules) and replaces softmax -> top-k -> renormalise -> scale with one ``g4route.route`` call,
returning the same three values with the same dtypes (ids as int64, which the experts' ``one_hot``
needs). Equal up to float32 rounding: Transformers takes the top-k of the probabilities, g4route of the
logits (the same order, as softmax is monotone; exact ties go to the lower expert id), and the weights
are the softmax over the K chosen logits, which equals the renormalised probabilities.

- Transformers 5.13 and later compute the routing softmax in float32, as g4route does. 5.5 to 5.12
  computed it in the model's dtype: for a bfloat16 or float16 model, routing through g4route there
  gives weights rounded differently from the unpatched model (``patch_gemma4`` warns).
- Training goes through g4route too: ``route()`` is differentiable w.r.t. the expert scores and
  ``per_expert_scale`` (its backward kernel on GPUs), and the all-expert probabilities that
  ``output_router_logits=True`` and the load-balancing loss use come from ``torch.softmax`` as in the
  model, so every parameter gets the unpatched model's gradient (to float32 rounding).
- ``torch.compile(model)`` traces through the patched routers without a graph break (``route()`` is
  an operator under tracing; see ``g4route/op.py``).

``patch_gemma4(model, fuse_router=True)`` goes further for inference: each router becomes one
``g4route.router`` call (the norm, the scale, the projection and the routing in one kernel on a GPU;
``H ** -0.5`` is Gemma 4's ``scalar_root_size``). Training falls back to the forward above, call by call,
wherever autograd needs the router's gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..api import route
from ..router import router as fused_router

__all__ = ["Gemma4Patch", "patch_gemma4"]

# Attributes of Gemma4TextRouter that the patched forward uses.
_ROUTER_ATTRIBUTES = ("norm", "proj", "scale", "scalar_root_size", "per_expert_scale", "config")


def _router_class() -> type[torch.nn.Module]:
    try:
        from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter
    except ImportError as exc:
        raise ImportError(
            "patch_gemma4 needs the transformers package with the Gemma 4 model (transformers>=5.5): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return Gemma4TextRouter


def _softmax_in_float32() -> bool:
    """Whether this Transformers computes Gemma 4's routing softmax in float32 (5.13 and later)."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return (major, minor) >= (5, 13)


def _g4route_forward(router: torch.nn.Module, probabilities: bool) -> Callable:
    """The forward that replaces ``router.forward``: Gemma4TextRouter's, routing through g4route."""
    topk = int(router.config.top_k_experts)

    def forward(hidden_states: torch.Tensor):
        hidden_states = router.norm(hidden_states)
        hidden_states = hidden_states * router.scale * router.scalar_root_size
        expert_scores = router.proj(hidden_states)  # [T, E]
        weights, ids = route(expert_scores, topk, router.per_expert_scale)
        # The experts (one_hot, index_add_) expect int64 ids, as torch.topk returns. The weights keep the
        # dtype the original computes, float32 times per_expert_scale's: float32 unless the scale is float64.
        if router.per_expert_scale.dtype == torch.float64:
            weights = weights.double()
        # Where autograd is on, route() records its own backward (w.r.t. expert_scores and the scale).
        router_probabilities = (
            torch.nn.functional.softmax(expert_scores, dim=-1, dtype=torch.float32) if probabilities else None
        )
        return router_probabilities, weights, ids.long()

    forward._g4route_patched = True  # marks it, so a second patch and undo() can recognise it
    return forward


def _fused_forward(router: torch.nn.Module, probabilities: bool) -> Callable:
    """The forward of ``fuse_router=True``: the whole router (norm, scale, projection, routing) in one
    ``g4route.router`` call where nothing needs its gradient, and :func:`_g4route_forward` otherwise (the
    fused router has no backward) or where the projection's dtype is not the hidden states' (autocast)."""
    topk = int(router.config.top_k_experts)
    unfused = _g4route_forward(router, probabilities)
    params = (router.proj.weight, router.scale, router.per_expert_scale)

    def forward(hidden_states: torch.Tensor):
        weight = router.proj.weight
        if (weight.dtype != hidden_states.dtype or router.proj.bias is not None
                or (torch.is_grad_enabled() and (hidden_states.requires_grad or any(p.requires_grad for p in params)))):
            return unfused(hidden_states)
        weights, ids, *logits = fused_router(hidden_states, weight, topk, scale=router.scale,
                                             per_expert_scale=router.per_expert_scale, eps=float(router.norm.eps),
                                             return_logits=probabilities)
        if router.per_expert_scale.dtype == torch.float64:
            weights = weights.double()
        router_probabilities = torch.softmax(logits[0], dim=-1) if probabilities else None
        return router_probabilities, weights, ids.long()

    forward._g4route_patched = True
    return forward


_MISSING = object()


class Gemma4Patch:
    """What ``patch_gemma4`` changed: ``undo()`` (or leaving the ``with`` block) restores it."""

    def __init__(self, routers: list[torch.nn.Module], saved: list[object], installed: list[Callable]):
        self.routers = routers
        self._saved = saved  # each router's own "forward" attribute before patching, or _MISSING
        self._installed = installed
        self.active = True

    def undo(self) -> None:
        """Give every patched router back the forward it had; a second call does nothing."""
        if not self.active:
            return
        for router, installed in zip(self.routers, self._installed, strict=True):
            if router.__dict__.get("forward") is not installed:
                raise RuntimeError(
                    f"cannot undo the g4route patch of {type(router).__name__}: its forward was replaced "
                    "again after patch_gemma4 (undo that change first)"
                )
        for router, saved in zip(self.routers, self._saved, strict=True):
            del router.forward
            if saved is not _MISSING:
                router.forward = saved
        self.active = False

    def __enter__(self) -> Gemma4Patch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"<Gemma4Patch: {len(self.routers)} routers through g4route, {state}>"


def patch_gemma4(model: torch.nn.Module, *, router_probabilities: bool = True,
                 fuse_router: bool = False) -> Gemma4Patch:
    """Route every Gemma 4 MoE router of ``model`` through ``g4route.route``; returns the undo handle.

    Args:
        model: a Transformers model holding ``Gemma4TextRouter`` modules (``Gemma4ForCausalLM``,
            ``Gemma4ForConditionalGeneration``, a ``Gemma4TextModel``, a single decoder layer, ...).
        router_probabilities: ``True`` (default) also computes the softmax over all experts that the
            router returns first, so ``output_router_logits=True`` records what it did before.
            ``False`` returns ``None`` in its place and saves that ``[T, E]`` softmax on every layer
            (the decoder layer itself discards it); ``router_logits`` are then not recorded.
        fuse_router: ``True`` runs each router whole (its norm, scale, projection and routing) as one
            ``g4route.router`` call: one kernel on a GPU, the float32 logits never written unless
            ``router_probabilities`` needs them. Inference only: where autograd needs the router's
            gradients (training), and where the projection's dtype is not the hidden states' (autocast),
            that router call takes the unfused path (projection, then ``route()``), which has a backward.
            The numbers differ from the unpatched bfloat16 router's by its roundings (``router.py``: the
            fused router keeps float32 logits; Transformers rounds the normed hidden state and the
            logits to bfloat16), so expert choices can differ where the K-th place is close.

    Returns:
        A ``Gemma4Patch``: ``handle.undo()``, or use it as a context manager
        (``with patch_gemma4(model): ...``), restores the routers' forwards.

    Raises:
        ImportError: Transformers, or its Gemma 4 model, is not installed.
        ValueError: ``model`` holds no Gemma 4 router, or one is already patched.
        TypeError: a router lacks an attribute the patched forward needs (a Transformers version
            whose router differs from the one described in this module's docstring).
    """
    router_class = _router_class()
    routers = [m for m in model.modules() if isinstance(m, router_class)]
    if not routers:
        raise ValueError(
            f"{type(model).__name__} holds no Gemma4TextRouter: is it a Gemma 4 model with "
            "enable_moe_block=True (e.g. gemma-4-26B-A4B)?"
        )
    for router in routers:
        missing = [name for name in _ROUTER_ATTRIBUTES if not hasattr(router, name)]
        if missing:
            raise TypeError(f"this Gemma4TextRouter has no {', '.join(missing)}: this transformers version's "
                            "router differs from the one g4route.adapters.transformers was written for")
        if getattr(router.__dict__.get("forward"), "_g4route_patched", False):
            raise ValueError("this model's Gemma 4 routers are already patched by g4route (undo that first)")
    if not isinstance(fuse_router, bool):
        raise TypeError(f"fuse_router must be a bool, got {type(fuse_router).__name__}")
    if not _softmax_in_float32() and any(r.proj.weight.dtype != torch.float32 for r in routers):
        warnings.warn(
            "this transformers version computes Gemma 4's routing softmax in the model's dtype "
            f"({routers[0].proj.weight.dtype}); g4route computes it in float32, so routing weights differ "
            "from the unpatched model's by that dtype's rounding (transformers>=5.13 computes in float32)",
            RuntimeWarning,
            stacklevel=2,
        )
    saved, installed = [], []
    for router in routers:
        saved.append(router.__dict__.get("forward", _MISSING))
        forward = (_fused_forward if fuse_router else _g4route_forward)(router, router_probabilities)
        router.forward = forward
        installed.append(forward)
    return Gemma4Patch(routers, saved, installed)
