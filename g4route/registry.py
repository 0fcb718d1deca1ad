"""Backend records and the choice of one for a tensor's device, with the ``G4ROUTE_BACKEND`` override.

A backend is small: which tensors it takes, whether this platform can run it (and why not), which
tuned table it reads, and whether it launches the Triton kernel, the interpreted kernel or the
PyTorch reference.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from . import backward, configs, kernel, platforms
from .kernel import LaunchConfig
from .platforms import PlatformFacts
from .reference import route_reference, route_torch
from .router_kernel import RouterConfig

ENV_VAR = "G4ROUTE_BACKEND"


def _needs_triton(facts: PlatformFacts) -> str | None:
    return None if facts.triton_error is None else f"Triton is not importable ({facts.triton_error})"


def _cuda_reason(facts: PlatformFacts) -> str | None:
    if facts.cuda_version is None:
        build = f"a ROCm build (HIP {facts.hip_version})" if facts.hip_version else "not a CUDA build"
        return f"PyTorch {facts.torch_version} is {build}"
    if not facts.cuda_available:
        return "torch.cuda.is_available() is False (no NVIDIA GPU or driver visible)"
    return _needs_triton(facts)


def _rocm_reason(facts: PlatformFacts) -> str | None:
    if facts.hip_version is None:
        return f"PyTorch {facts.torch_version} is not a ROCm build (torch.version.hip is None)"
    if not facts.cuda_available:
        return "torch.cuda.is_available() is False (no AMD GPU or driver visible)"
    return _needs_triton(facts)


def _xpu_reason(facts: PlatformFacts) -> str | None:
    if not facts.xpu_available:
        return facts.xpu_note or "no XPU device visible"
    return _needs_triton(facts)


@dataclass(frozen=True)
class Backend:
    """One way of computing ``route()``."""

    name: str
    summary: str
    device_type: str | None  # torch device type of the tensors it takes; None: any device
    table: str | None  # the tuned table in backends/ (kernel backends only)
    interpret: bool  # run the kernel under Triton's interpreter
    reason_unavailable: Callable[[PlatformFacts], str | None]
    # Launch through launcher.DirectLauncher (skipping Triton's per-call dispatch): only where its
    # specialisation rule was checked (NVIDIA).
    direct_launch: bool = False

    @property
    def uses_kernel(self) -> bool:
        return self.table is not None

    def config_for(self, device: torch.device, tokens: int, dtype: torch.dtype) -> LaunchConfig:
        """The tuned launch config for ``tokens`` rows of ``dtype`` logits on ``device``."""
        if self.table is None:
            raise ValueError(f"backend {self.name!r} does not launch the kernel")
        return _family(self.table, device).config_for(tokens, dtype)

    def router_config_for(self, device: torch.device, tokens: int, dtype: torch.dtype) -> RouterConfig:
        """The fused router's launch shape for ``tokens`` rows of ``dtype`` hidden states on ``device``."""
        if self.table is None:
            raise ValueError(f"backend {self.name!r} does not launch the kernel")
        return configs.load_table(self.table).router_config_for(_family(self.table, device), tokens, dtype)

    def router_options(self) -> dict:
        """The fused router's vendor-wide choices from the table: ``float32_dot`` (the tensor cores' precision
        for float32 hidden states), ``precise_norm`` (correctly rounded sqrt and division in the norm) and
        ``squares_by_dot`` (16-bit hidden states' sums of squares from a tensor-core product)."""
        return configs.load_table(self.table).router_options()

    def family_name(self, device: torch.device) -> str:
        return "-" if self.table is None else _family(self.table, device).name

    def route(
        self,
        logits: torch.Tensor,
        topk: int,
        scale: torch.Tensor | None,
        renormalize: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route validated 2-D ``[T, E]`` logits into fresh float32 weights and int32 ids ``[T, K]``."""
        if not self.uses_kernel:  # the reference's own outputs, not copies of them
            return route_torch(logits, topk, scale, renormalize)
        shape = (logits.shape[0], topk)
        weights = logits.new_empty(shape, dtype=torch.float32)
        ids = logits.new_empty(shape, dtype=torch.int32)
        self.run(logits, topk, scale, renormalize, weights, ids)
        return weights, ids

    def run(
        self,
        logits: torch.Tensor,
        topk: int,
        scale: torch.Tensor | None,
        renormalize: bool,
        weights: torch.Tensor,
        ids: torch.Tensor,
    ) -> None:
        """Route validated 2-D ``[T, E]`` logits into 2-D ``[T, K]`` outputs."""
        if not self.uses_kernel:
            route_reference(logits, topk, scale, renormalize, weights, ids)
            return
        config = self.config_for(logits.device, logits.shape[0], logits.dtype)
        kernel.launch(logits, topk, scale, renormalize, weights, ids, config, interpret=self.interpret,
                      direct=self.direct_launch)

    def backward(
        self,
        grad_weights: torch.Tensor,
        logits: torch.Tensor,
        weights: torch.Tensor | None,
        ids: torch.Tensor,
        scale: torch.Tensor | None,
        renormalize: bool,
        logits_grad: bool,
        scale_grad: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The gradients of ``run`` for 2-D ``[T, E]`` logits and the ``[T, K]`` weights (or ``None``) and ids it
        wrote: the backward
        kernel where this backend launches the forward kernel, the gradient of the reference's formula in
        PyTorch ops elsewhere (``backward.py``). The caller casts ``grad_scale`` to the scale's dtype."""
        if not self.uses_kernel:
            return backward.reference_backward(grad_weights, logits, weights, ids, scale, renormalize, logits_grad,
                                               scale_grad)
        table = configs.load_table(self.table)
        return backward.launch(grad_weights, logits, weights, ids, scale, renormalize, logits_grad, scale_grad,
                               interpret=self.interpret, one_hot=table.backward_one_hot,
                               scatter=table.backward_scatter)


@functools.cache
def _family(table: str, device: torch.device) -> configs.Family:
    return configs.load_table(table).family_for(platforms.device_names(device))


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("cuda", "Triton kernel on NVIDIA GPUs", "cuda", "cuda", False, _cuda_reason, direct_launch=True),
        Backend("rocm", "Triton kernel on AMD GPUs", "cuda", "rocm", False, _rocm_reason),
        Backend("xpu", "Triton kernel on Intel GPUs (torch.xpu)", "xpu", "xpu", False, _xpu_reason),
        Backend("torch", "PyTorch reference, any device", None, None, False, lambda facts: None),
        Backend("interpreter", "Triton kernel under Triton's CPU interpreter", "cpu", "interpreter", True,
                _needs_triton),
    )
}


