"""Score a model on every domain: held-out loss, and exact-match accuracy for generated tasks.

For exact-answer tasks the loss is taken over the answer tokens (and the newline that ends
them) only, after a one-shot example and the prompt: that isolates the skill from the random
operands, which no model can predict. Exact match comes from the same teacher-forced pass:
greedy decoding reproduces the answer exactly when the argmax at every answer position is the
answer token and the next one is the newline, so no generation loop is needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from benchmarks.quality.tasks import Domain
from mergekit_sparsegpt.demo.tiny import heldout_loss, load_model, token_windows


@dataclass(frozen=True)
class QASet:
    """Teacher-forcing batch of one task: right-padded ids, targets, and the answer mask."""

    ids: torch.Tensor  # [n, L] inputs
    targets: torch.Tensor  # [n, L] next-token ids (0 where masked)
    mask: torch.Tensor  # [n, L] True at answer (and closing newline) positions


@dataclass(frozen=True)
class EvalSet:
    windows: dict[str, torch.Tensor]  # text domain -> held-out windows
    qa: dict[str, QASet]  # exact-answer task -> held-out problems


def _ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_qa_set(
    tokenizer: PreTrainedTokenizerFast, domain: Domain, n_problems: int, split: str = "heldout"
) -> QASet:
    """Problems of one split of a task, each after a one-shot example from its train split."""
    assert domain.problems is not None
    shot_prompt, shot_answer = domain.problems("train")[0]
    # In training most lines follow a newline, not <s>: a one-shot line puts them in context.
    shot = f"{shot_prompt}{shot_answer}\n"
    rows: list[tuple[list[int], list[int]]] = []
    for prompt, answer in domain.problems(split)[:n_problems]:
        context = [tokenizer.bos_token_id, *_ids(tokenizer, shot + prompt)]
        reply = _ids(tokenizer, answer + "\n")
        # Separate tokenization must equal the training text's, or the mask would be off.
        if context[1:] + reply != _ids(tokenizer, shot + prompt + answer + "\n"):
            raise ValueError(f"{domain.name}: answer tokens depend on context in {prompt!r}")
        rows.append((context, reply))
    return qa_batch(rows)


def qa_batch(rows: list[tuple[list[int], list[int]]]) -> QASet:
    """Teacher-forcing batch of (context ids, reply ids) rows; the reply is what is scored."""
    width = max(len(c) + len(r) for c, r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # right padding: causal, so harmless
    targets = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (context, reply) in enumerate(rows):
        seq = context + reply
        ids[i, : len(seq)] = torch.tensor(seq)
        # Position t predicts token t+1: the reply's tokens are predicted from len(context)-1 on.
        start = len(context) - 1
        targets[i, start : start + len(reply)] = torch.tensor(reply)
        mask[i, start : start + len(reply)] = True
    return QASet(ids, targets, mask)


def make_eval_set(
    tokenizer: PreTrainedTokenizerFast,
    domains: Mapping[str, Domain],
    n_windows: int,
    seq_len: int,
    n_problems: int,
    split: str = "heldout",
) -> EvalSet:
    """Windows and problems of one split of every domain: ``heldout`` scores, ``calibration``
    validates (it is the only other data a user has; the trained splits would flatter experts)."""
    windows = {
        name: token_windows(d.texts(split), tokenizer, n_windows, seq_len)
        for name, d in domains.items()
        if not d.exact
    }
    qa = {
        name: make_qa_set(tokenizer, d, n_problems, split) for name, d in domains.items() if d.exact
    }
    return EvalSet(windows, qa)


@torch.no_grad()
def qa_scores(model: PreTrainedModel, qa: QASet) -> tuple[float, float]:
    """(mean answer-token loss, exact-match accuracy) in one batched forward pass."""
    logits = model(input_ids=qa.ids).logits.float()
    loss = F.cross_entropy(logits[qa.mask], qa.targets[qa.mask])
    right = (logits.argmax(-1) == qa.targets) | ~qa.mask
    return loss.item(), right.all(dim=1).float().mean().item()


def evaluate(model_or_path: PreTrainedModel | str | os.PathLike, evalset: EvalSet) -> dict:
    """Domain -> held-out loss; ``<task>_acc`` -> exact-match accuracy of each generated task."""
    model = model_or_path
    if not isinstance(model, PreTrainedModel):
        model = load_model(model)
    model.eval()
    scores = {name: heldout_loss(model, w) for name, w in evalset.windows.items()}
    for name, qa in evalset.qa.items():
        scores[name], scores[f"{name}_acc"] = qa_scores(model, qa)
    return scores


def normalized_gains(
    scores: Mapping[str, float],
    base: Mapping[str, float],
    experts: Mapping[str, Mapping[str, float]],
) -> dict[str, float]:
    """Per expert domain: (base - merged) / (base - expert); 1 keeps the expert's whole gain."""
    return {d: (base[d] - scores[d]) / (base[d] - expert[d]) for d, expert in experts.items()}
