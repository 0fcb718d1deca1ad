"""A stand-in for ``torchvision``, for importing SGLang on a machine that has no CPU build of torchvision.

SGLang 0.5.23 imports torchvision unconditionally (its multimodal processors and configs, reached from
``sglang.srt.models.gemma4_causal``), and so does Transformers' ``image_utils`` once it sees a torchvision.
PyPI's torchvision wheels are CUDA builds that fail to import next to a CPU PyTorch ("operator
torchvision::nms does not exist"), and PyTorch's CPU wheel index is not reachable from CI here. Nothing
the engine tests run touches an image: every name the importers ask for is a placeholder that raises
if it is ever called.

``install()`` puts the stand-in in place only when the real package cannot be imported, and says so.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

STUB_NOTE = "torchvision is a stand-in (tests/torchvision_stub.py): no CPU build of torchvision installs here"


class _Placeholder:
    """Any name imported from the stand-in: a class, callable or enum member that fails when used."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is part of the torchvision stand-in of the engine tests")

    def __getattr__(self, attr: str) -> _Placeholder:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self._name}.{attr}")

    def __mro_entries__(self, bases):  # `class X(torchvision.Something)` still works
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str) -> _Placeholder:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self.__name__}.{attr}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``torchvision`` and every ``torchvision.*`` submodule as an empty stand-in package."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+g4route.stub"
        return module

    def exec_module(self, module):
        pass


def install() -> bool:
    """Put the stand-in in place if torchvision does not import; True if it did."""
    try:
        import torchvision  # noqa: F401
        return False
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    sys.meta_path.insert(0, _StubFinder())
    return True
