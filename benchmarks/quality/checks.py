"""Sanity checks that decide whether the benchmark's ranking can be trusted at all."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

from benchmarks.quality.scoring import EvalSet, qa_scores
from mergekit_sparsegpt.demo.build import Family
from mergekit_sparsegpt.demo.tiny import load_model, token_windows

# "Clearly beats the base": the expert's own-domain loss is at least this much lower, relative.
MIN_EXPERT_GAIN = 0.10
# The base must beat a unigram model of its training text by this many nats per token.
MIN_BASE_MARGIN = 1.0
# Plain averaging must keep at least this normalized gain in every expert's domain.
MIN_AVERAGING_GAIN = 0.10
TOP_FRACTION = 0.2  # top-|tau| fraction used to measure how much task vectors collide


def unigram_loss(
    train_texts: list[str],
    heldout: torch.Tensor,
    tokenizer: PreTrainedTokenizerFast,
    seq_len: int,
) -> float:
    """Held-out cross-entropy of an add-one unigram model of the training text."""
    train = token_windows(train_texts, tokenizer, 10**9, seq_len).flatten().tolist()
    counts, total, vocab = Counter(train), len(train), len(tokenizer)
    targets = heldout[:, 1:].flatten().tolist()
    nll = -sum(math.log((counts.get(t, 0) + 1) / (total + vocab)) for t in targets)
    return nll / len(targets)


def check_base(base_loss: float, unigram: float, vocab: int) -> bool:
    ok = base_loss < unigram - MIN_BASE_MARGIN
    print(
        f"base prose loss {base_loss:.3f} vs unigram {unigram:.3f} vs uniform {math.log(vocab):.3f}"
        f": {'ok' if ok else 'AWFUL'} (needs a margin of {MIN_BASE_MARGIN} over unigram)"
    )
    return ok


def check_experts(base: Mapping[str, float], experts: Mapping[str, Mapping[str, float]]) -> bool:
    """Each expert's own-domain loss (and accuracy, if any) against the base's."""
    ok = True
    for name, scores in experts.items():
        gain = (base[name] - scores[name]) / base[name]
        wins = gain >= MIN_EXPERT_GAIN
        ok &= wins
        acc = f"{name}_acc"
        extra = f", accuracy {base[acc]:.1%} -> {scores[acc]:.1%}" if acc in scores else ""
        print(
            f"expert {name:<8} beats base on {name}: {'yes' if wins else 'NO'} "
            f"(loss {base[name]:.3f} -> {scores[name]:.3f}, -{gain:.0%}{extra})"
        )
    return ok


def check_averaging(gains: Mapping[str, float], label: str) -> bool:
    ok = all(g >= MIN_AVERAGING_GAIN for g in gains.values())
    cells = ", ".join(f"{d} {g:.2f}" for d, g in gains.items())
    verdict = "ok" if ok else f"NO: some domain keeps < {MIN_AVERAGING_GAIN}"
    print(f"{label} keeps of each expert's gain: {cells} -> {verdict}")
    return ok


def _linear_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    # Decoder-block matrices: the tensors that get Hessians; norms and embeddings excluded.
    return [k for k, v in state.items() if ".layers." in k and v.ndim == 2]


def task_vector_stats(family: Family) -> dict:
    """Relative size of each task vector and how much pairs of them overlap."""
    base = load_file(str(family.base / "model.safetensors"))
    linears = _linear_names(base)
    taus = {
        n: {k: v - base[k] for k, v in load_file(str(p / "model.safetensors")).items()}
        for n, p in family.experts.items()
    }

    def flat(state: Mapping[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        return torch.cat([state[k].flatten().float() for k in keys])

    w_all, w_lin = flat(base, list(base)).norm(), flat(base, linears).norm()
    flat_lin = {n: flat(t, linears) for n, t in taus.items()}
    top = {n: _top_mask(t, linears) for n, t in taus.items()}
    names = list(taus)
    stats: dict = {"relative_norm": {}, "cosine": {}, "top_overlap": {}}
    for n in names:
        stats["relative_norm"][n] = {
            "all": (flat(taus[n], list(base)).norm() / w_all).item(),
            "decoder_linears": (flat_lin[n].norm() / w_lin).item(),
        }
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pair = f"{a}/{b}"
            cos = torch.nn.functional.cosine_similarity(flat_lin[a], flat_lin[b], dim=0)
            stats["cosine"][pair] = cos.item()
            both = (top[a] & top[b]).sum().item() / top[a].sum().item()
            stats["top_overlap"][pair] = both
    return stats


def _top_mask(tau: Mapping[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    masks = []
    for k in keys:
        mag = tau[k].abs().flatten()
        kth = max(1, int(TOP_FRACTION * mag.numel()))
        masks.append(mag >= mag.topk(kth).values[-1])
    return torch.cat(masks)


def print_task_vector_stats(stats: dict) -> None:
    sizes = stats["relative_norm"].items()
    rel = ", ".join(f"{n} {r['decoder_linears']:.1%} ({r['all']:.1%})" for n, r in sizes)
    print(f"task vector size ||tau||/||W||, decoder linears (all weights): {rel}")
    cos = ", ".join(f"{p} {c:+.2f}" for p, c in stats["cosine"].items())
    print(f"pairwise cosine of task vectors (decoder linears): {cos}")
    overlap = ", ".join(f"{p} {o:.2f}" for p, o in stats["top_overlap"].items())
    print(
        f"overlap of top-{TOP_FRACTION:.0%} |tau| entries (chance = {TOP_FRACTION:.2f}): {overlap}"
    )


@torch.no_grad()
def scaled_expert_accuracy(family: Family, evalset: EvalSet, alpha: float) -> dict[str, float]:
    """Exact match of base + alpha * tau per task: how much of a skill survives a scaled vector.

    Every merge scales or thins each task vector, so when this is near zero at alpha = 0.5 no
    merge can be expected to keep the task's accuracy, and only the loss columns carry signal.
    """
    model = load_model(family.base)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    accuracy = {}
    for name, qa in evalset.qa.items():
        expert = load_file(str(family.experts[name] / "model.safetensors"))
        # A tied model's state dict names the shared tensor twice; its file, once.
        scaled = {k: base[k] + alpha * (expert[k] - base[k]) for k in base if k in expert}
        model.load_state_dict(scaled, strict=False)
        model.tie_weights()
        accuracy[name] = qa_scores(model, qa)[1]
    return accuracy
