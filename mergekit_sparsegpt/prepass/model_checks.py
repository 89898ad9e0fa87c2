"""Checks of the models and their files, before any weight is merged.

Everything a user can get wrong about the models (a missing base model, a path that is not a
checkpoint, shapes that differ, a config that disagrees with its weights, a tokenizer that is not
the model's own) fails inside mergekit or transformers with a message that does not name the
model. Each check here turns one of those into an error that does.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions
from transformers import AutoTokenizer, PretrainedConfig

from mergekit_sparsegpt.capture.architecture import check_supported
from mergekit_sparsegpt.capture.model import empty_model
from mergekit_sparsegpt.capture.weights import (
    CheckpointError,
    CheckpointReader,
    checked_weight_index,
)
from mergekit_sparsegpt.methods.context import PlannedTensor
from mergekit_sparsegpt.prepass.model_identity import check_distinct_models

_NOT_ITS_TOKENIZER = (
    "that tokenizer is not the model's own. Save the tokenizer the model was trained with next "
    "to its weights."
)


def check_models_usable(merge_config: MergeConfiguration, options: MergeOptions) -> None:
    """The checks that need only the config: a base model, models that load, each model once,
    architectures we can calibrate."""
    check_base_model(merge_config)
    check_models(merge_config, options)
    check_distinct_models(merge_config)
    for model in sorted(merge_config.referenced_models(), key=str):
        check_supported(
            model.config(options.trust_remote_code), str(model), options.trust_remote_code
        )


def check_weights(
    planned: list[PlannedTensor],
    readers: dict[ModelReference, CheckpointReader],
    merge_config: MergeConfiguration,
    options: MergeOptions,
) -> None:
    """The checks that read the stored weights (their headers) and tokenizers."""
    check_shapes(planned, readers)
    check_configs_match_weights(readers, options)
    check_tokenizers_fit(merge_config, options)


def check_base_model(merge_config: MergeConfiguration) -> None:
    """mergekit's own message for a missing base model names an internal slice, not the fix."""
    modules = (merge_config.modules or {}).values()
    slices = [*(merge_config.slices or []), *(s for m in modules for s in m.slices or [])]
    if merge_config.base_model is None and not any(s.base_model for s in slices):
        raise ValueError(
            f"{merge_config.merge_method} needs a base_model: every task vector is a model minus "
            "the base. Add `base_model: <the model the others were fine-tuned from>` to the config."
        )


def check_models(merge_config: MergeConfiguration, options: MergeOptions) -> None:
    """A reference that is not a model fails deep inside transformers or mergekit, with a message
    that may not name the model (or say that its directory is missing), or that a weight file is
    damaged."""
    LoaderCache().setup(options=options)
    for model in sorted(merge_config.referenced_models(), key=str):
        path = model.model.path
        if model.lora is not None and not options.lora_merge_cache:
            raise ValueError(
                f"Model {model} is a LoRA adapter on a base model: mergekit merges the adapter "
                "into the base before anything reads it, and needs a directory for that. Add "
                "--lora-merge-cache DIR to the command."
            )
        try:
            if (os.path.isabs(path) or path.startswith(".")) and not os.path.isdir(path):
                raise OSError(f"there is no directory {path}")
            model.config(options.trust_remote_code)
            checked_weight_index(model)  # mergekit's index, each safetensors file checked whole
        except CheckpointError as error:  # a damaged download: its own fix, not another path
            raise CheckpointError(f"Model {model}: {error}") from None
        except (OSError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"Model {model} cannot be loaded ({error}). Give the directory of a Hugging Face "
                "checkpoint (config.json and model.safetensors or pytorch_model.bin, possibly "
                "sharded) or a model id on the Hub."
            ) from None


