"""Launching a compiled specialisation of the kernel without Triton's per-call dispatch (NVIDIA).

``kernel[grid](*args)`` binds and specialises every argument, builds a cache key that includes the
string form of the launch options, looks the compiled kernel up and checks the kernel's globals, on every
call: at one token that is more host time than the kernel takes on the GPU. A :class:`DirectLauncher`
sends the first call of each specialisation through that path (which compiles it if need be) and keeps
the compiled kernel's launcher; later calls with the same key call it directly.

The key is what keeps this exact. Triton specialises an integer argument on its value (1, a multiple of
16, past 32 bits) and, on NVIDIA, a pointer on its dtype and its 16-byte alignment. The key holds every
integer argument's value, every pointer's dtype and the low four bits of its address, and everything the
constexprs and launch options come from, so one key can only ever stand for one specialisation.
``tests/test_launcher.py`` checks that rule against Triton's own specialiser. Where the rule is not known
to hold (another Triton, another vendor) or a launch hook is set (a profiler), every call takes Triton's
path.

This module also holds the device placement every launch site shares (:func:`enter_device`): Triton
launches on the *current* device and its current stream, so the tensors' device is made current for the
span of a launch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The Triton releases whose launcher calling convention and specialisation rules this was checked
# against (CompiledKernel.run(grid, stream, function, metadata, hooks, *every parameter)).
SUPPORTED_TRITON = ((3, 6),)
MAX_ENTRIES = 4096  # distinct specialisations kept; past this the cache starts over


def supported(triton_module) -> bool:
    """Whether this Triton's launcher convention is the one :class:`DirectLauncher` calls."""
    try:
        major, minor = (int(p) for p in triton_module.__version__.split(".")[:2])
        from triton import knobs  # noqa: F401  (the hooks live here in the supported releases)
    except (ValueError, ImportError):
        return False
    return (major, minor) in SUPPORTED_TRITON


def enter_device(tensor: torch.Tensor) -> int:
    """Make ``tensor``'s GPU the current device if it is not; return the device to go back to, or -1.

    Triton (and :class:`DirectLauncher`) launch on the current device and that device's current stream.
    A model spread over GPUs (Transformers' ``device_map="auto"``) calls layers on ``cuda:1`` with
    ``cuda:0`` current, and Triton then cannot even read the pointers. Switching makes the launch go to
    the tensor's device and *its* current stream, which is where the caller's work on that tensor is
    ordered. The common case (already current) costs one integer compare. CUDA and ROCm builds share
    ``torch.cuda``'s calls (HIP answers them); Intel's XPU has its own pair.
    """
    index = tensor.get_device()
    if tensor.is_cuda:
        current = torch._C._cuda_getDevice()
        if current != index:
            torch._C._cuda_setDevice(index)
            return current
    elif tensor.is_xpu:
        current = torch.xpu.current_device()
        if current != index:
            torch.xpu.set_device(index)
            return current
    return -1


def leave_device(tensor: torch.Tensor, previous: int) -> None:
    """Undo :func:`enter_device`: make ``previous`` current again (nothing when it is -1)."""
    if previous < 0:
        return
    if tensor.is_cuda:
        torch._C._cuda_setDevice(previous)
    else:
        torch.xpu.set_device(previous)


def _hooked(hook) -> bool:
    """Whether a launch hook is set: Triton 3.6 keeps them in a HookChain (empty when none is added)."""
    return bool(getattr(hook, "calls", hook))


class DirectLauncher:
    """Launches ``jit_fn`` with kept launchers, keyed by everything Triton specialises on."""

    def __init__(self, jit_fn):
        from triton import knobs

        self._fn = jit_fn
        self._runtime = knobs.runtime
        self._entries: dict[tuple, tuple] = {}
        params = jit_fn.params
        # The launcher takes every parameter in order; ours has the runtime ones first.
        first_constexpr = next(i for i, p in enumerate(params) if p.is_constexpr)
        if not all(p.is_constexpr for p in params[first_constexpr:]):
            raise ValueError("DirectLauncher needs a kernel whose constexpr parameters come last")
        self._constexpr_names = tuple(p.name for p in params[first_constexpr:])

    def __call__(self, grid: int, args: Sequence, meta: dict, num_warps: int, num_stages: int, device: int) -> None:
        """Launch ``grid`` programs on ``args`` (the runtime arguments: tensors first, then ints) on GPU
        ``device``, which the caller has made current (:func:`enter_device`), on its current stream.

        The device is part of the key: a compiled kernel is loaded into one device's context, and its
        function handle is good for launches there only."""
        runtime = self._runtime
        if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook):
            self._fn[(grid,)](*args, num_warps=num_warps, num_stages=num_stages, **meta)
            return
        key = (device, num_warps, num_stages, *meta.values(), *args[4:],
               args[0].dtype, args[0].data_ptr() & 15, args[1].dtype, args[1].data_ptr() & 15,
               args[2].dtype, args[2].data_ptr() & 15, args[3].dtype, args[3].data_ptr() & 15)
        entry = self._entries.get(key)
        if entry is None:
            compiled = self._fn[(grid,)](*args, num_warps=num_warps, num_stages=num_stages, **meta)
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[key] = (compiled.run, compiled.function, compiled.packed_metadata,
                                  tuple(meta[name] for name in self._constexpr_names))
            return
        run, function, metadata, constants = entry
        run(grid, 1, 1, torch._C._cuda_getCurrentRawStream(device), function, metadata, None, None, None,
            *args, *constants)
