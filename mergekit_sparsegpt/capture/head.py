"""The output head's input Hessian: the Gram of what the final norm hands ``lm_head``.

``lm_head`` is a linear like any other, whose input is the last block's output after whatever
the architecture puts between the blocks and the head (the final norm; GPT-2's ``ln_f``). That
part runs as the model's own forward runs it, so no architecture is special-cased: the blocks
stand in as pass-throughs, the first replaying the last block's outputs, the token embedding is
not looked up (``inputs_embeds``), and a pre-hook takes the head's input and stops the forward
before any logit exists (a [batch, seq, vocab] logits tensor would be the pass's largest
allocation). The same pass takes the final norm's statistics (the energy of each channel of its
normalized input, as ``capture.hooks`` takes a block's norms').
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Hashable, Iterator, MutableMapping
from typing import Any, Protocol

import torch
from transformers.conversion_mapping import get_checkpoint_conversion_mapping

from mergekit_sparsegpt.capture.accumulate import (
    DiagonalAccumulator,
    HessianAccumulator,
    LayerHessians,
)
from mergekit_sparsegpt.capture.architecture import is_norm
from mergekit_sparsegpt.capture.hooks import add_normalized_input, check_finite_activations
from mergekit_sparsegpt.capture.model import (
    BlockStandIn,
    TensorSource,
    materialise,
    module_name,
    release,
    with_zeros,
)


class BlockRunner(Protocol):
    """What the head's pass reads of ``capture.blocks._BlockRunner``: the skeleton, its weights,
    and every task's current activations (the last block's outputs)."""

    model: torch.nn.Module
    load_tensor: TensorSource
    device: torch.device | str
    dtype: torch.dtype | None
    batch_size: int
    prefix: str
    layers: torch.nn.ModuleList
    hidden: MutableMapping[Hashable, torch.Tensor]


def head_weight_name(model: torch.nn.Module, stored: Collection[str] = ()) -> str | None:
    """The checkpoint name of the output head's weight ("lm_head.weight"); None without one.

    For tied embeddings the name is still the head's own: its Hessian is kept under it, and the
    merge of the shared tensor reads it from there. ``stored``: see ``checkpoint_name``.
    """
    head = model.get_output_embeddings()
    name = module_name(model, head)
    if name is None or getattr(head, "weight", None) is None:
        return None
    return checkpoint_name(model, f"{name}.weight", stored)


def embedding_weight_name(model: torch.nn.Module, stored: Collection[str] = ()) -> str | None:
    """The checkpoint name of the token embedding ("model.embed_tokens.weight")."""
    name = module_name(model, model.get_input_embeddings())
    return None if name is None else checkpoint_name(model, f"{name}.weight", stored)


def checkpoint_name(model: torch.nn.Module, name: str, stored: Collection[str]) -> str:
    """The name under which the checkpoint (its tensor names ``stored``) holds the skeleton's
    parameter ``name``: transformers 5 renames some on load (GPT-NeoX's ``embed_out`` is its
    ``lm_head``), and mergekit plans the merge in the checkpoint's names."""
    if not stored or name in stored:
        return name
    for renaming in _renamings(model):
        pairs = zip(renaming.source_patterns, renaming.target_patterns, strict=False)
        for source, target in pairs:
            for key in stored:
                if re.sub(source, target, key) == name:
                    return key
    return name


def _renamings(model: torch.nn.Module) -> list[Any]:
    """transformers' renamings of checkpoint keys for this model (class first, then type)."""
    found = get_checkpoint_conversion_mapping(type(model).__name__)
    found = found or get_checkpoint_conversion_mapping(model.config.model_type) or []
    return [t for t in found if type(t).__name__ == "WeightRenaming"]


def ties_embeddings(model: torch.nn.Module) -> bool:
    """Whether the head's weight is the token embedding itself (Qwen2 small models, Gemma), as
    the config says: a skeleton built on ``meta`` need not have tied the two parameters yet."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None:
        return False
    config = model.config.get_text_config()
    return head.weight is embedding.weight or bool(getattr(config, "tie_word_embeddings", False))


class _StopAtHead(Exception):
    """Raised by the head's pre-hook: its input is taken, no logit is needed."""


class _StandIn(BlockStandIn):
    """A decoder block's place during the head pass: passes the hidden states through, or
    (``replay``) returns the next stored batch of the last block's outputs instead."""

    def __init__(self, block: torch.nn.Module, replay: Iterator[torch.Tensor] | None = None):
        super().__init__(block)
        self.replay = replay

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if self.replay is None else next(self.replay)


def head_units(runner: BlockRunner) -> list[list[str]]:
    """The tensors after the blocks that take statistics, in the units RegMean++ merges one
    after the other: the final norm(s), then the head (its input is their output)."""
    stored = getattr(runner.load_tensor, "tensor_names", ())
    name = head_weight_name(runner.model, stored)
    if name is None:
        return []
    norms = list(_final_norms(runner, stored))
    return [norms, [name]] if norms else [[name]]


