"""``route()``: validate the call, pick a backend for the device, run it, return the outputs.

In eager code route() runs the backend directly; while something traces it (``torch.compile``,
``torch.export``, a dispatch mode) it calls the ``g4route::route`` / ``g4route::route_out`` operators
(``op.py``) instead, so the call is one node of the graph. Both paths validate first and end in the same
``op.run``.
"""

from __future__ import annotations

import torch

from . import op, registry
from .reference import route_torch

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A scale of these types may take route()'s eager CPU path: an nn.Parameter (as Transformers holds Gemma 4's
# per_expert_scale) behaves there as the tensor it holds (its __torch_function__ is disabled).
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _check_logits(gating_output: object, name: str = "gating_output", last: str = "E") -> torch.Tensor:
    """A float32/bfloat16/float16 tensor ``[..., last]`` with ``last >= 1`` (``router()`` checks its hidden
    states with it too, as ``name`` ``[..., H]``)."""
    if not isinstance(gating_output, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(gating_output).__name__}")
    if gating_output.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {gating_output.dtype}")
    if gating_output.dim() < 1 or gating_output.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., {last}] with {last} >= 1, got {tuple(gating_output.shape)}")
    return gating_output


def _refuse_grad(tensor: torch.Tensor, name: str) -> None:
    # An output buffer is written, never differentiated: one that requires grad is a mistake.
    if tensor.requires_grad and torch.is_grad_enabled():
        raise TypeError(f"{name} requires grad, but route() writes its outputs into out= buffers without "
                        f"recording the write for autograd: pass {name}.detach() or call it under torch.no_grad()")


def _check_topk(topk: object, num_experts: int) -> int:
    # A SymInt is an int that torch.compile traces symbolically (a topk passed in as a dynamic int).
    if isinstance(topk, bool) or not isinstance(topk, (int, torch.SymInt)):
        raise TypeError(f"topk must be an int, got {type(topk).__name__}")
    if not 1 <= topk <= num_experts:
        raise ValueError(f"topk must be in [1, E] = [1, {num_experts}], got {topk}")
    return topk


def _check_scale(scale: object, logits: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    if scale is None:
        return None
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"per_expert_scale must be a torch.Tensor or None, got {type(scale).__name__}")
    if not scale.is_floating_point():
        raise TypeError(f"per_expert_scale must be a floating tensor, got {scale.dtype}")
    num_experts = logits.shape[-1]
    if scale.shape != (num_experts,):
        raise ValueError(f"per_expert_scale must have shape [E] = [{num_experts}], got {tuple(scale.shape)}")
    if scale.device != device:
        raise ValueError(f"per_expert_scale is on {scale.device}, but gating_output is on {device}")
    return scale


