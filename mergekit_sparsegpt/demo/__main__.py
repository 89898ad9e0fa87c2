"""Main job on a built-in default: stock TIES against the plugin's methods on a tiny Llama family.

``python -m mergekit_sparsegpt.demo [--out DIR] [--quick]`` trains a prose base and two
experts (stdlib code, arithmetic) on CPU, merges them with every method in
:func:`merges.merge_configs` through the stock ``mergekit-yaml`` CLI (side by side, one process
per merge), and prints the held-out losses and each merge's normalized score against ``ties``.
Exit status: 0 when every merge ran and every expert beats the base on its own domain.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from mergekit_sparsegpt.demo.build import EXPERTS, Family, Sizes, build_family
from mergekit_sparsegpt.demo.corpus import sources
from mergekit_sparsegpt.demo.evaluate import (
    EvalSet,
    evaluate,
    format_scores,
    format_table,
    make_eval_set,
)
from mergekit_sparsegpt.demo.merges import MergeFailed, merge_configs, run_mergekit, write_config

FULL = Sizes()
QUICK = Sizes(vocab=512, train_windows=600, base_steps=150, expert_steps=40)
# Calibration budget of the sparsegpt merge: 32 x 64 tokens fits every calibration split.
CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN = 32, 64
HELDOUT_WINDOWS, ARITH_PROBLEMS = 48, 200


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mergekit_sparsegpt.demo", description=__doc__)
    parser.add_argument("--out", type=Path, help="work directory (default: a new temp dir)")
    parser.add_argument("--quick", action="store_true", help="smaller, faster smoke run")
    return parser.parse_args(argv)


def run_merges(family: Family, out: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Run every configured merge; returns (name -> output dir, name -> error).

    The merges run side by side: each is mostly a mergekit start-up on one core.
    """
    configs = merge_configs(family, CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN)
    start = time.perf_counter()

    def merge(name: str, config: dict) -> Path:
        cfg_path = write_config(config, out / f"{name}.yaml")
        merged = run_mergekit(cfg_path, out / f"merge_{name}", threads=1)
        print(f"merged {name} in {time.perf_counter() - start:.1f}s", flush=True)
        return merged

    with ThreadPoolExecutor(max_workers=len(configs)) as pool:
        futures = {name: pool.submit(merge, name, config) for name, config in configs}
    done: dict[str, Path] = {}
    failed: dict[str, str] = {}
    for name, future in futures.items():
        try:
            done[name] = future.result()
        except MergeFailed as err:
            failed[name] = str(err)
            print(f"merge {name} FAILED", flush=True)
    return done, failed


def score_all(
    family: Family, merged: dict[str, Path], evalset: EvalSet
) -> dict[str, dict[str, float]]:
    tokenizer = AutoTokenizer.from_pretrained(str(family.tokenizer))
    paths = {"base": family.base}
    paths.update({f"expert:{n}": p for n, p in family.experts.items()})
    paths.update({f"merge:{n}": p for n, p in merged.items()})
    return {name: evaluate(path, tokenizer, evalset) for name, path in paths.items()}


def expert_checks(rows: dict[str, dict[str, float]]) -> bool:
    """Print whether each expert beats the base on its own domain's held-out loss."""
    ok = True
    for name, (domain, _) in EXPERTS.items():
        base, expert = rows["base"][domain], rows[f"expert:{name}"][domain]
        wins = expert < base - 0.1  # "clearly": a margin well above run-to-run noise
        ok &= wins
        verdict = "yes" if wins else "NO"
        print(f"{name} expert beats base on {domain}: {verdict} ({expert:.3f} vs {base:.3f})")
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # for scoring too; see tiny.torch_threads for why
    start = time.perf_counter()
    # Absolute, so the configs name local directories whatever the working directory.
    out = (args.out or Path(tempfile.mkdtemp(prefix="sparsegpt-demo-"))).resolve()
    sizes = QUICK if args.quick else FULL
    print(f"work dir: {out}", flush=True)
    family = build_family(out, sizes)
    (out / "sources.json").write_text(json.dumps(sources(), indent=1), encoding="utf-8")
    print(f"built base + {len(family.experts)} experts in {time.perf_counter() - start:.1f}s")
    merged, failed = run_merges(family, out)
    tokenizer = AutoTokenizer.from_pretrained(str(family.tokenizer))
    evalset = make_eval_set(tokenizer, HELDOUT_WINDOWS, sizes.seq_len, ARITH_PROBLEMS)
    rows = score_all(family, merged, evalset)
    print()
    print(format_table(rows))
    print()
    expert_domains = {f"expert:{name}": domain for name, (domain, _) in EXPERTS.items()}
    print(format_scores(rows, expert_domains, reference="merge:ties"))
    print()
    experts_ok = expert_checks(rows)
    for name, error in failed.items():
        print(f"\nmerge {name} failed:\n{error}")
    print(f"\ntotal runtime {time.perf_counter() - start:.1f}s")
    return 0 if experts_ok and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
