"""AMD and Intel on a CPU machine: detection, backend, table family and bucket from simulated platform answers,
and the ahead-of-time compile of the real kernel for an NVIDIA and an AMD target.

Only the platform's answers are simulated (``PlatformFacts`` records, ``torch.cuda.get_device_properties``,
``torch.xpu.get_device_name``, ``torch.version``); the registry, the shipped tables and the kernel are real.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from g4route import aot, kernel, platforms, registry
from g4route.kernel import LaunchConfig

CUDA0 = torch.device("cuda", 0)
XPU0 = torch.device("xpu", 0)
E, K = 128, 8

from test_registry import _BASE  # noqa: E402  (the simulated CPU-only platform, shared)

AMD = dataclasses.replace(_BASE, torch_version="2.13.0+rocm6.3", hip_version="6.3", cuda_available=True)
INTEL = dataclasses.replace(_BASE, torch_version="2.13.0+xpu", xpu_available=True, xpu_note="native torch.xpu")


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch):
    """Device names are simulated per test: drop the family cache (keyed by device) around each test."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.setattr(registry, "_warned", set())
    registry._family.cache_clear()
    yield
    registry._family.cache_clear()


def _amd_gpu(monkeypatch, name: str, arch: str) -> None:
    """torch.cuda as a ROCm build answers for ``name`` (gcnArchName carries the feature suffix)."""
    props = SimpleNamespace(name=name, gcnArchName=arch, total_memory=192 << 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


def _intel_gpu(monkeypatch, name: str) -> None:
    monkeypatch.setattr(torch.xpu, "get_device_name", lambda device=None: name)


def _configs(backend: registry.Backend, device: torch.device) -> dict:
    """The config at a few token counts on both sides of the bucket edges, per dtype."""
    return {(t, str(d).removeprefix("torch.")): backend.config_for(device, t, d)
            for t in (1, 64, 65, 256, 257, 1024, 1025, 4096, 4097, 8192, 8193, 262144)
            for d in (torch.float32, torch.bfloat16, torch.float16)}


def _assert_rows_and_warps(backend: registry.Backend, device: torch.device, expected: dict) -> None:
    """Each ``(tokens, dtype) -> (rows, warps)`` of ``expected`` is what the backend's table gives."""
    configs = _configs(backend, device)
    for (tokens, dtype), (rows, warps) in expected.items():
        got = configs[(tokens, dtype)]
        assert (got.rows_per_program, got.num_warps) == (rows, warps), (tokens, dtype, got)


# ------------------------------------------------------------------------------------------------- ROCm


@pytest.mark.parametrize(
    ("name", "arch", "names"),
    [
        ("AMD Instinct MI300X", "gfx942:sramecc+:xnack-", ("AMD Instinct MI300X", "gfx942")),
        ("AMD Instinct MI250X / MI250", "gfx90a:sramecc+:xnack-", ("AMD Instinct MI250X / MI250", "gfx90a")),
        ("AMD Radeon RX 7900 XTX", "gfx1100", ("AMD Radeon RX 7900 XTX", "gfx1100")),
        ("AMD Radeon Graphics", "", ("AMD Radeon Graphics",)),  # an empty gcnArchName adds nothing
    ],
    ids=["mi300x", "mi250", "rx7900xtx", "no-arch"],
)
def test_rocm_device_names_strip_the_feature_suffix(monkeypatch, name, arch, names):
    _amd_gpu(monkeypatch, name, arch)
    assert platforms.device_names(CUDA0) == names


def test_nvidia_device_names_have_no_arch(monkeypatch):
    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3")  # CUDA builds have no gcnArchName
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    assert platforms.device_names(CUDA0) == ("NVIDIA H100 80GB HBM3",)


def test_probe_reads_a_rocm_build(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.3.42131", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    facts = platforms.probe.__wrapped__()  # uncached: this process's own answer stays as it is
    assert (facts.hip_version, facts.cuda_version, facts.cuda_available) == ("6.3.42131", None, True)
    assert registry.select(CUDA0, E, K, facts=facts, env={}).name == "rocm"
    assert "not a CUDA build" not in (registry.why_not(registry.get("rocm"), CUDA0, E, K, facts) or "")
    assert "ROCm build" in registry.why_not(registry.get("cuda"), CUDA0, E, K, facts)


# (device name, gcnArchName, family, {(T, dtype): (rows_per_program, num_warps)} at the bucket edges)
_MI300 = {(1024, "float32"): (1, 1), (1025, "float32"): (2, 1), (8192, "bfloat16"): (2, 1),
          (8193, "float32"): (4, 1), (8193, "bfloat16"): (8, 1), (262144, "float16"): (8, 1)}
_MI250 = {(256, "bfloat16"): (1, 1), (257, "bfloat16"): (2, 1), (4096, "float32"): (2, 1),
          (4097, "float32"): (4, 1), (4097, "bfloat16"): (8, 1)}
_RDNA3 = {(64, "float32"): (1, 1), (65, "float32"): (2, 1), (1024, "bfloat16"): (2, 1),
          (1025, "float32"): (4, 1), (1025, "bfloat16"): (8, 1)}
_AMD_DEFAULT = {(64, "float32"): (1, 1), (65, "bfloat16"): (4, 2), (4097, "float32"): (16, 4)}


@pytest.mark.parametrize(
    ("name", "arch", "family", "expected"),
    [
        ("AMD Instinct MI300X", "gfx942:sramecc+:xnack-", "mi300", _MI300),
        ("AMD Instinct MI325X", "gfx942:sramecc+:xnack-", "mi300", _MI300),
        ("AMD Instinct MI250X / MI250", "gfx90a:sramecc+:xnack-", "mi250", _MI250),
        ("AMD Instinct MI210", "gfx90a:sramecc+:xnack-", "mi250", _MI250),
        ("AMD Radeon RX 7900 XTX", "gfx1100", "rdna3", _RDNA3),
        ("AMD Radeon PRO W7900", "gfx1100", "rdna3", _RDNA3),
        ("AMD Instinct MI100", "gfx908:sramecc+:xnack-", "default", _AMD_DEFAULT),
        ("AMD Radeon RX 6900 XT", "gfx1030", "default", _AMD_DEFAULT),
    ],
    ids=["mi300x", "mi325x", "mi250", "mi210", "rx7900xtx", "w7900", "unknown-mi100", "unknown-rdna2"],
)
def test_rocm_device_gets_its_family_and_buckets(monkeypatch, name, arch, family, expected):
    _amd_gpu(monkeypatch, name, arch)
    backend = registry.select(CUDA0, E, K, facts=AMD, env={})
    assert backend.name == "rocm" and backend.table == "rocm"
    assert backend.family_name(CUDA0) == family
    _assert_rows_and_warps(backend, CUDA0, expected)


def test_rocm_family_matches_the_arch_alone(monkeypatch):
    # A board name the table has never seen still gets its family from the gcnArchName.
    _amd_gpu(monkeypatch, "AMD Instinct MI300X VF (renamed by a cloud)", "gfx942:sramecc+:xnack-")
    assert registry.get("rocm").family_name(CUDA0) == "mi300"
    registry._family.cache_clear()
    _amd_gpu(monkeypatch, "Some Future Board", "gfx90a")
    assert registry.get("rocm").family_name(CUDA0) == "mi250"


# ------------------------------------------------------------------------------------------------- Intel


def test_probe_xpu_native(monkeypatch):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    imported = []
    monkeypatch.setattr(platforms.importlib, "import_module", lambda name: imported.append(name))
    assert platforms._probe_xpu() == (True, "native torch.xpu")
    assert imported == []  # a PyTorch that sees the GPU never loads the Intel extension


def test_probe_xpu_through_the_extension(monkeypatch):
    seen = {"available": False}
    monkeypatch.setattr(torch.xpu, "is_available", lambda: seen["available"])

    def import_extension(name):
        assert name == "intel_extension_for_pytorch"
        seen["available"] = True  # importing the extension is what makes the device visible

    monkeypatch.setattr(platforms.importlib, "import_module", import_extension)
    assert platforms._probe_xpu() == (True, "torch.xpu through intel_extension_for_pytorch")


@pytest.mark.parametrize(
    ("error", "note"),
    [(ImportError("No module named 'intel_extension_for_pytorch'"), "not installed"),
     (RuntimeError("undefined symbol"), "failed to import: undefined symbol")],
    ids=["not-installed", "broken"],
)
def test_probe_xpu_without_a_device(monkeypatch, error, note):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)

    def fail(name):
        raise error

    monkeypatch.setattr(platforms.importlib, "import_module", fail)
    available, message = platforms._probe_xpu()
    assert not available and note in message


def test_probe_xpu_extension_without_a_device(monkeypatch):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    monkeypatch.setattr(platforms.importlib, "import_module", lambda name: None)
    assert platforms._probe_xpu() == (False, "no XPU device visible, even with intel_extension_for_pytorch")


# Cut (2026-11-27) where the pvc stand-in showed spills: b60 float32 past 256 tokens and 16-bit past 4,096,
# default float32 past 4,096 (BENCHMARKS.md, the fused router's Intel compiles).
_B60 = {(1, "float32"): (1, 1), (256, "bfloat16"): (1, 1), (257, "float32"): (1, 1), (262144, "float32"): (1, 1),
        (4096, "bfloat16"): (2, 1), (4097, "bfloat16"): (2, 1), (4097, "float16"): (2, 1)}
_XPU_DEFAULT = {(64, "float32"): (1, 1), (65, "float32"): (4, 4), (4097, "float32"): (4, 4),
                (4097, "bfloat16"): (16, 8)}


@pytest.mark.parametrize(
    ("name", "family", "expected"),
    [
        ("Intel(R) Arc(TM) Pro B60 Graphics", "b60", _B60),
        ("Intel(R) Graphics [Battlemage]", "b60", _B60),
        ("Intel(R) Data Center GPU Max 1550", "default", _XPU_DEFAULT),
        ("Intel(R) Arc(TM) A770 Graphics", "default", _XPU_DEFAULT),
    ],
    ids=["arc-pro-b60", "battlemage", "unknown-max-1550", "unknown-a770"],
)
def test_xpu_device_gets_its_family_and_buckets(monkeypatch, name, family, expected):
    _intel_gpu(monkeypatch, name)
    assert platforms.device_names(XPU0) == (name,)
    backend = registry.select(XPU0, E, K, facts=INTEL, env={})
    assert backend.name == "xpu" and backend.table == "xpu"
    assert backend.family_name(XPU0) == family
    _assert_rows_and_warps(backend, XPU0, expected)


# -------------------------------------------------------------------------------- ahead-of-time compiles


def test_aot_plan_covers_every_family_of_the_vendor_table():
    rows = aot.plan([aot.target("gfx942"), aot.target("xpu-b60")])
    amd = [r for r in rows if r.target == "gfx942"]
    assert {r.family for r in amd} == {"mi300", "mi250", "rdna3", "default"}
    assert {r.family for r in amd if r.serves_target} == {"mi300"}
    assert {r.dtype for r in amd} == {"float32", "bfloat16"}
    # mi300, float32: 1-1024, 1025-8192, then the float32 row; the bfloat16-or-any row is never reached.
    mi300 = [(r.bucket, r.tokens, r.config.rows_per_program) for r in amd
             if r.family == "mi300" and r.dtype == "float32"]
    assert mi300 == [("1-1024", 1024, 1), ("1025-8192", 8192, 2), (">8192", aot.LARGEST_TOKENS, 4)]
    assert {r.family for r in rows if r.target == "xpu-b60" and r.serves_target} == {"b60"}


def test_aot_signature_follows_the_kernel_parameters():
    config = LaunchConfig(4, 1)
    sig, constants, attrs = aot.signature("cuda", torch.bfloat16, config, 4099)
    params = kernel._compiled_kernel.params
    meta = kernel.constexprs(torch.bfloat16, E, K, config, True, True)
    assert list(sig) == [p.name for p in params]
    # every constexpr the launcher passes, at its position
    assert {p.name: constants[(i,)] for i, p in enumerate(params) if p.is_constexpr} == meta
    runtime = [(i, p.name) for i, p in enumerate(params) if not p.is_constexpr]
    kinds = [sig[name] for _, name in runtime]
    # four pointers: bfloat16 logits first, float32 scale and weights, int32 ids; all 16-byte aligned
    assert kinds[:4] == ["*bf16", "*fp32", "*fp32", "*i32"]
    assert all(attrs[(i,)] == [["tt.divisibility", 16]] for i, _ in runtime[:4])
    # then T = 4099 (no hint), E = 128 (a multiple of 16), and the strides: the three of the contiguous
    # last dimensions are 1 and become constexprs, as Triton's JIT makes them
    assert kinds[4:6] == ["i32", "i32"] and (runtime[4][0],) not in attrs and (runtime[5][0],) in attrs
    ones = [i for i, _ in runtime[6:] if sig[params[i].name] == "constexpr"]
    assert len(ones) == 3 and all(constants[(i,)] == 1 for i in ones)


def _triton_jit_specialization():
    """Triton's own specialiser (Triton 3.6) and a backend class per target, or skip."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.amd.compiler import HIPBackend
        from triton.backends.nvidia.compiler import CUDABackend
    except ImportError as exc:
        pytest.skip(f"Triton's native specialiser is not importable here ({exc})")
    return native_specialize_impl, {"cuda": CUDABackend, "hip": HIPBackend}


@pytest.mark.parametrize("backend", ["cuda", "hip"])
def test_aot_specialization_matches_the_triton_jit(backend):
    native, classes = _triton_jit_specialization()
    args = [torch.empty(4099, E, dtype=torch.bfloat16, device="meta"), torch.empty(8, dtype=torch.int32,
                                                                                   device="meta"), 1, 128, 4099, 4096]
    # (specialize, align): a plain parameter, then do_not_specialize and do_not_specialize_on_alignment
    for flags in ((True, True), (False, True), (True, False)):
        for arg in args:
            kind, key = native(classes[backend], arg, False, *flags)
            ours_kind, ours_value, ours_attrs = aot.specialize(arg, backend, *flags)
            assert ours_kind == kind, (arg, flags)
            if kind == "constexpr":
                assert ours_value == key
            else:
                assert ours_attrs == (classes[backend].parse_attr(key) if key else []), (arg, flags, key)


_COMPILE_SCRIPT = """
import dataclasses, json, sys, torch
from g4route import aot
from g4route.kernel import LaunchConfig
out = {}
for name, dtype, rows, warps in json.loads(sys.argv[1]):
    tgt = aot.target(name)
    reason = tgt.compiler_available()
    if reason:
        out[name] = {"skip": reason}
        continue
    try:
        stats = aot.compile_config(tgt, getattr(torch, dtype), LaunchConfig(rows, warps), 65536)
    except FileNotFoundError as exc:  # e.g. a Triton install without its bundled ptxas
        out[name] = {"skip": f"the {name} toolchain is incomplete: {exc}"}
        continue
    out[name] = dataclasses.asdict(stats)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def aot_compiles(tmp_path_factory):
    """One bfloat16 config for sm_90 and one float32 config for gfx942, compiled in a fresh process.

    A fresh process because Triton's interpreter, which other tests run in this one, leaves
    ``triton.language`` patched for interpretation, and a real compile after it fails.
    """
    import json
    import os
    import subprocess
    import sys

    import g4route

    jobs = [["sm_90", "bfloat16", 8, 1], ["gfx942", "float32", 4, 1]]
    tmp = tmp_path_factory.mktemp("aot")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp),  # a cold compile, nothing left in ~/.triton
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(g4route.__file__))))
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                          cwd=tmp, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["sm_90", "gfx942"])
def test_aot_compile_one_config_has_no_spills(aot_compiles, name):
    stats = aot_compiles[name]
    if "skip" in stats:
        pytest.skip(f"cannot compile for {name} here: {stats['skip']}")
    assert stats["spills"] == 0 and stats["scratch"] == 0, stats
    assert 0 < stats["registers"] <= 255, stats
    if name == "gfx942":
        assert stats["scalar_registers"] > 0 and "waves/SIMD" in stats["occupancy"]
    else:
        assert "warps/SM" in stats["occupancy"]


