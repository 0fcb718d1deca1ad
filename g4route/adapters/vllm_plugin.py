"""vLLM general plugin: vLLM's Gemma 4 MoE layers route through ``g4route.route``.

Installed as the ``g4route`` entry point of the ``vllm.general_plugins`` group, which
``vllm.plugins.load_general_plugins()`` loads in every vLLM process before a model is built. Nothing is
edited in vLLM. What it relies on, in ``vllm/model_executor/models/gemma4.py`` (vLLM 0.33.0):

- ``Gemma4Router.routing_function(self, hidden_states, gating_output, topk, renormalize)`` is the
  ``custom_routing_function`` of every Gemma 4 MoE layer (and of the models that reuse the module:
  ``gemma4_mm``, ``gemma4_mtp``, ``gemma4_unified``, ``diffusion_gemma``);
- it calls the module globals ``gemma4_fused_routing_kernel_triton(gating_output, topk, per_expert_scale,
  num_warps=1)`` on CUDA, ROCm and XPU and ``gemma4_routing_function_torch(gating_output, topk,
  per_expert_scale)`` everywhere else, looked up at each call, with the layer's ``per_expert_scale``.

The plugin rebinds those two globals to functions that call ``g4route.route(gating_output, topk,
per_expert_scale)`` (softmax over all experts, top-k, renormalise, times the scale: what both compute),
so every device vLLM runs Gemma 4 on goes through g4route, even for layers built before the rebinding.
It does so when vLLM imports the model module (``import_hook.when_imported``), never importing it itself.

Off switches: ``G4ROUTE_VLLM=0``, or vLLM's allow-list ``VLLM_PLUGINS`` without ``g4route``. If the
module does not have the names and parameters above (another vLLM version), the plugin changes nothing
and logs one warning; no exception leaves it.

For a model you build by hand (your own ``FusedMoE`` layer), ``g4route.adapters.vllm.
make_vllm_routing_function(per_expert_scale)`` gives the ``custom_routing_function`` directly.
"""

from __future__ import annotations

import ast
import inspect
import logging
import types

import torch

from ..api import route
from .engines import EngineSpec, PluginLog, g4route_version, guarded, left_alone, register_plugin, scale_for_inference

__all__ = ["SPEC", "is_patched", "mismatches", "patch", "register", "unpatch"]

# Under vLLM's "vllm" logger, so the lines land in vLLM's own log with its format.
logger = logging.getLogger("vllm.g4route")
LOG = PluginLog(logger)

SPEC = EngineSpec(
    engine="vllm",
    display="vLLM",
    distribution="vllm",
    tested_version="0.33.0",
    module="vllm.model_executor.models.gemma4",
    source="vllm/model_executor/models/gemma4.py",
    env_var="G4ROUTE_VLLM",
    entry_point_group="vllm.general_plugins",
)
# The two module globals Gemma4Router.routing_function calls, with the parameters they must have.
TRITON_NAME = "gemma4_fused_routing_kernel_triton"
TORCH_NAME = "gemma4_routing_function_torch"
FUNCTIONS = {
    TRITON_NAME: ("gating_output", "topk", "per_expert_scale", "num_warps"),
    TORCH_NAME: ("gating_output", "topk", "per_expert_scale"),
}
ROUTER_CLASS = "Gemma4Router"
ROUTER_METHOD = ("routing_function", ("self", "hidden_states", "gating_output", "topk", "renormalize"))

_ORIGINALS = "_g4route_originals"  # set on the patched module: the functions it replaced


