"""The merge's value of any tensor, computed by the method's own kernel from a merge context:
what the pre-pass's solving passes build the merge with, exactly as mergekit will call the
kernel afterwards."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from mergekit.common import ModelReference
from mergekit.merge_methods.base import (
    ParameterScope,
    PerInputValues,
    TensorEntry,
    TensorGroup,
    TensorMetadata,
)

from mergekit_sparsegpt.capture.model import TensorSource
from mergekit_sparsegpt.methods.base import PluginMethod
from mergekit_sparsegpt.methods.context import MergeContext, PlannedTensor, activated
from mergekit_sparsegpt.prepass.plan import MERGED


class MergedTensors:
    """The merge's value of any tensor, computed by the method's own kernel: on the host when
    called as a tensor source (tensors before the current unit: embedding, a norm's bias), on
    ``solve_device`` through ``solved`` (the tensors the pass has statistics of: their RegMean
    solve runs where the Grams were captured, the accelerator under ``--cuda``)."""

    def __init__(
        self,
        planned: list[PlannedTensor],
        method: PluginMethod,
        context: MergeContext,
        readers: Mapping[ModelReference, TensorSource],
        solve_device: torch.device | str = "cpu",
    ):
        self.by_name = {t.output_name: t for t in planned}
        self.method = method
        self.context = context
        self.readers = readers
        self.solve_device = solve_device

    @property
    def tensor_names(self) -> Collection[str]:
        """The merge's tensors, in the checkpoint's names (mergekit plans in them)."""
        return self.by_name.keys()

    def __call__(self, name: str) -> torch.Tensor:
        return self.merge_on(name, "cpu")

    def solved(self, name: str) -> torch.Tensor:
        return self.merge_on(name, self.solve_device)

    def merge_on(self, name: str, device: torch.device | str) -> torch.Tensor:
        tensor = self.by_name.get(name)
        if tensor is None:
            raise ValueError(f"hessian_source: {MERGED}: the merge plan has no tensor {name!r}")
        entries = [
            TensorEntry(
                id=model,
                tensor=self.readers[model](input_name).to(device, torch.float32),
                is_base=model == tensor.base_model,
            )
            for model, input_name in tensor.inputs.items()
        ]
        group = TensorGroup(entries=entries, metadata=TensorMetadata(name=name))
        parameters = dict(tensor.shared)
        for spec in self.method.spec.parameters:
            if spec.scope == ParameterScope.SHARED:
                continue
            inputs = group.entries if spec.scope == ParameterScope.INPUT else group.non_base
            parameters[spec.name] = PerInputValues(
                [(entry.id, tensor.per_input[entry.id][spec.name]) for entry in inputs]
            )
        with activated(self.context), torch.no_grad():
            return self.method.merge_group(group, **parameters)
