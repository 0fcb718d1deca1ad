"""The engine plugins' parts that need no engine: the import hook, the off switches, ``g4route info``.

The plugins against the real vLLM and SGLang are in test_engine_vllm.py and test_engine_sglang.py
(``nox -s engines``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys

import pytest

from g4route import cli
from g4route.adapters import engines
from g4route.adapters.import_hook import when_imported


@pytest.fixture
def module_on_disk(tmp_path, monkeypatch):
    """A fresh module ``g4route_hook_probe_<n>`` on sys.path that records that its code ran."""
    name = f"g4route_hook_probe_{len(sys.modules)}"
    (tmp_path / f"{name}.py").write_text("EXECUTED = True\nVALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_when_imported_runs_after_the_module_code_and_before_the_importer_sees_it(module_on_disk):
    seen = []

    def callback(module):
        seen.append(module.EXECUTED)
        module.VALUE = 2

    when_imported(module_on_disk, callback)
    assert seen == [] and module_on_disk not in sys.modules  # nothing imported by asking
    module = importlib.import_module(module_on_disk)
    assert seen == [True] and module.VALUE == 2
    # The module keeps its own loader (source lookups go through it), and the hook is gone.
    assert type(module.__loader__).__name__ == "SourceFileLoader"
    assert not any(type(f).__name__ == "_Finder" and f.name == module_on_disk for f in sys.meta_path)
    importlib.reload(module)
    assert seen == [True] and module.VALUE == 1


def test_when_imported_runs_at_once_for_an_imported_module_and_can_be_cancelled(module_on_disk):
    seen = []
    cancel = when_imported(module_on_disk, seen.append)
    cancel()
    module = importlib.import_module(module_on_disk)
    assert seen == []
    when_imported(module_on_disk, seen.append)
    assert seen == [module]


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False), ("false", False), ("OFF", False),
                                       ("", True)])
def test_plugin_enabled(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("G4ROUTE_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("G4ROUTE_TEST_SWITCH", value)
    assert engines.plugin_enabled("G4ROUTE_TEST_SWITCH") is on


def test_info_lists_each_engine_and_whether_the_plugin_applies(capsys, monkeypatch):
    monkeypatch.delenv("G4ROUTE_BACKEND", raising=False)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("serving engines"):].splitlines()[1:]
    for engine, distribution in (("vllm", "vllm"), ("sglang", "sglang")):
        line = next(x for x in section if x.strip().startswith(engine))
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            assert line.strip() == f"{engine}: not installed"
        else:
            assert line.strip().startswith(f"{engine} {version}: ")


def test_info_names_the_setting_that_turns_a_plugin_off(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "someone_else")
    monkeypatch.setenv("G4ROUTE_SGLANG", "0")
    assert engines._vllm_allow_list() == "VLLM_PLUGINS='someone_else' does not list 'g4route'"
    monkeypatch.setenv("VLLM_PLUGINS", "a,g4route")
    assert engines._vllm_allow_list() is None
    monkeypatch.setenv("SGLANG_PLUGINS", "")
    assert engines._sglang_allow_list() is None   # empty: SGLang loads every plugin
    report = engines.EngineReport("sglang", "0.5.23", True, "G4ROUTE_SGLANG=0", ())
    assert not report.applies and report.describe() == "sglang 0.5.23: plugin off (G4ROUTE_SGLANG=0)"
    report = engines.EngineReport("vllm", "9.9", True, None, ("no function gemma4_routing_function_torch",))
    assert not report.applies and "would change nothing: no function gemma4_routing_function_torch" in \
        report.describe()
