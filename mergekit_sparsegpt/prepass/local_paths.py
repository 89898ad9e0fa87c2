"""Local model directories that mergekit would take for Hugging Face repo ids.

mergekit 0.1.5 loads a model from a relative path such as ``base`` or ``models/llama`` when it
exists on disk, but its model card step (``mergekit.card.is_hf``) asks the hub whether such a
path, having at most one '/', is also a repo. Without the hub (``HF_HUB_OFFLINE=1``, no network)
the merge then fails at its very end. The pre-pass hands mergekit the same directories spelled
``./models/llama``, which no repo id can be, so every step reads them as the user's files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from huggingface_hub.utils import HFValidationError, validate_repo_id
from mergekit.common import ModelPath, ModelReference
from mergekit.config import MergeConfiguration
from pydantic import BaseModel


def read_as_repo_id(path: str) -> bool:
    """Whether ``path`` exists on disk yet has the shape mergekit's model card sends to the hub."""
    if os.path.isabs(path) or path.startswith("~") or path.count("/") > 1:
        return False
    if not os.path.exists(path):
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def spelled_as_local(
    merge_config: MergeConfiguration, say: Callable[[str], None]
) -> MergeConfiguration:
    """``merge_config`` with every such path written ``./path``; ``say`` names each one once."""
    renamed: dict[str, str] = {}

    def local(model_path: ModelPath) -> ModelPath:
        if not read_as_repo_id(model_path.path):
            return model_path
        renamed[model_path.path] = os.path.join(".", model_path.path)
        return model_path.model_copy(update={"path": renamed[model_path.path]})

    def visit(value: Any) -> Any:
        if isinstance(value, ModelReference):
            lora = local(value.lora) if value.lora is not None else None
            return value.model_copy(update={"model": local(value.model), "lora": lora})
        if isinstance(value, BaseModel):
            fields = {name: getattr(value, name) for name in type(value).model_fields}
            changed = {name: new for name, old in fields.items() if (new := visit(old)) != old}
            return value.model_copy(update=changed) if changed else value
        if isinstance(value, list):
            return [visit(item) for item in value]
        if isinstance(value, dict):
            return {key: visit(item) for key, item in value.items()}
        return value

    result = visit(merge_config)
    for path, local_path in renamed.items():
        say(
            f"Model path {path!r} is a local directory that mergekit's model card would look up "
            f"on the Hugging Face hub as a repo id; it is passed to mergekit as {local_path!r}. "
            f"Write {local_path!r} in the config to keep it so."
        )
    return result
