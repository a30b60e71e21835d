"""latentmoe.use_huge_pages: large CPU tensors collapsed onto 2 MiB pages in place (values,
addresses and autograd state unchanged), small / non-CPU ones left alone, clear errors."""

from __future__ import annotations

import sys

import pytest
import torch

import latentmoe

HUGE = 2 << 20


def _thp_mode() -> str | None:
    """The bracketed mode of /sys/kernel/mm/transparent_hugepage/enabled, or None without it."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def _huge_kib_at(address: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process holding ``address``."""
    inside, kib = False, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                kib = int(line.split()[1])
    return kib


supported = sys.platform.startswith("linux") and _thp_mode() not in (None, "never")


def _aligned_bytes(t: torch.Tensor) -> int:
    s = t.untyped_storage()
    b = (s.data_ptr() + HUGE - 1) // HUGE * HUGE
    e = (s.data_ptr() + s.nbytes()) // HUGE * HUGE
    return max(0, e - b)


@pytest.mark.skipif(not supported, reason="needs Linux with transparent huge pages not 'never'")
def test_collapses_in_place_and_keeps_values():
    t = torch.randn(3 << 20)  # 12 MiB: at least 4 aligned huge pages
    t[5] = float("nan")
    before = t.clone()
    address, stride = t.data_ptr(), t.stride()
    try:
        n = latentmoe.use_huge_pages(t)
    except RuntimeError as e:  # the kernel may lack MADV_COLLAPSE (Linux < 6.1): a clear refusal
        assert "MADV_COLLAPSE" in str(e) and "tensor" in str(e)
        pytest.skip(f"kernel refuses: {e}")
    assert n == _aligned_bytes(t) and n >= 4 * HUGE
    assert t.data_ptr() == address and t.stride() == stride
    assert torch.equal(t.nan_to_num(0.5), before.nan_to_num(0.5)) and torch.isnan(t[5])
    assert _huge_kib_at(address + (HUGE - address % HUGE)) * 1024 >= n
    # A second call is harmless (already huge).
    assert latentmoe.use_huge_pages(t) == n


@pytest.mark.skipif(not supported, reason="needs Linux with transparent huge pages not 'never'")
def test_module_parameters_and_shared_storage():
    torch.manual_seed(0)
    big = torch.nn.Linear(1024, 1536)  # 6 MiB weight, 6 KiB bias
    small = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(big, small)
    model.register_buffer("view_of_weight", big.weight.detach()[1:])  # the same storage
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 1024)
    y = big(x)
    y.sum().backward()
    grad = big.weight.grad.clone()
    big.weight.grad = None
    try:
        n = latentmoe.use_huge_pages(model)
    except RuntimeError as e:
        pytest.skip(f"kernel refuses: {e}")
    # Only the weight's storage counts (once, though a buffer views it too); the biases and the
    # small layer are under min_bytes.
    assert n == _aligned_bytes(big.weight)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert big.weight.requires_grad and big.weight.is_leaf
    y2 = big(x)
    y2.sum().backward()
    assert torch.equal(y2, y) and torch.equal(big.weight.grad, grad)
    # min_bytes above every tensor: nothing to do.
    assert latentmoe.use_huge_pages(model, min_bytes=1 << 40) == 0
    # An iterable of tensors and modules (the weight's storage counted once).
    assert latentmoe.use_huge_pages([big.weight, small.weight]) == n
    assert latentmoe.use_huge_pages([big, big.weight, model]) == n


def test_small_and_other_tensors_are_left_alone():
    assert latentmoe.use_huge_pages(torch.randn(1000)) == 0  # under 2 MiB
    assert latentmoe.use_huge_pages(torch.empty(4 << 20, device="meta")) == 0
    assert latentmoe.use_huge_pages(torch.empty(0)) == 0
    assert latentmoe.use_huge_pages(torch.nn.Module()) == 0
    assert latentmoe.use_huge_pages([]) == 0


def test_bad_arguments():
    with pytest.raises(TypeError, match="'obj'"):
        latentmoe.use_huge_pages(3)
    with pytest.raises(TypeError, match="'obj' item 1 is a str"):
        latentmoe.use_huge_pages([torch.zeros(1), "x"])
    with pytest.raises(ValueError, match="'min_bytes'"):
        latentmoe.use_huge_pages(torch.zeros(1), min_bytes=-1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux madvise")
def test_refusal_is_an_error_unless_not_strict(monkeypatch):
    """Where the kernel refuses, RuntimeError names the tensor (strict) or the tensor is skipped."""
    import errno

    from latentmoe import _huge_pages

    class Refusing:
        @staticmethod
        def collapse_huge_pages(address, nbytes):
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(_huge_pages, "_C", Refusing)
    lin = torch.nn.Linear(1024, 1024)
    with pytest.raises(RuntimeError, match=r"weight \(4194304 bytes\).*MADV_COLLAPSE.*errno 22"):
        latentmoe.use_huge_pages(lin)
    assert latentmoe.use_huge_pages(lin, strict=False) == 0
