"""Build the benchmark's model family: a prose base and one gently fine-tuned expert per task.

Every checkpoint directory gets a ``trained.json`` marker once it is complete, so an
interrupted build resumes where it stopped. Experts train in parallel processes.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from benchmarks.quality.tasks import Domain, domains
from mergekit_sparsegpt.demo.build import Family, Sizes, sized_config
from mergekit_sparsegpt.demo.tiny import (
    load_model,
    new_model,
    save_model,
    token_windows,
    torch_threads,
    train_causal_lm,
    train_tokenizer,
)

BASE_DOMAIN = "prose"
MARKER = "trained.json"

# Measured on 2 cores: base ~100 s, each expert ~25 s. 4 layers and a 2:1 MLP keep the decoder
# linears (which get Hessians) at 70% of the weights, the rest being embeddings and lm_head.
# Experts: 200 steps at 3e-4 move the weights by ~14% (relative L2) and teach the sort task to
# ~60% exact match; 1e-3 teaches every task but costs the base most of its English.
FULL = Sizes(
    vocab=1024,
    hidden=128,
    layers=4,
    heads=4,
    kv_heads=2,
    intermediate=256,
    seq_len=64,
    train_windows=3000,
    batch_size=32,
    base_steps=400,
    base_lr=2e-3,
    expert_steps=200,
    expert_lr=3e-4,
    expert_batch_size=16,
)
QUICK = Sizes(
    vocab=400,
    hidden=32,
    layers=2,
    heads=4,
    kv_heads=2,
    intermediate=64,
    seq_len=32,
    train_windows=300,
    batch_size=16,
    base_steps=40,
    base_lr=3e-3,
    expert_steps=30,
    expert_lr=2e-3,
    expert_batch_size=8,
)


def _done(path: Path) -> bool:
    return (path / MARKER).is_file()


def _mark(path: Path, info: dict) -> None:
    (path / MARKER).write_text(json.dumps(info, indent=1), encoding="utf-8")


def _tokenizer(root: Path, found: dict[str, Domain], vocab: int) -> PreTrainedTokenizerFast:
    path = root / "tokenizer"
    if (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(path))
    # One tokenizer for every domain: mergekit merges need identical vocabularies.
    texts = [t for d in found.values() for t in d.texts("train")]
    tokenizer = train_tokenizer(texts, vocab)
    tokenizer.save_pretrained(path)
    return tokenizer


def _windows(domain: Domain, tokenizer: PreTrainedTokenizerFast, sizes: Sizes) -> torch.Tensor:
    return token_windows(domain.texts("train"), tokenizer, sizes.train_windows, sizes.seq_len)


def _train_base(root: Path, tokenizer: PreTrainedTokenizerFast, sizes: Sizes) -> None:
    path = root / "base"
    if _done(path):
        return
    start = time.perf_counter()
    model = new_model(sized_config(len(tokenizer), sizes), seed=sizes.seed)
    windows = _windows(domains()[BASE_DOMAIN], tokenizer, sizes)
    losses = train_causal_lm(
        model, windows, sizes.base_steps, sizes.base_lr, sizes.batch_size, sizes.seed
    )
    save_model(model, tokenizer, path)
    seconds = time.perf_counter() - start
    _mark(path, {"domain": BASE_DOMAIN, "final_train_loss": losses[-1], "seconds": seconds})
    print(f"trained base on {BASE_DOMAIN} in {seconds:.0f}s", flush=True)


def train_expert(root: str, name: str, sizes: Sizes, seed: int) -> str:
    """Fine-tune a copy of the base on one domain (runs in a worker process)."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = Path(root) / f"expert_{name}"
    start = time.perf_counter()
    with torch_threads(sizes.threads):
        tokenizer = AutoTokenizer.from_pretrained(str(Path(root) / "tokenizer"))
        model = copy.deepcopy(load_model(Path(root) / "base"))
        windows = _windows(domains()[name], tokenizer, sizes)
        losses = train_causal_lm(
            model, windows, sizes.expert_steps, sizes.expert_lr, sizes.expert_batch_size, seed
        )
        save_model(model, tokenizer, path)
    seconds = time.perf_counter() - start
    _mark(path, {"domain": name, "final_train_loss": losses[-1], "seconds": seconds})
    return f"trained expert {name} in {seconds:.0f}s"


def _train_experts(root: Path, names: Iterable[str], sizes: Sizes, jobs: int) -> None:
    todo = [(i, n) for i, n in enumerate(names) if not _done(root / f"expert_{n}")]
    if not todo:
        return
    # spawn, not fork: the parent has already run torch, and forked OpenMP pools can hang.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [
            pool.submit(train_expert, str(root), n, sizes, sizes.seed + 1 + i) for i, n in todo
        ]
        for future in futures:
            print(future.result(), flush=True)


def _write_calibration(root: Path, domain: Domain) -> Path:
    path = root / f"calibration_{domain.name}.txt"
    if not path.is_file():
        path.write_text("\n\n".join(domain.texts("calibration")), encoding="utf-8")
    return path


def build_family(root: Path, sizes: Sizes, jobs: int = 2) -> Family:
    """Tokenizer, base and experts (skipping finished ones) plus each expert's calibration."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sizes.json").write_text(json.dumps(asdict(sizes), indent=1), encoding="utf-8")
    found = domains()
    names = [n for n in found if n != BASE_DOMAIN]
    with torch_threads(sizes.threads):
        tokenizer = _tokenizer(root, found, sizes.vocab)
        _train_base(root, tokenizer, sizes)
    _train_experts(root, names, sizes, jobs)
    return Family(
        root=root,
        base=root / "base",
        experts={n: root / f"expert_{n}" for n in names},
        calibration={n: _write_calibration(root, found[n]) for n in names},
        tokenizer=root / "tokenizer",
    )
