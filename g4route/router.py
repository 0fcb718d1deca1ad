"""``router()``: Gemma 4's whole router (RMSNorm, scale, projection, routing) in one call.

On NVIDIA, AMD and Intel GPUs (and under ``G4ROUTE_BACKEND=interpreter``) it is one launch of the
fused kernel in ``router_kernel.py``; elsewhere, and for shapes past the kernel's limits, the same
arithmetic in PyTorch (:func:`router_torch`). While something traces the call (``torch.compile``,
``torch.export``, a dispatch mode) it is one ``g4route::router`` (or ``router_out``) operator node, as
``route()`` is.

Numerics (what ``tests/test_router.py`` checks against a float64 oracle):

- The logits are ``fl32(r * H**-0.5) * S_e`` with ``r = 1 / sqrt(mean(x**2) + eps)`` (float32) and
  ``S_e = sum_h x_h * V[e, h]`` accumulated in float32, where ``V = W * scale`` is formed in float32 and
  rounded once to the weight's dtype (:func:`folded_weight`; ``V = W`` without ``scale``). ``x`` enters
  unrounded. float32 hidden states reach the tensor cores at about float32's accuracy, as the vendor
  table's ``float32_dot`` says: TF32x3 on NVIDIA (each factor split into a high and a low TF32 part,
  three products, the low x low one dropped), six bfloat16 products on AMD, a float32 product on Intel.
- So each logit is within ``delta_e = r * H**-0.5 * (|sum_h x_h (V[e, h] - W[e, h] scale_h)| + t +
  g * sum_h |x_h V[e, h]|) + 4 g |logit_e|`` of the float64 oracle (times 1 + 1e-3 for second-order
  terms): the first term is the exact effect of rounding ``V`` (0 without ``scale``), ``t = 2**-18 *
  sum_h |x_h V[e, h]|`` covers those split products for float32 hidden states (0 otherwise: 16-bit
  products are exact in float32),
  and ``g = H * 2**-24`` bounds float32 accumulation of H terms in any order (the tensor cores', the
  split's, NumPy's or a CPU BLAS's). :func:`logit_error_bound` computes it.
- The experts are chosen exactly, with ``route()``'s order and tie rule, on those float32 logits. Hence
  they are the oracle's wherever the oracle's gap between its K-th and (K+1)-th logit exceeds
  ``2 * max_e delta_e``; the weights are the oracle's within a relative ``exp(2 max delta) - 1`` (plus
  float32 rounding).
- Transformers' unfused bfloat16 router rounds three times before the projection (the normalised
  hidden state, times ``scale``, times ``H**-0.5``, each to bfloat16) and returns bfloat16 logits (8
  significant bits): its K-th place ties far more often, and its logits are further from the oracle.
"""

from __future__ import annotations

import weakref

import torch

from . import op, registry, router_kernel
from .api import _check_logits, _check_out, _check_topk, _refuse_grad, _rows_flatten_as_view, _traced
from .reference import route_torch

__all__ = ["folded_weight", "logit_error_bound", "router", "router_torch"]


def router_torch(hidden: torch.Tensor, weight: torch.Tensor, topk: int, norm_scale: torch.Tensor | None,
                 scale: torch.Tensor | None, eps: float, renormalize: bool) -> tuple:
    """The fused router's arithmetic in PyTorch ops, on 2-D ``[T, H]`` hidden states: ``(weights, ids,
    logits)``, the logits float32 ``[T, E]``. The roundings are the kernel's (``W * scale`` once to the
    weight's dtype, :func:`folded_weight`); float32 hidden states get an IEEE float32 product, not TF32."""
    wide = hidden.float()
    H = hidden.shape[1]
    inv_rms = torch.sqrt((wide * wide).sum(dim=1, keepdim=True) / H + eps).reciprocal() * (float(H) ** -0.5)
    logits = (wide @ folded_weight(weight, norm_scale).float().T) * inv_rms
    weights, ids = route_torch(logits, topk, scale, renormalize)
    return weights, ids, logits


# Folded weights, by id(weight): (a weak reference to the weight, the versions it was made from, W * scale).
_FOLDED: dict[int, tuple] = {}


