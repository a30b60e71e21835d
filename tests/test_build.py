"""The compiled library: what it reports, and the clear errors when it does not match torch."""

import os
import types

import pytest
import torch

import latentmoe
from latentmoe import _build, info


def test_info_lists_ops_with_kernels():
    report = info.report()
    assert "rms_norm" in info.ops()
    keys = info.kernels("rms_norm")
    assert "CPU" in keys and "Meta" in keys and "Autograd" in keys
    if latentmoe._C.with_cuda:
        assert "CUDA" in keys
        assert latentmoe._C.cuda_archs
    assert f"torch {torch.__version__}" in report


@pytest.mark.skipif(os.environ.get("LATENTMOE_EXPECT_CUDA") != "1", reason="only where CUDA kernels are required")
def test_cuda_kernels_were_compiled():
    assert latentmoe._C.with_cuda == 1
    for op in info.ops():
        if op.endswith("_backward") or op.startswith("_"):
            continue
        assert "CUDA" in info.kernels(op), f"latentmoe::{op} has no CUDA kernel"


def test_mismatched_torch_is_reported(monkeypatch):
    fake = types.SimpleNamespace(torch_version="1.0.0", with_cuda=0, cuda_archs="", cuda_version="")
    monkeypatch.setattr(latentmoe, "_C", fake)
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0 .*Rebuild latentmoe"):
        _build.load()
