"""The merge's value of a tensor computed by the method's kernel, on the right device."""

from types import SimpleNamespace

import torch
from mergekit.common import ModelReference
from mergekit.merge_methods.base import ParameterScope

from mergekit_sparsegpt.methods.context import MergeContext, PlannedTensor
from mergekit_sparsegpt.prepass.merged_tensors import MergedTensors


def test_linears_are_solved_on_the_pass_device_and_the_rest_merged_on_the_host():
    """Under --cuda the RegMean solve runs where the Grams are (the accelerator); a tensor
    read as a source (the embedding before block 0) is merged on the host. ``meta`` stands in
    for the GPU: a tensor left on the CPU would show here."""
    base, expert = ModelReference.parse("base"), ModelReference.parse("expert")
    seen: dict[str, set[str]] = {}

    def merge_group(group, **parameters):
        seen[group.metadata.name] = {entry.tensor.device.type for entry in group.entries}
        return group.entries[0].tensor

    weight = SimpleNamespace(name="weight", scope=ParameterScope.NON_BASE)
    method = SimpleNamespace(spec=SimpleNamespace(parameters=[weight]), merge_group=merge_group)
    names = ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight")
    planned = [
        PlannedTensor(name, {base: name, expert: name}, base, {}, {expert: {"weight": 1.0}})
        for name in names
    ]
    readers = {model: (lambda name: torch.ones(2, 3)) for model in (base, expert)}
    context = MergeContext(hessian_inputs={}, tasks={})
    merged = MergedTensors(planned, method, context, readers, solve_device="meta")
    assert merged.solved(names[0]).device.type == "meta"
    assert merged(names[1]).device.type == "cpu"
    assert seen == {names[0]: {"meta"}, names[1]: {"cpu"}}
