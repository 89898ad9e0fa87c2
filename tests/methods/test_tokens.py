"""The token embedding's rules and the output head's switch, against plain references."""

import pytest
import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import TensorGroup

from mergekit_sparsegpt.methods.context import MergeContext, activated
from mergekit_sparsegpt.methods.tokens import check_token_parameters, count_weighted_delta
from mergekit_sparsegpt.statistics.hessian import hessian_statistics
from mergekit_sparsegpt.statistics.task_statistics import ModelRoles, TaskStatistics

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
VOCABULARY, HIDDEN = 7, 4
WEIGHTS = {"a": 1.0, "b": 0.5}
F64 = torch.float64


def _counts(seed: int) -> torch.Tensor:
    counts = torch.randint(0, 5, (VOCABULARY,), generator=torch.Generator().manual_seed(seed))
    counts[VOCABULARY - 1] = 0  # a token no task used
    return counts.float()


def _head_gram(seed: int) -> torch.Tensor:
    inputs = torch.randn(30, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return (2 / 30 * inputs.T @ inputs).float()


def _task(seed: int, tied: bool) -> TaskStatistics:
    roles = ModelRoles(EMBED, HEAD, tied)
    task = TaskStatistics.empty("model.layers", roles)
    task.token_counts = _counts(seed)
    task.groups[HEAD] = HEAD
    task.statistics[HEAD] = hessian_statistics(_head_gram(seed), keep_hessian=True)
    task.samples[HEAD] = 30
    return task


def _context(tied: bool = False) -> MergeContext:
    tasks = {(m, f"{m}.txt"): _task(seed, tied) for seed, m in enumerate(WEIGHTS, start=1)}
    return MergeContext(hessian_inputs={}, tasks=tasks, roles=ModelRoles(EMBED, HEAD, tied))


def _group(name: str, shape: tuple[int, ...]) -> TensorGroup:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=generator)
    tensors = [base] + [base + 0.1 * torch.randn(*shape, generator=generator) for _ in WEIGHTS]
    return TensorGroup.from_tensors(tensors, ids=["base", *WEIGHTS], base_index=0, name=name)


def _merge(method: str, context: MergeContext, group: TensorGroup, **parameters) -> torch.Tensor:
    values = {"weight": WEIGHTS, "calibration": {m: f"{m}.txt" for m in WEIGHTS}, **parameters}
    with activated(context):
        (merged,) = merge_methods.get(method)([group], parameters=values)
    return merged


def _count_reference(group: TensorGroup, smoothing: float) -> torch.Tensor:
    """Row by row, in loops: each task's vector weighted by w_i (c_i(t) + s)."""
    base = group.base.tensor.to(F64)
    result = base.clone()
    counts = {m: _counts(seed) for seed, m in enumerate(WEIGHTS, start=1)}
    for token in range(VOCABULARY):
        weights = {m: WEIGHTS[m] * (float(counts[m][token]) + smoothing) for m in WEIGHTS}
        total = sum(weights.values())
        for entry in group.non_base:
            tau = entry.tensor.to(F64)[token] - base[token]
            result[token] += (weights[entry.id] / total if total else 0.0) * tau
    return result


def _head_reference(group: TensorGroup) -> torch.Tensor:
    """RegMean's exact solve over the head's Grams, by least squares."""
    base = group.base.tensor.to(F64)
    grams = [_head_gram(seed).to(F64) for seed, _ in enumerate(WEIGHTS, start=1)]
    taus = [entry.tensor.to(F64) - base for entry in group.non_base]
    weights = [WEIGHTS[entry.id] for entry in group.non_base]
    lhs = sum(w * g for w, g in zip(weights, grams, strict=True))
    rhs = sum(w * g @ tau.T for w, g, tau in zip(weights, grams, taus, strict=True))
    return base + torch.linalg.lstsq(lhs, rhs).solution.T


@pytest.mark.parametrize("method", ["regmean", "sparsegpt_regmean"])
@pytest.mark.parametrize("smoothing", [0.0, 0.5, 3.0])
def test_untied_embedding_is_the_count_weighted_mean(method, smoothing):
    context, group = _context(), _group(EMBED, (VOCABULARY, HIDDEN))
    merged = _merge(method, context, group, token_smoothing=smoothing, **{"lambda": 1.0})
    torch.testing.assert_close(merged.to(F64), _count_reference(group, smoothing))
    assert context.report[EMBED]["path"] == "tokens"
    assert context.report[EMBED]["rule"] == "tokens"
    assert context.report[EMBED]["kind"] == "token embedding"
    if smoothing == 0:  # no task used the last token: its row stays the base's
        assert torch.equal(merged[-1], group.base.tensor[-1])


