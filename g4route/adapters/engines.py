"""What the serving-engine plugins share, and what ``g4route info`` says about them.

- ``EngineSpec``: what a plugin is written against (the engine's distribution, the tested version, the
  model module it patches and its source path, its off switch, its entry-point group).
- ``plugin_enabled(env_var)``: the off switch (``G4ROUTE_VLLM=0``, ``G4ROUTE_SGLANG=0``).
- ``scale_for_inference(scale)``: the layer's per-expert scale as route() takes it.
- ``PluginLog`` and ``register_plugin``: a plugin's entry point, its patch run inside the engine's import
  of the model module, and its one warning per process; none of them ever raises into the engine.
- ``engine_reports()``: for ``g4route info``, each engine found, whether g4route's plugin is registered
  and allowed, and whether it would apply to the installed engine's model code. Cheap: package metadata
  and a parse of one source file; no engine is imported.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import logging
import os
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .import_hook import when_imported

__all__ = ["EngineReport", "EngineSpec", "PluginLog", "engine_reports", "g4route_version", "guarded",
           "plugin_enabled", "register_plugin", "scale_for_inference"]

ENTRY_POINT_NAME = "g4route"
_OFF = ("0", "false", "no", "off")


@dataclass(frozen=True)
class EngineSpec:
    engine: str                 # the engine's key (engine_reports, the CLI)
    display: str                # its name in messages
    distribution: str           # its pip distribution
    tested_version: str         # the version the plugin was written and tested against
    module: str                 # the model module the plugin patches when the engine imports it
    source: str                 # that module's file, relative to the distribution's root
    env_var: str                # g4route's off switch for this engine
    entry_point_group: str      # the engine's plugin group, where g4route registers ENTRY_POINT_NAME


def plugin_enabled(env_var: str) -> bool:
    """False when ``env_var`` is set to 0 (or false, no, off); unset or anything else means on."""
    return os.environ.get(env_var, "").strip().lower() not in _OFF


def scale_for_inference(scale: torch.Tensor | None) -> torch.Tensor | None:
    """The per-expert scale, detached where autograd is on.

    Engines keep it as an ``nn.Parameter`` (which requires grad) and route under ``torch.inference_mode``;
    route() refuses inputs that require grad when autograd is on, and routing is inference-only anyway.
    """
    if scale is not None and scale.requires_grad and torch.is_grad_enabled():
        return scale.detach()
    return scale


class PluginLog:
    """A plugin's messages in the engine's log: what it did, and at most one warning per process about
    what it could not do (a plugin that cannot apply must say so, once, and change nothing)."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.warned = False

    def warn_once(self, message: str) -> None:
        if not self.warned:
            self.warned = True
            self.logger.warning("g4route: %s", message)


def guarded(spec: EngineSpec, patch: Callable[[types.ModuleType], object],
            log: PluginLog) -> Callable[[types.ModuleType], None]:
    """``patch`` as it must run inside the engine's import of the model module: an exception there would
    fail the engine's import, so it becomes the plugin's one warning and the engine's own routing stays."""

    def patch_safely(module: types.ModuleType) -> None:
        try:
            patch(module)
        except Exception as exc:
            log.warn_once(f"could not patch {module.__name__} ({type(exc).__name__}: {exc}); "
                          f"{spec.display}'s own Gemma 4 routing is kept")

    return patch_safely


def left_alone(spec: EngineSpec, log: PluginLog, module: types.ModuleType, problems: list[str]) -> bool:
    """Whether ``module`` must be left as it is because of ``problems`` (what it lacks of the code the plugin
    was written against); if so, say so in the plugin's one warning."""
    if problems:
        log.warn_once(f"{module.__name__} is not what g4route's plugin was written against ({spec.display} "
                      f"{spec.tested_version}): {'; '.join(problems)}. {spec.display}'s own Gemma 4 routing is kept.")
    return bool(problems)


