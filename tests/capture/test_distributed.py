"""Calibration over several processes: 2 CPU processes (gloo) against one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from merge_configs import regmean_config, sparsegpt_config
from safetensors import safe_open

from mergekit_sparsegpt.capture.accumulate import LayerHessians
from mergekit_sparsegpt.capture.distributed import (
    Ranks,
    _all_reduced,
    launched_ranks,
    shard_windows,
    together,
)
from mergekit_sparsegpt.statistics.checkpoint import CHECKPOINT_OVERHEAD_VARIABLE

REPOSITORY = Path(__file__).resolve().parents[2]


# ``calibrate`` with the main rank killed (SIGKILL) right after it writes the resume checkpoint
# before block TEST_KILL_AFTER: torchrun then stops the other rank too.
KILLING_DRIVER = """
import os, signal, sys
from mergekit_sparsegpt.integration import cli
from mergekit_sparsegpt.statistics import resumable

save = resumable.EntryWriter.save_checkpoint
def killing_save(self, next_block, *args, **kwargs):
    size = save(self, next_block, *args, **kwargs)
    if next_block == int(os.environ.get("TEST_KILL_AFTER", "-1")):
        os.kill(os.getpid(), signal.SIGKILL)
    return size
resumable.EntryWriter.save_checkpoint = killing_save
cli.main(sys.argv[1:])
"""


def _calibrate(
    config: dict, workdir: Path, processes: int, kill_after: int | None = None
) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
        + ["--standalone"]
        if processes > 1
        else [sys.executable]
    )
    driver = workdir / "driver.py"
    driver.write_text(KILLING_DRIVER, encoding="utf-8")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPOSITORY),
        CHECKPOINT_OVERHEAD_VARIABLE: "1",  # a checkpoint after every block
        "TEST_KILL_AFTER": str(kill_after if kill_after is not None else -1),
    }
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    return subprocess.run(
        [*launcher, str(driver), "calibrate", str(config_path)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _entries(cache_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    entries = {}
    for path in sorted(cache_dir.rglob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            entries[path.name] = {key: handle.get_tensor(key) for key in handle.keys()}
    return entries


@pytest.mark.parametrize("method", ["sparsegpt_regmean", "sparsegpt_ties"])
def test_two_gloo_processes_fill_the_cache_one_process_would(tiny_models, tmp_path, method):
    """7 windows split 4 + 3: the sample-count weighting is exercised."""
    make = regmean_config if method == "sparsegpt_regmean" else sparsegpt_config
    # RegMean keeps every task's statistics under torchrun; one process does with
    # keep_statistics (by default it would cache the solved linears).
    kept = {"keep_statistics": True} if method == "sparsegpt_regmean" else {}
    caches = {}
    for processes in (1, 2):
        cache_dir = tmp_path / f"cache{processes}"
        config = make(
            tiny_models,
            method,
            calibration_samples=7,
            cache_dir=str(cache_dir),
            compensate=True,
            **kept,
        )
        proc = _calibrate(config, tmp_path / f"run{processes}", processes)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stderr.count("Calibration statistics ready for 2 task(s).") == 1
        caches[processes] = _entries(cache_dir)
    single, double = caches[1], caches[2]
    assert len(single) == 2 and set(single) == set(double)  # the same keys: a merge reuses them
    for name, tensors in single.items():
        assert set(tensors) == set(double[name])
        if method == "sparsegpt_regmean":
            assert any(key.endswith("::hessian") for key in tensors)
            # H only: compensate's factor is derived from it.
            assert not any(key.endswith("::cholesky_factor") for key in tensors)
        for key, value in tensors.items():
            # The sums agree to float rounding; what is derived through H^-1 amplifies that
            # rounding by H's condition number.
            tolerance = 1e-5 if key.endswith(("::hessian", "::hessian_diagonal")) else 1e-3
            error = (double[name][key].double() - value.double()).norm() / value.double().norm()
            assert error < tolerance, f"{key}: relative error {error:.2e}"


def test_merge_under_torchrun_is_refused(tiny_models, tmp_path, monkeypatch):
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_sparsegpt.prepass.run import run_with_statistics

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    config = MergeConfiguration.model_validate(sparsegpt_config(tiny_models))
    with pytest.raises(ValueError, match="mergekit-sparsegpt calibrate CONFIG"):
        run_with_statistics(lambda *a, **k: None, config, str(tmp_path / "out"), MergeOptions())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["finetuned", "merged"])
def test_two_gloo_processes_solve_the_merge_one_process_would(tiny_models, tmp_path, source):
    """RegMean's default storage under torchrun: the lockstep pass (finetuned) and RegMean++
    (merged) with each task's 7 windows split 4 + 3, every unit's Hessians all-reduced."""
    caches = {}
    for processes in (1, 2):
        cache_dir = tmp_path / f"cache{processes}"
        config = regmean_config(
            tiny_models,
            calibration_samples=7,
            cache_dir=str(cache_dir),
            hessian_source=source,
            # alpha 1 (exact least squares) amplifies the sums' rounding by the Grams'
            # condition number, huge for this tiny model's o_proj (heads sharing a KV head).
            alpha=0.9,
        )
        proc = _calibrate(config, tmp_path / f"run{processes}", processes)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stderr.count("Solved linears of the merge ready") == 1
        caches[processes] = _entries(cache_dir)
    single, double = caches[1], caches[2]
    assert len(single) == 1 and set(single) == set(double)  # the same key: a merge reuses it
    (name,) = single
    assert set(single[name]) == set(double[name]) and single[name]
    for key, value in single[name].items():
        error = (double[name][key].double() - value.double()).norm() / value.double().norm()
        assert error < 1e-4, f"{key}: relative error {error:.2e}"


@pytest.mark.parametrize("method", ["sparsegpt_ties", "regmean"])
def test_a_killed_torchrun_prepass_resumes_after_its_last_finished_block(
    tiny_models, tmp_path, method
):
    """The checkpoint gathers every rank's activations; the rerun hands each rank its share
    and runs only the blocks left. sparsegpt_ties: one entry per task (whole matrices streamed
    for compensate); regmean: RegMean++ solving the merge."""
    if method == "regmean":
        config = regmean_config(tiny_models, hessian_source="merged", calibration_samples=7)
    else:
        config = sparsegpt_config(tiny_models, calibration_samples=7, compensate=True)
    caches = {}
    for name, kill_after in (("reference", None), ("resumed", 1)):
        cache_dir = tmp_path / f"cache_{name}"
        config["parameters"]["cache_dir"] = str(cache_dir)
        if kill_after is not None:
            killed = _calibrate(config, tmp_path / "killed", 2, kill_after)
            assert killed.returncode != 0
            assert not list(cache_dir.glob("*.safetensors"))
            assert list(cache_dir.glob("*.checkpoint/state.safetensors"))
        proc = _calibrate(config, tmp_path / name, 2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("resuming at block 1" in proc.stderr) == (kill_after is not None), proc.stderr
        assert not list(cache_dir.glob("*.checkpoint"))
        caches[name] = _entries(cache_dir)
    reference, resumed = caches["reference"], caches["resumed"]
    assert set(resumed) == set(reference) and reference
    for name, tensors in reference.items():
        assert set(resumed[name]) == set(tensors)
        for key, value in tensors.items():
            assert torch.equal(resumed[name][key], value), key


def test_launched_ranks_read_torchrun_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launched_ranks() == Ranks()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ranks = launched_ranks()
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.main) == (3, 4, 1, False)
    assert ranks.device("cuda") == "cuda:1"
    assert ranks.device(None) == "cpu" and ranks.device("cuda:0") == "cuda:0"
    assert Ranks().device("cuda") == "cuda"


def test_windows_are_shared_out_contiguously_and_completely():
    windows = torch.arange(7 * 3).reshape(7, 3)
    shares = [shard_windows(windows, Ranks(rank, 3), "m") for rank in range(3)]
    assert [len(share) for share in shares] == [3, 2, 2]
    assert torch.equal(torch.cat(shares), windows)
    assert shard_windows(windows, Ranks(), "m") is windows
    with pytest.raises(ValueError, match="Calibration of m has 2 windows for 3 processes"):
        shard_windows(windows[:2], Ranks(0, 3), "m")


# ----------------------------------------------------------- collectives, 2 gloo processes


def _layer_of_rank(rank: int) -> LayerHessians:
    """q/k share an input and ran on both ranks (3 and 5 sequences); the expert's gate/up share
    an input but ran on rank 0 only; ``never`` ran nowhere."""
    generator = torch.Generator().manual_seed(rank)
    attention = torch.randn(4, 4, generator=generator)
    expert = torch.randn(3, 3, generator=generator)
    if rank == 0:
        return LayerHessians(
            hessians={"q": attention, "gate": expert, "never": torch.zeros(2, 2)},
            groups={"q": "q", "k": "q", "gate": "gate", "up": "gate", "never": "never"},
            samples={"q": 3, "gate": 2, "never": 0},
        )
    return LayerHessians(
        hessians={
            "q": attention,
            "gate": torch.zeros(3, 3),
            "up": torch.zeros(3, 3),
            "never": torch.zeros(2, 2),
        },
        groups={"q": "q", "k": "q", "gate": "gate", "up": "up", "never": "never"},
        samples={"q": 5, "gate": 0, "up": 0, "never": 0},
    )


def _reduce_worker(rank: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    try:
        reduced = _all_reduced(_layer_of_rank(rank), Ranks(rank, 2))
        outcome = None
        try:
            with together(Ranks(rank, 2)):
                if rank == 1:
                    raise ValueError("bad calibration file x.txt")
        except ValueError as error:
            outcome = str(error)
        torch.save({"reduced": reduced, "outcome": outcome}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_all_reduce_weights_by_samples_and_reconciles_groups(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_reduce_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    results = [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]
    layers = [_layer_of_rank(rank) for rank in range(2)]
    expected_attention = torch.zeros(4, 4)
    for i in range(4):
        for j in range(4):
            expected_attention[i, j] = (
                3 * layers[0].hessians["q"][i, j] + 5 * layers[1].hessians["q"][i, j]
            ) / 8
    for rank, result in enumerate(results):
        reduced = result["reduced"]
        assert reduced.groups == {
            "q": "q",
            "k": "q",
            "gate": "gate",
            "up": "gate",
            "never": "never",
        }
        assert reduced.samples == {"q": 8, "gate": 2, "never": 0}
        torch.testing.assert_close(reduced.hessians["q"], expected_attention)
        torch.testing.assert_close(reduced.hessians["gate"], layers[0].hessians["gate"])
        assert torch.equal(reduced.hessians["never"], torch.zeros(2, 2))
        # The failing rank re-raises its own error; the other names the rank that failed.
        expected = "bad calibration file x.txt"
        assert result["outcome"] == (
            expected if rank == 1 else f"Calibration process 1 failed: {expected}"
        )