def test_lambda_scales_the_count_weighted_delta():
    context, group = _context(), _group(EMBED, (VOCABULARY, HIDDEN))
    merged = _merge("regmean", context, group, **{"lambda": 0.5})
    base = group.base.tensor.to(F64)
    expected = base + 0.5 * (_count_reference(group, 0.5) - base)
    torch.testing.assert_close(merged.to(F64), expected)


@pytest.mark.parametrize("rule", ["blend", "head", "tokens"])
def test_tied_embedding_rules(rule):
    context, group = _context(tied=True), _group(EMBED, (VOCABULARY, HIDDEN))
    merged = _merge("regmean", context, group, tied_embeddings=rule)
    tokens, head = _count_reference(group, 0.5), _head_reference(group)
    expected = {"tokens": tokens, "head": head, "blend": (tokens + head) / 2}[rule]
    torch.testing.assert_close(merged.to(F64), expected, rtol=1e-5, atol=1e-6)
    assert context.report[EMBED]["rule"] == rule
    assert context.report[EMBED]["kind"] == "token embedding (tied to the head)"
    assert ("solve" in context.report[EMBED]) == (rule != "tokens")


def test_untied_head_is_solved_like_a_linear_unless_switched_off():
    context, group = _context(), _group(HEAD, (VOCABULARY, HIDDEN))
    merged = _merge("regmean", context, group)
    torch.testing.assert_close(merged.to(F64), _head_reference(group), rtol=1e-5, atol=1e-6)
    assert (context.report[HEAD]["path"], context.report[HEAD]["kind"]) == (
        "regmean",
        "output head",
    )
    off = _merge("regmean", context, group, lm_head_statistics=False, nongram_scale=0.25)
    base = group.base.tensor
    summed = sum((e.tensor - base) * WEIGHTS[e.id] for e in group.non_base)
    torch.testing.assert_close(off, base + 0.25 * summed)
    assert context.report[HEAD] == {
        "path": "fallback",
        "kind": "output head",
        "models": {},
        "reason": "lm_head_statistics: false",
    }


def test_embedding_takes_task_arithmetic_when_asked_or_when_the_vocabulary_changed():
    context = _context()
    group = _group(EMBED, (VOCABULARY, HIDDEN))
    base = group.base.tensor
    summed = sum((e.tensor - base) * WEIGHTS[e.id] for e in group.non_base)
    merged = _merge("regmean", context, group, embedding_rule="stock")
    torch.testing.assert_close(merged, base + 0.2 * summed)
    assert context.report[EMBED]["reason"] == "embedding_rule: stock"
    grown = _group(EMBED, (VOCABULARY + 2, HIDDEN))  # tokenizer_source added two tokens
    _merge("regmean", context, grown)
    assert context.report[EMBED]["path"] == "fallback"
    assert "tokenizer_source" in context.report[EMBED]["reason"]


def test_ties_takes_the_stock_rule_on_embeddings_when_asked_and_says_why():
    context, group = _context(), _group(EMBED, (VOCABULARY, HIDDEN))
    merged = _merge("sparsegpt_ties", context, group, density=0.5, embedding_rule="stock")
    (stock,) = merge_methods.get("ties")([group], parameters={"weight": WEIGHTS, "density": 0.5})
    torch.testing.assert_close(merged, stock)
    assert context.report[EMBED]["path"] == "fallback"
    assert context.report[EMBED]["reason"] == "embedding_rule: stock"
    by_counts = _merge("sparsegpt_ties", context, group, density=0.5)
    assert context.report[EMBED]["path"] == "tokens"  # tests/methods/test_combine.py
    assert not torch.allclose(by_counts, stock)


def test_count_weighted_delta_on_meta_tensors_stays_on_their_device():
    taus = [torch.empty(VOCABULARY, HIDDEN, device="meta") for _ in range(2)]
    counts = [torch.empty(VOCABULARY, device="meta") for _ in range(2)]
    assert count_weighted_delta(taus, counts, [1.0, 1.0], 0.5).device.type == "meta"


@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan")])
def test_bad_smoothing_is_refused(value):
    with pytest.raises(ValueError, match="token_smoothing must be a finite count >= 0"):
        check_token_parameters({"token_smoothing": value})
