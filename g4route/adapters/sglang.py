"""SGLang general plugin: SGLang's Gemma 4 MoE layers route through ``g4route.route``.

Installed as the ``g4route`` entry point of the ``sglang.srt.plugins`` group, which
``sglang.srt.plugins.load_plugins()`` runs early in every SGLang process. Nothing is edited in SGLang.
What it relies on, in ``sglang/srt/models/gemma4_causal.py`` (SGLang 0.5.23):

- ``Gemma4MoE.__init__`` defines a closure ``routing_function(hidden_states, gating_output, topk,
  renormalize)`` over the layer's ``per_expert_scale`` and hands it to its ``TopK`` as
  ``custom_routing_function`` (kept in ``self.topk.topk_config``), which ``select_experts`` calls on
  every device path that routes through the model (CUDA and ROCm: a fused Triton kernel for 2-D inputs;
  XPU: ``torch.topk`` and a Triton epilogue; CPU and the rest: inline PyTorch, all inside the closure);
- ``gemma4_mm``, ``gemma4_mtp``, ``gemma4_unified`` and ``gemma4_diffusion`` build their MoE layers from
  that same ``Gemma4MoE`` class.

Replacing the module's kernel functions would miss the XPU and CPU branches, which are inline code in
the closure, so the plugin wraps ``Gemma4MoE.__init__`` instead: after SGLang's own ``__init__`` has
built the layer, the layer's ``custom_routing_function`` becomes one that calls ``g4route.route(
gating_output, topk, per_expert_scale)`` with the scale SGLang's closure holds, for every device at once.
It does so when SGLang imports the model module (``import_hook.when_imported``), never importing it itself.

Off switches: ``G4ROUTE_SGLANG=0``, or SGLang's allow-list ``SGLANG_PLUGINS`` without ``g4route``. If
the module is not what the plugin was written against, it changes nothing and logs one warning; no
exception leaves it.
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import types
from collections.abc import Callable

import torch

from ..api import route
from .engines import EngineSpec, PluginLog, g4route_version, guarded, left_alone, register_plugin, scale_for_inference

__all__ = ["SPEC", "is_patched", "make_sglang_routing_function", "mismatches", "patch", "register", "unpatch"]

# SGLang's modules log through loggers named after them; this one sits beside its plugin loader's.
logger = logging.getLogger("sglang.srt.plugins.g4route")
LOG = PluginLog(logger)

SPEC = EngineSpec(
    engine="sglang",
    display="SGLang",
    distribution="sglang",
    tested_version="0.5.23",
    module="sglang.srt.models.gemma4_causal",
    source="sglang/srt/models/gemma4_causal.py",
    env_var="G4ROUTE_SGLANG",
    entry_point_group="sglang.srt.plugins",
)
MOE_CLASS = "Gemma4MoE"
CLOSURE = ("routing_function", ("hidden_states", "gating_output", "topk", "renormalize"))
SCALE_VARIABLE = "per_expert_scale"  # the closure's free variable holding the layer's scale

_WRAPPED = "_g4route_wrapped"  # set on the wrapping __init__: the __init__ it wraps

RoutingFunction = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def make_sglang_routing_function(per_expert_scale: torch.Tensor) -> RoutingFunction:
    """The ``custom_routing_function`` the plugin gives each Gemma 4 MoE layer of SGLang.

    ``routing_function(hidden_states, gating_output, topk, renormalize)`` returns
    ``g4route.route(gating_output, topk, per_expert_scale)``: float32 weights, int32 ids. Like SGLang's
    own closure it always renormalises (Gemma 4 does; ``renormalize`` is part of the signature only) and
    ignores ``hidden_states``. The tensor is bound, not its values: weights loaded into it later are used.
    """

    def routing_function(
        hidden_states: torch.Tensor,
        gating_output: torch.Tensor,
        topk: int,
        renormalize: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return route(gating_output, topk, scale_for_inference(per_expert_scale))

    routing_function.__qualname__ = routing_function.__name__ = "g4route_sglang_routing_function"
    return routing_function


def _closure_code(init: object) -> types.CodeType | None:
    """The code of the routing closure ``Gemma4MoE.__init__`` defines, if it has the expected shape."""
    code = getattr(init, "__code__", None)
    for const in code.co_consts if code is not None else ():
        if isinstance(const, types.CodeType) and const.co_name == CLOSURE[0]:
            return const
    return None


def mismatches(module: types.ModuleType) -> list[str]:
    """What ``module`` (SGLang's Gemma 4 model module) lacks of what the plugin relies on; empty if nothing."""
    cls = getattr(module, MOE_CLASS, None)
    if not isinstance(cls, type):
        return [f"no class {MOE_CLASS}"]
    # Through any wrappers (functools.wraps: ours, or another plugin's hook) to SGLang's own __init__.
    closure = _closure_code(inspect.unwrap(cls.__init__))
    if closure is None:
        return [f"{MOE_CLASS}.__init__ defines no {CLOSURE[0]}"]
    params = closure.co_varnames[:closure.co_argcount]
    problems = []
    if params != CLOSURE[1]:
        problems.append(f"{CLOSURE[0]}{params} is not {CLOSURE[0]}{CLOSURE[1]}")
    if SCALE_VARIABLE not in closure.co_freevars:
        problems.append(f"{CLOSURE[0]} does not close over {SCALE_VARIABLE}")
    topk = getattr(module, "TopK", None)
    if not isinstance(topk, type) or "custom_routing_function" not in inspect.signature(topk).parameters:
        problems.append("no TopK taking a custom_routing_function")
    return problems


def static_mismatches(tree: ast.Module) -> list[str]:
    """The same check as ``mismatches``, on the parsed source of the module (``g4route info``: no import)."""
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == MOE_CLASS), None)
    if cls is None:
        return [f"no class {MOE_CLASS}"]
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    closure = None if init is None else next(
        (n for n in init.body if isinstance(n, ast.FunctionDef) and n.name == CLOSURE[0]), None)
    if closure is None:
        return [f"{MOE_CLASS}.__init__ defines no {CLOSURE[0]}"]
    problems = []
    params = tuple(a.arg for a in closure.args.args)
    if params != CLOSURE[1]:
        problems.append(f"{CLOSURE[0]}{params} is not {CLOSURE[0]}{CLOSURE[1]}")
    if SCALE_VARIABLE not in {n.id for n in ast.walk(closure) if isinstance(n, ast.Name)}:
        problems.append(f"{CLOSURE[0]} does not close over {SCALE_VARIABLE}")
    handed_over = any(
        isinstance(n, ast.Call) and getattr(n.func, "id", None) == "TopK"
        and any(k.arg == "custom_routing_function" and getattr(k.value, "id", None) == CLOSURE[0]
                for k in n.keywords)
        for n in ast.walk(init))
    if not handed_over:
        problems.append(f"{MOE_CLASS}.__init__ does not pass {CLOSURE[0]} to TopK as custom_routing_function")
    return problems


