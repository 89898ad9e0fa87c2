"""Which trimming variant should be the default? Merge the demo's tiny Llama family with stock
`ties` and with `sparsegpt_ties` / `sparsegpt_dare` under every score, Hessian source,
compensation and selection setting, at several densities, and print the normalized score of each
relative to `ties` measured in the same run.

    python benchmarks/trim_variants.py [--work DIR]

Normalized score per expert domain = (base_loss - merged_loss) / (base_loss - expert_loss),
averaged over the experts' domains (1 = every expert's gain kept, 0 = no better than the base).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from mergekit_sparsegpt.demo.__main__ import ARITH_PROBLEMS, FULL, HELDOUT_WINDOWS
from mergekit_sparsegpt.demo.build import EXPERTS, build_family
from mergekit_sparsegpt.demo.evaluate import evaluate, make_eval_set
from mergekit_sparsegpt.demo.merges import merge_configs, run_mergekit, write_config
from mergekit_sparsegpt.trim.importance import COLUMN_WEIGHTS

DENSITIES = (0.1, 0.2, 0.3, 0.5)
# (label, merge method, extra top-level parameters)
VARIANTS: list[tuple[str, str, dict]] = [
    ("ties", "ties", {}),
    ("dare_linear", "dare_linear", {}),
    *[
        (f"sparsegpt_ties[{name}]", "sparsegpt_ties", {"importance": name})
        for name in sorted(COLUMN_WEIGHTS)
    ],
    (
        "sparsegpt_ties[wanda,base]",
        "sparsegpt_ties",
        {"importance": "wanda", "hessian_source": "base"},
    ),
    ("sparsegpt_ties[wanda,row]", "sparsegpt_ties", {"importance": "wanda", "selection": "row"}),
    ("sparsegpt_ties[wanda,comp]", "sparsegpt_ties", {"importance": "wanda", "compensate": True}),
    (
        "sparsegpt_ties[sparsegpt,comp]",
        "sparsegpt_ties",
        {"importance": "sparsegpt", "compensate": True},
    ),
    (
        "sparsegpt_ties[sparsegpt,comp,row]",
        "sparsegpt_ties",
        {"importance": "sparsegpt", "compensate": True, "selection": "row"},
    ),
    ("sparsegpt_dare[wanda]", "sparsegpt_dare", {"importance": "wanda"}),
    ("sparsegpt_dare[wanda,comp]", "sparsegpt_dare", {"importance": "wanda", "compensate": True}),
    (
        "sparsegpt_dare[wanda,comp,norescale]",
        "sparsegpt_dare",
        {"importance": "wanda", "compensate": True, "rescale": False},
    ),
]


def variant_config(template: dict, method: str, extra: dict, density: float) -> dict:
    config = copy.deepcopy(template)
    config["merge_method"] = method
    for model in config["models"]:
        model["parameters"]["density"] = density
        if not method.startswith("sparsegpt"):
            model["parameters"].pop("calibration", None)
    config["parameters"] = (
        {**config["parameters"], **extra} if method.startswith("sparsegpt") else {}
    )
    return config


def normalized(scores: dict[str, float], base: dict[str, float], experts: dict) -> float:
    gains = [
        (base[domain] - scores[domain]) / (base[domain] - experts[name][domain])
        for name, (domain, _) in EXPERTS.items()
    ]
    return sum(gains) / len(gains)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="sparsegpt-importance-"))
    family = build_family(work / "family", FULL)
    template = dict(merge_configs(family, 32, 64))["sparsegpt_ties"]
    template["parameters"]["cache_dir"] = str(work / "cache")
    tokenizer = AutoTokenizer.from_pretrained(str(family.tokenizer))
    evalset = make_eval_set(tokenizer, HELDOUT_WINDOWS, FULL.seq_len, ARITH_PROBLEMS)
    base = evaluate(family.base, tokenizer, evalset)
    experts = {name: evaluate(path, tokenizer, evalset) for name, path in family.experts.items()}

    results: dict[tuple[str, float], float] = {}
    prose: dict[tuple[str, float], float] = {}
    for density in DENSITIES:
        for name, method, extra in VARIANTS:
            start = time.perf_counter()
            label = f"{name}@{density}".replace("[", "_").replace("]", "").replace(",", "_")
            config_path = write_config(
                variant_config(template, method, extra, density), work / f"{label}.yaml"
            )
            merged = run_mergekit(config_path, work / f"merge_{label}")
            scores = evaluate(merged, tokenizer, evalset)
            results[(name, density)] = normalized(scores, base, experts)
            prose[(name, density)] = scores["prose"]
            seconds = time.perf_counter() - start
            print(f"{name:<38} density {density:<4} {seconds:5.1f}s", flush=True)

    print("\nnormalized score (ratio to ties at the same density); prose loss in brackets")
    print(f"{'method':<38}" + "".join(f"{f'density {d}':>26}" for d in DENSITIES))
    for name, _, _ in VARIANTS:
        cells = "".join(
            f"{results[(name, d)]:>9.3f} ({results[(name, d)] / results[('ties', d)]:5.3f}) "
            f"[{prose[(name, d)]:.3f}]"
            for d in DENSITIES
        )
        print(f"{name:<38}{cells}")
    print(f"\nbase prose loss {base['prose']:.3f}; work dir {work}")


if __name__ == "__main__":
    main()
