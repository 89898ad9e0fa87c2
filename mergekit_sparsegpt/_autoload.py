"""Start-up hook that teaches the stock ``mergekit-yaml`` about our merge methods.

mergekit has no plugin discovery: a merge method exists only once some module registered it.
The ``mergekit_sparsegpt.pth`` file that ships with this package calls
:func:`install_import_hook` at interpreter start. That puts a finder at the front of
``sys.meta_path`` which does nothing until mergekit itself is imported; then, right after

* ``mergekit.merge_methods`` has finished executing, it calls
  :func:`mergekit_sparsegpt.integration.registration.register_methods`, and
* ``mergekit.merge`` has finished executing, it calls
  :func:`mergekit_sparsegpt.integration.registration.wrap_run_merge` on the module, so the wrapped
  ``run_merge`` is what ``from mergekit.merge import run_merge`` binds in
  ``mergekit/scripts/run_yaml.py``.

Once both have fired the finder removes itself. Failures inside these callbacks never break
the user's import: they turn into one warning that names the opt-out variable.

This module runs in every Python process of the environment, so it uses the standard
library only and imports nothing heavy (no torch, mergekit or transformers) until mergekit
is imported anyway. Set ``MERGEKIT_SPARSEGPT_DISABLE_AUTOLOAD=1`` to switch it off.
"""

from __future__ import annotations

import _thread  # not ``threading``: that one pulls in collections/functools at start-up
import os
import sys

# Annotation-only imports; ``typing`` and ``collections.abc`` are not imported at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

DISABLE_ENV_VAR = "MERGEKIT_SPARSEGPT_DISABLE_AUTOLOAD"
_TRUE_VALUES = frozenset({"1", "true", "yes", "on"})

MERGE_METHODS_MODULE = "mergekit.merge_methods"
MERGE_MODULE = "mergekit.merge"

# Finders carrying this attribute are ours, even if this module was loaded twice.
_HOOK_MARKER = "__mergekit_sparsegpt_import_hook__"

_install_lock = _thread.RLock()
# Module names whose callback already ran in this process (install twice = once).
_fired: set[str] = set()
# Set when registration failed because mergekit.merge was mid-import; retried once it is done.
_deferred_registration: list[BaseException] = []


