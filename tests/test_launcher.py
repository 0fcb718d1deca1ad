"""The rule launcher.DirectLauncher's cache key rests on, checked against Triton's own specialiser.

The direct launches themselves need a GPU; they run in the GPU suite (tests/test_gpu.py). Here, on any
machine with Triton: for NVIDIA, Triton specialises a pointer on its dtype and 16-byte alignment and an
integer on its value's class (1, a multiple of 16, past 32 bits), all of which the key captures.
"""

from __future__ import annotations

import pytest
import torch

from g4route import kernel, launcher

triton = pytest.importorskip("triton")


def _specialise(value):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    return native_specialize_impl(CUDABackend, value, False, True, True)


@pytest.mark.skipif(not launcher.supported(triton), reason="DirectLauncher is off for this Triton")
def test_pointer_specialisation_is_dtype_and_16_byte_alignment(gen):
    base = torch.randn(256, generator=gen)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32):
        x = base.to(dtype)
        for offset in range(9):
            view = x[offset:]
            spec = _specialise(view)
            assert spec[1] == ("D" if view.data_ptr() % 16 == 0 else ""), (dtype, offset, spec)
            assert spec[0] == _specialise(x)[0], "the pointer type depends on the dtype alone"


@pytest.mark.skipif(not launcher.supported(triton), reason="DirectLauncher is off for this Triton")
def test_integer_specialisation_depends_on_the_value_alone():
    # The key holds integers by value, so it suffices that Triton's answer is a function of the value;
    # the classes it draws are the ones the module docstring names.
    for value in (0, 1, 2, 15, 16, 17, 128, 4096, 262144, 2**31 - 1, 2**31, -1, -16):
        first, second = _specialise(value), _specialise(int(str(value)))
        assert first == second
        if value == 1:
            assert first[0] == "constexpr"
        else:
            assert first[0] == ("i32" if -2**31 <= value < 2**31 else "i64")
            assert first[1] == ("D" if value % 16 == 0 else "")


def test_kernel_constexprs_come_last():
    """DirectLauncher passes runtime arguments, then the constexprs in parameter order."""
    if kernel.triton is None:
        pytest.skip("no Triton")
    params = kernel._compiled_kernel.params
    flags = [p.is_constexpr for p in params]
    assert flags == sorted(flags), "a constexpr parameter comes before a runtime one"


def test_a_launch_hook_sends_launches_back_through_triton():
    """A profiler's launch hook must see every launch, so its presence turns the direct path off."""
    knobs = pytest.importorskip("triton.knobs")
    chain = knobs.runtime.launch_enter_hook
    assert not launcher._hooked(chain) and not launcher._hooked(None)

    def hook(*args):
        return None

    chain.add(hook)
    try:
        assert launcher._hooked(chain)
    finally:
        chain.remove(hook)
    assert not launcher._hooked(chain)
