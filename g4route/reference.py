"""The routing contract written plainly in PyTorch: the ``torch`` backend, on any device.

This is the readable statement of what every backend computes (DESIGN.md section 2). It favours
clarity over speed: a full stable sort per row rather than a top-k, because ``torch.topk`` does
not promise an order among equal logits and ours does (descending logit, then lower expert id).
"""

from __future__ import annotations

import torch


def reference_route(
    logits: torch.Tensor,
    topk: int,
    scale: torch.Tensor | None,
    renormalize: bool,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route a 2-D ``[T, E]`` logits tensor; return ``compute_dtype`` weights and int64 ids ``[T, K]``.

    Arithmetic is done in ``compute_dtype`` (float32, like the kernel; float64 makes the oracle that
    ``g4route bench`` checks against). Rules:
    - ids: the K largest logits, by descending logit, ties to the lower expert id; NaN ranks above
      ``+inf`` and ``-0.0`` equals ``+0.0`` (``torch.sort``'s ordering, made stable).
    - ``renormalize``: softmax over the K chosen logits; otherwise softmax over all E, gathered.
    - a row whose largest logit is ``-inf`` gets weight 0; NaN or ``+inf`` maxima give NaN weights.
    - weights are multiplied by ``scale[ids]`` when a scale is given.
    """
    x = logits.to(compute_dtype)
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :topk]
    chosen = x.gather(-1, order)
    if renormalize:
        w = torch.softmax(chosen, dim=-1)
    else:
        w = torch.softmax(x, dim=-1).gather(-1, order)
    # The first chosen logit is the row's maximum; -inf there means every expert is masked.
    w = torch.where(chosen[:, :1] == float("-inf"), torch.zeros_like(w), w)
    if scale is not None:
        w = w * scale.to(compute_dtype)[order]
    return w, order


def route_reference(
    logits: torch.Tensor,
    topk: int,
    scale: torch.Tensor | None,
    renormalize: bool,
    weights: torch.Tensor,
    ids: torch.Tensor,
) -> None:
    """The ``torch`` backend: ``reference_route`` in float32, written into ``weights`` and ``ids``."""
    w, order = reference_route(logits, topk, scale, renormalize)
    weights.copy_(w)
    ids.copy_(order)
