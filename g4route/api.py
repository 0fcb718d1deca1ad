"""``route()``: validate the call, pick a backend for the device, run it, return the outputs."""

from __future__ import annotations

import torch

from . import registry

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_logits(gating_output: object) -> torch.Tensor:
    if not isinstance(gating_output, torch.Tensor):
        raise TypeError(f"gating_output must be a torch.Tensor, got {type(gating_output).__name__}")
    if gating_output.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"gating_output must be float32, bfloat16 or float16, got {gating_output.dtype}")
    if gating_output.dim() < 1 or gating_output.shape[-1] < 1:
        raise ValueError(f"gating_output must have shape [..., E] with E >= 1, got {tuple(gating_output.shape)}")
    _refuse_grad(gating_output, "gating_output")
    return gating_output


def _refuse_grad(tensor: torch.Tensor, name: str) -> None:
    # Backends differ in whether autograd could follow them, so none is asked to: refuse plainly.
    if tensor.requires_grad and torch.is_grad_enabled():
        raise TypeError(f"{name} requires grad, but route() is not differentiable: "
                        f"call it under torch.no_grad() or pass {name}.detach()")


def _check_topk(topk: object, num_experts: int) -> int:
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"topk must be an int, got {type(topk).__name__}")
    if not 1 <= topk <= num_experts:
        raise ValueError(f"topk must be in [1, E] = [1, {num_experts}], got {topk}")
    return topk


def _check_scale(scale: object, logits: torch.Tensor) -> torch.Tensor | None:
    if scale is None:
        return None
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"per_expert_scale must be a torch.Tensor or None, got {type(scale).__name__}")
    if not scale.is_floating_point():
        raise TypeError(f"per_expert_scale must be a floating tensor, got {scale.dtype}")
    num_experts = logits.shape[-1]
    if scale.shape != (num_experts,):
        raise ValueError(f"per_expert_scale must have shape [E] = [{num_experts}], got {tuple(scale.shape)}")
    if scale.device != logits.device:
        raise ValueError(f"per_expert_scale is on {scale.device}, but gating_output is on {logits.device}")
    _refuse_grad(scale, "per_expert_scale")
    return scale


def _check_out(out: object, logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*logits.shape[:-1], topk)
    if out is None:
        return (
            torch.empty(shape, dtype=torch.float32, device=logits.device),
            torch.empty(shape, dtype=torch.int32, device=logits.device),
        )
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("out must be a pair (weights, ids) of tensors")
    for name, tensor, dtype in (("weights", out[0], torch.float32), ("ids", out[1], torch.int32)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"out {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != dtype:
            raise TypeError(f"out {name} must be {dtype}, got {tensor.dtype}")
        if tensor.shape != shape:
            raise ValueError(f"out {name} must have shape {list(shape)}, got {list(tensor.shape)}")
        if tensor.device != logits.device:
            raise ValueError(f"out {name} is on {tensor.device}, but gating_output is on {logits.device}")
        _refuse_grad(tensor, f"out {name}")
    return out[0], out[1]


def _rows(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """A 2-D view of an output; a copy would silently drop the results."""
    if tensor.dim() == 2:
        return tensor
    try:
        return tensor.view(-1, tensor.shape[-1])
    except RuntimeError:
        raise ValueError(f"out {name}: its leading dimensions must be flattenable without a copy") from None


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
            rows may be strided. Arithmetic is float32 whatever the dtype.
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
            ``G4ROUTE_BACKEND`` that is unknown or cannot run the call.
    """
    logits = _check_logits(gating_output)
    num_experts = logits.shape[-1]
    topk = _check_topk(topk, num_experts)
    scale = _check_scale(per_expert_scale, logits)
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
    weights, ids = _check_out(out, logits, topk)
    backend = registry.select(logits.device, num_experts, topk)
    # reshape is a view whenever the leading dims collapse (strided rows included); only logits
    # whose leading dims cannot be flattened in place are copied.
    rows = logits if logits.dim() == 2 else logits.reshape(-1, num_experts)
    backend.run(rows, topk, scale, renormalize, _rows(weights, "weights"), _rows(ids, "ids"))
    return weights, ids
