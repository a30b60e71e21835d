"""The Python-side ``LATENTMOE_*`` choices (README, "Runtime knobs"), read once at import and again
by :func:`latentmoe.reload_settings` (never per call: ``os.environ`` is not read while ops run)."""

from __future__ import annotations

import os

_CHOICES = {"LATENTMOE_MLA_MODULE_PREFILL": ("auto", "kernel", "sdpa")}
_values: dict[str, str] = {}


def choice(name: str, allowed: tuple[str, ...]) -> str:
    """The value of ``name`` (unset or empty: ``allowed[0]``); any other value raises ``ValueError``
    naming the variable."""
    value = os.environ.get(name, "") or allowed[0]
    if value not in allowed:
        raise ValueError(f"latentmoe: {name} must be {' or '.join(allowed)} (or unset), not {value!r}")
    return value


def reload() -> None:
    """Re-read the variables; an unknown value raises ``ValueError`` naming the variable."""
    new = {name: choice(name, allowed) for name, allowed in _CHOICES.items()}
    _values.update(new)  # (the same keys every time: a reader in another thread never misses one)


def mla_module_prefill() -> str:
    """``LATENTMOE_MLA_MODULE_PREFILL``: ``auto``, ``kernel`` or ``sdpa``."""
    return _values["LATENTMOE_MLA_MODULE_PREFILL"]


reload()
