"""g4route: Gemma 4 mixture-of-experts routing, one fused Triton kernel on every GPU vendor.

``route()`` is the entry point (``router()``: Gemma 4's whole router, norm and projection included, in one
kernel); ``backends()``, ``available_backends()`` and ``backend_for()``
say which backends exist, which this machine can run, and which one a device gets.
"""

from __future__ import annotations

import torch

from . import registry
from .api import route
from .router import router

__version__ = "0.1.0"
__all__ = ["__version__", "available_backends", "backend_for", "backends", "route", "router"]


def backends() -> list[str]:
    """Every backend name ``G4ROUTE_BACKEND`` accepts."""
    return list(registry.BACKENDS)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends this machine can run, for tensors on ``device`` if given."""
    return registry.available(None if device is None else torch.device(device))


def backend_for(device: torch.device | str, num_experts: int = 128, topk: int = 8) -> str:
    """The backend ``route()`` would use for logits on ``device`` (honours ``G4ROUTE_BACKEND``)."""
    return registry.select(torch.device(device), num_experts, topk).name