def test_nvidia_occupancy_on_paper():
    # 1 warp per program: the 32-programs-per-SM cap, not registers, limits it to 32 of 64 warps.
    assert aot.nvidia_warps_per_sm(36, 1, 32, 90) == (32, 64)
    # 66 registers -> 2304 per warp -> 7 warps per sub-partition -> 28 warps.
    assert aot.nvidia_warps_per_sm(66, 1, 16, 90) == (28, 64)
    assert aot.nvidia_warps_per_sm(32, 8, 64, 80) == (64, 64)


def test_the_scatter_check_wants_a_barrier_between_the_stores():
    """The backward's scattered store is right only after the barrier that follows the tile's zeros: the
    AOT check reads that order off the PTX (a barrier before the first store, or after the last, is not
    enough)."""
    zeros, value = "st.global.v4.b32 [ %rd1 + 0 ], { %r1, %r1, %r1, %r1 };", "@%p2 st.global.b32 [ %rd2 + 0 ], { %r2 };"
    assert aot._barrier_between_stores("\n".join([zeros, "bar.sync 0;", value]))
    assert aot._barrier_between_stores("\n".join([zeros, "barrier.sync 0;", value]))
    assert not aot._barrier_between_stores("\n".join(["bar.sync 0;", zeros, value, "bar.sync 0;"]))
    assert not aot._barrier_between_stores("\n".join([zeros, "bar.warp.sync -1;", value]))
    assert not aot._barrier_between_stores("\n".join([zeros, value]))


_NO_BARRIER_SCRIPT = """
import json, torch, triton.language as tl
from triton.language import core
from g4route import aot
tgt = aot.target("sm_90")
reason = tgt.compiler_available()
if reason:
    print(json.dumps({"skip": reason}))
    raise SystemExit
if {drop}:
    @core.builtin
    def _no_barrier(_semantic=None):
        return None
    core.debug_barrier = tl.debug_barrier = _no_barrier
row = aot.compile_backward(tgt, torch.bfloat16, True)
print(json.dumps({"error": row.error}))
"""


@pytest.mark.parametrize("drop", [False, True], ids=["as-written", "barrier-removed"])
def test_the_scatter_check_catches_a_kernel_without_its_barrier(tmp_path, drop):
    """The real check on a real sm_90 compile (a fresh process and Triton cache: see aot_compiles): the
    backward as written passes, and the same kernel with ``tl.debug_barrier`` made a no-op fails."""
    import json
    import os
    import subprocess
    import sys

    import g4route

    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(g4route.__file__))))
    done = subprocess.run([sys.executable, "-c", _NO_BARRIER_SCRIPT.replace("{drop}", str(drop))],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(f"cannot compile for sm_90 here: {result['skip']}")
    assert (result["error"] is not None) == drop, result