def get(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}") from None


def why_not(
    backend: Backend,
    device: torch.device,
    num_experts: int,
    topk: int,
    facts: PlatformFacts | None = None,
) -> str | None:
    """Why ``backend`` cannot route ``num_experts``/``topk`` logits on ``device``, or ``None`` if it can."""
    reason = backend.reason_unavailable(facts or platforms.probe())
    if reason:
        return reason
    if backend.device_type is not None and device.type != backend.device_type:
        return f"it takes {backend.device_type} tensors, not {device.type} tensors"
    if backend.uses_kernel and num_experts > kernel.MAX_EXPERTS:
        return f"E={num_experts} is above the kernel's limit of {kernel.MAX_EXPERTS} experts"
    if backend.uses_kernel and topk > kernel.MAX_TOPK:
        return f"K={topk} is above the kernel's limit of {kernel.MAX_TOPK}"
    return None


def _native_backend(device: torch.device, facts: PlatformFacts) -> Backend:
    """The backend made for this device type, before any check that it can run."""
    if device.type == "cuda":
        return BACKENDS["rocm" if facts.hip_version else "cuda"]
    if device.type == "xpu":
        return BACKENDS["xpu"]
    return BACKENDS["torch"]


_warned: set[str] = set()


def _read_env() -> str:
    """``os.environ.get(ENV_VAR, "")``, read on every route() call, at a tenth of its cost: the mapping
    behind ``os.environ`` holds keys and values encoded, and ``.get`` encodes and decodes each time
    (:data:`raw_env` reads it undecoded)."""
    raw = raw_env()
    if raw is None:
        return ""
    return raw if isinstance(raw, str) else os.environ.decodevalue(raw)


def forced_name() -> str:
    """The backend ``G4ROUTE_BACKEND`` forces in this process's environment, or ``""``."""
    return _read_env().strip()


# CPython's os.environ keeps its data in ``_data`` under ``encodekey(name)``; elsewhere use .get.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else None
# ``G4ROUTE_BACKEND``'s raw value, ``None`` where it is unset, with no Python frame: route()'s eager CPU
# path asks on every call (a set but blank value takes the full path, whose forced_name() reads it as
# unset).
raw_env = (functools.partial(_ENVIRON_DATA.get, _ENV_KEY) if _ENVIRON_DATA is not None and _ENV_KEY is not None
           else functools.partial(os.environ.get, ENV_VAR))


def select(
    device: torch.device,
    num_experts: int,
    topk: int,
    facts: PlatformFacts | None = None,
    env: Mapping[str, str] = os.environ,
) -> Backend:
    """The backend for logits on ``device``.

    ``G4ROUTE_BACKEND`` (in ``env``) forces one by name; if it cannot run this call, ``ValueError``
    says why and lists the backends that can. Without it the device's own backend is chosen; where
    it cannot run (a shape past the kernel's limits, or no Triton) the PyTorch reference does the
    work, and ``g4route info`` shows the reason.
    """
    forced = (_read_env() if env is os.environ else env.get(ENV_VAR, "")).strip()
    if facts is None:  # this process's platform: the answer depends only on the key below
        return _select_here(device, num_experts, topk, forced)
    return _decide(device, num_experts, topk, facts, forced)


@functools.lru_cache(maxsize=1024)
def _select_here(device: torch.device, num_experts: int, topk: int, forced: str) -> Backend:
    # route() asks this on every call; a cached answer keeps the host overhead small.
    return _decide(device, num_experts, topk, platforms.probe(), forced)


def _decide(device: torch.device, num_experts: int, topk: int, facts: PlatformFacts, forced: str) -> Backend:
    if forced:
        backend = get(forced)
        reason = why_not(backend, device, num_experts, topk, facts)
        if reason:
            able = [b.name for b in BACKENDS.values() if why_not(b, device, num_experts, topk, facts) is None]
            raise ValueError(
                f"{ENV_VAR}={forced} cannot route this call: {reason}. "
                f"Backends that can route {device.type} logits with E={num_experts}, K={topk}: {', '.join(able)}"
            )
        return backend
    backend = _native_backend(device, facts)
    reason = why_not(backend, device, num_experts, topk, facts)
    if reason is None:
        return backend
    if backend.reason_unavailable(facts) and backend.name not in _warned:
        _warned.add(backend.name)
        warnings.warn(f"g4route: backend {backend.name!r} unavailable ({reason}); using the PyTorch reference",
                      RuntimeWarning, stacklevel=3)
    return BACKENDS["torch"]


def available(device: torch.device | None = None, facts: PlatformFacts | None = None) -> list[str]:
    """Names of the backends this platform can run (for ``device``'s tensors, if given)."""
    facts = facts or platforms.probe()
    return [
        b.name
        for b in BACKENDS.values()
        if b.reason_unavailable(facts) is None
        and (device is None or b.device_type in (None, device.type))
    ]