def folded_weight(weight: torch.Tensor, norm_scale: torch.Tensor | None) -> torch.Tensor:
    """``weight * norm_scale`` (``[E, H]``, the scale along H) formed in float32 and rounded once to the
    weight's dtype: the operand the fused kernel multiplies the raw hidden states by.

    Kept per weight while the weight and the scale are unchanged (the same scale tensor, and neither
    modified in place since: their version counters), so inference pays for it once per layer, with one
    extra ``[E, H]`` copy of memory. A capture of a CUDA graph uses the kept copy (call once before
    capturing: ``patch_gemma4`` and engines warm up anyway); one made during a capture is not kept (its
    memory is only written by replays) and becomes part of the graph. Inference-mode tensors keep no
    version counter: for them it is made on every call."""
    if norm_scale is None:
        return weight
    tracked = not (weight.is_inference() or norm_scale.is_inference())
    state = (norm_scale.data_ptr(), norm_scale.dtype, norm_scale._version, weight._version) if tracked else None
    entry = _FOLDED.get(id(weight))
    if state is not None and entry is not None and entry[0]() is weight and entry[1] == state:
        return entry[2]
    folded = (weight.float() * norm_scale.float()).to(weight.dtype)
    if state is not None and not (weight.is_cuda and torch.cuda.is_current_stream_capturing()):
        key = id(weight)
        _FOLDED[key] = (weakref.ref(weight, lambda _, key=key: _FOLDED.pop(key, None)), state, folded)
    return folded


def logit_error_bound(hidden: torch.Tensor, weight: torch.Tensor, norm_scale: torch.Tensor | None = None,
                      eps: float = 1e-6) -> torch.Tensor:
    """The bound ``delta`` ``[..., E]`` (float64) on ``|router logit - float64 oracle logit|`` that the fused
    router guarantees for these inputs, on every backend (see the module docstring for its derivation)."""
    x = hidden.double().reshape(-1, hidden.shape[-1])
    H = x.shape[1]
    exact = weight.double() if norm_scale is None else weight.double() * norm_scale.double()
    folded = folded_weight(weight, norm_scale).double()
    r = torch.rsqrt((x * x).mean(dim=1, keepdim=True) + eps) * H**-0.5
    magnitude = x.abs() @ folded.abs().T  # sum_h |x_h V[e, h]|
    # The rounding of V = W * scale, exactly: the same rounding the kernel's operand had.
    rounding = (x @ (folded - exact).T).abs()
    if hidden.dtype == torch.float32:  # TF32x3 / bf16x6: the dropped small products and the parts' conversions
        rounding = rounding + magnitude * 2.0**-18
    g = H * 2.0**-24  # float32 accumulation of H terms, in any order
    oracle = (x @ exact.T) * r
    # g / 2 + a few ulps on r (its sum of squares, sqrt, division, the constant H**-0.5, the last product):
    # 4 g covers them; the factor (1 + 1e-3) covers the second-order terms.
    bound = (r * (rounding + magnitude * g) + oracle.abs() * 4 * g) * (1 + 1e-3)
    return bound.reshape(*hidden.shape[:-1], weight.shape[0])


def _check_router_args(hidden, weight, topk, norm_scale, scale, eps, renormalize, return_logits):
    hidden = _check_logits(hidden, "hidden", "H")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"proj_weight must be a torch.Tensor, got {type(weight).__name__}")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(f"proj_weight must have shape [E, H] = [E, {H}] with E >= 1 (nn.Linear(H, E).weight), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"proj_weight is {weight.dtype} but hidden is {hidden.dtype}: they must share a dtype "
                        "(the projection runs on the tensor cores in that dtype)")
    device = hidden.device
    if weight.device != device:
        raise ValueError(f"proj_weight is on {weight.device}, but hidden is on {device}")
    num_experts = weight.shape[0]
    topk = _check_topk(topk, num_experts)
    for name, tensor, size, what in (("scale", norm_scale, H, "H"), ("per_expert_scale", scale, num_experts, "E")):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {tensor.dtype}")
        if tensor.shape != (size,):
            raise ValueError(f"{name} must have shape [{what}] = [{size}], got {tuple(tensor.shape)}")
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, but hidden is on {device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    for name, flag in (("renormalize", renormalize), ("return_logits", return_logits)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, norm_scale, scale)):
        raise TypeError("router() has no backward: an input requires grad with grad mode on. For training, "
                        "project first and call g4route.route() on the logits (differentiable), or call router() "
                        "under torch.no_grad(); patch_gemma4(fuse_router=True) does the former by itself")
    return hidden, weight, topk, float(eps)


