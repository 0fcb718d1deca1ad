"""``route()`` as two PyTorch operators, so ``torch.compile`` and ``torch.export`` trace through it.

- ``torch.ops.g4route.route(gating_output, topk, per_expert_scale, renormalize) -> (weights, ids)``
  allocates its outputs.
- ``torch.ops.g4route.route_out(gating_output, topk, per_expert_scale, renormalize, weights, ids)``
  writes into caller-owned buffers and returns nothing (its schema marks ``weights`` and ``ids`` mutated).

Each has a fake (meta) implementation, so Dynamo and AOTAutograd see the outputs' shapes, symbolic token
counts included, without running anything: a compiled model keeps the call as one node, with no graph
break. The real implementation picks the backend when it runs, through ``registry.select``:
``G4ROUTE_BACKEND`` is read on each call, in compiled code as in eager, and a compiled graph never pins a
backend.

``api.route`` is the way in for callers. It validates the arguments first (its errors name the argument),
then calls these operators while something traces the call (``torch.compile``, ``torch.export``, a
dispatch mode such as ``FakeTensorMode``) and, in plain eager code, the same :func:`run` directly: the
dispatcher hop costs host time on every call and buys nothing there. The operators trust their
arguments; calling them directly with arguments outside the contract is undefined.

They are defined with ``torch.library.Library`` and a ``CompositeExplicitAutograd`` kernel rather than
the ``torch.library.custom_op`` decorator: a no-op operator with this schema cost 40-80 us a call
through ``custom_op`` on the (2-core) development host, whose autograd and in-place wrappers run in
Python on every call, compiled code included, and 7-12 us through this registration.

Autograd: ``route`` and ``route_out`` have no autograd formula, so inference (eager or compiled) never
passes through one. Where an input requires grad, route() calls a third operator,
``torch.ops.g4route.route_autograd`` (the same schema and implementation as ``route``), whose formula
(``torch.library.register_autograd``) saves the logits, the ids and the scale and calls
``torch.ops.g4route.route_backward``: the backward kernel, or the reference's gradient in PyTorch ops
(``backward.py``), chosen like the forward's backend when it runs. AOTAutograd traces that formula, so
``torch.compile(fullgraph=True)`` of a training step keeps both as single nodes. ``route_backward`` itself
is not differentiable: a double backward raises a ``RuntimeError`` that says so.
"""

from __future__ import annotations

import torch

from . import registry

__all__ = ["ROUTE", "ROUTE_AUTOGRAD", "ROUTE_BACKWARD", "ROUTE_OUT", "route_new", "run"]

_LIB = torch.library.Library("g4route", "DEF")
_TAGS = (torch.Tag.pt2_compliant_tag,)
_LIB.define(
    "route(Tensor gating_output, SymInt topk, Tensor? per_expert_scale, bool renormalize) -> (Tensor, Tensor)",
    tags=_TAGS,
)
_LIB.define(
    "route_out(Tensor gating_output, SymInt topk, Tensor? per_expert_scale, bool renormalize, "
    "Tensor(a!) weights, Tensor(b!) ids) -> ()",
    tags=_TAGS,
)
_LIB.define(
    "route_autograd(Tensor gating_output, SymInt topk, Tensor? per_expert_scale, bool renormalize) "
    "-> (Tensor, Tensor)",
    tags=_TAGS,
)
_LIB.define(
    "route_backward(Tensor grad_weights, Tensor gating_output, Tensor weights, Tensor ids, Tensor? per_expert_scale, "
    "bool renormalize, bool logits_grad, bool scale_grad) -> (Tensor, Tensor)",
    tags=_TAGS,
)


def run(
    logits: torch.Tensor,
    topk: int,
    scale: torch.Tensor | None,
    renormalize: bool,
    weights: torch.Tensor,
    ids: torch.Tensor,
) -> None:
    """Route validated ``[..., E]`` logits into ``[..., K]`` buffers with the backend chosen for them."""
    num_experts = logits.shape[-1]
    backend = registry.select(logits.device, num_experts, topk)
    # reshape is a view whenever the leading dims collapse (strided rows included); only logits whose
    # leading dims cannot be flattened in place are copied. The outputs were checked to flatten as views
    # (api._check_out), so what is written through these views reaches the caller's tensors.
    rows = logits if logits.dim() == 2 else logits.reshape(-1, num_experts)
    w_rows = weights if weights.dim() == 2 else weights.view(-1, topk)
    id_rows = ids if ids.dim() == 2 else ids.view(-1, topk)
    backend.run(rows, topk, scale, renormalize, w_rows, id_rows)


def route_new(logits: torch.Tensor, topk: int, scale: torch.Tensor | None,
              renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Route validated ``[..., E]`` logits into fresh ``[..., K]`` outputs with the backend chosen for them.

    Unlike :func:`run`, the backend makes its outputs: the PyTorch reference returns the tensors it
    computed instead of copying them into buffers allocated beforehand (two allocations and two copies
    that would cost a one-token CPU call a third of its time)."""
    num_experts = logits.shape[-1]
    backend = registry.select(logits.device, num_experts, topk)
    if logits.dim() == 2:
        return backend.route(logits, topk, scale, renormalize)
    weights, ids = backend.route(logits.reshape(-1, num_experts), topk, scale, renormalize)
    shape = (*logits.shape[:-1], topk)
    return weights.view(shape), ids.view(shape)


def empty_outputs(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous float32 weights and int32 ids ``[..., K]`` on the logits' device."""
    shape = (*logits.shape[:-1], topk)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int32)


