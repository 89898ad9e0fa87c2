"""Console scripts ``mergekit-sparsegpt-yaml`` and ``mergekit-sparsegpt`` (merge, calibrate).

Help-text and entry-point tests run the installed console scripts in fresh interpreters (they
skip when this checkout is not installed, and fail under ``CI``). ``calibrate`` is tested
in-process with the pre-pass and the registration replaced by recorders.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_sparsegpt import _autoload
from mergekit_sparsegpt.integration import cli, registration

REPO = Path(__file__).resolve().parents[2]
DISABLE = _autoload.DISABLE_ENV_VAR
SCRIPTS = ("mergekit-sparsegpt", "mergekit-sparsegpt-yaml")

CONFIG_YAML = """\
merge_method: sparsegpt_ties
base_model: org/base
models:
  - model: org/finetuned
    parameters:
      weight: 1.0
      density: 0.5
dtype: float32
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != DISABLE}
    env.update(extra)
    return env


def _run(
    argv: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=cwd,
        env=_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _script_problem() -> str | None:
    try:
        dist = importlib.metadata.distribution("mergekit-sparsegpt")
    except importlib.metadata.PackageNotFoundError:
        return "mergekit-sparsegpt is not installed; run `pip install -e .`"
    declared = {ep.name for ep in dist.entry_points if ep.group == "console_scripts"}
    if not set(SCRIPTS) <= declared:
        return f"the installed metadata declares {sorted(declared)}, not {SCRIPTS}; reinstall"
    location = Path(dist.locate_file("mergekit_sparsegpt/__init__.py"))
    proc = _run(
        [sys.executable, "-c", "import mergekit_sparsegpt as m; print(m.__file__)"],
        Path(sysconfig.get_path("scripts")),
        env=_env(**{DISABLE: "1"}),
    )
    imported = Path(proc.stdout.strip()).resolve().parent if proc.returncode == 0 else None
    if imported != REPO / "mergekit_sparsegpt":
        return f"the installed package ({imported or location}) is not this checkout; reinstall"
    return None


def _script(name: str) -> str:
    for directory in (sysconfig.get_path("scripts"), Path(sys.executable).parent):
        candidate = Path(directory) / name
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"console script {name} not found next to {sys.executable}")
    return found


@pytest.fixture(scope="module")
def scripts() -> dict[str, str]:
    problem = _script_problem()
    if problem is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must test the installed console scripts: {problem}")
        pytest.skip(problem)
    return {name: _script(name) for name in SCRIPTS}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-cwd")


def _normalized_help(text: str) -> str:
    """Help text with the program name in the usage line replaced by PROG."""
    first, _, rest = text.partition("\n")
    assert first.startswith("Usage: "), text
    usage = re.sub(r"^Usage: .*? \[OPTIONS\]", "Usage: PROG [OPTIONS]", first)
    return f"{usage}\n{rest}"


def _options(text: str) -> set[str]:
    """Option flags in a help text (its usage line left out)."""
    body = text.partition("\n")[2]
    return set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", body))


