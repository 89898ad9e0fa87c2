"""Random-weight Llama checkpoints, a tokenizer and calibration text, built locally.

Nothing is downloaded: the tokenizer is trained on the demo corpus (Python's own documentation
and standard-library sources), the models come from a ``LlamaConfig`` with seeded random
weights, saved as sharded safetensors. Speed and memory do not depend on what the weights are,
so random weights measure the same costs as trained ones.

Every directory is written completely before its marker file, and a directory with its marker
is never rebuilt; one without (an interrupted build) is rebuilt from scratch.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from mergekit_sparsegpt.demo.corpus import domain_texts
from mergekit_sparsegpt.demo.tiny import new_model, tiny_llama_config, train_tokenizer

COMPLETE_MARKER = ".complete"
CALIBRATION_DOMAINS = ("prose", "code")  # the calibration file mixes both
# One expert per domain: each reads its own text, so the merge has distinct tasks to calibrate.
EXPERT_DOMAINS = ("prose", "code")
# Tokens are counted per document; the plugin's stream adds an EOS between documents and cuts
# long documents into pieces, which moves the count by a little. The margin covers that.
TOKEN_MARGIN = 1.05


@dataclass(frozen=True)
class Sizes:
    """Model shapes and calibration amounts of one benchmark mode."""

    name: str  # the models directory under --out
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    depths: tuple[int, ...]  # shallowest first: the calibration and merge parts use it
    shard_size: str  # save_pretrained's max_shard_size
    calibration_samples: int  # windows per task in the calibration and depth parts
    calibration_seq_len: int
    merge_calibration_samples: int  # the merge part times merges, not pre-passes: fewer windows
    task_vector_scale: float = 0.01  # expert = base + N(0, (scale * std(tensor))^2)
    seed: int = 0

    @property
    def shallowest(self) -> int:
        return self.depths[0]


# The sizes: 2048 wide, 16 heads (8 KV heads), depths 6 / 12 / 24 (the deepest is
# 1.26 B parameters); the calibration part runs at the plugin's default 128 x 512 windows.
FULL = Sizes(
    name="full",
    hidden=2048,
    intermediate=5632,
    heads=16,
    kv_heads=8,
    vocab=32000,
    depths=(6, 12, 24),
    shard_size="1GB",
    calibration_samples=128,
    calibration_seq_len=512,
    merge_calibration_samples=32,
)
# Seconds on one core; small shards so that even the tiny models are sharded.
# Llama-shaped at a quarter of FULL's width: the whole benchmark in about a quarter of an hour
# on 2 cores, where FULL takes hours.
MEDIUM = Sizes(
    name="medium",
    hidden=1024,
    intermediate=2816,
    heads=16,
    kv_heads=8,
    vocab=32000,
    depths=(4, 8, 16),
    shard_size="500MB",
    calibration_samples=64,
    calibration_seq_len=256,
    merge_calibration_samples=16,
)
QUICK = Sizes(
    name="quick",
    hidden=64,
    intermediate=128,
    heads=4,
    kv_heads=2,
    vocab=512,
    depths=(2, 4, 8),
    shard_size="200KB",
    calibration_samples=8,
    calibration_seq_len=32,
    merge_calibration_samples=8,
)


@dataclass(frozen=True)
class Checkpoints:
    """Where one mode's models, tokenizer and calibration texts live."""

    root: Path
    sizes: Sizes

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def calibration_text(self) -> Path:
        return self.root / "calibration.txt"

    def expert_calibration_text(self, name: str) -> Path:
        return self.root / f"calibration_{name}.txt"

    def base(self, depth: int) -> Path:
        return self.root / f"base_L{depth}"

    def task_alias(self, depth: int) -> Path:
        return self.root / f"task_L{depth}"

    def expert(self, domain: str, depth: int) -> Path:
        return self.root / f"expert_{domain}_L{depth}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def _start(path: Path) -> None:
    """An empty directory for a build, discarding an interrupted one."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _finish(path: Path) -> None:
    (path / COMPLETE_MARKER).write_text("", encoding="utf-8")


def ensure_tokenizer(checkpoints: Checkpoints) -> PreTrainedTokenizerBase:
    """The shared byte-level BPE tokenizer, trained on the corpus' prose and code."""
    path = checkpoints.tokenizer
    if not is_complete(path):
        _start(path)
        texts = [text for domain in CALIBRATION_DOMAINS for text in domain_texts(domain, "train")]
        train_tokenizer(texts, checkpoints.sizes.vocab).save_pretrained(path)
        _finish(path)
    return AutoTokenizer.from_pretrained(path)


def ensure_calibration_texts(checkpoints: Checkpoints, tokenizer: PreTrainedTokenizerBase) -> None:
    """The calibration part's text (prose and code) and one text per expert domain."""
    sizes = checkpoints.sizes
    needed = sizes.calibration_samples * sizes.calibration_seq_len
    _ensure_text(checkpoints.calibration_text, CALIBRATION_DOMAINS, tokenizer, needed)
    needed = sizes.merge_calibration_samples * sizes.calibration_seq_len
    for domain in EXPERT_DOMAINS:
        _ensure_text(checkpoints.expert_calibration_text(domain), (domain,), tokenizer, needed)