def is_patched(module: types.ModuleType) -> bool:
    """Whether ``module``'s ``Gemma4MoE.__init__`` is g4route's wrapper."""
    cls = getattr(module, MOE_CLASS, None)
    return isinstance(cls, type) and hasattr(cls.__init__, _WRAPPED)


def patch(module: types.ModuleType) -> bool:
    """Wrap ``module.Gemma4MoE.__init__``; True if layers built from now on route through g4route.

    Changes nothing, and logs a warning once per process, if the module is not what the plugin was
    written against. Idempotent.
    """
    if is_patched(module):
        return True
    if left_alone(SPEC, LOG, module, mismatches(module)):
        return False
    cls = getattr(module, MOE_CLASS)
    original_init = cls.__init__
    closure = _closure_code(inspect.unwrap(original_init))

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        _reroute(self, closure)

    setattr(__init__, _WRAPPED, original_init)
    cls.__init__ = __init__
    logger.info("g4route: SGLang's Gemma 4 MoE routing goes through g4route.route (%s; every %s built from "
                "now on; %s=0 turns this off)", g4route_version(), MOE_CLASS, SPEC.env_var)
    return True


def _reroute(layer: object, closure: types.CodeType) -> None:
    """Give ``layer``'s TopK g4route's routing function, with the scale SGLang's own closure holds."""
    try:
        config = layer.topk.topk_config
        own = config.custom_routing_function
        if getattr(own, "__code__", None) is not closure:
            # Someone else (another plugin) has already replaced it: leave theirs alone.
            LOG.warn_once(f"a {MOE_CLASS} layer's custom_routing_function is {own!r}, not SGLang's own; left as it is")
            return
        scale = own.__closure__[closure.co_freevars.index(SCALE_VARIABLE)].cell_contents
        config.custom_routing_function = make_sglang_routing_function(scale)
    except Exception as exc:  # a layer keeps SGLang's routing rather than failing to build
        LOG.warn_once(f"could not reroute a {MOE_CLASS} layer ({type(exc).__name__}: {exc}); "
                      "it keeps SGLang's own routing")


def unpatch(module: types.ModuleType) -> None:
    """Put SGLang's own ``Gemma4MoE.__init__`` back (layers built before keep g4route's routing)."""
    cls = getattr(module, MOE_CLASS, None)
    original = getattr(getattr(cls, "__init__", None), _WRAPPED, None)
    if original is not None:
        cls.__init__ = original


_patch_safely = guarded(SPEC, patch, LOG)


def register() -> None:
    """The ``sglang.srt.plugins`` entry point. Never raises."""
    register_plugin(SPEC, _patch_safely, LOG)