def autoload_disabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when the opt-out variable is set to 1/true/yes/on (case-insensitive)."""
    env = os.environ if environ is None else environ
    return env.get(DISABLE_ENV_VAR, "").strip().lower() in _TRUE_VALUES


def _warn_failure(what: str, exc: BaseException) -> None:
    message = (
        f"mergekit-sparsegpt: {what} failed ({type(exc).__name__}: {exc}); mergekit itself "
        f"still works, but the sparsegpt_ties/sparsegpt_dare methods may be unavailable. "
        f"Set {DISABLE_ENV_VAR}=1 to turn off this automatic hook."
    )
    try:
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=2)
    except Exception:  # e.g. ``-W error``: still never break the import
        try:
            sys.stderr.write(f"warning: {message}\n")
        except Exception:
            pass


def _on_merge_methods(module: ModuleType) -> None:
    from mergekit_sparsegpt.integration import registration

    try:
        registration.register_methods()
    except Exception as exc:
        # None of our own modules can be half-executed here: methods/__init__ imports
        # mergekit.merge_methods before any method module runs, and nothing below methods/
        # imports it (tests/test_structure.py checks both).
        merge = sys.modules.get(MERGE_MODULE)
        if merge is not None and MERGE_MODULE not in _fired:
            # mergekit.merge is still executing (it imports mergekit.merge_methods on the
            # way); our method modules may need names it has not defined yet. Try again
            # once it has finished.
            _deferred_registration.append(exc)
            return
        _warn_failure("registering the merge methods with mergekit", exc)


def _on_merge(module: ModuleType) -> None:
    from mergekit_sparsegpt.integration import registration

    if _deferred_registration:
        _deferred_registration.clear()
        try:
            registration.register_methods()
        except Exception as exc:
            _warn_failure("registering the merge methods with mergekit", exc)
    try:
        registration.wrap_run_merge(module)
    except Exception as exc:
        _warn_failure("wrapping mergekit.merge.run_merge", exc)


def _default_callbacks() -> dict[str, Callable[[ModuleType], None]]:
    return {MERGE_METHODS_MODULE: _on_merge_methods, MERGE_MODULE: _on_merge}


def _run_callback(name: str, callback: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        callback(module)
    except Exception as exc:  # the callbacks warn themselves; this is the last safety net
        _warn_failure(f"the post-import hook for {name}", exc)


class _LoaderProxy:
    """Fallback for loaders whose ``exec_module`` cannot be replaced on the instance."""

    def __init__(self, loader: object, exec_module: Callable[[ModuleType], None]) -> None:
        self.__dict__["_loader"] = loader
        self.__dict__["exec_module"] = exec_module

    def __getattr__(self, name: str) -> object:
        return getattr(self.__dict__["_loader"], name)


class PostImportHook:
    """Meta-path finder that runs ``callbacks[name](module)`` after module ``name`` executed.

    It implements the ``importlib.abc.MetaPathFinder`` protocol without inheriting from it:
    importing ``importlib.abc`` drags in pathlib, tempfile, zipfile and typing, about 15-20 ms
    added to the start of every Python process in the environment.

    It never finds anything itself: it asks the finders behind it for the spec and wraps the
    loader's ``exec_module``. Spec and loader stay the originals (the wrapper is an instance
    attribute, removed on first use) unless the loader refuses new attributes, in which case
    a delegating proxy stands in. Names that fired are added to ``fired``; the hook removes
    itself from ``sys.meta_path`` once every callback fired.
    """

    def __init__(
        self,
        callbacks: Mapping[str, Callable[[ModuleType], None]],
        fired: set[str] | None = None,
    ) -> None:
        setattr(self, _HOOK_MARKER, True)
        self._pending: dict[str, Callable[[ModuleType], None]] = dict(callbacks)
        self._fired = set() if fired is None else fired
        self._lock = _thread.RLock()
        self._local = _thread._local()

    @property
    def pending(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._pending)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        with self._lock:
            if fullname not in self._pending:
                return None
        active = self._local.__dict__.setdefault("active", set())
        if fullname in active:  # a finder behind us asked for the same name again
            return None
        active.add(fullname)
        try:
            spec = self._find_behind(fullname, path, target)
        finally:
            active.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None  # let the import system proceed exactly as without us
        self._wrap_loader(spec, fullname)
        return spec

    def _find_behind(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None
    ) -> ModuleSpec | None:
        finders = list(sys.meta_path)
        if self in finders:
            finders = finders[finders.index(self) + 1 :]
        for finder in finders:
            if getattr(finder, _HOOK_MARKER, False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def _wrap_loader(self, spec: ModuleSpec, fullname: str) -> None:
        loader = spec.loader
        original = loader.exec_module
        patched_instance = False

        def exec_module(module: ModuleType) -> None:
            if getattr(module, "__name__", None) != fullname:  # shared loader, other module
                original(module)
                return
            if patched_instance:
                try:
                    del loader.exec_module
                except AttributeError:
                    pass
            original(module)  # if this raises, the import fails as usual; no callback
            self._fire(fullname, module)

        if not isinstance(loader, type):
            try:
                loader.exec_module = exec_module
                patched_instance = True
            except (AttributeError, TypeError):
                pass
        if not patched_instance:
            spec.loader = _LoaderProxy(loader, exec_module)

    def _fire(self, fullname: str, module: ModuleType) -> None:
        with self._lock:
            callback = self._pending.pop(fullname, None)
            if callback is not None:
                self._fired.add(fullname)
            finished = not self._pending
        if finished:
            self.remove()
        if callback is not None:
            _run_callback(fullname, callback, module)

    def fire_already_imported(self) -> None:
        """Run the callbacks of target modules that are already fully imported."""
        for name in sorted(self.pending):
            module = sys.modules.get(name)
            if module is not None and not _is_initializing(module):
                self._fire(name, module)

    def invalidate_caches(self) -> None:
        """Part of the MetaPathFinder protocol; there is nothing cached."""

    def remove(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


def _is_initializing(module: ModuleType) -> bool:
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def find_installed_hook() -> PostImportHook | None:
    """The hook installed by :func:`install_import_hook`, if it is still in ``sys.meta_path``."""
    for finder in sys.meta_path:
        if getattr(finder, _HOOK_MARKER, False):
            return finder  # type: ignore[return-value]
    return None


def install_import_hook() -> bool:
    """Install the post-import hook (idempotent). Returns True if a hook is now waiting.

    Targets that are already imported get their callback right away; the others fire when
    imported. Callbacks run at most once per process, however often this is called. Does
    nothing when ``MERGEKIT_SPARSEGPT_DISABLE_AUTOLOAD`` is set.
    """
    if autoload_disabled():
        return False
    with _install_lock:
        if find_installed_hook() is not None:
            return True
        callbacks = {name: cb for name, cb in _default_callbacks().items() if name not in _fired}
        if not callbacks:
            return False
        hook = PostImportHook(callbacks, fired=_fired)
        sys.meta_path.insert(0, hook)
        hook.fire_already_imported()
        return find_installed_hook() is not None
