"""``combine: energy`` and the trims of the token embedding and the norms' scales in
sparsegpt_ties / sparsegpt_dare, against entry-by-entry references."""

import itertools

import pytest
import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import TensorGroup

from mergekit_sparsegpt.methods.context import MergeContext, activated
from mergekit_sparsegpt.statistics.hessian import hessian_statistics
from mergekit_sparsegpt.statistics.task_statistics import ModelRoles, TaskStatistics

LINEAR = "model.layers.0.mlp.down_proj.weight"
EMBED = "model.embed_tokens.weight"
NORM = "model.layers.0.post_attention_layernorm.weight"
ROWS, COLUMNS, VOCABULARY = 4, 6, 9
WEIGHTS = {"a": 1.0, "b": 0.5, "c": 0.8}
F64 = torch.float64


def _diagonal(seed: int) -> torch.Tensor:
    """A Hessian's diagonal with very uneven columns, from (2/n) X^T X."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, COLUMNS)[torch.randperm(COLUMNS, generator=generator)]
    inputs = torch.randn(50, COLUMNS, generator=generator, dtype=F64) * scales.to(F64)
    return 2 / 50 * inputs.T @ inputs


def _counts(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 10)
    return torch.randint(0, 6, (VOCABULARY,), generator=generator).float()


def _energies(seed: int) -> torch.Tensor:
    """A norm's channel energies, uneven across channels and tasks."""
    generator = torch.Generator().manual_seed(seed + 20)
    return torch.logspace(-1, 1, COLUMNS)[torch.randperm(COLUMNS, generator=generator)]


def _context() -> MergeContext:
    tasks = {}
    roles = ModelRoles(EMBED, "lm_head.weight", False)
    for seed, model in enumerate(WEIGHTS, start=1):
        task = TaskStatistics.empty("model.layers", roles)
        task.groups[LINEAR] = LINEAR
        task.statistics[LINEAR] = hessian_statistics(_diagonal(seed).float())
        task.samples[LINEAR] = 50
        task.groups[NORM] = NORM
        task.statistics[NORM] = hessian_statistics(_energies(seed))
        task.samples[NORM] = 50
        task.linear_suffixes = frozenset(
            {"mlp.down_proj.weight", "post_attention_layernorm.weight"}
        )
        task.token_counts = _counts(seed)
        tasks[(model, f"{model}.txt")] = task
    return MergeContext(hessian_inputs={}, tasks=tasks, roles=roles)


def _group(name: str, shape: tuple[int, ...]) -> TensorGroup:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=generator)
    tensors = [base] + [base + torch.randn(*shape, generator=generator) for _ in WEIGHTS]
    return TensorGroup.from_tensors(tensors, ids=["base", *WEIGHTS], base_index=0, name=name)


def _merge(method: str, group: TensorGroup, **parameters) -> tuple[torch.Tensor, MergeContext]:
    context = _context()
    values = {"weight": WEIGHTS, "calibration": {m: f"{m}.txt" for m in WEIGHTS}}
    with activated(context):
        (merged,) = merge_methods.get(method)([group], parameters={**values, **parameters})
    return merged, context