def register_plugin(spec: EngineSpec, patch_safely: Callable[[types.ModuleType], None], log: PluginLog) -> None:
    """What an engine's entry point runs: unless ``spec.env_var`` turns it off, ``patch_safely`` (see
    :func:`guarded`) the model module when the engine imports it, or now if it has. Never raises: the
    engines do not catch plugin errors."""
    kept = f"{spec.display}'s own Gemma 4 routing is kept"
    try:
        if not plugin_enabled(spec.env_var):
            log.logger.info("g4route: %s=0, %s", spec.env_var, kept)
            return
        when_imported(spec.module, patch_safely)
    except Exception as exc:
        log.warn_once(f"plugin not loaded ({type(exc).__name__}: {exc}); {kept}")


def g4route_version() -> str:
    from .. import __version__

    return f"g4route {__version__}"


@dataclass(frozen=True)
class EngineReport:
    engine: str
    version: str | None         # None: not installed
    registered: bool            # g4route's entry point is in the engine's plugin group
    blocked_by: str | None      # the setting that turns the plugin off, if one does
    problems: tuple[str, ...]   # what the installed model code lacks (empty: the plugin applies)

    @property
    def applies(self) -> bool:
        return self.version is not None and self.registered and self.blocked_by is None and not self.problems

    def describe(self) -> str:
        if self.version is None:
            return f"{self.engine}: not installed"
        if self.applies:
            verdict = "g4route plugin applies: its Gemma 4 MoE routing goes through g4route.route"
        elif self.problems:
            verdict = "plugin would change nothing: " + "; ".join(self.problems)
        elif not self.registered:
            verdict = (f"g4route's {ENTRY_POINT_NAME!r} entry point is not registered "
                       "(pip install g4route, rather than running it from a checkout)")
        else:
            verdict = f"plugin off ({self.blocked_by})"
        return f"{self.engine} {self.version}: {verdict}"


def engine_reports() -> list[EngineReport]:
    """One report per engine g4route has a plugin for (vLLM, SGLang), installed or not."""
    from . import sglang, vllm_plugin

    return [
        _report(vllm_plugin.SPEC, vllm_plugin.static_mismatches, _vllm_allow_list),
        _report(sglang.SPEC, sglang.static_mismatches, _sglang_allow_list),
    ]


def _report(spec: EngineSpec, static_check: Callable[[ast.Module], list[str]],
            allow_list: Callable[[], str | None]) -> EngineReport:
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        return EngineReport(spec.engine, None, False, None, ())
    registered = any(ep.name == ENTRY_POINT_NAME and ep.value.startswith("g4route.")
                     for ep in metadata.entry_points(group=spec.entry_point_group))
    blocked_by = None if plugin_enabled(spec.env_var) else f"{spec.env_var}={os.environ[spec.env_var]}"
    blocked_by = blocked_by or allow_list()
    try:
        with open(dist.locate_file(spec.source), encoding="utf-8") as f:
            problems = tuple(static_check(ast.parse(f.read())))
    except (OSError, SyntaxError) as exc:
        problems = (f"cannot read {spec.source}: {exc}",)
    if problems and dist.version != spec.tested_version:
        problems = (f"written against {spec.display} {spec.tested_version}", *problems)
    return EngineReport(spec.engine, dist.version, registered, blocked_by, problems)


def _vllm_allow_list() -> str | None:
    # vLLM: VLLM_PLUGINS unset loads every plugin; set (even empty), only the names it lists.
    value = os.environ.get("VLLM_PLUGINS")
    if value is None or ENTRY_POINT_NAME in value.split(","):
        return None
    return f"VLLM_PLUGINS={value!r} does not list {ENTRY_POINT_NAME!r}"


def _sglang_allow_list() -> str | None:
    # SGLang: SGLANG_PLUGINS unset or empty loads every plugin; otherwise only the names it lists.
    value = os.environ.get("SGLANG_PLUGINS", "")
    names = {n.strip() for n in value.split(",") if n.strip()}
    if not names or ENTRY_POINT_NAME in names:
        return None
    return f"SGLANG_PLUGINS={value!r} does not list {ENTRY_POINT_NAME!r}"
