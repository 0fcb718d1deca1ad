"""nox sessions: CPU tests, per-device parity suites, lint, the benchmark, ahead-of-time compiles.

- ``tests``: a fresh virtualenv with a CPU PyTorch and Triton, g4route installed from a wheel build
  (non-editable, so the tuned tables must ship), the contract on the reference and on the real
  kernel under Triton's interpreter.
- ``test-cuda`` / ``test-rocm`` / ``test-xpu``: on a machine with that device, the device suite with
  that machine's own PyTorch (no virtualenv, no network); elsewhere they skip and say what is missing.
- ``compile``: on any machine (no GPU needed), the kernel compiled ahead of time for NVIDIA (sm_80,
  sm_90, sm_100) and AMD (gfx90a, gfx942, gfx950, gfx1100) with every config of the tuned tables;
  fails on a compile error or a register spill (``python -m g4route.aot``).
- ``compile-xpu``: the same for Intel (SPIR-V for the Arc Pro B60) with triton-xpu, which replaces
  the triton package and so gets a virtualenv of its own.
- ``engines``: g4route's vLLM and SGLang plugins against the real engines (pinned, installed for a CPU),
  through each engine's own plugin loader and routing call; fails if any test is skipped.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import xml.etree.ElementTree as ElementTree

import nox

nox.options.sessions = ["tests", "lint", "compile", "engines"]

ROOT = os.path.dirname(os.path.abspath(__file__))
# The PyTorch for the CPU virtualenvs; override for another platform, e.g. G4ROUTE_TORCH="torch>=2.4".
TORCH = os.environ.get("G4ROUTE_TORCH", "torch==2.13.0")
TRITON = os.environ.get("G4ROUTE_TRITON", "triton==3.6.0")
CPU_MARKERS = "not cuda and not rocm and not xpu and not engines"
# Intel's Triton (the `intel` backend) and the SYCL runtime it builds against (DESIGN.md section 4).
TRITON_XPU = os.environ.get("G4ROUTE_TRITON_XPU", "triton-xpu==3.3.0b1")
SYCL_RT = os.environ.get("G4ROUTE_SYCL_RT", "intel-sycl-rt==2025.0.5")

# What each device suite needs from the machine's own PyTorch, asked in a subprocess of that Python.
_DEVICE_PROBES = {
    "cuda": "import torch; ok = torch.cuda.is_available() and torch.version.cuda is not None; "
            "print('ok' if ok else 'no NVIDIA GPU: torch.cuda.is_available()=%s, torch.version.cuda=%s' "
            "% (torch.cuda.is_available(), torch.version.cuda))",
    "rocm": "import torch; ok = torch.cuda.is_available() and getattr(torch.version, 'hip', None) is not None; "
            "print('ok' if ok else 'no AMD GPU: torch.cuda.is_available()=%s, torch.version.hip=%s' "
            "% (torch.cuda.is_available(), getattr(torch.version, 'hip', None)))",
    "xpu": "from g4route import platforms; f = platforms.probe(); "
           "print('ok' if f.xpu_available else 'no Intel GPU: ' + f.xpu_note)",
}


@nox.session
def tests(session: nox.Session) -> None:
    """CPU suite: reference + the Triton kernel under the interpreter, against the float64 oracle."""
    # transformers: the Gemma 4 adapter is tested against the real package (a tiny random model).
    session.install(TORCH, TRITON, "numpy", "pytest", "transformers==5.24.0")
    session.install("--no-deps", ROOT)  # a wheel build, not editable: the tables must ship in it
    # pytest's own script (not `python -m`) keeps the checkout off sys.path: the installed copy is tested.
    session.run("pytest", "-m", CPU_MARKERS, "-q", *session.posargs, env={"G4ROUTE_BACKEND": ""})


def _device_suite(session: nox.Session, marker: str) -> None:
    """Run the ``marker`` suite with this machine's own Python and PyTorch, or skip saying why."""
    probe = session.run(sys.executable, "-c", _DEVICE_PROBES[marker], silent=True, external=True,
                        env={"PYTHONPATH": ROOT}).strip().splitlines()[-1]
    if probe != "ok":
        session.skip(f"test-{marker} did not run: {probe}")
    session.run(sys.executable, "-m", "pytest", "-m", marker, "-q", "-rs", *session.posargs,
                env={"PYTHONPATH": ROOT, "G4ROUTE_BACKEND": ""}, external=True)


@nox.session(name="test-cuda", python=False)
def test_cuda(session: nox.Session) -> None:
    """NVIDIA parity suite (the cuda backend and the reference on the GPU)."""
    _device_suite(session, "cuda")


@nox.session(name="test-rocm", python=False)
def test_rocm(session: nox.Session) -> None:
    """AMD parity suite (the rocm backend)."""
    _device_suite(session, "rocm")


