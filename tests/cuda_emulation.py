"""Shared by the host-emulation tests of CUDA sources (tests/mla_decode_emulation/emu.h).

`host_compiler` finds the C++ compiler the harnesses are built with (the test skips without one).
`as_host_code` rewrites the only three constructs of a .cu file that are not plain C++ for emu.h:
`extern __shared__ T x[];`, static `__shared__ T a[N], ...;` and `kernel<<<...>>>(args);`.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest


def as_host_code(src: str) -> tuple[str, int, int, int]:
    """(rewritten source, dynamic shared declarations, static shared declarations, launches)."""
    src, n_dyn = re.subn(r"extern __shared__ (\w+) (\w+)\[\];", r"\1* \2 = ::emu::dyn_smem<\1>();", src)

    def static(m):
        decls = []
        for d in m.group(2).split(","):
            name, size = re.fullmatch(r"\s*(\w+)\[([^\]]+)\]\s*", d).groups()
            decls.append(f'{m.group(1)}* {name} = ::emu::static_smem<{m.group(1)}>("{name}", {size});')
        return " ".join(decls)

    src, n_static = re.subn(r"__shared__ (\w+) ([^;]+);", static, src)
    src, n_launch = re.subn(
        r"(\w+(?:<[^<>;()]*>)?)<<<(.*?)>>>\(([^;]*)\);", r"::emu::launch(\1, \2, \3);", src, flags=re.S
    )
    assert "__shared__" not in src and "<<<" not in src
    return src, n_dyn, n_static, n_launch


def skip_unless_required(reason: str) -> None:
    """Skip the calling test for a missing host tool, except where the CUDA kernels are required
    (LATENTMOE_EXPECT_CUDA=1, as CI sets it): there these tests are the only run of the CUDA
    sources, so a missing tool fails them instead of hiding them."""
    if os.environ.get("LATENTMOE_EXPECT_CUDA") == "1":
        pytest.fail(f"{reason} (LATENTMOE_EXPECT_CUDA=1: the CUDA emulation tests must run)")
    pytest.skip(reason)


def host_compiler() -> str:
    """g++ (or c++) on PATH; skips the calling test when there is none (see skip_unless_required)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        skip_unless_required("needs a C++ compiler")
    return cxx
