"""Tiny-model toolkit: tokenizer, Llama config, training loop, held-out loss, saving.

Everything runs float32 on CPU and is seeded, so demo and test numbers are reproducible.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [PAD, BOS, EOS]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Temporarily run torch ops on ``n`` CPU threads.

    Tiny matmuls gain nothing from threads, and on a busy 2-core machine two spinning threads
    made training steps ~25x slower than one, so build_family and the demo use one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with <pad>/<s>/</s> (ids 0/1/2)."""
    tok = Tokenizer(models.BPE())
    # Single digits keep arithmetic learnable (no "123" merges); byte-level covers any text.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )


def tiny_llama_config(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_pos: int = 256,
    tied: bool = False,
) -> LlamaConfig:
    """A small Llama config; by default untied embeddings, so mergekit sees a separate
    lm_head."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tied,
        # No pad_token_id: it would make <pad> a zero, gradient-free embedding row (padding_idx)
        # and so the one weight a fine-tune can never change. Windows never contain padding.
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
    )


def new_model(config: LlamaConfig, seed: int = 0) -> PreTrainedModel:
    """Randomly initialised float32 model; the seed fixes the initial weights."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.float()


def token_windows(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerFast, n: int, seq_len: int
) -> torch.Tensor:
    """Up to ``n`` contiguous ``seq_len`` windows of the texts joined as <s>text</s>...

    Fewer than ``n`` come back when the texts are too short; none at all is an error.
    """
    need = n * seq_len
    ids: list[int] = []
    for text in texts:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if len(ids) >= need:
            break  # avoid tokenising far more text than needed
    count = min(n, len(ids) // seq_len)
    if count == 0:
        raise ValueError(f"only {len(ids)} tokens: not even one window of {seq_len}")
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def train_causal_lm(
    model: PreTrainedModel,
    token_windows: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.01,
) -> list[float]:
    """Next-token training with AdamW on random batches of windows; returns per-step losses.

    The (AdamW-default) decoupled weight decay also moves weights that get no gradient, e.g.
    embedding rows of tokens absent from ``token_windows``, so a fine-tune changes every weight.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    for _ in range(steps):
        idx = torch.randint(len(token_windows), (batch_size,), generator=gen)
        batch = token_windows[idx]
        loss = _mean_ce(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _mean_ce(model: PreTrainedModel, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def load_model(path: str | os.PathLike) -> PreTrainedModel:
    """Load a saved checkpoint as float32 in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.float().eval()


@torch.no_grad()
def heldout_loss(
    model_or_path: PreTrainedModel | str | os.PathLike,
    windows: torch.Tensor,
    batch_size: int = 32,
) -> float:
    """Mean next-token cross-entropy over all predicted positions of ``windows``."""
    model = model_or_path
    if not isinstance(model, PreTrainedModel):
        model = load_model(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def greedy_complete(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    max_new_tokens: int = 6,
    stop: str = "\n",
) -> list[str]:
    """Greedy continuation of each prompt (after <s>), cut at the first ``stop``."""
    model.eval()
    encoded = [
        [tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]]
        for p in prompts
    ]
    # Batch prompts of equal token length together: no padding or attention masks needed.
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    out = [""] * len(prompts)
    for idxs in by_len.values():
        seqs = torch.tensor([encoded[i] for i in idxs], dtype=torch.long)
        for _ in range(max_new_tokens):
            next_ids = model(input_ids=seqs).logits[:, -1].argmax(-1, keepdim=True)
            seqs = torch.cat([seqs, next_ids], dim=1)
        start = len(encoded[idxs[0]])
        for row, i in enumerate(idxs):
            text = tokenizer.decode(seqs[row, start:], skip_special_tokens=False)
            out[i] = text.split(stop)[0].split(tokenizer.eos_token)[0]
    return out


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str | os.PathLike
) -> Path:
    """Write a safetensors checkpoint plus tokenizer that mergekit and from_pretrained read."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