def _check_out(out: object, logits: torch.Tensor, topk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("out must be a pair (weights, ids) of tensors")
    shape = (*logits.shape[:-1], topk)
    for name, tensor, dtype in (("weights", out[0], torch.float32), ("ids", out[1], torch.int32)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"out {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != dtype:
            raise TypeError(f"out {name} must be {dtype}, got {tensor.dtype}")
        if tensor.shape != shape:
            raise ValueError(f"out {name} must have shape {list(shape)}, got {list(tensor.shape)}")
        if tensor.device != device:
            raise ValueError(f"out {name} is on {tensor.device}, but gating_output is on {device}")
        _refuse_grad(tensor, f"out {name}")
        # The backends write [T, K] rows; a copy would silently drop the results.
        if not _rows_flatten_as_view(tensor):
            raise ValueError(f"out {name}: its leading dimensions must be flattenable without a copy")
    return out[0], out[1]


def _rows_flatten_as_view(tensor: torch.Tensor) -> bool:
    """Whether ``tensor.view(-1, tensor.shape[-1])`` works: the leading dims, size-1 dims aside, nest
    (each one's stride is the next inner one's stride times its size). Decided from the strides, not by
    trying the view, so torch.compile traces it without an exception."""
    if tensor.dim() <= 2 or tensor.numel() == 0:
        return True
    inner_extent = None  # stride * size of the nearest inner leading dim of size > 1
    for size, stride in zip(reversed(tensor.shape[:-1]), reversed(tensor.stride()[:-1]), strict=True):
        if size == 1:
            continue
        if inner_extent is not None and stride != inner_extent:
            return False
        inner_extent = stride * size
    return True


def _traced(logits: torch.Tensor) -> bool:
    """Whether this call is being traced rather than run: torch.compile or torch.export (Dynamo), a
    tensor subclass standing in for a tensor (FakeTensor, FunctionalTensor, ...), or a dispatch mode
    (make_fx, FakeTensorMode). Then route() calls the operator, which tracers see as one opaque node."""
    return _is_compiling() or type(logits) is not torch.Tensor or _dispatch_modes() > 0


# Bound once: route() asks on every call. Dynamo must be asked first: it traces route() rather than
# running it, so only is_compiling() (which it answers with a constant) is meaningful there.
_is_compiling = torch.compiler.is_compiling
# The eager CPU path asks only whether Dynamo is tracing (one Python frame where is_compiling() takes two:
# Dynamo answers both with a constant); the other tracers show in the checks that follow it (a tensor
# subclass, a dispatch mode).
_dynamo_tracing = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
_dispatch_modes = torch._C._len_torch_dispatch_stack
_raw_env = registry.raw_env


def route(
    gating_output: torch.Tensor,
    topk: int,
    per_expert_scale: torch.Tensor | None = None,
    *,
    renormalize: bool = True,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens to experts: Gemma 4's softmax -> top-k -> renormalize -> per-expert scale.

    Args:
        gating_output: router logits ``[..., E]``, float32, bfloat16 or float16; any leading shape;
            rows may be strided. Arithmetic is float32 whatever the dtype (or finer: one CPU row's weights
            are computed in double precision and rounded once).
        topk: K, the experts per token, ``1 <= K <= E``.
        per_expert_scale: ``[E]`` floating tensor on the same device, or ``None`` (all ones).
        renormalize: ``True`` (Gemma 4): weights are the softmax over the K chosen logits.
            ``False``: the softmax over all E, taken at the chosen experts.
        out: optional ``(weights, ids)`` buffers of shape ``[..., K]``, float32 and int32, on the
            same device; written in place and returned (no allocation, CUDA-graph friendly).

    Returns:
        ``(weights, ids)``: float32 and int32 ``[..., K]``. ``ids`` hold the K largest logits per
        row by descending logit, ties to the lower expert id, NaN above ``+inf``; every id is in
        ``[0, E)``. Weights are multiplied by ``per_expert_scale[ids]``. A row whose largest logit
        is ``-inf`` gets weight 0; a row holding NaN or ``+inf`` gets NaN weights.

    Raises:
        TypeError, ValueError: naming the argument, for any call outside this contract, and for a
            ``G4ROUTE_BACKEND`` that is unknown or cannot run the call. ``TypeError`` for ``out`` while
            an input requires grad (with grad mode on).

    Autograd: differentiable w.r.t. ``gating_output`` and ``per_expert_scale`` (not the ids), for either
    ``renormalize``, when grad mode is on and either requires grad. The logits' gradient comes in their
    dtype, zero outside the chosen K when ``renormalize`` is True; a row whose every logit is ``-inf``
    gets 0, a row holding NaN gets NaN. The GPU backends (and ``interpreter``) run one backward kernel,
    the scale's gradient reduced without atomics (bitwise reproducible); ``torch`` computes the
    gradient of the reference's formula in PyTorch ops. A double backward raises ``RuntimeError``, except
    for an eager call on 2-D CPU logits (a CPU scale, no ``out``) with no backend forced, where autograd
    records the reference's PyTorch ops themselves (faster on a CPU), and a double backward works.

    ``torch.compile`` (``fullgraph=True``, dynamic token counts) traces through route() without a graph
    break: the call becomes one ``g4route::route`` (or, with ``out``, ``g4route::route_out``) operator
    node, and the backend is still chosen, ``G4ROUTE_BACKEND`` included, each time the graph runs.
    """
    scale = per_expert_scale
    # One CPU token costs about 10 us in Transformers' routing code, and the full checks below with the
    # dispatch through op.py and the registry would add half of that again: an eager call on 2-D CPU
    # logits that passes the same checks, with no backend forced, goes straight to the torch backend.
    # With autograd on, autograd records its PyTorch ops directly: the route_autograd operator's
    # Python autograd wrapper cost about 100 us a training step at one token, three times the whole
    # step of eager autograd (BENCHMARKS.md). Any other call (every bad one included) takes the full
    # path. Dynamo is asked first (see _traced).
    if out is None and type(gating_output) is torch.Tensor and gating_output.is_cpu and not _dynamo_tracing():
        shape = gating_output.shape  # read once: each read builds a torch.Size
        if (len(shape) == 2 and type(topk) is int and 1 <= topk <= shape[1] and gating_output.dtype in _LOGIT_DTYPES
                and (scale is None or (type(scale) in _PLAIN_TENSORS and scale.is_cpu and scale.is_floating_point()
                                       and scale.shape == (shape[1],)))
                and type(renormalize) is bool and not _dispatch_modes() and _raw_env() is None):
            return route_torch(gating_output, topk, scale, renormalize)
    logits = _check_logits(gating_output)
    num_experts = logits.shape[-1]
    topk = _check_topk(topk, num_experts)
    device = logits.device
    scale = _check_scale(scale, logits, device)
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
    # Autograd only where it is asked for: the no-grad path below stays as lean as it was.
    if (logits.requires_grad or (scale is not None and scale.requires_grad)) and torch.is_grad_enabled():
        if out is not None:
            raise TypeError("out= cannot be used while gating_output or per_expert_scale requires grad: autograd "
                            "cannot record a write into caller-owned buffers (and the gradients need the ids "
                            "kept unchanged); call route() without out=, or under torch.no_grad()")
        return op.ROUTE_AUTOGRAD(logits, topk, scale, renormalize)
    if out is None:
        if _traced(logits):
            return op.ROUTE(logits, topk, scale, renormalize)
        return op.route_new(logits, topk, scale, renormalize)
    weights, ids = _check_out(out, logits, topk, device)
    if _traced(logits):
        op.ROUTE_OUT(logits, topk, scale, renormalize, weights, ids)
        return weights, ids
    op.run(logits, topk, scale, renormalize, weights, ids)
    return weights, ids
