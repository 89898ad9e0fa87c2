"""The merge is written beside OUT and becomes OUT only when whole; nothing else is touched."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mergekit_sparsegpt.prepass import staged_output
from mergekit_sparsegpt.prepass.staged_output import (
    OutputError,
    begin,
    discard,
    publish,
    resolved_output,
)


def _merge_files(directory: Path, marker: str) -> Path:
    """What a finished merge leaves: a config and weights (``marker`` tells runs apart)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(marker)
    (directory / "model.safetensors").write_text(marker)
    return directory


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


def _stage(out: Path) -> staged_output.StagedOutput:
    return begin(resolved_output(str(out), []), lambda message: None)


def test_a_failing_run_leaves_another_runs_finished_merge(tmp_path):
    out = tmp_path / "out"
    b = _stage(out)  # B starts first, into an OUT that does not exist
    a = _stage(out)
    _merge_files(a.path, "A")
    publish(a, print)
    _merge_files(b.path, "B-partial")
    discard(b)  # B fails (or gets Ctrl-C)
    assert (out / "config.json").read_text() == "A"
    assert _leftovers(tmp_path) == []


def test_a_run_finishing_after_another_keeps_both(tmp_path):
    out = tmp_path / "out"
    b, a = _stage(out), _stage(out)
    _merge_files(a.path, "A")
    publish(a, print)
    _merge_files(b.path, "B")
    with pytest.raises(OutputError, match="written by another run while this merge ran") as err:
        publish(b, print)
    assert (out / "config.json").read_text() == "A"
    assert str(b.path) in str(err.value)
    assert (b.path / "config.json").read_text() == "B"


def test_a_previous_merge_is_replaced_whole_only_at_the_end(tmp_path):
    out = _merge_files(tmp_path / "out", "old")
    (out / "model-00002-of-00002.safetensors").write_text("old shard")
    run = _stage(out)
    _merge_files(run.path, "new")
    assert (out / "config.json").read_text() == "old"  # untouched while the merge runs
    said: list[str] = []
    publish(run, said.append)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "config.json").read_text() == "new"
    assert said == [f"Replaced the previous merge in {out}."]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("start", ["empty", "a previous merge"])
def test_files_that_came_into_out_during_the_run_are_never_replaced(tmp_path, start):
    """Say cache_dir is OUT: the run writes its cache entries there, and a replacement of OUT
    would delete them."""
    out = tmp_path / "out"
    out.mkdir()
    if start == "a previous merge":
        _merge_files(out, "old")
    run = _stage(out)
    (out / "0123abcd.safetensors").write_text("a cache entry")
    (out / "0123abcd.lock").write_text("")
    _merge_files(run.path, "new")
    with pytest.raises(OutputError, match=r"now holds 0123abcd\.lock, which no merge writes"):
        publish(run, print)
    assert (out / "0123abcd.safetensors").read_text() == "a cache entry"
    assert (run.path / "config.json").read_text() == "new"


def test_a_failed_run_removes_only_what_it_made(tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    run = _stage(out)
    _merge_files(run.path, "partial")
    discard(run)
    assert not (tmp_path / "new").exists()
    previous = _merge_files(tmp_path / "kept", "old")
    run = _stage(previous)
    discard(run)
    assert (previous / "config.json").read_text() == "old"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["the model", "a parent of the model"])
def test_an_input_model_is_never_the_output(tmp_path, where):
    model = _merge_files(tmp_path / "models" / "base", "weights")
    out = model if where == "the model" else model.parent
    verb = "is" if where == "the model" else "holds"
    with pytest.raises(OutputError, match=f"^Output directory {out} {verb} the input model"):
        resolved_output(str(out), [str(model)])
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(OutputError, match="the merge would overwrite it"):
        resolved_output(str(link), [str(model)])