def _route(gating_output, topk, per_expert_scale, renormalize):
    return route_new(gating_output, topk, per_expert_scale, renormalize)


def _route_out(gating_output, topk, per_expert_scale, renormalize, weights, ids):
    run(gating_output, topk, per_expert_scale, renormalize, weights, ids)


def _route_fake(gating_output, topk, per_expert_scale, renormalize):
    return empty_outputs(gating_output, topk)


def _route_out_fake(gating_output, topk, per_expert_scale, renormalize, weights, ids):
    return None


def backward(
    grad_weights: torch.Tensor,
    logits: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    scale: torch.Tensor | None,
    renormalize: bool,
    logits_grad: bool,
    scale_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`run` w.r.t. the ``[..., E]`` logits (their shape and dtype) and the scale
    (its dtype), from the ``[..., K]`` gradient of the weights and the weights and ids the forward wrote. A gradient
    not asked for comes back as an empty tensor (the operator's schema has no optional outputs)."""
    num_experts, topk = logits.shape[-1], ids.shape[-1]
    backend = registry.select(logits.device, num_experts, topk)
    rows = logits if logits.dim() == 2 else logits.reshape(-1, num_experts)
    g_rows = grad_weights if grad_weights.dim() == 2 else grad_weights.reshape(-1, topk)
    id_rows = ids if ids.dim() == 2 else ids.reshape(-1, topk)
    w_rows = weights if weights.dim() == 2 else weights.reshape(-1, topk)
    grad_logits, grad_scale = backend.backward(g_rows, rows, w_rows, id_rows, scale, renormalize, logits_grad,
                                               scale_grad)
    return (logits.new_empty(0) if grad_logits is None else grad_logits.view(logits.shape),
            logits.new_empty(0) if grad_scale is None else grad_scale.to(scale.dtype))


def _route_backward_fake(grad_weights, gating_output, weights, ids, per_expert_scale, renormalize, logits_grad,
                         scale_grad):
    return (gating_output.new_empty(gating_output.shape) if logits_grad else gating_output.new_empty(0),
            per_expert_scale.new_empty(per_expert_scale.shape) if scale_grad else gating_output.new_empty(0))


def _setup_context(ctx, inputs, output):
    gating_output, _, per_expert_scale, renormalize = inputs
    ctx.renormalize = renormalize
    # The logits are the input itself (autograd keeps it alive anyway); the weights and ids are [..., K]:
    # no [T, E] float32 tensor is saved. With the weights the kernel's backward reads no logits in the
    # common case (backward.py); as for torch.softmax, changing them in place before the backward is an
    # error autograd reports.
    ctx.save_for_backward(gating_output, output[0], output[1], per_expert_scale)
    # The ids have no gradient: without this, autograd would fill a [..., K] zero tensor for theirs on
    # every backward (3 us at 262,144 tokens on an H100).
    ctx.set_materialize_grads(False)


def _route_autograd_backward(ctx, grad_weights, _grad_ids):
    if grad_weights is None:  # no gradient reached the weights (set_materialize_grads(False) above)
        return None, None, None, None
    logits, weights, ids, scale = ctx.saved_tensors
    logits_grad, _, scale_grad, _ = ctx.needs_input_grad
    grad_logits, grad_scale = ROUTE_BACKWARD(grad_weights, logits, weights, ids, scale, ctx.renormalize,
                                             logits_grad, scale_grad)
    return grad_logits if logits_grad else None, None, grad_scale if scale_grad else None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError("g4route.route() is differentiable once: its backward (g4route::route_backward) has no "
                       "gradient of its own, so a double backward (e.g. a gradient penalty through the routing "
                       "weights) is not supported")


_LIB.impl("route", _route, "CompositeExplicitAutograd")
_LIB.impl("route_out", _route_out, "CompositeExplicitAutograd")
_LIB.impl("route_autograd", _route, "CompositeExplicitAutograd")
_LIB.impl("route_backward", backward, "CompositeExplicitAutograd")
torch.library.register_fake("g4route::route", _route_fake, lib=_LIB)
torch.library.register_fake("g4route::route_out", _route_out_fake, lib=_LIB)
torch.library.register_fake("g4route::route_autograd", _route_fake, lib=_LIB)
torch.library.register_fake("g4route::route_backward", _route_backward_fake, lib=_LIB)
torch.library.register_autograd("g4route::route_autograd", _route_autograd_backward, setup_context=_setup_context,
                                lib=_LIB)
torch.library.register_autograd("g4route::route_backward", _no_double_backward, lib=_LIB)

ROUTE = torch.ops.g4route.route.default
ROUTE_OUT = torch.ops.g4route.route_out.default
ROUTE_AUTOGRAD = torch.ops.g4route.route_autograd.default
ROUTE_BACKWARD = torch.ops.g4route.route_backward.default
