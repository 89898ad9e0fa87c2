"""Each task's statistics hold what the merge reads: diag H alone for a merge that reads
nothing more (default ``sparsegpt_ties``), the whole H otherwise; a diagonal entry never serves
a merge that needs more."""

from pathlib import Path

import mergekit.merge
import pytest
import torch
from merge_configs import sparsegpt_config
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from mergekit_sparsegpt.integration.registration import install
from mergekit_sparsegpt.prepass import run as prepass
from mergekit_sparsegpt.prepass import task_statistics
from mergekit_sparsegpt.statistics.hessian import DIAGONAL_ONLY
from mergekit_sparsegpt.trim.importance import importance_scores, top_density_mask

install()

DENSITY = 0.3


def _run(config: dict, out: Path) -> None:
    mergekit.merge.run_merge(
        MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True)
    )


def _context(config: dict):
    return prepass.prepare_statistics(
        MergeConfiguration.model_validate(config), MergeOptions(quiet=True)
    )


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """One entry per task whose statistics the pre-pass computed (not read from the cache)."""
    computed: list[int] = []
    original = task_statistics.compute_statistics

    def counting(*args, **kwargs):
        computed.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(task_statistics, "compute_statistics", counting)
    return computed


def test_default_merge_keeps_the_entries_that_whole_statistics_keep(tiny_models, tmp_path):
    diagonal = _context(sparsegpt_config(tiny_models, cache_dir=str(tmp_path / "a")))
    whole_cache = str(tmp_path / "b")
    _context(sparsegpt_config(tiny_models, cache_dir=whole_cache, importance="obs"))
    whole = _context(sparsegpt_config(tiny_models, cache_dir=whole_cache))  # served by them
    base = load_file(Path(tiny_models.base) / "model.safetensors")
    compared = 0
    for key, task in diagonal.tasks.items():
        expert = load_file(Path(key[0].model.path) / "model.safetensors")
        for name in task.groups:
            small, large = task.for_weight(name), whole.tasks[key].for_weight(name)
            if large.is_diagonal:  # a norm: its diagonal H is exact in both
                assert small.inverse_path == large.inverse_path
                continue
            assert small.inverse_path == DIAGONAL_ONLY and small.hessian is None
            assert not large.is_estimate
            torch.testing.assert_close(small.hessian_diagonal, large.hessian_diagonal)
            tau = expert[name] - base[name]
            tau = tau if tau.dim() == 2 else tau.T  # the head and linears: [out, in]
            scores = [importance_scores(tau, s, "wanda") for s in (small, large)]
            masks = [top_density_mask(score, DENSITY) for score in scores]
            differ = masks[0] != masks[1]
            # Only where two scores tie at the cut within float rounding may the masks differ.
            cut = scores[1].flatten().sort(descending=True).values[int(DENSITY * tau.numel()) - 1]
            assert torch.allclose(scores[1][differ], cut.expand(int(differ.sum())), rtol=1e-5)
            compared += 1
    assert compared >= 2 * 15  # both tasks' decoder linears and heads


def test_a_later_merge_that_reads_more_computes_whole_statistics(tiny_models, tmp_path, counted):
    cache = str(tmp_path / "cache")
    _run(sparsegpt_config(tiny_models, cache_dir=cache), tmp_path / "wanda")
    assert len(counted) == 2
    entries = sorted(Path(cache).glob("*.safetensors"))
    assert len(entries) == 2
    obs = sparsegpt_config(tiny_models, cache_dir=cache, importance="obs")
    _run(obs, tmp_path / "obs")
    assert len(counted) == 4  # the diagonal entries do not serve it
    context = _context(obs)
    assert len(counted) == 4  # its own entries now do
    assert not any(s.is_estimate for t in context.tasks.values() for s in t.statistics.values())
    _run(
        sparsegpt_config(tiny_models, cache_dir=str(tmp_path / "fresh"), importance="obs"),
        tmp_path / "obs_fresh",
    )
    on_cache, fresh = (load_file(tmp_path / d / "model.safetensors") for d in ("obs", "obs_fresh"))
    assert all(torch.equal(on_cache[name], fresh[name]) for name in fresh)
    assert len(counted) == 6
    _run(sparsegpt_config(tiny_models, cache_dir=cache), tmp_path / "wanda_again")
    assert len(counted) == 6  # served from the cache, not recomputed
