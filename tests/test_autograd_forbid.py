"""Ops without a backward (inference ops; the backward ops' second derivatives): a gradient that
reaches one raises RuntimeError naming the op, under grad mode only; without a gradient (no_grad, or
no input requiring one) nothing is recorded. mla_append_cache, which writes into the cache, refuses
an input requiring grad before writing, and bumps the cache's version counter. (csrc/autograd_forbid.cpp.)"""

from __future__ import annotations

import pytest
import torch

import latentmoe
from latentmoe import ops


def _inference_calls():
    """(name, call(requires_grad) -> output) for each CPU inference op."""
    torch.manual_seed(0)
    E, H, I, T = 3, 8, 6, 5

    def linear(rg):
        return ops.linear_small(torch.randn(2, 7, requires_grad=rg), torch.randn(3, 7))

    def linear_f32(rg):
        return ops.linear_f32(torch.randn(20, 7, requires_grad=rg), torch.randn(3, 7))

    def bmm(rg):
        return ops.bmm_small(torch.randn(2, 3, 5), torch.randn(2, 5, 4, requires_grad=rg))

    def decode(rg):
        cache = torch.randn(1, 6, 24)
        q = torch.randn(1, 1, 2, 16, requires_grad=rg)
        return ops.mla_decode(q, torch.randn(1, 1, 2, 8), cache, torch.tensor([6], dtype=torch.int32), 0.3)[0]

    def absorbed(rg):
        H_, N, V, C, R = 2, 4, 4, 16, 8
        q = torch.randn(1, 1, H_, N + R, requires_grad=rg)
        cos, sin = torch.randn(1, 1, R), torch.randn(1, 1, R)
        return ops.mla_decode_absorbed(q, cos, sin, torch.randn(H_ * (N + V), C), torch.randn(1, 6, C + R),
                                       torch.tensor([6], dtype=torch.int32), 0.3, N)

    def packed(rg):
        gu, dn = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
        gp, dp = ops.moe_pack_experts(gu, dn)
        w = torch.rand(T, 2, requires_grad=rg)
        return ops.moe_experts_packed(torch.randn(T, H), gp, dp, w, torch.randint(0, E, (T, 2)), I)

    def pack(rg):
        return ops.moe_pack_experts(torch.randn(E, 2 * I, H, requires_grad=rg), torch.randn(E, H, I))[0]

    return [("linear_small", linear), ("linear_f32", linear_f32), ("bmm_small", bmm), ("mla_decode", decode),
            ("mla_decode_absorbed", absorbed), ("moe_experts_packed", packed), ("moe_pack_weight", pack)]


@pytest.mark.parametrize("name,call", _inference_calls(), ids=[n for n, _ in _inference_calls()])
def test_inference_op_backward_raises(name, call):
    out = call(True)
    assert out.requires_grad and out.grad_fn is not None
    with pytest.raises(RuntimeError, match=f"latentmoe.{name}: has no backward"):
        out.float().sum().backward()
    with torch.no_grad():
        assert not call(True).requires_grad
    assert not call(False).requires_grad


def test_second_derivatives_raise():
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    (g,) = torch.autograd.grad(ops.rms_norm(x, w).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="latentmoe.rms_norm_backward: double backward"):
        g.sum().backward()

    E, H, I, T = 3, 8, 6, 5
    hid = torch.randn(T, H, requires_grad=True)
    gu, dn = torch.randn(E, 2 * I, H, requires_grad=True), torch.randn(E, H, I, requires_grad=True)
    w, idx = torch.rand(T, 2, requires_grad=True), torch.randint(0, E, (T, 2))
    (g,) = torch.autograd.grad(ops.moe_experts(hid, gu, dn, w, idx).pow(2).sum(), hid, create_graph=True)
    with pytest.raises(RuntimeError, match="latentmoe.moe_experts_backward: double backward"):
        g.sum().backward()
    # A first-order backward under create_graph=False stays as it was.
    (g1,) = torch.autograd.grad(ops.moe_experts(hid, gu, dn, w, idx).pow(2).sum(), hid)
    assert not g1.requires_grad and torch.isfinite(g1).all()
    assert latentmoe  # the package import registers the kernels


def _append(cache, latent=None, pe=None):
    """mla_append_cache of 2 tokens at slots 2 and 3 of a [1, 8, 16 + 4] cache."""
    B, S, C, R = 1, 2, 16, 4
    ops.mla_append_cache(cache, torch.randn(B, S, C) if latent is None else latent,
                         torch.randn(B, S, R) if pe is None else pe, torch.ones(C), 1e-6,
                         torch.randn(B, S, R), torch.randn(B, S, R), torch.tensor([2], dtype=torch.int32))


def test_append_cache_bumps_version_so_a_saved_cache_is_caught():
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    cache = torch.randn(1, 8, 20)
    q = torch.randn(1, 2, 1, 8, requires_grad=True)
    out, _ = ops.mla_prefill(q, torch.randn(1, 2, 1, 4), cache, i32(6), torch.randn(1, 8, 16),
                             torch.randn(1, 6, 16), 0.2)  # saves the cache for its backward
    v0 = cache._version
    _append(cache)  # overwrites slots 2 and 3, which `out` read
    assert cache._version == v0 + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    with torch.no_grad():  # no_grad does not stop the count (as for torch's in-place ops)
        _append(cache)
    assert cache._version == v0 + 2


