"""Backend choice for every vendor, on CPU, from simulated platform answers (``PlatformFacts``).

Only the platform's answers are simulated; the registry's decisions are real and no kernel is faked.
The last tests ask the public API about this real machine.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import g4route
from g4route import kernel, platforms, registry
from g4route.platforms import PlatformFacts

ENV = registry.ENV_VAR
E, K = 128, 8
CPU = torch.device("cpu")
CUDA0 = torch.device("cuda", 0)
XPU0 = torch.device("xpu", 0)

_BASE = PlatformFacts(
    torch_version="2.13.0",
    cuda_version=None,
    hip_version=None,
    cuda_available=False,
    xpu_available=False,
    xpu_note="simulated: torch.xpu.is_available() is False",
    triton_version="3.6.0",
    triton_error=None,
)
NVIDIA = dataclasses.replace(_BASE, torch_version="2.13.0+cu128", cuda_version="12.8", cuda_available=True)
AMD = dataclasses.replace(_BASE, torch_version="2.13.0+rocm6.3", hip_version="6.3", cuda_available=True)
INTEL = dataclasses.replace(_BASE, torch_version="2.13.0+xpu", xpu_available=True, xpu_note="native torch.xpu")
CPU_ONLY = dataclasses.replace(_BASE, torch_version="2.13.0+cpu")
_NO_TRITON = {"triton_version": None, "triton_error": "ModuleNotFoundError: No module named 'triton'"}
NVIDIA_NO_TRITON = dataclasses.replace(NVIDIA, **_NO_TRITON)
AMD_NO_TRITON = dataclasses.replace(AMD, **_NO_TRITON)
INTEL_NO_TRITON = dataclasses.replace(INTEL, **_NO_TRITON)

GPUS = [(NVIDIA, CUDA0, "cuda"), (AMD, CUDA0, "rocm"), (INTEL, XPU0, "xpu")]
GPU_IDS = ["nvidia", "amd", "intel"]


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    """Each test starts with no backend warned about and no G4ROUTE_BACKEND in the real environment."""
    monkeypatch.setattr(registry, "_warned", set())
    monkeypatch.delenv(ENV, raising=False)


def _select(device, facts, num_experts=E, topk=K, forced=None):
    env = {} if forced is None else {ENV: forced}
    return registry.select(device, num_experts, topk, facts=facts, env=env).name


def _select_silently(device, facts, num_experts=E, topk=K):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return _select(device, facts, num_experts, topk)


def _able(message: str) -> set[str]:
    """The backends a forced-backend error lists as able to route the call."""
    return set(message.rsplit(": ", 1)[1].split(", "))


# ------------------------------------------------------------------------------------------ auto choice


@pytest.mark.parametrize(
    ("facts", "device", "expected"),
    [
        (NVIDIA, CUDA0, "cuda"),
        (NVIDIA, CPU, "torch"),
        (AMD, CUDA0, "rocm"),
        (AMD, CPU, "torch"),
        (INTEL, XPU0, "xpu"),
        (INTEL, CPU, "torch"),
        (CPU_ONLY, CPU, "torch"),
        (NVIDIA_NO_TRITON, CPU, "torch"),
    ],
    ids=["nvidia-gpu", "nvidia-cpu", "amd-gpu", "amd-cpu", "intel-gpu", "intel-cpu", "cpu-only", "no-triton-cpu"],
)
def test_auto_choice_per_device(facts, device, expected):
    # Nothing is unavailable here, so nothing may warn; CPU tensors never go to the interpreter unasked.
    assert _select_silently(device, facts) == expected


@pytest.mark.parametrize(("facts", "device", "native"), GPUS, ids=GPU_IDS)
def test_auto_choice_at_the_kernel_limits_keeps_the_kernel(facts, device, native):
    assert _select_silently(device, facts, kernel.MAX_EXPERTS, kernel.MAX_TOPK) == native
    assert _select_silently(device, facts, 1, 1) == native


@pytest.mark.parametrize(("facts", "device", "native"), GPUS, ids=GPU_IDS)
@pytest.mark.parametrize(
    ("num_experts", "topk"),
    [
        (kernel.MAX_EXPERTS + 1, K),
        (kernel.MAX_EXPERTS, kernel.MAX_TOPK + 1),
        (kernel.MAX_EXPERTS + 1, kernel.MAX_TOPK + 1),
    ],
    ids=["E-over", "K-over", "both-over"],
)
def test_auto_choice_past_the_kernel_limits_falls_back_to_torch_quietly(facts, device, native, num_experts, topk):
    # A shape past the kernel's limits is not a broken install: the reference runs it without a warning.
    assert _select_silently(device, facts, num_experts, topk) == "torch"
    assert registry.why_not(registry.get(native), device, num_experts, topk, facts=facts)


@pytest.mark.parametrize(
    ("facts", "device", "native"),
    [(NVIDIA_NO_TRITON, CUDA0, "cuda"), (AMD_NO_TRITON, CUDA0, "rocm"), (INTEL_NO_TRITON, XPU0, "xpu")],
    ids=GPU_IDS,
)
def test_missing_triton_falls_back_to_torch_with_a_warning(facts, device, native):
    with pytest.warns(RuntimeWarning) as record:
        assert _select(device, facts) == "torch"
    assert len(record) == 1
    message = str(record[0].message)
    assert repr(native) in message and "Triton" in message and facts.triton_error in message


def test_missing_triton_warns_once_per_backend():
    with pytest.warns(RuntimeWarning, match="'cuda'"):
        _select(CUDA0, NVIDIA_NO_TRITON)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert _select(CUDA0, NVIDIA_NO_TRITON) == "torch"
    assert record == []
    # Another backend's problem is still reported.
    with pytest.warns(RuntimeWarning, match="'rocm'"):
        assert _select(CUDA0, AMD_NO_TRITON) == "torch"


@pytest.mark.parametrize(
    ("facts", "device", "native", "reason"),
    [(CPU_ONLY, CUDA0, "cuda", "not a CUDA build"), (NVIDIA, XPU0, "xpu", NVIDIA.xpu_note)],
    ids=["cuda-tensor-on-cpu-build", "xpu-tensor-without-xpu"],
)
def test_unavailable_native_backend_warns_and_falls_back(facts, device, native, reason):
    with pytest.warns(RuntimeWarning, match=repr(native)) as record:
        assert _select(device, facts) == "torch"
    assert reason in str(record[0].message)


@pytest.mark.parametrize("value", ["", "   "], ids=["empty", "blank"])
def test_empty_override_means_auto(value):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.select(CUDA0, E, K, facts=NVIDIA, env={ENV: value}).name == "cuda"


# ---------------------------------------------------------------------------------------------- override


@pytest.mark.parametrize(
    ("facts", "device", "forced"),
    [
        (NVIDIA, CUDA0, "torch"),
        (NVIDIA, CUDA0, "cuda"),
        (AMD, CUDA0, "rocm"),
        (INTEL, XPU0, "xpu"),
        (INTEL, XPU0, "torch"),
        (CPU_ONLY, CPU, "interpreter"),
        (NVIDIA, CPU, "interpreter"),
        (NVIDIA_NO_TRITON, CUDA0, "torch"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_override_picks_the_named_backend(facts, device, forced):
    assert _select(device, facts, forced=forced) == forced


def test_override_reads_the_env_mapping_it_is_given(monkeypatch):
    # select() honours the env argument, not a stray process variable, and defaults to os.environ.
    monkeypatch.setenv(ENV, "nonsense")
    assert _select(CPU, CPU_ONLY, forced="interpreter") == "interpreter"
    with pytest.raises(ValueError, match="nonsense"):
        registry.select(CPU, E, K, facts=CPU_ONLY)


def test_override_unknown_name_lists_every_backend():
    with pytest.raises(ValueError, match="unknown backend 'nonsense'") as info:
        _select(CUDA0, NVIDIA, forced="nonsense")
    assert set(registry.BACKENDS) <= set(str(info.value).rsplit(": ", 1)[1].split(", "))


@pytest.mark.parametrize(
    ("facts", "device", "forced", "reason", "able"),
    [
        (NVIDIA, CUDA0, "rocm", "not a ROCm build", {"cuda", "torch"}),
        (AMD, CUDA0, "cuda", "ROCm build (HIP 6.3)", {"rocm", "torch"}),
        (CPU_ONLY, CUDA0, "cuda", "not a CUDA build", {"torch"}),
        (dataclasses.replace(NVIDIA, cuda_available=False), CUDA0, "cuda", "is_available() is False", {"torch"}),
        (NVIDIA, XPU0, "xpu", NVIDIA.xpu_note, {"torch"}),
        (NVIDIA_NO_TRITON, CUDA0, "cuda", "Triton is not importable", {"torch"}),
        (dataclasses.replace(CPU_ONLY, **_NO_TRITON), CPU, "interpreter", "Triton is not importable", {"torch"}),
    ],
    ids=["rocm-on-nvidia", "cuda-on-amd", "cuda-on-cpu-build", "cuda-no-driver", "xpu-on-nvidia", "cuda-no-triton",
         "interpreter-no-triton"],
)
def test_override_unavailable_backend_says_why_and_what_can(facts, device, forced, reason, able):
    with pytest.raises(ValueError, match=f"{ENV}={forced}") as info:
        _select(device, facts, forced=forced)
    message = str(info.value)
    assert reason in message
    assert _able(message) == able


@pytest.mark.parametrize(
    ("facts", "device", "forced", "able"),
    [
        (NVIDIA, CUDA0, "interpreter", {"cuda", "torch"}),
        (NVIDIA, CPU, "cuda", {"torch", "interpreter"}),
        (AMD, CPU, "rocm", {"torch", "interpreter"}),
        (INTEL, CPU, "xpu", {"torch", "interpreter"}),
        (INTEL, CUDA0, "xpu", {"torch"}),
    ],
    ids=["interpreter-on-cuda", "cuda-on-cpu", "rocm-on-cpu", "xpu-on-cpu", "xpu-on-cuda"],
)
def test_override_wrong_device_type(facts, device, forced, able):
    with pytest.raises(ValueError, match=f"{ENV}={forced}") as info:
        _select(device, facts, forced=forced)
    message = str(info.value)
    assert f"not {device.type} tensors" in message
    assert _able(message) == able


@pytest.mark.parametrize(("facts", "device", "forced"),
                         [(*g[:2], g[2]) for g in GPUS] + [(CPU_ONLY, CPU, "interpreter")],
                         ids=[*GPU_IDS, "interpreter"])
def test_override_past_the_kernel_limits(facts, device, forced):
    with pytest.raises(ValueError, match=f"E={kernel.MAX_EXPERTS + 1}") as info:
        _select(device, facts, kernel.MAX_EXPERTS + 1, K, forced=forced)
    assert str(kernel.MAX_EXPERTS) in str(info.value) and _able(str(info.value)) == {"torch"}
    with pytest.raises(ValueError, match=f"K={kernel.MAX_TOPK + 1}") as info:
        _select(device, facts, kernel.MAX_EXPERTS, kernel.MAX_TOPK + 1, forced=forced)
    assert str(kernel.MAX_TOPK) in str(info.value) and _able(str(info.value)) == {"torch"}
    # At the limits the forced kernel backend is accepted.
    assert _select(device, facts, kernel.MAX_EXPERTS, kernel.MAX_TOPK, forced=forced) == forced


def test_torch_backend_has_no_shape_limit():
    for facts, device, _ in GPUS:
        assert registry.why_not(registry.get("torch"), device, 10 * kernel.MAX_EXPERTS, 10 * kernel.MAX_TOPK,
                                facts=facts) is None


# ------------------------------------------------------------------------------------ why_not, available


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (NVIDIA, {"cuda", "torch", "interpreter"}),
        (AMD, {"rocm", "torch", "interpreter"}),
        (INTEL, {"xpu", "torch", "interpreter"}),
        (CPU_ONLY, {"torch", "interpreter"}),
        (NVIDIA_NO_TRITON, {"torch"}),
        (AMD_NO_TRITON, {"torch"}),
    ],
    ids=["nvidia", "amd", "intel", "cpu-only", "nvidia-no-triton", "amd-no-triton"],
)
def test_available_per_platform(facts, expected):
    assert set(registry.available(facts=facts)) == expected
    for name in registry.BACKENDS:
        reason = registry.BACKENDS[name].reason_unavailable(facts)
        assert (reason is None) == (name in expected), (name, reason)


@pytest.mark.parametrize(
    ("facts", "device", "expected"),
    [
        (NVIDIA, CUDA0, {"cuda", "torch"}),
        (NVIDIA, CPU, {"torch", "interpreter"}),
        (AMD, CUDA0, {"rocm", "torch"}),
        (INTEL, XPU0, {"xpu", "torch"}),
        (INTEL, CUDA0, {"torch"}),
    ],
    ids=["nvidia-cuda", "nvidia-cpu", "amd-cuda", "intel-xpu", "intel-cuda"],
)
def test_available_for_a_device(facts, device, expected):
    assert set(registry.available(device, facts=facts)) == expected


def test_why_not_agrees_with_select():
    # Whatever why_not accepts, a forced select accepts; whatever it refuses, a forced select refuses.
    for facts in (NVIDIA, AMD, INTEL, CPU_ONLY, NVIDIA_NO_TRITON):
        for device in (CPU, CUDA0, XPU0):
            for num_experts, topk in ((E, K), (kernel.MAX_EXPERTS + 1, K)):
                for name, backend in registry.BACKENDS.items():
                    reason = registry.why_not(backend, device, num_experts, topk, facts=facts)
                    if reason is None:
                        assert _select(device, facts, num_experts, topk, forced=name) == name
                    else:
                        with pytest.raises(ValueError, match="cannot route"):
                            _select(device, facts, num_experts, topk, forced=name)


# --------------------------------------------------------------------------- the public API, this machine


def test_public_backend_names():
    names = g4route.backends()
    assert len(names) == len(set(names))
    assert set(names) == {"cuda", "rocm", "xpu", "torch", "interpreter"}  # DESIGN.md section 3


def test_public_available_backends_here():
    everywhere = set(g4route.available_backends())
    for_cpu = g4route.available_backends("cpu")
    assert set(for_cpu) == set(g4route.available_backends(CPU))
    assert "torch" in for_cpu and set(for_cpu) <= everywhere
    assert set(for_cpu) <= {"torch", "interpreter"}  # the GPU backends take GPU tensors only
    assert ("interpreter" in for_cpu) == (kernel.TRITON_IMPORT_ERROR is None)
    facts = platforms.probe()
    if not facts.cuda_available:
        assert not everywhere & {"cuda", "rocm"}
    if not facts.xpu_available:
        assert "xpu" not in everywhere


def test_public_backend_for_cpu_here(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert g4route.backend_for("cpu") == "torch"
        assert g4route.backend_for(CPU, kernel.MAX_EXPERTS + 1, 1) == "torch"
    if kernel.TRITON_IMPORT_ERROR is None:
        monkeypatch.setenv(ENV, "interpreter")
        assert g4route.backend_for("cpu") == "interpreter"
    monkeypatch.setenv(ENV, "cuda")
    with pytest.raises(ValueError, match=f"{ENV}=cuda"):
        g4route.backend_for("cpu")
