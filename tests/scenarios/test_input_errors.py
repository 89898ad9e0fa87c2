"""Bad inputs around files: a relative cache directory, a FIFO or device where the cache keeps a
file, a damaged weight file, and a write past the file-size limit.

The special-file scenarios run in a child process with a timeout: opening a FIFO blocks until
something writes to it, so a regression would otherwise hang the suite instead of failing it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mergekit.merge
import pytest
import torch
import yaml
from click.testing import CliRunner
from merge_configs import sparsegpt_config
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from statistics_helpers import save_statistics

from mergekit_sparsegpt.capture.weights import (
    CheckpointError,
    checked_weight_index,
    safetensors_header,
)
from mergekit_sparsegpt.integration import cli
from mergekit_sparsegpt.integration.registration import install
from mergekit_sparsegpt.prepass import run as prepass
from mergekit_sparsegpt.prepass import staged_output
from mergekit_sparsegpt.statistics import cache_dir, entries, locking, resumable
from mergekit_sparsegpt.statistics import keys as cache_keys
from mergekit_sparsegpt.statistics.hessian import hessian_statistics
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics

install()

TESTS = Path(__file__).resolve().parent
PAYLOAD = {"format": cache_keys.FORMAT_VERSION, "model": "./m", "tokens": "abc", "dampening": 0.01}
CACHE_VARIABLE = "MERGEKIT_SPARSEGPT_CACHE"
FIFO = r"a FIFO \(named pipe\)"


def _one_expert_config(tiny_models, **shared: Any) -> dict[str, Any]:
    """The arithmetic expert alone: one calibration task, the cheapest pre-pass there is."""
    config = sparsegpt_config(tiny_models, **shared)
    config["models"] = config["models"][:1]
    return config


# --- a relative cache directory ---


def test_a_relative_cache_dir_is_taken_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CACHE_VARIABLE, "stats")
    assert cache_dir.default_cache_dir() == tmp_path / "stats"
    path = cache_keys.cache_path("sub/../cache", PAYLOAD)  # the cache_dir parameter, as written
    assert path.is_absolute() and path.parent == tmp_path / "sub/../cache"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_keys.cache_path("~/c", PAYLOAD).parent == tmp_path / "home/c"


def test_runs_in_two_directories_name_their_own_absolute_entries(
    tiny_models, tmp_path, monkeypatch, capsys
):
    """calibrate and the merge each resolve a relative MERGEKIT_SPARSEGPT_CACHE against their
    own directory: in one directory the second run hits, in another it computes again, and the
    absolute path printed shows which entry a run used."""
    monkeypatch.setenv(CACHE_VARIABLE, "stats")
    config = MergeConfiguration.model_validate(_one_expert_config(tiny_models))

    def prepass_in(directory: Path) -> str:
        directory.mkdir(exist_ok=True)
        monkeypatch.chdir(directory)
        prepass.prepare_statistics(config, MergeOptions())
        return capsys.readouterr().err

    first, other = tmp_path / "first", tmp_path / "other"
    computed = prepass_in(first)
    (entry,) = (first / "stats").glob("*.safetensors")
    model = tiny_models.experts["arithmetic"]
    assert f"Hessian statistics for {model} written to cache {entry}\n" in computed
    hit = prepass_in(first)
    assert f"Hessian statistics for {tiny_models.experts['arithmetic']} from cache {entry}\n" in hit
    assert "from cache" not in prepass_in(other)
    assert [p.name for p in (other / "stats").glob("*.safetensors")] == [entry.name]


# --- something other than a regular file where the cache keeps one ---


def _statistics(keep_hessian: bool = False) -> TaskStatistics:
    task = TaskStatistics.empty("model.layers")
    inputs = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    name = "model.layers.0.mlp.down_proj.weight"
    task.groups[name] = name
    task.statistics[name] = hessian_statistics(
        2 / 20 * inputs.T @ inputs, keep_hessian=keep_hessian
    )
    task.samples[name] = 20
    return task


def _kept_checkpoint(tmp: Path) -> Path:
    """An entry path whose resumable pre-pass was stopped after block 0, with one whole matrix
    streamed and the checkpoint kept."""
    path = tmp / "entry.safetensors"
    with contextlib.suppress(KeyboardInterrupt):
        with resumable.EntryWriter(path, PAYLOAD, resumable=True) as writer:
            writer.add("model.layers.0.mlp.down_proj.weight::hessian", torch.eye(4))
            writer.save_checkpoint(1, TaskStatistics.empty("model.layers"), torch.zeros(3, 5, 4))
            raise KeyboardInterrupt  # Ctrl-C keeps the checkpoint
    return path


def _warnings_while(action: Callable[[], Any]) -> str:
    """The cache's warnings logged while ``action`` runs."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    cache_dir.LOG.addHandler(handler)
    try:
        action()
    finally:
        cache_dir.LOG.removeHandler(handler)
    return "\n".join(records)