@pytest.fixture(scope="module")
def mergekit_yaml_help(workdir: Path) -> str:
    proc = _run(
        [sys.executable, "-m", "mergekit.scripts.run_yaml", "--help"],
        workdir,
        env=_env(**{DISABLE: "1"}),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ------------------------------------------------------------------- help and entry points


def test_yaml_script_help_identical_to_mergekit_yaml(
    scripts: dict[str, str], workdir: Path, mergekit_yaml_help: str
) -> None:
    proc = _run([scripts["mergekit-sparsegpt-yaml"], "--help"], workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: mergekit-sparsegpt-yaml [OPTIONS] CONFIG_FILE OUT_PATH")
    assert _normalized_help(proc.stdout) == _normalized_help(mergekit_yaml_help)
    assert {"--cuda", "--lazy-unpickle", "--out-shard-size", "-v"} <= _options(proc.stdout)


def test_merge_subcommand_help_identical_to_mergekit_yaml(
    scripts: dict[str, str], workdir: Path, mergekit_yaml_help: str
) -> None:
    proc = _run([scripts["mergekit-sparsegpt"], "merge", "--help"], workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: mergekit-sparsegpt merge [OPTIONS] CONFIG_FILE OUT_PATH")
    assert _normalized_help(proc.stdout) == _normalized_help(mergekit_yaml_help)


def test_calibrate_help_takes_config_and_merge_flags(
    scripts: dict[str, str], workdir: Path, mergekit_yaml_help: str
) -> None:
    proc = _run([scripts["mergekit-sparsegpt"], "calibrate", "--help"], workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: mergekit-sparsegpt calibrate [OPTIONS] CONFIG_FILE\n")
    assert "OUT_PATH" not in proc.stdout
    assert _options(proc.stdout) == _options(mergekit_yaml_help) | {"--export"}


def test_group_help_lists_commands_without_importing_torch(
    scripts: dict[str, str], workdir: Path
) -> None:
    proc = _run([scripts["mergekit-sparsegpt"], "--help"], workdir)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\s+merge\s+\S", proc.stdout, re.MULTILINE)
    assert re.search(r"^\s+calibrate\s+\S", proc.stdout, re.MULTILINE)

    probe = _run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom mergekit_sparsegpt.integration import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit as exc:\n    code = exc.code\n"
            "print('RESULT', code, [m for m in ('torch', 'mergekit') if m in sys.modules])",
        ],
        workdir,
    )
    assert "RESULT 0 []" in probe.stdout, probe.stdout + probe.stderr


def test_unknown_subcommand_is_usage_error(scripts: dict[str, str], workdir: Path) -> None:
    proc = _run([scripts["mergekit-sparsegpt"], "no-such-command"], workdir)
    assert proc.returncode == 2
    assert "No such command" in proc.stderr


def test_yaml_script_wraps_run_merge_when_autoload_is_off(workdir: Path) -> None:
    """The fallback for ``python -S`` / disabled .pth: run_yaml must bind the wrapper."""
    code = textwrap.dedent(
        """
        import json, sys
        from mergekit_sparsegpt.integration import cli
        from mergekit_sparsegpt.integration import registration
        calls = []
        registration.register_methods = lambda: calls.append("register")
        hook_at_start = any(getattr(f, "__mergekit_sparsegpt_import_hook__", False)
                            for f in sys.meta_path)
        try:
            cli.yaml_main(["--help"])
        except SystemExit as exc:
            code = exc.code
        import mergekit.merge
        run_yaml = sys.modules["mergekit.scripts.run_yaml"]
        print(json.dumps({
            "code": code, "hook_at_start": hook_at_start, "calls": calls,
            "bound": run_yaml.run_merge is mergekit.merge.run_merge,
            "wrapped": getattr(run_yaml.run_merge, "__mergekit_sparsegpt_wrapped__", False),
        }))
        """
    )
    # The checkout goes first on the path, so this runs installed or not.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = _run([sys.executable, "-c", code], workdir, env=_env(PYTHONPATH=path, **{DISABLE: "1"}))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {
        "code": 0,
        "hook_at_start": False,
        "calls": ["register"],
        "bound": True,
        "wrapped": True,
    }


# --------------------------------------------------------------- calibrate, in-process


@pytest.fixture
def recorders(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replace registration.install, the pre-pass and the global side effects with recorders.

    ``MergeOptions.apply_global_options`` would set torch thread counts, RNG seeds and logging
    for the whole test process, so it is recorded instead of run.
    """
    from mergekit.options import MergeOptions

    events: list[tuple] = []
    behaviour: dict = {"raise": None}

    def apply_global_options(self) -> None:
        events.append(("apply", self))

    def install() -> None:
        events.append(("install",))

    def prepare_statistics(merge_config, options, ranks):
        assert ranks.world_size == 1  # not under torchrun
        events.append(("prepare", merge_config, options))
        if behaviour["raise"] is not None:
            raise behaviour["raise"]
        return types.SimpleNamespace(tasks={"task-a": None, "task-b": None}, merged=None)

    def export_statistics(merge_config, options, directory, ranks):
        assert ranks.world_size == 1
        events.append(("export", merge_config, options, directory))
        return [Path(directory) / "finetuned"]

    fake_prepass = types.ModuleType("mergekit_sparsegpt.prepass.run")
    fake_prepass.prepare_statistics = prepare_statistics
    monkeypatch.setitem(sys.modules, "mergekit_sparsegpt.prepass.run", fake_prepass)
    fake_export = types.ModuleType("mergekit_sparsegpt.prepass.export_folders")
    fake_export.export_statistics = export_statistics
    monkeypatch.setitem(sys.modules, "mergekit_sparsegpt.prepass.export_folders", fake_export)
    monkeypatch.setattr(registration, "install", install)
    monkeypatch.setattr(MergeOptions, "apply_global_options", apply_global_options)
    return {"events": events, "behaviour": behaviour}


def _calibrate(args: list[str]):
    return CliRunner().invoke(cli._group(), ["calibrate", *args], prog_name="mergekit-sparsegpt")


def test_calibrate_builds_config_and_options(tmp_path: Path, recorders: dict) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    config = tmp_path / "merge.yml"
    config.write_text(CONFIG_YAML, encoding="utf-8")

    result = _calibrate([str(config), "--lazy-unpickle", "--random-seed", "7", "-j", "2"])

    assert result.exit_code == 0, result.output
    events = recorders["events"]
    assert [event[0] for event in events] == ["apply", "install", "prepare"]
    _, merge_config, options = events[2]
    assert events[0][1] is options  # global options applied from the same MergeOptions
    assert isinstance(merge_config, MergeConfiguration)
    assert merge_config.merge_method == "sparsegpt_ties"
    assert [str(m.model) for m in merge_config.models] == ["org/finetuned"]
    assert isinstance(options, MergeOptions)
    assert (options.lazy_unpickle, options.random_seed, options.num_threads) == (True, 7, 2)
    assert options.device == "cpu"
    assert "2 task(s)" in result.stderr


def test_calibrate_export_writes_folders_instead_of_only_the_cache(
    tmp_path: Path, recorders: dict
) -> None:
    config = tmp_path / "merge.yml"
    config.write_text(CONFIG_YAML, encoding="utf-8")

    result = _calibrate([str(config), "--export", str(tmp_path / "shared"), "--lazy-unpickle"])

    assert result.exit_code == 0, result.output
    events = recorders["events"]
    assert [event[0] for event in events] == ["apply", "install", "export"]
    _, merge_config, options, directory = events[2]
    assert merge_config.merge_method == "sparsegpt_ties" and options.lazy_unpickle
    assert directory == str(tmp_path / "shared")
    assert f"Statistics of 1 model(s) exported to {tmp_path / 'shared'}." in result.stderr


def test_calibrate_quiet_prints_nothing(tmp_path: Path, recorders: dict) -> None:
    config = tmp_path / "merge.yml"
    config.write_text(CONFIG_YAML, encoding="utf-8")
    result = _calibrate([str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output == ""


def test_calibrate_user_error_is_one_line_exit_2(tmp_path: Path, recorders: dict) -> None:
    config = tmp_path / "merge.yml"
    config.write_text(CONFIG_YAML, encoding="utf-8")
    recorders["behaviour"]["raise"] = ValueError("calibration source 'x.jsonl' has no text")

    result = _calibrate([str(config)])

    assert result.exit_code == 2
    assert result.stderr == "Error: calibration source 'x.jsonl' has no text\n"
    assert "Traceback" not in result.output


def test_calibrate_cache_write_error_is_one_line_exit_2(tmp_path: Path, recorders: dict) -> None:
    from mergekit_sparsegpt.statistics.cache_dir import CacheWriteError

    config = tmp_path / "merge.yml"
    config.write_text(CONFIG_YAML, encoding="utf-8")
    recorders["behaviour"]["raise"] = CacheWriteError("Could not write the statistics cache")

    result = _calibrate([str(config)])

    assert result.exit_code == 2
    assert result.stderr == "Error: Could not write the statistics cache\n"


def test_calibrate_missing_config_file(tmp_path: Path, recorders: dict) -> None:
    result = _calibrate([str(tmp_path / "missing.yml")])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ")
    assert "missing.yml" in result.stderr
    assert "prepare" not in [event[0] for event in recorders["events"]]


def test_calibrate_invalid_config_is_user_error(tmp_path: Path, recorders: dict) -> None:
    config = tmp_path / "merge.yml"
    config.write_text("merge_method: sparsegpt_ties\nmodels: 3\n", encoding="utf-8")
    result = _calibrate([str(config)])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.output


def test_calibrate_unexpected_error_is_not_swallowed(tmp_path: Path, recorders: dict) -> None:
    config = tmp_path / "merge.yml"
    config.write_text(CONFIG_YAML, encoding="utf-8")
    recorders["behaviour"]["raise"] = RuntimeError("a bug")
    result = _calibrate([str(config)])
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


def test_calibrate_requires_config_argument(recorders: dict) -> None:
    result = _calibrate([])
    assert result.exit_code == 2
    assert "Missing argument 'CONFIG_FILE'" in result.stderr
    assert recorders["events"] == []


def test_yaml_main_missing_config_is_one_line_exit_2(
    tmp_path: Path, recorders: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.yaml_main([str(tmp_path / "missing.yml"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "missing.yml" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert [event[0] for event in recorders["events"]] == ["install", "apply"]


# ---------------------------------------------------------------------- end to end


def _tiny_llama(path: Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)


def test_yaml_script_runs_a_stock_merge(
    scripts: dict[str, str], tmp_path: Path, workdir: Path
) -> None:
    """A non-sparsegpt method passes through the wrapped run_merge unchanged.

    Needs mergekit_sparsegpt.methods.registry.is_plugin_method (called by the wrapper).
    """
    from safetensors.torch import load_file

    _tiny_llama(tmp_path / "a", seed=0)
    _tiny_llama(tmp_path / "b", seed=1)
    config = tmp_path / "linear.yml"
    config.write_text(
        textwrap.dedent(
            f"""\
            merge_method: linear
            models:
              - model: {tmp_path / "a"}
                parameters: {{weight: 0.5}}
              - model: {tmp_path / "b"}
                parameters: {{weight: 0.5}}
            dtype: float32
            """
        ),
        encoding="utf-8",
    )
    out = tmp_path / "out"
    proc = _run(
        [scripts["mergekit-sparsegpt-yaml"], str(config), str(out), "--no-copy-tokenizer"],
        workdir,
        env=_env(HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    def tensors(directory: Path) -> dict:
        merged = {}
        for file in sorted(directory.glob("*.safetensors")):
            merged.update(load_file(file))
        return merged

    a, b, merged = tensors(tmp_path / "a"), tensors(tmp_path / "b"), tensors(out)
    name = "model.layers.0.mlp.down_proj.weight"
    assert name in merged
    assert ((merged[name] - (a[name] + b[name]) / 2).abs().max()) < 1e-6