def capture_head_hessians(
    runner: BlockRunner,
    tasks: list[Hashable],
    source: str = "",
    only: Collection[str] | None = None,
    diagonal: bool = False,
) -> dict[Hashable, LayerHessians]:
    """Each task's Hessian of the output head's input, with the per-channel energies of the
    final norm's normalized input, from its current activations (the last block's outputs);
    {} for a model without a head; ``diagonal``: only the diagonal of the head's Hessian.
    ``only``: just these tensors (``head_units``); the values
    of norms captured without the head are not loaded (nothing captured reads them). Only
    the tensors between the blocks and the head are materialised, on the runner's device, and
    released again."""
    model = runner.model
    stored = getattr(runner.load_tensor, "tensor_names", ())
    name = head_weight_name(model, stored)
    if name is None:
        return {}
    head = model.get_output_embeddings()
    norms = {
        norm: module
        for norm, module in _final_norms(runner, stored).items()
        if only is None or norm in only
    }
    skip = (
        runner.prefix,
        module_name(model, head),
        module_name(model, model.get_input_embeddings()),
    )
    head_name = name if only is None or name in only else None
    # Without the head, the captured norms' values reach nothing captured.
    zeros = {module_name(model, module) for module in norms.values()} if head_name is None else ()
    materialise(model, _zeros_for(runner, zeros), runner.device, skip=skip, dtype=runner.dtype)
    capture = _HeadCapture(runner, head_name, norms, source, diagonal)
    try:
        return {task: capture.run(task) for task in tasks}
    finally:
        release(model, skip_prefix=runner.prefix)


def _final_norms(runner: BlockRunner, stored: Collection[str]) -> dict[str, torch.nn.Module]:
    """The norms outside the decoder blocks (the final norm), by checkpoint weight name."""
    model = runner.model
    return {
        checkpoint_name(model, f"{name}.weight", stored): module
        for name, module in model.named_modules()
        if is_norm(module) and not name.startswith(runner.prefix + ".")
    }


def _zeros_for(runner: BlockRunner, modules: Collection[str | None]) -> TensorSource:
    """The runner's tensors, with zeros for the weights of ``modules``."""
    names = {f"{module}.weight" for module in modules if module is not None}
    return with_zeros(runner.load_tensor, {n: runner.model.get_parameter(n).shape for n in names})


class _HeadCapture:
    """The head's pass over one task's activations: the model's own forward from the last
    block's outputs to the head's input, hooked on the final norms (counted only once the
    blocks have run: a norm before them sees no real activation) and on the head."""

    def __init__(
        self,
        runner: BlockRunner,
        head_name: str | None,
        norms: dict[str, torch.nn.Module],
        source: str,
        diagonal: bool = False,
    ):
        self.runner, self.head_name, self.norms, self.source = runner, head_name, norms, source
        self.diagonal = diagonal

    def run(self, task: Hashable) -> LayerHessians:
        runner = self.runner
        batches = runner.hidden[task].split(runner.batch_size)
        replay = (batch.to(runner.device) for batch in batches)
        self.accumulators: dict[str, HessianAccumulator] = {}
        self.after_blocks = False
        originals = list(runner.layers)
        for index, block in enumerate(originals):
            runner.layers[index] = _StandIn(block, replay if index == 0 else None)
        handles = [
            runner.layers[-1].register_forward_hook(lambda *_: setattr(self, "after_blocks", True)),
            runner.model.get_output_embeddings().register_forward_pre_hook(self._take_head_input),
            *(norm.register_forward_hook(self._norm_hook(n)) for n, norm in self.norms.items()),
        ]
        try:
            with torch.no_grad():
                for batch in batches:
                    self._run_batch(batch)
        finally:
            for handle in handles:
                handle.remove()
            for index, block in enumerate(originals):
                runner.layers[index] = block
        return LayerHessians(
            hessians={name: acc.hessian for name, acc in self.accumulators.items()},
            groups={name: name for name in self.accumulators},
            samples={name: acc.samples for name, acc in self.accumulators.items()},
            estimated=frozenset({self.head_name} if self.diagonal and self.head_name else ()),
        )

    def _run_batch(self, batch: torch.Tensor) -> None:
        runner = self.runner
        self.expected, self.after_blocks = batch.shape, False
        embeds = torch.zeros(batch.shape, dtype=runner.dtype, device=runner.device)
        try:
            runner.model(inputs_embeds=embeds, use_cache=False)
        except _StopAtHead:
            return
        raise RuntimeError(f"{type(runner.model).__name__} never reached its output head")

    def _norm_hook(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not self.after_blocks:
                return
            if name not in self.accumulators:
                channels = module.weight.shape[-1]
                self.accumulators[name] = DiagonalAccumulator(channels, self.runner.device)
            where = name.removesuffix(".weight")
            add_normalized_input(self.accumulators[name], module, args, output, where, self.source)

        return hook

    def _take_head_input(self, _module: torch.nn.Module, args: tuple) -> None:
        inputs = args[0]
        if inputs.shape[:-1] != self.expected[:-1]:
            raise RuntimeError(
                f"{type(self.runner.model).__name__}: the output head's input has shape "
                f"{tuple(inputs.shape)}, not the last block's {tuple(self.expected)}"
            )
        if self.head_name is not None:
            if self.head_name not in self.accumulators:
                kind = DiagonalAccumulator if self.diagonal else HessianAccumulator
                self.accumulators[self.head_name] = kind(inputs.shape[-1], self.runner.device)
            accumulator = self.accumulators[self.head_name]
            accumulator.add_batch(inputs)
            where = f"the output head {self.head_name}"
            check_finite_activations(inputs, where, self.source, accumulator.diagonal)
        raise _StopAtHead
