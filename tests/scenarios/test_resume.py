"""Interrupting, resuming and sharing the pre-pass: ``calibrate`` run in subprocesses.

Each run goes through ``DRIVER``, which records the decoder blocks that run forward and can
stop once at a chosen point (printing ``PAUSED``, then reading a line from stdin): the tests
wait for that line, then signal the process or let it go on. Nothing waits on a fixed sleep.
The model has 4 blocks, so a run can be stopped after block 1 with blocks left to resume.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_sparsegpt.demo.build import EXPERTS, Family, write_calibration
from mergekit_sparsegpt.demo.corpus import DOMAINS, domain_texts
from mergekit_sparsegpt.demo.tiny import new_model, save_model, tiny_llama_config, train_tokenizer
from mergekit_sparsegpt.prepass import run as prepass
from mergekit_sparsegpt.prepass import task_statistics
from mergekit_sparsegpt.statistics import entries, resumable
from mergekit_sparsegpt.statistics import keys as cache_keys
from mergekit_sparsegpt.statistics.cache_dir import LOG as CACHE_LOG

REPOSITORY = Path(__file__).resolve().parents[2]
BLOCKS = 4
TIMEOUT = 300  # seconds: only a hung run waits this long

DRIVER = """
import json, os, signal, sys
import transformers.models.llama.modeling_llama as llama
from mergekit_sparsegpt.statistics import resumable
from mergekit_sparsegpt.integration import cli
from mergekit_sparsegpt.prepass import run as prepass
from mergekit_sparsegpt.prepass import task_statistics

# Ctrl-C raises KeyboardInterrupt even where the test runner's process ignores SIGINT (a
# child inherits that, and Python then leaves it ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
events = open(os.environ["TEST_EVENTS"], "a", buffering=1)
pause = os.environ.get("TEST_PAUSE", "")  # "checkpoint:K" or "matrix:K:<linear>"
checkpointed = {}

def record(**event):
    events.write(json.dumps(event) + "\\n")

def stop_once(where):
    global pause
    if pause == where:
        pause = ""
        print("PAUSED " + where, flush=True)
        sys.stdin.readline()

forward = llama.LlamaDecoderLayer.forward
def counted_forward(self, *args, **kwargs):
    record(event="block", index=self.self_attn.layer_idx)
    return forward(self, *args, **kwargs)
llama.LlamaDecoderLayer.forward = counted_forward

compute = task_statistics.compute_statistics
def counted_compute(task, *args, **kwargs):
    record(event="task", model=str(task.key[0]))
    return compute(task, *args, **kwargs)
task_statistics.compute_statistics = counted_compute

save = resumable.EntryWriter.save_checkpoint
def stopping_save(self, next_block, *args, **kwargs):
    size = save(self, next_block, *args, **kwargs)
    checkpointed[id(self)] = next_block
    stop_once(f"checkpoint:{next_block}")
    return size
resumable.EntryWriter.save_checkpoint = stopping_save

add = resumable.EntryWriter.add
def stopping_add(self, name, tensor):  # a matrix of the block after checkpoint K is written
    add(self, name, tensor)
    linear = name.split("::")[0].split(".")[-2]
    stop_once(f"matrix:{checkpointed.get(id(self))}:{linear}")
resumable.EntryWriter.add = stopping_add

