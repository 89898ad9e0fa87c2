"""Every merge method this package adds, in one place: registration and the pre-pass look here.

Besides mergekit's interface each method offers what the pre-pass needs: ``keeps_hessians``
(statistics must hold every whole Hessian), ``nonnegative_weights`` (validate weights >= 0),
``fallback_method`` and ``summary_paths`` (the report paths a tensor can take, with labels).
"""

from __future__ import annotations

from mergekit_sparsegpt._autoload import retry_deferred_registration
from mergekit_sparsegpt.methods.regmean import REGMEAN_METHODS, RegMeanMerge
from mergekit_sparsegpt.methods.sparsegpt import SPARSEGPT_METHODS, SparseGPTMerge

PluginMethod = SparseGPTMerge | RegMeanMerge

PLUGIN_METHODS: tuple[PluginMethod, ...] = SPARSEGPT_METHODS + REGMEAN_METHODS


def plugin_method(name: str) -> PluginMethod:
    for method in PLUGIN_METHODS:
        if method.spec.name == name:
            return method
    raise ValueError(f"{name} is not a mergekit_sparsegpt method")


def is_sparsegpt_method(name: str) -> bool:
    """Whether ``name`` is one of our methods, i.e. whether the Hessian pre-pass must run."""
    return any(method.spec.name == name for method in PLUGIN_METHODS)


# mergekit's registry may have waited for this module to finish executing (see _autoload).
retry_deferred_registration()
