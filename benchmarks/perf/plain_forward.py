"""A plain forward pass: the reference the plugin's pre-pass is timed against.

    python benchmarks/perf/plain_forward.py MODEL_DIR TOKENS.pt BATCH_SIZE

As a script it is the ``process`` part's whole-process reference: what a user who wants
nothing but the calibration tokens pushed through the model runs with transformers alone. It
imports torch and transformers only (not mergekit, not the plugin: checked), loads the model
in float32, runs it over the int64 ``[windows, seq_len]`` tensor saved in ``TOKENS.pt``, batch
by batch, and prints one JSON line: seconds spent importing, loading and running, the token
count, and whether anything imported mergekit. ``forward_batches`` is the forward pass itself,
shared with the in-process ``calibration`` part.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def forward_batches(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> None:
    """``model`` over ``windows``, ``batch_size`` windows at a time, as a plain user would."""
    import torch

    with torch.inference_mode():
        for batch in windows.split(batch_size):
            # use_cache=False: the pre-pass keeps no KV cache either.
            model(input_ids=batch, use_cache=False)


def mergekit_imported() -> bool:
    return any(name == "mergekit" or name.startswith("mergekit.") for name in sys.modules)


def main(argv: list[str]) -> dict[str, Any]:
    model_dir, tokens_file, batch_size = argv
    start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM

    imported = time.perf_counter()
    windows = torch.load(tokens_file, weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded = time.perf_counter()
    forward_batches(model, windows, int(batch_size))
    done = time.perf_counter()
    return {
        "import_s": imported - start,
        "load_s": loaded - imported,
        "forward_s": done - loaded,
        "tokens": windows.numel(),
        "mergekit_imported": mergekit_imported(),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
