"""What this process's PyTorch and Triton can see: the few lines of vendor detection.

Everything the registry decides rests on a ``PlatformFacts`` record, so tests can hand it the answers
of a ROCm or XPU machine without one (never by faking the kernel).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch

from . import kernel


@dataclass(frozen=True)
class PlatformFacts:
    """The platform's answers that select a backend."""

    torch_version: str
    cuda_version: str | None  # torch.version.cuda: a CUDA build
    hip_version: str | None  # torch.version.hip: a ROCm build (its GPUs are "cuda" devices)
    cuda_available: bool  # torch.cuda.is_available()
    xpu_available: bool  # torch.xpu.is_available(), after the Intel extension where one is needed
    xpu_note: str  # how the XPU answer was reached
    triton_version: str | None
    triton_error: str | None  # why Triton cannot be used, or None


def _probe_xpu() -> tuple[bool, str]:
    """Find Intel GPUs. PyTorch >= 2.4 has ``torch.xpu`` natively; older builds (and builds made
    for the Intel extension) only see the device once ``intel_extension_for_pytorch`` is imported."""
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True, "native torch.xpu"
    try:
        importlib.import_module("intel_extension_for_pytorch")
    except ImportError:
        return False, "torch.xpu.is_available() is False and intel_extension_for_pytorch is not installed"
    except Exception as exc:  # a broken extension must not break CPU and CUDA users
        return False, f"intel_extension_for_pytorch failed to import: {exc}"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True, "torch.xpu through intel_extension_for_pytorch"
    return False, "no XPU device visible, even with intel_extension_for_pytorch"


@functools.lru_cache(maxsize=1)
def probe() -> PlatformFacts:
    """Ask this process's PyTorch and Triton once; the answer is cached."""
    xpu_available, xpu_note = _probe_xpu()
    return PlatformFacts(
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        hip_version=getattr(torch.version, "hip", None),
        cuda_available=torch.cuda.is_available(),
        xpu_available=xpu_available,
        xpu_note=xpu_note,
        triton_version=None if kernel.triton is None else kernel.triton.__version__,
        triton_error=kernel.TRITON_IMPORT_ERROR,
    )


def device_names(device: torch.device) -> tuple[str, ...]:
    """The names a tuned table may match for ``device``: its marketing name and, on ROCm, its arch."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        arch = getattr(props, "gcnArchName", "")  # ROCm only, e.g. "gfx942:sramecc+:xnack-"
        return (props.name, arch.split(":")[0]) if arch else (props.name,)
    if device.type == "xpu":
        return (torch.xpu.get_device_name(device),)
    return (device.type,)
