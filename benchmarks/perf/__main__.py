"""Performance benchmark: pre-pass speed, in process and as whole processes, pre-pass memory
across depths, merge phase.

    python -m benchmarks.perf [--out DIR] [--quick]
                              [--only calibration,process,depth,merge,experts]
                              [--size quick|medium|full] [--repeats N] [--threads N]

Run from the repository root. Builds random-weight Llama checkpoints under DIR/models/ (once;
later runs reuse them), works in DIR/work/, and writes <part>.json and <part>.txt per part run,
plus results.txt with the tables of this run. Every number is printed as a ratio against a
reference measured in the same run. The experts part (2 vs 5 experts) runs only when --only
names it. See benchmarks/perf/README.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from benchmarks.perf import calibration, depth, experts, merge, process
from benchmarks.perf.models import (
    FULL,
    MEDIUM,
    QUICK,
    Checkpoints,
    Sizes,
    expert_domains,
    prepare,
)
from benchmarks.perf.report import PartResult, format_part, write_part
from mergekit_sparsegpt.demo.tiny import torch_threads

DEFAULT_PARTS = (calibration.PART, process.PART, depth.PART, merge.PART)
# Not run by default: 18 subprocesses with up to 5 experts, about a quarter of an hour at
# --size medium and hours at full size, on top of the default parts' own hours.
PARTS = (*DEFAULT_PARTS, experts.PART)
MERGE_EXPERTS = 2
SIZES = {sizes.name: sizes for sizes in (QUICK, MEDIUM, FULL)}
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
QUICK_REPEATS, FULL_REPEATS = 1, 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.perf",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    parser.add_argument("--quick", action="store_true", help="tiny models: --size quick")
    parser.add_argument(
        "--size",
        choices=list(SIZES),
        help="model sizes (default full; medium: width 1024, depths 4/8/16, ~15 min on 2 cores)",
    )
    parser.add_argument(
        "--only",
        type=_part_names,
        default=DEFAULT_PARTS,
        help=f"comma-separated subset of {PARTS} (default: {', '.join(DEFAULT_PARTS)})",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"timed runs per measurement, medians reported (default {FULL_REPEATS}, "
        f"--quick {QUICK_REPEATS}; the experts part: {experts.REPEATS})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads, in-process and in every subprocess (default: torch's own "
        "choice; --quick 1, as tiny matmuls gain nothing from threads)",
    )
    parser.add_argument(
        "--importance",
        help="the depth part's importance score (default: the plugin's, whose pre-pass "
        "accumulates diag H alone; obs: whole Hessians)",
    )
    args = parser.parse_args(argv)
    if args.quick and args.size not in (None, QUICK.name):
        parser.error("--quick is --size quick")
    args.size = QUICK.name if args.quick else args.size or FULL.name
    args.quick = args.size == QUICK.name
    args.experts_repeats = args.repeats or experts.REPEATS
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else FULL_REPEATS
    if args.threads is None:
        args.threads = 1 if args.quick else torch.get_num_threads()
    if args.repeats < 1 or args.experts_repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    return args


def _part_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"parts are {', '.join(PARTS)}; got {text!r}")
    return tuple(name for name in PARTS if name in names)  # always in the order above


def depths_needed(parts: tuple[str, ...], sizes: Sizes) -> tuple[int, ...]:
    return sizes.depths if depth.PART in parts else (sizes.shallowest,)


def experts_needed(parts: tuple[str, ...]) -> int:
    """How many experts of the shallowest base the selected parts merge."""
    needed = [MERGE_EXPERTS] if merge.PART in parts else []
    if experts.PART in parts:
        needed.append(max(experts.EXPERT_COUNTS))
    return max(needed, default=0)


def part_runners(
    checkpoints: Checkpoints, args: argparse.Namespace, work: Path
) -> dict[str, Callable[[], PartResult]]:
    shallowest = checkpoints.sizes.shallowest
    merged = {name: checkpoints.expert(name, shallowest) for name in expert_domains(MERGE_EXPERTS)}
    threads = args.threads
    return {
        calibration.PART: lambda: calibration.run(checkpoints, args.repeats, threads, work),
        process.PART: lambda: process.run(args.out, checkpoints.sizes, args.repeats, threads, work),
        depth.PART: lambda: depth.run(checkpoints, args.repeats, threads, work, args.importance),
        merge.PART: lambda: merge.run(checkpoints, merged, args.repeats, threads, work),
        experts.PART: lambda: experts.run(checkpoints, args.experts_repeats, threads, work),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    sizes = SIZES[args.size]
    depths = depths_needed(args.only, sizes)
    with torch_threads(args.threads):
        checkpoints = prepare(args.out, sizes, depths, experts=experts_needed(args.only))
    work = args.out / "work" / sizes.name
    runners = part_runners(checkpoints, args, work)
    tables = []
    for part in args.only:
        repeats = args.experts_repeats if part == experts.PART else args.repeats
        settings = f"{sizes.name} sizes, {repeats} repeat(s), {args.threads} thread(s)"
        print(f"running {part} ({settings})", flush=True)
        result = runners[part]()
        write_part(result, args.out)
        tables.append(format_part(result))
        print(tables[-1] + "\n", flush=True)
    (args.out / "results.txt").write_text("\n\n".join(tables) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
