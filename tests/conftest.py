"""Targets (a backend and the device of its tensors), device markers, and fresh random inputs."""

from __future__ import annotations

import os

import pytest
import torch

import g4route
from g4route import platforms, registry

# (backend, device type, marker): every contract test runs once per target.
_TARGETS = [
    ("torch", "cpu", None),
    ("interpreter", "cpu", None),
    ("cuda", "cuda", "cuda"),
    ("torch", "cuda", "cuda"),
    ("rocm", "cuda", "rocm"),
    ("xpu", "xpu", "xpu"),
]


def _skip_reason(backend: str, device_type: str) -> str | None:
    reason = registry.BACKENDS[backend].reason_unavailable(platforms.probe())
    if reason:
        return f"backend {backend} unavailable here: {reason}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no GPU visible to torch.cuda"
    return None


@pytest.fixture(
    params=[pytest.param(t[:2], marks=[getattr(pytest.mark, t[2])] if t[2] else [], id=f"{t[0]}-{t[1]}")
            for t in _TARGETS]
)
def target(request, monkeypatch):
    """(backend, device): ``G4ROUTE_BACKEND`` is set to the backend for the test."""
    backend, device_type = request.param
    reason = _skip_reason(backend, device_type)
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv(registry.ENV_VAR, backend)
    return backend, torch.device(device_type, 0) if device_type != "cpu" else torch.device("cpu")


@pytest.fixture(
    params=[pytest.param(t[:2], marks=[getattr(pytest.mark, t[2])], id=t[0])
            for t in _TARGETS if t[2] and t[0] != "torch"]
)
def gpu_target(request, monkeypatch):
    """(backend, device) for the GPU kernel backends only (the large-input suite)."""
    backend, device_type = request.param
    reason = _skip_reason(backend, device_type)
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv(registry.ENV_VAR, backend)
    return backend, torch.device(device_type, 0)


@pytest.fixture
def gen():
    """A generator with a fresh seed per test, printed on failure so a case can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def pytest_report_header(config):
    facts = platforms.probe()
    return [f"g4route {g4route.__version__}; available backends: {', '.join(registry.available(facts=facts))}"]