def _error_of(action: Callable[[], Any]) -> str:
    try:
        action()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _entry_fifo(tmp: Path) -> str:
    path = cache_keys.cache_path(tmp, PAYLOAD)
    os.mkfifo(path)
    return _error_of(lambda: entries.load_statistics(path, PAYLOAD))


def _entry_link_to_a_device(tmp: Path) -> str:
    path = cache_keys.cache_path(tmp, PAYLOAD)
    path.symlink_to("/dev/zero")
    return _error_of(lambda: entries.load_statistics(path, PAYLOAD))


def _entry_directory(tmp: Path) -> str:
    path = cache_keys.cache_path(tmp, PAYLOAD)
    path.mkdir()
    return _error_of(lambda: entries.load_statistics(path, PAYLOAD))


def _entry_replaced_by_a_fifo_during_the_merge(tmp: Path) -> str:
    path = cache_keys.cache_path(tmp, PAYLOAD)
    save_statistics(path, _statistics(keep_hessian=True), PAYLOAD)
    loaded = entries.read_statistics(path, PAYLOAD)
    path.unlink()
    os.mkfifo(path)
    return _error_of(lambda: loaded.for_weight("model.layers.0.mlp.down_proj.weight"))


def _checkpoint_file_fifo(name: str) -> Callable[[Path], str]:
    """A kept checkpoint whose file ``name`` is swapped for a FIFO."""

    def scenario(tmp: Path) -> str:
        path = _kept_checkpoint(tmp)
        swapped = cache_keys.checkpoint_dir(path) / name
        swapped.unlink()
        os.mkfifo(swapped)
        return _warnings_while(lambda: _starts_afresh(path))

    return scenario


def _starts_afresh(path: Path) -> None:
    with resumable.EntryWriter(path, PAYLOAD, resumable=True) as writer:
        assert writer.take_resume_point() is None, "the checkpoint was resumed"
        checkpoint = cache_keys.checkpoint_dir(path)
        assert list(checkpoint.iterdir()) == [checkpoint / "matrices"]


def _resumed(
    path: Path, leftover: str, finish: Callable[[resumable.EntryWriter, Any], None]
) -> str:
    """Resume ``path``'s checkpoint with a FIFO at its scratch name ``leftover``, then finish."""
    os.mkfifo(cache_keys.checkpoint_dir(path) / leftover)
    with resumable.EntryWriter(path, PAYLOAD, resumable=True) as writer:
        point = writer.take_resume_point()
        assert point is not None, "the checkpoint was not resumed"
        finish(writer, point)
    return "done"


def _checkpoint_entry_partial_fifo(tmp: Path) -> str:
    path = _kept_checkpoint(tmp)
    _resumed(path, "entry.partial", lambda writer, point: writer.commit(point.statistics))
    return f"entry holds {sorted(load_file(path))}"


