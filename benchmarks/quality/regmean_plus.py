"""Does RegMean gain from the merged model's own activations (RegMean++)? An experiment.

    python -m benchmarks.quality.regmean_plus OUT

OUT is a finished ``python -m benchmarks.quality`` run (its family, calibration files and
reference scores). RegMean fits each linear to every expert's outputs on that expert's inputs,
but the merged model feeds each linear the *merged* model's activations. RegMean++ (Nguyen et
al. 2025, https://arxiv.org/abs/2508.03121) takes each task's inputs from the merged model
instead, which makes the merge sequential: a linear's inputs exist only once everything before
it is merged. Three ways to get task i's Gram matrix of a linear, all merged in-process with the
package's own solve (``regmean_delta``) and the same calibration windows as the plugin:

* ``own``: expert i's forward pass on its calibration text (the plugin's ``regmean``; its score
  must match the grid's ``regmean`` row, which checks this script);
* ``merged_block``: the decoder block's input from the merged blocks before it, the block's
  inside from expert i (cross-layer only);
* ``merged``: every linear's input from the merged model, sublayer by sublayer (RegMean++).

Tensors without a Gram matrix are task arithmetic x ``nongram_scale`` in every mode.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from benchmarks.quality import tasks
from benchmarks.quality.__main__ import (
    CALIBRATION_SAMPLES,
    CALIBRATION_SEQ_LEN,
    HELDOUT_PROBLEMS,
    HELDOUT_WINDOWS,
    VALIDATION_SPLIT,
)
from benchmarks.quality.scoring import EvalSet, evaluate, make_eval_set, normalized_gains
from mergekit_sparsegpt.calibration.source import CalibrationSource
from mergekit_sparsegpt.calibration.texts import read_calibration_texts
from mergekit_sparsegpt.calibration.windows import calibration_windows
from mergekit_sparsegpt.demo.tiny import load_model
from mergekit_sparsegpt.methods.solve import regmean_delta

MODES = ("own", "merged_block", "merged")
# A Llama block's linears in the order the forward pass reaches them; linears in one stage read
# the same input.
STAGES = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
BATCH = 8


class _Reached(Exception):
    """Raised once every hooked linear has seen its input: the rest of the forward is unused."""


@torch.no_grad()
def input_grams(
    model: PreTrainedModel, windows: torch.Tensor, linears: Sequence[str]
) -> dict[str, torch.Tensor]:
    """sum over all tokens of x x^T of each named linear's input (float64), one forward each
    batch, stopped after the last of them has run."""
    modules = dict(model.named_modules())
    grams: dict[str, torch.Tensor] = {}
    last = max(linears, key=list(modules).index)

    def hook(name: str) -> Callable:
        def record(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            grams[name] = grams.get(name, 0) + x.T @ x
            if name == last:
                raise _Reached

        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in linears]
    try:
        for batch in windows.split(BATCH):
            try:
                model(input_ids=batch)
            except _Reached:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return grams


def regmean_merge(
    base: PreTrainedModel,
    experts: Sequence[PreTrainedModel],
    windows: Sequence[torch.Tensor],
    mode: str,
    nongram_scale: float = 0.2,
    alpha: float = 1.0,
) -> PreTrainedModel:
    """The merged model; every linear of every block is solved in forward order."""
    merged = copy.deepcopy(base)
    base_params = dict(base.named_parameters())
    expert_params = [dict(e.named_parameters()) for e in experts]
    prefix = "model.layers"
    with torch.no_grad():
        for name, param in merged.named_parameters():
            if not _is_block_linear(name):
                tau_sum = sum(p[name] - base_params[name] for p in expert_params)
                param.copy_(base_params[name] + nongram_scale * tau_sum)
        for layer in range(len(base.model.layers)):
            hybrids = _hybrids(merged, experts, layer) if mode == "merged_block" else None
            for stage in STAGES:
                names = [f"{prefix}.{layer}.{linear}" for linear in stage]
                sources = {
                    "own": experts,
                    "merged_block": hybrids,
                    "merged": [merged] * len(experts),
                }
                grams = [
                    input_grams(model, w, names)
                    for model, w in zip(sources[mode], windows, strict=True)
                ]
                for name in names:
                    weight = f"{name}.weight"
                    taus = [p[weight] - base_params[weight] for p in expert_params]
                    delta = regmean_delta(taus, [g[name] for g in grams], [1.0] * len(taus), alpha)
                    merged.get_parameter(weight).copy_(base_params[weight] + delta.delta.float())
    return merged


def _is_block_linear(name: str) -> bool:
    return name.startswith("model.layers.") and any(
        name.endswith(f"{linear}.weight") for stage in STAGES for linear in stage
    )


def _hybrids(
    merged: PreTrainedModel, experts: Sequence[PreTrainedModel], layer: int
) -> list[PreTrainedModel]:
    """Per expert: the merged model so far with that expert's block ``layer``."""
    hybrids = []
    for expert in experts:
        hybrid = copy.deepcopy(merged)
        hybrid.model.layers[layer].load_state_dict(expert.model.layers[layer].state_dict())
        hybrids.append(hybrid)
    return hybrids


def _score(model: PreTrainedModel, evalset: EvalSet, base: dict, experts: dict[str, dict]) -> float:
    gains = normalized_gains(evaluate(model, evalset), base, experts)
    return statistics.fmean(gains.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.regmean_plus")
    parser.add_argument("out", type=Path, help="a finished benchmark --out directory")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    family = args.out / "family"
    reference = json.loads((args.out / "reference.json").read_text(encoding="utf-8"))
    names = list(reference["experts"])
    tokenizer = AutoTokenizer.from_pretrained(str(family / "tokenizer"))
    seq_len = json.loads((family / "sizes.json").read_text(encoding="utf-8"))["seq_len"]
    domains = tasks.domains()
    heldout = make_eval_set(tokenizer, domains, HELDOUT_WINDOWS, seq_len, HELDOUT_PROBLEMS)
    validation = make_eval_set(
        tokenizer, domains, HELDOUT_WINDOWS, seq_len, HELDOUT_PROBLEMS, VALIDATION_SPLIT
    )
    base = load_model(family / "base")
    experts = [load_model(family / f"expert_{n}") for n in names]
    windows = []
    for name in names:
        path = str(family / f"calibration_{name}.txt")
        texts = read_calibration_texts(CalibrationSource(path), name)
        windows.append(
            calibration_windows(
                texts, tokenizer, CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN, name, path
            )
        )
    val_ref = reference[VALIDATION_SPLIT]
    rows = {}
    for mode in args.modes.split(","):
        merged = regmean_merge(base, experts, windows, mode).eval()
        rows[mode] = (
            _score(merged, heldout, reference["base"], reference["experts"]),
            _score(merged, validation, val_ref["base"], {n: val_ref[n] for n in names}),
        )
        held, valid = rows[mode]
        print(f"{mode:<14} held-out {held:.3f}  validation {valid:.3f}", flush=True)
    grid_row = args.out / "results" / "regmean__dense__s0.json"
    if grid_row.is_file():
        scores = json.loads(grid_row.read_text(encoding="utf-8"))["scores"]
        plugin = statistics.fmean(
            normalized_gains(scores, reference["base"], reference["experts"]).values()
        )
        print(f"plugin regmean (grid row) held-out {plugin:.3f}")
    (args.out / "regmean_plus.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