def _ensure_text(
    path: Path,
    domains: tuple[str, ...],
    tokenizer: PreTrainedTokenizerBase,
    tokens: int,
    rotate: int = 0,
) -> None:
    """The domains' calibration split, topped up from their train split when it has too few
    tokens (the full sizes need 65,536; a random-weight model does not care which text).
    ``rotate``: start that many documents in, so that texts of one domain differ."""
    marker = path.with_name(path.name + COMPLETE_MARKER)
    if marker.is_file():
        return
    texts = [text for domain in domains for text in domain_texts(domain, "calibration")]
    start = rotate % len(texts)
    texts = texts[start:] + texts[:start]
    spare = [text for domain in domains for text in domain_texts(domain, "train")]
    count = sum(_token_count(tokenizer, text) for text in texts)
    while count < tokens * TOKEN_MARGIN and spare:
        texts.append(spare.pop(0))
        count += _token_count(tokenizer, texts[-1])
    path.write_text("\n\n".join(texts), encoding="utf-8")
    marker.write_text("", encoding="utf-8")


def _token_count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def ensure_base(checkpoints: Checkpoints, depth: int, tokenizer: PreTrainedTokenizerBase) -> Path:
    """The random-weight base of ``depth`` blocks, float32, sharded, with the tokenizer."""
    path = checkpoints.base(depth)
    if not is_complete(path):
        _start(path)
        sizes = checkpoints.sizes
        config = tiny_llama_config(
            sizes.vocab,
            hidden=sizes.hidden,
            layers=depth,
            heads=sizes.heads,
            kv_heads=sizes.kv_heads,
            intermediate=sizes.intermediate,
            max_pos=max(256, sizes.calibration_seq_len),
        )
        model = new_model(config, seed=sizes.seed)
        _save(model, tokenizer, path, sizes.shard_size)
        del model
        _finish(path)
    return path


def ensure_task_alias(checkpoints: Checkpoints, depth: int) -> Path:
    """A second name for the base: a directory of links to its files.

    The pre-pass only calibrates models other than the base, and with ``hessian_source: base``
    it runs the text through the base and reads nothing but the other model's config and tensor
    index; the alias gives it such a model without writing gigabytes of copies.
    """
    base, path = checkpoints.base(depth), checkpoints.task_alias(depth)
    if not is_complete(path):
        _start(path)
        for file in base.iterdir():
            if file.name != COMPLETE_MARKER:
                # Relative, so that the models directory can be moved.
                os.symlink(os.path.relpath(file, path), path / file.name)
        _finish(path)
    return path


def expert_domains(count: int) -> dict[str, str]:
    """Expert name -> the domain of its calibration text: one expert per domain, then more
    taking turns over the domains (``prose_2``, ``code_2``, ``prose_3``, ...)."""
    names = {}
    for index in range(count):
        domain = EXPERT_DOMAINS[index % len(EXPERT_DOMAINS)]
        round_ = index // len(EXPERT_DOMAINS)
        names[domain if round_ == 0 else f"{domain}_{round_ + 1}"] = domain
    return names


def ensure_experts(
    checkpoints: Checkpoints,
    depth: int,
    tokenizer: PreTrainedTokenizerBase,
    count: int = len(EXPERT_DOMAINS),
) -> dict[str, Path]:
    """``count`` "fine-tuned" experts (name -> path), each the base plus a small random task
    vector of its own seed, and each expert's calibration text."""
    experts = {}
    needed = checkpoints.sizes.merge_calibration_samples * checkpoints.sizes.calibration_seq_len
    for index, (name, domain) in enumerate(expert_domains(count).items()):
        # Its own text: a pre-pass through the base would otherwise share one task per text.
        rotate = index // len(EXPERT_DOMAINS)
        text = checkpoints.expert_calibration_text(name)
        _ensure_text(text, (domain,), tokenizer, needed, rotate)
        path = checkpoints.expert(name, depth)
        if not is_complete(path):
            _start(path)
            seed = checkpoints.sizes.seed + 1 + index
            model = _perturbed(checkpoints.base(depth), checkpoints.sizes.task_vector_scale, seed)
            _save(model, tokenizer, path, checkpoints.sizes.shard_size)
            del model
            _finish(path)
        experts[name] = path
    return experts


def _perturbed(base: Path, scale: float, seed: int) -> torch.nn.Module:
    """Every tensor plus N(0, (scale * its std)^2); norm weights (std 0) stay as they are."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(noise.mul_(scale * parameter.std()))
    return model


def _save(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path, shard_size: str
) -> None:
    model.save_pretrained(path, safe_serialization=True, max_shard_size=shard_size)
    tokenizer.save_pretrained(path)


def prepare(out: Path, sizes: Sizes, depths: tuple[int, ...], experts: int) -> Checkpoints:
    """Build whatever the selected parts need and is not on disk yet: the bases of ``depths``
    and ``experts`` experts of the shallowest."""
    checkpoints = Checkpoints(out / "models" / sizes.name, sizes)
    tokenizer = ensure_tokenizer(checkpoints)
    ensure_calibration_texts(checkpoints, tokenizer)
    for depth in depths:
        ensure_base(checkpoints, depth, tokenizer)
        ensure_task_alias(checkpoints, depth)
    if experts:
        ensure_experts(checkpoints, sizes.shallowest, tokenizer, experts)
    return checkpoints
