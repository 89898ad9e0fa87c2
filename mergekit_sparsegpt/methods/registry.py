"""Every merge method this package adds, in one place: registration and the pre-pass look here.

What each method offers the pre-pass besides mergekit's interface is ``methods.base.PluginMethod``.
"""

from __future__ import annotations

from mergekit_sparsegpt.methods.base import PluginMethod
from mergekit_sparsegpt.methods.regmean import REGMEAN_METHODS
from mergekit_sparsegpt.methods.sparsegpt import SPARSEGPT_METHODS

PLUGIN_METHODS: tuple[PluginMethod, ...] = SPARSEGPT_METHODS + REGMEAN_METHODS


def plugin_method(name: str) -> PluginMethod:
    for method in PLUGIN_METHODS:
        if method.spec.name == name:
            return method
    raise ValueError(f"{name} is not a mergekit_sparsegpt method")


def is_plugin_method(name: str) -> bool:
    """Whether ``name`` is one of our methods, i.e. whether the Hessian pre-pass must run."""
    return any(method.spec.name == name for method in PLUGIN_METHODS)
