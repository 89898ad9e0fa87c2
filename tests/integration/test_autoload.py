"""The ``.pth`` start-up hook: stock mergekit learns our methods without an explicit import.

Two kinds of tests:

* In-process tests of :class:`PostImportHook` on throwaway packages (fast, no mergekit).
* Subprocess tests against the installed package: a fresh interpreter runs the installed
  ``mergekit_sparsegpt.pth`` exactly as a user's would. They need ``pip install -e .`` of
  this checkout; elsewhere they skip, except under ``CI`` where a missing install fails.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import uuid
import warnings
from importlib.machinery import ModuleSpec, SourceFileLoader
from pathlib import Path

import pytest

from mergekit_sparsegpt import _autoload

REPO = Path(__file__).resolve().parents[2]
PTH_NAME = "mergekit_sparsegpt.pth"
DISABLE = _autoload.DISABLE_ENV_VAR
HEAVY = ("torch", "mergekit", "transformers")


# --------------------------------------------------------------------------- helpers


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != DISABLE}
    env.update(extra)
    return env


def run_python(
    code: str,
    cwd: Path,
    *,
    env: dict[str, str] | None = None,
    flags: tuple[str, ...] = (),
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter of this environment (site and .pth files on)."""
    proc = subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=_clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed ({proc.returncode})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def last_json(proc: subprocess.CompletedProcess[str]) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON report\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(lines[-1])