def _reference(
    group: TensorGroup,
    energy: dict[str, torch.Tensor],
    density: float,
    ties: bool,
    scale: float,
    mix: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Trim each task vector to its top tau^2 x energy entries (DARE: L1-rescaled), elect signs
    by the weighted sum (TIES), then per entry sum w_i e_i tau_i over the agreeing models,
    divided by sum w_i e_i (TIES) or not (DARE), e_i the ``mix`` energy (default ``energy``)
    relative to the models' mean."""
    mix = energy if mix is None else mix
    base = group.base.tensor.to(F64)
    trimmed = {}
    for entry in group.non_base:
        tau = entry.tensor.to(F64) - base
        scores = (tau.square() * energy[entry.id]).flatten()
        keep = max(1, int(density * tau.numel()))
        mask = torch.zeros(tau.numel(), dtype=F64)
        mask[scores.argsort(descending=True)[:keep]] = 1
        kept = tau * mask.reshape(tau.shape)
        if not ties:
            kept = kept * tau.abs().sum() / kept.abs().sum()
        trimmed[entry.id] = kept
    mean_energy = sum(mix.values()) / len(mix)
    result = base.clone()
    for index in itertools.product(*(range(n) for n in base.shape)):
        elected = torch.sign(sum(WEIGHTS[m] * t[index] for m, t in trimmed.items()))
        numerator = denominator = 0.0
        for model, vector in trimmed.items():
            if ties and torch.sign(vector[index]) != elected:
                continue
            share = WEIGHTS[model] * float(mix[model][index] / mean_energy[index])
            numerator += share * float(vector[index])
            denominator += share
        if ties:
            result[index] += numerator / denominator if denominator else 0.0
        else:
            result[index] += numerator
    return base + scale * (result - base)


@pytest.mark.parametrize("method", ["sparsegpt_ties", "sparsegpt_dare"])
def test_energy_combination_of_a_linear(method):
    """sparsegpt_ties' default; sparsegpt_dare's option."""
    group = _group(LINEAR, (ROWS, COLUMNS))
    merged, context = _merge(method, group, density=0.5, combine="energy", **{"lambda": 0.9})
    energy = {
        m: torch.diagonal(_diagonal(seed).float()).to(F64).expand(ROWS, COLUMNS)
        for seed, m in enumerate(WEIGHTS, start=1)
    }
    expected = _reference(group, energy, 0.5, method == "sparsegpt_ties", 0.9)
    torch.testing.assert_close(merged.to(F64), expected, rtol=1e-5, atol=1e-5)
    assert context.report[LINEAR]["combine"] == "energy"
    plain, _ = _merge(method, group, density=0.5, combine="mean", **{"lambda": 0.9})
    assert not torch.allclose(plain, merged, atol=1e-3)  # the energies moved the mean


@pytest.mark.parametrize("combine", ["mean", "energy"])
def test_ties_embedding_is_trimmed_and_combined_by_token_counts(combine):
    group = _group(EMBED, (VOCABULARY, ROWS))
    smoothing = 0.5
    merged, context = _merge(
        "sparsegpt_ties", group, density=0.3, combine=combine, token_smoothing=smoothing
    )
    rows = {m: _counts(seed) + smoothing for seed, m in enumerate(WEIGHTS, start=1)}
    trim_energy = {m: c.to(F64).unsqueeze(-1).expand(VOCABULARY, ROWS) for m, c in rows.items()}
    ones = {m: torch.ones(VOCABULARY, ROWS, dtype=F64) for m in WEIGHTS}
    mix = trim_energy if combine == "energy" else ones  # "mean": mergekit's disjoint mean
    expected = _reference(group, trim_energy, 0.3, True, 1.0, mix)
    torch.testing.assert_close(merged.to(F64), expected, rtol=1e-5, atol=1e-5)
    assert (context.report[EMBED]["path"], context.report[EMBED]["kind"]) == (
        "tokens",
        "token embedding",
    )


@pytest.mark.parametrize("method", ["sparsegpt_ties", "sparsegpt_dare"])
@pytest.mark.parametrize("combine", ["mean", "energy"])
def test_norm_scale_is_trimmed_and_combined_by_channel_energies(method, combine):
    """``norm_rule: energy``: the scale as a diagonal linear, H = diag(E), never re-fitted."""
    group = _group(NORM, (COLUMNS,))
    merged, context = _merge(
        method, group, density=0.5, combine=combine, compensate=True, norm_rule="energy"
    )
    energy = {m: _energies(seed).to(F64) for seed, m in enumerate(WEIGHTS, start=1)}
    mix = energy if combine == "energy" else {m: torch.ones(COLUMNS, dtype=F64) for m in WEIGHTS}
    expected = _reference(group, energy, 0.5, method == "sparsegpt_ties", 1.0, mix)
    torch.testing.assert_close(merged.to(F64), expected, rtol=1e-5, atol=1e-5)
    assert merged.shape == (COLUMNS,)
    assert (context.report[NORM]["path"], context.report[NORM]["kind"]) == ("norm", "norm or scale")


def test_trimming_methods_default_to_the_rules_chosen_on_validation():
    """Both combine by energy; sparsegpt_dare merges lm_head by its stock rule and its norms by
    theirs (docs/quality-benchmark.md)."""
    defaults = {
        method: {p.name: p.default for p in merge_methods.get(method).spec.parameters}
        for method in ("sparsegpt_ties", "sparsegpt_dare")
    }
    assert (
        defaults["sparsegpt_ties"]["combine"] == defaults["sparsegpt_dare"]["combine"] == "energy"
    )
    assert defaults["sparsegpt_ties"]["lm_head_statistics"] is True
    assert defaults["sparsegpt_dare"]["lm_head_statistics"] is False
    assert defaults["sparsegpt_dare"]["norm_rule"] == "stock"
