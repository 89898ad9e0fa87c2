import pytest
import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import TensorGroup

from mergekit_sparsegpt.integration.registration import register_methods
from mergekit_sparsegpt.methods.base import PluginMethod
from mergekit_sparsegpt.methods.registry import PLUGIN_METHODS, is_plugin_method, plugin_method
from mergekit_sparsegpt.methods.solve import SOLVE_PATHS

register_methods()

LINEAR = "model.layers.0.mlp.down_proj.weight"
COLUMNS = 6
METHODS = ["sparsegpt_ties", "sparsegpt_dare", "regmean", "sparsegpt_regmean"]


def _group() -> TensorGroup:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(5, COLUMNS, generator=generator)
    tensors = [base] + [base + 0.1 * torch.randn(5, COLUMNS, generator=generator) for _ in "ab"]
    return TensorGroup.from_tensors(tensors, ids=["base", "a", "b"], base_index=0, name=LINEAR)


def _parameters() -> dict:
    return {
        "weight": {"a": 1.0, "b": 0.5},
        "density": {"a": 0.4, "b": 0.6},
        "calibration": {"a": "a.txt", "b": "b.txt"},
        "importance": "obs",
    }


def test_kernel_without_prepass_is_a_clear_error():
    with pytest.raises(RuntimeError, match="pre-pass"):
        merge_methods.get("sparsegpt_ties")([_group()], parameters=_parameters())


@pytest.mark.parametrize("method", METHODS)
def test_in_memory_api_says_what_runs_the_method(method):
    """mergekit's in-memory API has no pre-pass: one error that names what does work."""
    from mergekit.merge_methods.api import merge_state_dicts, merge_tensors

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(4, COLUMNS, generator=generator)
    tuned = [base + 0.1 * torch.randn(4, COLUMNS, generator=generator) for _ in range(2)]
    parameters = {"weight": 1.0, "calibration": "a.txt"}
    if method != "regmean":
        parameters["density"] = 0.5
    expected = r"only the pre-pass computes.*mergekit-yaml.*run_merge.*in-memory API"
    with pytest.raises(RuntimeError, match=expected) as caught:
        merge_tensors([base, *tuned], method, base_index=0, name=LINEAR, parameters=parameters)
    assert "install()" not in str(caught.value)
    inputs = zip("bxy", [base, *tuned], strict=True)
    states = {name: {"model.norm.weight": tensor[0]} for name, tensor in inputs}
    with pytest.raises(RuntimeError, match=expected):
        merge_state_dicts(states, method, base="b", parameters=parameters)


def test_no_merged_model_is_the_base_without_a_context():
    base = torch.randn(3, COLUMNS)
    group = TensorGroup.from_tensors([base], ids=["base"], base_index=0, name=LINEAR)
    for method in PLUGIN_METHODS:
        assert method.merge_group(group, calibration={}) is base


def test_every_method_declares_what_the_prepass_needs():
    declared = {
        method.spec.name: (
            method.keeps_hessians,
            method.supports_merged_source,
            method.nonnegative_weights,
            method.solve_paths,
            method.fallback_method,
        )
        for method in PLUGIN_METHODS
    }
    assert declared == {
        "sparsegpt_ties": (False, False, False, (), "ties"),
        "sparsegpt_dare": (False, False, False, (), "dare_linear"),
        "regmean": (True, True, True, SOLVE_PATHS, "task_arithmetic"),
        "sparsegpt_regmean": (True, True, True, SOLVE_PATHS, "task_arithmetic"),
    }
    for method in PLUGIN_METHODS:
        assert isinstance(method, PluginMethod)
        assert method.fallback is merge_methods.get(method.fallback_method)


@pytest.mark.parametrize("method, compensating", [(m, m != "regmean") for m in METHODS])
def test_keeps_factors_follows_compensate(method, compensating):
    assert plugin_method(method).keeps_factors({"compensate": True}) is compensating
    assert plugin_method(method).keeps_factors({"compensate": False}) is False
    assert plugin_method(method).keeps_factors({}) is False


def test_plugin_method_names():
    assert all(is_plugin_method(name) for name in METHODS)
    assert not is_plugin_method("ties")
    with pytest.raises(ValueError, match="ties is not a mergekit_sparsegpt method"):
        plugin_method("ties")
