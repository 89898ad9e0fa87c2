"""Make mergekit know our methods: registry entries plus the statistics pre-pass.

mergekit has no plugin discovery, so the start-up hook (``_autoload``) calls
``register_methods`` once ``mergekit.merge_methods`` is imported and ``wrap_run_merge`` once
``mergekit.merge`` is imported. Both are idempotent, so importing this module by hand as well
is harmless.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

_WRAPPED_MARKER = "__mergekit_sparsegpt_wrapped__"


def register_methods() -> None:
    """Add our methods (``methods.PLUGIN_METHODS``) to mergekit's registry (once)."""
    from mergekit.merge_methods import registry

    from mergekit_sparsegpt.methods.registry import PLUGIN_METHODS

    known = {method.spec.name for method in registry.registered_methods()}
    for method in PLUGIN_METHODS:
        if method.spec.name not in known:
            registry.register(method)


def wrap_run_merge(merge_module: ModuleType) -> None:
    """Run the Hessian pre-pass before mergekit's ``run_merge`` when one of our methods is used.

    The wrapper replaces the module attribute, so it must run before other modules do
    ``from mergekit.merge import run_merge``; the import hook guarantees that.
    """
    original = merge_module.run_merge
    if getattr(original, _WRAPPED_MARKER, False):
        return

    @functools.wraps(original)
    def run_merge(merge_config: Any, out_path: str, options: Any, *args: Any, **kwargs: Any):
        from mergekit_sparsegpt.methods.registry import is_plugin_method

        if not is_plugin_method(merge_config.merge_method):
            return original(merge_config, out_path, options, *args, **kwargs)

        from mergekit_sparsegpt.prepass.run import run_with_statistics

        return run_with_statistics(original, merge_config, out_path, options, *args, **kwargs)

    setattr(run_merge, _WRAPPED_MARKER, True)
    merge_module.run_merge = run_merge


def install() -> None:
    """Register the methods and wrap ``run_merge`` now (for code that bypasses the hook)."""
    import mergekit.merge

    register_methods()
    wrap_run_merge(mergekit.merge)
