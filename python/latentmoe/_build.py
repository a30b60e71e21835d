"""Load the compiled library ``latentmoe._C`` or fail with a message that says how to fix it.

There is no fallback: without the compiled kernels, latentmoe does not import.
"""

from __future__ import annotations

import torch

_REBUILD = (
    "Rebuild latentmoe against the torch you run: `pip install --no-build-isolation --force-reinstall "
    "--no-deps .` in the source tree (or `make build`)."
)


def _torch_minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def load():
    """Import ``latentmoe._C`` and check it was built for the running torch. Returns the module."""
    try:
        from latentmoe import _C
    except ImportError as e:
        msg = str(e)
        if "undefined symbol" in msg:
            raise ImportError(
                f"latentmoe._C was built for a different torch than the installed {torch.__version__} "
                f"({msg}). {_REBUILD}"
            ) from e
        if "cannot import name '_C'" in msg:  # (Python's text blames a circular import)
            import glob
            import importlib.machinery
            import os

            import latentmoe

            dirs = list(getattr(latentmoe, "__path__", []))
            found = sorted(os.path.basename(f) for d in dirs for f in glob.glob(os.path.join(d, "_C*.so")))
            where = ", ".join(dirs) or "the package"
            if found:  # built for another Python (its ABI tag)
                msg = (f"{', '.join(found)} in {where}, but none for this Python (extension suffixes "
                       f"{', '.join(importlib.machinery.EXTENSION_SUFFIXES)})")
            else:
                msg = f"no compiled library (_C*.so) in {where}"
        raise ImportError(
            f"latentmoe's compiled library latentmoe._C is missing or failed to load ({msg}). {_REBUILD}"
        ) from e
    if _torch_minor(_C.torch_version) != _torch_minor(torch.__version__):
        raise ImportError(
            f"latentmoe._C was built against torch {_C.torch_version} but torch {torch.__version__} "
            f"is installed. {_REBUILD}"
        )
    return _C