def router(
    hidden: torch.Tensor,
    proj_weight: torch.Tensor,
    topk: int,
    *,
    scale: torch.Tensor | None = None,
    per_expert_scale: torch.Tensor | None = None,
    eps: float = 1e-6,
    renormalize: bool = True,
    out: tuple[torch.Tensor, ...] | None = None,
    return_logits: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Gemma 4's router end to end: RMSNorm (no weight) times ``scale`` times ``H**-0.5``, the projection
    ``H -> E``, then ``route()``: softmax, top-K, renormalise, times ``per_expert_scale``.

    Args:
        hidden: hidden states ``[..., H]``, float32, bfloat16 or float16; rows may be strided.
        proj_weight: the projection's weight ``[E, H]`` (``nn.Linear(H, E, bias=False).weight``), the
            hidden states' dtype, on their device.
        topk: K, the experts per token, ``1 <= K <= E``.
        scale: the router's learned per-dimension scale ``[H]`` (``Gemma4TextRouter.scale``), or None.
        per_expert_scale: ``[E]``, or None (all ones).
        eps: the RMSNorm's epsilon (Gemma 4: ``config.rms_norm_eps``, 1e-6).
        renormalize: as in ``route()``.
        out: ``(weights, ids)``, or ``(weights, ids, logits)`` with ``return_logits``: buffers of shape
            ``[..., K]`` float32 and int32 (and ``[..., E]`` float32), written in place and returned.
        return_logits: also return the float32 logits ``[..., E]`` that the routing chose from (for the
            all-expert softmax that ``output_router_logits`` and the load-balancing loss use).

    Returns:
        ``(weights, ids)``, or ``(weights, ids, logits)``: ``route()``'s output contract applied to the
        float32 logits this call computes, with the same order and tie rule. Accumulation is float32;
        the numerics (the bound on the logits' error and what it means for the chosen experts) are in
        this module's docstring and :func:`logit_error_bound`.

    Raises:
        TypeError, ValueError: naming the argument, for any call outside this contract; ``TypeError`` when
            an input requires grad with grad mode on (the fused router has no backward).
    """
    hidden, proj_weight, topk, eps = _check_router_args(hidden, proj_weight, topk, scale, per_expert_scale, eps,
                                                        renormalize, return_logits)
    device = hidden.device
    if out is None:
        if _traced(hidden):
            weights, ids, logits = ROUTER(hidden, proj_weight, topk, scale, per_expert_scale, eps, renormalize,
                                             return_logits)
        else:
            weights, ids, logits = run_new(hidden, proj_weight, topk, scale, per_expert_scale, eps, renormalize,
                                           return_logits)
        return (weights, ids, logits) if return_logits else (weights, ids)
    if not isinstance(out, (tuple, list)) or len(out) != 2 + return_logits:
        raise TypeError(f"out must be {'(weights, ids, logits)' if return_logits else '(weights, ids)'} with "
                        f"return_logits={return_logits}")
    weights, ids = _check_out(tuple(out[:2]), hidden, topk, device)
    logits = None
    if return_logits:
        logits = out[2]
        shape = (*hidden.shape[:-1], proj_weight.shape[0])
        if not isinstance(logits, torch.Tensor) or logits.dtype != torch.float32 or logits.shape != shape:
            raise TypeError(f"out logits must be a float32 tensor of shape {list(shape)}")
        if logits.device != device:
            raise ValueError(f"out logits is on {logits.device}, but hidden is on {device}")
        _refuse_grad(logits, "out logits")
        if not _rows_flatten_as_view(logits):
            raise ValueError("out logits: its leading dimensions must be flattenable without a copy")
    if _traced(hidden):
        ROUTER_OUT(hidden, proj_weight, topk, scale, per_expert_scale, eps, renormalize, weights, ids, logits)
    else:
        run(hidden, proj_weight, topk, scale, per_expert_scale, eps, renormalize, weights, ids, logits)
    return (weights, ids, logits) if return_logits else (weights, ids)


def _backend(device: torch.device, num_experts: int, topk: int) -> registry.Backend:
    """``route()``'s backend for the device, or the PyTorch reference where the fused kernel's limits are
    passed (an error if ``G4ROUTE_BACKEND`` forces a kernel backend there)."""
    backend = registry.select(device, num_experts, topk)
    if backend.uses_kernel and (num_experts > router_kernel.MAX_EXPERTS or topk > router_kernel.MAX_TOPK):
        if registry.forced_name():
            raise ValueError(f"{registry.ENV_VAR}={registry.forced_name()} cannot run the fused router for E="
                             f"{num_experts}, K={topk}: its kernel takes E <= {router_kernel.MAX_EXPERTS} and K <= "
                             f"{router_kernel.MAX_TOPK} (G4ROUTE_BACKEND=torch can)")
        return registry.BACKENDS["torch"]
    return backend


def run(hidden: torch.Tensor, weight: torch.Tensor, topk: int, norm_scale: torch.Tensor | None,
        scale: torch.Tensor | None, eps: float, renormalize: bool, weights: torch.Tensor, ids: torch.Tensor,
        logits: torch.Tensor | None) -> None:
    """Route validated ``[..., H]`` hidden states into ``[..., K]`` buffers (and ``[..., E]`` logits)."""
    H, E = hidden.shape[-1], weight.shape[0]
    backend = _backend(hidden.device, E, topk)
    rows = hidden if hidden.dim() == 2 else hidden.reshape(-1, H)
    w_rows, id_rows = weights.view(-1, topk), ids.view(-1, topk)
    l_rows = None if logits is None else logits.view(-1, E)
    if not backend.uses_kernel:
        w, i, lg = router_torch(rows, weight, topk, norm_scale, scale, eps, renormalize)
        w_rows.copy_(w)
        id_rows.copy_(i)
        if l_rows is not None:
            l_rows.copy_(lg)
        return
    config = backend.router_config_for(hidden.device, rows.shape[0], hidden.dtype)
    router_kernel.launch(rows, folded_weight(weight, norm_scale), topk, scale, eps, renormalize, w_rows, id_rows,
                         l_rows, config, interpret=backend.interpret, **backend.router_options())


def run_new(hidden: torch.Tensor, weight: torch.Tensor, topk: int, norm_scale: torch.Tensor | None,
            scale: torch.Tensor | None, eps: float, renormalize: bool,
            return_logits: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`run` into fresh outputs; the logits are an empty tensor unless ``return_logits``. The PyTorch
    reference's own outputs are returned as they are, not copied into buffers allocated beforehand."""
    lead, E = hidden.shape[:-1], weight.shape[0]
    if not _backend(hidden.device, E, topk).uses_kernel:
        w, i, lg = router_torch(hidden.reshape(-1, hidden.shape[-1]), weight, topk, norm_scale, scale, eps,
                                renormalize)
        logits = lg.reshape(*lead, E) if return_logits else hidden.new_empty((0,), dtype=torch.float32)
        return w.reshape(*lead, topk), i.reshape(*lead, topk), logits
    weights = hidden.new_empty((*lead, topk), dtype=torch.float32)
    ids = hidden.new_empty((*lead, topk), dtype=torch.int32)
    logits = hidden.new_empty((*lead, E) if return_logits else (0,), dtype=torch.float32)
    run(hidden, weight, topk, norm_scale, scale, eps, renormalize, weights, ids, logits if return_logits else None)
    return weights, ids, logits


# The operators torch.compile and torch.export see (as route()'s, in op.py's library): the fused router
# allocating its outputs (the logits an empty tensor unless asked for), and writing caller-owned ones.
op._LIB.define(
    "router(Tensor hidden, Tensor proj_weight, SymInt topk, Tensor? scale, Tensor? per_expert_scale, float eps, "
    "bool renormalize, bool return_logits) -> (Tensor, Tensor, Tensor)",
    tags=op._TAGS,
)
op._LIB.define(
    "router_out(Tensor hidden, Tensor proj_weight, SymInt topk, Tensor? scale, Tensor? per_expert_scale, float eps, "
    "bool renormalize, Tensor(a!) weights, Tensor(b!) ids, Tensor(c!)? logits) -> ()",
    tags=op._TAGS,
)


def _router_fake(hidden, proj_weight, topk, scale, per_expert_scale, eps, renormalize, return_logits):
    lead = hidden.shape[:-1]
    return (hidden.new_empty((*lead, topk), dtype=torch.float32), hidden.new_empty((*lead, topk), dtype=torch.int32),
            hidden.new_empty((*lead, proj_weight.shape[0]) if return_logits else (0,), dtype=torch.float32))


def _router_out_fake(hidden, proj_weight, topk, scale, per_expert_scale, eps, renormalize, weights, ids, logits):
    return None


op._LIB.impl("router", run_new, "CompositeExplicitAutograd")
op._LIB.impl("router_out", run, "CompositeExplicitAutograd")
torch.library.register_fake("g4route::router", _router_fake, lib=op._LIB)
torch.library.register_fake("g4route::router_out", _router_out_fake, lib=op._LIB)

ROUTER = torch.ops.g4route.router.default
ROUTER_OUT = torch.ops.g4route.router_out.default
