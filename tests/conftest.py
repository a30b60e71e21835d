"""Shared test fixtures: device parametrisation (CUDA cases skip cleanly without a GPU)."""

import os

import pytest
import torch

import latentmoe  # noqa: F401  (loads the kernels; a broken build fails collection loudly)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]


def pytest_configure(config):
    # bench/gpu_check.sh sets it on the lent GPU: there a CUDA test must not skip for want of one.
    if os.environ.get("LATENTMOE_REQUIRE_GPU") == "1" and not torch.cuda.is_available():
        raise pytest.UsageError("LATENTMOE_REQUIRE_GPU=1 but torch.cuda.is_available() is False")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def monkeypatch(monkeypatch):
    """pytest's monkeypatch, with the kernels' snapshot of the LATENTMOE_* variables retaken after
    each setenv / delenv and after the test's changes are undone (latentmoe.reload_settings)."""
    for name in ("setenv", "delenv"):
        original = getattr(monkeypatch, name)

        def patched(*args, _original=original, **kwargs):
            _original(*args, **kwargs)
            latentmoe.reload_settings()
            if os.environ.get("LATENTMOE_CPU_ISA") == "generic":  # the switch reached the kernels
                assert latentmoe._C.cpu_isa() == "generic"

        setattr(monkeypatch, name, patched)
    yield monkeypatch
    monkeypatch.undo()
    latentmoe.reload_settings()