cli.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def deep_models(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """A base with 4 random blocks and two experts (base plus noise); seconds to build."""
    root = tmp_path_factory.mktemp("deep_models")
    texts = [text for domain in DOMAINS for text in domain_texts(domain, "train")]
    tokenizer = train_tokenizer(texts, 300)
    config = tiny_llama_config(len(tokenizer), hidden=32, layers=BLOCKS, intermediate=64)
    base = new_model(config, seed=0)
    save_model(base, tokenizer, root / "base")
    generator = torch.Generator().manual_seed(1)
    experts, calibration = {}, {}
    for name, (domain, extension) in EXPERTS.items():
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for parameter in expert.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
        experts[name] = save_model(expert, tokenizer, root / f"expert_{name}")
        calibration[name] = write_calibration(domain, root / f"calibration_{name}.{extension}")
    return Family(root, root / "base", experts, calibration, root / "base")


def _config(models: Family, cache_dir: Path) -> dict:
    """Both experts; ``compensate`` streams whole matrices, which a resume must keep too."""
    return {
        "merge_method": "sparsegpt_ties",
        "base_model": str(models.base),
        "models": [
            {
                "model": str(models.experts[name]),
                "parameters": {
                    "weight": 1.0,
                    "density": 0.3,
                    "calibration": str(models.calibration[name]),
                },
            }
            for name in sorted(models.experts)
        ],
        "parameters": {
            "calibration_samples": 8,
            "calibration_seq_len": 32,
            "compensate": True,
            "cache_dir": str(cache_dir),
        },
        "dtype": "float32",
    }


def _config_file(models: Family, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yml"
    path.write_text(yaml.safe_dump(_config(models, directory / "cache")), encoding="utf-8")
    return path


class Calibration:
    """One ``calibrate`` run of ``config`` through ``DRIVER``, its output read as it comes."""

    def __init__(self, config: Path, name: str, pause: str = "") -> None:
        self.events = config.parent / f"{name}.events"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPOSITORY),
            resumable.CHECKPOINT_OVERHEAD_VARIABLE: "1",  # a checkpoint after every block
            "TEST_EVENTS": str(self.events),
            "TEST_PAUSE": pause,
        }
        for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            env.pop(variable, None)
        self.process = subprocess.Popen(
            [sys.executable, "-c", DRIVER, "calibrate", str(config)],
            cwd=config.parent,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: dict[str, queue.Queue[str | None]] = {
            "stdout": queue.Queue(),
            "stderr": queue.Queue(),
        }
        self._text: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._readers = [
            threading.Thread(target=self._read, args=(name, stream), daemon=True)
            for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str, stream) -> None:
        for line in stream:
            self._text[name].append(line)
            self._lines[name].put(line)
        self._lines[name].put(None)

    @property
    def stderr(self) -> str:
        return "".join(self._text["stderr"])

    def wait_for(self, stream: str, text: str) -> None:
        """Until a line of ``stream`` holds ``text``; fails if the run ends first."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            line = self._lines[stream].get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"the run ended before {text!r}:\n{self.stderr[-3000:]}")
            if text in line:
                return

    def go_on(self) -> None:
        """Let a paused run continue (and any later pause pass at once)."""
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.close()

    def stop(self, signal_number: int) -> int:
        """Signal a paused run and wait for it to exit. Its stdin stays open until then: closed,
        the paused driver could read end-of-file and go on before the signal is handled."""
        self.process.send_signal(signal_number)
        self.process.wait(TIMEOUT)
        return self.finish()

    def finish(self) -> int:
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        returncode = self.process.wait(TIMEOUT)
        for reader in self._readers:
            reader.join(TIMEOUT)
        return returncode

    def blocks_run(self) -> dict[str, list[int]]:
        """Per task (forward model's task model), the blocks that ran forward, in order."""
        runs: dict[str, list[int]] = {}
        current = None
        for line in self.events.read_text().splitlines():
            event = json.loads(line)
            if event["event"] == "task":
                current = Path(event["model"]).name
                runs[current] = []
            else:
                runs[current].append(event["index"])
        return runs


def _entries(cache_dir: Path) -> dict[str, tuple[dict[str, str], dict[str, torch.Tensor]]]:
    entries = {}
    for path in sorted(cache_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
        entries[path.name] = (metadata, load_file(path))
    return entries


def _assert_same_entries(ours: Path, reference: Path) -> None:
    _assert_equal_entries(_entries(ours), _entries(reference))


def _assert_equal_entries(actual: dict, expected: dict) -> None:
    assert len(expected) == 2 and set(actual) == set(expected)
    for name, (metadata, tensors) in expected.items():
        assert actual[name][0] == metadata
        assert set(actual[name][1]) == set(tensors)
        assert any(key.endswith("::cholesky_factor") for key in tensors)
        for key, value in tensors.items():
            torch.testing.assert_close(
                actual[name][1][key], value, msg=lambda message, key=key: f"{key}: {message}"
            )


def _only_entries(cache_dir: Path) -> list[str]:
    return sorted(path.name for path in cache_dir.iterdir())


@pytest.fixture(scope="module")
def reference(deep_models: Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache of an uninterrupted run."""
    config = _config_file(deep_models, tmp_path_factory.mktemp("reference"))
    run = Calibration(config, "reference")
    assert run.finish() == 0, run.stderr[-3000:]
    assert run.blocks_run() == {name: list(range(BLOCKS)) for name in _task_order(deep_models)}
    assert len(_only_entries(config.parent / "cache")) == 2
    return config.parent / "cache"


def _task_order(models: Family) -> list[str]:
    return sorted(path.name for path in models.experts.values())


@pytest.mark.parametrize(
    "signal_number", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["kill", "int", "term"]
)
def test_an_interrupted_prepass_resumes_after_its_last_finished_block(
    deep_models, reference, tmp_path, signal_number
):
    config = _config_file(deep_models, tmp_path)
    cache_dir = tmp_path / "cache"
    first, other = _task_order(deep_models)
    # Stopped while block 2's matrices are being written (down_proj's is the last, and large
    # enough to pass Python's buffer): blocks 0 and 1 are checkpointed.
    interrupted = Calibration(config, "interrupted", pause="matrix:2:down_proj")
    interrupted.wait_for("stdout", "PAUSED matrix:2:down_proj")
    (checkpoint,) = cache_dir.glob("*.checkpoint")
    state = checkpoint / "state.safetensors"
    with safe_open(state, framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["next_block"] == "2"
    recorded = sum(
        torch.empty(shape).numel() * 4 for _, _, shape in json.loads(metadata["matrices"])
    )
    assert (checkpoint / "matrices").stat().st_size > recorded  # block 2's came after it
    returncode = interrupted.stop(signal_number)
    assert returncode == (-signal.SIGKILL if signal_number == signal.SIGKILL else 1)
    if signal_number != signal.SIGKILL:  # SIGTERM (timeout, SLURM) is handled as Ctrl-C
        how = "KeyboardInterrupt" if signal_number == signal.SIGINT else "SIGTERM"
        stopped = f"Pre-pass stopped ({how}); checkpoint {checkpoint} keeps the"
        assert f"{stopped} statistics of blocks 0-1: run the same command" in interrupted.stderr
        assert not cache_keys.lock_path(checkpoint).exists()  # released on the way out
    assert interrupted.blocks_run() == {first: [0, 1, 2]}
    assert not list(cache_dir.glob("*.safetensors"))  # nothing committed, nothing half-written

    resumed = Calibration(config, "resumed")
    assert resumed.finish() == 0, resumed.stderr[-3000:]
    assert f"resuming at block 2 of {BLOCKS} from checkpoint {checkpoint}" in resumed.stderr
    assert resumed.blocks_run() == {first: [2, 3], other: [0, 1, 2, 3]}
    _assert_same_entries(cache_dir, reference)
    assert _only_entries(cache_dir) == _only_entries(reference)  # no checkpoint, lock or partial


def test_a_checkpoint_of_other_inputs_is_discarded_with_a_message(deep_models, reference, tmp_path):
    config = _config_file(deep_models, tmp_path)
    cache_dir = tmp_path / "cache"
    interrupted = Calibration(config, "interrupted", pause="checkpoint:2")
    interrupted.wait_for("stdout", "PAUSED checkpoint:2")
    interrupted.stop(signal.SIGKILL)
    (checkpoint,) = cache_dir.glob("*.checkpoint")
    state = checkpoint / "state.safetensors"
    tensors = load_file(state)
    with safe_open(state, framework="pt") as handle:
        metadata = handle.metadata()
    other = {**json.loads(metadata["key"]), "dampening": 0.5}
    save_file(tensors, state, {**metadata, "key": json.dumps(other, sort_keys=True)})

    rerun = Calibration(config, "rerun")
    assert rerun.finish() == 0, rerun.stderr[-3000:]
    assert (
        f"Discarding pre-pass checkpoint {checkpoint}: it was written for different inputs; "
        "starting from the first block." in rerun.stderr
    )
    assert rerun.blocks_run() == {name: list(range(BLOCKS)) for name in _task_order(deep_models)}
    _assert_same_entries(cache_dir, reference)
    assert _only_entries(cache_dir) == _only_entries(reference)


def test_two_runs_sharing_a_cache_compute_each_entry_once(deep_models, reference, tmp_path):
    config = _config_file(deep_models, tmp_path)
    cache_dir = tmp_path / "cache"
    first, _ = _task_order(deep_models)
    # One run holds the first entry's lock (paused after its first block) until the other is
    # seen waiting for it.
    holder = Calibration(config, "holder", pause="checkpoint:1")
    holder.wait_for("stdout", "PAUSED checkpoint:1")
    waiter = Calibration(config, "waiter")
    waiter.wait_for("stderr", "Waiting for ")
    holder.go_on()
    assert holder.finish() == 0, holder.stderr[-3000:]
    assert waiter.finish() == 0, waiter.stderr[-3000:]
    assert "another process is computing the Hessian statistics of" in waiter.stderr
    computed = [*holder.blocks_run(), *waiter.blocks_run()]
    assert sorted(computed) == _task_order(deep_models)  # each task once, by either run
    assert first in holder.blocks_run()
    assert f"Hessian statistics for {deep_models.experts['arithmetic']} from cache" in (
        waiter.stderr
    )
    _assert_same_entries(cache_dir, reference)
    assert _only_entries(cache_dir) == _only_entries(reference)


# --- versioned entries: an entry that is not this version's is rebuilt, saying why ---


def _damage(path: Path, kind: str) -> str:
    """Replace the entry at ``path``; return the reason the rebuild must give."""
    tensors = load_file(path)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    if kind == "foreign":
        save_file({"weight": torch.ones(2)}, path, metadata={"format": "pt"})
        return (
            "its metadata (format) has no cache key, so it is not a mergekit_sparsegpt "
            "statistics entry (another program's file?)"
        )
    if kind == "no metadata":
        save_file(tensors, path)
        return (
            "it has no metadata, so it is not a mergekit_sparsegpt statistics entry "
            "(another program's file?)"
        )
    save_file(tensors, path, metadata={**metadata, "format": "2"})
    return (
        f"it has cache format version 2; this version of mergekit_sparsegpt reads version "
        f"{cache_keys.FORMAT_VERSION} only"
    )


@pytest.mark.parametrize("kind", ["foreign", "no metadata", "old version"])
def test_an_entry_of_another_program_or_version_is_rebuilt_saying_why(
    deep_models, tmp_path, caplog, kind
):
    cache_dir = tmp_path / "cache"
    config = MergeConfiguration.model_validate(_config(deep_models, cache_dir))
    prepass.prepare_statistics(config, MergeOptions(quiet=True))
    original = _entries(cache_dir)  # this process's threads round as the rebuild will
    damaged = sorted(cache_dir.glob("*.safetensors"))[0]
    reason = _damage(damaged, kind)
    with caplog.at_level(logging.WARNING):
        prepass.prepare_statistics(config, MergeOptions(quiet=True))
    warnings = [r.getMessage() for r in caplog.records if r.name == CACHE_LOG.name]
    assert warnings == [f"Ignoring statistics cache {damaged}: {reason}; recomputing."]
    _assert_equal_entries(_entries(cache_dir), original)
    assert _only_entries(cache_dir) == sorted(original)


def test_a_checkpoint_left_next_to_a_committed_entry_is_removed(deep_models, tmp_path, monkeypatch):
    """A run killed between committing an entry and removing its checkpoint left one behind."""
    cache_dir = tmp_path / "cache"
    config = MergeConfiguration.model_validate(_config(deep_models, cache_dir))
    prepass.prepare_statistics(config, MergeOptions(quiet=True))
    entries = _only_entries(cache_dir)
    stale = cache_keys.checkpoint_dir(sorted(cache_dir.glob("*.safetensors"))[0])
    stale.mkdir()
    (stale / "matrices").write_bytes(b"left over")

    def no_forward(*args, **kwargs):
        raise AssertionError("the pre-pass ran again")

    monkeypatch.setattr(task_statistics, "compute_statistics", no_forward)
    prepass.prepare_statistics(config, MergeOptions(quiet=True))
    assert _only_entries(cache_dir) == entries


def test_an_entry_of_an_older_format_is_named_and_recomputed(
    deep_models, tmp_path, monkeypatch, capsys
):
    """The format version is part of the key: an old entry is never read, but the run says why
    the cache missed and which file can go."""
    cache_dir = tmp_path / "cache"
    config = MergeConfiguration.model_validate(_config(deep_models, cache_dir))
    with monkeypatch.context() as old:
        # Every module that looks the version up when writing or reading an entry.
        for module in (cache_keys, entries, resumable, task_statistics):
            old.setattr(module, "FORMAT_VERSION", cache_keys.FORMAT_VERSION - 1)
        prepass.prepare_statistics(config, MergeOptions(quiet=True))
    old_entries = sorted(cache_dir.glob("*.safetensors"))
    capsys.readouterr()
    prepass.prepare_statistics(config, MergeOptions(quiet=False))
    said = capsys.readouterr().err
    for path in old_entries:
        assert (
            f"Statistics cache {path} holds these inputs in format "
            f"{cache_keys.FORMAT_VERSION - 1}, which this version of mergekit_sparsegpt does not "
            f"read (format {cache_keys.FORMAT_VERSION}); recomputing. Delete it to free the space."
        ) in said
    assert len(sorted(cache_dir.glob("*.safetensors"))) == 2 * len(old_entries)


def _solving_config_file(
    models: Family, directory: Path, source: str, keep_statistics: bool = False
) -> Path:
    """RegMean's default storage: the pass that solves as it goes (finetuned: the lockstep
    pass through each expert; merged: RegMean++'s); ``keep_statistics``: every task's entry."""
    config = _config(models, directory / "cache")
    config["merge_method"] = "regmean"
    for entry in config["models"]:
        del entry["parameters"]["density"]
    del config["parameters"]["compensate"]
    config["parameters"]["hessian_source"] = source
    if keep_statistics:
        config["parameters"]["keep_statistics"] = True
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _blocks(run: Calibration) -> list[int]:
    return [
        event["index"]
        for event in map(json.loads, run.events.read_text().splitlines())
        if event["event"] == "block"
    ]


@pytest.mark.parametrize("source", ["finetuned", "merged"])
def test_a_killed_solving_prepass_resumes_after_its_last_finished_block(
    deep_models, tmp_path, source
):
    reference_config = _solving_config_file(deep_models, tmp_path / "reference", source)
    reference_run = Calibration(reference_config, "reference")
    assert reference_run.finish() == 0, reference_run.stderr[-3000:]
    # finetuned: each block once per task; merged: once per input group too
    runs = _blocks(reference_run)
    assert sorted(set(runs)) == list(range(BLOCKS)) and runs == sorted(runs)

    config = _solving_config_file(deep_models, tmp_path / "ours", source)
    cache_dir = config.parent / "cache"
    interrupted = Calibration(config, "interrupted", pause="checkpoint:2")
    interrupted.wait_for("stdout", "PAUSED checkpoint:2")
    assert interrupted.stop(signal.SIGKILL) == -signal.SIGKILL
    before = [index for index in runs if index < 2]
    assert _blocks(interrupted) == before  # blocks 0 and 1, each task, then the kill
    assert not list(cache_dir.glob("*.safetensors"))
    (checkpoint,) = cache_dir.glob("*.checkpoint")

    resumed = Calibration(config, "resumed")
    assert resumed.finish() == 0, resumed.stderr[-3000:]
    assert f"Solving this merge: resuming at block 2 from checkpoint {checkpoint}" in resumed.stderr
    assert _blocks(resumed) == [index for index in runs if index >= 2]
    ours, expected = _entries(cache_dir), _entries(reference_config.parent / "cache")
    assert set(ours) == set(expected) and len(expected) == 1
    for name, (metadata, tensors) in expected.items():
        assert ours[name][0] == metadata  # the same key and report records
        assert set(ours[name][1]) == set(tensors)
        assert all(torch.equal(ours[name][1][key], value) for key, value in tensors.items())
    assert _only_entries(cache_dir) == _only_entries(reference_config.parent / "cache")


def test_a_killed_regmean_plus_plus_pass_keeping_statistics_resumes_every_task(
    deep_models, tmp_path
):
    """RegMean++ with keep_statistics writes every task's entry in one pass: each entry has
    its own checkpoint, written together, and the rerun resumes them together."""
    reference_config = _solving_config_file(deep_models, tmp_path / "reference", "merged", True)
    reference_run = Calibration(reference_config, "reference")
    assert reference_run.finish() == 0, reference_run.stderr[-3000:]
    runs = _blocks(reference_run)

    config = _solving_config_file(deep_models, tmp_path / "ours", "merged", True)
    cache_dir = config.parent / "cache"
    # Killed while block 2's matrices are written: both tasks' checkpoints hold blocks 0 and 1.
    interrupted = Calibration(config, "interrupted", pause="matrix:2:down_proj")
    interrupted.wait_for("stdout", "PAUSED matrix:2:down_proj")
    assert interrupted.stop(signal.SIGKILL) == -signal.SIGKILL
    assert not list(cache_dir.glob("*.safetensors"))
    assert len(list(cache_dir.glob("*.checkpoint/state.safetensors"))) == 2

    resumed = Calibration(config, "resumed")
    assert resumed.finish() == 0, resumed.stderr[-3000:]
    assert "RegMean++ statistics: resuming at block 2" in resumed.stderr
    assert _blocks(resumed) == [index for index in runs if index >= 2]
    ours, expected = _entries(cache_dir), _entries(reference_config.parent / "cache")
    assert set(ours) == set(expected) and len(expected) == 2
    for name, (metadata, tensors) in expected.items():
        assert ours[name][0] == metadata
        assert set(ours[name][1]) == set(tensors)
        assert all(torch.equal(ours[name][1][key], value) for key, value in tensors.items())
    assert _only_entries(cache_dir) == _only_entries(reference_config.parent / "cache")
