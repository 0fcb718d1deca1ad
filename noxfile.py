"""nox sessions: CPU tests, per-device parity suites, lint, the benchmark, ahead-of-time compiles.

- ``tests``: a fresh virtualenv with a CPU PyTorch and Triton, g4route installed from a wheel build
  (non-editable, so the tuned tables must ship), the contract on the reference and on the real
  kernel under Triton's interpreter.
- ``test-cuda`` / ``test-rocm`` / ``test-xpu``: on a machine with that device, the device suite with
  that machine's own PyTorch (no virtualenv, no network); elsewhere they skip and say what is missing.
"""

from __future__ import annotations

import os
import sys

import nox

nox.options.sessions = ["tests", "lint"]

ROOT = os.path.dirname(os.path.abspath(__file__))
# The PyTorch for the CPU virtualenvs; override for another platform, e.g. G4ROUTE_TORCH="torch>=2.4".
TORCH = os.environ.get("G4ROUTE_TORCH", "torch==2.13.0")
TRITON = os.environ.get("G4ROUTE_TRITON", "triton==3.6.0")
CPU_MARKERS = "not cuda and not rocm and not xpu"

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
    session.install(TORCH, TRITON, "numpy", "pytest")
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
