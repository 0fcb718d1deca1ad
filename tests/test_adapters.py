"""The vLLM and Transformers adapters (g4route/adapters/).

The vLLM tests need no vLLM (the adapter imports nothing from it). The Transformers tests run the real
``transformers`` package on a tiny, randomly initialised Gemma 4 MoE model (no download) and skip when
it is not installed.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from oracle import assert_routes_like_oracle

import g4route
from g4route import registry
from g4route.adapters.vllm import make_vllm_routing_function

E, K, HIDDEN = 16, 4, 64


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)


# ------------------------------------------------------------------------------------------------ vLLM


def test_vllm_signature_is_fused_moe_custom_routing_function():
    # vLLM's FusedMoE calls custom_routing_function(hidden_states=, gating_output=, topk=, renormalize=).
    fn = make_vllm_routing_function(torch.ones(E))
    assert list(inspect.signature(fn).parameters) == ["hidden_states", "gating_output", "topk", "renormalize"]


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "softmax-all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vllm_routing_function_is_route_with_the_bound_scale(gen, renormalize, dtype):
    scale = torch.rand(E, generator=gen) + 0.5
    logits = torch.randn(37, E, generator=gen).mul_(3).to(dtype)
    hidden = torch.randn(37, HIDDEN, generator=gen)
    fn = make_vllm_routing_function(scale)
    weights, ids = fn(hidden_states=hidden, gating_output=logits, topk=K, renormalize=renormalize)
    assert_routes_like_oracle((weights, ids), logits, K, scale, renormalize)
    expected = g4route.route(logits, K, scale, renormalize=renormalize)
    assert torch.equal(ids, expected[1]) and torch.equal(weights, expected[0])
    # Positional calls work too, and no scale means all ones.
    assert_routes_like_oracle(make_vllm_routing_function(None)(hidden, logits, K, renormalize), logits, K, None,
                              renormalize)


def test_vllm_routing_function_sees_weights_loaded_later(gen):
    # vLLM builds the layer (scale = ones), then copies the checkpoint into the parameter in place.
    param = torch.nn.Parameter(torch.ones(E))
    fn = make_vllm_routing_function(param)
    logits = torch.randn(8, E, generator=gen)
    loaded = torch.rand(E, generator=gen) + 0.5
    with torch.no_grad():
        param.data.copy_(loaded)
    assert_routes_like_oracle(fn(None, logits, K, True), logits, K, loaded)


def test_vllm_routing_function_takes_a_parameter_with_grad_mode_on(gen):
    # An nn.Parameter requires grad; outside inference_mode route() would refuse it, the adapter detaches.
    param = torch.nn.Parameter(torch.rand(E, generator=gen) + 0.5)
    logits = torch.randn(8, E, generator=gen)
    assert torch.is_grad_enabled()
    weights, ids = make_vllm_routing_function(param)(None, logits, K, True)
    assert not weights.requires_grad
    assert_routes_like_oracle((weights, ids), logits, K, param.detach())
    with torch.inference_mode():
        assert_routes_like_oracle(make_vllm_routing_function(param)(None, logits, K, True), logits, K, param.detach())


def test_vllm_routing_function_refuses_a_scale_that_is_not_a_tensor():
    with pytest.raises(TypeError, match="per_expert_scale"):
        make_vllm_routing_function([1.0] * E)


# ---------------------------------------------------------------------------------------- Transformers

_TRANSFORMERS_SKIP = ("transformers with Gemma 4 (transformers>=5.5) is not installed; "
                      "pip install 'transformers==5.24.0' to run the Transformers adapter tests")


@pytest.fixture(scope="module")
def hf():
    """The real transformers modules, or a skip saying what to install."""
    pytest.importorskip("transformers", reason=_TRANSFORMERS_SKIP)
    modeling = pytest.importorskip("transformers.models.gemma4.modeling_gemma4", reason=_TRANSFORMERS_SKIP)
    from g4route.adapters import transformers as adapter

    return modeling, adapter


@pytest.fixture
def model(hf):
    """A tiny Gemma 4 MoE causal LM (2 layers, 16 experts, top-4), random weights, float32, eval mode."""
    modeling, _ = hf
    config = modeling.Gemma4TextConfig(
        vocab_size=256, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=16, enable_moe_block=True, num_experts=E,
        top_k_experts=K, moe_intermediate_size=32, hidden_size_per_layer_input=0, vocab_size_per_layer_input=256,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    lm = modeling.Gemma4ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in lm.model.layers:
            # Spread-out router logits (the default init gives near-uniform routing) and a real scale.
            layer.router.proj.weight.normal_(0.0, 1.0)
            layer.router.per_expert_scale.uniform_(0.5, 1.5)
    return lm


def _routers(model):
    return [layer.router for layer in model.model.layers]


def _router_logits(output) -> tuple:
    """What output_router_logits=True recorded (Gemma 4's outputs carry router_logits from Transformers 5.19)."""
    return getattr(output, "router_logits", None) or ()


@pytest.fixture
def route_calls(hf, monkeypatch):
    """Counts the adapter's calls to g4route.route (proof that the patched path ran)."""
    _, adapter = hf
    calls = []

    def counting_route(*args, **kwargs):
        calls.append(args[0].shape)
        return g4route.route(*args, **kwargs)

    monkeypatch.setattr(adapter, "route", counting_route)
    return calls


def test_transformers_router_parity(hf, model, gen, route_calls):
    _, adapter = hf
    x = torch.randn(300, HIDDEN, generator=gen)
    with torch.no_grad():
        before = [router(x) for router in _routers(model)]
        handle = adapter.patch_gemma4(model)
        after = [router(x) for router in _routers(model)]
    handle.undo()
    assert len(route_calls) == len(before)
    for (p0, w0, i0), (p1, w1, i1) in zip(before, after, strict=True):
        assert (i1.dtype, w1.dtype, p1.dtype) == (i0.dtype, w0.dtype, p0.dtype) == (torch.int64, torch.float32,
                                                                                      torch.float32)
        assert torch.equal(i1, i0), "expert ids differ from Transformers' router"
        assert float((w1 - w0).abs().max()) <= 1e-6
        torch.testing.assert_close(p1, p0, rtol=0, atol=0)


def test_transformers_router_parity_bfloat16(hf, model, gen, route_calls):
    """Gemma 4 ships in bfloat16, where equal router logits are common. torch.topk orders ties as it
    likes, g4route by expert id: per row the same experts with the same weights, compared in id order,
    wherever no tie straddles the K-th place (there the choice itself is unspecified in Transformers)."""
    _, adapter = hf
    model.to(torch.bfloat16)
    x = torch.randn(300, HIDDEN, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        for router in _routers(model):
            p0, w0, i0 = router(x)
            with adapter.patch_gemma4(router):
                p1, w1, i1 = router(x)
            torch.testing.assert_close(p1, p0, rtol=0, atol=0)
            kth = torch.sort(p0, dim=-1, descending=True).values[:, K - 1:K + 1]
            clear = kth[:, 0] > kth[:, 1]
            assert int(clear.sum()) >= 250
            order0, order1 = i0.sort(-1), i1.sort(-1)
            assert torch.equal(order0.values[clear], order1.values[clear])
            w0, w1 = w0.gather(-1, order0.indices), w1.gather(-1, order1.indices)
            assert float((w1 - w0)[clear].abs().max()) <= 1e-6


def test_transformers_bfloat16_model_differs_only_at_ties(hf, model, gen):
    """A bfloat16 model run end to end: every router, fed the hidden states the unpatched model gave it,
    chooses the same experts patched as unpatched wherever its K-th place is not tied; wherever the two
    choices differ, they are equally good (the same multiset of router probabilities: a tie that
    torch.topk and g4route break differently)."""
    _, adapter = hf
    model.to(torch.bfloat16)
    seen = []
    hooks = [router.register_forward_hook(lambda module, args, output: seen.append((module, args[0])))
             for router in _routers(model)]
    try:
        with torch.no_grad():
            model(torch.randint(0, 256, (4, 256), generator=gen), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == len(_routers(model))
    with torch.no_grad():
        for router, hidden in seen:
            p0, _, i0 = router(hidden)
            with adapter.patch_gemma4(router):
                _, _, i1 = router(hidden)
            top = torch.sort(p0, dim=-1, descending=True).values
            tied = top[:, K - 1] == top[:, K]
            differ = (i0.sort(-1).values != i1.sort(-1).values).any(-1)
            assert not bool((differ & ~tied).any()), "expert choices differ where the K-th place is not tied"
            chosen0 = p0.gather(-1, i0).sort(-1).values
            chosen1 = p0.gather(-1, i1.long()).sort(-1).values
            assert torch.equal(chosen0[differ], chosen1[differ]), "differing choices that are not a tie"


def test_transformers_model_parity_and_undo(hf, model, gen, route_calls):
    _, adapter = hf
    input_ids = torch.randint(0, 256, (2, 11), generator=gen)
    routers = _routers(model)
    with torch.no_grad():
        reference = model(input_ids, output_router_logits=True)
        handle = adapter.patch_gemma4(model)
        assert handle.active and handle.routers == routers
        patched = model(input_ids, output_router_logits=True)
        assert len(route_calls) == len(routers), "the patched model did not route through g4route"
        handle.undo()
        restored = model(input_ids, output_router_logits=True)
    torch.testing.assert_close(patched.logits, reference.logits, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(_router_logits(patched), _router_logits(reference), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # Undone cleanly: the class's forward again, and bit-identical outputs.
    assert not handle.active
    for router in routers:
        assert "forward" not in router.__dict__
        assert router.forward.__func__ is type(router).forward
    assert torch.equal(restored.logits, reference.logits)
    assert all(torch.equal(a, b) for a, b in zip(_router_logits(restored), _router_logits(reference), strict=True))


def test_transformers_patch_as_context_manager(hf, model, gen, route_calls):
    _, adapter = hf
    input_ids = torch.randint(0, 256, (1, 5), generator=gen)
    with torch.no_grad():
        reference = model(input_ids).logits
        with adapter.patch_gemma4(model) as handle:
            with pytest.raises(ValueError, match="already patched"):
                adapter.patch_gemma4(model)
            patched = model(input_ids).logits
        assert not handle.active and route_calls
        handle.undo()  # a second undo does nothing
        assert torch.equal(model(input_ids).logits, reference)
    torch.testing.assert_close(patched, reference, rtol=1e-5, atol=1e-6)


def _training_step(model, input_ids):
    """Loss (causal LM + 0.01 x the Switch-Transformer load-balancing loss over the recorded router
    probabilities) and every parameter's gradient after loss.backward()."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model.zero_grad(set_to_none=True)
    output = model(input_ids, labels=input_ids, output_router_logits=True)
    loss = output.loss
    router_logits = _router_logits(output)
    if router_logits:  # recorded from Transformers 5.19
        loss = loss + 0.01 * load_balancing_loss_func(router_logits, E, K)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_transformers_training_step_matches_the_unpatched_model(hf, model, gen, route_calls):
    """Training through g4route: the same loss and every parameter's gradient within 1e-5 relative (to
    that parameter's largest gradient), the router's own parameters (proj, scale, per_expert_scale)
    included, with output_router_logits=True and the load-balancing loss."""
    _, adapter = hf
    model.train()
    input_ids = torch.randint(0, 256, (2, 13), generator=gen)
    loss0, grads0 = _training_step(model, input_ids)
    with adapter.patch_gemma4(model):
        loss1, grads1 = _training_step(model, input_ids)
    assert len(route_calls) == len(_routers(model)), "the patched model did not route through g4route"
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    assert grads1.keys() == grads0.keys()
    router_params = [n for n in grads0 if ".router." in n]
    assert any(n.endswith("per_expert_scale") for n in router_params) and any("proj" in n for n in router_params)
    for name, reference in grads0.items():
        error = float((grads1[name] - reference).abs().max()) / max(float(reference.abs().max()), 1e-30)
        assert error <= 1e-5, f"{name}: gradient differs by {error:.2e} relative"


def test_transformers_without_router_probabilities(hf, model, gen, route_calls):
    _, adapter = hf
    input_ids = torch.randint(0, 256, (1, 7), generator=gen)
    with torch.no_grad():
        reference = model(input_ids).logits
        with adapter.patch_gemma4(model, router_probabilities=False):
            probabilities, _, _ = _routers(model)[0](torch.randn(3, HIDDEN, generator=gen))
            patched = model(input_ids, output_router_logits=True)
    assert probabilities is None
    assert not _router_logits(patched)  # nothing recorded: the documented cost of the option
    torch.testing.assert_close(patched.logits, reference, rtol=1e-5, atol=1e-6)


def test_transformers_patched_model_compiles_without_graph_breaks(hf, model, gen):
    from torch._dynamo.utils import counters

    _, adapter = hf
    input_ids = torch.randint(0, 256, (1, 9), generator=gen)
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.no_grad(), adapter.patch_gemma4(model):
            eager = model(input_ids).logits
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids).logits
    finally:
        torch._dynamo.reset()
    assert sum(counters["graph_break"].values()) == 0
    assert torch.equal(compiled, eager)


def test_transformers_patch_refuses_models_without_gemma4_routers(hf):
    _, adapter = hf
    with pytest.raises(ValueError, match="Gemma4TextRouter"):
        adapter.patch_gemma4(torch.nn.Linear(4, 4))


def test_transformers_undo_refuses_to_clobber_a_later_patch(hf, model):
    _, adapter = hf
    handle = adapter.patch_gemma4(model)
    router = _routers(model)[0]
    ours = router.forward
    router.forward = lambda hidden_states: ours(hidden_states)
    with pytest.raises(RuntimeError, match="replaced again"):
        handle.undo()
    router.forward = ours
    handle.undo()
    assert "forward" not in router.__dict__


def test_transformers_warns_where_the_softmax_was_in_the_model_dtype(hf, model, monkeypatch):
    # Transformers 5.5-5.12 computed Gemma 4's routing softmax in the model's dtype.
    import transformers

    _, adapter = hf
    monkeypatch.setattr(transformers, "__version__", "5.12.0")
    model.to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="routing softmax"), adapter.patch_gemma4(model):
        pass
    monkeypatch.setattr(transformers, "__version__", "5.13.0")
    model.to(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.patch_gemma4(model).undo()


def test_transformers_fused_router_matches_the_model_off_near_ties(hf, model, gen):
    """fuse_router=True: each router is one g4route.router call; in float32 its experts are the unpatched
    router's wherever the K-th place gap clears the fused router's error bound (plus float32 rounding of the
    unpatched path), weights and probabilities to float32 rounding; the whole model's logits agree."""
    from g4route.router import logit_error_bound

    _, adapter = hf
    calls = []
    original = adapter.fused_router

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    x = torch.randn(300, HIDDEN, generator=gen)
    input_ids = torch.randint(0, 256, (2, 11), generator=gen)
    with torch.no_grad():
        before = [router(x) for router in _routers(model)]
        reference = model(input_ids).logits
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(adapter, "fused_router", counting)
            with adapter.patch_gemma4(model, fuse_router=True):
                after = [router(x) for router in _routers(model)]
                patched = model(input_ids).logits
    assert len(calls) == 2 * len(before), "the fused path did not run"
    for router, (p0, w0, i0), (p1, w1, i1) in zip(_routers(model), before, after, strict=True):
        assert (i1.dtype, w1.dtype, p1.dtype) == (torch.int64, torch.float32, torch.float32)
        logits = torch.log(p0.double())  # the unpatched router's logits, up to a per-row constant
        top = logits.topk(K + 1, dim=-1).values
        bound = logit_error_bound(x, router.proj.weight, router.scale, router.norm.eps).amax(-1) + 1e-5
        clear = (top[:, K - 1] - top[:, K]) > 2 * bound
        assert clear.float().mean() > 0.8
        assert torch.equal(i1[clear], i0[clear])
        torch.testing.assert_close(w1[clear], w0[clear], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p1, p0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(patched, reference, rtol=1e-4, atol=1e-4)


def test_transformers_fused_router_falls_back_in_training(hf, model, gen, route_calls):
    """Where autograd needs the router's gradients, fuse_router=True routes through route() (which has a
    backward): the training step matches the unpatched model's."""
    _, adapter = hf
    model.train()
    input_ids = torch.randint(0, 256, (2, 9), generator=gen)
    loss0, grads0 = _training_step(model, input_ids)
    with adapter.patch_gemma4(model, fuse_router=True):
        loss1, grads1 = _training_step(model, input_ids)
    assert len(route_calls) == len(_routers(model))
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for name, reference in grads0.items():
        error = float((grads1[name] - reference).abs().max()) / max(float(reference.abs().max()), 1e-30)
        assert error <= 1e-5, f"{name}: gradient differs by {error:.2e} relative"
    with pytest.raises(TypeError, match="fuse_router must be a bool"):
        adapter.patch_gemma4(model, fuse_router=1)
