"""Shared by the host-emulation tests of CUDA sources (tests/mla_decode_emulation/emu.h).

`host_compiler` finds the C++ compiler the harnesses are built with (the test skips without one).
`as_host_code` rewrites the only three constructs of a .cu file that are not plain C++ for emu.h:
`extern __shared__ T x[];`, static `__shared__ T a[N], ...;` and `kernel<<<...>>>(args);`.
"""

from __future__ import annotations

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


def host_compiler() -> str:
    """g++ (or c++) on PATH; skips the calling test when there is none."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    return cxx
