"""The calibration section of the model card (``--write-model-card``, on by default in mergekit).

mergekit's card shows the YAML as written. What shaped a data-aware merge is more than that: the
values our methods resolved (defaults included, per-layer gradients), the calibration data each
model read, how many tokens, and which tensors fell back to the stock rule. The section below is
appended to mergekit's README.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mergekit.common import ModelReference
from mergekit.merge_methods.base import ParameterScope

from mergekit_sparsegpt import __version__
from mergekit_sparsegpt.methods.base import PluginMethod
from mergekit_sparsegpt.methods.context import MergeContext
from mergekit_sparsegpt.methods.registry import plugin_method

CARD_FILE = "README.md"
SECTION_TITLE = "## Data-aware merge: mergekit-sparsegpt"
# Settings of the pre-pass itself, shown once in the calibration line, not in the tables.
CALIBRATION_SETTINGS = (
    "calibration_samples",
    "calibration_seq_len",
    "calibration_batch_size",
    "calibration_field",
    "calibration_split",
    "cache_dir",
)


def describe_values(values: Iterable[Any]) -> str:
    """One value as itself; several as a range (numbers) or a list: they varied by tensor."""
    distinct = sorted(set(values), key=str)
    if not distinct:
        return "–"
    if len(distinct) == 1:
        return str(distinct[0])
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in distinct):
        return f"{min(distinct):g} to {max(distinct):g} (varies by tensor)"
    return ", ".join(str(v) for v in distinct) + " (varies by tensor)"


def card_section(context: MergeContext) -> str:
    """The model card's calibration section for the merge ``context`` was prepared for."""
    facts = context.card_facts
    assert facts is not None, "the pre-pass sets card_facts"
    per_model: dict[ModelReference, list[dict[str, Any]]] = {}
    for tensor in facts.planned:
        for model, values in tensor.per_input.items():
            if model != tensor.base_model:
                per_model.setdefault(model, []).append(values)
    calibration = {model: (source, *shape) for (model, source), shape in facts.windows.items()}
    return calibration_section(
        plugin_method(facts.method_name),
        [tensor.shared for tensor in facts.planned],
        per_model,
        calibration,
        context,
    )


def calibration_section(
    method: PluginMethod,
    shared: list[dict[str, Any]],
    per_model: dict[ModelReference, list[dict[str, Any]]],
    calibration: dict[ModelReference, tuple[str, int, int]],
    context: MergeContext,
) -> str:
    """Markdown for the card.

    ``shared``: each planned tensor's merge-wide values; ``per_model``: each merged model's
    values per tensor; ``calibration``: per model, its calibration source, windows and tokens
    per window (as resolved: the user may have set neither; for a model with a statistics
    folder, "" and the folder's windows).
    """
    name = method.spec.name
    shared_specs = [
        spec.name
        for spec in method.spec.parameters
        if spec.scope == ParameterScope.SHARED and spec.name not in CALIBRATION_SETTINGS
    ]
    model_specs = [
        spec.name for spec in method.spec.parameters if spec.scope != ParameterScope.SHARED
    ]
    lines = [
        SECTION_TITLE,
        "",
        f"Merged with `{name}` (mergekit-sparsegpt {__version__}). Every value below is the one "
        "the merge used, defaults included.",
        "",
        f"Calibration: {_windows_line(calibration.values())}, each model's text "
        "tokenized with the tokenizer of the model it ran through.",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {spec} | {describe_values(v.get(spec) for v in shared)} |" for spec in shared_specs),
        "",
        "| model | calibration data | tokens (windows x length) | "
        + " | ".join(spec for spec in model_specs if spec != "calibration")
        + " |",
        "|---|---|---|" + "---|" * sum(spec != "calibration" for spec in model_specs),
    ]
    for model, values in per_model.items():
        source, windows, seq_len = calibration.get(model, ("–", 0, 0))
        # A model merged from a statistics folder has no calibration source of its own here.
        source = source or "its statistics folder (the `statistics` column)"
        cells = [
            describe_values(v.get(spec) for v in values)
            for spec in model_specs
            if spec != "calibration"
        ]
        tokens = f"{windows * seq_len:,} ({windows} x {seq_len})"
        lines.append(f"| {model} | {source} | {tokens} | " + " | ".join(cells) + " |")
    lines += ["", _usage_line(method, context), ""]
    return "\n".join(lines)


def _windows_line(shapes: Iterable[tuple[str, int, int]]) -> str:
    windows = {count for _, count, _ in shapes}
    lengths = {length for _, _, length in shapes}
    count = f"{windows.pop()} windows" if len(windows) == 1 else "windows (see the table)"
    return f"{count} of {describe_values(lengths)} tokens per model"


def _usage_line(method: PluginMethod, context: MergeContext) -> str:
    counts = [
        f"{label}: {context.usage[(path, 'tensors')]}" for path, label in method.summary_paths
    ]
    return (
        f"Tensors merged per rule: {'; '.join(counts)}. The output head has a Hessian like the "
        "decoder linears, the token embedding its calibration token counts, the norms' scales "
        "their channel energies (norm_rule says which rule used them), and RegMean solves a "
        "linear's bias with its weight; tensors without statistics take the stock rule. "
        "Per-tensor details, with each tensor's kind and the reason for every fallback: "
        "sparsegpt_report.json."
    )


def append_to_card(out_path: str | Path, section: str) -> bool:
    """Append ``section`` to the card mergekit wrote; False when there is none."""
    card = Path(out_path) / CARD_FILE
    if not card.is_file():
        return False
    text = card.read_text(encoding="utf-8")
    card.write_text(text.rstrip("\n") + "\n\n" + section, encoding="utf-8")
    return True
