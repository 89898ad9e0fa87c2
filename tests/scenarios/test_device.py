"""mergekit's device options reach the pre-pass; on a CUDA machine, GPU and CPU merges agree.

The wiring tests run everywhere: they stop the pre-pass at the capture call and read the device
it was given. The comparisons need CUDA and are skipped without it (CI has no GPU).
"""

from __future__ import annotations

from pathlib import Path

import mergekit.merge
import pytest
import torch
from merge_configs import regmean_config, sparsegpt_config
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from mergekit_sparsegpt.integration.registration import install
from mergekit_sparsegpt.prepass import merged_source as merged_statistics
from mergekit_sparsegpt.prepass import run as prepass
from mergekit_sparsegpt.prepass import task_statistics

install()

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _Stop(Exception):
    pass


@pytest.mark.parametrize(
    ("flags", "device"),
    [({}, "cpu"), ({"cuda": True}, "cuda"), ({"device": "cuda:1"}, "cuda:1")],
)
@pytest.mark.parametrize(
    ("module", "function", "source"),
    [
        (task_statistics, "capture_layer_hessians", "base"),
        (merged_statistics, "capture_merged_hessians", "merged"),
    ],
    ids=["ties", "regmean-merged"],
)
def test_capture_runs_on_the_device_mergekit_was_given(
    tiny_models, tmp_path, monkeypatch, flags, device, module, function, source
):
    seen = []

    def recording_capture(*args, **kwargs):
        seen.append(kwargs["device"])
        raise _Stop

    monkeypatch.setattr(module, function, recording_capture)
    if source == "merged":
        config = regmean_config(tiny_models, hessian_source="merged", cache_dir=str(tmp_path))
    else:
        config = sparsegpt_config(tiny_models, cache_dir=str(tmp_path))
    with pytest.raises(_Stop):
        prepass.prepare_statistics(
            MergeConfiguration.model_validate(config), MergeOptions(quiet=True, **flags)
        )
    assert seen == [device]


def _merge(config: dict, out: Path, **flags) -> dict[str, torch.Tensor]:
    mergekit.merge.run_merge(
        MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True, **flags)
    )
    return {
        name: tensor
        for path in sorted(out.glob("*.safetensors"))
        for name, tensor in load_file(path).items()
    }


@needs_cuda
@pytest.mark.parametrize(
    "make_config",
    [
        lambda models, cache: sparsegpt_config(models, cache_dir=cache, compensate=True),
        lambda models, cache: regmean_config(models, hessian_source="merged", cache_dir=cache),
    ],
    ids=["sparsegpt_ties-compensated", "regmean-merged"],
)
def test_cuda_merge_matches_the_cpu_merge(tiny_models, tmp_path, make_config):
    merges = {
        name: _merge(
            make_config(tiny_models, str(tmp_path / f"cache_{name}")), tmp_path / name, **flags
        )
        for name, flags in (("cpu", {}), ("cuda", {"cuda": True}))
    }
    assert set(merges["cpu"]) == set(merges["cuda"])
    for name, expected in merges["cpu"].items():
        actual = merges["cuda"][name]
        error = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(
            1e-12
        )
        assert error < 1e-3, f"{name}: relative difference {error:.2e}"
