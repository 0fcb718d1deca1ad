"""Ahead-of-time compiles of the routing kernel for every GPU target and every tuned config, on any machine.

Triton compiles for a GPU it cannot see: ``triton.compile(ASTSource(...), target=GPUTarget(...))`` runs
the whole pipeline (TTIR, TTGIR, LLVM IR, then PTX and ptxas's cubin for NVIDIA, AMDGCN and the hsaco
for AMD, SPIR-V for Intel) on a CPU-only machine. That checks what no CPU test can: that each launch
config of ``backends/*.toml`` compiles for each target, and how many registers it takes, whether it
spills, and how much shared and scratch memory it asks for.

The compile is the one the runtime JIT would make for a real call: the signature comes from the
kernel's own parameter list, the constexprs from ``kernel.constexprs`` (as ``kernel.launch`` passes
them), and the runtime arguments are specialised as Triton's JIT does it (pointers and integers that
are multiples of 16 get ``tt.divisibility = 16``, an integer equal to 1 becomes a constexpr, and on AMD
a tensor under 2 GiB gets ``tt.pointer_range = 32`` so buffer loads are used). The call is Gemma 4's:
``E = 128``, ``K = 8``, renormalised, with a per-expert scale, contiguous logits and outputs.

Register and spill counts: NVIDIA from ``ptxas -v`` on the PTX (the ptxas Triton ships), AMD from the
kernel descriptor in the AMDGCN text (``.vgpr_count``, ``.sgpr_count``, spill counts, private segment,
LLVM's occupancy). Intel targets compile to SPIR-V, whose registers are allocated by the driver at load
time: there the compile itself is the check, and ``--ocloc-device`` adds a native compile by Intel's
``ocloc`` for a device it knows as a stand-in (``nox -s compile-xpu``).

Compile in a process that has not run Triton's interpreter (the ``interpreter`` backend): Triton 3.6's
interpreter leaves ``triton.language`` patched, and a real compile after it fails.

``python -m g4route.aot`` prints a table per target and exits non-zero on a compile error or a spill.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from . import backward, configs, kernel, router_kernel
from .kernel import LaunchConfig
from .router_kernel import RouterConfig

EXPERTS = 128  # Gemma 4 26B-A4B
TOPK = 8
LARGEST_TOKENS = 262144  # the T compiled for a bucket with no upper bound (Gemma 4's longest context)
DTYPES = (torch.float32, torch.bfloat16)  # float16 takes bfloat16's buckets and code path

# Intel Arc Pro B60 (Xe2, Battlemage BMG-G21): what torch.xpu.get_device_properties() reports for it, in
# the keys Triton's Intel backend reads. ``architecture`` is SYCL's enum value for intel_gpu_bmg_g21.
ARC_PRO_B60 = {
    "name": "Intel(R) Arc(TM) Pro B60 Graphics",
    "platform_name": "Intel(R) oneAPI Unified Runtime over Level-Zero",
    "vendor": "Intel(R) Corporation",
    "version": "20.1.0",
    "gpu_eu_count": 160,  # 20 Xe2 cores x 8 vector engines
    "gpu_subslice_count": 20,
    "max_work_group_size": 1024,
    "max_num_sub_groups": 64,
    "sub_group_sizes": [16, 32],
    "has_fp64": True,
    "has_subgroup_matrix_multiply_accumulate": True,
    "has_subgroup_matrix_multiply_accumulate_tensor_float32": False,
    "has_subgroup_2d_block_io": True,
    "has_bfloat16_conversions": True,
    "architecture": 0x0000000500400400,
}


@dataclass(frozen=True, eq=False)
class Target:
    """One GPU architecture to compile for, and the vendor table whose configs it gets."""

    name: str  # how the command line and the table call it
    backend: str  # GPUTarget's backend: "cuda", "hip" or "xpu"
    arch: object  # GPUTarget's arch: compute capability, gfx name, or the XPU device-properties dict
    warp_size: int  # 32 (NVIDIA, RDNA), 64 (CDNA wavefronts), 16 (Intel's smallest sub-group)
    table: str  # backends/<table>.toml
    devices: tuple[tuple[str, ...], ...]  # device names of this arch, as platforms.device_names gives them
    triton_backend: str  # the name of Triton's backend package that compiles it

    def gpu_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.arch, self.warp_size)

    def compiler_available(self) -> str | None:
        """Why this Triton cannot compile for the target, or None if it can."""
        if kernel.triton is None:
            return f"Triton is not importable ({kernel.TRITON_IMPORT_ERROR})"
        from triton.backends import backends

        if self.triton_backend not in backends:
            have = ", ".join(sorted(backends)) or "none"
            extra = " (Intel: triton-xpu, in its own virtualenv: nox -s compile-xpu)" if self.backend == "xpu" else ""
            return (f"triton {kernel.triton.__version__} has no {self.triton_backend!r} backend "
                    f"(it has: {have}){extra}")
        return None


TARGETS: tuple[Target, ...] = (
    Target("sm_80", "cuda", 80, 32, "cuda", (("NVIDIA A100-SXM4-80GB",),), "nvidia"),
    Target("sm_90", "cuda", 90, 32, "cuda", (("NVIDIA H100 80GB HBM3",), ("NVIDIA H200",)), "nvidia"),
    Target("sm_100", "cuda", 100, 32, "cuda", (("NVIDIA B200",),), "nvidia"),
    Target("gfx90a", "hip", "gfx90a", 64, "rocm", (("AMD Instinct MI250X / MI250", "gfx90a"),), "amd"),
    Target("gfx942", "hip", "gfx942", 64, "rocm", (("AMD Instinct MI300X", "gfx942"),), "amd"),
    Target("gfx950", "hip", "gfx950", 64, "rocm", (("AMD Instinct MI355X", "gfx950"),), "amd"),
    Target("gfx1100", "hip", "gfx1100", 32, "rocm", (("AMD Radeon RX 7900 XTX", "gfx1100"),), "amd"),
    Target("xpu-b60", "xpu", ARC_PRO_B60, 16, "xpu", ((ARC_PRO_B60["name"],),), "intel"),
)


def target(name: str) -> Target:
    for t in TARGETS:
        if t.name == name:
            return t
    raise ValueError(f"unknown target {name!r}; known targets: {', '.join(t.name for t in TARGETS)}")


# ------------------------------------------------------------------------------------------ the signature

_POINTER_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
                  torch.int64: "i64"}


def launch_arguments(logits: torch.Tensor, scale: torch.Tensor | None, weights: torch.Tensor,
                     ids: torch.Tensor) -> tuple:
    """The kernel's runtime (non-constexpr) arguments in the order ``kernel.launch`` passes them.

    Keep in step with ``kernel.launch``: ``signature`` checks that their number matches the kernel's
    runtime parameters and says so if not.
    """
    T, E = logits.shape
    return (logits, weights if scale is None else scale, weights, ids, T, E, *logits.stride(), *weights.stride(),
            *ids.stride())


def _amd_buffer_ops() -> bool:
    import triton

    return bool(triton.knobs.amd.use_buffer_ops)


def specialize(arg, backend: str, specialize_value: bool = True, align: bool = True) -> tuple[str, object, list]:
    """How Triton's JIT specialises one runtime argument for ``backend``: (type, constexpr value, attrs).

    A tensor is a pointer, aligned to 16 bytes (PyTorch's allocations are) and, on AMD with buffer ops
    on (Triton's default), known to span under 2 GiB. An integer equal to 1 becomes the constexpr 1;
    other integers are ``i32`` (``i64`` past 32 bits) with ``tt.divisibility = 16`` where they are
    multiples of 16. ``specialize_value=False`` and ``align=False`` are a parameter's
    ``do_not_specialize`` and ``do_not_specialize_on_alignment`` in ``triton.jit``.
    """
    if isinstance(arg, torch.Tensor):
        kind = "*" + _POINTER_TYPES[arg.dtype]
        if not specialize_value:
            return kind, None, []
        attrs = [["tt.divisibility", 16]] if align else []
        if backend == "hip" and _amd_buffer_ops() and arg.untyped_storage().nbytes() <= 2**31 - 1:
            attrs.append(["tt.pointer_range", 32])
        return kind, None, attrs
    if isinstance(arg, float):  # the router's eps and H ** -0.5: never specialised
        return "fp32", None, []
    if isinstance(arg, bool) or not isinstance(arg, int):
        raise TypeError(f"unexpected runtime argument {arg!r}: the launchers pass tensors, integers and floats")
    kind = "i32" if -(2**31) <= arg < 2**31 else "i64"
    if not specialize_value:
        return kind, None, []
    if arg == 1:
        return "constexpr", 1, []
    return kind, None, [["tt.divisibility", 16]] if align and arg % 16 == 0 else []


def signature(backend: str, dtype: torch.dtype, config: LaunchConfig, tokens: int, experts: int = EXPERTS,
              topk: int = TOPK, renormalize: bool = True, has_scale: bool = True) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``triton.compiler.ASTSource``: the compile that a call with
    ``tokens`` contiguous rows of ``dtype`` logits would trigger on a ``backend`` GPU.

    Meta tensors stand in for the real ones: only dtypes, shapes and strides matter here.
    """
    meta = kernel.constexprs(dtype, experts, topk, config, renormalize, has_scale)
    logits = torch.empty(tokens, experts, dtype=dtype, device="meta")
    weights = torch.empty(tokens, topk, dtype=torch.float32, device="meta")
    ids = torch.empty(tokens, topk, dtype=torch.int32, device="meta")
    scale = torch.empty(experts, dtype=torch.float32, device="meta") if has_scale else None
    return _specialised(kernel._compiled_kernel, list(launch_arguments(logits, scale, weights, ids)), meta, backend,
                        "aot.launch_arguments gives {given}: bring it in step with kernel.launch")


def backward_signature(tgt: Target, dtype: torch.dtype, tokens: int, experts: int = EXPERTS, topk: int = TOPK,
                       renormalize: bool = True, scale_grad: bool = True) -> tuple[dict, dict, dict,
                                                                                  backward.BackwardConfig]:
    """(signature, constexprs, attrs, config) of the backward kernel's compile for ``tgt`` and a training
    step's call: ``tokens`` contiguous rows of ``dtype`` logits, gradients of both the logits and the scale,
    the launch shape ``backward.config_for`` gives on a GPU with the target's table."""
    saved = backward.from_weights(topk, experts, renormalize, interpret=False)
    table = configs.load_table(tgt.table)
    config = backward.config_for(tokens, experts, interpret=False, topk=topk if saved else 0,
                                 one_hot=table.backward_one_hot)
    grid = -(-tokens // config.rows_per_program)
    logits = torch.empty(tokens, experts, dtype=dtype, device="meta")
    ids = torch.empty(tokens, topk, dtype=torch.int32, device="meta")
    pairs = torch.empty(tokens, topk, dtype=torch.float32, device="meta")
    runtime = backward.runtime_args(pairs, logits, pairs, ids, torch.empty(experts, dtype=torch.float32, device="meta"),
                                    torch.empty(tokens, experts, dtype=dtype, device="meta"),
                                    torch.empty(grid, experts, dtype=torch.float32, device="meta"))
    meta = backward.constexprs(topk, experts, config, True, renormalize, True, scale_grad, saved,
                               table.backward_scatter)
    return (*_specialised(backward._compiled_kernel, list(runtime), meta, tgt.backend,
                          "backward.runtime_args gives {given}"), config)


def _specialised(fn, runtime: list, meta: dict, backend: str, mismatch: str) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ``fn`` called with ``runtime`` arguments and ``meta`` constexprs,
    each runtime argument specialised as Triton's JIT does it for ``backend`` (:func:`specialize`)."""
    runtime_params = [p.name for p in fn.params if not p.is_constexpr]
    if len(runtime) != len(runtime_params):
        raise RuntimeError(f"the kernel takes {len(runtime_params)} runtime arguments ({', '.join(runtime_params)}) "
                           f"but " + mismatch.format(given=len(runtime)))
    sig, constants, attrs = {}, {}, {}
    values = iter(runtime)
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            if p.name in meta:
                constants[(i,)] = meta[p.name]
            elif p.has_default:
                constants[(i,)] = p.default
            else:
                raise RuntimeError(f"no value for the constexpr {p.name!r}")
            sig[p.name] = "constexpr"
            continue
        kind, value, arg_attrs = specialize(next(values), backend, not p.do_not_specialize,
                                            not p.do_not_specialize_on_alignment)
        sig[p.name] = kind
        if kind == "constexpr":
            constants[(i,)] = value
        if arg_attrs:
            attrs[(i,)] = arg_attrs
    unknown = set(meta) - {p.name for p in fn.params if p.is_constexpr}
    if unknown:
        raise RuntimeError(f"the constexprs give {sorted(unknown)}, which the kernel does not take")
    return sig, constants, attrs


# -------------------------------------------------------------------------------------------- the compile


@dataclass
class Stats:
    """What one compiled kernel asks of the GPU (None: not known ahead of time for this target)."""

    registers: int | None  # per thread: NVIDIA registers, AMD VGPRs (+ AGPRs)
    scalar_registers: int | None  # AMD SGPRs per wavefront
    spills: int | None  # NVIDIA: bytes of spill stores + loads; AMD: VGPRs + SGPRs spilled
    scratch: int | None  # bytes per thread: NVIDIA stack frame, AMD private segment
    shared: int  # bytes of shared memory / LDS per program, as Triton launches it
    occupancy: str  # on paper: resident warps per SM (NVIDIA), waves per SIMD (AMD)
    binary: str  # the artefact and its size


def _ptxas_stats(ptx: str, capability: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}", src,
               "-o", os.path.join(tmp, "kernel.cubin")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not frame:
        raise RuntimeError(f"could not read registers and spills from ptxas -v:\n{log}")
    return {"registers": int(regs[1]), "stack": int(frame[1]), "spills": int(frame[2]) + int(frame[3])}


# NVIDIA per-SM limits: 64K registers in 4 sub-partitions, allocated per warp in units of 256;
# max resident warps and programs (thread blocks); shared memory per SM (1 KiB of it reserved per block).
_SM_LIMITS = {80: (64, 32, 167936), 90: (64, 32, 233472), 100: (64, 32, 233472)}


def nvidia_warps_per_sm(registers: int, num_warps: int, shared: int, capability: int) -> tuple[int, int]:
    """(resident warps per SM, the SM's maximum) for a kernel of ``registers`` per thread, on paper."""
    max_warps, max_blocks, smem = _SM_LIMITS.get(capability, _SM_LIMITS[90])
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    warps_by_regs = 4 * (16384 // per_warp)
    blocks = min(max_blocks, warps_by_regs // num_warps, max_warps // num_warps)
    if shared:
        blocks = min(blocks, smem // (shared + 1024))
    return blocks * num_warps, max_warps


def _nvidia(ck, capability: int, num_warps: int) -> Stats:
    ptx = _ptxas_stats(ck.asm["ptx"], capability)
    warps, most = nvidia_warps_per_sm(ptx["registers"], num_warps, ck.metadata.shared, capability)
    return Stats(ptx["registers"], None, ptx["spills"], ptx["stack"], ck.metadata.shared, f"{warps}/{most} warps/SM",
                 f"cubin {len(ck.asm['cubin'])} B")


def amd_kernel_info(amdgcn: str) -> dict:
    """The kernel descriptor's numbers from AMDGCN assembly text."""

    def field(name: str, default: int | None = None) -> int:
        m = re.search(rf"^\s*\.{name}:\s+(\d+)", amdgcn, re.MULTILINE)
        if m is None:
            if default is None:
                raise RuntimeError(f"no .{name} in the AMDGCN kernel metadata")
            return default
        return int(m[1])

    occupancy = re.search(r"^; Occupancy: (\d+)", amdgcn, re.MULTILINE)
    return {
        "vgprs": field("vgpr_count"),
        "agprs": field("agpr_count", 0),
        "sgprs": field("sgpr_count"),
        "vgpr_spills": field("vgpr_spill_count"),
        "sgpr_spills": field("sgpr_spill_count"),
        "private": field("private_segment_fixed_size"),
        "lds": field("group_segment_fixed_size"),
        "wavefront": field("wavefront_size"),
        "occupancy": None if occupancy is None else int(occupancy[1]),
    }


def _amd(ck, warp_size: int) -> Stats:
    info = amd_kernel_info(ck.asm["amdgcn"])
    if info["wavefront"] != warp_size:
        raise RuntimeError(f"compiled for {info['wavefront']}-lane wavefronts, expected {warp_size}")
    waves = "?" if info["occupancy"] is None else str(info["occupancy"])
    return Stats(info["vgprs"] + info["agprs"], info["sgprs"], info["vgpr_spills"] + info["sgpr_spills"],
                 info["private"], max(ck.metadata.shared, info["lds"]), f"{waves} waves/SIMD",
                 f"hsaco {len(ck.asm['hsaco'])} B")


def ocloc_stats(spirv: bytes, device: str, build_flags: str = "") -> dict:
    """Native code statistics for SPIR-V from Intel's offline compiler ``ocloc`` for ``device``.

    IGC's shader dump gives the SIMD width it chose, the GRF mode (registers per hardware thread) and
    the bytes it spilled. Used as a proxy where the ocloc at hand does not know the real target (the
    Arc Pro B60's Xe2): ``pvc`` (Xe-HPC) has the same 64-byte GRF and 128-GRF default mode.
    """
    import glob
    import shutil

    ocloc = shutil.which("ocloc")
    if ocloc is None:
        raise RuntimeError("ocloc is not on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.spv")
        with open(src, "wb") as f:
            f.write(spirv)
        dump = os.path.join(tmp, "dump")
        os.mkdir(dump)
        cmd = [ocloc, "compile", "-file", src, "-spirv_input", "-device", device, "-out_dir", tmp, "-q"]
        if build_flags:
            cmd += ["-options", build_flags]
        env = dict(os.environ, IGC_ShaderDumpEnable="1", IGC_DumpToCustomDir=dump)
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"ocloc failed ({out.returncode}): {(out.stdout + out.stderr).strip()[-2000:]}")
        asm = sorted(glob.glob(os.path.join(dump, "*_simd*_entry_*.asm")))
        if not asm:
            raise RuntimeError("ocloc left no shader dump (IGC_ShaderDumpEnable) to read")
        with open(asm[0]) as f:
            text = f.read()
    simd = re.search(r"_simd(\d+)_entry_", asm[0])
    grf = re.search(r"numGRF=(\d+)", text)
    spill = re.search(r"^//\.spill size (\d+)", text, re.MULTILINE)
    return {"simd": int(simd[1]) if simd else None, "grf": int(grf[1]) if grf else None,
            "spill_bytes": int(spill[1]) if spill else 0}


def _xpu(ck, ocloc_device: str | None) -> Stats:
    lanes = getattr(ck.metadata, "threads_per_warp", "?")
    binary = f"SPIR-V {len(ck.asm['spv'])} B"
    if not ocloc_device:
        return Stats(None, None, None, None, ck.metadata.shared, f"sub-group {lanes}", binary)
    native = ocloc_stats(ck.asm["spv"], ocloc_device, getattr(ck.metadata, "build_flags", ""))
    return Stats(native["grf"], None, native["spill_bytes"], None, ck.metadata.shared,
                 f"sub-group {lanes}; {ocloc_device}: SIMD{native['simd']}", binary)


def compile_config(tgt: Target, dtype: torch.dtype, config: LaunchConfig, tokens: int, experts: int = EXPERTS,
                   topk: int = TOPK, ocloc_device: str | None = None) -> Stats:
    """Compile the kernel for ``tgt`` as a call of ``tokens`` rows with ``config`` would, and read its stats.

    ``ocloc_device``: for Intel targets, also compile the SPIR-V to native code for this ``ocloc`` device
    (a stand-in where ocloc does not know the target) and report its GRF mode and spills.
    """
    import triton
    from triton.compiler import ASTSource

    sig, constants, attrs = signature(tgt.backend, dtype, config, tokens, experts, topk)
    src = ASTSource(kernel._compiled_kernel, sig, constants, attrs)
    ck = triton.compile(src, target=tgt.gpu_target(),
                        options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    if tgt.backend == "cuda":
        return _nvidia(ck, tgt.arch, config.num_warps)
    if tgt.backend == "hip":
        return _amd(ck, tgt.warp_size)
    return _xpu(ck, ocloc_device)


@dataclass
class BackwardRow:
    """The backward kernel for one target, dtype and ``renormalize``, at the launch shape ``backward.py``
    gives a training step of ``LARGEST_TOKENS`` tokens (it has no tuned table)."""

    target: str
    dtype: str
    renormalize: bool
    config: backward.BackwardConfig | None = None
    stats: Stats | None = None
    error: str | None = None

    @property
    def spilled(self) -> bool:
        return bool(self.stats and self.stats.spills)


def compile_backward(tgt: Target, dtype: torch.dtype, renormalize: bool, tokens: int = LARGEST_TOKENS,
                     experts: int = EXPERTS, topk: int = TOPK) -> BackwardRow:
    """Compile the backward kernel for ``tgt`` as a training step's call would, and read its stats."""
    import triton
    from triton.compiler import ASTSource

    row = BackwardRow(tgt.name, configs._DTYPE_NAMES[dtype], renormalize)

    def build(scale_grad: bool):
        sig, constants, attrs, config = backward_signature(tgt, dtype, tokens, experts, topk, renormalize, scale_grad)
        return triton.compile(ASTSource(backward._compiled_kernel, sig, constants, attrs), target=tgt.gpu_target(),
                              options={"num_warps": config.num_warps, "num_stages": 1}), constants, config

    try:
        ck, constants, row.config = build(True)
        row.stats = _nvidia(ck, tgt.arch, row.config.num_warps) if tgt.backend == "cuda" else _amd(ck, tgt.warp_size)
        # The scattered store's barrier, read off a compile without the scale's gradient: its partial sums
        # add a barrier and a store after the loop, which would pass the check whatever the loop holds.
        if (tgt.backend == "cuda" and constants.get(_constexpr_index(backward._compiled_kernel, "SCATTER"))
                and not _barrier_between_stores(build(False)[0].asm["ptx"])):
            row.stats, row.error = None, "no barrier between the tile's zero stores and the scattered K values"
    except Exception as exc:  # a compile error is a result to report, not a crash
        row.error = f"{type(exc).__name__}: {str(exc).strip()}"
    return row


def _constexpr_index(fn, name: str) -> tuple[int]:
    """The key of constexpr ``name`` in an ``ASTSource``'s constants."""
    return (next(i for i, p in enumerate(fn.params) if p.name == name),)


def _barrier_between_stores(ptx: str) -> bool:
    """Whether a CTA barrier (``bar.sync``/``barrier.sync``, which orders the CTA's memory accesses) lies
    between the first global store and the last, in the text: in the backward without the scale's
    gradient, whose only stores are the tile's zeros and then the scattered K values, that is the barrier
    the scattered store needs (the kernel's other barriers, for reductions, come before the zeros)."""
    kinds = [("store" if "st.global" in line else "barrier")
             for line in ptx.splitlines() if "st.global" in line or re.search(r"\b(bar|barrier)\.(cta\.)?sync\b", line)]
    first = kinds.index("store") if "store" in kinds else len(kinds)
    return any(kinds[i] == "barrier" and "store" in kinds[i + 1:] for i in range(first, len(kinds)))


def compile_backward_all(targets: Sequence[Target], experts: int = EXPERTS, topk: int = TOPK) -> list[BackwardRow]:
    """The backward kernel for every NVIDIA and AMD target, both dtypes, both ``renormalize`` (Intel's
    Triton is a different release, checked by hand so far)."""
    return [compile_backward(tgt, dtype, renormalize, experts=experts, topk=topk)
            for tgt in targets if tgt.backend in ("cuda", "hip")
            for dtype in DTYPES for renormalize in (True, False)]


def format_backward_table(rows: Sequence[BackwardRow]) -> str:
    """The backward's compiles: one line each."""
    lines = [("target", "dtype", "renormalize", "rows/warps", "regs", "spills", "scratch", "smem", "occupancy")]
    for r in rows:
        shape = "-" if r.config is None else f"{r.config.block_rows}x{r.config.sub_blocks}/{r.config.num_warps}"
        s = r.stats
        lines.append((r.target, r.dtype, str(r.renormalize), shape,
                      *(("ERROR", short_error(r.error or ""), "", "", "") if s is None else
                        (_cell(s.registers), _cell(s.spills), _cell(s.scratch), str(s.shared), s.occupancy))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


# ------------------------------------------------------------------------------------- the fused router

ROUTER_HIDDEN = 2816  # Gemma 4 26B-A4B


@dataclass
class RouterRow:
    """The fused router's kernels (the main one, and the second launch where the row splits the hidden
    dimension) for one target, router row of the family its devices get, and dtype."""

    target: str
    family: str
    bucket: str
    tokens: int
    dtype: str
    config: RouterConfig
    stats: Stats | None = None
    reduce: Stats | None = None
    error: str | None = None

    @property
    def spilled(self) -> bool:
        return bool((self.stats and self.stats.spills) or (self.reduce and self.reduce.spills))


def _router_ranges(family: configs.Family, table: configs.Table, dtype: torch.dtype):
    rows = family.router or table.default.router
    probe = configs.Family(family.name, (), rows, "")
    return bucket_ranges(probe, dtype)


def compile_router(tgt: Target, dtype: torch.dtype, config: RouterConfig, tokens: int, experts: int = EXPERTS,
                   topk: int = TOPK, hidden: int = ROUTER_HIDDEN, ocloc_device: str | None = None,
                   fewest: int | None = None) -> tuple:
    """Compile the fused router for ``tgt`` as a call of ``tokens`` rows with ``config`` would: (main kernel's
    stats, the second launch's stats or None). The second launch's shape depends on the rows
    (``router_kernel.reduce_shape``): with ``fewest`` (the bucket's smallest T) each shape the bucket can
    use is compiled, and the one that spills most is reported."""
    import triton
    from triton.compiler import ASTSource

    meta = router_kernel.constexprs(dtype, hidden, experts, topk, config, True, True, False,
                                    **configs.load_table(tgt.table).router_options())
    x = torch.empty(tokens, hidden, dtype=dtype, device="meta")
    weight = torch.empty(experts, hidden, dtype=dtype, device="meta")
    weights = torch.empty(tokens, topk, dtype=torch.float32, device="meta")
    ids = torch.empty(tokens, topk, dtype=torch.int32, device="meta")
    scale = torch.empty(experts, dtype=torch.float32, device="meta")
    partials = squares = None
    padded = -(-tokens // config.block_t) * config.block_t
    if meta["SPLIT"] > 1:
        partials = torch.empty(meta["SPLIT"], padded, meta["BLOCK_E"], dtype=torch.float32, device="meta")
        squares = torch.empty(meta["SPLIT"], padded, dtype=torch.float32, device="meta")

    def stats_of(fn, runtime, constexprs, num_warps, num_stages):
        sig, constants, attrs = _specialised(fn, list(runtime), constexprs, tgt.backend, "{given}")
        ck = triton.compile(ASTSource(fn, sig, constants, attrs), target=tgt.gpu_target(),
                            options={"num_warps": num_warps, "num_stages": num_stages})
        if tgt.backend == "cuda":
            return _nvidia(ck, tgt.arch, num_warps)
        return _amd(ck, tgt.warp_size) if tgt.backend == "hip" else _xpu(ck, ocloc_device)

    main = stats_of(router_kernel._compiled_kernel,
                    router_kernel.runtime_args(x, weight, scale, weights, ids, None, partials, squares, 1e-6), meta,
                    config.num_warps, config.num_stages)
    second = None
    if meta["SPLIT"] > 1:
        shapes = {router_kernel.reduce_shape(tokens), router_kernel.reduce_shape(fewest or tokens)}
        compiled = [stats_of(router_kernel._compiled_reduce,
                             router_kernel.reduce_args(partials, squares, scale, weights, ids, None, hidden, experts,
                                                       1e-6),
                             router_kernel.reduce_constexprs(meta, rows), warps, 1) for rows, warps in sorted(shapes)]
        second = max(compiled, key=lambda st: (st.spills or 0, st.registers or 0))
    return main, second


def compile_router_all(targets: Sequence[Target], experts: int = EXPERTS, topk: int = TOPK,
                       ocloc_device: str | None = None) -> list[RouterRow]:
    """Every router row of the family each target's devices get (the table's default family's rows where
    that family has none), both dtypes."""
    rows = []
    for tgt in targets:
        table = configs.load_table(tgt.table)
        families = {table.family_for(names).name: table.family_for(names) for names in tgt.devices}
        for family in families.values():
            for dtype in DTYPES:
                for low, high, bucket in _router_ranges(family, table, dtype):
                    tokens = high if high is not None else max(low, 65536)
                    row = RouterRow(tgt.name, family.name, _label(low, high), tokens, configs._DTYPE_NAMES[dtype],
                                    bucket.config)
                    try:
                        row.stats, row.reduce = compile_router(tgt, dtype, bucket.config, tokens, experts, topk,
                                                               ocloc_device=ocloc_device, fewest=max(low, 1))
                    except Exception as exc:  # a compile error is a result to report
                        row.error = f"{type(exc).__name__}: {str(exc).strip()}"
                    rows.append(row)
    return rows


def format_router_table(rows: Sequence[RouterRow]) -> str:
    """The fused router's compiles: one line each (the second launch's registers and spills after a slash)."""
    lines = [("target", "family", "T", "dtype", "block_t/h split warps stages", "regs", "spills", "smem",
              "occupancy")]
    for r in rows:
        c = r.config
        shape = f"{c.block_t}/{c.block_h} {c.split} {c.num_warps} {c.num_stages}"
        if r.stats is None:
            lines.append((r.target, r.family, r.bucket, r.dtype, shape, "ERROR", short_error(r.error or ""), "", ""))
            continue
        regs, spills = _cell(r.stats.registers), _cell(r.stats.spills)
        if r.reduce is not None:
            regs, spills = f"{regs}/{_cell(r.reduce.registers)}", f"{spills}/{_cell(r.reduce.spills)}"
        lines.append((r.target, r.family, r.bucket, r.dtype, shape, regs, spills, str(r.stats.shared),
                      r.stats.occupancy))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  " + "  ".join(col.ljust(w) for col, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


# ------------------------------------------------------------------------------------- every tuned config


@dataclass
class Row:
    """One target, table family, bucket and dtype: the config the table gives and what it compiled to."""

    target: str
    family: str
    serves_target: bool  # the family is the one the target's devices get
    bucket: str  # the token counts the bucket serves for this dtype, e.g. "17-256" or ">4096"
    tokens: int  # the T compiled for (the bucket's largest; LARGEST_TOKENS where unbounded)
    dtype: str
    config: LaunchConfig
    stats: Stats | None = None
    error: str | None = None
    seconds: float = 0.0
    reused: bool = field(default=False, repr=False)  # same specialisation as an earlier row: compiled once

    @property
    def spilled(self) -> bool:
        return bool(self.stats and self.stats.spills)


def bucket_ranges(family: configs.Family, dtype: torch.dtype) -> Iterator[tuple[int, int | None, configs.Bucket]]:
    """(lowest T, highest T or None, bucket) for each bucket of ``family`` that some T of ``dtype`` reaches."""
    name = configs._DTYPE_NAMES[dtype]
    low = 1
    for bucket in family.buckets:
        if bucket.dtypes and name not in bucket.dtypes:
            continue
        if bucket.max_tokens is None:
            yield low, None, bucket
            return
        if bucket.max_tokens >= low:
            yield low, bucket.max_tokens, bucket
            low = bucket.max_tokens + 1


def _label(low: int, high: int | None) -> str:
    if high is None:
        return "any" if low == 1 else f">{low - 1}"
    return str(low) if low == high else f"{low}-{high}"


def plan(targets: Sequence[Target]) -> list[Row]:
    """The rows to compile: per target, every family of its vendor table, every reachable bucket, each dtype."""
    rows = []
    for tgt in targets:
        table = configs.load_table(tgt.table)
        serving = {table.family_for(names).name for names in tgt.devices}
        for family in (*table.families, table.default):
            for dtype in DTYPES:
                for low, high, bucket in bucket_ranges(family, dtype):
                    tokens = high if high is not None else max(low, LARGEST_TOKENS)
                    rows.append(Row(tgt.name, family.name, family.name in serving, _label(low, high), tokens,
                                    configs._DTYPE_NAMES[dtype], bucket.config))
    return rows


def _spec_key(row: Row, tgt: Target, experts: int, topk: int) -> tuple:
    dtype = getattr(torch, row.dtype)
    sig, constants, attrs = signature(tgt.backend, dtype, row.config, row.tokens, experts, topk)
    return (tgt.name, tuple(sig.items()), tuple(sorted(constants.items())), repr(sorted(attrs.items())),
            row.config.num_warps, row.config.num_stages)


@contextlib.contextmanager
def _triton_cache(cache_dir: str | None):
    """Compile into ``cache_dir``, or a fresh temporary cache (so each run compiles everything anew)."""
    with tempfile.TemporaryDirectory(prefix="g4route-aot-") as tmp:
        old = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = cache_dir or tmp
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old


def _compile_job(job: tuple) -> tuple[Stats | None, str | None, float]:
    name, dtype_name, config, tokens, experts, topk, ocloc_device = job
    start = time.perf_counter()
    try:
        stats = compile_config(target(name), getattr(torch, dtype_name), config, tokens, experts, topk, ocloc_device)
        return stats, None, time.perf_counter() - start
    except Exception as exc:  # a compile error is a result to report, not a crash
        return None, f"{type(exc).__name__}: {str(exc).strip()}", time.perf_counter() - start


def compile_all(targets: Sequence[Target] | None = None, experts: int = EXPERTS, topk: int = TOPK, jobs: int = 1,
                cache_dir: str | None = None, progress: Callable[[str], None] = lambda msg: None,
                ocloc_device: str | None = None) -> list[Row]:
    """Compile every tuned config of ``targets`` (default: every target this Triton can compile for).

    Rows with the same specialisation (the same config for the same target and dtype, in two families)
    are compiled once. ``jobs > 1`` compiles in that many processes.
    """
    targets = [t for t in TARGETS if t.compiler_available() is None] if targets is None else list(targets)
    rows = plan(targets)
    by_name = {t.name: t for t in targets}
    keys = [_spec_key(r, by_name[r.target], experts, topk) for r in rows]
    first: dict[tuple, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    todo = sorted(set(first.values()))
    jobs_args = [(rows[i].target, rows[i].dtype, rows[i].config, rows[i].tokens, experts, topk, ocloc_device)
                 for i in todo]
    with _triton_cache(cache_dir):
        if jobs > 1 and len(todo) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = []
                for i, result in zip(todo, pool.map(_compile_job, jobs_args), strict=True):
                    progress(f"{rows[i].target} {rows[i].family} T {rows[i].bucket} {rows[i].dtype}")
                    results.append(result)
        else:
            results = []
            for i, job in zip(todo, jobs_args, strict=True):
                progress(f"{rows[i].target} {rows[i].family} T {rows[i].bucket} {rows[i].dtype}")
                results.append(_compile_job(job))
    done = dict(zip(todo, results, strict=True))
    for i, (row, key) in enumerate(zip(rows, keys, strict=True)):
        j = first[key]
        row.stats, row.error, seconds = done[j]
        row.seconds = seconds if i == j else 0.0
        row.reused = i != j
    return rows


# ------------------------------------------------------------------------------------------------ output

_LEGEND = {
    "cuda": "regs: registers/thread (ptxas -v); spills: bytes of spill stores+loads; scratch: stack frame "
            "bytes/thread; smem: shared bytes/program; occupancy: resident warps per SM on paper",
    "hip": "regs: VGPRs/lane (+AGPRs); sgprs: SGPRs/wave; spills: VGPRs+SGPRs spilled; scratch: private "
           "segment bytes/lane; smem: LDS bytes/program; occupancy: waves per SIMD (LLVM)",
    "xpu": "SPIR-V: the driver compiles it to native code at load time. With --ocloc-device, ocloc's native "
           "compile for that device stands in: regs: GRF per hardware thread (the GRF mode); spills: bytes "
           "IGC spilled; SIMD: lanes it chose. smem: shared local memory bytes/program; sub-group: lanes per "
           "Triton warp",
}


def short_error(error: str) -> str:
    """An error on one line: its first line and, for Triton's multi-line compile errors, its last."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return " ... ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else (lines[0] if lines else error)


def _cell(value) -> str:
    return "-" if value is None else str(value)


def format_table(rows: Sequence[Row], experts: int = EXPERTS, topk: int = TOPK) -> str:
    """A table per target: family (* = the one its devices get), bucket, dtype, config and stats."""
    out = []
    header = ("family", "T", "dtype", "rows/warps/stages/lanes", "regs", "sgprs", "spills", "scratch", "smem",
              "occupancy", "binary")
    for name in dict.fromkeys(r.target for r in rows):
        tgt = target(name)
        group = [r for r in rows if r.target == name]
        desc = f"{tgt.arch}" if not isinstance(tgt.arch, dict) else tgt.arch.get("name", "")
        out.append(f"\n== {name} ({tgt.backend}, {desc}, warp {tgt.warp_size}) "
                   f"-- backends/{tgt.table}.toml, E={experts}, K={topk}")
        out.append(f"   {_LEGEND[tgt.backend]}")
        lines = [header]
        for r in group:
            c = r.config
            s = r.stats
            cells = [("*" if r.serves_target else " ") + r.family, r.bucket, r.dtype,
                     f"{c.rows_per_program}/{c.num_warps}/{c.num_stages}/{c.lanes_per_row}"]
            if s is None:
                cells += ["ERROR", "", "", "", "", "", short_error(r.error or "")]
            else:
                cells += [_cell(s.registers), _cell(s.scalar_registers), _cell(s.spills), _cell(s.scratch),
                          str(s.shared), s.occupancy, s.binary]
            lines.append(tuple(cells))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        for line in lines:
            out.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return "\n".join(out).lstrip("\n")


def summary(rows: Sequence[Row], seconds: float) -> tuple[str, bool]:
    """A closing line and whether every row compiled without spills."""
    errors = [r for r in rows if r.error]
    spills = [r for r in rows if r.spilled]
    compiled = sum(1 for r in rows if not r.reused)
    targets = len({r.target for r in rows})
    head = f"{len(rows)} configs ({compiled} distinct compiles) for {targets} targets in {seconds:.1f} s"
    if not errors and not spills:
        return f"{head}: all compiled, no spills", True
    bad = [f"  {r.target} {r.family} T {r.bucket} {r.dtype}: "
           f"{short_error(r.error) if r.error else f'{r.stats.spills} spilled'}"
           for r in (*errors, *spills)]
    return f"{head}: {len(errors)} compile errors, {len(spills)} with spills\n" + "\n".join(bad), False


def _targets(text: str) -> list[Target]:
    chosen = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        matches = [t for t in TARGETS if name in (t.name, t.backend, t.table, t.triton_backend)]
        if not matches:
            raise argparse.ArgumentTypeError(
                f"unknown target {name!r}; use {', '.join(t.name for t in TARGETS)} or cuda, rocm, xpu")
        chosen += [t for t in matches if t not in chosen]
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m g4route.aot",
        description="Compile the kernel ahead of time for every GPU target and every config of the tuned "
                    "tables, on any machine; print registers, spills and memory; fail on an error or a spill.")
    parser.add_argument("--targets", type=_targets,
                        help="comma-separated targets or vendors (default: every target this Triton can compile "
                             f"for). Known: {', '.join(t.name for t in TARGETS)}")
    parser.add_argument("--experts", "-E", type=int, default=EXPERTS, help=f"experts (default {EXPERTS})")
    parser.add_argument("--topk", "-K", type=int, default=TOPK, help=f"experts per token (default {TOPK})")
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1,
                        help="compile in this many processes (default: one per CPU)")
    parser.add_argument("--cache-dir", help="Triton cache to compile into (default: a fresh temporary one)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--ocloc-device", metavar="DEVICE",
                        help="Intel targets: also compile the SPIR-V with ocloc for this device (e.g. pvc, whose "
                             "GRF matches Xe2) and report its GRF mode and spills")
    args = parser.parse_args(argv)

    if args.targets is None:
        targets, skipped = [], []
        for t in TARGETS:
            reason = t.compiler_available()
            (skipped.append(f"{t.name}: {reason}") if reason else targets.append(t))
    else:
        targets = args.targets
        skipped = []
        for t in targets:
            if t.compiler_available():
                print(f"g4route.aot: cannot compile for {t.name}: {t.compiler_available()}", file=sys.stderr)
                return 2
    if not targets:
        print("g4route.aot: no target this Triton can compile for:\n  " + "\n  ".join(skipped), file=sys.stderr)
        return 2
    print(f"triton {kernel.triton.__version__}, torch {torch.__version__}; compiling for "
          f"{', '.join(t.name for t in targets)} with {args.jobs} process(es)", flush=True)
    start = time.perf_counter()
    rows = compile_all(targets, args.experts, args.topk, args.jobs, args.cache_dir,
                       progress=lambda msg: print(f"  .. {msg}", file=sys.stderr, flush=True),
                       ocloc_device=args.ocloc_device)
    seconds = time.perf_counter() - start
    print(format_table(rows, args.experts, args.topk))
    for line in skipped:
        print(f"\nnot compiled here: {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1, default=str)
    line, ok = summary(rows, seconds)
    print("\n" + line)
    start = time.perf_counter()
    backward_rows = compile_backward_all(targets, args.experts, args.topk)
    if backward_rows:
        bad = [r for r in backward_rows if r.error or r.spilled]
        print(f"\nthe backward kernel (route()'s gradient; its launch shape at T={LARGEST_TOKENS:,}, "
              f"E={args.experts}, K={args.topk}; rows/warps: rows a tile x tiles a program / warps):")
        print(format_backward_table(backward_rows))
        print(f"{len(backward_rows)} backward compiles in {time.perf_counter() - start:.1f} s: "
              + ("all compiled, no spills" if not bad else f"{len(bad)} with a compile error or spills"))
        ok = ok and not bad
    start = time.perf_counter()
    router_rows = compile_router_all(targets, args.experts, args.topk, args.ocloc_device)
    if router_rows:
        bad = [r for r in router_rows if r.error or r.spilled]
        print(f"\nthe fused router (g4route.router; H={ROUTER_HIDDEN}, E={args.experts}, K={args.topk}; the router "
              "rows of the family each target's devices get; regs/spills: main kernel/second launch of a split):")
        print(format_router_table(router_rows))
        print(f"{len(router_rows)} router compiles in {time.perf_counter() - start:.1f} s: "
              + ("all compiled, no spills" if not bad else f"{len(bad)} with a compile error or spills"))
        ok = ok and not bad
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