def _install_problem() -> str | None:
    """Why the installed-package tests cannot run here, or None when they can."""
    try:
        dist = importlib.metadata.distribution("mergekit-sparsegpt")
    except importlib.metadata.PackageNotFoundError:
        return "mergekit-sparsegpt is not installed; run `pip install -e .`"
    records = [f for f in dist.files or () if f.name == PTH_NAME and len(f.parts) == 1]
    if not records:
        return f"the installed mergekit-sparsegpt has no {PTH_NAME} (stale install?)"
    installed = Path(dist.locate_file(records[0]))
    if not installed.is_file():
        return f"{installed} is recorded but missing (half-uninstalled?)"
    if installed.read_text(encoding="utf-8") != (REPO / PTH_NAME).read_text(encoding="utf-8"):
        return f"{installed} differs from this checkout's {PTH_NAME}; reinstall"
    proc = subprocess.run(
        [sys.executable, "-c", "import mergekit_sparsegpt as m; print(m.__file__)"],
        cwd=Path(installed).parent,
        env=_clean_env(**{DISABLE: "1"}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        return f"cannot import the installed mergekit_sparsegpt: {proc.stderr.strip()[-300:]}"
    imported = Path(proc.stdout.strip()).resolve().parent
    if imported != REPO / "mergekit_sparsegpt":
        return f"the installed mergekit_sparsegpt ({imported}) is not this checkout; reinstall"
    return None


@pytest.fixture(scope="module")
def installed() -> Path:
    """Site-packages path of the installed .pth; skip (fail under CI) when not usable."""
    problem = _install_problem()
    if problem is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must test the installed package: {problem}")
        pytest.skip(problem)
    dist = importlib.metadata.distribution("mergekit-sparsegpt")
    record = next(f for f in dist.files if f.name == PTH_NAME and len(f.parts) == 1)
    return Path(dist.locate_file(record))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A neutral cwd, so ``sys.path[0]`` of the subprocesses is not the checkout."""
    return tmp_path_factory.mktemp("autoload-cwd")


# Prelude for subprocess code: record our warnings, report state as JSON.
PRELUDE = """
import json, sys, warnings
warnings.simplefilter("always")
_caught = warnings.catch_warnings(record=True)
_records = _caught.__enter__()
def our_warnings():
    return [str(w.message) for w in _records if "mergekit-sparsegpt" in str(w.message)]
def hooks():
    return [type(f).__name__ for f in sys.meta_path
            if getattr(f, "__mergekit_sparsegpt_import_hook__", False)]
"""


# ----------------------------------------------------------- the .pth file on its own


def test_pth_file_is_one_import_line() -> None:
    lines = (REPO / PTH_NAME).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("import ")
    assert DISABLE in lines[0]


def _fake_package(root: Path, init_source: str, with_autoload: bool) -> None:
    pkg = root / "mergekit_sparsegpt"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(init_source, encoding="utf-8")
    if with_autoload:
        (pkg / "_autoload.py").write_text("def install_import_hook(:\n", encoding="utf-8")


@pytest.mark.parametrize(
    ("init_source", "with_autoload"),
    [
        ("raise RuntimeError('broken package')\n", True),  # package raises on import
        ("", False),  # half-uninstalled: _autoload.py is gone
        ("", True),  # _autoload.py has a syntax error
    ],
    ids=["raising-init", "missing-module", "syntax-error"],
)
def test_pth_line_never_raises(tmp_path: Path, init_source: str, with_autoload: bool) -> None:
    _fake_package(tmp_path / "site", init_source, with_autoload)
    # -S: no site processing, so only the line under test runs; the fake package shadows
    # any installed one through PYTHONPATH.
    proc = run_python(
        f"""
        import sys
        exec(open({str(REPO / PTH_NAME)!r}, encoding="utf-8").read())
        print("survived", "mergekit_sparsegpt" in sys.modules or "attempted")
        """,
        tmp_path,
        env=_clean_env(PYTHONPATH=str(tmp_path / "site")),
        flags=("-S",),
    )
    assert "survived" in proc.stdout
    assert proc.stderr == ""


def test_pth_line_installs_hook_from_checkout(tmp_path: Path) -> None:
    proc = run_python(
        f"""
        import sys
        exec(open({str(REPO / PTH_NAME)!r}, encoding="utf-8").read())
        hooks = [f for f in sys.meta_path
                 if getattr(f, "__mergekit_sparsegpt_import_hook__", False)]
        print(len(hooks), sys.meta_path.index(hooks[0]) if hooks else -1)
        """,
        tmp_path,
        env=_clean_env(PYTHONPATH=str(REPO)),
        flags=("-S",),
    )
    assert proc.stdout.split() == ["1", "0"]


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_pth_line_does_nothing_when_disabled(tmp_path: Path, value: str) -> None:
    proc = run_python(
        f"""
        import sys
        exec(open({str(REPO / PTH_NAME)!r}, encoding="utf-8").read())
        print(sorted(m for m in sys.modules if m.startswith("mergekit")))
        """,
        tmp_path,
        env=_clean_env(PYTHONPATH=str(REPO), **{DISABLE: value}),
        flags=("-S",),
    )
    assert proc.stdout.strip() == "[]"


# ------------------------------------------------------ PostImportHook, in-process


@pytest.fixture
def fake_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A unique throwaway package on sys.path; returns a writer for its modules."""
    name = f"_mksg_fake_{uuid.uuid4().hex[:10]}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    importlib.invalidate_caches()

    def write(module: str, source: str) -> str:
        (pkg / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        importlib.invalidate_caches()
        return f"{name}.{module}"

    write.name = name  # type: ignore[attr-defined]
    yield write
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def test_hook_runs_callback_after_module_body(fake_pkg) -> None:
    target = fake_pkg("target", "VALUE = 41\ndef run():\n    return 'original'\n")
    seen = []

    def callback(module):
        seen.append(module.VALUE)  # the body has run completely
        original = module.run
        module.run = lambda: "wrapped:" + original()

    hook = _autoload.PostImportHook({target: callback})
    sys.meta_path.insert(0, hook)
    user = fake_pkg("user", f"from {target} import run\n")

    module = importlib.import_module(user)

    assert seen == [41]
    assert module.run() == "wrapped:original"  # `from ... import` bound the wrapped one
    assert hook not in sys.meta_path  # every callback fired: removed itself
    loader = sys.modules[target].__loader__
    assert type(loader) is SourceFileLoader  # original spec/loader kept
    assert "exec_module" not in vars(loader)  # and the temporary wrapper removed again


def test_hook_waits_for_all_targets_before_removing_itself(fake_pkg) -> None:
    first = fake_pkg("first", "")
    second = fake_pkg("second", "")
    fired = []
    hook = _autoload.PostImportHook({first: fired.append, second: fired.append})
    sys.meta_path.insert(0, hook)

    importlib.import_module(first)
    assert hook in sys.meta_path
    assert hook.pending == {second}
    importlib.import_module(second)
    assert hook not in sys.meta_path
    assert [m.__name__ for m in fired] == [first, second]


def test_callback_failure_warns_and_import_succeeds(fake_pkg) -> None:
    target = fake_pkg("target", "VALUE = 1\n")

    def broken(module):
        raise KeyError("simulated failure")

    sys.meta_path.insert(0, _autoload.PostImportHook({target: broken}))
    with pytest.warns(RuntimeWarning, match="simulated failure") as record:
        module = importlib.import_module(target)
    assert module.VALUE == 1
    assert len(record) == 1
    assert DISABLE in str(record[0].message)


def test_callback_failure_under_warnings_as_errors_goes_to_stderr(fake_pkg, capsys) -> None:
    target = fake_pkg("target", "VALUE = 1\n")

    def broken(module):
        raise KeyError("simulated failure")

    sys.meta_path.insert(0, _autoload.PostImportHook({target: broken}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = importlib.import_module(target)
    assert module.VALUE == 1
    err = capsys.readouterr().err
    assert "simulated failure" in err and DISABLE in err


def test_failing_module_body_skips_callback_until_a_successful_import(fake_pkg) -> None:
    target = fake_pkg("target", "raise ZeroDivisionError('module body failed')\n")
    fired = []
    hook = _autoload.PostImportHook({target: fired.append})
    sys.meta_path.insert(0, hook)

    with pytest.raises(ZeroDivisionError):
        importlib.import_module(target)
    assert fired == []
    assert hook.pending == {target}

    fake_pkg("target", "VALUE = 2\n")
    assert importlib.import_module(target).VALUE == 2
    assert len(fired) == 1


def test_fire_already_imported_runs_callback_at_once(fake_pkg) -> None:
    target = fake_pkg("target", "")
    module = importlib.import_module(target)
    fired = []
    hook = _autoload.PostImportHook({target: fired.append})
    sys.meta_path.insert(0, hook)
    hook.fire_already_imported()
    assert fired == [module]
    assert hook not in sys.meta_path


class _SlottedLoader:
    """A loader that refuses new attributes (``__slots__``, no instance ``__dict__``)."""

    __slots__ = ("source",)

    def __init__(self, source: str) -> None:
        self.source = source

    def create_module(self, spec: ModuleSpec) -> None:
        return None

    def exec_module(self, module) -> None:
        exec(self.source, module.__dict__)

    def get_source(self, fullname: str) -> str:
        return self.source


def test_loader_without_instance_dict_gets_proxy(fake_pkg) -> None:
    target = f"{fake_pkg.name}.virtual"

    class SlottedFinder:
        def find_spec(self, fullname, path, target_module=None):
            if fullname == target:
                return ModuleSpec(fullname, _SlottedLoader("VALUE = 3\n"))
            return None

    fired = []
    hook = _autoload.PostImportHook({target: fired.append})
    sys.meta_path[:0] = [hook, SlottedFinder()]
    module = importlib.import_module(target)
    assert module.VALUE == 3
    assert fired == [module]
    assert isinstance(module.__spec__.loader, _autoload._LoaderProxy)
    assert module.__spec__.loader.get_source(target) == "VALUE = 3\n"  # delegated


# ------------------------------------------------------ install_import_hook, in-process


@pytest.fixture
def fresh_install_state(monkeypatch: pytest.MonkeyPatch, fake_pkg):
    """Point install_import_hook at two fake targets with counting callbacks."""
    first = fake_pkg("first", "")
    second = fake_pkg("second", "")
    calls: list[str] = []
    monkeypatch.setattr(_autoload, "_fired", set())
    monkeypatch.setattr(
        _autoload,
        "_default_callbacks",
        lambda: {
            first: lambda m: calls.append(m.__name__),
            second: lambda m: calls.append(m.__name__),
        },
    )
    monkeypatch.setattr(
        sys,
        "meta_path",
        [f for f in sys.meta_path if not getattr(f, "__mergekit_sparsegpt_import_hook__", False)],
    )
    monkeypatch.delenv(DISABLE, raising=False)
    return first, second, calls


def _our_hooks() -> list:
    return [f for f in sys.meta_path if getattr(f, "__mergekit_sparsegpt_import_hook__", False)]


def test_install_twice_is_install_once(fresh_install_state) -> None:
    first, second, calls = fresh_install_state
    assert _autoload.install_import_hook() is True
    assert _autoload.install_import_hook() is True
    assert len(_our_hooks()) == 1
    assert sys.meta_path[0] is _our_hooks()[0]

    importlib.import_module(first)
    importlib.import_module(second)
    assert calls == [first, second]
    assert _our_hooks() == []

    # Installing again after everything fired must not run the callbacks again.
    assert _autoload.install_import_hook() is False
    assert calls == [first, second]
    assert _our_hooks() == []


def test_install_fires_for_already_imported_targets(fresh_install_state) -> None:
    first, second, calls = fresh_install_state
    importlib.import_module(first)
    assert _autoload.install_import_hook() is True
    assert calls == [first]
    assert _our_hooks()[0].pending == {second}


def test_install_respects_opt_out(fresh_install_state, monkeypatch: pytest.MonkeyPatch) -> None:
    first, _, calls = fresh_install_state
    monkeypatch.setenv(DISABLE, "1")
    assert _autoload.install_import_hook() is False
    importlib.import_module(first)
    assert _our_hooks() == []
    assert calls == []


@pytest.mark.parametrize(
    ("value", "disabled"),
    [("1", True), ("true", True), ("On", True), ("0", False), ("", False), ("no", False)],
)
def test_autoload_disabled_values(value: str, disabled: bool) -> None:
    assert _autoload.autoload_disabled({DISABLE: value}) is disabled


# ------------------------------------------------- installed package, fresh interpreter


def test_pth_installed_in_a_site_directory(installed: Path, workdir: Path) -> None:
    proc = run_python("import sys, json; print(json.dumps(sys.path))", workdir)
    on_path = {Path(p).resolve() for p in json.loads(proc.stdout) if p}
    assert installed.parent.resolve() in on_path


def test_startup_installs_hook_without_heavy_imports(installed: Path, workdir: Path) -> None:
    report = last_json(
        run_python(
            PRELUDE + f"print(json.dumps({{'heavy': [m for m in {HEAVY!r} if m in sys.modules],"
            " 'hooks': hooks(), 'first': type(sys.meta_path[0]).__name__}))",
            workdir,
        )
    )
    assert report["heavy"] == []
    assert report["hooks"] == ["PostImportHook"]
    assert report["first"] == "PostImportHook"


@pytest.fixture(scope="module")
def stock_session(installed: Path, workdir: Path) -> dict:
    """What a user's plain ``import mergekit.scripts.run_yaml`` ends up with."""
    return last_json(
        run_python(
            PRELUDE
            + """
import mergekit.scripts.run_yaml as run_yaml
import mergekit.merge
import mergekit.merge_methods as mm
names = [m.spec.name for m in mm.registered_methods()]
try:
    ties = mm.get("sparsegpt_ties").spec.name
    dare = mm.get("sparsegpt_dare").spec.name
except Exception as exc:
    ties = dare = repr(exc)
print(json.dumps({
    "ties": ties, "dare": dare,
    "name_counts": [names.count(n) for n in ("sparsegpt_ties", "sparsegpt_dare", "regmean",
                                              "sparsegpt_regmean")],
    "wrapped": getattr(mergekit.merge.run_merge, "__mergekit_sparsegpt_wrapped__", False),
    "run_yaml_bound_wrapper": run_yaml.run_merge is mergekit.merge.run_merge,
    "hooks_left": hooks(),
    "warnings": our_warnings(),
}))
""",
            workdir,
        )
    )


def test_methods_registered_without_explicit_import(stock_session: dict) -> None:
    # Needs mergekit_sparsegpt.methods.registry.PLUGIN_METHODS.
    assert stock_session["warnings"] == []
    assert (stock_session["ties"], stock_session["dare"]) == ("sparsegpt_ties", "sparsegpt_dare")
    assert stock_session["name_counts"] == [1, 1, 1, 1]


def test_run_merge_wrapped_where_run_yaml_binds_it(stock_session: dict) -> None:
    assert stock_session["wrapped"] is True
    assert stock_session["run_yaml_bound_wrapper"] is True


def test_hook_removes_itself_once_both_fired(stock_session: dict) -> None:
    assert stock_session["hooks_left"] == []


def test_opt_out_leaves_mergekit_untouched(installed: Path, workdir: Path) -> None:
    report = last_json(
        run_python(
            PRELUDE
            + """
ours_at_start = sorted(m for m in sys.modules if m.startswith("mergekit_sparsegpt"))
hooks_at_start = hooks()
import mergekit.merge
import mergekit.merge_methods as mm
try:
    mm.get("sparsegpt_ties")
    raised = None
except Exception as exc:
    raised = type(exc).__name__
print(json.dumps({
    "ours_at_start": ours_at_start, "hooks": hooks_at_start, "raised": raised,
    "wrapped": getattr(mergekit.merge.run_merge, "__mergekit_sparsegpt_wrapped__", False),
}))
""",
            workdir,
            env=_clean_env(**{DISABLE: "1"}),
        )
    )
    assert report == {"ours_at_start": [], "hooks": [], "raised": "RuntimeError", "wrapped": False}


BREAK_CALLBACKS = """
from mergekit_sparsegpt.integration import registration
def broken_register():
    raise RuntimeError("simulated register failure")
def broken_wrap(module):
    raise RuntimeError("simulated wrap failure")
registration.register_methods = broken_register
registration.wrap_run_merge = broken_wrap
"""


def test_broken_callbacks_warn_but_import_succeeds(installed: Path, workdir: Path) -> None:
    report = last_json(
        run_python(
            PRELUDE
            + BREAK_CALLBACKS
            + """
import mergekit.scripts.run_yaml
import mergekit.merge_methods as mm
print(json.dumps({"ties": mm.get("ties").spec.name, "warnings": our_warnings(),
                  "hooks": hooks()}))
""",
            workdir,
        )
    )
    assert report["ties"] == "ties"  # mergekit itself works
    assert report["hooks"] == []
    messages = report["warnings"]
    assert len(messages) == 2, messages
    assert "simulated register failure" in messages[0]
    assert "simulated wrap failure" in messages[1]
    assert all(DISABLE in message for message in messages)


def test_broken_callbacks_with_warnings_as_errors(installed: Path, workdir: Path) -> None:
    proc = run_python(
        BREAK_CALLBACKS
        + """
import warnings
warnings.simplefilter("error")
import mergekit.merge_methods as mm
print("imported", mm.get("ties").spec.name)
""",
        workdir,
    )
    assert "imported ties" in proc.stdout
    assert "simulated register failure" in proc.stderr
    assert DISABLE in proc.stderr


def test_installing_twice_registers_once(installed: Path, workdir: Path) -> None:
    report = last_json(
        run_python(
            PRELUDE
            + """
from mergekit_sparsegpt import _autoload
from mergekit_sparsegpt.integration import registration
calls = []
registration.register_methods = lambda: calls.append("register")
registration.wrap_run_merge = lambda module: calls.append("wrap")
again = [_autoload.install_import_hook(), _autoload.install_import_hook()]
n_hooks = len(hooks())
import mergekit.scripts.run_yaml
after = _autoload.install_import_hook()
print(json.dumps({"again": again, "n_hooks": n_hooks, "after": after, "calls": calls,
                  "hooks_left": hooks(), "warnings": our_warnings()}))
""",
            workdir,
        )
    )
    assert report == {
        "again": [True, True],
        "n_hooks": 1,
        "after": False,
        "calls": ["register", "wrap"],
        "hooks_left": [],
        "warnings": [],
    }


def test_install_after_mergekit_imported_fires_at_once(installed: Path, workdir: Path) -> None:
    report = last_json(
        run_python(
            PRELUDE
            + f"""
import os
import mergekit.merge
import mergekit.merge_methods
from mergekit_sparsegpt import _autoload
from mergekit_sparsegpt.integration import registration
calls = []
registration.register_methods = lambda: calls.append("register")
os.environ.pop({DISABLE!r})
installed = _autoload.install_import_hook()
print(json.dumps({{"installed": installed, "calls": calls, "hooks": hooks(),
    "wrapped": getattr(mergekit.merge.run_merge, "__mergekit_sparsegpt_wrapped__", False)}}))
""",
            workdir,
            env=_clean_env(**{DISABLE: "1"}),
        )
    )
    assert report == {"installed": False, "calls": ["register"], "hooks": [], "wrapped": True}


def test_registration_retried_when_mergekit_merge_was_mid_import(
    installed: Path, workdir: Path
) -> None:
    """``mergekit.merge`` imports ``mergekit.merge_methods`` halfway through its own body."""
    report = last_json(
        run_python(
            PRELUDE
            + """
from mergekit_sparsegpt.integration import registration
attempts = []
def register_needing_merge():
    merge = sys.modules.get("mergekit.merge")
    ready = merge is None or hasattr(merge, "run_merge")
    attempts.append(ready)
    if not ready:
        raise ImportError("cannot import name 'run_merge' from partially initialized module")
registration.register_methods = register_needing_merge
import mergekit.scripts.run_yaml
print(json.dumps({"attempts": attempts, "warnings": our_warnings()}))
""",
            workdir,
        )
    )
    assert report == {"attempts": [False, True], "warnings": []}


@pytest.mark.parametrize(
    "first",
    [
        # Every module of methods/ (they import mergekit.merge_methods), the first module of
        # each layer above that reads them, and trim/ below them (it must not start mergekit's).
        "methods.base",
        "methods.context",
        "methods.parameters",
        "methods.registry",
        "methods.regmean",
        "methods.sparsegpt",
        "reporting.model_card",
        "reporting.run_report",
        "prepass.validate",
        "prepass.merged_source",
        "prepass.run",
        "integration.registration",
        "integration.cli",
        "trim.trim",
    ],
)
def test_methods_registered_when_our_module_is_imported_first(
    installed: Path, workdir: Path, first: str
) -> None:
    """Registration never meets one of our modules half-executed, whichever comes first."""
    report = last_json(
        run_python(
            PRELUDE
            + f"""
import mergekit_sparsegpt.{first}
import mergekit.merge_methods as mm
names = [m.spec.name for m in mm.registered_methods()]
print(json.dumps({{
    "counts": [names.count(n) for n in ("sparsegpt_ties", "sparsegpt_dare", "regmean",
                                         "sparsegpt_regmean")],
    "warnings": our_warnings(),
}}))
""",
            workdir,
        )
    )
    assert report == {"counts": [1, 1, 1, 1], "warnings": []}
