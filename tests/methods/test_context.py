import torch

from mergekit_sparsegpt.methods.context import MergeContext
from mergekit_sparsegpt.statistics.hessian import HessianStatistics, hessian_statistics
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics

LINEAR = "model.layers.0.mlp.down_proj.weight"
COLUMNS = 6


def _task(seed: int) -> TaskStatistics:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(40, COLUMNS, generator=generator) * torch.linspace(0.2, 4, COLUMNS)
    task = TaskStatistics.empty("model.layers")
    task.groups[LINEAR] = LINEAR
    task.statistics[LINEAR] = hessian_statistics(2 / 40 * inputs.T @ inputs)
    task.samples[LINEAR] = 40
    task.linear_suffixes = frozenset({"mlp.down_proj.weight"})
    return task


def _statistics_for(
    context: MergeContext, output_name: str, model: str, calibration: str | None
) -> HessianStatistics | None:
    """The Hessian statistics of a tensor that holds one matrix (any linear but fused experts)."""
    found = context.tensor_statistics_for(output_name, model, calibration)
    if found is None:
        return None
    if len(found.matrices) != 1:
        raise ValueError(f"{output_name} holds {len(found.matrices)} expert matrices")
    return found.matrices[0]


def test_slice_mapping_uses_the_input_tensor_hessian():
    # Output layer 0 comes from input layer 3: the kernel must read layer 3's statistics.
    task = _task(1)
    moved = "model.layers.3.mlp.down_proj.weight"
    task.groups = {moved: moved}
    task.statistics = {moved: task.statistics[LINEAR]}
    context = MergeContext(hessian_inputs={LINEAR: {"a": moved}}, tasks={("a", "a.txt"): task})
    assert _statistics_for(context, LINEAR, "a", "a.txt") is task.statistics[moved]
