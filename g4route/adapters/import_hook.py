"""Run a function on a module once it has been imported, without importing it.

The engine plugins must not import an engine's model code themselves: the plugin is loaded in every
process the engine starts (API server, engine core, workers, detokenizer), most of which never build a
model, and the model module pulls in much of the engine. So a plugin asks to be called when the engine
itself imports the module: at once if it already has, else right after the module's code has run, before
the importer gets it back (so before any class in it can be instantiated).
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
import types
from collections.abc import Callable

__all__ = ["when_imported"]

_lock = threading.Lock()


class _Loader(importlib.abc.Loader):
    """The module's own loader, with ``callback(module)`` run after ``exec_module``."""

    def __init__(self, loader: importlib.abc.Loader, callback: Callable[[types.ModuleType], None]) -> None:
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        # The module keeps its own loader (inspect, linecache and torch.compile read sources through it).
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._callback(module)

    def __getattr__(self, name: str):  # get_source, get_filename, is_package, ...
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``name`` through the other finders and wraps its loader; removes itself once used."""

    def __init__(self, name: str, callback: Callable[[types.ModuleType], None]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        with _lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, self.callback)
                return spec
        return None


def when_imported(name: str, callback: Callable[[types.ModuleType], None]) -> Callable[[], None]:
    """Call ``callback(module)`` when module ``name`` is imported (now, if it already is).

    Returns a function that cancels a call still pending (a no-op once it has run). The callback runs
    once, inside the importer's ``import`` statement: it must not raise (an exception would fail the
    engine's import), so the plugins wrap theirs.
    """
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return lambda: None
    finder = _Finder(name, callback)
    with _lock:
        sys.meta_path.insert(0, finder)

    def cancel() -> None:
        with _lock:
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)

    return cancel