@pytest.mark.parametrize("arg", ["kv_cache", "kv_latent", "k_pe"])
def test_append_cache_refuses_inputs_requiring_grad(arg):
    cache = torch.randn(1, 8, 20, requires_grad=arg == "kv_cache")
    latent = torch.randn(1, 2, 16, requires_grad=arg == "kv_latent")
    pe = torch.randn(1, 2, 4, requires_grad=arg == "k_pe")
    before = cache.detach().clone()
    with pytest.raises(RuntimeError, match=f"mla_append_cache: argument '{arg}' requires grad"):
        _append(cache, latent, pe)
    assert torch.equal(cache.detach(), before) and cache._version == 0  # nothing written
    with torch.no_grad():  # without grad mode the op runs, as torch's in-place ops do
        _append(cache, latent, pe)
    assert not torch.equal(cache.detach(), before) and cache.grad_fn is None


def test_append_cache_inference_tensor():
    with torch.inference_mode():
        cache = torch.zeros(1, 8, 20)
    with pytest.raises(RuntimeError, match="mla_append_cache: argument 'kv_cache' is an inference tensor"):
        _append(cache)
    assert torch.equal(cache, torch.zeros(1, 8, 20))  # refused before writing
    with torch.inference_mode():
        _append(cache)
    assert cache[0, 2:4].abs().sum() > 0 and cache[0, 4:].abs().sum() == 0
    normal = torch.zeros(1, 8, 20)
    _append(normal)  # a normal tensor made outside inference mode is fine outside it
    assert normal._version == 1


def _forward_ad_calls():
    """(name, call(dual) -> None): each op called with one input made dual by ``dual``."""
    E, H, I, T = 3, 8, 6, 5
    seq6 = torch.tensor([6], dtype=torch.int32)
    calls = {
        "rms_norm": lambda d: ops.rms_norm(d(torch.randn(3, 16)), torch.randn(16)),
        "add_rms_norm": lambda d: ops.add_rms_norm(torch.randn(3, 16), d(torch.randn(3, 16)), torch.randn(16)),
        "mla_prefill": lambda d: ops.mla_prefill(d(torch.randn(1, 2, 2, 4)), torch.randn(1, 2, 2, 2),
                                                 torch.randn(1, 4, 6), torch.tensor([4], dtype=torch.int32),
                                                 torch.randn(2, 4, 4), torch.randn(2, 3, 4), 0.3),
        "moe_route": lambda d: ops.moe_route(d(torch.randn(T, 8)), 2),
        "moe_experts": lambda d: ops.moe_experts(torch.randn(T, H), torch.randn(E, 2 * I, H), torch.randn(E, H, I),
                                                 d(torch.rand(T, 2)), torch.randint(0, E, (T, 2))),
        "linear_small": lambda d: ops.linear_small(d(torch.randn(2, 7)), torch.randn(3, 7)),
        "linear_f32": lambda d: ops.linear_f32(torch.randn(20, 7), d(torch.randn(3, 7))),
        "bmm_small": lambda d: ops.bmm_small(torch.randn(2, 3, 5), d(torch.randn(2, 5, 4))),
        "mla_decode": lambda d: ops.mla_decode(torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 8),
                                               d(torch.randn(1, 6, 24)), seq6, 0.3),
        "mla_decode_absorbed": lambda d: ops.mla_decode_absorbed(
            d(torch.randn(1, 1, 2, 12)), torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.randn(16, 16),
            torch.randn(1, 6, 24), seq6, 0.3, 4),
        "moe_pack_weight": lambda d: ops.moe_pack_experts(d(torch.randn(E, 2 * I, H)), torch.randn(E, H, I)),
        "mla_append_cache": lambda d: _append(torch.zeros(1, 8, 20), pe=d(torch.randn(1, 2, 4))),
    }
    return list(calls.items())


@pytest.mark.parametrize("name,call", _forward_ad_calls(), ids=[n for n, _ in _forward_ad_calls()])
def test_forward_mode_ad_raises(name, call):
    # No op has a forward derivative: a dual input took the no-gradient path and the output came
    # back without a tangent (torch.func.jvp gave zeros), silently.
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(RuntimeError, match=f"latentmoe.{name}: argument .* forward-mode tangent"):
        call(lambda t: fwAD.make_dual(t, torch.randn_like(t)))
    call(lambda t: t)  # without a tangent the call runs
    # torch.func.jvp raises too, never a zero jvp: torch's refusal of C++ autograd Functions under
    # its transforms.
    with pytest.raises(RuntimeError, match="C\\+\\+ torch::autograd::Function with functorch"):
        torch.func.jvp(lambda x: ops.rms_norm(x, torch.ones(16)), (torch.randn(2, 16),), (torch.randn(2, 16),))


@pytest.mark.parametrize("name", ["rms_norm", "add_rms_norm", "mla_prefill", "moe_route", "moe_experts"])
def test_forward_mode_ad_raises_with_requires_grad(name):
    # The C++ autograd kernels (csrc/autograd_functions.cpp) run the forward below autograd, where the
    # tangent is refused by name also when the dual input requires grad (a Python autograd
    # Function raised torch's NotImplementedError about a missing jvp there).
    import torch.autograd.forward_ad as fwAD

    call = dict(_forward_ad_calls())[name]
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=f"latentmoe.{name}: argument .* forward-mode tangent"):
        call(lambda t: fwAD.make_dual(t.requires_grad_(), torch.randn_like(t)))