def _checkpoint_state_partial_fifo(tmp: Path) -> str:
    path = _kept_checkpoint(tmp)

    def again(writer: resumable.EntryWriter, point: Any) -> None:
        writer.save_checkpoint(2, point.statistics, point.activations)
        raise KeyboardInterrupt  # keep the checkpoint just written

    with contextlib.suppress(KeyboardInterrupt):
        _resumed(path, "state.safetensors.partial", again)
    with resumable.EntryWriter(path, PAYLOAD, resumable=True) as writer:
        return f"resumes at block {writer.take_resume_point().next_block}"


def _checkpoint_directory_fifo(tmp: Path) -> str:
    path = tmp / "entry.safetensors"
    os.mkfifo(cache_keys.checkpoint_dir(path))
    return _error_of(lambda: resumable.EntryWriter(path, PAYLOAD, resumable=True))


def _lock_fifo(tmp: Path) -> str:
    path = tmp / "entry.safetensors"
    os.mkfifo(cache_keys.lock_path(path))
    with locking.entry_lock(path):
        pass
    return f"locked; lock file left: {cache_keys.lock_path(path).exists()}"


def _weight_shard_fifo(tmp: Path) -> str:
    shard = tmp / "model-00001-of-00002.safetensors"
    os.mkfifo(shard)
    return _error_of(lambda: safetensors_header(str(shard)))


def _single_weight_file_fifo(tmp: Path) -> str:
    from mergekit.common import ModelReference

    (tmp / "config.json").write_text("{}")
    os.mkfifo(tmp / "model.safetensors")
    return _error_of(lambda: checked_weight_index(ModelReference.parse(str(tmp))))


SCENARIOS: dict[str, Callable[[Path], str]] = {
    "entry FIFO": _entry_fifo,
    "entry link to /dev/zero": _entry_link_to_a_device,
    "entry directory": _entry_directory,
    "entry replaced by a FIFO during the merge": _entry_replaced_by_a_fifo_during_the_merge,
    "checkpoint state FIFO": _checkpoint_file_fifo("state.safetensors"),
    "checkpoint matrices FIFO": _checkpoint_file_fifo("matrices"),
    "checkpoint entry.partial FIFO": _checkpoint_entry_partial_fifo,
    "checkpoint state.safetensors.partial FIFO": _checkpoint_state_partial_fifo,
    "checkpoint directory FIFO": _checkpoint_directory_fifo,
    "lock FIFO": _lock_fifo,
    "weight shard FIFO": _weight_shard_fifo,
    "single weight file FIFO": _single_weight_file_fifo,
}


def run_scenarios(root: str) -> None:
    """The child's side: each scenario in a directory of its own, one JSON line each."""
    for index, (name, scenario) in enumerate(SCENARIOS.items()):
        print(json.dumps({"started": name}), flush=True)
        directory = Path(root) / str(index)
        directory.mkdir()
        try:
            result = scenario(directory)
        except Exception as error:
            result = f"unexpected {type(error).__name__}: {error}"
        print(json.dumps({"name": name, "result": result, "dir": str(directory)}), flush=True)


