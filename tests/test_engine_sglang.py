"""g4route's SGLang plugin against the real SGLang package (``nox -s engines``: SGLang 0.5.23, CPU PyTorch).

SGLang imports torchvision unconditionally, and no CPU build of torchvision installs here (PyPI's wheels
are CUDA builds that fail next to a CPU PyTorch): ``torchvision_stub`` stands in for it, and the tests
say so in their output. Nothing they run touches an image.

A real ``Gemma4MoE`` layer is built (its ``TopK`` and ``FusedMoE``; SGLang's server arguments published for
a CPU device, expert-parallel ranks stated with ``get_parallel().override``) and routed through its
``TopK``, the call ``Gemma4MoE.forward`` makes, by each of TopK's device paths (CUDA/ROCm, XPU, CPU,
native). The expert GEMMs are not run. Nothing here imports SGLang at collection time.
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision_stub
from oracle import assert_routes_like_oracle

from g4route import registry
from g4route.adapters import engines
from g4route.adapters import sglang as g4route_sglang
from g4route.adapters.engines import engine_reports

pytestmark = pytest.mark.engines

E, K, HIDDEN, T = 16, 4, 64, 37
MODULE = g4route_sglang.SPEC.module
TESTS = os.path.dirname(os.path.abspath(__file__))
REUSERS = ("gemma4_mm", "gemma4_mtp", "gemma4_unified", "gemma4_diffusion")
TOPK_PATHS = ("forward_cuda", "forward_xpu", "forward_cpu", "forward_native")


@pytest.fixture(scope="module")
def sglang_gemma4():
    """SGLang's Gemma 4 model module, with server arguments for a CPU and one-process parallel state."""
    if torchvision_stub.install():
        print(torchvision_stub.STUB_NOTE)
    import sglang
    from sglang.srt.models import gemma4_causal
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    print(f"SGLang {sglang.__version__}, torch {torch.__version__}")
    set_global_server_args_for_scheduler(ServerArgs(model_path="dummy", device="cpu"))  # "dummy": no Hub lookup
    # What SGLang's launcher publishes per process: this process is rank 0 of one; no TP group is needed
    # for routing (TopK.forward_cuda only passes it to a symmetric-memory context that is off on a CPU).
    with get_parallel().override(moe_ep_rank=0, moe_tp_rank=0, tp_group=None):
        yield gemma4_causal
    g4route_sglang.unpatch(gemma4_causal)


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    """Each test starts with no forced backend, no switches set, and SGLang's plugins not yet loaded."""
    for var in (registry.ENV_VAR, "G4ROUTE_SGLANG", "SGLANG_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(g4route_sglang.LOG, "warned", False)
    yield
    if MODULE in sys.modules:
        g4route_sglang.unpatch(sys.modules[MODULE])


def load_plugins_as_sglang_does():
    """SGLang's own loader (``load_plugins``: the entry points, then its HookRegistry), run again here."""
    import sglang.srt.plugins

    sglang.srt.plugins._plugins_loaded = False
    sglang.srt.plugins.load_plugins()


@pytest.fixture
def route_calls(monkeypatch):
    """Counts the plugin's calls of g4route.route."""
    calls = []
    real_route = g4route_sglang.route

    def counting_route(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real_route(*args, **kwargs)

    monkeypatch.setattr(g4route_sglang, "route", counting_route)
    return calls


def gemma4_config():
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(
        vocab_size=256, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=16, enable_moe_block=True, num_experts=E,
        top_k_experts=K, moe_intermediate_size=32, hidden_size_per_layer_input=0,
        layer_types=["sliding_attention", "full_attention"])


def build_layer(gemma4_causal, scale):
    """A Gemma4MoE layer as Gemma4DecoderLayer builds it, with ``scale`` loaded into its per_expert_scale."""
    layer = gemma4_causal.Gemma4MoE(HIDDEN, 0, gemma4_config())
    with torch.no_grad():
        layer.per_expert_scale.copy_(scale)   # as SGLang's weight loader does, in place
    return layer


def route_through_topk(layer, logits, path="forward_cpu"):
    """Route ``logits`` through the layer's TopK by one of its device paths; (weights, ids)."""
    hidden = torch.zeros(logits.shape[0], HIDDEN)
    with torch.inference_mode():
        output = getattr(layer.topk, path)(hidden, logits)
    return output.topk_weights, output.topk_ids


def _is_sglangs_closure(fn) -> bool:
    return fn.__qualname__ == "Gemma4MoE.__init__.<locals>.routing_function"


# ---------------------------------------------------------------------------------------------- loading


def test_sglang_loader_applies_the_plugin_when_sglang_imports_gemma4():
    # The real order, in a fresh process: SGLang loads its plugins, later imports the model module.
    script = textwrap.dedent(f"""
        import logging, sys
        sys.path.insert(0, {TESTS!r})
        import torchvision_stub
        torchvision_stub.install()
        logging.basicConfig(level=logging.INFO)
        from sglang.srt.plugins import load_plugins
        load_plugins()
        assert {MODULE!r} not in sys.modules, "the plugin must not import SGLang's model code itself"
        from sglang.srt.models import gemma4_causal
        from g4route.adapters import sglang
        assert sglang.is_patched(gemma4_causal)
        print("patched:", sglang.is_patched(gemma4_causal))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    print("\n".join(line for line in output.splitlines() if "plugin" in line or "g4route" in line))
    assert "patched: True" in output
    assert "Loaded plugin g4route from group sglang.srt.plugins" in output   # SGLang's own loader says so
    assert "g4route: SGLang's Gemma 4 MoE routing goes through g4route.route" in output


def test_sglang_loader_patches_an_already_imported_gemma4(sglang_gemma4, caplog):
    caplog.set_level(logging.INFO)
    assert not g4route_sglang.is_patched(sglang_gemma4)
    load_plugins_as_sglang_does()
    assert g4route_sglang.is_patched(sglang_gemma4)
    assert any("goes through g4route.route" in r.getMessage() for r in caplog.records)
    g4route_sglang.unpatch(sglang_gemma4)
    assert not g4route_sglang.is_patched(sglang_gemma4)


def test_sglang_models_reusing_gemma4_causal_route_with_its_layer(sglang_gemma4):
    # gemma4_mm, _mtp, _unified, _diffusion build their MoE layers from gemma4_causal's classes; none has
    # a Gemma 4 routing of its own that the plugin would miss.
    import importlib

    load_plugins_as_sglang_does()
    for name in REUSERS:
        module = importlib.import_module(f"sglang.srt.models.{name}")
        tree = ast.parse(inspect.getsource(module))
        own_routing = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and "routing" in n.name]
        assert own_routing == [], (name, own_routing)
        assert any(getattr(v, "__module__", None) == MODULE for v in vars(module).values()), name
        assert getattr(module, "Gemma4MoE", sglang_gemma4.Gemma4MoE) is sglang_gemma4.Gemma4MoE, name
    assert g4route_sglang.is_patched(sglang_gemma4)


# ---------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("path", TOPK_PATHS)
def test_sglang_topk_lands_in_g4route_and_equals_sglang(sglang_gemma4, gen, route_calls, monkeypatch, path):
    scale = torch.rand(E, generator=gen) + 0.5
    own_layer = build_layer(sglang_gemma4, scale)                # SGLang's own routing
    load_plugins_as_sglang_does()
    layer = build_layer(sglang_gemma4, scale)
    assert _is_sglangs_closure(own_layer.topk.topk_config.custom_routing_function)
    assert layer.topk.topk_config.custom_routing_function.__name__ == "g4route_sglang_routing_function"
    logits = torch.randn(T, E, generator=gen) * 2               # float32: no ties
    own_weights, own_ids = route_through_topk(own_layer, logits, path)
    assert route_calls == []
    weights, ids = route_through_topk(layer, logits, path)
    assert route_calls == [(T, E)]
    assert torch.equal(ids, own_ids)
    torch.testing.assert_close(weights, own_weights)
    assert_routes_like_oracle((weights, ids), logits, K, scale)
    # Proof that g4route ran, not SGLang: a backend forced that cannot run here fails in g4route's registry.
    monkeypatch.setenv(registry.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="G4ROUTE_BACKEND=cuda"):
        route_through_topk(layer, logits, path)


def test_sglang_routing_uses_weights_loaded_after_the_layer_is_built(sglang_gemma4, gen):
    load_plugins_as_sglang_does()
    layer = build_layer(sglang_gemma4, torch.ones(E))
    loaded = torch.rand(E, generator=gen) + 0.5
    with torch.no_grad():
        layer.per_expert_scale.copy_(loaded)
    logits = torch.randn(T, E, generator=gen)
    assert_routes_like_oracle(route_through_topk(layer, logits), logits, K, loaded)
    # Outside inference_mode the scale is a Parameter that requires grad: the plugin detaches it.
    weights, ids = layer.topk.forward_cpu(torch.zeros(T, HIDDEN), logits)[:2]
    assert not weights.requires_grad
    assert_routes_like_oracle((weights, ids), logits, K, loaded)


# ---------------------------------------------------------------------------------------------- opt-outs


@pytest.mark.parametrize("switch", [("G4ROUTE_SGLANG", "0"), ("SGLANG_PLUGINS", "some_other_plugin")],
                         ids=["G4ROUTE_SGLANG=0", "SGLANG_PLUGINS=other"])
def test_sglang_switches_keep_sglangs_routing(sglang_gemma4, gen, route_calls, monkeypatch, switch):
    monkeypatch.setenv(*switch)
    load_plugins_as_sglang_does()
    assert not g4route_sglang.is_patched(sglang_gemma4)
    layer = build_layer(sglang_gemma4, torch.rand(E, generator=gen) + 0.5)
    assert _is_sglangs_closure(layer.topk.topk_config.custom_routing_function)
    route_through_topk(layer, torch.randn(T, E, generator=gen))
    assert route_calls == []
    assert f"plugin off ({switch[0]}=" in _report("sglang").describe()


def test_sglang_allow_list_naming_g4route_loads_it(sglang_gemma4, monkeypatch):
    monkeypatch.setenv("SGLANG_PLUGINS", "g4route")
    load_plugins_as_sglang_does()
    assert g4route_sglang.is_patched(sglang_gemma4)


# -------------------------------------------------------------------------------- another SGLang version


def _without_moe_class(module, monkeypatch):
    monkeypatch.delattr(module, "Gemma4MoE")


def _closure_with_other_arguments(module, monkeypatch):
    own_init = module.Gemma4MoE.__init__

    def __init__(self, *args, **kwargs):
        own_init(self, *args, **kwargs)

        def routing_function(gating_output, per_expert_scale, topk):
            raise AssertionError("not to be called")

        self.topk.topk_config.custom_routing_function = routing_function

    monkeypatch.setattr(module.Gemma4MoE, "__init__", __init__)


def _topk_without_custom_routing(module, monkeypatch):
    class TopK:
        def __init__(self, top_k, *, layer_id):
            pass

    monkeypatch.setattr(module, "TopK", TopK)


@pytest.mark.parametrize("change", [_without_moe_class, _closure_with_other_arguments, _topk_without_custom_routing],
                         ids=["Gemma4MoE-missing", "closure-arguments-changed", "TopK-without-custom-routing"])
def test_sglang_other_version_is_left_alone_and_said_once(sglang_gemma4, caplog, monkeypatch, change):
    change(sglang_gemma4, monkeypatch)
    before = dict(vars(sglang_gemma4))
    init_before = vars(getattr(sglang_gemma4, "Gemma4MoE", object)).get("__init__")
    caplog.set_level(logging.INFO)
    load_plugins_as_sglang_does()
    load_plugins_as_sglang_does()
    assert not g4route_sglang.is_patched(sglang_gemma4)
    assert dict(vars(sglang_gemma4)) == before
    assert vars(getattr(sglang_gemma4, "Gemma4MoE", object)).get("__init__") is init_before
    warnings = [r for r in caplog.records if r.name == g4route_sglang.logger.name and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "SGLang's own Gemma 4 routing is kept" in warnings[0].getMessage()


def test_sglang_layer_whose_routing_was_replaced_by_someone_else_keeps_it(sglang_gemma4, caplog, monkeypatch):
    # Another plugin that swaps the layer's routing function after SGLang's __init__: g4route leaves it.
    def theirs(hidden_states, gating_output, topk, renormalize):
        raise AssertionError("not called here")

    own_init = sglang_gemma4.Gemma4MoE.__init__

    @functools.wraps(own_init)  # as SGLang's HookRegistry wraps a method
    def their_init(self, *args, **kwargs):
        own_init(self, *args, **kwargs)
        self.topk.topk_config.custom_routing_function = theirs

    monkeypatch.setattr(sglang_gemma4.Gemma4MoE, "__init__", their_init)
    caplog.set_level(logging.INFO)
    load_plugins_as_sglang_does()
    assert g4route_sglang.is_patched(sglang_gemma4)  # their wrapper hides nothing g4route needs
    layer = build_layer(sglang_gemma4, torch.ones(E))
    assert layer.topk.topk_config.custom_routing_function is theirs
    assert sum(r.levelno == logging.WARNING for r in caplog.records if r.name == g4route_sglang.logger.name) == 1


def test_sglang_plugin_never_raises_into_sglang(sglang_gemma4, caplog, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(engines, "when_imported", broken)  # the plugin's entry point calls it
    g4route_sglang.register()
    monkeypatch.setattr(g4route_sglang, "mismatches", broken)
    g4route_sglang._patch_safely(sglang_gemma4)   # what runs inside SGLang's import of the model module
    assert not g4route_sglang.is_patched(sglang_gemma4)
    assert sum(r.levelno == logging.WARNING for r in caplog.records if r.name == g4route_sglang.logger.name) == 1


# ------------------------------------------------------------------------------------------ g4route info


def _report(engine):
    return next(r for r in engine_reports() if r.engine == engine)


def test_sglang_info_says_the_plugin_applies_to_the_installed_sglang():
    import importlib.metadata

    report = _report("sglang")
    assert report.version == importlib.metadata.version("sglang") and report.registered and report.applies, report


def test_sglang_info_check_reads_the_source_as_the_plugin_reads_the_module(sglang_gemma4):
    source = inspect.getsource(sglang_gemma4)
    assert g4route_sglang.static_mismatches(ast.parse(source)) == [] == g4route_sglang.mismatches(sglang_gemma4)
    changed = source.replace("custom_routing_function=routing_function", "custom_routing_function=None")
    assert g4route_sglang.static_mismatches(ast.parse(changed)) == [
        "Gemma4MoE.__init__ does not pass routing_function to TopK as custom_routing_function"]
