"""Build the tiny model family: a prose-pretrained base and two gently fine-tuned experts.

Shared by the demo (``python -m mergekit_sparsegpt.demo``) and the test fixture, which only
differ in :class:`Sizes`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, PreTrainedTokenizerFast

from mergekit_sparsegpt.demo.corpus import DOMAINS, domain_texts
from mergekit_sparsegpt.demo.tiny import (
    new_model,
    save_model,
    tiny_llama_config,
    token_windows,
    torch_threads,
    train_causal_lm,
    train_tokenizer,
)

# Expert name -> (domain it is fine-tuned on, calibration file format).
# One .txt and one .jsonl so a merge exercises both calibration readers.
EXPERTS: dict[str, tuple[str, str]] = {
    "code": ("code", "txt"),
    "arithmetic": ("arithmetic", "jsonl"),
}


@dataclass(frozen=True)
class Sizes:
    """Every knob that trades runtime for model quality."""

    vocab: int = 1024
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    seq_len: int = 64
    train_windows: int = 1500
    batch_size: int = 32
    base_steps: int = 300  # more overfits the ~110k prose tokens (held-out loss rises)
    base_lr: float = 3e-3
    expert_steps: int = 100  # the same for every expert
    expert_lr: float = 1e-3
    expert_batch_size: int = 16
    seed: int = 0
    threads: int = 1  # see tiny.torch_threads: one thread is the robust choice at this size
    tied: bool = False  # one tensor for the token embedding and lm_head (Qwen2's small models)


@dataclass(frozen=True)
class Family:
    """Paths of a built family; every model directory also holds the tokenizer."""

    root: Path
    base: Path
    experts: dict[str, Path]
    calibration: dict[str, Path]
    tokenizer: Path


def build_family(root: str | Path, sizes: Sizes) -> Family:
    """Train tokenizer, base and experts; save them and each expert's calibration split."""
    with torch_threads(sizes.threads):
        return _build_family(Path(root), sizes)


def _build_family(root: Path, sizes: Sizes) -> Family:
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(_tokenizer_texts(), sizes.vocab)
    tokenizer.save_pretrained(root / "tokenizer")
    base = _train_base(tokenizer, sizes)
    save_model(base, tokenizer, root / "base")
    experts: dict[str, Path] = {}
    calibration: dict[str, Path] = {}
    for i, (name, (domain, fmt)) in enumerate(EXPERTS.items()):
        expert = _finetune(base, domain, tokenizer, sizes, seed=sizes.seed + 1 + i)
        experts[name] = save_model(expert, tokenizer, root / f"expert_{name}")
        calibration[name] = write_calibration(domain, root / f"calibration_{name}.{fmt}")
    return Family(root, root / "base", experts, calibration, root / "tokenizer")


def _tokenizer_texts() -> list[str]:
    # One tokenizer for all domains: mergekit merges need identical vocabularies.
    return [text for domain in DOMAINS for text in domain_texts(domain, "train")]


def sized_config(vocab_size: int, sizes: Sizes) -> LlamaConfig:
    """The tiny Llama config that ``sizes`` describes."""
    return tiny_llama_config(
        vocab_size,
        hidden=sizes.hidden,
        layers=sizes.layers,
        heads=sizes.heads,
        kv_heads=sizes.kv_heads,
        intermediate=sizes.intermediate,
        max_pos=max(256, sizes.seq_len),
        tied=sizes.tied,
    )


def _train_base(tokenizer: PreTrainedTokenizerFast, sizes: Sizes) -> torch.nn.Module:
    """General-text base: pretrained on prose only, so code and arithmetic are new skills."""
    model = new_model(sized_config(len(tokenizer), sizes), seed=sizes.seed)
    windows = domain_windows("prose", "train", tokenizer, sizes.train_windows, sizes.seq_len)
    train_causal_lm(model, windows, sizes.base_steps, sizes.base_lr, sizes.batch_size, sizes.seed)
    return model


def _finetune(
    base: torch.nn.Module,
    domain: str,
    tokenizer: PreTrainedTokenizerFast,
    sizes: Sizes,
    seed: int,
) -> torch.nn.Module:
    """Gentle fine-tune (small lr, few steps) so task vectors stay small, as merging assumes."""
    model = copy.deepcopy(base)
    windows = domain_windows(domain, "train", tokenizer, sizes.train_windows, sizes.seq_len)
    train_causal_lm(
        model, windows, sizes.expert_steps, sizes.expert_lr, sizes.expert_batch_size, seed
    )
    return model


def domain_windows(
    domain: str, split: str, tokenizer: PreTrainedTokenizerFast, n: int, seq_len: int
) -> torch.Tensor:
    """Up to ``n`` windows of one domain split (fewer when the split is shorter)."""
    return token_windows(domain_texts(domain, split), tokenizer, n, seq_len)


def write_calibration(domain: str, path: Path) -> Path:
    """The domain's calibration split as plain text (.txt) or one record per text (.jsonl)."""
    texts = domain_texts(domain, "calibration")
    if path.suffix == ".jsonl":
        lines = (json.dumps({"text": t}, ensure_ascii=False) for t in texts)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        path.write_text("\n\n".join(texts), encoding="utf-8")
    return path
