"""Shared test fixtures: device parametrisation (CUDA cases skip cleanly without a GPU)."""

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

        setattr(monkeypatch, name, patched)
    yield monkeypatch
    monkeypatch.undo()
    latentmoe.reload_settings()