def check_shapes(
    planned: list[PlannedTensor], readers: dict[ModelReference, CheckpointReader]
) -> None:
    """Every input of a tensor must have its shape. mergekit finds a mismatch only when it merges
    that tensor, after the whole pre-pass, and does not say which model differs."""
    for tensor in planned:
        if tensor.vocabulary:
            continue
        shapes = {
            model: stored.shape
            for model, name in tensor.inputs.items()
            if (stored := readers[model].stored(name)) is not None
        }
        if len(set(shapes.values())) > 1:
            listing = ", ".join(f"{shape} in {model}" for model, shape in shapes.items())
            raise ValueError(
                f"Tensor {tensor.output_name} has different shapes in the models merged: "
                f"{listing}. Only models of one architecture and size can be merged; check that "
                "every model is a fine-tune of the base model."
            )


def check_configs_match_weights(
    readers: dict[ModelReference, CheckpointReader], options: MergeOptions
) -> None:
    """A config.json that disagrees with its weights: mergekit merges tensor by tensor and never
    notices, and the merged model (or the calibration forward) fails later without naming it."""
    for model, reader in sorted(readers.items(), key=lambda item: str(item[0])):
        skeleton = empty_model(model.config(options.trust_remote_code), options.trust_remote_code)
        for name, parameter in skeleton.named_parameters():
            stored = reader.stored(name)
            if stored is not None and tuple(stored.shape) != tuple(parameter.shape):
                raise ValueError(
                    f"Model {model}: its config.json does not match its weights: {name} is "
                    f"{tuple(stored.shape)} in {os.path.basename(stored.path)}, but the config "
                    f"gives {tuple(parameter.shape)}. Save the config.json that belongs to these "
                    "weights (or download the model again)."
                )


def check_tokenizers_fit(merge_config: MergeConfiguration, options: MergeOptions) -> None:
    """With tokenizer_source (or a tokenizer section), mergekit maps every model's tokenizer onto
    its embedding rows and fails with a bare KeyError on a token id beyond them."""
    if merge_config.tokenizer_source is None and merge_config.tokenizer is None:
        return
    for model in sorted(merge_config.referenced_models(), key=str):
        rows = _embedding_rows(model.config(options.trust_remote_code))
        try:
            tokenizer = saved_tokenizer(model, options)
        except (OSError, ValueError):
            continue  # mergekit reports a model without a tokenizer itself
        if rows is not None and len(tokenizer) > rows:
            raise ValueError(
                f"The tokenizer saved with model {model} has {len(tokenizer)} tokens, but the "
                f"model's embedding has {rows} rows, so mergekit cannot map it for "
                f"tokenizer_source: {_NOT_ITS_TOKENIZER}"
            )


def check_tokens_fit(windows: torch.Tensor, config: PretrainedConfig, model_name: str) -> None:
    """Token ids beyond the embedding, or windows beyond the positions, fail deep in the forward
    pass (an index error, or silently wrong rotary tables) without naming the model."""
    rows = _embedding_rows(config)
    largest = int(windows.max())
    if rows is not None and largest >= rows:
        raise ValueError(
            f"The tokenizer saved with model {model_name} gives token id {largest}, but the "
            f"model's embedding has {rows} rows: {_NOT_ITS_TOKENIZER}"
        )
    positions = context_length(config)
    if positions is not None and windows.shape[1] > positions:
        raise ValueError(
            f"calibration_seq_len {windows.shape[1]} is longer than model {model_name} can "
            f"read ({positions} positions). Set calibration_seq_len to {positions} or less."
        )


def saved_tokenizer(model: ModelReference, options: MergeOptions) -> Any:
    """The tokenizer saved next to ``model``'s weights (OSError / ValueError when there is none)."""
    return AutoTokenizer.from_pretrained(
        model.model.path, revision=model.model.revision, trust_remote_code=options.trust_remote_code
    )


def context_length(config: PretrainedConfig) -> int | None:
    """How many positions the model reads (None: its config does not say)."""
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def _embedding_rows(config: PretrainedConfig) -> int | None:
    return getattr(config.get_text_config(), "vocab_size", None)
