"""g4route's vLLM plugin against the real vLLM package (``nox -s engines``: vLLM 0.33.0, CPU PyTorch).

vLLM runs here as its CPU platform (``VLLM_TARGET_DEVICE=cpu``) with a one-process gloo group, so a real
``Gemma4Router`` and ``FusedMoEFactory`` layer can be built and routed through ``select_experts``, the
call vLLM's MoE layer makes; the expert GEMMs need vLLM's CPU extension, which its PyPI wheel lacks.
Nothing here imports vLLM at collection time, so the ordinary ``tests`` session (which deselects the
``engines`` marker) collects this file without vLLM installed.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from oracle import assert_routes_like_oracle

from g4route import registry
from g4route.adapters import engines, vllm_plugin
from g4route.adapters.engines import engine_reports

pytestmark = pytest.mark.engines

E, K, HIDDEN, T = 16, 4, 64, 37
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


@pytest.fixture(scope="module")
def vllm_gemma4(tmp_path_factory):
    """vLLM's Gemma 4 model module, with a one-process gloo group and a default VllmConfig current."""
    import vllm
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    print(f"vLLM {vllm.__version__}, torch {torch.__version__}")
    init_file = tmp_path_factory.mktemp("gloo") / "init"
    init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"file://{init_file}",
                                 local_rank=0, backend="gloo")
    with set_current_vllm_config(VllmConfig()):
        initialize_model_parallel(1, 1)
        from vllm.model_executor.models import gemma4

        yield gemma4
    vllm_plugin.unpatch(gemma4)


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    """Each test starts with no forced backend, no switches set, and vLLM's plugins not yet loaded."""
    for var in (registry.ENV_VAR, "G4ROUTE_VLLM", "VLLM_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(vllm_plugin.LOG, "warned", False)
    yield
    if "vllm.model_executor.models.gemma4" in sys.modules:
        vllm_plugin.unpatch(sys.modules["vllm.model_executor.models.gemma4"])


def load_plugins_as_vllm_does():
    """vLLM's own loader (``load_general_plugins``), made to run again in this process."""
    import vllm.plugins

    vllm.plugins.plugins_loaded = False
    vllm.plugins.load_general_plugins()


@pytest.fixture
def route_calls(monkeypatch):
    """Counts the plugin's calls of g4route.route."""
    calls = []
    real_route = vllm_plugin.route

    def counting_route(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real_route(*args, **kwargs)

    monkeypatch.setattr(vllm_plugin, "route", counting_route)
    return calls


@pytest.fixture
def vllm_log(caplog):
    """Records of vLLM's loggers (which do not propagate to the root logger caplog listens on)."""
    vllm_logger = logging.getLogger("vllm")
    listen = not vllm_logger.propagate  # propagate is off once vLLM has configured its logging
    if listen:
        vllm_logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="vllm")
    yield caplog
    if listen:
        vllm_logger.removeHandler(caplog.handler)


_layer_numbers = itertools.count()


def build_layer(gemma4, gen):
    """A Gemma 4 router and the FusedMoE layer vLLM's Gemma4DecoderLayer builds around it."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.fused_moe import FusedMoEFactory

    layer = next(_layer_numbers)  # vLLM refuses two layers of one name
    config = SimpleNamespace(hidden_size=HIDDEN, rms_norm_eps=1e-6, num_experts=E)
    router = gemma4.Gemma4Router(config, prefix=f"layers.{layer}.router")
    with torch.no_grad():
        router.per_expert_scale.copy_(torch.rand(E, generator=gen) + 0.5)   # as a checkpoint load does
    experts = FusedMoEFactory(num_experts=E, top_k=K, hidden_size=HIDDEN, intermediate_size=32, renormalize=True,
                              prefix=f"layers.{layer}.experts", custom_routing_function=router.routing_function,
                              activation="gelu_tanh")
    return router, experts


def select_experts(experts, gen):
    """Route fresh float32 logits (no ties) the way vLLM's MoE layer does; returns (logits, weights, ids)."""
    hidden = torch.randn(T, HIDDEN, generator=gen)
    logits = torch.randn(T, E, generator=gen) * 2
    with torch.inference_mode():  # vLLM's model runner routes under inference_mode
        weights, ids = experts.router.select_experts(hidden, logits)
    return logits, weights, ids


class _GpuPlatform:
    """Stands in for vLLM's current_platform, so Gemma4Router takes its CUDA/ROCm/XPU branch on a CPU."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def is_cuda_alike(self) -> bool:
        return self.kind in ("cuda", "rocm")

    def is_xpu(self) -> bool:
        return self.kind == "xpu"


# ---------------------------------------------------------------------------------------------- loading


def test_vllm_loader_applies_the_plugin_when_vllm_imports_gemma4():
    # The real order, in a fresh process: vLLM loads its general plugins, later imports the model module.
    script = textwrap.dedent("""
        import sys, vllm.plugins
        from vllm.config.logging import LoggingConfig
        from vllm.logger import configure_logging
        configure_logging(LoggingConfig())  # what vLLM's engine core and workers do first
        vllm.plugins.load_general_plugins()
        name = "vllm.model_executor.models.gemma4"
        assert name not in sys.modules, "the plugin must not import vLLM's model code itself"
        import vllm.model_executor.models.gemma4 as gemma4
        from g4route.adapters import vllm_plugin
        assert vllm_plugin.is_patched(gemma4)
        print("patched:", gemma4.gemma4_fused_routing_kernel_triton.__name__,
              gemma4.gemma4_routing_function_torch.__name__)
    """)
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    print("\n".join(line for line in output.splitlines() if "plugin" in line or "g4route" in line))
    assert "patched: g4route_gemma4_routing_triton g4route_gemma4_routing_torch" in output
    # The line that says it is active, in vLLM's own log.
    assert "g4route: vLLM's Gemma 4 MoE routing goes through g4route.route" in output


def test_vllm_loader_patches_an_already_imported_gemma4(vllm_gemma4, vllm_log):
    assert not vllm_plugin.is_patched(vllm_gemma4)
    load_plugins_as_vllm_does()
    assert vllm_plugin.is_patched(vllm_gemma4)
    assert any("goes through g4route.route" in r.getMessage() for r in vllm_log.records)
    vllm_plugin.unpatch(vllm_gemma4)
    assert vllm_gemma4.gemma4_routing_function_torch.__module__ == vllm_gemma4.__name__


# ---------------------------------------------------------------------------------------------- routing


def test_vllm_select_experts_lands_in_g4route_and_equals_vllm(vllm_gemma4, gen, route_calls):
    router, experts = build_layer(vllm_gemma4, gen)
    seed = gen.initial_seed()
    _, own_weights, own_ids = select_experts(experts, torch.Generator().manual_seed(seed))  # vLLM's own routing
    assert route_calls == []
    load_plugins_as_vllm_does()
    logits, weights, ids = select_experts(experts, torch.Generator().manual_seed(seed))   # the same inputs
    assert route_calls == [(T, E)]
    assert torch.equal(ids, own_ids)
    torch.testing.assert_close(weights, own_weights)
    assert_routes_like_oracle((weights, ids), logits, K, router.per_expert_scale.detach())


@pytest.mark.parametrize("platform", ["cpu", "cuda", "rocm", "xpu"])
def test_vllm_every_device_branch_lands_in_g4route(vllm_gemma4, gen, route_calls, monkeypatch, platform):
    if platform != "cpu":
        monkeypatch.setattr(vllm_gemma4, "current_platform", _GpuPlatform(platform))
    router, experts = build_layer(vllm_gemma4, gen)
    load_plugins_as_vllm_does()
    logits, weights, ids = select_experts(experts, gen)
    assert route_calls == [(T, E)]
    assert_routes_like_oracle((weights, ids), logits, K, router.per_expert_scale.detach())
    # Proof that g4route ran, not vLLM: a backend forced that cannot run here fails inside g4route's registry.
    monkeypatch.setenv(registry.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="G4ROUTE_BACKEND=cuda"):
        select_experts(experts, gen)


def test_vllm_routing_with_autograd_on_uses_the_scale_as_it_is(vllm_gemma4, gen):
    # Outside inference_mode the scale is a Parameter that requires grad: the plugin detaches it.
    router, experts = build_layer(vllm_gemma4, gen)
    load_plugins_as_vllm_does()
    logits = torch.randn(T, E, generator=gen)
    weights, ids = experts.router.select_experts(torch.randn(T, HIDDEN, generator=gen), logits)
    assert not weights.requires_grad
    assert_routes_like_oracle((weights, ids), logits, K, router.per_expert_scale.detach())


# ---------------------------------------------------------------------------------------------- opt-outs


@pytest.mark.parametrize("switch", [("G4ROUTE_VLLM", "0"), ("VLLM_PLUGINS", "lora_filesystem_resolver"),
                                    ("VLLM_PLUGINS", "")],
                         ids=["G4ROUTE_VLLM=0", "VLLM_PLUGINS=other", "VLLM_PLUGINS="])
def test_vllm_switches_keep_vllms_routing(vllm_gemma4, gen, route_calls, monkeypatch, switch):
    monkeypatch.setenv(*switch)
    originals = (vllm_gemma4.gemma4_fused_routing_kernel_triton, vllm_gemma4.gemma4_routing_function_torch)
    load_plugins_as_vllm_does()
    assert not vllm_plugin.is_patched(vllm_gemma4)
    assert (vllm_gemma4.gemma4_fused_routing_kernel_triton, vllm_gemma4.gemma4_routing_function_torch) == originals
    _, experts = build_layer(vllm_gemma4, gen)
    select_experts(experts, gen)
    assert route_calls == []
    assert f"plugin off ({switch[0]}=" in _report("vllm").describe()


def test_vllm_allow_list_naming_g4route_loads_it(vllm_gemma4, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "g4route")
    load_plugins_as_vllm_does()
    assert vllm_plugin.is_patched(vllm_gemma4)


# ---------------------------------------------------------------------------------- another vLLM version


def _without(name):
    return lambda module, monkeypatch: monkeypatch.delattr(module, name)


def _reordered_triton_kernel(module, monkeypatch):
    def gemma4_fused_routing_kernel_triton(gating_output, per_expert_scale, topk, num_warps=1):
        raise AssertionError("not to be called")

    monkeypatch.setattr(module, vllm_plugin.TRITON_NAME, gemma4_fused_routing_kernel_triton)


def _router_with_inline_routing(module, monkeypatch):
    def routing_function(self, hidden_states, gating_output, topk, renormalize):
        return torch.topk(gating_output, topk)

    monkeypatch.setattr(module.Gemma4Router, "routing_function", routing_function)


@pytest.mark.parametrize("change", [_without(vllm_plugin.TORCH_NAME), _reordered_triton_kernel,
                                    _router_with_inline_routing],
                         ids=["torch-function-missing", "triton-arguments-reordered", "router-calls-neither"])
def test_vllm_other_version_is_left_alone_and_said_once(vllm_gemma4, vllm_log, monkeypatch, change):
    change(vllm_gemma4, monkeypatch)
    before = dict(vars(vllm_gemma4))
    load_plugins_as_vllm_does()
    load_plugins_as_vllm_does()
    assert not vllm_plugin.is_patched(vllm_gemma4)
    assert dict(vars(vllm_gemma4)) == before
    warnings = [r for r in vllm_log.records if r.name == vllm_plugin.logger.name and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "vLLM's own Gemma 4 routing is kept" in warnings[0].getMessage()


def test_vllm_plugin_never_raises_into_vllm(vllm_gemma4, vllm_log, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(engines, "when_imported", broken)  # the plugin's entry point calls it
    load_plugins_as_vllm_does()  # vLLM does not catch exceptions of general plugins
    monkeypatch.setattr(vllm_plugin, "mismatches", broken)
    vllm_plugin._patch_safely(vllm_gemma4)  # what runs inside vLLM's import of the model module
    assert not vllm_plugin.is_patched(vllm_gemma4)
    assert sum(r.levelno == logging.WARNING for r in vllm_log.records if r.name == vllm_plugin.logger.name) == 1


# ------------------------------------------------------------------------------------------ g4route info


def _report(engine):
    return next(r for r in engine_reports() if r.engine == engine)


def test_vllm_info_says_the_plugin_applies_to_the_installed_vllm():
    import vllm

    report = _report("vllm")
    assert report.version == vllm.__version__ and report.registered and report.applies, report


def test_vllm_info_check_reads_the_source_as_the_plugin_reads_the_module(vllm_gemma4):
    import ast
    import inspect

    source = inspect.getsource(vllm_gemma4)
    assert vllm_plugin.static_mismatches(ast.parse(source)) == [] == vllm_plugin.mismatches(vllm_gemma4)
    renamed = source.replace("def gemma4_routing_function_torch(", "def gemma4_routing_torch(")
    assert vllm_plugin.static_mismatches(ast.parse(renamed)) == [f"no function {vllm_plugin.TORCH_NAME}"]