def test_an_output_that_is_a_file_or_holds_other_data_is_refused(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(OutputError, match="is an existing file, not a directory"):
        resolved_output(str(a_file), [])
    with pytest.raises(OutputError, match="Cannot write the output directory"):
        _stage(a_file / "out")
    data = tmp_path / "data"
    (data / "photos").mkdir(parents=True)
    with pytest.raises(OutputError, match=r"holds photos/, which no merge writes: only an empty"):
        resolved_output(str(data), [])
    (data / "photos").rmdir()
    _merge_files(data, "old")
    (data / "thesis.tex").write_text("mine")
    with pytest.raises(OutputError, match=r"holds thesis\.tex, which no merge writes"):
        resolved_output(str(data), [])
    (data / "thesis.tex").unlink()
    (data / "config.json").unlink()
    with pytest.raises(OutputError, match=r"holds model\.safetensors, which no merge writes"):
        resolved_output(str(data), [])
    (data / "model.safetensors").unlink()
    assert resolved_output(str(data), []) == data.resolve()  # an empty directory is fine


def test_the_current_directory_is_never_the_output(tmp_path, monkeypatch):
    inner = _merge_files(tmp_path / "out", "old") / "sub"
    inner.mkdir()
    monkeypatch.chdir(inner)
    with pytest.raises(OutputError, match="holds\\) the current directory"):
        resolved_output(str(tmp_path / "out"), [])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_parent_is_refused_before_any_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputError, match="Cannot write the output directory .*Permission denied"):
        _stage(locked / "out")


def test_directories_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    prefix = staged_output._partial_prefix(out.resolve())
    dead = tmp_path / f"{prefix}{gone.stdout.strip()}-abc"
    live = tmp_path / f"{prefix}{os.getpid()}-def"
    other_host = tmp_path / f".out.partial-elsewhere-{gone.stdout.strip()}-ghi"
    for directory in (dead, live, other_host):
        _merge_files(directory / "out", "partial")
    said: list[str] = []
    run = begin(resolved_output(str(out), []), said.append)
    discard(run)
    assert not dead.exists() and live.exists() and other_host.exists()
    assert said == [
        f"Removing {dead}, left by an earlier merge into {out.resolve()} that was killed."
    ]


# A stock `mergekit-yaml` run that pauses after writing its first tensor until the test stops it:
# the point where a run used to leave a partial OUT.
_PAUSED_MERGE = """
import os, sys, time
import mergekit.io.tensor_writer as tensor_writer
from mergekit.scripts.run_yaml import main

original = tensor_writer.TensorWriter.save_tensor

def paused(self, *args, **kwargs):
    original(self, *args, **kwargs)
    open(os.environ["PAUSED"], "w").close()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # until the test stops it
        time.sleep(0.05)

tensor_writer.TensorWriter.save_tensor = paused
sys.argv = ["mergekit-yaml", *sys.argv[1:]]
main()
"""


def _environment(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "MERGEKIT_SPARSEGPT_CACHE": str(tmp_path / "cache")}
    env.pop("MERGEKIT_SPARSEGPT_DISABLE_AUTOLOAD", None)
    return {**env, "PAUSED": str(tmp_path / "paused")}


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the paused merge never wrote a tensor"
        time.sleep(0.05)


def test_a_stopped_run_leaves_the_merge_another_run_finished(tiny_models, tmp_path):
    """B starts into OUT and is paused mid-merge; A merges into OUT and finishes; B is then
    stopped by SIGTERM (as timeout, SLURM, docker stop send it). A's merge must be intact, and
    B's partial output gone. (A failure instead of the signal takes the same path: the unit
    tests above.)"""
    from merge_configs import sparsegpt_config

    mergekit_yaml = shutil.which("mergekit-yaml")
    if mergekit_yaml is None:
        pytest.skip("needs the package installed (pip install -e .)")
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(sparsegpt_config(tiny_models)))
    out, env = tmp_path / "out", _environment(tmp_path)
    b = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_MERGE, str(config), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(Path(env["PAUSED"]), b)
        assert not out.exists()  # B's partial merge is not where a user would look
        a = subprocess.run(
            [mergekit_yaml, str(config), str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert a.returncode == 0, a.stderr
        merged = {p.name: p.read_bytes() for p in out.iterdir()}
        b.send_signal(signal.SIGTERM)
        _, b_err = b.communicate(timeout=300)
    finally:
        b.kill()
    assert b.returncode != 0
    expected = f"Merge stopped by SIGTERM; its partial output is removed and {out} is as it was"
    assert expected in b_err, b_err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == merged
    assert _leftovers(tmp_path) == []
    assert "config.json" in merged and "model.safetensors" in merged