@nox.session(name="test-xpu", python=False)
def test_xpu(session: nox.Session) -> None:
    """Intel parity suite (the xpu backend)."""
    _device_suite(session, "xpu")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over everything in the repository."""
    session.install("ruff")
    session.run("ruff", "check", ROOT)


@nox.session(venv_params=["--system-site-packages"])
def bench(session: nox.Session) -> None:
    """The main job: ``g4route bench`` on whatever device is here (the PyTorch reference on a CPU).

    The virtualenv sees the machine's own packages, so a GPU machine's PyTorch is used as it is, with no
    network; where no PyTorch is installed, the CPU build is.
    """
    has_torch = session.run("python", "-c", "import importlib.util as u; print(u.find_spec('torch') is not None)",
                            silent=True).strip().endswith("True")
    if not has_torch:
        session.install(TORCH, TRITON)
    session.run("python", "-m", "g4route", "bench", *session.posargs, env={"PYTHONPATH": ROOT})


@nox.session(name="compile")
def compile_kernels(session: nox.Session) -> None:
    """Ahead-of-time compiles for every NVIDIA and AMD target and every tuned config; no GPU needed.

    Prints registers, spills, shared and scratch memory per target and config, and fails on a compile
    error or a spill. Arguments after ``--`` go to ``python -m g4route.aot`` (e.g. ``--targets gfx942``).
    """
    session.install(TORCH, TRITON, "numpy")
    session.run("python", "-m", "g4route.aot", *session.posargs, env={"PYTHONPATH": ROOT})


def _xpu_build_missing() -> list[str]:
    """What this machine lacks for triton-xpu's Intel backend, which builds a small SYCL helper with a
    C++ compiler and links it against Level Zero's loader when it starts, even with no Intel GPU."""
    missing = []
    if not sys.platform.startswith("linux"):
        missing.append(f"triton-xpu wheels are for Linux, this is {sys.platform}")
    cc = os.environ.get("CC", "g++")
    if shutil.which(cc.split()[0]) is None:
        missing.append(f"no C++ compiler {cc!r} (apt-get install g++, or set CC)")
    ze_root = os.environ.get("ZE_PATH", "/usr/local")
    dirs = [os.path.join(ze_root, "lib"), "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"]
    if not any(glob.glob(os.path.join(d, "libze_loader.so")) for d in dirs):
        missing.append("no libze_loader.so to link against (apt-get install libze-dev)")
    return missing


@nox.session(name="compile-xpu")
def compile_xpu(session: nox.Session) -> None:
    """Ahead-of-time compile for Intel: SPIR-V for the Arc Pro B60 with every config of backends/xpu.toml.

    triton-xpu replaces the triton package, so it lives in this session's own virtualenv. Its SPIR-V
    gets registers only in the driver; where ``ocloc`` is on PATH (Debian: apt-get install
    intel-opencl-icd), it compiles the SPIR-V for Xe-HPC (``pvc``, the same GRF as Xe2) as a stand-in
    and the session fails on a spill there too.
    """
    missing = _xpu_build_missing()
    if missing:
        session.skip("compile-xpu did not run: " + "; ".join(missing))
    session.install(TORCH, "numpy")
    session.install(TRITON_XPU, SYCL_RT)
    args = ["--targets", "xpu"]
    if shutil.which("ocloc"):
        args += ["--ocloc-device", "pvc"]
    else:
        session.log("no ocloc on PATH: SPIR-V only, no register or spill counts "
                    "(apt-get install intel-opencl-icd brings one that knows pvc)")
    session.run("python", "-m", "g4route.aot", *args, *session.posargs,
                env={"PYTHONPATH": ROOT, "CC": os.environ.get("CC", "g++")})


# The engines the plugins are tested against and what importing their Gemma 4 model code takes, pinned.
ENGINES_REQUIREMENTS = os.path.join(ROOT, "tests", "requirements-engines.txt")
_ENGINE_VERSIONS = """
import importlib.metadata as m
def version(d):
    try:
        return m.version(d)
    except m.PackageNotFoundError:
        return "not installed (tests/torchvision_stub.py stands in)" if d == "torchvision" else "not installed"
print("; ".join(f"{d} {version(d)}" for d in ("vllm", "sglang", "transformers", "torch", "triton", "torchvision",
                                              "g4route")))
"""


@nox.session
def engines(session: nox.Session) -> None:
    """vLLM 0.33.0 and SGLang 0.5.23 route Gemma 4 through g4route's plugins (tests marked ``engines``).

    The engines go in with ``--no-deps`` and only what their Gemma 4 model modules import on a CPU
    (tests/requirements-engines.txt): their full requirements are GPU stacks. g4route is installed from a
    wheel build, as a user has it, so the engines find its entry points. A skipped test fails the session.
    """
    session.install(TORCH, TRITON, "numpy==2.4.6", "pytest==9.2.0")
    session.install("--no-deps", "-r", ENGINES_REQUIREMENTS)
    session.install("--no-deps", ROOT)
    session.run("python", "-c", _ENGINE_VERSIONS)
    report = os.path.join(session.create_tmp(), "engines-junit.xml")
    # -rP: the passing tests' output too (what each engine's loader logged about g4route's plugin).
    session.run("pytest", "-m", "engines", "-v", "-rsP", f"--junitxml={report}", *session.posargs,
                env={"G4ROUTE_BACKEND": "", "VLLM_TARGET_DEVICE": "cpu"})
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    skipped, tests = int(suite.get("skipped", 0)), int(suite.get("tests", 0))
    if skipped or not tests:
        session.error(f"engines: {skipped} of {tests} tests skipped; a skipped engine test is not a pass")