def g4route_gemma4_routing_triton(
    gating_output: torch.Tensor,
    topk: int,
    per_expert_scale: torch.Tensor,
    num_warps: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stands in for vLLM's ``gemma4_fused_routing_kernel_triton`` (CUDA, ROCm, XPU).

    ``num_warps`` was that kernel's launch parameter; g4route's tuned tables choose their own.
    Returns ``g4route.route(gating_output, topk, per_expert_scale)``: float32 weights, int32 ids.
    """
    return route(gating_output, topk, scale_for_inference(per_expert_scale))


def g4route_gemma4_routing_torch(
    gating_output: torch.Tensor,
    topk: int,
    per_expert_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stands in for vLLM's ``gemma4_routing_function_torch`` (every other device, the CPU included).

    Returns ``g4route.route(gating_output, topk, per_expert_scale)``: float32 weights, int32 ids.
    """
    return route(gating_output, topk, scale_for_inference(per_expert_scale))


_REPLACEMENTS = {TRITON_NAME: g4route_gemma4_routing_triton, TORCH_NAME: g4route_gemma4_routing_torch}


def _parameters(fn: object) -> tuple[str, ...] | None:
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def mismatches(module: types.ModuleType) -> list[str]:
    """What ``module`` (vLLM's Gemma 4 model module) lacks of what the plugin relies on; empty if nothing."""
    problems = []
    for name, params in FUNCTIONS.items():
        fn = getattr(module, name, None)
        if fn is None or not callable(fn):
            problems.append(f"no function {name}")
        elif _parameters(fn) != params:
            problems.append(f"{name}{_parameters(fn)} is not {name}{params}")
    router = getattr(module, ROUTER_CLASS, None)
    method = getattr(router, ROUTER_METHOD[0], None)
    if method is None:
        problems.append(f"no method {ROUTER_CLASS}.{ROUTER_METHOD[0]}")
        return problems
    if _parameters(method) != ROUTER_METHOD[1]:
        problems.append(f"{ROUTER_CLASS}.{ROUTER_METHOD[0]}{_parameters(method)} is not "
                        f"{ROUTER_CLASS}.{ROUTER_METHOD[0]}{ROUTER_METHOD[1]}")
    # Rebinding a global only helps if the method looks it up there at each call.
    code = getattr(method, "__code__", None)
    calls = set(code.co_names) if code is not None else set()
    problems += [f"{ROUTER_CLASS}.{ROUTER_METHOD[0]} does not call {name}" for name in FUNCTIONS if name not in calls]
    return problems


def static_mismatches(tree: ast.Module) -> list[str]:
    """The same check as ``mismatches``, on the parsed source of the module (``g4route info``: no import)."""
    problems = []
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for name, params in FUNCTIONS.items():
        node = functions.get(name)
        if node is None:
            problems.append(f"no function {name}")
        elif _ast_parameters(node) != params:
            problems.append(f"{name}{_ast_parameters(node)} is not {name}{params}")
    router = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == ROUTER_CLASS), None)
    method = None if router is None else next(
        (n for n in router.body if isinstance(n, ast.FunctionDef) and n.name == ROUTER_METHOD[0]), None)
    if method is None:
        return [*problems, f"no method {ROUTER_CLASS}.{ROUTER_METHOD[0]}"]
    if _ast_parameters(method) != ROUTER_METHOD[1]:
        problems.append(f"{ROUTER_CLASS}.{ROUTER_METHOD[0]}{_ast_parameters(method)} is not "
                        f"{ROUTER_CLASS}.{ROUTER_METHOD[0]}{ROUTER_METHOD[1]}")
    names = {n.id for n in ast.walk(method) if isinstance(n, ast.Name)}
    problems += [f"{ROUTER_CLASS}.{ROUTER_METHOD[0]} does not call {name}" for name in FUNCTIONS if name not in names]
    return problems


def _ast_parameters(node: ast.FunctionDef) -> tuple[str, ...]:
    args = node.args
    return tuple(a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs))


def is_patched(module: types.ModuleType) -> bool:
    """Whether ``module``'s Gemma 4 routing globals are g4route's."""
    return all(getattr(module, name, None) is fn for name, fn in _REPLACEMENTS.items())


def patch(module: types.ModuleType) -> bool:
    """Rebind ``module``'s two Gemma 4 routing functions to g4route's; True if they are g4route's after.

    Changes nothing, and logs a warning once per process, if the module is not what the plugin was
    written against. Idempotent.
    """
    if is_patched(module):
        return True
    if left_alone(SPEC, LOG, module, mismatches(module)):
        return False
    setattr(module, _ORIGINALS, {name: getattr(module, name) for name in _REPLACEMENTS})
    for name, fn in _REPLACEMENTS.items():
        setattr(module, name, fn)
    logger.info("g4route: vLLM's Gemma 4 MoE routing goes through g4route.route (%s replaced %s and %s; "
                "%s=0 turns this off)", g4route_version(), TRITON_NAME, TORCH_NAME, SPEC.env_var)
    return True


def unpatch(module: types.ModuleType) -> None:
    """Put vLLM's own two routing functions back (layers built meanwhile use them again at once)."""
    originals = module.__dict__.pop(_ORIGINALS, None)
    for name, fn in (originals or {}).items():
        setattr(module, name, fn)


_patch_safely = guarded(SPEC, patch, LOG)


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Never raises: vLLM does not catch plugin errors."""
    register_plugin(SPEC, _patch_safely, LOG)

