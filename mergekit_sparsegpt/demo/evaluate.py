"""Score models per domain: held-out loss everywhere, exact-match accuracy on arithmetic."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from mergekit_sparsegpt.demo.build import domain_windows
from mergekit_sparsegpt.demo.corpus import DOMAINS, arithmetic_line, arithmetic_problems
from mergekit_sparsegpt.demo.tiny import greedy_complete, heldout_loss, load_model

ACCURACY = "arithmetic_acc"
# A one-shot prefix: in training most arithmetic lines follow a newline, not <s>.
ONE_SHOT = arithmetic_line(3, 4) + "\n"


@dataclass(frozen=True)
class EvalSet:
    windows: dict[str, torch.Tensor]  # domain -> held-out windows
    problems: list[tuple[str, str]]  # held-out (prompt, answer) pairs


def make_eval_set(
    tokenizer: PreTrainedTokenizerFast, n_windows: int, seq_len: int, n_problems: int
) -> EvalSet:
    """Held-out windows per domain plus arithmetic problems never seen in training."""
    windows = {d: domain_windows(d, "heldout", tokenizer, n_windows, seq_len) for d in DOMAINS}
    return EvalSet(windows, arithmetic_problems("heldout")[:n_problems])


def arithmetic_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, problems: list[tuple[str, str]]
) -> float:
    """Fraction of problems whose greedy answer after ``=`` is exactly right."""
    prompts = [ONE_SHOT + prompt for prompt, _ in problems]
    answers = greedy_complete(model, tokenizer, prompts, max_new_tokens=4)
    return sum(a.strip() == want for a, (_, want) in zip(answers, problems, strict=True)) / len(
        problems
    )


def evaluate(
    model_or_path: PreTrainedModel | str | os.PathLike,
    tokenizer: PreTrainedTokenizerFast,
    evalset: EvalSet,
) -> dict[str, float]:
    """Domain -> held-out loss, plus ``arithmetic_acc``."""
    model = model_or_path
    if not isinstance(model, PreTrainedModel):
        model = load_model(model)
    scores = {d: heldout_loss(model, w) for d, w in evalset.windows.items()}
    scores[ACCURACY] = arithmetic_accuracy(model, tokenizer, evalset.problems)
    return scores


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Fixed-width table: one row per model, held-out losses then arithmetic accuracy."""
    head = f"{'model':<24}" + "".join(f"{d + ' loss':>17}" for d in DOMAINS)
    lines = [head + f"{'arithmetic acc':>16}", "-" * (len(head) + 16)]
    for name, s in rows.items():
        losses = "".join(f"{s[d]:>17.3f}" for d in DOMAINS)
        lines.append(f"{name:<24}{losses}{s[ACCURACY]:>16.1%}")
    return "\n".join(lines)


def normalized_score(
    rows: dict[str, dict[str, float]], name: str, expert_domains: dict[str, str]
) -> float:
    """Mean over experts of (base loss - loss) / (base loss - expert loss) on the expert's domain.

    1 means the model is as good as every expert on its own domain, 0 no better than the base.
    ``expert_domains`` maps each expert row (``expert:<name>``) to its domain.
    """
    base = rows["base"]
    gains = [
        (base[domain] - rows[name][domain]) / (base[domain] - rows[expert][domain])
        for expert, domain in expert_domains.items()
    ]
    return sum(gains) / len(gains)


def format_scores(
    rows: dict[str, dict[str, float]], expert_domains: dict[str, str], reference: str
) -> str:
    """One line per merge row: its normalized score and the ratio to ``reference``'s score."""
    merges = [name for name in rows if name.startswith("merge:")]
    scores = {name: normalized_score(rows, name, expert_domains) for name in merges}
    lines = [f"{'merge':<24}{'normalized score':>17}{'vs ' + reference:>17}", "-" * 58]
    for name, score in scores.items():
        ratio = score / scores[reference] if reference in scores else float("nan")
        lines.append(f"{name:<24}{score:>17.3f}{ratio:>16.2f}x")
    return "\n".join(lines)