@pytest.fixture(scope="module")
def special_files(tmp_path_factory) -> dict[str, tuple[str, Path]]:
    root = tmp_path_factory.mktemp("special_files")
    code = f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(TESTS.parent)!r}]; "
    code += "import test_input_errors as t; "
    code += f"t.run_scenarios({str(root)!r})"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or b""
        text = output.decode() if isinstance(output, bytes) else output
        started = re.findall(r'"started": "([^"]+)"', text)
        pytest.fail(f"hung in the special-file scenario {started[-1] if started else '?'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {line["name"]: (line["result"], Path(line["dir"])) for line in lines if "name" in line}


SPECIAL_FILE_RESULTS = {
    "entry FIFO": r"^CacheFileError: {entry} is " + FIFO + r", not a regular file, so it is not "
    r"read as a statistics cache entry\. Remove it and rerun\.$",
    "entry link to /dev/zero": r"^CacheFileError: {entry} is a symbolic link to /dev/zero, a "
    r"character device, not a regular file, so it is not read as a statistics cache entry\. "
    r"Remove it and rerun\.$",
    "entry directory": r"^CacheFileError: {entry} is a directory, not a regular file",
    "entry replaced by a FIFO during the merge": r"^StoredMatricesError: cache entry {entry} can "
    r"no longer be read \({entry} is " + FIFO + r", not a regular file\)$",
    "checkpoint state FIFO": r"^Discarding pre-pass checkpoint {checkpoint}: "
    r"{checkpoint}/state\.safetensors is " + FIFO + r", not a regular file; starting from the "
    r"first block\.$",
    "checkpoint matrices FIFO": r"^Discarding pre-pass checkpoint {checkpoint}: "
    r"{checkpoint}/matrices is " + FIFO + r", not a regular file; starting from the first "
    r"block\.$",
    "checkpoint entry.partial FIFO": r"^entry holds "
    r"\['model\.layers\.0\.mlp\.down_proj\.weight::hessian'\]$",
    "checkpoint state.safetensors.partial FIFO": r"^resumes at block 2$",
    "checkpoint directory FIFO": r"^CacheFileError: {checkpoint} is not a directory, so it is "
    r"not used as the pre-pass checkpoint of {dir}/entry\.safetensors\. Remove it and rerun\.$",
    "lock FIFO": r"^locked; lock file left: False$",
    "weight shard FIFO": r"^CheckpointError: {dir}/model-00001-of-00002\.safetensors is "
    + FIFO
    + r", not a regular file\. Re-download or re-save the model\.$",
    "single weight file FIFO": r"^CheckpointError: {dir}/model\.safetensors is "
    + FIFO
    + r", not a regular file\. Re-download or re-save the model\.$",
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_special_file_at_a_cache_name_is_refused_or_replaced_without_blocking(
    special_files, name
):
    result, directory = special_files[name]
    names = {
        "dir": directory,
        "entry": cache_keys.cache_path(directory, PAYLOAD),
        "checkpoint": cache_keys.checkpoint_dir(directory / "entry.safetensors"),
    }
    pattern = SPECIAL_FILE_RESULTS[name].format(**{k: re.escape(str(v)) for k, v in names.items()})
    assert re.search(pattern, result), result


# --- a damaged weight file ---


def _half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _garbage_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(b"\xff" * 64 + data[64:])


DAMAGES = {"truncated to half": _half, "empty": _empty, "garbage header": _garbage_header}
DAMAGE_MESSAGES = {
    "truncated to half": r"{file} is truncated: its header describes \d+ bytes, the file has \d+",
    "empty": r"{file} is empty \(0 bytes\)",
    "garbage header": r"{file} is not a safetensors file: its first 8 bytes give a header of "
    r"18446744073709551615 bytes, more than the format's 100000000",
}


def _damaged_copy(tiny_models, tmp: Path, damage: str, sharded: bool) -> tuple[Path, Path]:
    """A copy of the arithmetic expert with one weight file damaged: (model, that file)."""
    model = tmp / "damaged"
    shutil.copytree(tiny_models.experts["arithmetic"], model)
    weights = model / "model.safetensors"
    if sharded:
        weights = _shard_in_two(weights)
    DAMAGES[damage](weights)
    return model, weights


def _shard_in_two(weights: Path) -> Path:
    """Save the checkpoint as two shards with an index, as large models are; the second shard."""
    tensors = load_file(weights)
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for shard, keys in shards.items():
        save_file({key: tensors[key] for key in keys}, weights.parent / shard, {"format": "pt"})
    weight_map = {key: shard for shard, keys in shards.items() for key in keys}
    index = {"metadata": {}, "weight_map": weight_map}
    (weights.parent / "model.safetensors.index.json").write_text(json.dumps(index))
    weights.unlink()
    return weights.parent / "model-00002-of-00002.safetensors"


def _damage_pattern(damage: str, model: Path, file: Path) -> str:
    detail = DAMAGE_MESSAGES[damage].format(file=re.escape(str(file)))
    return rf"^Model {re.escape(str(model))}: {detail}\. Re-download or re-save the model\.$"


@pytest.mark.parametrize("sharded", [False, True], ids=["one file", "sharded"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_weight_file_is_named_before_the_prepass(tiny_models, tmp_path, damage, sharded):
    model, file = _damaged_copy(tiny_models, tmp_path, damage, sharded)
    config = sparsegpt_config(tiny_models, cache_dir=str(tmp_path / "cache"))
    config["models"][0]["model"] = str(model)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as raised:
        mergekit.merge.run_merge(
            MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True)
        )
    assert re.search(_damage_pattern(damage, model, file), str(raised.value)), str(raised.value)
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_calibrate_names_a_damaged_weight_file_in_one_line(
    tiny_models, tmp_path, monkeypatch, damage
):
    # It would set torch's threads and seeds and the logging of the whole test process.
    monkeypatch.setattr(MergeOptions, "apply_global_options", lambda self: None)
    model, file = _damaged_copy(tiny_models, tmp_path, damage, sharded=False)
    config = sparsegpt_config(tiny_models, cache_dir=str(tmp_path / "cache"))
    config["models"][0]["model"] = str(model)
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = CliRunner().invoke(cli._group(), ["calibrate", str(tmp_path / "merge.yml")])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert re.search(_damage_pattern(damage, model, file), line.removeprefix("Error: ")), line
    assert line.startswith("Error: ")


# --- a write past the file-size limit ---


def test_writes_past_the_file_size_limit_are_one_line_each(tiny_models, tmp_path):
    """Under ``ulimit -f`` a write fails with EFBIG (Python ignores SIGXFSZ, which would kill the
    process): the cache entry at 1000 bytes, the merged model (153 kB) at 100000, after the
    cache entries (under 10 kB each) were written."""
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump(sparsegpt_config(tiny_models, cache_dir="cache")))
    runs = [
        (1000, ["calibrate", str(config), "--quiet"]),
        (100_000, ["merge", str(config), str(tmp_path / "out"), "--quiet"]),
    ]
    code = textwrap.dedent(
        f"""
        import resource, sys
        from mergekit_sparsegpt.integration import cli
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        for limit, args in {runs!r}:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
            try:
                cli.main(args)
            except SystemExit as stop:
                print("exit", stop.code, file=sys.stderr, flush=True)
        """
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"status {proc.returncode}: {proc.stderr[-3000:]}"
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("Error:", "exit"))]
    entry = rf"{re.escape(str(tmp_path / 'cache'))}/[0-9a-f]{{64}}\.safetensors"
    assert re.fullmatch(
        rf"Error: Could not write the statistics cache entry {entry} \(File too large\): this "
        r"process may write files of at most 1000 bytes \(ulimit -f\)\. Raise that limit "
        r"\(ulimit -f unlimited\) and rerun\.",
        lines[0],
    ), lines
    assert re.fullmatch(
        rf"Error: Could not write the merged model to {re.escape(str(tmp_path / 'out'))} \(File "
        r"too large\): this process may write files of at most 100000 bytes \(ulimit -f\)\. "
        r"Raise that limit \(ulimit -f unlimited\), or write smaller shards with "
        r"--out-shard-size\.",
        lines[2],
    ), lines
    assert lines[1::2] == ["exit 2", "exit 2"], lines
    assert not (tmp_path / "out").exists()
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # they fit


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), r"\(No space left on device\)\. Free "),
        (
            SafetensorError("Error while serializing: I/O error: File too large (os error 27)"),
            r"\(File too large\): ",
        ),
        (OSError(errno.EACCES, "Permission denied"), None),
        (RuntimeError("a bug"), None),
    ],
    ids=["disk full", "safetensors EFBIG", "other OSError", "not a write"],
)
def test_output_write_errors_are_told_apart(error, expected):
    message = staged_output.write_failure(error, Path("/tmp/out"))
    if expected is None:
        assert message is None
    else:
        message = str(message)
        assert message.startswith("Could not write the merged model to /tmp/out ")
        assert re.search(expected, message), message


def test_python_ignores_sigxfsz():
    """What the EFBIG messages rely on: a write past ``ulimit -f`` fails instead of killing."""
    import signal

    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
