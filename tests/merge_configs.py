"""Merge configs over the `tiny_models` fixture, shared by the in-process and CLI tests."""

from typing import Any


def sparsegpt_config(
    tiny_models, method: str = "sparsegpt_ties", density: float = 0.3, **shared: Any
) -> dict[str, Any]:
    """Both experts, weight 1, calibration sized to the fixture's files; ``shared`` adds to or
    overrides the top-level parameters."""
    return {
        "merge_method": method,
        "base_model": str(tiny_models.base),
        "models": [
            {
                "model": str(tiny_models.experts[name]),
                "parameters": {
                    "weight": 1.0,
                    "density": density,
                    "calibration": str(tiny_models.calibration[name]),
                },
            }
            for name in sorted(tiny_models.experts)
        ],
        "parameters": {"calibration_samples": 8, "calibration_seq_len": 32, **shared},
        "dtype": "float32",
    }


def regmean_config(tiny_models, method: str = "regmean", **shared: Any) -> dict[str, Any]:
    """``sparsegpt_config`` for the RegMean methods: ``regmean`` has no density, and
    ``sparsegpt_regmean`` gets density 0.5. Hessians from each fine-tuned model unless
    ``hessian_source`` says otherwise (the default, merged, has tests of its own)."""
    shared.setdefault("hessian_source", "finetuned")
    config = sparsegpt_config(tiny_models, method, 0.5, **shared)
    if method == "regmean":
        for entry in config["models"]:
            del entry["parameters"]["density"]
    return config
