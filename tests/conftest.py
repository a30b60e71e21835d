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
