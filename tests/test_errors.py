"""Bad calls to route() get a TypeError/ValueError that names the argument (DESIGN.md section 2).

Every check runs on CPU tensors; a tensor on the ``meta`` device stands in for "another device".
"""

from __future__ import annotations

import pytest
import torch

import g4route
from g4route import kernel, registry

T, E, K = 5, 16, 4
META = torch.device("meta")


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """The checks below are about arguments; a G4ROUTE_BACKEND left in the environment must not mask them."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)


@pytest.fixture
def logits():
    return torch.randn(T, E, generator=torch.Generator().manual_seed(0))


def _out(lead=(T,), topk=K, device="cpu"):
    return (torch.empty(*lead, topk, dtype=torch.float32, device=device),
            torch.empty(*lead, topk, dtype=torch.int32, device=device))


# ----------------------------------------------------------------------------------------- gating_output


@pytest.mark.parametrize("bad", [None, [[0.1, 0.2]], 1.5, "logits"], ids=["None", "list", "float", "str"])
def test_gating_output_not_a_tensor(bad):
    with pytest.raises(TypeError, match="gating_output"):
        g4route.route(bad, 1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8, torch.bool, torch.float64], ids=str)
def test_gating_output_wrong_dtype(dtype):
    # float64 included: the contract takes float32/bfloat16/float16 only, nothing is silently coerced.
    logits = torch.zeros(T, E, dtype=dtype)
    with pytest.raises(TypeError, match="gating_output"):
        g4route.route(logits, 1)


@pytest.mark.parametrize(
    "logits", [torch.tensor(1.0), torch.empty(T, 0), torch.empty(0)], ids=["0-d", "E=0", "1-d-E=0"]
)
def test_gating_output_without_experts(logits):
    with pytest.raises(ValueError, match="gating_output"):
        g4route.route(logits, 1)


@pytest.mark.parametrize("needs_grad", ["gating_output", "per_expert_scale"])
def test_out_is_refused_while_an_input_requires_grad(logits, needs_grad):
    leaf = logits.clone().requires_grad_(needs_grad == "gating_output")
    scale = torch.ones(E, requires_grad=needs_grad == "per_expert_scale")
    assert torch.is_grad_enabled()
    for x in (leaf, leaf * 2):  # a leaf, and not a leaf (the router's output in a training graph)
        with pytest.raises(TypeError, match="out= cannot be used while gating_output or per_expert_scale requires"):
            g4route.route(x, K, scale, out=_out())
    with torch.no_grad():  # no autograd asked for: out= is fine
        weights, _ = g4route.route(leaf, K, scale, out=_out())
    assert not weights.requires_grad


def test_gating_output_requiring_grad_is_fine_under_no_grad(logits):
    leaf = logits.clone().requires_grad_(True)
    with torch.no_grad():
        weights, ids = g4route.route(leaf, K)
    expected_w, expected_ids = g4route.route(logits, K)
    assert not weights.requires_grad
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_w, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ topk


@pytest.mark.parametrize("topk", [2.0, "2", None, torch.tensor(2)], ids=["float", "str", "None", "tensor"])
def test_topk_not_an_int(logits, topk):
    with pytest.raises(TypeError, match="topk"):
        g4route.route(logits, topk)


@pytest.mark.parametrize("topk", [True, False], ids=["True", "False"])
def test_topk_bool_is_not_an_int(logits, topk):
    with pytest.raises(TypeError, match="topk"):
        g4route.route(logits, topk)


@pytest.mark.parametrize("topk", [0, -1, E + 1], ids=["0", "-1", "E+1"])
def test_topk_out_of_range(logits, topk):
    with pytest.raises(ValueError, match="topk"):
        g4route.route(logits, topk)


def test_topk_range_ends_are_accepted(logits):
    # The error above is about the range [1, E], not an off-by-one at either end.
    assert g4route.route(logits, 1)[1].shape == (T, 1)
    assert sorted(g4route.route(logits, E)[1][0].tolist()) == list(range(E))


# ------------------------------------------------------------------------------------ per_expert_scale


@pytest.mark.parametrize("scale", [[1.0] * E, 1.0, "ones"], ids=["list", "float", "str"])
def test_scale_not_a_tensor(logits, scale):
    with pytest.raises(TypeError, match="per_expert_scale"):
        g4route.route(logits, K, scale)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool], ids=str)
def test_scale_integer(logits, dtype):
    with pytest.raises(TypeError, match="per_expert_scale"):
        g4route.route(logits, K, torch.ones(E, dtype=dtype))


@pytest.mark.parametrize("shape", [(E - 1,), (E + 1,), (1,), (1, E), (E, 1), ()], ids=str)
def test_scale_wrong_shape(logits, shape):
    with pytest.raises(ValueError, match="per_expert_scale"):
        g4route.route(logits, K, torch.ones(shape))


def test_scale_on_another_device(logits):
    with pytest.raises(ValueError, match="per_expert_scale"):
        g4route.route(logits, K, torch.ones(E, device=META))


# ----------------------------------------------------------------------------------------- renormalize


@pytest.mark.parametrize(
    "renormalize", [1, 0, None, "yes", torch.tensor(True)], ids=["1", "0", "None", "str", "tensor"]
)
def test_renormalize_not_a_bool(logits, renormalize):
    with pytest.raises(TypeError, match="renormalize"):
        g4route.route(logits, K, renormalize=renormalize)


# ------------------------------------------------------------------------------------------------- out


@pytest.mark.parametrize(
    "out",
    [
        lambda: torch.empty(T, K),
        lambda: (torch.empty(T, K),),
        lambda: (*_out(), torch.empty(T, K)),
        lambda: {"weights": _out()[0], "ids": _out()[1]},
        lambda: (_out()[0], None),
        lambda: (None, _out()[1]),
    ],
    ids=["tensor", "1-tuple", "3-tuple", "dict", "ids-None", "weights-None"],
)
def test_out_not_a_pair_of_tensors(logits, out):
    with pytest.raises(TypeError, match="out"):
        g4route.route(logits, K, out=out())


@pytest.mark.parametrize(
    ("which", "dtype"),
    [("weights", torch.float16), ("weights", torch.float64), ("weights", torch.int32),
     ("ids", torch.int64), ("ids", torch.float32), ("ids", torch.int16)],
    ids=str,
)
def test_out_wrong_dtype(logits, which, dtype):
    weights, ids = _out()
    if which == "weights":
        weights = weights.to(dtype)
    else:
        ids = ids.to(dtype)
    with pytest.raises(TypeError, match=f"out {which}"):
        g4route.route(logits, K, out=(weights, ids))


@pytest.mark.parametrize("which", ["weights", "ids"])
@pytest.mark.parametrize("shape", [(T, K + 1), (T, K - 1), (T + 1, K), (T * K,), (1, T, K)], ids=str)
def test_out_wrong_shape(logits, which, shape):
    weights, ids = _out()
    if which == "weights":
        weights = torch.empty(shape, dtype=torch.float32)
    else:
        ids = torch.empty(shape, dtype=torch.int32)
    with pytest.raises(ValueError, match=f"out {which}"):
        g4route.route(logits, K, out=(weights, ids))


@pytest.mark.parametrize("which", ["weights", "ids"])
def test_out_on_another_device(logits, which):
    weights, ids = _out()
    meta_w, meta_ids = _out(device=META)
    out = (meta_w, ids) if which == "weights" else (weights, meta_ids)
    with pytest.raises(ValueError, match=f"out {which}"):
        g4route.route(logits, K, out=out)


@pytest.mark.parametrize("which", ["weights", "ids"])
def test_out_whose_rows_cannot_be_flattened_as_a_view(which):
    # [A, B, K] buffers made by transposing [B, A, K]: reshape(-1, K) would copy, and results written
    # into the copy would never reach the caller.
    a, b = 3, 2
    logits = torch.randn(a, b, E, generator=torch.Generator().manual_seed(1))
    weights, ids = _out(lead=(a, b))
    if which == "weights":
        weights = torch.full((b, a, K), -7.0).transpose(0, 1)
    else:
        ids = torch.full((b, a, K), -7, dtype=torch.int32).transpose(0, 1)
    bad = weights if which == "weights" else ids
    assert bad.shape == (a, b, K)
    with pytest.raises(ValueError, match=f"out {which}"):
        g4route.route(logits, K, out=(weights, ids))
    assert bool((bad == -7).all()), "a refused buffer was written"


def test_strided_out_that_flattens_as_a_view_is_written(logits):
    # Control for the test above: column slices of wider buffers are strided yet view-flattenable.
    logits3 = logits.reshape(1, T, E)
    wide_w = torch.full((1, T, 2 * K), -7.0)
    wide_ids = torch.full((1, T, 2 * K), -7, dtype=torch.int32)
    weights, ids = g4route.route(logits3, K, out=(wide_w[..., :K], wide_ids[..., K:]))
    assert weights.data_ptr() == wide_w.data_ptr() and ids.data_ptr() == wide_ids[..., K:].data_ptr()
    expected_w, expected_ids = g4route.route(logits3, K)
    assert torch.equal(wide_ids[..., K:], expected_ids) and torch.equal(wide_w[..., :K], expected_w)
    assert bool((wide_w[..., K:] == -7).all()) and bool((wide_ids[..., :K] == -7).all())


def test_refused_call_writes_nothing(logits):
    # A bad ids buffer is reported before anything is written into the good weights buffer.
    weights = torch.full((T, K), -7.0)
    with pytest.raises(TypeError, match="out ids"):
        g4route.route(logits, K, out=(weights, torch.empty(T, K, dtype=torch.int64)))
    assert bool((weights == -7).all())


# ------------------------------------------------------------------------------------- G4ROUTE_BACKEND


def test_unknown_forced_backend_lists_known_names(monkeypatch, logits):
    monkeypatch.setenv(registry.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="nonsense") as info:
        g4route.route(logits, K)
    message = str(info.value)
    for name in g4route.backends():
        assert name in message, f"known backend {name!r} not listed in: {message}"
    # The variable is read per call: unset, the same call works.
    monkeypatch.delenv(registry.ENV_VAR)
    assert g4route.route(logits, K)[1].shape == (T, K)


def test_forced_backend_that_cannot_run_says_why_and_what_can(monkeypatch, logits):
    monkeypatch.setenv(registry.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=registry.ENV_VAR) as info:
        g4route.route(logits, K)
    message = str(info.value)
    reason = registry.why_not(registry.get("cuda"), logits.device, E, K)
    assert reason, "the cuda backend should not be able to route CPU tensors"
    assert reason in message
    able = set(message.rsplit(": ", 1)[1].split(", "))
    expected = {"torch"} | ({"interpreter"} if kernel.TRITON_IMPORT_ERROR is None else set())
    assert able == expected, message


# ------------------------------------------------------------------ inputs that would need autograd


@pytest.mark.parametrize("backend", ["torch", "interpreter"])
def test_out_requiring_grad_is_refused_under_grad_mode(monkeypatch, logits, backend):
    if registry.why_not(registry.get(backend), logits.device, E, K):
        pytest.skip(f"backend {backend} unavailable here")
    monkeypatch.setenv(registry.ENV_VAR, backend)
    weights, ids = _out()
    with pytest.raises((TypeError, ValueError), match="out weights"):
        g4route.route(logits, K, out=(weights.requires_grad_(True), ids))
