"""The Python-side ``LATENTMOE_*`` choices (README, "Runtime knobs"), read once at import and again
by :func:`latentmoe.reload_settings` (never per call: ``os.environ`` is not read while ops run)."""

from __future__ import annotations

import os

_CHOICES = {"LATENTMOE_MLA_MODULE_PREFILL": ("auto", "kernel", "sdpa")}
_values: dict[str, str] = {}


def reload() -> None:
    """Re-read the variables; an unknown value raises ``ValueError`` naming the variable."""
    new = {}
    for name, allowed in _CHOICES.items():
        value = os.environ.get(name, "") or "auto"
        if value not in allowed:
            raise ValueError(f"latentmoe: {name} must be {' or '.join(allowed)} (or unset), not {value!r}")
        new[name] = value
    _values.update(new)  # (the same keys every time: a reader in another thread never misses one)


def mla_module_prefill() -> str:
    """``LATENTMOE_MLA_MODULE_PREFILL``: ``auto``, ``kernel`` or ``sdpa``."""
    return _values["LATENTMOE_MLA_MODULE_PREFILL"]


reload()
