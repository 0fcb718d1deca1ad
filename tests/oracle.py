"""The float64 oracle every backend is checked against, and the comparison helpers.

It states the contract (DESIGN.md section 2) independently of g4route's code: selection by a stable
descending sort in float64, NaN first, then the softmax in float64.
"""

from __future__ import annotations

import torch


def oracle(logits: torch.Tensor, topk: int, scale: torch.Tensor | None = None, renormalize: bool = True):
    """Float64 weights and int64 ids ``[..., K]`` for ``logits [..., E]``."""
    x = logits.double()
    # A stable descending sort keeps equal logits in id order; NaN goes first as in torch.topk.
    rank_key = torch.where(torch.isnan(x), torch.full_like(x, float("inf")), x)
    nan_first = torch.isnan(x).double()
    order = torch.sort(rank_key, dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, torch.sort(nan_first.gather(-1, order), dim=-1, descending=True, stable=True).indices)
    ids = order[..., :topk]
    chosen = x.gather(-1, ids)
    probs = torch.softmax(chosen if renormalize else x, dim=-1)
    weights = probs if renormalize else probs.gather(-1, ids)
    weights = torch.where(chosen[..., :1] == float("-inf"), torch.zeros_like(weights), weights)
    if scale is not None:
        weights = weights * scale.double()[ids]
    return weights, ids


def assert_routes_like_oracle(result, logits, topk, scale=None, renormalize=True):
    """Exact ids (the tie rule included), weights to float32 accuracy, the output contract."""
    weights, ids = result
    lead = tuple(logits.shape[:-1])
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert tuple(weights.shape) == (*lead, topk) and tuple(ids.shape) == (*lead, topk)
    assert weights.device == logits.device and ids.device == logits.device
    ref_w, ref_ids = oracle(logits, topk, scale, renormalize)
    num_experts = logits.shape[-1]
    assert bool(((ids >= 0) & (ids < num_experts)).all()), "an id is out of [0, E)"
    mismatch = ids.long() != ref_ids
    if bool(mismatch.any()):
        where = mismatch.nonzero()[0].tolist()
        raise AssertionError(f"ids differ from the oracle first at {where}: {ids[tuple(where[:-1])].tolist()} "
                             f"vs {ref_ids[tuple(where[:-1])].tolist()}")
    scale_max = 1.0 if scale is None else float(scale.double().abs().max().clamp(min=1.0))
    torch.testing.assert_close(weights.double(), ref_w, rtol=1e-5, atol=1e-6 * scale_max, equal_nan=True)


def _softmax_or_zero(z: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; a row of only -inf gives 0 (and gradient 0), not autograd's 0/0 NaN."""
    shift = z.detach().amax(-1, keepdim=True)
    shift = torch.where(shift == float("-inf"), torch.zeros_like(shift), shift)  # shift-invariant: any finite
    e = torch.exp(z - shift)
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total)


def oracle_gradients(logits, ids, grad_weights, scale=None, renormalize=True):
    """Float64 autograd of the weights as a function of the logits and the scale, the ids held fixed:
    ``(grad_logits, grad_scale)`` (``grad_scale`` None without a scale). Written independently of
    g4route: softmax over the K chosen logits (or over all E, gathered), times ``scale[ids]``."""
    x = logits.detach().double().requires_grad_(True)
    s = None if scale is None else scale.detach().double().requires_grad_(True)
    ids = ids.long()
    weights = _softmax_or_zero(x.gather(-1, ids)) if renormalize else _softmax_or_zero(x).gather(-1, ids)
    if s is not None:
        weights = weights * s[ids]
    inputs = [x] if s is None else [x, s]
    grads = torch.autograd.grad(weights, inputs, grad_weights.double())
    return grads[0], (grads[1] if s is not None else None)
