"""Calibration tasks: which model the text runs through, per hessian_source."""

import pytest
import torch
from merge_configs import regmean_config, sparsegpt_config
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_sparsegpt.integration.registration import install
from mergekit_sparsegpt.methods.registry import plugin_method
from mergekit_sparsegpt.prepass.plan import plan_tensors
from mergekit_sparsegpt.prepass.run import prepare_statistics
from mergekit_sparsegpt.prepass.tasks import calibration_tasks, uses_exported_statistics
from mergekit_sparsegpt.prepass.validate import validate_parameters

install()

DOWN = "model.layers.{}.mlp.down_proj.weight"


def test_base_hessian_source_runs_calibration_through_base(tiny_models, tmp_path):
    config = sparsegpt_config(
        tiny_models, importance="obs", hessian_source="base", cache_dir=str(tmp_path / "cache")
    )
    merge_config = MergeConfiguration.model_validate(config)
    planned = plan_tensors(merge_config, MergeOptions(quiet=True))
    settings = validate_parameters(planned, plugin_method("sparsegpt_ties"))
    tasks, _ = calibration_tasks(planned, settings)
    assert len(tasks) == 2
    assert {str(task.forward_model) for task in tasks} == {str(tiny_models.base)}
    finetuned_context = prepare_statistics(
        MergeConfiguration.model_validate(
            sparsegpt_config(
                tiny_models,
                importance="obs",
                hessian_source="finetuned",
                cache_dir=str(tmp_path / "cache"),
            )
        ),
        MergeOptions(quiet=True),
    )
    base_context = prepare_statistics(merge_config, MergeOptions(quiet=True))
    name = DOWN.format(1)
    for key in base_context.tasks:
        ours = base_context.tasks[key].for_weight(name).hessian_diagonal
        theirs = finetuned_context.tasks[key].for_weight(name).hessian_diagonal
        assert not torch.allclose(ours, theirs)


@pytest.mark.parametrize(
    "method, forward",
    [
        ("sparsegpt_ties", "base"),
        ("sparsegpt_dare", "base"),
        ("regmean", "merged"),
        ("sparsegpt_regmean", "merged"),
    ],
)
def test_default_hessian_source_per_method(tiny_models, tmp_path, method, forward):
    """Measured defaults: the base's activations for trimming, the merged model's for RegMean
    (tokenized and planned through the base, whose layout the merged model has)."""
    if "regmean" in method:
        config = regmean_config(tiny_models, method)
        del config["parameters"]["hessian_source"]
    else:
        config = sparsegpt_config(
            tiny_models, method, importance="obs", cache_dir=str(tmp_path / "cache")
        )
    merge_config = MergeConfiguration.model_validate(config)
    planned = plan_tensors(merge_config, MergeOptions(quiet=True))
    settings = validate_parameters(planned, plugin_method(method))
    assert settings.hessian_source == forward
    tasks, _ = calibration_tasks(planned, settings)
    assert {str(task.forward_model) for task in tasks} == {str(tiny_models.base)}


def test_a_model_with_a_statistics_folder_is_a_task_read_from_it(tiny_models, tmp_path):
    """Its key is the one the kernels look it up by (no calibration: ""), its forward model
    the one the folder's statistics were measured in."""
    config = sparsegpt_config(tiny_models, hessian_source="base")
    first = config["models"][0]
    del first["parameters"]["calibration"]
    first["parameters"]["statistics"] = str(tmp_path / "folder")
    planned = plan_tensors(MergeConfiguration.model_validate(config), MergeOptions(quiet=True))
    settings = validate_parameters(planned, plugin_method("sparsegpt_ties"))
    tasks, _ = calibration_tasks(planned, settings)
    by_model = {str(task.key[0]): task for task in tasks}
    exported = by_model[first["model"]]
    assert exported.key[1] == "" and exported.statistics == str(tmp_path / "folder")
    assert str(exported.forward_model) == str(tiny_models.base)
    calibrated = by_model[config["models"][1]["model"]]
    assert calibrated.statistics is None and calibrated.key[1]
    assert uses_exported_statistics(tasks) and not uses_exported_statistics([calibrated])
