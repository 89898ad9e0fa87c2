"""The norms' scales: RegMean's channel-energy solve, the plain mean and the stock rule, against
loop references."""

import pytest
import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import TensorGroup

from mergekit_sparsegpt.methods.context import MergeContext, activated
from mergekit_sparsegpt.methods.norms import NORM_RULE, scale_delta
from mergekit_sparsegpt.statistics.hessian import hessian_statistics
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics

NORM = "model.layers.1.input_layernorm.weight"
CHANNELS = 6
WEIGHTS = {"a": 1.0, "b": 0.5, "c": 2.0}
F64 = torch.float64


def _energies(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(CHANNELS, generator=generator) * 10 + 0.1


def _context() -> MergeContext:
    tasks = {}
    for seed, model in enumerate(WEIGHTS, start=1):
        task = TaskStatistics.empty("model.layers")
        task.groups[NORM] = NORM
        task.statistics[NORM] = hessian_statistics(_energies(seed), keep_hessian=True)
        task.samples[NORM] = 8
        task.linear_suffixes = frozenset({"input_layernorm.weight"})
        tasks[(model, f"{model}.txt")] = task
    return MergeContext(hessian_inputs={}, tasks=tasks)


def _group() -> TensorGroup:
    generator = torch.Generator().manual_seed(0)
    base = 1 + 0.1 * torch.randn(CHANNELS, generator=generator)
    tensors = [base] + [base + 0.2 * torch.randn(CHANNELS, generator=generator) for _ in WEIGHTS]
    return TensorGroup.from_tensors(tensors, ids=["base", *WEIGHTS], base_index=0, name=NORM)


def _merge(method: str, group: TensorGroup, **parameters) -> tuple[torch.Tensor, MergeContext]:
    context = _context()
    values = {"weight": WEIGHTS, "calibration": {m: f"{m}.txt" for m in WEIGHTS}, **parameters}
    with activated(context):
        (merged,) = merge_methods.get(method)([group], parameters=values)
    return merged, context


def _reference(group: TensorGroup, by_energy: bool, scale: float) -> torch.Tensor:
    """Channel by channel, in loops: w_base + scale * sum_i w_i e_i tau_i / sum_i w_i e_i."""
    base = group.base.tensor.to(F64)
    result = base.clone()
    energies = {m: _energies(seed) for seed, m in enumerate(WEIGHTS, start=1)}
    for channel in range(CHANNELS):
        shares = {
            m: WEIGHTS[m] * (float(energies[m][channel]) if by_energy else 1.0) for m in WEIGHTS
        }
        total = sum(shares.values())
        for entry in group.non_base:
            tau = float(entry.tensor[channel]) - float(base[channel])
            result[channel] += scale * shares[entry.id] / total * tau
    return result


@pytest.mark.parametrize("method", ["regmean", "sparsegpt_regmean"])
@pytest.mark.parametrize("rule", ["energy", "mean"])
def test_regmean_scale_is_the_energy_weighted_or_plain_mean(method, rule):
    group = _group()
    merged, context = _merge(method, group, norm_rule=rule, **{"lambda": 0.8})
    expected = _reference(group, rule == "energy", 0.8)
    torch.testing.assert_close(merged.to(F64), expected, rtol=1e-5, atol=1e-6)
    assert context.report[NORM] == {
        "path": "norm" if rule == "energy" else "norm-mean",
        "kind": "norm or scale",
        "models": {},
        "rule": rule,
    }


def test_energy_and_mean_differ_and_the_solve_is_least_squares():
    """The energy rule is argmin_w sum_i w_i ||(w - w_i) * x_hat_i||^2 with
    sum_t x_hat_i[t, c]^2 = E_i[c]: a least-squares solve over stacked inputs agrees."""
    group = _group()
    energy, _ = _merge("regmean", group, norm_rule="energy")
    mean, context = _merge("regmean", group)  # the default
    assert context.report[NORM]["rule"] == "mean"
    assert not torch.allclose(energy, mean, atol=1e-4)
    rows, targets = [], []
    for seed, entry in enumerate(group.non_base, start=1):
        # One input row per channel with x_hat^2 = E: its Gram is diag(E), as captured.
        x_hat = torch.diag(_energies(seed).to(F64).sqrt()) * WEIGHTS[entry.id] ** 0.5
        rows.append(x_hat)
        targets.append(x_hat @ entry.tensor.to(F64))
    solution = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution
    torch.testing.assert_close(energy.to(F64), solution, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["regmean", "sparsegpt_ties", "sparsegpt_dare"])
def test_stock_rule_takes_the_methods_statistics_free_rule_and_says_why(method):
    group = _group()
    trims = {} if method == "regmean" else {"density": 1.0}
    merged, context = _merge(method, group, norm_rule="stock", **trims)
    assert context.report[NORM]["path"] == "fallback"
    assert context.report[NORM]["reason"] == "norm_rule: stock"
    if method == "regmean":  # task arithmetic x nongram_scale (0.2)
        taus = sum(WEIGHTS[e.id] * (e.tensor - group.base.tensor) for e in group.non_base)
        torch.testing.assert_close(merged, group.base.tensor + 0.2 * taus)
    else:  # the stock method itself (density 1: DARE drops nothing, so no randomness)
        stock = merge_methods.get("ties" if method == "sparsegpt_ties" else "dare_linear")
        (expected,) = stock([group], parameters={"weight": WEIGHTS, **trims})
        torch.testing.assert_close(merged, expected)


def test_scale_delta_on_meta_tensors_stays_on_their_device():
    base = torch.empty(CHANNELS, device="meta")
    group = TensorGroup.from_tensors([base, base, base], ids=["base", "a", "b"], base_index=0)
    energies = [torch.empty(CHANNELS, device="meta")] * 2
    assert scale_delta(group, [1.0, 1.0], energies).device.type == "meta"


def test_unknown_norm_rule_is_refused():
    with pytest.raises(ValueError, match="norm_rule must be one of mean, energy, stock"):
        NORM_RULE.check({"norm_rule": "average"})
