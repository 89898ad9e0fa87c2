"""The output head's input Hessian: the Gram of what the final norm hands ``lm_head``.

``lm_head`` is a linear like any other, whose input is the last block's output after whatever
the architecture puts between the blocks and the head (the final norm; GPT-2's ``ln_f``). That
part runs as the model's own forward runs it, so no architecture is special-cased: the blocks
stand in as pass-throughs, the first replaying the last block's outputs, the token embedding is
not looked up (``inputs_embeds``), and a pre-hook takes the head's input and stops the forward
before any logit exists (a [batch, seq, vocab] logits tensor would be the pass's largest
allocation).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Hashable, Iterator, MutableMapping
from typing import Any, Protocol

import torch
from transformers.conversion_mapping import get_checkpoint_conversion_mapping

from mergekit_sparsegpt.capture.accumulate import HessianAccumulator, LayerHessians
from mergekit_sparsegpt.capture.hooks import check_finite_activations
from mergekit_sparsegpt.capture.model import (
    BlockStandIn,
    TensorSource,
    materialise,
    module_name,
    release,
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


def capture_head_hessians(
    runner: BlockRunner, tasks: list[Hashable], source: str = ""
) -> dict[Hashable, LayerHessians]:
    """Each task's Hessian of the output head's input, from its current activations (the last
    block's outputs); {} for a model without a head. Only the tensors between the blocks and
    the head are materialised, on the runner's device, and released again."""
    model = runner.model
    name = head_weight_name(model, getattr(runner.load_tensor, "tensor_names", ()))
    if name is None:
        return {}
    head = model.get_output_embeddings()
    skip = (
        runner.prefix,
        module_name(model, head),
        module_name(model, model.get_input_embeddings()),
    )
    materialise(model, runner.load_tensor, runner.device, skip=skip, dtype=runner.dtype)
    try:
        return {task: _head_hessian(runner, task, head, name, source) for task in tasks}
    finally:
        release(model, skip_prefix=runner.prefix)


def _head_hessian(
    runner: BlockRunner, task: Hashable, head: torch.nn.Module, name: str, source: str
) -> LayerHessians:
    hidden = runner.hidden[task]
    accumulator = HessianAccumulator(hidden.shape[-1], runner.device)
    batches = hidden.split(runner.batch_size)
    replay = (batch.to(runner.device) for batch in batches)

    def take_input(_module: torch.nn.Module, args: tuple) -> None:
        inputs = args[0]
        if inputs.shape[:-1] != expected[:-1]:
            raise RuntimeError(
                f"{type(runner.model).__name__}: the output head's input has shape "
                f"{tuple(inputs.shape)}, not the last block's {tuple(expected)}"
            )
        check_finite_activations(inputs, f"the output head {name}", source)
        accumulator.add_batch(inputs)
        raise _StopAtHead

    originals = list(runner.layers)
    for index, block in enumerate(originals):
        runner.layers[index] = _StandIn(block, replay if index == 0 else None)
    handle = head.register_forward_pre_hook(take_input)
    try:
        with torch.no_grad():
            for batch in batches:
                expected = batch.shape
                embeds = torch.zeros(batch.shape, dtype=runner.dtype, device=runner.device)
                try:
                    runner.model(inputs_embeds=embeds, use_cache=False)
                except _StopAtHead:
                    continue
                raise RuntimeError(f"{type(runner.model).__name__} never reached its output head")
    finally:
        handle.remove()
        for index, block in enumerate(originals):
            runner.layers[index] = block
    return LayerHessians(
        hessians={name: accumulator.hessian},
        groups={name: name},
        samples={name: accumulator.samples},
    )
